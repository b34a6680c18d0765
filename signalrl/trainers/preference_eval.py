"""Held-out and training-set preference metrics of the preference trainer (see
`signalrl/trainers/preference.py`): `eval/` on the held-out rows during and after training,
`train_eval/` at the end over the training rows, and the sampled KL to the reference.

`train_eval/` scores at most `eval.train_pairs` training rows (default 512; a sample seeded
by the recipe's seed when there are more, all of them when there are fewer; 0: none), so the
final pass stays short next to the training itself; `train_eval/pairs` logs how many were
scored."""

from __future__ import annotations

import random
from typing import Any

import torch

from signalrl.data.collate import build_batch
from signalrl.data.preference import PreferenceData
from signalrl.losses.kl import kl_estimate
from signalrl.losses.preference import preference_metrics
from signalrl.rollout.sampler import SamplingParams, generate
from signalrl.trainers.base import TrainerBase


class PreferenceEvalMixin(TrainerBase):
    """Evaluation for `PreferenceTrainer` (which supplies the data, reference and losses)."""

    kto: bool
    uses_ref: bool
    ref_cache: dict[str, Any] | None
    online: bool
    train_data: PreferenceData
    test_data: PreferenceData | None

    @staticmethod
    def _kto_metrics(
        rewards: torch.Tensor, logps: torch.Tensor, desirable: torch.Tensor
    ) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, sel in (("chosen", desirable), ("rejected", ~desirable)):
            if sel.any():
                out[f"rewards/{name}"] = rewards[sel].mean().item()
                out[f"logps/{name}"] = logps[sel].mean().item()
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out

    # -- evaluation -----------------------------------------------------------------------
    def train_eval_rows(self) -> list[int]:
        """The training rows `train_eval/` scores: all of them up to `eval.train_pairs`, else a
        sorted sample of that many seeded by the recipe's seed (0: none)."""
        n, k = len(self.train_data), self.recipe.eval.train_pairs
        if n <= k:
            return list(range(n))
        return sorted(random.Random(self.recipe.seed).sample(range(n), k))

    @torch.no_grad()
    def preference_eval(
        self, split: str = "test", rows: list[int] | None = None
    ) -> dict[str, float]:
        """Preference metrics over rows `rows` (default: every row) of `split` ("test": the
        held-out rows, prefix `eval/`; "train": training rows, prefix `train_eval/`, no
        sampled KL)."""
        data = self.test_data if split == "test" else self.train_data
        if data is None:
            return {}
        idx = list(range(len(data))) if rows is None else rows
        if not idx:
            return {}
        was_training = self.model.training
        self.model.eval()
        size = self.recipe.train.micro_batch_size or self.recipe.train.batch_size
        chunks = [idx[s : s + size] for s in range(0, len(idx), size)]
        out: dict[str, float] = {}
        if self.kto:
            kl = self._kl_ref(split, data, idx)
            parts = [self._kto_losses(split, data, mb, kl) for mb in chunks]
            losses = torch.cat([p[0] for p in parts])
            metrics = self._kto_metrics(*[torch.cat([p[i] for p in parts]) for i in (1, 2, 3)])
            metrics["loss"] = losses.mean().item()
            metrics["kl"] = float(kl)
        else:
            parts, ratio_sum, ratio_tokens = [], 0.0, 0.0
            for mb in chunks:
                batch = self._rows_batch(data, mb, "pair")
                pol = self.seq_logps(self.model, batch)
                ref = self._pair_ref(split, data, mb)
                parts.append(self._pair_losses(pol, ref, batch.completion_mask))
                if ref is not None:
                    b = len(mb)
                    ratio_sum += float(pol[:b].sum() - ref[:b].sum())
                    ratio_tokens += float(batch.completion_mask[:b].sum())
            losses = torch.cat([p[0] for p in parts])
            metrics = preference_metrics(*[torch.cat([p[i] for p in parts]) for i in (1, 2, 3, 4)])
            metrics["loss"] = losses.mean().item()
            if ratio_tokens:
                metrics["logratio_chosen"] = ratio_sum / ratio_tokens
            if split == "test" and self.uses_ref and self.ref_cache is None:
                metrics["kl_ref"] = self._sampled_kl(data)
        prefix = "eval/" if split == "test" else "train_eval/"
        out = {f"{prefix}{k}": v for k, v in metrics.items()}
        self.model.train(was_training)
        return out

    def _sampled_kl(self, data: PreferenceData) -> float:
        """k3 estimate of per-token KL(policy || ref) on completions sampled from the policy
        (temperature 1) for the held-out prompts."""
        params = SamplingParams(max_new_tokens=self.recipe.sampling.max_new_tokens)
        gen = torch.Generator(device=self.device).manual_seed(self.recipe.seed)
        roll = generate(
            self.model,
            self.tokenizer,
            data.prompt_ids,
            params,
            generator=gen,
            autocast_dtype=self.autocast_dtype,
        )
        batch = build_batch(
            roll.prompt_ids,
            roll.completion_ids,
            self.tokenizer.pad_token_id,
            completion_mask=roll.completion_mask,
            device=self.device,
        )
        pol = self.seq_logps(self.model, batch)
        ref = self._ref_logps(batch)
        mask = batch.completion_mask
        k3 = kl_estimate(pol, ref, "k3") * mask
        return float(k3.sum() / mask.sum().clamp(min=1.0))

    def maybe_evaluate(self, metrics: dict[str, Any]) -> None:
        every = self.recipe.eval.every
        if every and self.step % every == 0 and self.step < self.recipe.train.steps:
            metrics.update(self.preference_eval())
        super().maybe_evaluate(metrics)

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        metrics.update(self.preference_eval())
        if not self.online:
            rows = self.train_eval_rows()
            metrics.update(self.preference_eval("train", rows))
            metrics["train_eval/pairs"] = float(len(rows))
        summary = super().finish(metrics)
        summary.update({k: v for k, v in metrics.items() if k.startswith(("eval/", "train_eval/"))})
        return summary
