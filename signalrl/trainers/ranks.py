"""Many ranks for `TrainerBase` (a mixin): the world-size check, sharding, all-gathered
weights and the global rollout (see `signalrl.distributed` and docs/architecture.md)."""

from __future__ import annotations

from typing import Any

import torch

from signalrl import distributed
from signalrl.rollout.batch import RolloutBatch
from signalrl.rollout.collect import collect as collect_rollouts
from signalrl.rollout.noise import prompt_keys
from signalrl.rollout.sampler import SamplingParams


class RanksMixin:
    """What a trainer does differently under torchrun."""

    recipe: Any
    dist: Any
    model: Any
    tokenizer: Any
    device: Any
    step: int
    sample_calls: int
    autocast_dtype: Any
    budget: Any

    def check_world(self) -> None:
        """Under torchrun, each rank takes a share of the global `train.batch_size`: the
        world size must divide it (online RL: whole prompts, so whole groups)."""
        b, w = self.recipe.train.batch_size, self.dist.world
        if w > 1 and b % w:
            raise ValueError(
                f"train.batch_size {b} is not divisible by the {w} ranks torchrun started: "
                f"each rank takes an equal share of the global batch (use a multiple of {w})"
            )

    def parallelize(self) -> None:
        """Under torchrun: shard the policy (fsdp2) or make every replica rank 0's (ddp).
        Runs after the reference, critic and teacher were built from the unsharded policy."""
        if not self.dist.active:
            return
        if self.dist.fsdp:
            distributed.shard(self.model, self.recipe.train.precision, self.device)
        else:
            distributed.broadcast_parameters(self.model)

    def gathered(self, model: torch.nn.Module | None = None) -> Any:
        """`model` (default: the policy) with all its weights on every rank for the block:
        FSDP2 generation and no-grad scoring; a no-op otherwise."""
        return distributed.gathered(self.model if model is None else model)

    def sampler_autocast(self) -> torch.dtype | None:
        """The rollout sampler's autocast dtype (`sampling.precision`): the training one
        (auto), none (fp32) or bfloat16 (bf16: the sampler/trainer gap of a bf16 inference
        engine feeding an fp32 trainer, logged as `sampling/logp_diff`)."""
        precision = self.recipe.sampling.precision
        if precision == "auto":
            return self.autocast_dtype
        return torch.bfloat16 if precision == "bf16" else None

    def is_policy(self, model: torch.nn.Module) -> bool:
        """`model` is the policy or its stale sampler (`sampling.policy_lag`): its generation
        tokens are the policy's budget."""
        stale = getattr(self, "stale", None)
        return model is self.model or (stale is not None and model is stale.model)

    def collect_global(
        self,
        model: torch.nn.Module,
        rows: list[dict[str, Any]],
        params: SamplingParams,
        scorer: Any,
        shaping: Any = None,
    ) -> RolloutBatch:
        """`params.n` samples of each of the global `rows`, scored: this rank samples and
        scores its contiguous share of the prompts (whole groups) with counter-based noise
        keyed by (seed, step, call, global prompt index), and every rank gets the global
        batch in prompt order: 1 rank and N ranks sample the same tokens. The policy's
        generation tokens are added to the budget."""
        own = self.dist.share(len(rows))
        call, self.sample_calls = self.sample_calls, self.sample_calls + 1
        part: RolloutBatch | None = None
        if own.stop > own.start:
            keys = prompt_keys(
                self.recipe.seed, self.step, call, torch.arange(own.start, own.stop)
            ).to(self.device)
            with self.gathered(model):
                part, tokens = collect_rollouts(
                    model,
                    self.tokenizer,
                    rows[own],
                    params,
                    scorer,
                    autocast_dtype=self.sampler_autocast(),
                    shaping=shaping,
                    keys=keys,
                )
            if self.is_policy(model):
                self.budget.forward_tokens += tokens
        if not self.dist.active:
            assert part is not None
            return part
        parts = distributed.gather_objects(distributed.to_cpu(part))
        whole = RolloutBatch.concat([p for p in parts if p is not None])
        return distributed.move(whole, self.device)
