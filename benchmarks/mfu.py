"""Training throughput and model FLOP utilisation of the `base` preset's SFT and GRPO phases.

Run from the repository root (no TRL needed):

    python benchmarks/mfu.py                      # fp32 and bf16, 2 warm-up + 5 timed steps
    python benchmarks/mfu.py --quick              # smoke run: 1 warm-up + 2 timed steps
    python benchmarks/mfu.py --precisions bf16 --phases sft --out mfu.json --wait-idle 120

The trainers are built as `run_recipe` builds them (`trainer_class(recipe.trainer)(recipe)`)
from the shipped recipes with the `base` preset (about 25M parameters; hidden 512, 8 layers)
instead of their model: `recipes/sft-small-arithmetic.yaml` (64 sequences per step) and
`recipes/grpo-arithmetic.yaml` (16 prompts x 8 samples, at most 6 new tokens, k3 KL to a
frozen reference in the loss). GRPO starts from the fresh preset, whose arithmetic rewards are
all 0, so its reward is replaced by a deterministic hash of each completion in [0, 1)
(`hash_reward`): the groups have non-zero advantages, as in a real run. Each phase runs at
each precision of `--precisions` (`train.precision`: fp32, or bf16 autocast over fp32
weights) with `train.threads = --threads`. Every step is `trainer.train_step()`; the first
`--warmup` steps are not timed.

What is timed: the training part of a step only, i.e. `TrainerBase.update` (the forward and
backward passes of every micro-batch and the optimizer step), wrapped with a timer. For GRPO
that excludes sampling, scoring, the reference pass and the advantages, which signalrl logs
as `time/rollout_s` (the JSON also records `time/step_s - time/rollout_s` from the step's
metrics as a cross-check; it adds the step's metric bookkeeping). Training tokens are the
tokens the training forward processed, from the trainer's `student/forward_tokens` counter
over `update` (SFT: the non-padding tokens of the batch; GRPO: each distinct prompt once, as
signalrl shares the prompt prefix, plus every trained completion token).

FLOPs (the PaLM appendix B convention, the forward and backward of the model's matmuls):

    FLOPs per token = 6 * N + 12 * n_layers * hidden * S

N counts the parameters that take part in a matmul per token: every parameter except the
input embedding (a lookup), with the LM head counted once whether or not it is tied to the
embedding. S is the mean context length (attention-mask sum) of the batch's rows: the
attention scores and the weighted sum, forward and backward. Achieved FLOP/s = FLOPs per token
x training tokens / training seconds. No recomputation is counted (a padding token, a
checkpointed chunk of the LM head recomputed in backward: real work, but not model FLOPs).

The peak is measured in the same script at the same thread count: the best of `--reps`
`torch.matmul` calls of two `--matmul-n` square matrices (2 n^3 FLOPs each) in float32 and in
bfloat16. The fraction of peak is the phase's achieved FLOP/s over the peak at its precision
(fp32 training against the fp32 matmul, bf16 autocast against the bf16 one); the target is
>= 0.5. The table also shows the fraction on the fastest timed step (`best step`), which
other load disturbs least, as the peak itself is a best-of-`--reps`. Other processes' share
of the CPUs during every timed section is recorded (`benchmarks/machine.py`) and a result
measured on a busy machine is flagged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from machine import cpu_snapshot, load_verdict, other_cpu_fraction, versions, wait_for_idle

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"sft": "recipes/sft-small-arithmetic.yaml", "grpo": "recipes/grpo-arithmetic.yaml"}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
TARGET = 0.5


def hash_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """A deterministic pseudo-random reward in [0, 1) of each completion's text."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else json.dumps(c)
        out.append(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up + 2 timed steps")
    p.add_argument("--threads", type=int, default=2, help="torch threads (training and matmul)")
    p.add_argument("--out", default=None, help="JSON results (default: WORK/mfu.json)")
    p.add_argument("--work", default="runs/bench_mfu")
    p.add_argument("--wait-idle", type=float, default=0, help="wait up to S s for idle CPUs")
    p.add_argument("--phases", default="sft,grpo")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--preset", default="base")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5, quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2, quick 1)")
    p.add_argument("--matmul-n", type=int, default=None, help="matrix size (default 2048)")
    p.add_argument("--reps", type=int, default=None, help="timed matmuls per dtype (default 5)")
    a = p.parse_args(argv)
    quick = {"steps": 2, "warmup": 1, "matmul_n": 1024, "reps": 3}
    full = {"steps": 5, "warmup": 2, "matmul_n": 2048, "reps": 5}
    for key, value in (quick if a.quick else full).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.steps < 1 or a.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return a


