"""What the signalrl-vs-TRL timing scripts share (`grpo_vs_trl.py`, `dpo_vs_trl.py`,
`sft_vs_trl.py`): step timing, the TRL settings every trainer gets, the run-time checks
(threads, other load, the busy-machine verdict), the start checkpoint and the generated
prompt/completion data. Scripts import it as `from trl_common import ...` (they run as
`python benchmarks/NAME.py`, so `benchmarks/` is on `sys.path`). The library never imports it.

TRL itself is imported only inside functions, so `--help` works without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

from machine import cpu_snapshot, load_verdict, other_cpu_fraction, wait_for_idle
from profiling import StepProfiler, format_table, profile_request

# --------------------------------------------------------------------------- step timing


def timing_summary(ends: list[float], tokens: list[int], warmup: int) -> dict[str, Any]:
    """Seconds per step and tokens per second over the steps after the first `warmup`: the
    window runs from the end of the last warm-up step to the end of the last step, so it holds
    everything a framework does between two steps."""
    n = len(ends)
    if n <= warmup or len(tokens) != n:
        raise RuntimeError(f"recorded {n} step ends and {len(tokens)} token counts; need >{warmup}")
    seconds = ends[-1] - ends[warmup - 1]
    timed = n - warmup
    durations = [b - a for a, b in zip(ends[warmup - 1 : -1], ends[warmup:], strict=True)]
    timed_tokens = sum(tokens[warmup:])
    return {
        "steps": n,
        "warmup_steps": warmup,
        "timed_steps": timed,
        "timed_seconds": seconds,
        "seconds_per_step": seconds / timed,
        "steps_per_second": timed / seconds,
        "median_step_seconds": statistics.median(durations),
        "tokens_timed": timed_tokens,
        "tokens_per_second": timed_tokens / seconds,
        "step_seconds": durations,
    }


class StepLog:
    """End-of-step timestamps (with a /proc/stat snapshot each, so the other processes' CPU
    share of the timed window itself is known), per-step token counts and named values."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.snapshots: list[tuple[float, float, float] | None] = []
        self.tokens: list[int] = []
        self.values: dict[str, list[float]] = {}
        self.threads: int | None = None
        self.extra: dict[str, Any] = {}
        self.profiler = StepProfiler(*profile_request())  # SIGNALRL_BENCH_PROFILE

    def mark(self) -> None:
        """Call at the end of every optimizer step."""
        self.ends.append(time.perf_counter())
        self.snapshots.append(cpu_snapshot())
        self.profiler.on_mark()
        if self.profiler.result is not None:
            self.extra["profile"] = self.profiler.result

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(float(value))

    def window_other_cpu(self, warmup: int) -> float | None:
        """Other processes' share of the CPUs from the end of warm-up to the last step."""
        if len(self.snapshots) <= warmup:
            return None
        return other_cpu_fraction(self.snapshots[warmup - 1], self.snapshots[-1])

    def summary(self, warmup: int) -> dict[str, Any]:
        """Timing plus first/last-10 means of every value, and the per-step series."""
        out = timing_summary(self.ends, self.tokens, warmup)
        out["other_processes_cpu_fraction_timed"] = self.window_other_cpu(warmup)
        for name, series in self.values.items():
            out[f"{name}_first10"] = statistics.fmean(series[:10]) if series else None
            out[f"{name}_last10"] = statistics.fmean(series[-10:]) if series else None
            out[f"{name}_final"] = series[-1] if series else None
        out["torch_threads"] = self.threads
        out.update(self.extra)
        out["tokens_per_step"] = self.tokens
        out["series"] = self.values
        return out


def time_signalrl_steps(trainer: Any, log: StepLog, record: Any) -> None:
    """Wrap `trainer.train_step` so every step ends with `log.mark()` and
    `record(metrics, samples)` (which fills the log's tokens and values)."""
    import torch

    inner = trainer.train_step

    def timed_step() -> tuple[dict[str, float], list[dict[str, Any]]]:
        metrics, samples = inner()
        log.mark()
        if log.threads is None:
            log.threads = torch.get_num_threads()
        record(metrics, samples)
        return metrics, samples

    trainer.train_step = timed_step


