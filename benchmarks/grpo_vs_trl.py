"""signalrl vs TRL: the quickstart's GRPO stage with both, on the same data, measured the same way.

Run from the repository root (needs the `bench` extra, i.e. TRL):

    pip install -e ".[bench]"
    python benchmarks/grpo_vs_trl.py                 # SFT, then 100 GRPO steps each (minutes)
    python benchmarks/grpo_vs_trl.py --quick         # smoke run: short SFT, 5 steps, 50 test rows
    python benchmarks/grpo_vs_trl.py --sft runs/quickstart/sft/final --out bench.json
    python benchmarks/grpo_vs_trl.py --wait-idle 600 # wait for a quiet machine before timing

It trains the quickstart's GRPO stage with signalrl (`OnlineRLTrainer`, exactly what
`run_recipe` builds) and with TRL's `GRPOTrainer`, one after the other in one process, and
prints a table (and writes JSON to `--out`): seconds per step, completion tokens per second,
greedy test accuracy of both final models after the same number of steps, and the ratio
signalrl/TRL of steps per second.

What is held equal (all of it set in this file):

- Model: one SFT checkpoint, loaded with `from_pretrained` (float32 weights, the quickstart
  GRPO recipe's attention implementation, eager: faster than sdpa at this size, for both)
  from the same local directory by both. By default it is built first by the quickstart's SFT
  stage (`signalrl.quickstart` DEFAULT["sft"] through `signalrl.trainers.run_recipe`, into
  `--work`); `--sft PATH` uses an existing checkpoint instead.
- Task and reward: `ArithmeticTask` with the quickstart's settings; the reward is
  `task.verify(row, completion_text)` for both (for TRL a reward function
  `fn(prompts, completions, answer, completion_ids, **kw) -> list[float]` over the dataset's
  `answer` column).
- Prompts: the same 16 prompts at every step. signalrl draws its batches; the script records
  the prompts of each step and gives TRL a dataset of exactly those rows, in that order, with
  `shuffle_dataset=False` (TRL's `RepeatSampler` then yields rows 16k..16k+15 at step k).
  Prompts are plain strings (not conversational), so TRL tokenises them without the chat
  template, like signalrl (no special tokens are added by this tokenizer either way).
- Batch shape: 16 prompts x 8 samples = 128 completions per optimizer step. In TRL
  `per_device_train_batch_size` counts completions: 128, with `num_generations=8`,
  `gradient_accumulation_steps=1` and `steps_per_generation=1` (so `generation_batch_size`
  is 128 and one generation feeds exactly one optimizer step).
- Sampling: at most 6 new tokens, temperature 1.0, top_p 1.0, no top_k; EOS ends a completion
  and counts as a completion token in both.
- Objective: beta = 0 (no KL term, no reference model), one update per batch (signalrl
  `rl.mu = 1`, TRL `num_iterations = 1`, so the importance ratio is 1), clip epsilon 0.2,
  advantages normalised by the group's std (signalrl `adv_scale: group`, TRL
  `scale_rewards="group"`), loss aggregated per sequence then averaged over sequences
  (signalrl `seq-mean-token-mean`, TRL `loss_type="grpo"`, set explicitly since TRL's default
  is now "dapo"), truncated completions not masked in either.
- Optimiser: `torch.optim.AdamW` in both (TRL `optim="adamw_torch"` rather than its default
  fused variant), lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0, gradient-norm
  clipping at 1.0, and a CONSTANT learning rate with no warm-up in both (the quickstart's
  GRPO stage uses cosine; it is overridden to constant for both here).
- Precision: the quickstart GRPO stage's (fp32, which runs faster than bf16 autocast at this
  size) in both. `--precision bf16` gives bf16 autocast over float32 weights in both
  (signalrl `train.precision=bf16`, TRL `bf16=True` with `use_cpu=True`, which accelerate
  turns into CPU bf16 autocast for the training forward and for generation).
- Threads: `torch.set_num_threads(2)` (or `--threads`) for both; the JSON records the thread
  count each framework actually ran with.
- No evaluation, logging, checkpointing, progress bars or TensorBoard during training in
  either (signalrl: `logging.every` huge, `samples_every=0`, `checkpoint.every=0`,
  `eval.every=0`, `progress=false`, `tensorboard=false`; TRL: `report_to="none"`,
  `logging_strategy="no"`, `save_strategy="no"`, `eval_strategy="no"`, `disable_tqdm=True`,
  no vLLM, `dataloader_num_workers=0`, `gradient_checkpointing=False`).
- Timing: the time at the end of every optimizer step is recorded (signalrl: a wrapper around
  `trainer.train_step`; TRL: a `TrainerCallback.on_step_end`). The first `--warmup` steps
  (default 2, 1 with `--quick`) are excluded; seconds per step is the wall time from the end of
  the last warm-up step to the end of the last step, divided by the number of timed steps, so
  it includes everything each framework does between steps (the median step time is reported
  too). Completion tokens per second is the number of completion tokens generated in the
  timed steps (signalrl: from the step's `completion/mean_length` x completions; TRL: counted
  in the reward function from `completion_ids`) over the same seconds.
- Other load: the share of CPU time other processes used during each training run is measured
  from /proc/stat and reported (a warning is printed above 5%); `--wait-idle` waits for a
  quiet machine before each timed run.
- Accuracy: both final models are saved, reloaded with `from_pretrained`
  (`signalrl.models.load_model`) and scored by the same `signalrl.eval.evaluate` call
  (greedy, same test rows, same max tokens, same autocast); the SFT start point is scored
  the same way for reference.

What is not equal (it is what is being compared, or TRL does not expose it): the generation
engine (signalrl encodes each prompt once and copies its KV cache to the 8 samples and drops
finished rows; TRL calls `model.generate` on 128 rows), the log-prob/entropy computation
(signalrl: `logits_to_keep` + chunked log-softmax; TRL: its fused LM head), the std epsilon
in the advantage (signalrl 1e-6, TRL 1e-4), each framework's random streams (same prompts,
different samples) and each framework's per-step bookkeeping.

This file is a script, never imported by the library or its tests.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from machine import cpu_snapshot, other_cpu_fraction, versions, wait_for_idle
from trl_common import (
    StepLog,
    machine_info,
    require_trl,
    time_signalrl_steps,
    timing_summary,
    trl_step_timer,
    trl_train_settings,
    warn_threads_and_load,
    without_checkpointing,
)

# --------------------------------------------------------------------------- settings

QUICK = {"steps": 5, "warmup": 1, "eval_n": 50, "sft_steps": 50}
SIGNALRL_LOSS_TO_TRL = {
    "seq-mean-token-mean": "grpo",
    "token-mean": "dapo",  # one process, no accumulation: the same token mean
    "seq-mean-token-sum-norm": "dr_grpo",
}
NOT_EQUALIZED = [
    "generation engine: signalrl prefills each prompt once, copies its KV cache to the group "
    "and drops finished rows; TRL runs transformers `model.generate` on all 128 rows",
    "log-probs/entropy of the update: signalrl logits_to_keep + chunked log-softmax; TRL its "
    "fused LM head (both compute an entropy for logging)",
    "advantage std epsilon: signalrl 1e-6, TRL 1e-4 (constant groups get 0 in both)",
    "random streams: same prompts per step, but the sampled completions differ",
    "per-step bookkeeping of each framework (TRL: Trainer/accelerate callbacks and metric "
    "gathering; signalrl: its loop) is inside the timed window",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time the quickstart GRPO stage with signalrl and with TRL's GRPOTrainer.",
    )
    p.add_argument("--steps", type=int, default=None, help="GRPO steps for each (default 100)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2)")
    p.add_argument("--sft", default=None, help="existing SFT checkpoint dir (default: build it)")
    p.add_argument(
        "--sft-steps", type=int, default=None, help="SFT steps when building (default: recipe's)"
    )
    p.add_argument(
        "--work",
        default="runs/bench_grpo_vs_trl",
        help="output directory (default: runs/bench_grpo_vs_trl)",
    )
    p.add_argument("--out", default=None, help="JSON results (default: WORK/grpo_vs_trl.json)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for both (default: 2)")
    p.add_argument(
        "--precision", choices=["bf16", "fp32"], default=None, help="default: quickstart's"
    )
    p.add_argument("--eval-n", type=int, default=None, help="test rows scored (default: all)")
    p.add_argument("--recipe", default=None, help="quickstart-shaped YAML (default: built-in)")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        help="before each timed run, wait up to this many seconds for other processes to stop "
        "using the CPUs (0: do not wait)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 50-step SFT, 5 GRPO steps (1 warm-up), 50 test rows",
    )
    a = p.parse_args(argv)
    defaults = QUICK if a.quick else {"steps": 100, "warmup": 2, "eval_n": None, "sft_steps": None}
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.warmup < 1:
        p.error("--warmup must be >= 1 (timing starts at the end of the last warm-up step)")
    if a.steps <= a.warmup:
        p.error("--steps must be larger than --warmup")
    return a


# --------------------------------------------------------------------------- timing


def grpo_summary(log: StepLog, warmup: int, completions_per_step: int) -> dict[str, Any]:
    """The shared timing (`trl_common.timing_summary`) under this script's names, with the
    mean completion length and the first/last-10 mean train rewards."""
    t = timing_summary(log.ends, log.tokens, warmup)
    rewards = log.values.get("reward", [])
    keys = ("steps", "warmup_steps", "timed_steps", "timed_seconds", "seconds_per_step")
    return {
        **{k: t[k] for k in keys},
        "steps_per_second": t["steps_per_second"],
        "median_step_seconds": t["median_step_seconds"],
        "completion_tokens_timed": t["tokens_timed"],
        "completion_tokens_per_second": t["tokens_per_second"],
        "mean_completion_length": t["tokens_timed"] / (t["timed_steps"] * completions_per_step),
        "train_reward_first10": statistics.fmean(rewards[:10]),
        "train_reward_last10": statistics.fmean(rewards[-10:]),
        "torch_threads": log.threads,
        **log.extra,
        "step_seconds": t["step_seconds"],
        "completion_tokens_per_step": log.tokens,
        "rewards": rewards,
    }


# --------------------------------------------------------------------------- stages


def stage_recipe(
    cfg: dict[str, Any], name: str, work: Path, overrides: list[str], model: Path | None = None
):
    from signalrl.config import recipe_from_dict

    raw = dict(cfg[name])
    ovs = list(raw.pop("_overrides", [])) + overrides
    raw["output_dir"] = str(work)
    if model is not None:
        raw["model"] = {**raw.get("model", {}), "name_or_path": str(model)}
    return recipe_from_dict(raw, f"{cfg['where']} [{name}]", ovs)


def build_sft(cfg: dict[str, Any], args: argparse.Namespace, work: Path, console) -> Path:
    from signalrl.trainers import run_recipe

    ovs = [f"train.threads={args.threads}"]
    if args.sft_steps:
        ovs += [f"train.steps={args.sft_steps}", "eval.k=0"]
    recipe = stage_recipe(cfg, "sft", work, ovs)
    console.rule("[bold]SFT (quickstart stage)")
    result = run_recipe(recipe, overwrite=True, console=console)
    return Path(result["model"])


def run_signalrl(recipe, console) -> tuple[StepLog, dict[str, Any], list[dict[str, Any]]]:
    """Train with signalrl's online-RL trainer (what `run_recipe` does, keeping the instance so
    its `train_step` can be timed). Returns the step log, the summary and per-step rows."""
    from signalrl.trainers import trainer_class

    log = StepLog()
    per_step_rows: list[dict[str, Any]] = []
    trainer = trainer_class(recipe.trainer)(recipe, overwrite=True, console=console)
    g = recipe.rl.group_size

    def record(metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        log.tokens.append(round(metrics["completion/mean_length"] * len(samples)))
        log.add("reward", metrics["reward/mean"])
        per_step_rows.extend({"prompt": s["prompt"], "answer": s["answer"]} for s in samples[::g])

    time_signalrl_steps(trainer, log, record)
    result = trainer.train()
    del trainer
    gc.collect()
    return log, result, per_step_rows


def run_trl(
    recipe,
    sft_dir: Path,
    rows: list[dict[str, Any]],
    task,
    args: argparse.Namespace,
    work: Path,
    shuffle: bool,
):
    """Train with TRL's GRPOTrainer, configured from the same recipe. Returns the step log,
    the final model directory and the effective TRL settings."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    t, rl, s = recipe.train, recipe.rl, recipe.sampling
    if rl.loss_agg not in SIGNALRL_LOSS_TO_TRL:
        raise SystemExit(f"rl.loss_agg={rl.loss_agg!r} has no TRL loss_type equivalent")
    if s.stop_strings:
        raise SystemExit("sampling.stop_strings has no equivalent in TRL's generate path")
    log = StepLog()

    def exact_match(prompts, completions, answer, completion_ids, **kw):
        log.tokens.append(sum(len(c) for c in completion_ids))
        rewards = [
            float(task.verify({"prompt": p, "answer": a}, c))
            for p, c, a in zip(prompts, completions, answer, strict=True)
        ]
        log.add("reward", statistics.fmean(rewards))
        return rewards

    model = AutoModelForCausalLM.from_pretrained(
        sft_dir, dtype=torch.float32, attn_implementation=recipe.model.attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    dataset = Dataset.from_dict(
        {"prompt": [r["prompt"] for r in rows], "answer": [r["answer"] for r in rows]}
    )
    settings: dict[str, Any] = {
        **trl_train_settings(t, args.steps, recipe.seed),
        "per_device_train_batch_size": t.batch_size * rl.group_size,
        "num_generations": rl.group_size,
        "steps_per_generation": 1,
        "max_completion_length": s.max_new_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "beta": rl.kl_coef,
        "num_iterations": rl.mu,
        "epsilon": rl.clip_low,
        "epsilon_high": rl.clip_high,
        "loss_type": SIGNALRL_LOSS_TO_TRL[rl.loss_agg],
        "scale_rewards": rl.adv_scale,
        "mask_truncated_completions": False,
        "shuffle_dataset": shuffle,
        "use_vllm": False,
        "log_completions": False,
    }
    settings = without_checkpointing(GRPOConfig, settings)
    config = GRPOConfig(output_dir=str(work / "trl"), **settings)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[exact_match],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[trl_step_timer(log)],
    )
    trainer.train()
    final = work / "trl" / "final"
    trainer.save_model(str(final))
    settings["generation_batch_size"] = config.generation_batch_size
    del trainer, model
    gc.collect()
    return log, final, settings


