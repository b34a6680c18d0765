"""signalrl vs TRL: one GRPO stage with both, on the same data, measured the same way.

Run from the repository root (needs the `bench` extra, i.e. TRL):

    pip install -e ".[bench]"
    python benchmarks/grpo_vs_trl.py                 # quickstart: SFT, then 100 GRPO steps each
    python benchmarks/grpo_vs_trl.py --quick         # smoke run: short SFT, 5 steps, 50 test rows
    python benchmarks/grpo_vs_trl.py --setting realistic          # small preset, countdown
    python benchmarks/grpo_vs_trl.py --setting realistic --quick  # 20-step SFT, 3 steps, 20 rows
    python benchmarks/grpo_vs_trl.py --sft runs/quickstart/sft/final --wait-idle 600 --out b.json

It trains one GRPO stage with signalrl (`OnlineRLTrainer`, what `run_recipe` builds), then with
TRL's `GRPOTrainer`, and reports (JSON in `--out`) s/step, completion tokens/s, mean length,
truncated fraction, both final models' greedy test accuracy and the signalrl/TRL steps/s
ratio, labelled "machine busy, not a result" by `machine.load_verdict` (over 5% other load).

Settings (`--setting`): `quickstart` (default) is the quickstart's GRPO stage (tiny preset,
arithmetic, 16 prompts x 8 samples, at most 6 new tokens, fp32, eager attention) from its SFT
stage (`signalrl.quickstart` DEFAULT). `realistic` changes them (`REALISTIC`): the `small`
preset, countdown (recipes/sft-countdown.yaml's task: 3 numbers from 1..20, + - *), 8 prompts
x 8 samples, at most 128 new tokens, sdpa attention. Its prompt is the task's own (`Numbers:
19, 3, 9\\nTarget: 8\\nExpression:`; the R1-Zero template, about 390 char tokens, would not fit
the preset's 512 positions with 128 new tokens). Its SFT start is trained by signalrl on
R1-style completions (`trl_common.countdown_r1_rows`: ` <think> try 3+9=12, no. 9*3=27,
27-19=8, so 8. </think> <answer> 9*3-19 </answer>`, 63-152 tokens with EOS, about 20% over
128), so sampled lengths vary and some completions are truncated. The reward is the task's
verifier in both settings (countdown: the last `<answer>` block).

Held equal (all set in this file), in both settings:

- Model: one SFT checkpoint (built into `--work`, or `--sft PATH`), loaded with
  `from_pretrained` (float32 weights, the setting's attention) by both.
- Tokenizer: TRL gets `signalrl.models.load_tokenizer_checked` (what signalrl loads):
  transformers 5's `AutoTokenizer` rebuilds the char tokenizer as a Qwen2 tokenizer that drops
  spaces and newlines, which countdown prompts and completions contain (quickstart prompts have
  neither). The JSON records whether TRL's prompt ids (`tokenizer(text=prompts)`) equal
  signalrl's (`settings.prompt_ids_match`).
- Prompts: the same prompts at every step. signalrl draws its batches; the script records
  them and gives TRL exactly those rows in that order with `shuffle_dataset=False` (TRL's
  `RepeatSampler` yields rows Pk..Pk+P-1 at step k). Plain strings, no chat template.
- Batch: P prompts x 8 samples per optimizer step (TRL `per_device_train_batch_size` = P x 8,
  `num_generations=8`, `gradient_accumulation_steps=1`, `steps_per_generation=1`).
- Sampling: the setting's max new tokens, temperature 1.0, top_p 1.0, no top_k; EOS ends a
  completion and counts as a completion token in both. A completion is truncated when its last
  token is not EOS (signalrl `completion/truncated_frac`; TRL: counted in the reward function
  from `completion_ids`, as TRL's `clipped_ratio`).
- Objective: beta 0 (no reference model), mu 1 (TRL `num_iterations=1`), clip epsilon 0.2,
  group-std advantages (`scale_rewards="group"`), per-sequence token mean then mean over
  sequences (signalrl `seq-mean-token-mean`, TRL `loss_type="grpo"`), truncated completions
  not masked in either.
- Optimiser: `torch.optim.AdamW` (TRL `optim="adamw_torch"`), lr 1e-4, betas (0.9, 0.999),
  eps 1e-8, weight decay 0, clipping at 1.0, a CONSTANT lr with no warm-up (the quickstart's
  cosine is overridden for both).
- Precision fp32 (`--precision bf16`: autocast, TRL `bf16=True, use_cpu=True`); the threads.
- No evaluation, logging, checkpoints, progress bars or TensorBoard during training (signalrl
  `eval.every=0`, `logging.every` huge, `checkpoint.every=0`, ...; TRL `report_to="none"`,
  `logging_strategy="no"`, `save_strategy="no"`, `eval_strategy="no"`, `disable_tqdm=True`, no
  vLLM, no dataloader workers, activation checkpointing off).
- Timing: the end of every optimizer step is recorded (signalrl: a wrapper around
  `trainer.train_step`; TRL: a `TrainerCallback.on_step_end`). After `--warmup` untimed steps
  (2; 1 with `--quick`), seconds per step is the wall time from the end of the last warm-up
  step to the end of the last step over the timed steps. Completion tokens (signalrl:
  `completion/mean_length` x completions; TRL: from `completion_ids`), mean length and the
  truncated fraction are over the same steps. The other processes' CPU share is recorded over
  each timed window and each run; `--wait-idle` waits for a quiet machine first.
- Accuracy: the final models (and the SFT start), reloaded with `from_pretrained`, scored by
  the same `signalrl.eval.evaluate` call. Not equal: `NOT_EQUALIZED` (engine, log-prob code,
  advantage std epsilon, random streams, so lengths and truncation, per-step bookkeeping).

This file is a script, never imported by the library or its tests.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from machine import versions
from trl_common import (
    StepLog,
    countdown_r1_rows,
    greedy_accuracy,
    machine_info,
    measured,
    print_ratio,
    ratio_with_verdict,
    require_trl,
    time_signalrl_steps,
    timing_summary,
    trl_step_timer,
    trl_train_settings,
    warn_threads_and_load,
    without_checkpointing,
    write_json,
    write_jsonl,
)

# --------------------------------------------------------------------------- settings

# per setting: the full run's counts, then --quick's
COUNTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "quickstart": (
        {"steps": 100, "warmup": 2, "eval_n": None, "sft_steps": None},
        {"steps": 5, "warmup": 1, "eval_n": 50, "sft_steps": 50},
    ),
    "realistic": (
        {"steps": 50, "warmup": 2, "eval_n": None, "sft_steps": None},
        {"steps": 3, "warmup": 1, "eval_n": 20, "sft_steps": 20},
    ),
}
# recipes/sft-countdown.yaml's task
COUNTDOWN = {"name": "countdown", "n_numbers": 3, "max_number": 20, "ops": "+-*"}
COUNTDOWN.update(n_train=8000, n_test=300, seed=0)
# the realistic setting: the quickstart's two stages (signalrl.quickstart DEFAULT) with the
# countdown task and these changes; the SFT also gets its data file (written first)
REALISTIC = {
    "sft": (
        "model.name_or_path=small train.steps=100 train.batch_size=32 train.lr=0.001 "
        "train.warmup_steps=10 sampling.max_new_tokens=128 eval.k=0 eval.n=20"
    ).split(),
    "grpo": "model.attn_implementation=sdpa train.batch_size=8 sampling.max_new_tokens=128".split(),
}
SIGNALRL_LOSS_TO_TRL = {
    "seq-mean-token-mean": "grpo",
    "token-mean": "dapo",  # one process, no accumulation: the same token mean
    "seq-mean-token-sum-norm": "dr_grpo",
}
NOT_EQUALIZED = [
    "generation engine: signalrl prefills each prompt once, copies its KV cache to the group "
    "and drops finished rows; TRL runs transformers `model.generate` on all rows",
    "log-probs/entropy of the update: signalrl logits_to_keep + chunked log-softmax; TRL its "
    "fused LM head (both compute an entropy for logging)",
    "advantage std epsilon: signalrl 1e-6, TRL 1e-4 (constant groups get 0 in both)",
    "random streams: same prompts per step, but the sampled completions (so their lengths "
    "and truncation) differ",
    "per-step bookkeeping of each framework (TRL: Trainer/accelerate callbacks and metric "
    "gathering; signalrl: its loop) is inside the timed window",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time one GRPO stage with signalrl and with TRL's GRPOTrainer.",
    )
    p.add_argument(
        "--setting",
        choices=tuple(COUNTS),
        default="quickstart",
        help="quickstart: the quickstart's GRPO stage (default); realistic: small preset, "
        "countdown, 8 prompts x 8 samples, up to 128 new tokens",
    )
    p.add_argument("--steps", type=int, default=None, help="GRPO steps (100; realistic 50)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2)")
    p.add_argument("--sft", default=None, help="existing SFT checkpoint dir (default: build it)")
    p.add_argument("--sft-steps", type=int, default=None, help="SFT steps when building it")
    p.add_argument("--work", default=None, help="output dir (runs/bench_grpo_vs_trl[_SETTING])")
    p.add_argument("--out", default=None, help="JSON results (default: WORK/grpo_vs_trl.json)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for both (default: 2)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default fp32")
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
        help="smoke run: quickstart 50-step SFT, 5 GRPO steps, 50 test rows; realistic "
        "20-step SFT, 3 GRPO steps, 20 test rows (1 warm-up step)",
    )
    a = p.parse_args(argv)
    full, quick = COUNTS[a.setting]
    for key, value in (quick if a.quick else full).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.work is None:
        suffix = "" if a.setting == "quickstart" else f"_{a.setting}"
        a.work = f"runs/bench_grpo_vs_trl{suffix}"
    if a.recipe and a.setting != "quickstart":
        p.error("--recipe is a quickstart-shaped recipe: only with --setting quickstart")
    if a.warmup < 1:
        p.error("--warmup must be >= 1 (timing starts at the end of the last warm-up step)")
    if a.steps <= a.warmup:
        p.error("--steps must be larger than --warmup")
    return a


# --------------------------------------------------------------------------- timing


def grpo_summary(log: StepLog, warmup: int, completions_per_step: int) -> dict[str, Any]:
    """The shared timing (`trl_common.timing_summary`) under this script's names, with the
    mean completion length and truncated fraction of the timed steps, and the first/last-10
    mean train rewards."""
    t = timing_summary(log.ends, log.tokens, warmup)
    rewards = log.values.get("reward", [])
    truncated = log.values.get("truncated", [])
    keys = ("steps", "warmup_steps", "timed_steps", "timed_seconds", "seconds_per_step")
    return {
        **{k: t[k] for k in keys},
        "steps_per_second": t["steps_per_second"],
        "median_step_seconds": t["median_step_seconds"],
        "completion_tokens_timed": t["tokens_timed"],
        "completion_tokens_per_second": t["tokens_per_second"],
        "mean_completion_length": t["tokens_timed"] / (t["timed_steps"] * completions_per_step),
        "truncated_fraction": statistics.fmean(truncated[warmup:]),
        "truncated_fraction_all_steps": statistics.fmean(truncated),
        "zero_std_group_fraction": statistics.fmean(log.values["zero_std"]),
        "train_reward_first10": statistics.fmean(rewards[:10]),
        "train_reward_last10": statistics.fmean(rewards[-10:]),
        "other_processes_cpu_fraction_timed": log.window_other_cpu(warmup),
        "torch_threads": log.threads,
        **log.extra,
        "step_seconds": t["step_seconds"],
        "completion_tokens_per_step": log.tokens,
        "rewards": rewards,
        "truncated_per_step": truncated,
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


def setting_config(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The two stages (sft, grpo) of the setting, as `load_quickstart` gives them. For
    `realistic`, the SFT data file (R1-style countdown completions) is written into `work`."""
    from signalrl.quickstart import load_quickstart
    from signalrl.tasks import make_task

    cfg = load_quickstart(args.recipe)
    if args.setting == "quickstart":
        return cfg
    cfg["where"] = "<quickstart, changed for the realistic setting>"
    for stage, overrides in REALISTIC.items():
        cfg[stage]["task"] = dict(COUNTDOWN)
        cfg[stage].setdefault("_overrides", []).extend(overrides)
    if args.sft is None:
        task = make_task(COUNTDOWN["name"], **{k: v for k, v in COUNTDOWN.items() if k != "name"})
        rows = countdown_r1_rows(task.train(), seed=0)
        path = write_jsonl(work / "sft_countdown_r1.jsonl", rows, ("prompt", "completion"))
        cfg["sft"]["data"] = {"path": str(path), "kind": "prompt_completion", "test_fraction": 0}
    return cfg


