"""`signalrl plan` against measured peak memory: SFT and GRPO on the tiny, small and base presets.

Each measurement runs in a fresh Python process (nothing allocated by an earlier run is
left in it): `torch.profiler` with `profile_memory=True` records every allocation and free of
the c10 CPU allocator from before the trainer is built until after `--steps` training steps
(rollouts, reference and training forward/backward, AdamW). The measured peak is the
largest running sum of those events: the bytes of live tensors, as
`torch.cuda.max_memory_allocated` counts them on a GPU; not the process RSS, which malloc's
caching and fragmentation distort and which includes Python, libraries and the tokenizer.
The plan is `signalrl.plan.plan_one` for the same recipe, strategy `ddp` on 1 GPU (the
single-process run), with the prompt and row lengths the run actually had.

    python benchmarks/plan_vs_measured.py                   # tiny, small, base; SFT and GRPO
    python benchmarks/plan_vs_measured.py --presets tiny --json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

TOLERANCE = 0.25


def recipe_dict(preset: str, trainer: str, precision: str, out_dir: str) -> dict[str, Any]:
    """A short run of `trainer` (sft or grpo) on `preset`: arithmetic, batches large enough
    for activations and the KV cache to matter next to the weights."""
    base: dict[str, Any] = {
        "name": f"plan-{trainer}-{preset}",
        "output_dir": out_dir,
        "model": {"name_or_path": preset, "device": "cpu"},
        "task": {"name": "arithmetic", "digits": 3, "operands": 3, "n_train": 256, "n_test": 8},
        "train": {"steps": 3, "lr": 1e-4, "batch_size": 16, "precision": precision},
        "eval": {"n": 8},
        "logging": {"progress": False, "tensorboard": False, "samples_every": 0},
        "doctor": {"enabled": False},
    }
    if trainer == "sft":
        return {**base, "trainer": "sft"}
    base["train"]["batch_size"] = 4
    return {
        **base,
        "trainer": "online_rl",
        "rl": {"algorithm": "grpo", "group_size": 4},
        "sampling": {"max_new_tokens": 48},
    }


def _peak_from_profile(prof: Any) -> float:
    """The largest running sum of the profiler's allocation events (frees are negative)."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.typed[0] == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return float(peak)


def measure_here(data: dict[str, Any], steps: int) -> dict[str, Any]:
    """Build the trainer of recipe `data` and run `steps` steps under the memory profiler
    (call in a fresh process: `measure`); returns the peak and the lengths the run had."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from signalrl.config import recipe_from_dict
    from signalrl.rollout.sampler import encode_prompts
    from signalrl.trainers import trainer_class

    torch.set_num_threads(2)
    recipe = recipe_from_dict(data, "<plan_vs_measured>")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer = trainer_class(recipe.trainer)(recipe, overwrite=True)
        for _ in range(steps):
            trainer.step += 1
            trainer.train_step()
    out: dict[str, Any] = {"peak_bytes": _peak_from_profile(prof)}
    if recipe.trainer == "sft":
        d = trainer.train_data
        out["seq_len"] = max(
            len(p) + len(c) for p, c in zip(d.prompt_ids, d.completion_ids, strict=True)
        )
    else:
        prompts = encode_prompts(trainer.tokenizer, [r["prompt"] for r in trainer.rows])
        out["prompt_len"] = max(len(p) for p in prompts)
    return out


def measure(data: dict[str, Any], steps: int = 3) -> dict[str, Any]:
    """`measure_here` in a fresh Python process."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import plan_vs_measured as m; "
        "print(json.dumps(m.measure_here(json.loads(sys.argv[2]), int(sys.argv[3]))))"
    )
    here = str(Path(__file__).resolve().parent)
    proc = subprocess.run(
        [sys.executable, "-c", code, here, json.dumps(data), str(steps)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def planned(data: dict[str, Any], lengths: dict[str, Any], foreach: bool = True) -> float:
    """The plan's peak for recipe `data` on one GPU (ddp), with the run's lengths; `foreach`
    False: with the per-tensor AdamW step that torch runs on the CPU (True: CUDA's)."""
    from signalrl.config import recipe_from_dict
    from signalrl.plan import count_shape, extra_models, model_config, plan_one, workload

    recipe = recipe_from_dict(data, "<plan_vs_measured>")
    config, source = model_config(recipe.model.name_or_path, recipe.model, "<recipe>")
    shape = count_shape(config, source)
    w = workload(recipe, lengths.get("prompt_len", 1), lengths.get("seq_len"))
    extra = extra_models(recipe, shape, "<recipe>")
    return plan_one(recipe, shape, w, extra, "ddp", 1, foreach=foreach).total


def compare(preset: str, trainer: str, precision: str, steps: int = 3) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        data = recipe_dict(preset, trainer, precision, tmp)
        got = measure(data, steps)
    plan = planned(data, got)
    cpu = planned(data, got, foreach=False)
    return {
        "preset": preset,
        "trainer": trainer,
        "precision": precision,
        "plan_mib": plan / 2**20,
        "measured_mib": got["peak_bytes"] / 2**20,
        "ratio": plan / got["peak_bytes"],
        "plan_cpu_adamw_mib": cpu / 2**20,
        "ratio_cpu_adamw": cpu / got["peak_bytes"],
        **{k: v for k, v in got.items() if k != "peak_bytes"},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,small,base")
    ap.add_argument("--trainers", default="sft,grpo")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [
        compare(p, t, prec, args.steps)
        for p in args.presets.split(",")
        for t in args.trainers.split(",")
        for prec in args.precisions.split(",")
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="signalrl plan (ddp x1) vs measured peak of live tensors (CPU)")
    cols = ("preset", "trainer", "precision", "plan MiB", "measured MiB", "plan/measured")
    for col in (*cols, "plan, CPU AdamW", "ratio"):
        table.add_column(col, justify="right")
    for r in rows:
        ok = abs(r["ratio"] - 1) <= TOLERANCE
        table.add_row(
            r["preset"],
            r["trainer"],
            r["precision"],
            f"{r['plan_mib']:.1f}",
            f"{r['measured_mib']:.1f}",
            f"[{'green' if ok else 'red'}]{r['ratio']:.3f}",
            f"{r['plan_cpu_adamw_mib']:.1f}",
            f"{r['ratio_cpu_adamw']:.3f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
