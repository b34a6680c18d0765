"""Online RL for reasoning: sample a group per prompt, score it, turn rewards into advantages,
and take clipped policy-gradient steps. The algorithm is a configuration of pure pieces from
`signalrl.losses` (group advantages, clipped surrogate, aggregation, KL estimator).

One training step:
1. `B` prompts x `G` completions from the sampler (prompt encoded once per group);
2. rewards `(B*G,)` from the task verifier; group-normalised advantages;
3. `mu` updates over the batch with the clipped surrogate, old log-probs stored once
   (with `mu == 1` the ratio is 1 and the loss is the plain policy gradient);
4. optional `beta * KL(pi || pi_ref)` in the loss, against a frozen copy of the start model
   (`beta == 0` keeps no reference model in memory).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch

from signalrl.config import Recipe
from signalrl.data.collate import SequenceBatch, build_batch
from signalrl.losses.advantages import group_advantages
from signalrl.losses.kl import kl_estimate
from signalrl.losses.policy import aggregate, policy_loss
from signalrl.models import count_parameters
from signalrl.models.logprobs import completion_logps
from signalrl.rollout.sampler import Rollout, SamplingParams, generate
from signalrl.trainers.base import DataCursor, TrainerBase


class OnlineRLTrainer(TrainerBase):
    def __init__(self, recipe: Recipe, **kw: Any) -> None:
        super().__init__(recipe, **kw)
        self.rows = self.task.train()
        rl = recipe.rl
        self.ref_model = None
        if rl.beta > 0:
            self.ref_model = copy.deepcopy(self.model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        s = recipe.sampling
        self.sampling = SamplingParams(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            n=rl.group_size,
            stop_strings=tuple(s.stop_strings),
        )
        self.generator = torch.Generator(device=self.device).manual_seed(recipe.seed)
        self.data = DataCursor(len(self.rows), recipe.seed)
        self.build_optimizer()
        self.maybe_resume()
        held = [self.model] + ([self.ref_model] if self.ref_model is not None else [])
        self.models_held = {
            "models/held": float(len(held)),
            "models/params_held": float(sum(count_parameters(m) for m in held)),
        }

    # -- state ----------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"data": self.data.state(), "generator": self.generator.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.data.load(state.get("data", {}))
        if "generator" in state:
            self.generator.set_state(state["generator"])

    # -- one step ---------------------------------------------------------------------------
    def score(self, rows: list[dict[str, Any]], rollout: Rollout) -> torch.Tensor:
        g = rollout.group_size
        rewards = []
        for i, text in enumerate(rollout.texts):
            row = rows[i // g]
            r = self.task.verify(row, text)
            if r is None or not math.isfinite(float(r)):
                raise ValueError(
                    f"reward is {r!r} (not a finite number) for prompt {row['prompt']!r} and "
                    f"completion {text!r}"
                )
            rewards.append(float(r))
        return torch.tensor(rewards, dtype=torch.float32, device=self.device)

    def _micro_slices(self, n: int) -> list[slice]:
        micro = self.recipe.train.micro_batch_size or n
        return [slice(i, min(n, i + micro)) for i in range(0, n, micro)]

    def _weights(self, batch: SequenceBatch, slices: list[slice]) -> list[float]:
        """Share of each micro-batch in the full-batch aggregate, so accumulation is exact."""
        mask = batch.completion_mask
        if self.recipe.rl.loss_agg == "token-mean":
            total = float(mask.sum()) or 1.0
            return [float(mask[s].sum()) / total for s in slices]
        nonempty = (mask.sum(-1) > 0).float()
        total = float(nonempty.sum()) or 1.0
        return [float(nonempty[s].sum()) / total for s in slices]

    @torch.no_grad()
    def _logps_no_grad(
        self, model: torch.nn.Module, batch: SequenceBatch, slices: list[slice]
    ) -> torch.Tensor:
        width = batch.completion_ids.shape[1]
        out = torch.zeros(len(batch), width, device=self.device)
        for s in slices:
            lp, _ = completion_logps(
                model,
                batch.select(s),
                temperature=self.sampling.temperature,
                autocast_dtype=self.autocast_dtype,
            )
            out[s, : lp.shape[1]] = lp
        return out

    def train_step(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        rl, t = self.recipe.rl, self.recipe.train
        t0 = time.time()
        rows = [self.rows[i] for i in self.data.take(t.batch_size)]
        rollout = generate(
            self.model,
            self.tokenizer,
            [r["prompt"] for r in rows],
            self.sampling,
            generator=self.generator,
            autocast_dtype=self.autocast_dtype,
        )
        t_rollout = time.time() - t0
        rewards = self.score(rows, rollout)
        adv = group_advantages(rewards, rl.group_size, scale=rl.adv_scale)
        batch = build_batch(
            rollout.prompt_ids,
            rollout.completion_ids,
            self.tokenizer.pad_token_id,
            rollout.completion_mask,
            device=self.device,
        )
        slices = self._micro_slices(len(batch))
        weights = self._weights(batch, slices)
        temp = self.sampling.temperature
        ref_logps = old_logps = None
        if self.ref_model is not None:
            ref_logps = self._logps_no_grad(self.ref_model, batch, slices)
        if rl.mu > 1:  # the policy before this step's updates: the ratio's denominator
            old_logps = self._logps_no_grad(self.model, batch, slices)
        self.model.train()
        sums: dict[str, float] = {}
        ent_sum, kl_sum = 0.0, 0.0
        for epoch in range(rl.mu):
            for s, w in zip(slices, weights, strict=True):
                mb = batch.select(s)
                width = mb.completion_ids.shape[1]
                logps, ent = completion_logps(
                    self.model,
                    mb,
                    temperature=temp,
                    with_entropy=epoch == 0,
                    autocast_dtype=self.autocast_dtype,
                )
                old = old_logps[s, :width] if old_logps is not None else logps.detach()
                loss, pm = policy_loss(
                    logps,
                    old,
                    adv[s],
                    mb.completion_mask,
                    clip_low=rl.clip_low,
                    clip_high=rl.clip_high,
                    agg=rl.loss_agg,
                    max_len=self.sampling.max_new_tokens,
                )
                if ref_logps is not None:
                    kl = kl_estimate(logps, ref_logps[s, :width], kind=rl.kl_estimator)
                    kl_term = aggregate(
                        kl, mb.completion_mask, rl.loss_agg, max_len=self.sampling.max_new_tokens
                    )
                    loss = loss + rl.beta * kl_term
                    if epoch == 0:
                        kl_sum += w * float(kl_term.detach())
                (loss * w).backward()
                if epoch == 0 and ent is not None:
                    ent_sum += float((ent * mb.completion_mask).sum())
                for k, v in pm.items():
                    sums[k] = sums.get(k, 0.0) + w * float(v) / rl.mu
                sums["loss"] = sums.get("loss", 0.0) + w * float(loss.detach()) / rl.mu
            opt = self.optimizer_step(step_scheduler=epoch == rl.mu - 1)
        t_total = time.time() - t0
        n_tok = float(batch.completion_mask.sum())
        groups = rewards.view(-1, rl.group_size)
        metrics: dict[str, float] = {
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "frac_zero_std_groups": float((groups.std(-1) == 0).float().mean()),
            "entropy": ent_sum / max(n_tok, 1.0),
            "completion/mean_length": float(rollout.lengths.mean()),
            "completion/truncated_frac": float(rollout.truncated.float().mean()),
            "loss": sums.pop("loss"),
            "clip_frac/low": sums.get("clip_frac/low", 0.0),
            "clip_frac/high": sums.get("clip_frac/high", 0.0),
            "grad_norm": opt["grad_norm"],
            "lr": opt["lr"],
            "time/rollout_s": t_rollout,
            "time/step_s": t_total,
            "tokens/completion_per_s": n_tok / max(t_total, 1e-9),
            **self.models_held,
        }
        if self.ref_model is not None:
            metrics["kl"] = kl_sum
        for k, v in sums.items():
            metrics.setdefault(k, v)
        samples = [
            {
                "prompt": rows[i // rl.group_size]["prompt"],
                "completion": rollout.texts[i],
                "answer": rows[i // rl.group_size].get("answer"),
                "reward": float(rewards[i]),
                "advantage": float(adv[i]),
            }
            for i in range(len(rollout.texts))
        ]
        return metrics, samples

    def progress_info(self, metrics: dict[str, Any]) -> str:
        return f"reward {metrics['reward/mean']:.3f}"