def trl_step_timer(log: StepLog, on_step: Any = None) -> Any:
    """A `TrainerCallback` that marks the log at the end of every optimizer step (then calls
    `on_step(state)`), and records the threads, accelerate's autocast wrapper and activation
    checkpointing of the model at the start of training."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, targs, state, control, model=None, **kw):  # noqa: ANN001
            log.threads = torch.get_num_threads()
            # accelerate wraps forward in autocast for bf16 (kept by TRL's generation unwrap)
            log.extra["autocast_wrapped_forward"] = hasattr(model, "_original_forward")
            log.extra["activation_checkpointing"] = bool(
                getattr(model, "is_activation_checkpointing", False)
            )

        def on_step_end(self, targs, state, control, **kw):  # noqa: ANN001
            log.mark()
            if on_step is not None:
                on_step(state)

    return StepTimer()


# --------------------------------------------------------------------------- TRL settings


def trl_train_settings(train: Any, steps: int, seed: int) -> dict[str, Any]:
    """The `TrainingArguments` every TRL trainer here gets from a signalrl `train:` section:
    torch AdamW with the same betas/eps/decay, the same lr held constant with no warm-up, the
    same clipping and precision (bf16: CPU autocast over float32 weights), one process with no
    accumulation, and no logging, saving, evaluation, progress bars or workers."""
    return {
        "max_steps": steps,
        "gradient_accumulation_steps": 1,
        "learning_rate": train.lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "optim": "adamw_torch",
        "weight_decay": train.weight_decay,
        "adam_beta1": train.betas[0],
        "adam_beta2": train.betas[1],
        "adam_epsilon": train.adam_eps,
        "max_grad_norm": train.grad_clip if train.grad_clip is not None else 0.0,
        "bf16": train.precision == "bf16",
        "fp16": False,
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "report_to": "none",
        "logging_strategy": "no",
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "seed": seed,
    }


def without_checkpointing(config_cls: type, settings: dict[str, Any]) -> dict[str, Any]:
    """Switch off activation checkpointing (TRL defaults it to True) under the name this
    transformers has (5.x renamed gradient_checkpointing to activation_checkpointing)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else None
    return {**settings, key or "gradient_checkpointing": False}


def measured(fn: Any, args: argparse.Namespace, console: Any) -> tuple[Any, dict[str, Any]]:
    """`fn()` after an optional wait for an idle machine (`--wait-idle`) with the torch
    threads set (`--threads`); returns its result and the run's wall seconds (set-up and
    the end included) and the other processes' CPU share over the whole run."""
    import torch

    if args.wait_idle:
        wait_for_idle(args.wait_idle, console)
    torch.set_num_threads(args.threads)
    t0, c0 = time.perf_counter(), cpu_snapshot()
    result = fn()
    return result, {
        "wall_seconds_whole_run": time.perf_counter() - t0,
        "other_processes_cpu_fraction": other_cpu_fraction(c0, cpu_snapshot()),
    }


def require_trl(script: str) -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        import sys

        print(
            f'{script} needs TRL: pip install -e ".[bench]" (or pip install trl)', file=sys.stderr
        )
        return False
    return True


# --------------------------------------------------------------------------- checks, report


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor(),
    }


def warn_threads_and_load(out: dict[str, Any], threads: int, console: Any) -> None:
    """Warn when a framework ran with other torch threads than asked, or while other
    processes used over 5% of the CPUs (keys `torch_threads`, `other_processes_cpu_fraction`
    of `out["signalrl"]` and `out["trl"]`)."""
    for name in ("signalrl", "trl"):
        if out[name]["torch_threads"] != threads:
            console.print(
                f"[yellow]{name} ran with {out[name]['torch_threads']} torch threads, not {threads}"
            )
    for name in ("signalrl", "trl"):
        other = out[name]["other_processes_cpu_fraction"]
        if other is not None and other > 0.05:
            console.print(
                f"[yellow]other processes used {other:.0%} of the machine's CPU time while "
                f"{name} trained: its timings are skewed (compare the median column)"
            )


