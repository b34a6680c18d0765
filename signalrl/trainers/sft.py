"""Supervised fine-tuning and plain language-model pretraining.

Data: the task's train split as (prompt, completion) rows (default), or a user data file
(`data.path`): rows `{text}` with the loss on every token (pretraining), `{prompt,
completion}` or chat `{messages}` (loss on the assistant turns); see `signalrl.data.sft`.
With a data file, `data.test_path` or a `data.test_fraction` of the rows is held out and its
loss is logged as `eval/loss` at every evaluation; the task's test split is still what
`eval/accuracy` measures (so a pretraining run reports how its model does on the task).

Per optimiser step, `train.batch_size` rows are split into micro-batches; the loss is the mean
negative log-likelihood over all trained tokens of the step (EOS included), so gradient
accumulation gives the same gradient as one big batch.
"""

from __future__ import annotations

from typing import Any

import torch

from signalrl.config import SFTRecipe
from signalrl.data.collate import SequenceBatch, build_batch, tokenize_sft
from signalrl.data.sft import SFTExamples, load_sft_data, split_examples, tokenize_rows
from signalrl.trainers.base import DataCursor, MicroLoss, StepResult, TrainerBase


class SFTTrainer(TrainerBase):
    recipe: SFTRecipe

    def __init__(self, recipe: SFTRecipe, **kw: Any) -> None:
        super().__init__(recipe, **kw)
        self.test_data: SFTExamples | None = None
        if recipe.data.path:
            self.train_data, self.test_data = self._load_file()
        else:
            rows = self.train_rows()
            source = f"task {self.task.name} (train)"
            if rows and all("sft_messages" in r for r in rows):
                self.train_data = self._conversations(rows, source)
                self.data = DataCursor(len(self.train_data), recipe.seed)
                self.finish_setup()
                return
            p_ids, c_ids = tokenize_sft(
                self.tokenizer,
                [r["prompt"] for r in rows],
                [r["completion"] for r in rows],
                source=source,
                messages=[r.get("messages") for r in rows],  # chat rows end with the turn end
            )
            masks = [[1.0] * len(c) for c in c_ids]
            self.train_data = SFTExamples(p_ids, c_ids, masks, "prompt_completion", source)
        self.data = DataCursor(len(self.train_data), recipe.seed)
        self.finish_setup()

    def _conversations(self, rows: list[dict[str, Any]], source: str) -> SFTExamples:
        """A task's whole demonstrations (`sft_messages`: e.g. a tool call, the tool's result,
        the answer) as `messages` rows: the loss covers every assistant turn and none of the
        environment's (tool) turns, as in RL, where those are observation tokens."""
        pairs = [(f"{source} row {i}", {"messages": r["sft_messages"]}) for i, r in enumerate(rows)]
        return tokenize_rows(self.tokenizer, pairs, "messages", source=source)

    def _load_file(self) -> tuple[SFTExamples, SFTExamples | None]:
        d = self.recipe.data
        assert d.path is not None
        max_length = d.max_length or getattr(self.model.config, "max_position_embeddings", None)

        def load(path: str) -> SFTExamples:
            return load_sft_data(
                path, self.tokenizer, kind=d.kind, file_format=d.format, max_length=max_length
            )

        data = load(d.path)
        if d.test_path:
            train, test = data, load(d.test_path)
        else:
            train, test = split_examples(data, d.test_fraction, self.recipe.seed)
        if d.train_subset is not None:
            if d.train_subset > len(train):
                raise ValueError(
                    f"data.train_subset={d.train_subset} but {d.path} has {len(train)} train rows"
                )
            train = train.subset(range(d.train_subset))
        self.console.print(
            f"data: {d.path} ({train.kind} rows): {len(train)} train rows, "
            f"{train.loss_tokens} trained tokens; {len(test) if test else 0} held out"
        )
        return train, test

    def _batch(self, data: SFTExamples, idx: list[int]) -> SequenceBatch:
        return build_batch(
            [data.prompt_ids[i] for i in idx],
            [data.completion_ids[i] for i in idx],
            self.tokenizer.pad_token_id,
            device=self.device,
            masks=[data.completion_masks[i] for i in idx],
        )

    @staticmethod
    def _nll(logps: torch.Tensor, mb: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean NLL over the trained tokens of `mb`, and their (weighted) count."""
        n = mb.completion_mask.sum()
        return -(logps * mb.completion_mask).sum() / n.clamp(min=1e-12), n

    # -- the step ---------------------------------------------------------------------------
    def next_batch(self) -> tuple[SequenceBatch, dict[str, float]]:
        batch = self._batch(self.train_data, self.data.take(self.recipe.train.batch_size))
        return batch, {"epoch": float(self.data.epoch)}

    def micro_batches(self, batch: SequenceBatch) -> tuple[list[slice], float]:
        return self.micro_slices(len(batch)), float(batch.completion_mask.sum())

    def micro_loss(self, batch: SequenceBatch, chunk: slice, epoch: int) -> MicroLoss:
        mb = batch.select(chunk)
        self.budget.forward_tokens += int(mb.attention_mask.sum())
        logps = self.seq_logps(self.model, mb)
        loss, n = self._nll(logps, mb)
        return MicroLoss(loss, float(n))

    def step_metrics(self, batch: SequenceBatch, result: StepResult) -> dict[str, float]:
        return {**result.metrics(), "tokens": float(batch.completion_mask.sum())}

    @torch.no_grad()
    def held_out_loss(self) -> float | None:
        """Token-weighted mean NLL on the held-out rows of the data file (None without)."""
        if self.test_data is None:
            return None
        with self.gathered():  # every rank computes it (the same value)
            return self._held_out_loss(self.test_data)

    def _held_out_loss(self, test_data: SFTExamples) -> float:
        self.model.eval()
        size = self.recipe.eval.batch_size
        nll = tokens = 0.0
        for start in range(0, len(test_data), size):
            batch = self._batch(test_data, list(range(start, min(start + size, len(test_data)))))
            for s in self.micro_slices(len(batch), share=False):
                mb = batch.select(s)
                loss, n = self._nll(self.seq_logps(self.model, mb), mb)
                nll += float(loss) * float(n)
                tokens += float(n)
        return nll / max(tokens, 1.0)

    def maybe_evaluate(self, metrics: dict[str, Any]) -> None:
        every = self.recipe.eval.every
        if every and self.step % every == 0 and self.step < self.recipe.train.steps:
            loss = self.held_out_loss()
            if loss is not None:
                metrics["eval/loss"] = loss
        super().maybe_evaluate(metrics)

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        loss = self.held_out_loss()
        if loss is not None:
            metrics["eval/loss"] = loss
        result = super().finish(metrics)
        if loss is not None:
            result["eval_loss"] = loss
        return result
