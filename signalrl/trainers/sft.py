"""Supervised fine-tuning with a completion-only loss.

Per optimiser step, `train.batch_size` (prompt, completion) rows are split into micro-batches;
the loss is the mean negative log-likelihood over all completion tokens of the step (EOS
included), so gradient accumulation gives the same gradient as one big batch.
"""

from __future__ import annotations

from typing import Any

from signalrl.config import Recipe
from signalrl.data.collate import build_batch, tokenize_sft
from signalrl.models.logprobs import completion_logps
from signalrl.trainers.base import DataCursor, TrainerBase


class SFTTrainer(TrainerBase):
    def __init__(self, recipe: Recipe, **kw: Any) -> None:
        super().__init__(recipe, **kw)
        rows = self.train_rows()
        prompts = [r["prompt"] for r in rows]
        completions = [r["completion"] for r in rows]
        self.prompt_ids, self.completion_ids = tokenize_sft(
            self.tokenizer, prompts, completions, source=f"task {self.task.name} (train)"
        )
        self.data = DataCursor(len(self.prompt_ids), recipe.seed)
        self.build_optimizer()
        self.maybe_resume()

    def train_step(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        t = self.recipe.train
        idx = self.data.take(t.batch_size)
        batch = build_batch(
            [self.prompt_ids[i] for i in idx],
            [self.completion_ids[i] for i in idx],
            self.tokenizer.pad_token_id,
            device=self.device,
        )
        n_tokens = batch.completion_mask.sum()
        micro = t.micro_batch_size or len(batch)
        total = 0.0
        self.model.train()
        for start in range(0, len(batch), micro):
            mb = batch.select(slice(start, start + micro))
            logps = completion_logps(self.model, mb, autocast_dtype=self.autocast_dtype)
            loss = -(logps * mb.completion_mask).sum() / n_tokens
            loss.backward()
            total += float(loss.detach())
        out = self.optimizer_step()
        out.update({"loss": total, "tokens": float(n_tokens), "epoch": float(self.data.epoch)})
        return out, []