def ratio_with_verdict(out: dict[str, Any]) -> dict[str, Any]:
    """The signalrl/TRL steps-per-second ratio with `load_verdict` over both timed windows
    (and both whole runs); a ratio from a busy machine is labelled as not a result."""
    sl, tr = out["signalrl"], out["trl"]
    ratio = sl["steps_per_second"] / tr["steps_per_second"]
    if not math.isfinite(ratio):
        raise SystemExit("non-finite timing ratio")
    verdict = load_verdict(
        sl["other_processes_cpu_fraction_timed"],
        tr["other_processes_cpu_fraction_timed"],
        sl["other_processes_cpu_fraction"],
        tr["other_processes_cpu_fraction"],
    )
    label = "result" if verdict["idle"] else "machine busy, not a result"
    if "profile" in sl or "profile" in tr:  # profiled steps are in the timed window
        label = "profiled run, not a timing result"
        table = format_table(
            {k: r["profile"] for k, r in (("signalrl", sl), ("TRL", tr)) if "profile" in r}
        )
        return {"ratio": ratio, "load": verdict, "label": label, "profile_table": table}
    return {"ratio": ratio, "load": verdict, "label": label}


def print_ratio(console: Any, what: dict[str, Any]) -> None:
    v = what["load"]
    if "profile_table" in what:
        console.print("where a step's time goes (torch.profiler, ms per step):")
        console.print(what["profile_table"], markup=False, highlight=False)
        console.print(f"[yellow]signalrl/TRL steps per second: {what['ratio']:.2f}x (profiled)")
        return
    if what["label"] == "result":
        console.print(f"signalrl/TRL steps per second: [bold]{what['ratio']:.2f}x")
        return
    worst = v["max_other_cpu_fraction"]
    console.print(
        f"[yellow]signalrl/TRL steps per second: {what['ratio']:.2f}x  (machine busy, not a "
        f"result: other processes used up to {worst if worst is None else f'{worst:.0%}'} of "
        f"the CPUs, load average {v['loadavg_1m']:.2f})"
    )


def write_json(path: Path, out: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


# --------------------------------------------------------------------------- shared arguments


def add_common_args(p: argparse.ArgumentParser, work: str) -> None:
    """The options both dpo_vs_trl.py and sft_vs_trl.py take."""
    p.add_argument("--steps", type=int, default=None, help="optimizer steps for each")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2)")
    p.add_argument("--batch-size", type=int, default=None, help="rows (pairs) per step (32)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for both (2)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="default fp32")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="both (sdpa)")
    p.add_argument("--eval-rows", type=int, default=None, help="rows scored at the end")
    p.add_argument("--work", default=work, help=f"output directory (default: {work})")
    p.add_argument("--out", default=None, help="JSON results (default: WORK/<script>.json)")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        help="before each timed run, wait up to this many seconds for other processes to stop "
        "using the CPUs (0: do not wait)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: a few steps, few eval rows")
    p.add_argument(
        "--padding-free",
        choices=["on", "off"],
        default="on",
        help="signalrl's train.padding_free (packed forwards; default on, as signalrl's default)",
    )


def resolve_counts(p: argparse.ArgumentParser, a: argparse.Namespace, full: dict, quick: dict):
    """Fill unset options from the full or the --quick defaults and check them."""
    for key, value in (quick if a.quick else full).items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    if a.warmup < 1:
        p.error("--warmup must be >= 1 (timing starts at the end of the last warm-up step)")
    if a.steps <= a.warmup:
        p.error("--steps must be larger than --warmup")
    return a


# --------------------------------------------------------------------------- start checkpoint


def save_preset_init(preset: str, path: Path, seed: int = 0) -> Path:
    """The preset's untrained initialisation (signalrl `load_model(preset, seed=seed)`),
    written with `save_pretrained` so that both frameworks load it with `from_pretrained`."""
    from signalrl.models import load_model, save_model

    if (path / "config.json").is_file():
        return path
    model, tok = load_model(preset, seed=seed)
    save_model(model, tok, path)
    return path


