"""Supervised fine-tuning with a completion-only loss.

Per optimiser step, `train.batch_size` (prompt, completion) rows are split into micro-batches;
the loss is the mean negative log-likelihood over all completion tokens of the step (EOS
included), so gradient accumulation gives the same gradient as one big batch.
"""

from __future__ import annotations

import random
from typing import Any

from signalrl.config import Recipe
from signalrl.data.collate import build_batch, tokenize_sft
from signalrl.models.logprobs import completion_logps
from signalrl.trainers.base import TrainerBase


class SFTTrainer(TrainerBase):
    def __init__(self, recipe: Recipe, **kw: Any) -> None:
        super().__init__(recipe, **kw)
        rows = self.task.train()
        prompts = [r["prompt"] for r in rows]
        completions = [r["completion"] for r in rows]
        self.prompt_ids, self.completion_ids = tokenize_sft(
            self.tokenizer, prompts, completions, source=f"task {self.task.name} (train)"
        )
        self.order: list[int] = []
        self.cursor = 0
        self.epoch = 0
        self.build_optimizer()
        self.maybe_resume()

    def extra_state(self) -> dict[str, Any]:
        return {"order": self.order, "cursor": self.cursor, "epoch": self.epoch}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.order = list(state.get("order", []))
        self.cursor = int(state.get("cursor", 0))
        self.epoch = int(state.get("epoch", 0))

    def next_indices(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self.cursor >= len(self.order):
                self.order = list(range(len(self.prompt_ids)))
                random.Random(self.recipe.seed + self.epoch).shuffle(self.order)
                self.epoch += 1
                self.cursor = 0
            take = min(n - len(out), len(self.order) - self.cursor)
            out.extend(self.order[self.cursor : self.cursor + take])
            self.cursor += take
        return out

    def train_step(self) -> dict[str, float]:
        t = self.recipe.train
        idx = self.next_indices(t.batch_size)
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
            logps, _ = completion_logps(self.model, mb, autocast_dtype=self.autocast_dtype)
            loss = -(logps * mb.completion_mask).sum() / n_tokens
            loss.backward()
            total += float(loss.detach())
        out = self.optimizer_step()
        out.update({"loss": total, "tokens": float(n_tokens), "epoch": float(self.epoch)})
        return out

    def train(self) -> dict[str, Any]:
        t = self.recipe.train
        metrics: dict[str, Any] = {}
        with self.progress() as bar:
            task = bar.add_task("sft", total=t.steps, completed=self.step, info="")
            while self.step < t.steps:
                metrics = self.train_step()
                self.step += 1
                self.maybe_evaluate(metrics)
                if self.step % self.recipe.logging.every == 0 or self.step == t.steps:
                    metrics["time/elapsed_s"] = self.elapsed()
                    if self.step < t.steps:
                        self.run.log_metrics(self.step, metrics)
                info = f"loss {metrics['loss']:.4f}"
                if "eval/accuracy" in metrics:
                    info += f"  acc {metrics['eval/accuracy']:.3f}"
                bar.update(task, completed=self.step, info=info)
                self.maybe_checkpoint()
        return self.finish(metrics)
