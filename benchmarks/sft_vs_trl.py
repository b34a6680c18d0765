"""signalrl vs TRL: completion-only SFT with both, on the same rows, measured the same way.

Run from the repository root (needs the `bench` extra, i.e. TRL):

    pip install -e ".[bench]"
    python benchmarks/sft_vs_trl.py                  # 50 SFT steps each
    python benchmarks/sft_vs_trl.py --quick          # smoke: 3 steps of 16 rows
    python benchmarks/sft_vs_trl.py --wait-idle 600 --out sft.json

It trains the same SFT run with signalrl (`trainer: sft` on a `{prompt, completion}` data
file: the `SFTTrainer` that `run_recipe` builds, kept so its `train_step` can be timed) and
with TRL's `SFTTrainer` (a prompt-completion dataset with `completion_only_loss=True`), one
after the other in one process, and prints a table (and writes JSON to `--out`): seconds per
step, training tokens per second, the median step, the train loss of the last steps as each
framework computed it, the held-out completion loss of both final models rescored
identically, and the ratio signalrl/TRL of steps per second.

Data: the prompts and chosen explanations of `dpo_vs_trl.py` (`trl_common.explanation_rows`,
generated deterministically, seed 0; signalrl has no built-in prompt/completion data of
20-200 tokens): a sum of 1 to 14 numbers and its running-sum explanation, prompt + completion
+ EOS 20-200 tokens (about 27-200). Exactly `steps x batch` rows, so each is seen once;
held-out rows (seed 1) are scored at the end.

What is held equal (set in this file and `trl_common.py`):

- Model: the `small` preset's untrained initialisation (about 6M parameters), written once
  with `save_pretrained` (`--work/init`) and loaded by both with `from_pretrained` (float32
  weights, `--attn`, default sdpa) from that directory; the same tokenizer (the saved
  `tokenizer.json` pipeline, `signalrl.models.load_tokenizer_checked`, for both).
- Loss: the mean NLL over the completion tokens and the EOS of the step's rows (signalrl
  `prompt_completion` rows; TRL `completion_only_loss=True`, `assistant_only_loss=False`,
  `loss_type="nll"`, no packing, no padding-free unless `--trl-padding-free`); EOS appended
  by both.
- Rows: the same rows in the same order: signalrl's first epoch is the file order (its
  `DataCursor` would shuffle) and its indices are recorded; TRL gets exactly those rows with
  `shuffle_dataset=False` and `train_sampling_strategy="sequential"`.
- Batch: 32 rows (`--batch-size`; 16 with `--quick`) per optimizer step in one
  forward/backward in both (signalrl `micro_batch_size` = batch; TRL
  `per_device_train_batch_size`, no accumulation).
- Max length 256 in both; no row reaches it.
- Optimiser: `torch.optim.AdamW` (TRL `optim="adamw_torch"`), lr 1e-3 (`--lr`) held constant
  with no warm-up, betas (0.9, 0.999), eps 1e-8, weight decay 0, gradient-norm clipping at 1.0.
- Precision: fp32 (default) or bf16 autocast over float32 weights in both (`--precision`).
- Threads: `torch.set_num_threads(2)` (`--threads`) for both; the JSON records the count each
  ran with.
- No evaluation, logging, checkpointing, progress bars, TensorBoard or activation
  checkpointing during training in either.
- Timing as in `dpo_vs_trl.py`: the first `--warmup` steps (2; 1 with `--quick`) are not
  timed; seconds per step is the wall time from the end of the last warm-up step to the end of
  the last step over the timed steps; tokens per second counts the non-padding tokens of the
  training forwards (prompt + completion + EOS), each framework's own count (signalrl
  `student/forward_tokens`, TRL `num_tokens`); the JSON says whether they agree. The other
  processes' CPU share is recorded for each timed window and each whole run, and
  `machine.load_verdict` decides whether the ratio is a result ("machine busy, not a result").
- Final models: both saved, reloaded with `from_pretrained` and scored by the same code
  (`trl_common.completion_logps_of`): the token-mean completion NLL on held-out rows and on
  the first trained rows (the untrained init is scored the same way).

What is not equal: the batch layout (signalrl left-pads prompts and right-pads completions;
TRL right-pads prompt+completion), the loss computation (signalrl: `logits_to_keep` + chunked
log-softmax over completion positions only; TRL: its fused LM head over every position, which
also computes entropy and top-1 accuracy for its metrics), and each framework's per-step
metrics and bookkeeping (inside the timed window).

This file is a script, never imported by the library or its tests.
"""

