"""Online RL: sample a group per prompt, score it, turn rewards into advantages, and take
clipped policy-gradient steps. Every algorithm (GRPO, Dr. GRPO, DAPO, GSPO, RLOO,
REINFORCE++, PPO) is a configuration of registered pure pieces (`signalrl.registry`:
`rl.advantage` names an advantage estimator, `rl.loss_type` a policy loss); the presets live
in `signalrl.config.ALGORITHM_PRESETS` and every piece stays overridable in the recipe.

One training step (the skeleton is `TrainerBase.train_step`):
1. `next_batch`: `B` prompts x `G` completions from `signalrl.rollout.collect` (each prompt
   encoded once per group), scored by the recipe's reward terms (default: the task verifier)
   plus DAPO's soft overlong penalty when `overlong_cache` is set; with dynamic sampling
   (DAPO) groups whose rewards are all equal are dropped and more prompts are sampled, up to
   `max_sampling_rounds`. Then the reference (and, with `mu > 1`, old) log-probs, and the
   advantages: a KL to the frozen reference goes in the loss (`kl_placement: loss`), in the
   per-token reward (`reward`), or nowhere (`off`);
2. `micro_loss`: the policy loss on a micro-batch (old log-probs stored once; with `mu == 1`
   the ratio is 1 and the loss is the plain policy gradient), plus the KL term, and for PPO
   the clipped value loss on the critic;
3. `mu` updates over the batch, the critic's optimiser after each.

Every step logs the budget counters `student/forward_tokens` (see
`signalrl.rollout.collect.count_forward_tokens`) and `time/train_s` (`TrainerBase.account`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from signalrl import distributed
from signalrl.config import OnlineRLRecipe
from signalrl.data.collate import SequenceBatch
from signalrl.losses.advantages import AdvantageInput
from signalrl.losses.entropy import adapt_entropy_coef, entropy_bonus
from signalrl.losses.kl import kl_estimate
from signalrl.losses.mismatch import is_weights, mismatch_metrics, off_policy_sequence_mask
from signalrl.losses.policy import (
    aggregate,
    explained_variance,
    policy_loss,
    top_entropy_mask,
    value_loss,
)
from signalrl.losses.policy_frontier import clip_cov_key
from signalrl.models.logprobs import shared_prefix_logps, shared_prefix_logps_entropy
from signalrl.models.value_head import ValueModel
from signalrl.registry import ADVANTAGES
from signalrl.rewards.length import overlong_penalty
from signalrl.rewards.model import RewardModelScorer
from signalrl.rewards.registry import RewardComposer
from signalrl.rollout.batch import RolloutBatch
from signalrl.rollout.collect import count_forward_tokens
from signalrl.rollout.multiturn import EnvRollouts, env_metrics
from signalrl.rollout.sampler import SamplingParams
from signalrl.rollout.stale import StalePolicy
from signalrl.trainers.base import DataCursor, MicroLoss, StepResult, TrainerBase

__all__ = ["OnlineRLTrainer", "RLBatch", "count_forward_tokens"]


@dataclass
class RLBatch:
    """A scored rollout made ready for the update: collated sequences, the loss mask, the
    sampler's, reference and old log-probs, advantages (`(N,)` or `(N, T)`) and their extras
    (values/returns for GAE, the in-reward KL), and the rows that are trained."""

    roll: RolloutBatch
    seq: SequenceBatch
    loss_mask: torch.Tensor
    truncated: torch.Tensor
    behaviour: torch.Tensor
    ref_logps: torch.Tensor | None
    old_logps: torch.Tensor | None
    adv: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    chunks: list[torch.Tensor] = field(default_factory=list)
    units: list[float] = field(default_factory=list)
    total: float = 1.0
    trained_share: float = 1.0
    trained_rows: int = 0


class OnlineRLTrainer(TrainerBase):
    recipe: OnlineRLRecipe

    def __init__(self, recipe: OnlineRLRecipe, **kw: Any) -> None:
        super().__init__(recipe, **kw)
        rl = recipe.rl
        self.rows = self.train_rows()
        self.rewards = RewardComposer(
            recipe.rewards, self.task, recipe.reward_on_error, device=self.device
        )
        if rl.uses_reference:
            self.ref_model = self.frozen_reference()
        self.critic: ValueModel | None = None
        if ADVANTAGES.meta(rl.advantage, "needs_values", False):
            self._build_critic()
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
        self.data = DataCursor(len(self.rows), recipe.seed)
        self.env = EnvRollouts(recipe.env, self.tokenizer, self.model) if recipe.env else None
        self.entropy_coef = rl.entropy_coef  # trainer state: adapted towards rl.entropy_target
        self.stale = StalePolicy(self.model, s.policy_lag) if s.policy_lag else None
        self.setup_extra()
        self.finish_setup()

    def setup_extra(self) -> None:
        """Subclasses load what they hold beyond the policy, reference and critic (before
        the optimiser is built and the run resumes)."""

    def _build_critic(self) -> None:
        rl, t = self.recipe.rl, self.recipe.train
        self.critic = (
            ValueModel.from_pretrained(rl.critic_path, self.device)
            if rl.critic_path
            else ValueModel.from_policy(self.model)
        )
        self.critic_optimizer = torch.optim.AdamW(
            self.critic.parameters(), lr=rl.critic_lr or t.lr, betas=t.betas, eps=t.adam_eps
        )

    def held_models(self) -> list[tuple[str, torch.nn.Module]]:
        held = super().held_models()
        if self.critic is not None:
            held.append(("critic", self.critic))
        if self.stale is not None:
            held.append(("stale_sampler", self.stale.model))
        for term in self.rewards.terms:
            scorer = getattr(term, "scorer", None)
            if isinstance(scorer, RewardModelScorer):
                held.append(("reward_model", scorer.model))
        return held

    def progress_name(self) -> str:
        return self.recipe.rl.algorithm

    def _evaluate(self, with_pass_k: bool) -> Any:
        """With an `env` section: greedy episodes on the test rows (accuracy and tool use)."""
        if self.env is None:
            return super()._evaluate(with_pass_k)
        e = self.recipe.eval
        n_new = e.max_new_tokens or self.recipe.sampling.max_new_tokens
        return self.env.evaluate(
            self.model, self.tokenizer, self.test_rows(), self.task.verify,
            max_new_tokens=n_new, batch_size=e.batch_size, autocast_dtype=self.autocast_dtype,
        )  # fmt: skip

    # -- state ----------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        state["entropy_coef"] = self.entropy_coef
        if self.stale is not None:
            state["stale_policy"] = self.stale.state()
        if self.critic is not None:
            state["critic"] = self.critic.state_dict()
            state["critic_optimizer"] = self.critic_optimizer.state_dict()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.entropy_coef = float(state.get("entropy_coef", self.recipe.rl.entropy_coef))
        if self.stale is not None and "stale_policy" in state:
            self.stale.load(state["stale_policy"])
        if self.critic is not None and "critic" in state:
            self.critic.load_state_dict(state["critic"])
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])

    # -- rollouts -----------------------------------------------------------------------------
    def _overlong(self, lengths: list[int]) -> list[float]:
        cache, factor = self.overlong_cache, self.recipe.rl.overlong_factor
        assert cache
        return [factor * overlong_penalty(n, self.sampling.max_new_tokens, cache) for n in lengths]

    def rollout(
        self,
        rows: list[dict[str, Any]],
        params: SamplingParams | None = None,
        model: torch.nn.Module | None = None,
    ) -> RolloutBatch:
        """The global `rows` sampled by `model` (default: the policy, whose generation tokens
        are added to the budget) with `params` (default: the recipe's, `group_size` per
        prompt), scored by the reward terms and the overlong shaping; each rank samples its
        share (`TrainerBase.collect_global`); with an `env` section, multi-turn episodes
        (`signalrl.rollout.multiturn`)."""
        collect = self.collect_global if self.env is None else partial(self.env.collect, self)
        if model is None and self.stale is not None:  # sampling.policy_lag: a stale sampler
            model = self.stale.sampler(self.model, self.step)
        return collect(
            self.model if model is None else model,
            rows,
            params or self.sampling,
            self.rewards,
            shaping=self._overlong if self.overlong_cache else None,
        )

    def _sample_round(self, n_prompts: int) -> RolloutBatch:
        return self.rollout([self.rows[i] for i in self.data.take(n_prompts)])

    def collect(self) -> tuple[RolloutBatch | None, dict[str, float]]:
        """B groups of G samples; with dynamic sampling only groups with reward variance."""
        rl, b, g = self.recipe.rl, self.recipe.train.batch_size, self.sampling.n
        if not rl.dynamic_sampling:
            return self._sample_round(b), {"batch/groups": float(b)}
        kept: list[RolloutBatch] = []
        n_groups = n_seen = rounds = 0
        while n_groups < b and rounds < rl.max_sampling_rounds:
            rounds += 1
            part = self._sample_round(b - n_groups if rounds > 1 else b)
            std = part.group_rewards().std(-1) if g > 1 else torch.zeros(1)
            keep_groups = (std > 0).nonzero().flatten().tolist()
            n_seen += len(std)
            if keep_groups:
                kept.append(part.select([gi * g + j for gi in keep_groups for j in range(g)]))
                n_groups += len(keep_groups)
        stats = {
            "batch/groups": float(n_groups),
            "dynamic_sampling/rounds": float(rounds),
            "dynamic_sampling/kept_frac": n_groups / max(n_seen, 1),
        }
        if not kept:  # every group had equal rewards: nothing to learn from this step
            return None, stats
        return RolloutBatch.concat(kept), stats

    # -- log-probs ------------------------------------------------------------------------------
    def _grouped_logps(
        self,
        model: torch.nn.Module,
        batch: SequenceBatch,
        prompt_ids: list[list[int]],
        rows: torch.Tensor,
        with_entropy: bool = False,
    ) -> Any:
        """Log-probs `(len(rows), width)` of the completions of `rows`, each distinct prompt
        run once (rows of one prompt are contiguous groups of `group_size`); with
        `with_entropy` the pair (log-probs, the policy's entropies) from the same logits."""
        g = self.sampling.n
        groups, row_prompt = torch.unique(rows // g, return_inverse=True)
        cmask = batch.completion_mask[rows]
        width = max(int(cmask.sum(-1).max().item()), 1)
        prompts = [prompt_ids[int(k) * g] for k in groups]
        if model is self.model:
            self.budget.forward_tokens += count_forward_tokens(prompts, int(cmask.sum()))
        fn = shared_prefix_logps_entropy if with_entropy else shared_prefix_logps
        return fn(
            model,
            prompts,
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
        """`model`'s log-probs `(N, T)` of the global batch: this rank computes the rows of
        its `slices`, and the ranks' parts are summed (each row is computed once)."""
        out = torch.zeros(batch.completion_ids.shape, device=self.device)
        every = torch.arange(len(batch), device=self.device)
        with self.gathered(model):
            for s in slices:
                lp = self._grouped_logps(model, batch, prompt_ids, every[s])
                out[s, : lp.shape[1]] = lp
        return distributed.all_reduce_sum(out)

    @torch.no_grad()
    def _values_no_grad(self, batch: SequenceBatch, slices: list[slice]) -> torch.Tensor:
        assert self.critic is not None
        out = torch.zeros(batch.completion_ids.shape, device=self.device)
        for s in slices:
            v = self.critic(batch.select(s), self.autocast_dtype)
            out[s, : v.shape[1]] = v
        return distributed.all_reduce_sum(out)

    def own_rows(self, n_rows: int) -> slice:
        """The rows this rank trains and scores: its contiguous share of whole groups."""
        g = self.sampling.n
        own = self.dist.share(n_rows // g)
        return slice(own.start * g, own.stop * g)

    # -- advantages ------------------------------------------------------------------------------
    def advantages(
        self,
        rewards: torch.Tensor,
        batch: SequenceBatch,
        behaviour: torch.Tensor,
        ref_logps: torch.Tensor | None,
        slices: list[slice],
        prompt_ids: list[list[int]],
        roll: RolloutBatch | None = None,
        baseline: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(N,) or (N, T) advantages from the recipe's estimator; extras holds values/returns
        (critic estimators) and the in-reward KL. `prompt_ids` are the rows' prompts, for
        subclasses that score with another model; `roll` gives the reward terms (GDPO), and
        for multi-turn episodes the policy mask (the estimator and the KL see only sampled
        tokens) and the per-turn token rewards; `baseline` the greedy rewards (ReMax)."""
        rl = self.recipe.rl
        mask, token_rewards = batch.completion_mask, None
        if roll is not None:  # multi-turn: only the sampled tokens, rewarded per turn
            mask, token_rewards = roll.estimator_mask_and_rewards(mask)
        extras: dict[str, torch.Tensor] = {}
        kl = None
        if ref_logps is not None and rl.kl_placement == "reward":
            kl = kl_estimate(behaviour, ref_logps, kind=rl.kl_estimator) * mask
            extras["kl"] = kl
        values = self._values_no_grad(batch, slices) if self.critic is not None else None
        out = ADVANTAGES.get(rl.advantage)(
            AdvantageInput(
                rewards=rewards,
                mask=mask,
                group_size=rl.group_size,
                kl=kl,
                kl_coef=rl.kl_coef,
                values=values,
                adv_scale=rl.adv_scale,
                gamma=rl.gamma,
                lam=rl.lam,
                whiten=rl.whiten_advantages,
                components=roll.components if roll is not None else None,
                weights={spec.label: spec.weight for spec in self.recipe.rewards},
                baseline_rewards=baseline,
                token_rewards=token_rewards,
            )
        )
        if values is not None and out.returns is not None:
            extras.update(values=values, returns=out.returns)
        return out.advantages, extras

    # -- the step ---------------------------------------------------------------------------
    def next_batch(self) -> tuple[RLBatch | None, dict[str, float]]:
        roll, stats = self.collect()
        if roll is None:
            return None, {**stats, "reward/mean": float("nan")}
        return self.prepare(roll), stats

    def prepare(self, roll: RolloutBatch) -> RLBatch:
        """Collate, score with the reference (and the old policy for `mu > 1`), compute the
        advantages and choose the rows to train and their micro-batches."""
        rl = self.recipe.rl
        seq = roll.to_sequence_batch(self.tokenizer.pad_token_id, self.device)
        truncated = torch.tensor(roll.truncated, device=self.device)
        loss_mask = seq.completion_mask
        if rl.mask_truncated:
            loss_mask = loss_mask * (~truncated).float()[:, None]
        width = seq.completion_ids.shape[1]
        sampled = roll.sampled_mask(width, self.device)  # multi-turn: not env tokens
        loss_mask = loss_mask if sampled is None else loss_mask * sampled
        behaviour = roll.padded(roll.sampler_logps, width, self.device)
        if rl.entropy_top_frac is not None:  # the 80/20 rule, over the whole batch
            entropy = roll.padded(roll.entropy, width, self.device)
            loss_mask = top_entropy_mask(entropy, loss_mask, rl.entropy_top_frac)
        slices = self.micro_slices(len(seq))
        baseline = (
            self.greedy_baseline(roll)
            if ADVANTAGES.meta(rl.advantage, "needs_greedy_baseline", False)
            else None
        )
        ref = self.ref_model
        ref_logps = self._logps_no_grad(ref, seq, roll.prompt_ids, slices) if ref else None
        old_logps = (
            self._logps_no_grad(self.model, seq, roll.prompt_ids, slices) if rl.mu > 1 else None
        )
        adv, extras = self.advantages(
            roll.rewards, seq, behaviour, ref_logps, slices, roll.prompt_ids, roll, baseline
        )
        if baseline is not None:
            extras["greedy_baseline"] = baseline
        b = RLBatch(roll, seq, loss_mask, truncated, behaviour, ref_logps, old_logps, adv, extras)
        self._plan_chunks(b)
        return b

    @torch.no_grad()
    def greedy_baseline(self, roll: RolloutBatch) -> torch.Tensor:
        """ReMax's baseline: the reward of one greedy completion per prompt, `(P,)`, from the
        policy that sampled the batch (its generation is counted in the budget)."""
        params = dataclasses.replace(self.sampling, n=1, greedy=True)
        return self.rollout(roll.rows[:: roll.group_size], params).rewards.to(self.device)

    def _plan_chunks(self, b: RLBatch) -> None:
        """Rows whose advantage is exactly 0 (e.g. groups with equal rewards) contribute
        exactly zero gradient when no per-token term (KL in the loss, a critic) applies to
        them: they are not run through the model. The units (tokens for token-mean, non-empty
        sequences otherwise) keep the full batch's normalisation, so the gradient is the same
        as with every row."""
        rl = self.recipe.rl
        skip_zero = (
            b.adv.dim() == 1
            and self.critic is None
            and not (b.ref_logps is not None and rl.kl_placement == "loss")
            and not rl.uses_entropy  # the entropy bonus has a gradient at A = 0
        )
        n = len(b.seq)
        trained = (b.adv != 0) if skip_zero else torch.ones(n, dtype=torch.bool)
        trained = trained.to(b.adv.device)
        own = self.own_rows(n)
        kept = trained[own].nonzero().flatten() + own.start  # this rank's trained rows
        micro = self.recipe.train.micro_batch_size or max(len(kept), 1)
        b.chunks = [kept[i : i + micro] for i in range(0, len(kept), micro)]
        if rl.loss_agg == "token-mean":
            per_row = b.loss_mask.sum(-1)
        else:
            per_row = (b.loss_mask.sum(-1) > 0).float()
        # the whole (global) batch's units: every rank holds it, so all agree
        b.total = float(per_row.sum()) or 1.0
        b.units = [float(per_row[s].sum()) for s in b.chunks]
        b.trained_share = float(per_row[trained].sum()) / b.total or 1.0
        b.trained_rows = int(trained.sum())

    def padding_chunk(self, b: RLBatch, chunks: list[int]) -> int:
        """A one-row chunk (FSDP2 runs it with weight 0 on a rank short of micro-batches)."""
        b.chunks.append(torch.tensor([self.own_rows(len(b.seq)).start % len(b.seq)]))
        b.units.append(0.0)
        return len(b.chunks) - 1

    def micro_batches(self, batch: RLBatch) -> tuple[list[int], float]:
        return list(range(len(batch.chunks))), batch.total

    def updates_per_batch(self) -> int:
        return self.recipe.rl.mu

    def micro_loss(self, b: RLBatch, chunk: int, epoch: int) -> MicroLoss:
        rl = self.recipe.rl
        s = b.chunks[chunk]
        if rl.uses_entropy:
            logps, ent = self._grouped_logps(self.model, b.seq, b.roll.prompt_ids, s, True)
        else:
            logps, ent = self._grouped_logps(self.model, b.seq, b.roll.prompt_ids, s), None
        width = logps.shape[1]
        mask = b.loss_mask[s, :width]
        old = b.old_logps[s, :width] if b.old_logps is not None else logps.detach()
        sampler = b.behaviour[s, :width]
        extra_metrics = mismatch_metrics(old, sampler, mask) if epoch == 0 else {}
        adv = b.adv[s] if b.adv.dim() == 1 else b.adv[s, :width]
        if rl.is_correction != "none" or rl.off_policy_mask_kl is not None:
            adv = self._corrected(adv, old, sampler, mask, extra_metrics)
        with clip_cov_key(self.recipe.seed, self.step, epoch, s):  # Clip-Cov's draw
            loss, pm = policy_loss(
                logps,
                old,
                adv,
                mask,
                clip_low=rl.clip_low,
                clip_high=rl.clip_high,
                agg=rl.loss_agg,
                max_len=self.sampling.max_new_tokens,
                ratio_level=rl.ratio_level,
                dual_clip=rl.dual_clip,
                loss_type=rl.loss_type,
                sapo_tau_pos=rl.sapo_tau_pos,
                sapo_tau_neg=rl.sapo_tau_neg,
                cov_frac=rl.cov_frac,
                clip_cov_lb=rl.clip_cov_lb,
                clip_cov_ub=rl.clip_cov_ub,
                kl_cov_coef=rl.kl_cov_coef,
                dppo_ratio_cap=rl.dppo_ratio_cap,
            )
        metrics = {k: v / b.trained_share for k, v in {**pm, **extra_metrics}.items()}
        if b.ref_logps is not None and rl.kl_placement == "loss":
            kl = kl_estimate(logps, b.ref_logps[s, :width], kind=rl.kl_estimator)
            kl_term = aggregate(kl, mask, rl.loss_agg, max_len=self.sampling.max_new_tokens)
            loss = loss + rl.kl_coef * kl_term
            if epoch == 0:
                metrics["kl"] = float(kl_term.detach())
        if ent is not None:
            max_len = self.sampling.max_new_tokens
            loss = loss + entropy_bonus(ent, mask, self.entropy_coef, rl.loss_agg, max_len)
            if epoch == 0:  # the trained entropy, before this step's updates
                h = aggregate(ent.detach(), mask, rl.loss_agg, max_len=max_len)
                metrics["actor/entropy"] = float(h)
        extra = None
        if self.critic is not None:
            values = self.critic(b.seq.select(s), self.autocast_dtype)
            vl, vm = value_loss(
                values,
                b.extras["values"][s, :width],
                b.extras["returns"][s, :width],
                mask,
                clip=rl.value_clip,
            )
            extra = rl.vf_coef * vl
            metrics.update(vm, value_loss=float(vl.detach()))
        return MicroLoss(loss, b.units[chunk], metrics, extra_loss=extra)

    def _corrected(
        self,
        adv: torch.Tensor,
        old: torch.Tensor,
        sampler: torch.Tensor,
        mask: torch.Tensor,
        metrics: dict[str, float],
    ) -> torch.Tensor:
        """`(B, T)` advantages times the importance weights of `rl.is_correction` (and the
        off-policy sequence mask): a detached non-negative weight on a token's advantage is
        the same as on its loss for the registered losses, which are positively homogeneous
        in the advantage (see `signalrl.losses.mismatch`)."""
        rl = self.recipe.rl
        weights, m = is_weights(
            old, sampler, mask, rl.is_correction, cap=rl.is_cap, low=rl.is_low, high=rl.is_high
        )
        metrics.update(m)
        if rl.off_policy_mask_kl is not None:
            keep, frac = off_policy_sequence_mask(old, sampler, mask, adv, rl.off_policy_mask_kl)
            weights = weights * keep
            metrics["is/frac_off_policy_masked"] = frac
        tok_adv = adv[:, None].expand_as(mask) if adv.dim() == 1 else adv
        return tok_adv * weights

    def after_update(self) -> None:
        if self.critic is None:
            return
        if self.dist.active:  # a replica per rank: sum its gradient like the policy's
            params = [p for p in self.critic.parameters() if p.requires_grad]
            distributed.sync_gradients(params)
            if self.dist.fsdp:  # the backward was scaled by the world size (see accumulate)
                for p in params:
                    p.grad.div_(self.dist.world)  # type: ignore[union-attr]
        if self.recipe.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), self.recipe.train.grad_clip)
        self.critic_optimizer.step()
        self.critic_optimizer.zero_grad(set_to_none=True)

    def step_metrics(self, b: RLBatch, result: StepResult) -> dict[str, float]:
        rewards, roll, g = b.roll.rewards, b.roll, self.recipe.rl.group_size
        n_tok = float(b.seq.completion_mask.sum())
        metrics: dict[str, float] = {
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "frac_zero_std_groups": (
                float((rewards.view(-1, g).std(-1) == 0).float().mean()) if g > 1 else 0.0
            ),
            "entropy": float(sum(float(e.sum()) for e in roll.entropy)) / max(n_tok, 1.0),
            "batch/trained_rows": float(b.trained_rows),
            "completion/mean_length": float(b.seq.completion_mask.sum(-1).mean()),
            "completion/truncated_frac": float(b.truncated.float().mean()),
            "clip_frac/low": 0.0,
            "clip_frac/high": 0.0,
            "completion/tokens": n_tok,
            **result.metrics(),
        }
        metrics.update(env_metrics(roll))
        for name, values in roll.components.items():
            metrics[f"reward/{name}"] = float(values.mean())
        if "greedy_baseline" in b.extras:
            metrics["reward/greedy_baseline"] = float(b.extras["greedy_baseline"].mean())
        if self.overlong_cache and roll.shaping is not None:
            metrics["reward/overlong"] = float(roll.shaping.mean())
        if roll.errors:
            metrics["reward/errors"] = float(roll.errors)
        if "kl" in b.extras:
            metrics["kl"] = float(b.extras["kl"].sum() / max(n_tok, 1.0))
        elif b.ref_logps is not None and self.recipe.rl.kl_placement == "loss":
            metrics.setdefault("kl", 0.0)
        if "values" in b.extras:
            metrics["explained_variance"] = explained_variance(
                b.extras["values"], b.extras["returns"], b.seq.completion_mask
            )
        return metrics

    def step_samples(self, b: RLBatch) -> list[dict[str, Any]]:
        adv = b.adv if b.adv.dim() == 1 else b.adv.sum(-1)
        return b.roll.samples(advantage=adv.tolist())

    def train_step(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        metrics, samples = super().train_step()
        rl = self.recipe.rl
        if rl.uses_entropy:
            metrics["actor/entropy_coef"] = self.entropy_coef  # the one this step used
            h, target, lr = metrics.get("actor/entropy"), rl.entropy_target, rl.entropy_coef_lr
            if h is not None and target is not None and lr:
                self.entropy_coef = adapt_entropy_coef(self.entropy_coef, h, target, lr)
        if "completion/tokens" in metrics:
            tokens = metrics["completion/tokens"]
            metrics["tokens/completion_per_s"] = tokens / max(metrics["time/step_s"], 1e-9)
        return metrics, samples

    def progress_info(self, metrics: dict[str, Any]) -> str:
        return f"reward {metrics['reward/mean']:.3f}"
