"""Online RL: sample a group per prompt, score it, turn rewards into advantages, and take
clipped policy-gradient steps. Every algorithm (GRPO, Dr. GRPO, DAPO, GSPO, RLOO,
REINFORCE++, PPO) is a configuration of pure pieces from `signalrl.losses`; the presets live
in `signalrl.config.ALGORITHM_PRESETS` and every piece stays overridable in the recipe.

One training step:
1. `B` prompts x `G` completions from the sampler (each prompt encoded once per group); with
   dynamic sampling (DAPO) groups whose rewards are all equal are dropped and more prompts are
   sampled, up to `max_sampling_rounds`;
2. rewards from the recipe's reward terms (default: the task verifier), plus DAPO's soft
   overlong penalty when `overlong_cache` is set;
3. advantages: group-normalised (GRPO family), leave-one-out (RLOO), global-normalised
   token returns (REINFORCE++) or GAE from a critic (PPO); a KL to the frozen reference goes in
   the loss (`kl_placement: loss`) or in the per-token reward (`reward`), or nowhere (`off`);
4. `mu` updates over the batch with the clipped surrogate (old log-probs stored once; with
   `mu == 1` the ratio is 1 and the loss is the plain policy gradient), and for PPO the
   clipped value loss on the critic.

Every step logs two cumulative budget counters (`account`): `student/forward_tokens` (see
`count_forward_tokens`) and `time/train_s`, the seconds spent in training steps (sampling,
scoring, forward, backward, update; evaluation, checkpoints and model loading excluded).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from signalrl.config import Recipe
from signalrl.data.collate import SequenceBatch, build_batch
from signalrl.logging.memory import peak_memory_mb
from signalrl.losses.advantages import (
    gae,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    token_level_rewards,
    whiten,
)
from signalrl.losses.kl import kl_estimate
from signalrl.losses.policy import aggregate, explained_variance, policy_loss, value_loss
from signalrl.models import count_parameters
from signalrl.models.logprobs import shared_prefix_logps
from signalrl.models.value_head import ValueModel
from signalrl.rewards.length import overlong_penalty
from signalrl.rewards.model import RewardModelScorer
from signalrl.rewards.registry import RewardComposer
from signalrl.rollout.sampler import generate
from signalrl.trainers.base import DataCursor, TrainerBase


def count_forward_tokens(prompt_ids: list[list[int]], completion_tokens: int) -> int:
    """Student forward tokens of one forward pass (or one generation): the non-padding tokens
    of the distinct prompts it encodes plus `completion_tokens`.

    `student/forward_tokens` is the sum of this over every pass of the student (the policy
    being trained) in a step, with or without gradient: in generation each distinct prompt
    once (its KV cache is shared by the group) plus every sampled token (the last one of a
    completion is counted although it is never fed back, so sampling and scoring count the
    same sequence); in a training forward (and a `mu > 1` old-log-prob pass) the prompts it
    encodes (once per distinct prompt with prefix sharing, once per row otherwise) plus the
    completion tokens. Teacher, reference, critic, reward-model and evaluation passes are not
    counted. Padding is not counted."""
    return sum(len(p) for p in prompt_ids) + int(completion_tokens)


class OnlineRLTrainer(TrainerBase):
    def __init__(self, recipe: Recipe, **kw: Any) -> None:
        super().__init__(recipe, **kw)
        rl = recipe.rl
        self.rows = self.train_rows()
        self.rewards = RewardComposer(
            recipe.rewards, self.task, recipe.reward_on_error, device=self.device
        )
        self.ref_model = None
        if rl.uses_reference:
            self.ref_model = copy.deepcopy(self.model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        self.critic: ValueModel | None = None
        if rl.advantage == "gae":
            self.critic = (
                ValueModel.from_pretrained(rl.critic_path, self.device)
                if rl.critic_path
                else ValueModel.from_policy(self.model)
            )
            self.critic_optimizer = torch.optim.AdamW(
                self.critic.parameters(),
                lr=rl.critic_lr or recipe.train.lr,
                betas=recipe.train.betas,
                eps=recipe.train.adam_eps,
            )
        s = recipe.sampling
        self.sampling = self.sampling_params(rl.group_size)
        self.overlong_cache = (
            max(1, s.max_new_tokens // 5) if rl.overlong_cache == "auto" else rl.overlong_cache
        )
        if self.overlong_cache is not None and not 0 <= self.overlong_cache <= s.max_new_tokens:
            raise ValueError(
                f"rl.overlong_cache ({rl.overlong_cache}) exceeds "
                f"sampling.max_new_tokens ({s.max_new_tokens})"
            )
        self.generator = torch.Generator(device=self.device).manual_seed(recipe.seed)
        self.data = DataCursor(len(self.rows), recipe.seed)
        self.forward_tokens = 0  # cumulative, see `count_forward_tokens`
        self.train_seconds = 0.0  # cumulative seconds in train_step
        self.build_optimizer()
        self.maybe_resume()
        self.models_held = self._models_held()

    def _models_held(self) -> dict[str, float]:
        held: list[torch.nn.Module] = [self.model]
        names = ["policy"]
        if self.ref_model is not None:
            held.append(self.ref_model)
            names.append("reference")
        if self.critic is not None:
            held.append(self.critic)
            names.append("critic")
        for term in self.rewards.terms:
            scorer = getattr(term, "scorer", None)
            if isinstance(scorer, RewardModelScorer):
                held.append(scorer.model)
                names.append("reward_model")
        self.console.print(f"models held: {', '.join(names)}")
        return {
            "models/held": float(len(held)),
            "models/params_held": float(sum(count_parameters(m) for m in held)),
        }

    # -- state ----------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        state = {
            **super().extra_state(),
            "generator": self.generator.get_state(),
            "forward_tokens": self.forward_tokens,
            "train_seconds": self.train_seconds,
        }
        if self.critic is not None:
            state["critic"] = self.critic.state_dict()
            state["critic_optimizer"] = self.critic_optimizer.state_dict()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self.forward_tokens = int(state.get("forward_tokens", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if self.critic is not None and "critic" in state:
            self.critic.load_state_dict(state["critic"])
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])

    # -- rollouts -----------------------------------------------------------------------------
    def _sample_round(self, n_prompts: int) -> dict[str, Any]:
        rows = [self.rows[i] for i in self.data.take(n_prompts)]
        g = self.sampling.n
        r = generate(
            self.model,
            self.tokenizer,
            [x["prompt"] for x in rows],
            self.sampling,
            generator=self.generator,
            autocast_dtype=self.autocast_dtype,
        )
        lengths = [int(x) for x in r.lengths.tolist()]
        self.forward_tokens += count_forward_tokens(r.prompt_ids[::g], sum(lengths))
        row_of = [rows[i // g] for i in range(len(r))]
        scored = self.rewards([x["prompt"] for x in row_of], r.texts, row_of, lengths)
        total = torch.tensor(scored.total, dtype=torch.float32, device=self.device)
        overlong = torch.zeros_like(total)
        cache = self.overlong_cache
        if cache:
            factor = self.recipe.rl.overlong_factor
            overlong = torch.tensor(
                [
                    factor * overlong_penalty(n, self.sampling.max_new_tokens, cache)
                    for n in lengths
                ],
                device=self.device,
            )
        return {
            "rows": row_of,
            "prompt_ids": r.prompt_ids,
            "completions": [r.completion_ids[i, : lengths[i]].tolist() for i in range(len(r))],
            "sampler_logps": [r.logps[i, : lengths[i]] for i in range(len(r))],
            "entropy": [r.entropy[i, : lengths[i]] for i in range(len(r))],
            "texts": r.texts,
            "truncated": r.truncated.tolist(),
            "rewards": total + overlong,
            "components": {k: torch.tensor(v) for k, v in scored.components.items()},
            "overlong": overlong,
            "errors": scored.errors,
        }

    def collect(self) -> tuple[dict[str, Any], dict[str, float]]:
        """B groups of G samples; with dynamic sampling only groups with reward variance."""
        rl, b, g = self.recipe.rl, self.recipe.train.batch_size, self.sampling.n
        if not rl.dynamic_sampling:
            return self._sample_round(b), {"batch/groups": float(b)}
        kept: list[dict[str, Any]] = []
        n_groups = n_seen = rounds = 0
        while n_groups < b and rounds < rl.max_sampling_rounds:
            rounds += 1
            part = self._sample_round(b - n_groups if rounds > 1 else b)
            std = part["rewards"].view(-1, g).std(-1) if g > 1 else torch.zeros(1)
            keep_groups = (std > 0).nonzero().flatten().tolist()
            n_seen += len(std)
            if keep_groups:
                idx = [gi * g + j for gi in keep_groups for j in range(g)]
                kept.append(_select(part, idx))
                n_groups += len(keep_groups)
        stats = {
            "batch/groups": float(n_groups),
            "dynamic_sampling/rounds": float(rounds),
            "dynamic_sampling/kept_frac": n_groups / max(n_seen, 1),
        }
        if not kept:  # every group had equal rewards: nothing to learn from this step
            return {}, stats
        return _concat(kept), stats

    # -- one step ---------------------------------------------------------------------------
    def _micro_slices(self, n: int) -> list[slice]:
        micro = self.recipe.train.micro_batch_size or n
        return [slice(i, min(n, i + micro)) for i in range(0, n, micro)]

    def _weights(self, mask: torch.Tensor, slices: list[torch.Tensor]) -> list[float]:
        """Share of each micro-batch (row indices) in the full-batch aggregate, so that
        accumulation over micro-batches gives the full batch's gradient."""
        if self.recipe.rl.loss_agg == "token-mean":
            total = float(mask.sum()) or 1.0
            return [float(mask[s].sum()) / total for s in slices]
        nonempty = (mask.sum(-1) > 0).float()
        total = float(nonempty.sum()) or 1.0
        return [float(nonempty[s].sum()) / total for s in slices]

    def _grouped_logps(
        self,
        model: torch.nn.Module,
        batch: SequenceBatch,
        prompt_ids: list[list[int]],
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """Log-probs `(len(rows), width)` of the completions of `rows`, each distinct prompt
        run once (rows of one prompt are contiguous groups of `group_size`)."""
        g = self.sampling.n
        groups, row_prompt = torch.unique(rows // g, return_inverse=True)
        cmask = batch.completion_mask[rows]
        width = max(int(cmask.sum(-1).max().item()), 1)
        if model is self.model:
            self.forward_tokens += count_forward_tokens(
                [prompt_ids[int(k) * g] for k in groups], int(cmask.sum())
            )
        return shared_prefix_logps(
            model,
            [prompt_ids[int(k) * g] for k in groups],
            row_prompt.to(self.device),
            batch.completion_ids[rows, :width],
            cmask[:, :width],
            self.tokenizer.pad_token_id,
            temperature=self.sampling.temperature,
            autocast_dtype=self.autocast_dtype,
        )

    @torch.no_grad()
    def _logps_no_grad(
        self,
        model: torch.nn.Module,
        batch: SequenceBatch,
        prompt_ids: list[list[int]],
        slices: list[slice],
    ) -> torch.Tensor:
        out = torch.zeros(batch.completion_ids.shape, device=self.device)
        every = torch.arange(len(batch), device=self.device)
        for s in slices:
            lp = self._grouped_logps(model, batch, prompt_ids, every[s])
            out[s, : lp.shape[1]] = lp
        return out

    @torch.no_grad()
    def _values_no_grad(self, batch: SequenceBatch, slices: list[slice]) -> torch.Tensor:
        assert self.critic is not None
        out = torch.zeros(batch.completion_ids.shape, device=self.device)
        for s in slices:
            v = self.critic(batch.select(s), self.autocast_dtype)
            out[s, : v.shape[1]] = v
        return out

    def advantages(
        self,
        rewards: torch.Tensor,
        batch: SequenceBatch,
        behaviour: torch.Tensor,
        ref_logps: torch.Tensor | None,
        slices: list[slice],
        prompt_ids: list[list[int]],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(N,) or (N, T) advantages; extras holds values/returns for PPO and the KL.
        `prompt_ids` are the rows' prompts, for subclasses that score with another model."""
        rl = self.recipe.rl
        mask = batch.completion_mask
        extras: dict[str, torch.Tensor] = {}
        kl = None
        if ref_logps is not None and rl.kl_placement == "reward":
            kl = kl_estimate(behaviour, ref_logps, kind=rl.kl_estimator) * mask
            extras["kl"] = kl
        if rl.advantage == "group":
            return group_advantages(rewards, rl.group_size, scale=rl.adv_scale), extras
        if rl.advantage == "rloo":
            r = rewards - rl.beta * kl.sum(-1) if kl is not None else rewards
            return rloo_advantages(r, rl.group_size), extras
        token_rewards = token_level_rewards(
            rewards, mask, kl=kl, kl_coef=rl.beta if kl is not None else 0.0
        )
        if rl.advantage == "reinforce_pp":
            return reinforce_pp_advantages(token_rewards, mask, gamma=rl.gamma), extras
        values = self._values_no_grad(batch, slices)
        adv, returns = gae(token_rewards, values, mask, gamma=rl.gamma, lam=rl.lam)
        if rl.whiten_advantages:
            adv = whiten(adv, mask) * mask
        extras.update(values=values, returns=returns)
        return adv, extras

    def train_step(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        rl = self.recipe.rl
        t0 = time.time()
        roll, stats = self.collect()
        t_rollout = time.time() - t0
        if not roll:
            self.scheduler.step()
            return self.account(
                {
                    **stats,
                    "reward/mean": float("nan"),
                    "time/step_s": time.time() - t0,
                    "skipped": 1.0,
                    **self.models_held,
                }
            ), []
        rewards = roll["rewards"]
        batch = build_batch(
            roll["prompt_ids"], roll["completions"], self.tokenizer.pad_token_id, device=self.device
        )
        truncated = torch.tensor(roll["truncated"], device=self.device)
        loss_mask = batch.completion_mask
        if rl.mask_truncated:
            loss_mask = loss_mask * (~truncated).float()[:, None]
        behaviour = torch.zeros(batch.completion_ids.shape, device=self.device)
        for i, lp in enumerate(roll["sampler_logps"]):
            behaviour[i, : lp.shape[0]] = lp
        slices = self._micro_slices(len(batch))
        ref_logps = (
            self._logps_no_grad(self.ref_model, batch, roll["prompt_ids"], slices)
            if self.ref_model is not None
            else None
        )
        old_logps = (
            self._logps_no_grad(self.model, batch, roll["prompt_ids"], slices)
            if rl.mu > 1
            else None
        )
        adv, extras = self.advantages(
            rewards, batch, behaviour, ref_logps, slices, roll["prompt_ids"]
        )
        # Rows whose advantage is exactly 0 (e.g. groups with equal rewards) contribute exactly
        # zero gradient when no per-token term (KL in the loss, a critic) applies to them: they
        # are not run through the model. Weights keep the full batch's normalisation, so the
        # gradient is the same as with every row.
        skip_zero = (
            adv.dim() == 1
            and self.critic is None
            and not (ref_logps is not None and rl.kl_placement == "loss")
        )
        kept = (adv != 0).nonzero().flatten() if skip_zero else torch.arange(len(batch))
        micro = self.recipe.train.micro_batch_size or max(len(kept), 1)
        chunks = [kept[i : i + micro] for i in range(0, len(kept), micro)]
        weights = self._weights(loss_mask, chunks)
        trained_share = sum(weights) or 1.0

        self.model.train()
        sums: dict[str, float] = {}
        kl_sum = 0.0
        max_len = self.sampling.max_new_tokens
        for epoch in range(rl.mu):
            for s, w in zip(chunks, weights, strict=True):
                logps = self._grouped_logps(self.model, batch, roll["prompt_ids"], s)
                width = logps.shape[1]
                mask = loss_mask[s, :width]
                old = old_logps[s, :width] if old_logps is not None else logps.detach()
                a = adv[s] if adv.dim() == 1 else adv[s, :width]
                loss, pm = policy_loss(
                    logps,
                    old,
                    a,
                    mask,
                    clip_low=rl.clip_low,
                    clip_high=rl.clip_high,
                    agg=rl.loss_agg,
                    max_len=max_len,
                    ratio_level=rl.ratio_level,
                    dual_clip=rl.dual_clip,
                    loss_type=rl.loss_type,
                )
                if ref_logps is not None and rl.kl_placement == "loss":
                    kl = kl_estimate(logps, ref_logps[s, :width], kind=rl.kl_estimator)
                    kl_term = aggregate(kl, mask, rl.loss_agg, max_len=max_len)
                    loss = loss + rl.beta * kl_term
                    if epoch == 0:
                        kl_sum += w * float(kl_term.detach())
                (loss * w).backward()
                for k, v in pm.items():  # averaged over the rows that were trained
                    sums[k] = sums.get(k, 0.0) + w / trained_share * float(v) / rl.mu
                sums["loss"] = sums.get("loss", 0.0) + w * float(loss.detach()) / rl.mu
                if self.critic is not None:
                    values = self.critic(batch.select(s), self.autocast_dtype)
                    vl, vm = value_loss(
                        values,
                        extras["values"][s, :width],
                        extras["returns"][s, :width],
                        mask,
                        clip=rl.value_clip,
                    )
                    (rl.vf_coef * vl * w).backward()
                    sums["value_loss"] = (
                        sums.get("value_loss", 0.0) + w * float(vl.detach()) / rl.mu
                    )
                    for k, v in vm.items():
                        sums[k] = sums.get(k, 0.0) + w * float(v) / rl.mu
            opt = self.optimizer_step(step_scheduler=epoch == rl.mu - 1)
            if self.critic is not None:
                if self.recipe.train.grad_clip:
                    torch.nn.utils.clip_grad_norm_(
                        self.critic.parameters(), self.recipe.train.grad_clip
                    )
                self.critic_optimizer.step()
                self.critic_optimizer.zero_grad(set_to_none=True)
        t_total = time.time() - t0
        n_tok = float(batch.completion_mask.sum())
        g = rl.group_size
        groups = rewards.view(-1, g)
        lengths = batch.completion_mask.sum(-1)
        metrics: dict[str, float] = {
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "frac_zero_std_groups": float((groups.std(-1) == 0).float().mean()) if g > 1 else 0.0,
            "entropy": float(sum(float(e.sum()) for e in roll["entropy"])) / max(n_tok, 1.0),
            "batch/trained_rows": float(len(kept)),
            "completion/mean_length": float(lengths.mean()),
            "completion/truncated_frac": float(truncated.float().mean()),
            "loss": sums.pop("loss", 0.0),
            "clip_frac/low": sums.pop("clip_frac/low", 0.0),
            "clip_frac/high": sums.pop("clip_frac/high", 0.0),
            "grad_norm": opt["grad_norm"],
            "lr": opt["lr"],
            "time/rollout_s": t_rollout,
            "time/step_s": t_total,
            "tokens/completion_per_s": n_tok / max(t_total, 1e-9),
            "memory/peak_mb": peak_memory_mb(self.device),
            **stats,
            **self.models_held,
        }
        for name, values in roll["components"].items():
            metrics[f"reward/{name}"] = float(values.mean())
        if self.overlong_cache:
            metrics["reward/overlong"] = float(roll["overlong"].mean())
        if roll["errors"]:
            metrics["reward/errors"] = float(roll["errors"])
        if rl.kl_placement == "loss" and self.ref_model is not None:
            metrics["kl"] = kl_sum
        elif "kl" in extras:
            metrics["kl"] = float(extras["kl"].sum() / max(n_tok, 1.0))
        if "values" in extras:
            metrics["explained_variance"] = explained_variance(
                extras["values"], extras["returns"], batch.completion_mask
            )
        metrics.update(sums)
        self.account(metrics)
        samples = [
            {
                "prompt": roll["rows"][i]["prompt"],
                "completion": roll["texts"][i],
                "answer": roll["rows"][i].get("answer"),
                "reward": float(rewards[i]),
                "advantage": float(adv[i] if adv.dim() == 1 else adv[i].sum()),
            }
            for i in range(len(roll["texts"]))
        ]
        return metrics, samples

    def account(self, metrics: dict[str, float]) -> dict[str, float]:
        """Add this step's `time/step_s` to the budget and log the cumulative counters."""
        self.train_seconds += metrics.get("time/step_s", 0.0)
        metrics["student/forward_tokens"] = float(self.forward_tokens)
        metrics["time/train_s"] = self.train_seconds
        return metrics

    def progress_info(self, metrics: dict[str, Any]) -> str:
        return f"reward {metrics['reward/mean']:.3f}"


def _select(part: dict[str, Any], idx: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in part.items():
        if isinstance(v, torch.Tensor):
            out[k] = v[idx]
        elif isinstance(v, list):
            out[k] = [v[i] for i in idx]
        elif isinstance(v, dict):
            out[k] = {n: t[idx] for n, t in v.items()}
        else:
            out[k] = v
    return out


def _concat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in parts[0].items():
        if isinstance(v, torch.Tensor):
            out[k] = torch.cat([p[k] for p in parts])
        elif isinstance(v, list):
            out[k] = [x for p in parts for x in p[k]]
        elif isinstance(v, dict):
            out[k] = {n: torch.cat([p[k][n] for p in parts]) for n in v}
        else:
            out[k] = sum(p[k] for p in parts)
    return out
