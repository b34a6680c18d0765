"""Checkpoints and resume for `TrainerBase` (see docs/architecture.md, "The life of one
training step"): `checkpoints/step-N/` holds the HF model and tokenizer and
`trainer_state.pt` (step, optimiser, schedule, RNG states, elapsed time, and the trainer's
`extra_state()`: budget counters, data order, and what a trainer adds), written atomically."""

from __future__ import annotations

import io
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from signalrl.models import save_model
from signalrl.trainers.state import STATE_FILE, STEP_DIR, DataCursor


class CheckpointMixin:
    """Saving and restoring a trainer's state (mixed into `TrainerBase`)."""

    step: int
    recipe: Any
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    budget: Any
    run: Any
    console: Any
    resume_from: Path | None
    elapsed_before: float

    def elapsed(self) -> float:
        raise NotImplementedError

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
        """What a checkpoint needs beyond model, optimiser and schedule (subclasses extend):
        the budget counters and the data order of `self.data` (a DataCursor) if any."""
        data = getattr(self, "data", None)
        state = self.budget.state()
        if isinstance(data, DataCursor):
            state["data"] = data.state()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.budget.load(state)
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
        steps = sorted((int(m.group(1)), p) for p in ck.iterdir() if (m := STEP_DIR.match(p.name)))
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
        self.console.print(f"resumed from {self.resume_from} at step {self.step}")

    def save_final(self) -> Path:
        return save_model(self.model, self.tokenizer, self.run.final)

    def maybe_checkpoint(self) -> None:
        every = self.recipe.checkpoint.every
        if every and self.step % every == 0 and self.step < self.recipe.train.steps:
            self.save_checkpoint()