def score(path: Path, rows, task, recipe) -> dict[str, Any]:
    """Greedy accuracy of the checkpoint at `path` by `signalrl.eval.evaluate`."""
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


# --------------------------------------------------------------------------- report


def print_report(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    c = out["config"]
    table = Table(
        title=(
            f"GRPO, {c['steps']} steps ({c['timed_steps']} timed after {c['warmup_steps']} "
            f"warm-up), {c['prompts_per_step']} prompts x {c['samples_per_prompt']} samples, "
            f"{c['precision']}, {c['threads']} threads"
        )
    )
    table.caption = (
        "s/step: timed wall time / timed steps; median: median step time; tok/s: completion "
        "tokens per second; len: mean completion tokens; reward: mean train "
        f"reward over the last 10 steps; acc: greedy accuracy on {out['test_rows']} test problems"
    )
    for col in ("run", "s/step", "median", "steps/s", "tok/s", "len", "reward", "acc"):
        table.add_column(col, justify="left" if col == "run" else "right")
    table.add_row("SFT start", "", "", "", "", "", "", f"{out['sft']['accuracy']:.3f}")
    for name, label in (("signalrl", "signalrl"), ("trl", f"TRL {out['versions']['trl']}")):
        r = out[name]
        table.add_row(
            label,
            f"{r['seconds_per_step']:.3f}",
            f"{r['median_step_seconds']:.3f}",
            f"{r['steps_per_second']:.3f}",
            f"{r['completion_tokens_per_second']:.0f}",
            f"{r['mean_completion_length']:.2f}",
            f"{r['train_reward_last10']:.3f}",
            f"{r['accuracy']:.3f}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"signalrl/TRL steps per second: [bold]{out['ratio_steps_per_s_signalrl_over_trl']:.2f}x"
        f"[/]  (same prompts per step: {out['same_prompts_per_step']})"
    )


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not require_trl("benchmarks/grpo_vs_trl.py"):
        return 2
    import torch
    from rich.console import Console

    from signalrl.quickstart import load_quickstart
    from signalrl.tasks import make_task

    warnings.filterwarnings(
        "ignore", message=".*checkpointing.* is deprecated", category=FutureWarning
    )
    torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out) if args.out else work / "grpo_vs_trl.json"
    cfg = load_quickstart(args.recipe)
    started = time.perf_counter()

    sft_dir = Path(args.sft) if args.sft else build_sft(cfg, args, work, console)
    if not (sft_dir / "config.json").is_file():
        raise SystemExit(f"{sft_dir}: not a Hugging Face checkpoint directory")

    grpo_overrides = [
        f"train.steps={args.steps}",
        "train.schedule=constant",
        "train.warmup_steps=0",
        f"train.threads={args.threads}",
        "eval.every=0",
        "eval.k=0",
        f"logging.every={10**9}",
        "logging.samples_every=0",
        "logging.tensorboard=false",
        "logging.progress=false",
        "checkpoint.every=0",
    ]
    if args.eval_n:
        grpo_overrides.append(f"eval.n={args.eval_n}")
    if args.precision:
        grpo_overrides.append(f"train.precision={args.precision}")
    recipe = stage_recipe(cfg, "grpo", work, grpo_overrides, model=sft_dir)
    task = make_task(recipe.task.name, **recipe.task.kwargs())
    test_rows = task.test()
    if args.eval_n:
        test_rows = test_rows[: args.eval_n]
    per_step = recipe.train.batch_size * recipe.rl.group_size

    console.rule(f"[bold]signalrl GRPO, {args.steps} steps")
    if args.wait_idle:
        wait_for_idle(args.wait_idle, console)
    t0, c0 = time.perf_counter(), cpu_snapshot()
    sl_log, sl_result, rows = run_signalrl(recipe, console)
    sl_wall, sl_other = time.perf_counter() - t0, other_cpu_fraction(c0, cpu_snapshot())
    same_prompts = len(rows) == args.steps * recipe.train.batch_size
    if not same_prompts:  # should not happen; fall back to the task's rows
        rows = task.train()

    console.rule(f"[bold]TRL GRPOTrainer, {args.steps} steps")
    if args.wait_idle:
        wait_for_idle(args.wait_idle, console)
    torch.set_num_threads(args.threads)
    t0, c0 = time.perf_counter(), cpu_snapshot()
    trl_log, trl_final, trl_settings = run_trl(
        recipe, sft_dir, rows, task, args, work, shuffle=not same_prompts
    )
    trl_wall, trl_other = time.perf_counter() - t0, other_cpu_fraction(c0, cpu_snapshot())

    console.rule("[bold]evaluation (signalrl.eval.evaluate, greedy)")
    sft_eval = score(sft_dir, test_rows, task, recipe)
    sl_eval = score(Path(sl_result["model"]), test_rows, task, recipe)
    trl_eval = score(trl_final, test_rows, task, recipe)

    sl = {
        **grpo_summary(sl_log, args.warmup, per_step),
        **sl_eval,
        "wall_seconds_incl_setup_and_final_eval": sl_wall,
        "other_processes_cpu_fraction": sl_other,
        "in_trainer_final_accuracy": sl_result["accuracy"],
        "model": sl_result["model"],
    }
    tr = {
        **grpo_summary(trl_log, args.warmup, per_step),
        **trl_eval,
        "wall_seconds_incl_setup": trl_wall,
        "other_processes_cpu_fraction": trl_other,
        "model": str(trl_final),
        "settings": trl_settings,
    }
    out = {
        "config": {
            "steps": args.steps,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps - args.warmup,
            "prompts_per_step": recipe.train.batch_size,
            "samples_per_prompt": recipe.rl.group_size,
            "max_new_tokens": recipe.sampling.max_new_tokens,
            "temperature": recipe.sampling.temperature,
            "lr": recipe.train.lr,
            "schedule": "constant",
            "beta": recipe.rl.kl_coef,
            "mu": recipe.rl.mu,
            "loss_agg": recipe.rl.loss_agg,
            "adv_scale": recipe.rl.adv_scale,
            "grad_clip": recipe.train.grad_clip,
            "precision": recipe.train.precision,
            "threads": args.threads,
            "task": {"name": recipe.task.name, **recipe.task.kwargs()},
            "quick": args.quick,
        },
        "sft": {"path": str(sft_dir), **sft_eval},
        "test_rows": len(test_rows),
        "same_prompts_per_step": same_prompts,
        "signalrl": sl,
        "trl": tr,
        "ratio_steps_per_s_signalrl_over_trl": sl["steps_per_second"] / tr["steps_per_second"],
        "not_equalized": NOT_EQUALIZED,
        "versions": versions(),
        "machine": machine_info(),
        "total_seconds": time.perf_counter() - started,
    }
    warn_threads_and_load(out, args.threads, console)
    if not math.isfinite(out["ratio_steps_per_s_signalrl_over_trl"]):
        raise SystemExit("non-finite timing ratio")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    print_report(out)
    Console().print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