# --------------------------------------------------------------------------- the peak


def matmul_peak(precision: str, n: int, reps: int) -> dict[str, Any]:
    """Best FLOP/s of `torch.matmul` of two n x n matrices in `precision`."""
    import torch

    dtype = getattr(torch, DTYPES[precision])
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.matmul(a, b)  # warm-up (thread pool, oneDNN kernels)
    times = []
    c0 = cpu_snapshot()
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t0)
    other = other_cpu_fraction(c0, cpu_snapshot())
    flops = 2 * n**3
    return {
        "n": n,
        "reps": reps,
        "best_seconds": min(times),
        "median_seconds": statistics.median(times),
        "flops_per_s": flops / min(times),
        "median_flops_per_s": flops / statistics.median(times),
        "other_processes_cpu_fraction": other,
    }


# --------------------------------------------------------------------------- a phase


def build_recipe(phase: str, precision: str, args: argparse.Namespace, work: Path) -> Any:
    """The shipped recipe of `phase` on the `--preset` model, run for the benchmark's steps
    with no evaluation, logging sinks or checkpoints."""
    from signalrl.config import recipe_from_dict
    from signalrl.config.recipe import load_yaml

    path = ROOT / RECIPES[phase]
    data = load_yaml(path.read_text(encoding="utf-8"))
    data["model"] = {**data.get("model", {}), "name_or_path": args.preset, "device": "cpu"}
    data["output_dir"] = str(work)
    data["name"] = f"mfu-{phase}-{precision}"
    if phase == "grpo":
        data["rewards"] = [{"type": "function", "fn": "mfu:hash_reward"}]
    overrides = [
        f"train.steps={args.warmup + args.steps}",
        f"train.precision={precision}",
        f"train.threads={args.threads}",
        "eval.every=0",
        "eval.k=0",
        "eval.n=1",
        f"logging.every={10**9}",
        "logging.samples_every=0",
        "logging.tensorboard=false",
        "logging.progress=false",
        "checkpoint.every=0",
        "doctor.enabled=false",
    ]
    return recipe_from_dict(data, f"{path} (mfu.py)", overrides)


def matmul_params(model: Any) -> tuple[int, int, int]:
    """(N, layers, hidden): parameters in a per-token matmul (all but the input embedding;
    the LM head once, tied or not), the model's layers and hidden size."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    n = total - embed.numel() + (head.numel() if head is embed else 0)
    cfg = model.config
    return n, int(cfg.num_hidden_layers), int(cfg.hidden_size)


def run_phase(phase: str, precision: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Build the trainer, take warm-up + timed steps, time `update` in each."""
    import torch
    from rich.console import Console

    from signalrl.trainers import trainer_class

    recipe = build_recipe(phase, precision, args, work)
    trainer = trainer_class(recipe.trainer)(recipe, overwrite=True, console=Console(quiet=True))
    n_params, layers, hidden = matmul_params(trainer.model)
    inner = trainer.update
    record: list[dict[str, float]] = []

    def timed_update(batch: Any) -> Any:
        seq = batch.seq if hasattr(batch, "seq") else batch
        tokens0, t0 = trainer.budget.forward_tokens, time.perf_counter()
        result = inner(batch)
        record.append(
            {
                "seconds": time.perf_counter() - t0,
                "tokens": float(trainer.budget.forward_tokens - tokens0),
                "context": float(seq.attention_mask.sum(-1).float().mean()),
            }
        )
        return result

    trainer.update = timed_update
    step_metrics: list[dict[str, float]] = []
    for _ in range(args.warmup):
        trainer.step += 1
        trainer.train_step()
    if args.wait_idle:
        wait_for_idle(args.wait_idle, Console(stderr=True))
    c0 = cpu_snapshot()
    for _ in range(args.steps):
        trainer.step += 1
        step_metrics.append(trainer.train_step()[0])
    other = other_cpu_fraction(c0, cpu_snapshot())
    timed = record[args.warmup :]
    if len(timed) != args.steps:
        raise RuntimeError(f"{phase}: {len(timed)} updates timed in {args.steps} steps")
    out = summarise(timed, n_params, layers, hidden)
    out.update(
        phase=phase,
        precision=precision,
        parameters_in_matmuls=n_params,
        parameters_total=sum(p.numel() for p in trainer.model.parameters()),
        torch_threads=torch.get_num_threads(),
        other_processes_cpu_fraction=other,
        logged_train_seconds_per_step=statistics.fmean(
            m["time/step_s"] - m.get("time/rollout_s", 0.0) for m in step_metrics
        ),
        logged_rollout_seconds_per_step=statistics.fmean(
            m.get("time/rollout_s", 0.0) for m in step_metrics
        ),
        loss_last=step_metrics[-1].get("loss"),
    )
    return out