def build_sft(cfg: dict[str, Any], args: argparse.Namespace, work: Path, console) -> Path:
    from signalrl.trainers import run_recipe

    ovs = [f"train.threads={args.threads}"]
    if args.sft_steps:
        ovs += [f"train.steps={args.sft_steps}", "eval.k=0"]
    recipe = stage_recipe(cfg, "sft", work, ovs)
    console.rule(f"[bold]SFT ({args.setting} setting, {recipe.train.steps} steps)")
    result = run_recipe(recipe, overwrite=True, console=console)
    return Path(result["model"])


def grpo_overrides(args: argparse.Namespace) -> list[str]:
    """What both settings' GRPO stage gets: the step count, a constant lr with no warm-up,
    the threads, and no evaluation, logging, samples, progress bar or checkpoints."""
    ovs = [
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
        ovs.append(f"eval.n={args.eval_n}")
    if args.precision:
        ovs.append(f"train.precision={args.precision}")
    return ovs


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
        log.add("truncated", metrics["completion/truncated_frac"])
        log.add("zero_std", metrics["frac_zero_std_groups"])
        per_step_rows.extend({"prompt": s["prompt"], "answer": s["answer"]} for s in samples[::g])

    time_signalrl_steps(trainer, log, record)
    result = trainer.train()
    del trainer
    gc.collect()
    return log, result, per_step_rows


def trl_reward(task, log: StepLog, eos_ids: list[int], g: int):
    """TRL reward function: the task's verifier on the dataset's row (looked up by prompt:
    countdown's verifier needs the row's numbers and target), counting the completion tokens
    (EOS included), the truncated completions (last token not EOS) and the groups (g rows in a
    row, as TRL's RepeatSampler yields them) whose rewards are all equal, of each step."""
    by_prompt = {r["prompt"]: r for r in task.train()}

    def verifier(prompts, completions, answer, completion_ids, **kw):
        log.tokens.append(sum(len(c) for c in completion_ids))
        cut = [not c or c[-1] not in eos_ids for c in completion_ids]
        log.add("truncated", sum(cut) / len(cut))
        rewards = [
            float(task.verify(by_prompt.get(p, {"prompt": p, "answer": a}), c))
            for p, c, a in zip(prompts, completions, answer, strict=True)
        ]
        log.add("reward", statistics.fmean(rewards))
        groups = [rewards[i : i + g] for i in range(0, len(rewards), g)]
        log.add("zero_std", sum(min(x) == max(x) for x in groups) / len(groups))
        return rewards

    return verifier


def trl_settings(recipe, args: argparse.Namespace, shuffle: bool) -> dict[str, Any]:
    """GRPOConfig arguments from the signalrl recipe (see the module docstring)."""
    from trl import GRPOConfig

    t, rl, s = recipe.train, recipe.rl, recipe.sampling
    if rl.loss_agg not in SIGNALRL_LOSS_TO_TRL:
        raise SystemExit(f"rl.loss_agg={rl.loss_agg!r} has no TRL loss_type equivalent")
    if s.stop_strings:
        raise SystemExit("sampling.stop_strings has no equivalent in TRL's generate path")
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
    return without_checkpointing(GRPOConfig, settings)


def run_trl(
    recipe,
    sft_dir: Path,
    rows: list[dict[str, Any]],
    task,
    args: argparse.Namespace,
    work: Path,
    shuffle: bool,
):
    """Train with TRL's GRPOTrainer, configured from the same recipe, on `rows` in order.
    Returns the step log, the final model directory and the effective TRL settings."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from signalrl.data.chat import encode_prompt
    from signalrl.models import load_tokenizer_checked

    log = StepLog()
    model = AutoModelForCausalLM.from_pretrained(
        sft_dir, dtype=torch.float32, attn_implementation=recipe.model.attn_implementation
    )
    # the saved tokenizer.json pipeline, as signalrl loads it: transformers 5's AutoTokenizer
    # would rebuild this char tokenizer as a Qwen2 tokenizer that drops spaces and newlines
    tokenizer = load_tokenizer_checked(sft_dir)
    prompts = [r["prompt"] for r in rows]
    # TRL encodes plain-text prompts as tokenizer(text=prompts); signalrl with encode_prompt
    ids_match = tokenizer(text=prompts)["input_ids"] == encode_prompt(tokenizer, prompts)
    dataset = Dataset.from_dict({"prompt": prompts, "answer": [r["answer"] for r in rows]})
    settings = trl_settings(recipe, args, shuffle)
    config = GRPOConfig(output_dir=str(work / "trl"), **settings)
    eos_ids: list[int] = []
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[trl_reward(task, log, eos_ids, recipe.rl.group_size)],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[trl_step_timer(log)],
    )
    eos_ids.extend(trainer.eos_token_ids)
    trainer.train()
    final = work / "trl" / "final"
    trainer.save_model(str(final))
    settings.update(
        generation_batch_size=config.generation_batch_size,
        eos_token_ids=eos_ids,
        tokenizer=type(tokenizer).__name__,
        prompt_ids_match=ids_match,
    )
    del trainer, model
    gc.collect()
    return log, final, settings


# --------------------------------------------------------------------------- report


def print_report(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    c = out["config"]
    table = Table(
        title=(
            f"GRPO ({c['setting']}), {c['steps']} steps ({c['timed_steps']} timed after "
            f"{c['warmup_steps']} warm-up), {c['prompts_per_step']} prompts x "
            f"{c['samples_per_prompt']} samples, up to {c['max_new_tokens']} new tokens, "
            f"{c['precision']}, {c['threads']} threads"
        )
    )
    table.caption = (
        "s/step: timed wall time / timed steps; median: median step time; tok/s: completion "
        "tokens per second; len: mean completion tokens (EOS included) and trunc: truncated "
        "fraction, over the timed steps; reward: mean train reward over the last 10 steps; "
        f"acc: greedy accuracy on {out['test_rows']} test problems"
    )
    cols = ("run", "s/step", "median", "steps/s", "tok/s", "len", "trunc", "reward", "acc")
    for col in cols:
        table.add_column(col, justify="left" if col == "run" else "right")
    table.add_row("SFT start", *[""] * 7, f"{out['sft']['accuracy']:.3f}")
    for name, label in (("signalrl", "signalrl"), ("trl", f"TRL {out['versions']['trl']}")):
        r = out[name]
        table.add_row(
            label,
            f"{r['seconds_per_step']:.3f}",
            f"{r['median_step_seconds']:.3f}",
            f"{r['steps_per_second']:.3f}",
            f"{r['completion_tokens_per_second']:.0f}",
            f"{r['mean_completion_length']:.2f}",
            f"{r['truncated_fraction']:.3f}",
            f"{r['train_reward_last10']:.3f}",
            f"{r['accuracy']:.3f}",
        )
    console = Console()
    console.print(table)
    print_ratio(console, out["ratio"])
    console.print(f"same prompts per step: {out['same_prompts_per_step']}")


# --------------------------------------------------------------------------- main


def timed_runs(args: argparse.Namespace, recipe, sft_dir: Path, task, work: Path, console):
    """signalrl then TRL on the same prompts per step; their summaries (without accuracy)."""
    per_step = recipe.train.batch_size * recipe.rl.group_size
    console.rule(f"[bold]signalrl GRPO, {args.steps} steps")
    (sl_log, sl_result, rows), sl_run = measured(
        lambda: run_signalrl(recipe, console), args, console
    )
    same_prompts = len(rows) == args.steps * recipe.train.batch_size
    if not same_prompts:  # should not happen; fall back to the task's rows, shuffled
        rows = task.train()
    console.rule(f"[bold]TRL GRPOTrainer, {args.steps} steps")
    (trl_log, trl_final, trl_cfg), trl_run = measured(
        lambda: run_trl(recipe, sft_dir, rows, task, args, work, not same_prompts), args, console
    )
    sl = {
        **grpo_summary(sl_log, args.warmup, per_step),
        "wall_seconds_incl_setup_and_final_eval": sl_run["wall_seconds_whole_run"],
        "other_processes_cpu_fraction": sl_run["other_processes_cpu_fraction"],
        "in_trainer_final_accuracy": sl_result["accuracy"],
        "model": sl_result["model"],
    }
    tr = {
        **grpo_summary(trl_log, args.warmup, per_step),
        "wall_seconds_incl_setup": trl_run["wall_seconds_whole_run"],
        "other_processes_cpu_fraction": trl_run["other_processes_cpu_fraction"],
        "model": str(trl_final),
        "settings": trl_cfg,
    }
    return sl, tr, same_prompts


def run_config(args: argparse.Namespace, recipe) -> dict[str, Any]:
    return {
        "setting": args.setting,
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
        "attn_implementation": recipe.model.attn_implementation,
        "threads": args.threads,
        "task": {"name": recipe.task.name, **recipe.task.kwargs()},
        "quick": args.quick,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not require_trl("benchmarks/grpo_vs_trl.py"):
        return 2
    import torch
    from rich.console import Console

    from signalrl.tasks import make_task

    warnings.filterwarnings(
        "ignore", message=".*checkpointing.* is deprecated", category=FutureWarning
    )
    torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out) if args.out else work / "grpo_vs_trl.json"
    started = time.perf_counter()
    cfg = setting_config(args, work)
    sft_dir = Path(args.sft) if args.sft else build_sft(cfg, args, work, console)
    if not (sft_dir / "config.json").is_file():
        raise SystemExit(f"{sft_dir}: not a Hugging Face checkpoint directory")
    recipe = stage_recipe(cfg, "grpo", work, grpo_overrides(args), model=sft_dir)
    task = make_task(recipe.task.name, **recipe.task.kwargs())
    test_rows = task.test()[: args.eval_n] if args.eval_n else task.test()

    sl, tr, same_prompts = timed_runs(args, recipe, sft_dir, task, work, console)
    console.rule("[bold]evaluation (signalrl.eval.evaluate, greedy)")
    sft_eval = greedy_accuracy(sft_dir, test_rows, task, recipe)
    sl.update(greedy_accuracy(Path(sl["model"]), test_rows, task, recipe))
    tr.update(greedy_accuracy(Path(tr["model"]), test_rows, task, recipe))
    out = {
        "config": run_config(args, recipe),
        "sft": {"path": str(sft_dir), **sft_eval},
        "test_rows": len(test_rows),
        "same_prompts_per_step": same_prompts,
        "signalrl": sl,
        "trl": tr,
        "not_equalized": NOT_EQUALIZED,
        "versions": versions(),
        "machine": machine_info(),
    }
    out["ratio"] = ratio_with_verdict(out)
    out["ratio_steps_per_s_signalrl_over_trl"] = out["ratio"]["ratio"]
    out["total_seconds"] = time.perf_counter() - started
    warn_threads_and_load(out, args.threads, console)
    if max(out[k]["zero_std_group_fraction"] for k in ("signalrl", "trl")) == 1.0:
        console.print(
            "[yellow]every group had equal rewards (no learning signal; signalrl "
            "skips such rows): use a stronger SFT start (--sft-steps, --sft)"
        )
    write_json(out_path, out)
    print_report(out)
    Console().print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
