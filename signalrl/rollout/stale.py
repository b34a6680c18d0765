"""A sampler that lags the policy: `sampling.policy_lag: k` generates every step's rollouts
with the policy as it was `k` optimizer steps earlier.

This is the staleness of asynchronous RL, where an inference engine keeps sampling while the
trainer updates (PipelineRL, AReaL, prime-rl's `async_level`, verl's one-step off-policy
mode), and the gap a weight sync that fails or lags leaves. The sampler's log-probs then come
from another policy than the trainer's: `sampling/logp_diff/*` measures the gap, the doctor's
`rl.rollout_mismatch` names it, and `rl.is_correction` (TIS, IcePop, MIS) corrects for it.

At step `t` (1-based) the trainer holds `theta_{t-1}` (after `t-1` updates); the sampler uses
`theta_{max(0, t-1-k)}`. It keeps the last `k + 1` weight snapshots on the CPU (`k + 1` copies
of the policy: memory to plan for on a large model), and a frozen copy of the policy to sample
with. The snapshots are trainer state: a checkpoint holds them, so a resumed run samples
with the same stale weights. Not under FSDP2 (the recipe check refuses it): the copy would
need the full weights on every rank.
"""

from __future__ import annotations

import copy
from collections import deque
from typing import Any

import torch


class StalePolicy:
    def __init__(self, policy: torch.nn.Module, lag: int) -> None:
        if lag < 1:
            raise ValueError(f"StalePolicy: lag must be >= 1, got {lag}")
        self.lag = lag
        self.model = copy.deepcopy(policy).eval().requires_grad_(False)
        self.history: deque[dict[str, torch.Tensor]] = deque(maxlen=lag + 1)
        self.synced_step: int | None = None

    def sampler(self, policy: torch.nn.Module, step: int) -> torch.nn.Module:
        """The model to sample step `step + 1` with (`step`: updates done so far). The first
        call of a step snapshots the policy's weights; later calls (dynamic sampling rounds,
        a greedy baseline) reuse the same sampler."""
        if self.synced_step != step:
            self.history.append(_snapshot(policy))
            self.model.load_state_dict(self.history[0])
            self.synced_step = step
        return self.model

    def state(self) -> dict[str, Any]:
        return {"history": list(self.history), "synced_step": self.synced_step}

    def load(self, state: dict[str, Any]) -> None:
        self.history = deque(state.get("history", []), maxlen=self.lag + 1)
        self.synced_step = state.get("synced_step")
        if self.history:
            self.model.load_state_dict(self.history[0])


def _snapshot(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy's state dict copied to the CPU, each tensor once: tied weights (an LM head
    tied to the embeddings is two entries of one tensor) share one copy, as in the model."""
    copies: dict[tuple[int, tuple[int, ...], torch.dtype], torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, v in policy.state_dict().items():
        key = (v.data_ptr(), tuple(v.shape), v.dtype)
        if v.numel() == 0 or key not in copies:
            copies[key] = v.detach().to("cpu", copy=True)
        out[name] = copies[key]
    return out