def summarise(timed: list[dict[str, float]], n: int, layers: int, hidden: int) -> dict[str, Any]:
    seconds = sum(r["seconds"] for r in timed)
    tokens = sum(r["tokens"] for r in timed)
    context = statistics.fmean(r["context"] for r in timed)
    per_token = 6 * n + 12 * layers * hidden * context
    best = max(r["tokens"] / r["seconds"] for r in timed)  # the least disturbed step
    return {
        "best_step_flops_per_s": per_token * best,
        "timed_steps": len(timed),
        "train_seconds": seconds,
        "train_seconds_per_step": seconds / len(timed),
        "train_tokens": tokens,
        "tokens_per_step": tokens / len(timed),
        "mean_context": context,
        "flops_per_token": per_token,
        "train_tokens_per_s": tokens / seconds,
        "achieved_flops_per_s": per_token * tokens / seconds,
        "step_seconds": [r["seconds"] for r in timed],
    }


# --------------------------------------------------------------------------- main


def print_table(out: dict[str, Any]) -> None:
    print(f"\npreset {out['preset']}, {out['threads']} threads")
    for prec, p in out["peak"].items():
        print(
            f"matmul peak {prec}: {p['flops_per_s'] / 1e9:.1f} GFLOP/s (n={p['n']}, best of "
            f"{p['reps']}; median {p['median_flops_per_s'] / 1e9:.1f}; other CPU "
            f"{p['other_processes_cpu_fraction'] or 0:.0%})"
        )
    print(
        f"{'phase':5s} {'prec':5s} {'tok/step':>9s} {'train s/step':>13s} {'tok/s':>8s} "
        f"{'GFLOP/s':>8s} {'of peak':>8s} {'best step':>10s} {'other CPU':>10s}"
    )
    for r in out["runs"]:
        other = r["other_processes_cpu_fraction"]
        print(
            f"{r['phase']:5s} {r['precision']:5s} {r['tokens_per_step']:9.0f} "
            f"{r['train_seconds_per_step']:13.3f} {r['train_tokens_per_s']:8.0f} "
            f"{r['achieved_flops_per_s'] / 1e9:8.2f} {r['fraction_of_peak']:8.1%} "
            f"{r['best_step_fraction_of_peak']:10.1%} "
            f"{'n/a' if other is None else f'{other:.0%}':>10s}"
        )
    v = out["load"]
    if not v["idle"]:
        print(
            f"NOTE: busy machine (other processes up to {v['max_other_cpu_fraction']:.0%} of the "
            "CPUs): these numbers are not results; rerun with --wait-idle on a quiet machine."
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from rich.console import Console

    torch.set_num_threads(args.threads)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    precisions = args.precisions.split(",")
    peak: dict[str, Any] = {}
    for prec in precisions:
        if args.wait_idle:
            wait_for_idle(args.wait_idle, Console(stderr=True))
        peak[prec] = matmul_peak(prec, args.matmul_n, args.reps)
    runs = []
    for phase in args.phases.split(","):
        for prec in precisions:
            print(f"timing {phase} / {prec} ...", file=sys.stderr, flush=True)
            r = run_phase(phase, prec, args, work)
            r["fraction_of_peak"] = r["achieved_flops_per_s"] / peak[prec]["flops_per_s"]
            r["meets_target"] = r["fraction_of_peak"] >= TARGET
            r["best_step_fraction_of_peak"] = r["best_step_flops_per_s"] / peak[prec]["flops_per_s"]
            runs.append(r)
    fractions = [p["other_processes_cpu_fraction"] for p in peak.values()]
    fractions += [r["other_processes_cpu_fraction"] for r in runs]
    out = {
        "preset": args.preset,
        "threads": args.threads,
        "quick": args.quick,
        "warmup_steps": args.warmup,
        "recipes": RECIPES,
        "peak": peak,
        "runs": runs,
        "target_fraction": TARGET,
        "load": load_verdict(*fractions),
        "versions": versions(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "total_seconds": time.perf_counter() - started,
    }
    out_path = Path(args.out) if args.out else work / "mfu.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    print_table(out)
    print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
