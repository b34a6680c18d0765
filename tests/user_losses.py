"""User algorithm pieces selected by the tests as `user_losses:<function>` (tests/ is on
`sys.path`, as for `rewards_plugin`). Each records its calls in `CALLS`."""

from __future__ import annotations

import torch
from torch import Tensor

from signalrl.losses.advantages import AdvantageInput, AdvantageOutput
from signalrl.losses.policy import PolicyLossInput
from signalrl.losses.preference import PreferenceInput

CALLS: list[str] = []


def reinforce(x: PolicyLossInput) -> tuple[Tensor, dict[str, float]]:
    """Vanilla REINFORCE per token: ``-A * logp`` (no ratio, no clipping)."""
    CALLS.append("reinforce")
    return -x.advantages * x.logps, {"user/tokens": float(x.n_tokens)}


def margin(x: PreferenceInput) -> tuple[Tensor, Tensor, Tensor]:
    """A reference-free hinge on the policy margin: ``relu(1 - (pc - pr))``."""
    CALLS.append("margin")
    assert x.policy_rejected_logps is not None
    losses = torch.relu(1.0 - (x.policy_chosen_logps - x.policy_rejected_logps))
    return losses, x.policy_chosen_logps.detach(), x.policy_rejected_logps.detach()


margin.reference_free = True  # type: ignore[attr-defined]


def centred(x: AdvantageInput) -> AdvantageOutput:
    """Rewards minus the batch mean, one advantage per sequence."""
    CALLS.append("centred")
    return AdvantageOutput(x.rewards - x.rewards.mean())


NOT_A_FUNCTION = 3
