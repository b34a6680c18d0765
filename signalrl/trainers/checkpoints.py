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

from signalrl import distributed
from signalrl.logging.run import plan_run
from signalrl.models import save_model
from signalrl.trainers.state import (
    STATE_FILE,
    STEP_DIR,
    DataCursor,
    latest_checkpoint,
    resume_differences,
)


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

    def plan_run(self, resume: bool, overwrite: bool) -> Any:
        """What opening the run directory will do (`signalrl.logging.run.plan_run`); a
        resume whose recipe changed is refused."""
        d = self.recipe.run_dir
        plan = plan_run(
            d,
            resume=resume,
            overwrite=overwrite,
            checkpoint=latest_checkpoint(d) if resume else None,
        )
        if plan.mode == "resume":
            self.check_resume_recipe()
        return plan

    def check_resume_recipe(self) -> None:
        """Refuse a resume whose recipe differs from the run's saved one in anything but
        `RESUME_MAY_CHANGE` (a changed lr or algorithm would silently mix two runs)."""
        saved = self.recipe.run_dir / "config.yaml"
        if not saved.is_file():
            return
        diff = resume_differences(saved, self.recipe)
        if diff:
            raise ValueError(
                f"--resume: the recipe differs from the run's ({saved}) in:\n  "
                + "\n  ".join(diff)
                + "\nonly train.steps and the logging, eval and checkpoint sections may change "
                "on resume; use another name (or --overwrite) for a different run"
            )

    # -- checkpoints ----------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            # keyed by parameter name and unsharded: resumes under any strategy / world size
            "optimizer": distributed.optimizer_state(self.model, self.optimizer),
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

    def export_model(self, out: Path, extra_files: dict[str, bytes] | None = None) -> Path:
        """Write the policy as an HF directory (`save_model`): under FSDP2 its full state is
        gathered first (every rank takes part), and rank 0 alone writes."""
        sharded = distributed.is_sharded(self.model)
        state = distributed.full_state_dict(self.model) if sharded else None
        if distributed.current().is_main:
            save_model(self.model, self.tokenizer, out, extra_files, state_dict=state)
        distributed.barrier()
        return out

    def save_checkpoint(self) -> Path:
        state = self.trainer_state()  # collective under FSDP2 (the optimiser state)
        buf = io.BytesIO()
        if distributed.current().is_main:
            torch.save(state, buf)
        path = self.export_model(
            self.run.checkpoints / f"step-{self.step}", extra_files={STATE_FILE: buf.getvalue()}
        )
        if distributed.current().is_main:
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
        opt = state["optimizer"]
        if all(isinstance(k, int) for k in opt.get("state", {})):  # older: keyed by index
            self.optimizer.load_state_dict(opt)
        else:
            distributed.load_optimizer_state(self.model, self.optimizer, opt)
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.step = int(state["step"])
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.load_extra_state(state.get("extra", {}))
        self.console.print(f"resumed from {self.resume_from} at step {self.step}")

    def save_final(self) -> Path:
        """`final/`: the HF model, or for a LoRA policy the adapter (`PeftModel.from_pretrained(
        base, final)`) and, with `lora.merge`, the merged plain HF model in `final/merged/`."""
        from signalrl.models.lora import is_peft, merged_copy

        if not (is_peft(self.model) and self.recipe.lora.merge):
            return self.export_model(self.run.final)
        sharded = distributed.is_sharded(self.model)
        state = distributed.full_state_dict(self.model) if sharded else None
        out = self.run.final
        if distributed.current().is_main:
            save_model(self.model, self.tokenizer, out, state_dict=state)
            if state is None:
                merged = merged_copy(self.model)
            else:  # a sharded model cannot be copied: a fresh LoRA policy takes the full state
                merged, _ = self.load_policy(self.recipe.model.name_or_path)  # type: ignore[attr-defined]
                merged.load_state_dict(state)
                merged = merged.merge_and_unload()
            save_model(merged, self.tokenizer, out / "merged")
        distributed.barrier()
        return out

    def maybe_checkpoint(self) -> None:
        every = self.recipe.checkpoint.every
        if every and self.step % every == 0 and self.step < self.recipe.train.steps:
            self.save_checkpoint()
