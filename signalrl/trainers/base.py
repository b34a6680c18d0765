"""Shared loop pieces: optimiser, LR schedule, checkpoints and resume, progress, evaluation.

Every trainer owns a `TrainerBase`: it creates the run directory, writes the resolved recipe,
builds AdamW and the schedule, saves checkpoints atomically (`checkpoints/step-N/`: HF-format
model + tokenizer + `trainer_state.pt`) and resumes from the latest one.
"""

from __future__ import annotations

import io
import math
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers.utils import logging as hf_logging

from signalrl.config import Recipe, dump_recipe
from signalrl.eval import EvalResult, evaluate
from signalrl.logging.run import RunDir
from signalrl.models import load_model, save_model
from signalrl.rollout.sampler import SamplingParams
from signalrl.tasks import Task, make_task

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(recipe: Recipe):  # noqa: ANN201
    t = recipe.train

    def f(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        span = max(1, t.steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        if t.schedule == "linear":
            frac = 1.0 - progress
        else:
            frac = 0.5 * (1.0 + math.cos(math.pi * progress))
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * frac

    return f


def latest_checkpoint(run_dir: Path) -> Path | None:
    ck = run_dir / "checkpoints"
    if not ck.is_dir():
        return None
    steps = [
        (int(m.group(1)), p)
        for p in ck.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return max(steps)[1] if steps else None


class DataCursor:
    """Epoch-wise shuffled order over `n` rows, resumable: `take(k)` returns the next k
    indices, reshuffling (seeded by the epoch) when an epoch ends."""

    def __init__(self, n: int, seed: int) -> None:
        if n <= 0:
            raise ValueError("no training rows")
        self.n, self.seed = n, seed
        self.order: list[int] = []
        self.cursor = 0
        self.epoch = 0

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.cursor >= len(self.order):
                self.order = list(range(self.n))
                random.Random(self.seed * 7919 + self.epoch).shuffle(self.order)
                self.epoch += 1
                self.cursor = 0
            step = min(k - len(out), len(self.order) - self.cursor)
            out.extend(self.order[self.cursor : self.cursor + step])
            self.cursor += step
        return out

    def state(self) -> dict[str, Any]:
        return {"order": self.order, "cursor": self.cursor, "epoch": self.epoch}

    def load(self, state: dict[str, Any]) -> None:
        self.order = list(state.get("order", []))
        self.cursor = int(state.get("cursor", 0))
        self.epoch = int(state.get("epoch", 0))


class TrainerBase:
    """Run directory, model, optimiser, schedule, checkpoints, progress and evaluation."""

    def __init__(
        self,
        recipe: Recipe,
        *,
        resume: bool = False,
        overwrite: bool = False,
        console: Console | None = None,
        task: Task | None = None,
    ) -> None:
        hf_logging.disable_progress_bar()
        self.recipe = recipe
        self.console = console or Console(stderr=True)
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        RunDir.prepare(recipe.run_dir, resume=resume, overwrite=overwrite)
        self.run = RunDir(recipe.run_dir, tensorboard=recipe.logging.tensorboard)
        self.run.write_config(dump_recipe(recipe))
        seed_everything(recipe.seed)
        # a researcher may pass any object with train()/test()/verify(); else the recipe's task
        self.task: Task = task or make_task(recipe.task.name, **recipe.task.kwargs())
        self.resume_from = latest_checkpoint(self.run.path) if resume else None
        source = str(self.resume_from) if self.resume_from else recipe.model.name_or_path
        device = recipe.model.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer = load_model(
            source,
            dtype=recipe.model.dtype,
            seed=recipe.model.seed,
            device=device,
            attn_implementation=recipe.model.attn_implementation,
        )
        self.device = next(self.model.parameters()).device
        self.autocast_dtype = torch.bfloat16 if recipe.train.precision == "bf16" else None
        self.step = 0
        self.started = time.time()
        self.elapsed_before = 0.0

    # -- optimisation ---------------------------------------------------------------------
    def build_optimizer(self, params: list[torch.nn.Parameter] | None = None) -> None:
        t = self.recipe.train
        params = (
            params
            if params is not None
            else [p for p in self.model.parameters() if p.requires_grad]
        )
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": t.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=t.lr,
            betas=t.betas,
            eps=t.adam_eps,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.recipe))
        self.params = params

    def optimizer_step(self, step_scheduler: bool = True) -> dict[str, float]:
        """Clip, step AdamW (skipped on a non-finite gradient), zero grads, advance the LR
        schedule unless `step_scheduler` is False (several updates in one training step)."""
        t = self.recipe.train
        if t.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in self.params if p.grad is not None])
            )
        lr = self.scheduler.get_last_lr()[0]
        if torch.isfinite(norm):
            self.optimizer.step()
        else:  # a non-finite gradient: skip the update, keep going, and log it
            self.console.print(f"[yellow]step {self.step}: non-finite grad norm, update skipped")
        self.optimizer.zero_grad(set_to_none=True)
        if step_scheduler:
            self.scheduler.step()
        return {"grad_norm": float(norm), "lr": lr}

    # -- checkpoints ----------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "elapsed": self.elapsed(),
            "extra": self.extra_state(),
        }

    def extra_state(self) -> dict[str, Any]:
        """What a checkpoint needs beyond model, optimiser and schedule (subclasses extend);
        the data order of `self.data` (a DataCursor) when the trainer has one."""
        data = getattr(self, "data", None)
        return {"data": data.state()} if isinstance(data, DataCursor) else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        data = getattr(self, "data", None)
        if isinstance(data, DataCursor):
            data.load(state.get("data", {}))

    def save_checkpoint(self) -> Path:
        buf = io.BytesIO()
        torch.save(self.trainer_state(), buf)
        path = save_model(
            self.model,
            self.tokenizer,
            self.run.checkpoints / f"step-{self.step}",
            extra_files={STATE_FILE: buf.getvalue()},
        )
        self._prune_checkpoints()
        return path

    def _prune_checkpoints(self) -> None:
        ck = self.run.checkpoints
        steps = sorted((int(m.group(1)), p) for p in ck.iterdir() if (m := _STEP_DIR.match(p.name)))
        for _, p in steps[: -self.recipe.checkpoint.keep]:
            shutil.rmtree(p, ignore_errors=True)

    def maybe_resume(self) -> None:
        if self.resume_from is None:
            return
        state = torch.load(self.resume_from / STATE_FILE, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.step = int(state["step"])
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.load_extra_state(state.get("extra", {}))
        self.run.truncate_metrics(self.step)
        self.console.print(f"resumed from {self.resume_from} at step {self.step}")

    def save_final(self) -> Path:
        return save_model(self.model, self.tokenizer, self.run.final)

    def maybe_checkpoint(self) -> None:
        every = self.recipe.checkpoint.every
        if every and self.step % every == 0 and self.step < self.recipe.train.steps:
            self.save_checkpoint()

    # -- progress, evaluation ---------------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_before + (time.time() - self.started)

    def progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.recipe.logging.progress,
            transient=False,
        )

    def sampling_params(self, n: int = 1) -> SamplingParams:
        """The recipe's `sampling` section as sampler parameters, `n` samples per prompt."""
        s = self.recipe.sampling
        return SamplingParams(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            n=n,
            stop_strings=tuple(s.stop_strings),
        )

    def train_rows(self) -> list[dict[str, Any]]:
        """The task's train split, cut to `data.train_subset` rows when set, with prompts
        rendered by the tokenizer's chat template for rows that carry `messages`."""
        rows = self.task.train()
        k = self.recipe.data.train_subset
        if k is not None:
            if k > len(rows):
                raise ValueError(f"data.train_subset={k} but the train split has {len(rows)} rows")
            rows = rows[:k]
        return [self.render(r) for r in rows]

    def render(self, row: dict[str, Any]) -> dict[str, Any]:
        msgs = row.get("messages")
        if not msgs or not getattr(self.tokenizer, "chat_template", None):
            return row
        prompt = self.tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True
        )
        return {**row, "prompt": prompt}

    def test_rows(self) -> list[dict[str, Any]]:
        rows = [self.render(r) for r in self.task.test()]
        n = self.recipe.eval.n
        return rows[:n] if n else rows

    def evaluate(self, *, with_pass_k: bool = True) -> EvalResult:
        e = self.recipe.eval
        return evaluate(
            self.model,
            self.tokenizer,
            self.test_rows(),
            self.task.verify,
            max_new_tokens=e.max_new_tokens or self.recipe.sampling.max_new_tokens,
            k=e.k if with_pass_k else 0,
            samples=e.samples,
            temperature=e.temperature,
            batch_size=e.batch_size,
            seed=self.recipe.seed,
            stop_strings=self.recipe.sampling.stop_strings,
            autocast_dtype=self.autocast_dtype,
        )

    def maybe_evaluate(self, metrics: dict[str, Any]) -> None:
        every = self.recipe.eval.every
        if every and self.step % every == 0 and self.step < self.recipe.train.steps:
            metrics.update(self.evaluate(with_pass_k=False).metrics())

    # -- the loop ---------------------------------------------------------------------------
    def train_step(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """One optimiser step; returns its metrics and rows for samples.jsonl."""
        raise NotImplementedError

    def progress_info(self, metrics: dict[str, Any]) -> str:
        return f"loss {metrics.get('loss', float('nan')):.4f}"

    def train(self) -> dict[str, Any]:
        """Step until `train.steps`, with logging, samples, evaluation and checkpoints; then
        the final evaluation and `final/`."""
        t, lg = self.recipe.train, self.recipe.logging
        metrics: dict[str, Any] = {}
        name = (
            self.recipe.rl.algorithm if self.recipe.trainer == "online_rl" else self.recipe.trainer
        )
        with self.progress() as bar:
            task = bar.add_task(name, total=t.steps, completed=self.step, info="")
            while self.step < t.steps:
                metrics, samples = self.train_step()
                self.step += 1
                self.maybe_evaluate(metrics)
                if samples and lg.samples_every and self.step % lg.samples_every == 0:
                    self.run.log_samples(self.step, samples[: lg.samples_n])
                if self.step % lg.every == 0 and self.step < t.steps:
                    metrics["time/elapsed_s"] = self.elapsed()
                    self.run.log_metrics(self.step, metrics)
                info = self.progress_info(metrics)
                if "eval/accuracy" in metrics:
                    info += f"  acc {metrics['eval/accuracy']:.3f}"
                bar.update(task, completed=self.step, info=info)
                self.maybe_checkpoint()
        return self.finish(metrics)

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Final evaluation, `final/` and the last metrics row."""
        result = self.evaluate()
        metrics.update(result.metrics())
        metrics["time/elapsed_s"] = self.elapsed()
        self.run.log_metrics(self.step, metrics)
        self.save_final()
        self.run.close()
        return {
            "accuracy": result.accuracy,
            **{f"pass_at_{k}": v for k, v in result.pass_at_k.items()},
            "seconds": self.elapsed(),
            "model": str(self.run.final),
            "steps": self.step,
        }
