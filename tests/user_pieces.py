"""A user's own algorithm pieces, named in recipes as `user_pieces:<function>`."""

from __future__ import annotations

import torch

from signalrl.losses.advantages import AdvantageInput, AdvantageOutput
from signalrl.losses.policy import PolicyLossInput

CALLS: list[str] = []


def reinforce_loss(x: PolicyLossInput) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain REINFORCE with the importance ratio: -r * A per token."""
    CALLS.append("reinforce_loss")
    return -x.ratio * x.advantages, {"user/loss_calls": float(CALLS.count("reinforce_loss"))}


def mean_baseline(x: AdvantageInput) -> AdvantageOutput:
    """Reward minus the group mean, no scaling."""
    CALLS.append("mean_baseline")
    g = x.rewards.view(-1, x.group_size)
    return AdvantageOutput((g - g.mean(-1, keepdim=True)).flatten())


mean_baseline.needs_groups = True  # type: ignore[attr-defined]


def char_code_reward(prompts: list[str], completions: list[str], **columns: object) -> list[float]:
    """A reward that varies between samples of a random model: sum of character codes mod 3."""
    return [float(sum(map(ord, c)) % 3) for c in completions]


def raising_reward(prompts: list[str], completions: list[str], **columns: object) -> list[float]:
    """A reward function with a bug: it always fails."""
    raise RuntimeError("user reward failed")
