"""signalrl vs TRL: offline DPO with both, on the same pairs, measured the same way.

Run from the repository root (needs the `bench` extra, i.e. TRL):

    pip install -e ".[bench]"
    python benchmarks/dpo_vs_trl.py                  # start SFT, then 30 DPO steps each
    python benchmarks/dpo_vs_trl.py --quick          # smoke: 2-step SFT, 3 steps of 16 pairs
    python benchmarks/dpo_vs_trl.py --wait-idle 600 --out dpo.json

It trains DPO with signalrl (`trainer: preference`, the `PreferenceTrainer` that `run_recipe`
builds, kept so its `train_step` can be timed) and with TRL's `DPOTrainer`, one after the other
in one process, and prints a table (and writes JSON to `--out`): seconds per step, training
tokens per second, the median step, the last steps' train loss and reward accuracy as each
framework computed them, the same loss and reward accuracy of both final models rescored
identically, and the ratio signalrl/TRL of steps per second.

Data: signalrl's built-in preference data are short arithmetic answers (`tests/data/
prefs_sample.jsonl`, 12 pairs of about 8 tokens; `recipes/dpo-small-arithmetic.yaml` samples
pairs of at most 6 new tokens), none of them 20-200 tokens long. So the pairs are generated
here, deterministically (`trl_common.explanation_rows`, seed 0): the prompt asks for a sum of
1 to 14 numbers, `chosen` explains it as running sums, `rejected` makes one slip (a partial sum
off by 1 or 10) and carries it to a wrong answer. Prompt + completion + EOS is 20-200 tokens of
the char tokenizer (about 27-200 in practice; the JSON records the spread). Exactly
`steps x batch` training pairs are made, so both see each pair once; scored pairs are a second
set (seed 1), never trained on.

What is held equal (all of it set in this file and `trl_common.py`):

- Model: the `small` preset (about 6M parameters). Its untrained initialisation is written with
  `save_pretrained` (`--work/init`), then SFT'd briefly by signalrl on the chosen completions
  of the training pairs (`--sft-steps`, default 100, lr 1e-3, batch 32, `trainer: sft`;
  0 keeps the init). That checkpoint is loaded by both with `from_pretrained` (float32
  weights, `--attn`, default sdpa) from the same directory.
- Reference: a frozen copy of the start model in both (signalrl `preference.reference:
  copy`, a deep copy of the loaded policy; TRL `ref_model=None` with a full model, which
  loads the same directory again with the policy's dtype and attention), evaluated live each
  step (no precomputed log-probs in either).
- Loss: sigmoid DPO, beta 0.1, no label smoothing, summed completion log-probs (EOS included),
  the mean over the step's pairs.
- Rows: the same pairs in the same order. signalrl's first epoch is made the file order (its
  `DataCursor` would shuffle) and the indices it takes are recorded; TRL gets a dataset of
  exactly those rows and reads it with `train_sampling_strategy="sequential"`. The prompts are
  plain strings; TRL appends the EOS to chosen and rejected, signalrl appends it too.
- Batch: 32 pairs (`--batch-size`; 16 with `--quick`) per optimizer step in one
  forward/backward (signalrl `micro_batch_size` = batch; TRL `per_device_train_batch_size` =
  batch, no accumulation). Both run
  chosen and rejected rows of the step through one policy forward and one reference forward.
- Max length 256 in both (`data.max_length`, `max_length`); no row reaches it, so neither
  truncates (signalrl's truncated-row count is checked to be 0).
- Optimiser: `torch.optim.AdamW` in both (TRL `optim="adamw_torch"`), lr 5e-5 held constant
  with no warm-up, betas (0.9, 0.999), eps 1e-8, weight decay 0, gradient-norm clipping at 1.0.
- Precision: fp32 (default) or bf16 autocast over float32 weights in both (`--precision`).
- Threads: `torch.set_num_threads(2)` (`--threads`) for both; the JSON records the count each
  ran with.
- No evaluation, logging, checkpointing, progress bars or TensorBoard during training in
  either; no dropout (the preset has none, TRL's `disable_dropout` too).
- Timing: the end of every optimizer step is stamped (signalrl: a wrapper around
  `trainer.train_step`; TRL: `TrainerCallback.on_step_end`). The first `--warmup` steps
  (2; 1 with `--quick`) are not timed: seconds per step is the wall time from the end of the
  last warm-up step to the end of the last step over the timed steps. Tokens per second counts
  the non-padding tokens of the policy's training forwards (prompt + chosen and prompt +
  rejected) in those steps, each framework's own count (signalrl `student/forward_tokens`,
  TRL's `num_tokens`); the JSON says whether the two agree.
- Other load: the share of the CPUs other processes used is recorded for each timed window
  and each whole run; `machine.load_verdict` over them decides whether the ratio is a result.
  On a busy machine it is printed and stored flagged "machine busy, not a result".
  `--wait-idle` waits for a quiet machine before each run.
- Final models: both are saved, reloaded with `from_pretrained` and scored by the same code
  (`trl_common.completion_logps_of`: signalrl's `completion_logps` with the start checkpoint
  as reference) on held-out pairs and on the first trained pairs: DPO loss and reward accuracy.

What is not equal (what is being compared, or TRL does not expose it): the batch layout
(signalrl left-pads prompts and right-pads completions; TRL right-pads prompt+completion), the
log-prob computation (signalrl: `logits_to_keep` + chunked log-softmax over completion
positions; TRL: its fused LM head, which also computes entropy, mean logits and top-1 accuracy
for its metrics), each framework's per-step metrics and bookkeeping (inside the timed window).

This file is a script, never imported by the library or its tests.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from machine import versions
from trl_common import (
    StepLog,
    add_common_args,
    base_recipe,
    completion_logps_of,
    explanation_rows,
    length_stats,
    machine_info,
    measured,
    print_ratio,
    ratio_with_verdict,
    record_order,
    require_trl,
    resolve_counts,
    save_preset_init,
    time_signalrl_steps,
    trl_step_timer,
    trl_train_settings,
    warn_threads_and_load,
    without_checkpointing,
    write_json,
    write_jsonl,
)

FULL = {"steps": 30, "warmup": 2, "batch_size": 32, "eval_rows": 256, "sft_steps": 100}
QUICK = {"steps": 3, "warmup": 1, "batch_size": 16, "eval_rows": 16, "sft_steps": 2}
BETA, MAX_LENGTH = 0.1, 256
NOT_EQUALIZED = [
    "batch layout: signalrl packs each forward's sequences first-fit decreasing into rows of "
    "the batch's width with position ids restarting per sequence (train.padding_free, its "
    "default; --padding-free off: left-padded prompts, right-padded completions); TRL "
    "right-pads prompt+completion (TRL 1.16 disables DPOConfig.padding_free)",
    "log-probs: signalrl logits_to_keep + chunked log-softmax over completion positions; TRL "
    "its fused LM head (also entropy, mean logits, top-1 accuracy for its metrics)",
    "per-step metrics and bookkeeping of each framework are inside the timed window",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Time DPO with signalrl and with TRL's DPOTrainer.")
    add_common_args(p, "runs/bench_dpo_vs_trl")
    p.add_argument("--lr", type=float, default=5e-5, help="DPO learning rate (5e-5)")
    p.add_argument(
        "--sft-steps", type=int, default=None, help="signalrl SFT steps of the start (100; 0: init)"
    )
    p.add_argument("--start", default=None, help="existing start checkpoint (default: build it)")
    return resolve_counts(p, p.parse_args(argv), FULL, QUICK)


# --------------------------------------------------------------------------- stages


def build_start(args: argparse.Namespace, work: Path, train_jsonl: Path, console: Any) -> Path:
    """The small preset's init (save_pretrained), SFT'd by signalrl on the chosen completions."""
    from signalrl.config import recipe_from_dict
    from signalrl.trainers import run_recipe

    init = save_preset_init("small", work / "init")
    if not args.sft_steps:
        return init
    raw = base_recipe("sft", "start-sft", work, init, args, 1e-3, args.sft_steps)
    raw["data"] = {"path": str(train_jsonl), "kind": "prompt_completion", "test_fraction": 0.0}
    console.rule(f"[bold]start: signalrl SFT of the small preset, {args.sft_steps} steps")
    result = run_recipe(recipe_from_dict(raw, "dpo_vs_trl [sft]"), overwrite=True, console=console)
    return Path(result["model"])


def dpo_recipe(args: argparse.Namespace, work: Path, start: Path, pairs: Path):
    from signalrl.config import recipe_from_dict

    raw = base_recipe("preference", "signalrl-dpo", work, start, args, args.lr, args.steps)
    raw["data"] = {"path": str(pairs), "test_fraction": 0.0, "max_length": MAX_LENGTH}
    raw["preference"] = {"loss_type": "sigmoid", "beta": BETA, "reference": "copy"}
    return recipe_from_dict(raw, "dpo_vs_trl [dpo]")


def run_signalrl(recipe, console) -> tuple[StepLog, dict[str, Any], list[int], int]:
    """Train with signalrl's preference trainer; returns the step log, the summary, the row
    order it trained on and its truncated-row count."""
    from signalrl.trainers import trainer_class

    log = StepLog()
    trainer = trainer_class(recipe.trainer)(recipe, overwrite=True, console=console)
    order = record_order(trainer)
    seen = [0]

    def record(metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        total = int(metrics["student/forward_tokens"])
        log.tokens.append(total - seen[0])
        seen[0] = total
        log.add("loss", metrics["loss"])
        log.add("reward_accuracy", metrics["rewards/accuracies"])
        log.add("reward_margin", metrics["rewards/margins"])

    time_signalrl_steps(trainer, log, record)
    truncated = trainer.truncated_rows
    result = trainer.train()
    del trainer
    gc.collect()
    return log, result, order, truncated


def run_trl(recipe, start: Path, rows: list[dict[str, Any]], args, work: Path):
    """Train with TRL's DPOTrainer on `rows` in order; returns the step log, the final
    model directory and the effective TRL settings."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from signalrl.models import load_tokenizer_checked

    log = StepLog()
    box: dict[str, Any] = {}

    def on_step(state) -> None:  # noqa: ANN001
        tr = box["trainer"]
        m = tr._metrics["train"]
        log.tokens.append(tr._total_train_tokens - sum(log.tokens))
        log.add("reward_accuracy", m["rewards/accuracies"][-1])
        log.add("reward_margin", m["rewards/margins"][-1])

    model = AutoModelForCausalLM.from_pretrained(
        start, dtype=torch.float32, attn_implementation=args.attn
    )
    # transformers 5's AutoTokenizer rebuilds this checkpoint's char tokenizer as a Qwen2
    # tokenizer that drops spaces and newlines; the saved tokenizer.json pipeline, as signalrl
    # loads it (`load_tokenizer_checked`), gives both frameworks the same token ids
    tokenizer = load_tokenizer_checked(start)
    dataset = Dataset.from_dict({k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")})
    settings = trl_train_settings(recipe.train, args.steps, recipe.seed)
    settings.update(
        per_device_train_batch_size=args.batch_size,
        train_sampling_strategy="sequential",
        max_length=MAX_LENGTH,
        pad_to_multiple_of=None,
        beta=BETA,
        loss_type=["sigmoid"],
        label_smoothing=0.0,
        precompute_ref_log_probs=False,
        disable_dropout=True,
    )
    settings = without_checkpointing(DPOConfig, settings)
    config = DPOConfig(output_dir=str(work / "trl"), **settings)
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[trl_step_timer(log, on_step)],
    )
    box["trainer"] = trainer
    inner = trainer.compute_loss

    def compute_loss(*a: Any, **kw: Any) -> Any:
        loss = inner(*a, **kw)
        log.add("loss", float(loss.detach()))
        return loss

    trainer.compute_loss = compute_loss
    trainer.train()
    final = work / "trl" / "final"
    trainer.save_model(str(final))
    del trainer, model, box["trainer"]
    gc.collect()
    return log, final, settings


def score(model_dir: Path, ref_dir: Path, rows: list[dict[str, Any]], args) -> dict[str, float]:
    """DPO loss, reward accuracy and margin of pairs `rows` under the model at `model_dir`
    with the start checkpoint `ref_dir` as reference (both reloaded with from_pretrained)."""
    prompts = [r["prompt"] for r in rows]

    def seq(path: Path, key: str) -> list[float]:
        return [s for s, _ in completion_logps_of(path, prompts, [r[key] for r in rows], *spec)]

    spec = (args.precision, args.attn)
    pc, pr = seq(model_dir, "chosen"), seq(model_dir, "rejected")
    rc, rr = seq(ref_dir, "chosen"), seq(ref_dir, "rejected")
    margins = [BETA * ((a - b) - (c - d)) for a, b, c, d in zip(pc, rc, pr, rr, strict=True)]
    losses = [math.log1p(math.exp(-m)) if m > -30 else -m for m in margins]
    return {
        "loss": statistics.fmean(losses),
        "reward_accuracy": statistics.fmean(float(m > 0) for m in margins),
        "reward_margin": statistics.fmean(margins),
        "pairs": len(rows),
    }


# --------------------------------------------------------------------------- report


def print_report(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    c = out["config"]
    table = Table(
        title=(
            f"DPO (sigmoid, beta {c['beta']}), small preset, {c['steps']} steps "
            f"({c['timed_steps']} timed after {c['warmup_steps']} warm-up), {c['batch_size']} "
            f"pairs/step, {c['precision']}, {c['threads']} threads"
        )
    )
    table.caption = (
        "s/step: timed wall time / timed steps; median: median step; tok/s: policy training "
        "tokens (prompt+chosen, prompt+rejected) per second; loss, acc: train loss and reward "
        "accuracy over the last 10 steps, as each trainer computed them; held-out: the "
        f"reloaded final model on {out['eval']['held_out_pairs']} held-out pairs (same scoring)"
    )
    cols = ("run", "s/step", "median", "steps/s", "tok/s", "loss", "acc", "held-out loss", "acc")
    for i, col in enumerate(cols):
        table.add_column(col, justify="left" if i == 0 else "right")
    s = out["start"]["held_out"]
    blank = [""] * 6
    table.add_row("start", *blank, f"{s['loss']:.4f}", f"{s['reward_accuracy']:.3f}")
    for name, label in (("signalrl", "signalrl"), ("trl", f"TRL {out['versions'].get('trl')}")):
        r = out[name]
        h = r["held_out"]
        table.add_row(
            label,
            f"{r['seconds_per_step']:.3f}",
            f"{r['median_step_seconds']:.3f}",
            f"{r['steps_per_second']:.3f}",
            f"{r['tokens_per_second']:.0f}",
            f"{r['loss_last10']:.4f}",
            f"{r['reward_accuracy_last10']:.3f}",
            f"{h['loss']:.4f}",
            f"{h['reward_accuracy']:.3f}",
        )
    console = Console()
    console.print(table)
    print_ratio(console, out["ratio"])


# --------------------------------------------------------------------------- main


def timed_runs(args, work: Path, start: Path, pairs_path: Path, train_rows, console):
    """Both trainings, each after an optional idle wait, with the other processes' share."""
    recipe = dpo_recipe(args, work, start, pairs_path)
    console.rule(f"[bold]signalrl DPO, {args.steps} steps")
    (sl_log, sl_result, order, truncated), sl_run = measured(
        lambda: run_signalrl(recipe, console), args, console
    )
    if truncated:
        raise SystemExit(f"signalrl truncated {truncated} rows: the lengths are not held equal")
    rows = [train_rows[i] for i in order]
    console.rule(f"[bold]TRL DPOTrainer, {args.steps} steps")
    (trl_log, trl_final, settings), trl_run = measured(
        lambda: run_trl(recipe, start, rows, args, work), args, console
    )
    sl = {**sl_log.summary(args.warmup), **sl_run, "model": sl_result["model"]}
    tr = {**trl_log.summary(args.warmup), **trl_run, "model": str(trl_final), "settings": settings}
    return recipe, sl, tr, rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not require_trl("benchmarks/dpo_vs_trl.py"):
        return 2
    import torch
    from rich.console import Console

    from signalrl.models import load_tokenizer_checked

    warnings.filterwarnings("ignore", message=".*checkpointing.* is deprecated")
    torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    work = Path(args.work)
    out_path = Path(args.out) if args.out else work / "dpo_vs_trl.json"
    started = time.perf_counter()

    tok = load_tokenizer_checked(save_preset_init("small", work / "init"))
    train_rows = explanation_rows(args.steps * args.batch_size, 0, tok)
    held_out = explanation_rows(args.eval_rows, 1, tok)
    pairs_path = write_jsonl(work / "pairs.jsonl", train_rows, ("prompt", "chosen", "rejected"))
    sft_path = write_jsonl(
        work / "sft.jsonl",
        [{"prompt": r["prompt"], "completion": r["chosen"]} for r in train_rows],
        ("prompt", "completion"),
    )
    start = Path(args.start) if args.start else build_start(args, work, sft_path, console)
    recipe, sl, tr, rows = timed_runs(args, work, start, pairs_path, train_rows, console)

    console.rule("[bold]scoring the reloaded final models (same code for both)")
    seen = rows[: args.eval_rows]
    for r in (sl, tr):
        r["held_out"] = score(Path(r["model"]), start, held_out, args)
        r["trained_pairs"] = score(Path(r["model"]), start, seen, args)
    out = {
        "config": {
            "steps": args.steps,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps - args.warmup,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "schedule": "constant",
            "beta": BETA,
            "loss_type": "sigmoid",
            "reference": "frozen copy of the start model",
            "max_length": MAX_LENGTH,
            "grad_clip": recipe.train.grad_clip,
            "precision": args.precision,
            "attn_implementation": args.attn,
            "threads": args.threads,
            "preset": "small",
            "start_sft_steps": 0 if args.start else args.sft_steps,
            "quick": args.quick,
            "signalrl_padding_free": args.padding_free,
        },
        "data": {
            "generated": "trl_common.explanation_rows (seed 0 train, seed 1 held out)",
            "train_pairs": len(train_rows),
            "tokens_prompt_plus_chosen": length_stats(train_rows, "tokens_chosen"),
            "tokens_prompt_plus_rejected": length_stats(train_rows, "tokens_rejected"),
        },
        "start": {"path": str(start), "held_out": score(start, start, held_out, args)},
        "eval": {"held_out_pairs": len(held_out), "trained_pairs": len(seen)},
        "same_rows_in_order": len(rows) == args.steps * args.batch_size,
        "tokens_per_step_agree": sl["tokens_per_step"] == tr["tokens_per_step"],
        "signalrl": sl,
        "trl": tr,
        "not_equalized": NOT_EQUALIZED,
        "versions": versions(),
        "machine": machine_info(),
        "total_seconds": time.perf_counter() - started,
    }
    out["ratio"] = ratio_with_verdict(out)
    out["ratio_steps_per_s_signalrl_over_trl"] = out["ratio"]["ratio"]
    warn_threads_and_load(out, args.threads, console)
    write_json(out_path, out)
    print_report(out)
    Console().print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