def base_recipe(
    trainer: str,
    name: str,
    work: Path,
    model: Path,
    args: argparse.Namespace,
    lr: float,
    steps: int,
) -> dict[str, Any]:
    """A signalrl recipe dict with the settings held equal to TRL's: constant lr, no warm-up,
    torch AdamW defaults, clipping 1.0, the precision and threads asked, no evaluation
    during training, no logging rows, samples, progress bar, TensorBoard or checkpoints; the
    final task evaluation scores one problem only (the benchmark scores the models itself)."""
    return {
        "name": name,
        "trainer": trainer,
        "seed": 0,
        "output_dir": str(work),
        "model": {
            "name_or_path": str(model),
            "dtype": "float32",
            "device": "cpu",
            "attn_implementation": args.attn,
        },
        "task": {"name": "arithmetic", "digits": 2, "ops": "+", "operands": 2, "n_test": 10},
        "train": {
            "steps": steps,
            "lr": lr,
            "batch_size": args.batch_size,
            "micro_batch_size": args.batch_size,
            "schedule": "constant",
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "betas": [0.9, 0.999],
            "adam_eps": 1e-8,
            "grad_clip": 1.0,
            "precision": args.precision,
            "threads": args.threads,
            "padding_free": getattr(args, "padding_free", "on") == "on",
        },
        "eval": {"every": 0, "k": 0, "n": 1, "train_pairs": 0},
        "logging": {
            "every": 10**9,
            "samples_every": 0,
            "tensorboard": False,
            "progress": False,
        },
        "checkpoint": {"every": 0},
    }


def greedy_accuracy(
    path: Path, rows: list[dict[str, Any]], task: Any, recipe: Any
) -> dict[str, Any]:
    """Greedy accuracy (and mean length) of the checkpoint at `path`, reloaded with
    `from_pretrained`, by `signalrl.eval.evaluate` with the recipe's max tokens, eval batch
    size, stop strings and autocast: the same scoring for every model a GRPO benchmark
    compares."""
    import torch

    from signalrl.eval import evaluate
    from signalrl.models import load_model

    model, tok = load_model(str(path))
    res = evaluate(
        model,
        tok,
        rows,
        task.verify,
        max_new_tokens=recipe.eval.max_new_tokens or recipe.sampling.max_new_tokens,
        batch_size=recipe.eval.batch_size,
        stop_strings=recipe.sampling.stop_strings,
        autocast_dtype=torch.bfloat16 if recipe.train.precision == "bf16" else None,
    )
    return {"accuracy": res.accuracy, "mean_length": res.mean_length, "n": res.n}


# --------------------------------------------------------------------------- generated data

MIN_TOKENS, MAX_TOKENS = 20, 200


def _explain(terms: list[int], slip: tuple[int, int] | None) -> str:
    """A running-sum explanation of `terms`; `slip = (k, d)` adds d to the k-th partial sum
    (k = 0: the lone term), and every later line follows from the wrong sum."""
    acc = terms[0] + (slip[1] if slip and slip[0] == 0 else 0)
    parts = []
    for k, t in enumerate(terms[1:], start=1):
        new = acc + t + (slip[1] if slip and slip[0] == k else 0)
        parts.append(f"{acc}+{t}={new}; ")
        acc = new
    return "".join(parts) + f"so the answer is {acc}."