from __future__ import annotations

import argparse
import gc
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

FULL = {"steps": 50, "warmup": 2, "batch_size": 32, "eval_rows": 256}
QUICK = {"steps": 3, "warmup": 1, "batch_size": 16, "eval_rows": 16}
MAX_LENGTH = 256
NOT_EQUALIZED = [
    "batch layout: signalrl packs each forward's sequences first-fit decreasing into rows of "
    "the batch's width with position ids restarting per sequence (train.padding_free, its "
    "default; --padding-free off: left-padded prompts, right-padded completions); TRL "
    "right-pads prompt+completion (--trl-padding-free: TRL's padding_free, the whole "
    "batch flattened into one row)",
    "loss computation: signalrl logits_to_keep + chunked log-softmax over completion "
    "positions; TRL its fused LM head over every position (also entropy, top-1 accuracy)",
    "per-step metrics and bookkeeping of each framework are inside the timed window",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Time SFT with signalrl and with TRL's SFTTrainer.")
    add_common_args(p, "runs/bench_sft_vs_trl")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (1e-3)")
    p.add_argument(
        "--trl-padding-free",
        action="store_true",
        help="TRL's padding_free=True (each batch flattened into one row with position ids)",
    )
    return resolve_counts(p, p.parse_args(argv), FULL, QUICK)


def sft_recipe(args: argparse.Namespace, work: Path, start: Path, data: Path):
    from signalrl.config import recipe_from_dict

    raw = base_recipe("sft", "signalrl-sft", work, start, args, args.lr, args.steps)
    raw["data"] = {
        "path": str(data),
        "kind": "prompt_completion",
        "test_fraction": 0.0,
        "max_length": MAX_LENGTH,
    }
    return recipe_from_dict(raw, "sft_vs_trl [sft]")


def run_signalrl(recipe, console) -> tuple[StepLog, dict[str, Any], list[int]]:
    """Train with signalrl's SFT trainer; returns the step log, the summary and the order."""
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

    time_signalrl_steps(trainer, log, record)
    result = trainer.train()
    del trainer
    gc.collect()
    return log, result, order


def run_trl(recipe, start: Path, rows: list[dict[str, Any]], args, work: Path):
    """Train with TRL's SFTTrainer on `rows` in order; returns the step log, the final
    model directory and the effective TRL settings."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from signalrl.models import load_tokenizer_checked

    log = StepLog()
    box: dict[str, Any] = {}

    def on_step(state) -> None:  # noqa: ANN001
        log.tokens.append(box["trainer"]._total_train_tokens - sum(log.tokens))

    model = AutoModelForCausalLM.from_pretrained(
        start, dtype=torch.float32, attn_implementation=args.attn
    )
    # the saved tokenizer.json pipeline: transformers 5's AutoTokenizer would rebuild this
    # char tokenizer as a Qwen2 tokenizer that drops spaces and newlines
    tokenizer = load_tokenizer_checked(start)
    dataset = Dataset.from_dict({k: [r[k] for r in rows] for k in ("prompt", "completion")})
    settings = trl_train_settings(recipe.train, args.steps, recipe.seed)
    settings.update(
        per_device_train_batch_size=args.batch_size,
        train_sampling_strategy="sequential",
        shuffle_dataset=False,
        # TRL refuses max_length with padding_free and no packing; no row reaches it anyway
        max_length=None if args.trl_padding_free else MAX_LENGTH,
        pad_to_multiple_of=None,
        packing=False,
        padding_free=args.trl_padding_free,
        completion_only_loss=True,
        assistant_only_loss=False,
        loss_type="nll",
    )
    settings = without_checkpointing(SFTConfig, settings)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir=str(work / "trl"), **settings),
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


def score(model_dir: Path, rows: list[dict[str, Any]], args) -> dict[str, float]:
    """Token-mean NLL of the completions (+ EOS) of `rows` under the model at `model_dir`."""
    scored = completion_logps_of(
        model_dir,
        [r["prompt"] for r in rows],
        [r["completion"] for r in rows],
        args.precision,
        args.attn,
    )
    tokens = sum(n for _, n in scored)
    return {"nll": -sum(s for s, _ in scored) / tokens, "rows": len(rows), "tokens": tokens}


def print_report(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    c = out["config"]
    table = Table(
        title=(
            f"completion-only SFT, small preset, {c['steps']} steps ({c['timed_steps']} timed "
            f"after {c['warmup_steps']} warm-up), {c['batch_size']} rows/step, "
            f"{c['precision']}, {c['threads']} threads"
        )
    )
    table.caption = (
        "s/step: timed wall time / timed steps; median: median step; tok/s: training tokens "
        "(prompt+completion) per second; loss: train loss, last step and mean of the last 10, "
        "as each trainer computed it; held-out: completion NLL of the reloaded final model on "
        f"{out['eval']['held_out_rows']} held-out rows (same scoring)"
    )
    cols = ("run", "s/step", "median", "steps/s", "tok/s", "loss", "last 10", "held-out")
    for i, col in enumerate(cols):
        table.add_column(col, justify="left" if i == 0 else "right")
    table.add_row("init", *[""] * 6, f"{out['start']['held_out']['nll']:.4f}")
    for name, label in (("signalrl", "signalrl"), ("trl", f"TRL {out['versions'].get('trl')}")):
        r = out[name]
        table.add_row(
            label,
            f"{r['seconds_per_step']:.3f}",
            f"{r['median_step_seconds']:.3f}",
            f"{r['steps_per_second']:.3f}",
            f"{r['tokens_per_second']:.0f}",
            f"{r['loss_final']:.4f}",
            f"{r['loss_last10']:.4f}",
            f"{r['held_out']['nll']:.4f}",
        )
    console = Console()
    console.print(table)
    print_ratio(console, out["ratio"])


def run_config(args: argparse.Namespace, recipe: Any) -> dict[str, Any]:
    return {
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps - args.warmup,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "schedule": "constant",
        "loss": "completion-only token-mean NLL",
        "max_length": MAX_LENGTH,
        "grad_clip": recipe.train.grad_clip,
        "precision": args.precision,
        "attn_implementation": args.attn,
        "threads": args.threads,
        "preset": "small (untrained init)",
        "quick": args.quick,
        "signalrl_padding_free": args.padding_free,
        "trl_padding_free": args.trl_padding_free,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not require_trl("benchmarks/sft_vs_trl.py"):
        return 2
    import torch
    from rich.console import Console

    from signalrl.models import load_tokenizer_checked

    warnings.filterwarnings("ignore", message=".*checkpointing.* is deprecated")
    torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    work = Path(args.work)
    out_path = Path(args.out) if args.out else work / "sft_vs_trl.json"
    started = time.perf_counter()

    start = save_preset_init("small", work / "init")
    tok = load_tokenizer_checked(start)
    train_rows = explanation_rows(args.steps * args.batch_size, 0, tok)
    held_out = explanation_rows(args.eval_rows, 1, tok)
    for r in train_rows + held_out:
        r["completion"] = r["chosen"]
    data = write_jsonl(work / "sft.jsonl", train_rows, ("prompt", "completion"))
    recipe = sft_recipe(args, work, start, data)

    console.rule(f"[bold]signalrl SFT, {args.steps} steps")
    (sl_log, sl_result, order), sl_run = measured(
        lambda: run_signalrl(recipe, console), args, console
    )
    rows = [train_rows[i] for i in order]
    console.rule(f"[bold]TRL SFTTrainer, {args.steps} steps")
    (trl_log, trl_final, settings), trl_run = measured(
        lambda: run_trl(recipe, start, rows, args, work), args, console
    )
    sl = {**sl_log.summary(args.warmup), **sl_run, "model": sl_result["model"]}
    tr = {**trl_log.summary(args.warmup), **trl_run, "model": str(trl_final), "settings": settings}

    console.rule("[bold]scoring the reloaded final models (same code for both)")
    seen = rows[: args.eval_rows]
    for r in (sl, tr):
        r["held_out"] = score(Path(r["model"]), held_out, args)
        r["trained_rows"] = score(Path(r["model"]), seen, args)
    out = {
        "config": run_config(args, recipe),
        "data": {
            "generated": "trl_common.explanation_rows (seed 0 train, seed 1 held out)",
            "train_rows": len(train_rows),
            "tokens_prompt_plus_completion": length_stats(train_rows, "tokens_chosen"),
        },
        "start": {"path": str(start), "held_out": score(start, held_out, args)},
        "eval": {"held_out_rows": len(held_out), "trained_rows": len(seen)},
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