def explanation_rows(n: int, seed: int, tokenizer: Any) -> list[dict[str, Any]]:
    """`n` deterministic rows {prompt, chosen, rejected}: the prompt asks for a sum of 1 to 14
    numbers, chosen explains it step by step, rejected makes one slip (a partial sum off by
    1 or 10) and carries it to a wrong answer. A row is kept only when prompt + each
    completion + EOS is 20-200 tokens of `tokenizer` (so both frameworks' max length, 256,
    never truncates), which with the char tokenizer spreads the lengths over about 27-200."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        k = rng.randint(1, 14)
        terms = [rng.randint(1, 9 if rng.random() < 0.3 else 99) for _ in range(k)]
        slip_at = rng.randrange(k)
        delta = rng.choice([-10, -1, 1, 10])
        partial = sum(terms[: slip_at + 1])
        if partial + delta < 0:
            delta = -delta
        prompt = "Sum: " + "+".join(str(t) for t in terms) + "\n"
        row = {
            "prompt": prompt,
            "chosen": _explain(terms, None),
            "rejected": _explain(terms, (slip_at, delta)),
        }
        p = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        lens = [
            p + len(tokenizer(row[c], add_special_tokens=False)["input_ids"]) + 1
            for c in ("chosen", "rejected")
        ]
        if MIN_TOKENS <= min(lens) and max(lens) <= MAX_TOKENS:
            rows.append({**row, "tokens_chosen": lens[0], "tokens_rejected": lens[1]})
    return rows


def length_stats(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    lens = [r[key] for r in rows]
    return {
        "min": min(lens),
        "median": statistics.median(lens),
        "mean": statistics.fmean(lens),
        "max": max(lens),
    }


def write_jsonl(path: Path, rows: list[dict[str, Any]], fields: tuple[str, ...]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in fields}) + "\n")
    return path


def record_order(trainer: Any) -> list[int]:
    """Make the signalrl trainer's first epoch the file order (no shuffling: its `DataCursor`
    would shuffle each epoch) and record the row indices of every step, so TRL gets exactly
    those rows in that order, read sequentially. A run longer than one epoch reshuffles the
    later epochs, and TRL still gets the recorded order."""
    cursor = trainer.data
    cursor.order, cursor.cursor, cursor.epoch = list(range(cursor.n)), 0, 1
    order: list[int] = []
    inner = cursor.take

    def take(k: int) -> list[int]:
        idx = inner(k)
        order.extend(idx)
        return idx

    cursor.take = take
    return order


def completion_logps_of(
    model_dir: Path | str, prompts: list[str], completions: list[str], precision: str, attn: str
) -> list[tuple[float, int]]:
    """(summed log-prob, token count) of each completion + EOS after its prompt under the
    checkpoint at `model_dir`, reloaded with `from_pretrained` (`signalrl.models.load_model`)
    and scored by `signalrl.models.logprobs.completion_logps` in batches of 32: the same
    scoring for every model a benchmark compares."""
    import torch

    from signalrl.data.chat import encode_prompt
    from signalrl.data.collate import build_batch
    from signalrl.models import load_model
    from signalrl.models.logprobs import completion_logps

    model, tok = load_model(str(model_dir), attn_implementation=attn)
    model.eval()
    autocast = torch.bfloat16 if precision == "bf16" else None
    p_ids = encode_prompt(tok, prompts)
    ids = tok(completions, add_special_tokens=False)["input_ids"]
    c_ids = [list(c) + [tok.eos_token_id] for c in ids]
    out: list[tuple[float, int]] = []
    with torch.no_grad():
        for s in range(0, len(prompts), 32):
            batch = build_batch(p_ids[s : s + 32], c_ids[s : s + 32], tok.pad_token_id)
            lp = completion_logps(model, batch, autocast_dtype=autocast)
            sums = (lp * batch.completion_mask).sum(-1).tolist()
            counts = batch.completion_mask.sum(-1).tolist()
            out += [(float(a), int(b)) for a, b in zip(sums, counts, strict=True)]
    del model
    return out


def _countdown_steps(node: Any, out: list[str]) -> int:
    """Evaluate a parsed countdown tree bottom-up, writing each step as `a op b = v`."""
    if isinstance(node, int):
        return node
    op, left, right = node
    a, b = _countdown_steps(left, out), _countdown_steps(right, out)
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
    out.append(f"{a}{op}{b}={value}")
    return value


def countdown_r1_rows(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """{prompt, completion} SFT rows for countdown task rows (the task's own prompt), with an
    R1-style completion ` <think> ... </think> <answer> EXPR </answer>` that the task's
    verifier reads (its last `<answer>` block): 0-4 failed tries with two of the given numbers
    (`try 3+9=12, no.`, seeded), then the row's expression evaluated step by step. With 3
    numbers from 1..20 this is 63-152 characters (the char tokenizer's tokens) with EOS,
    about 20% over 128."""
    from signalrl.tasks.countdown import parse_expression

    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for row in rows:
        tree, _ = parse_expression(row["expr"])
        steps: list[str] = []
        _countdown_steps(tree, steps)
        tries = []
        for _ in range(rng.randint(0, 4)):
            a, b = rng.sample(row["numbers"], 2)
            op = rng.choice("+-*")
            value = a + b if op == "+" else a - b if op == "-" else a * b
            tries.append(f"try {a}{op}{b}={value}, no.")
        think = " ".join([*tries, ", ".join(steps) + f", so {row['target']}."])
        completion = f" <think> {think} </think> <answer> {row['expr']} </answer>"
        out.append({"prompt": row["prompt"], "completion": completion})
    return out
