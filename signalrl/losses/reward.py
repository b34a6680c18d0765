"""Reward-model losses: pure tensor functions, no models, no I/O.

Bradley-Terry (Bradley & Terry 1952) as used for RLHF reward models (Ouyang et al. 2022,
"Training language models to follow instructions with human feedback", eq. 1): with scalar
rewards r_c = r(x, y_chosen) and r_r = r(x, y_rejected),

    P(y_chosen > y_rejected | x) = sigmoid(r_c - r_r)
    loss = -log sigmoid(r_c - r_r - m)

where m is an optional per-pair margin (Llama 2, Touvron et al. 2023, eq. 2: a larger margin
for pairs rated far apart). The reward is only defined up to a constant; the optional centring
term of TRL's `center_rewards_coefficient` (Eisenstein et al. 2023) adds
`center_coef * (r_c + r_r)^2` per pair to keep rewards near zero mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    *,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Per-pair Bradley-Terry loss `-log sigmoid(r_c - r_r - margin)` (shape `(B,)`), plus
    `center_coef * (r_c + r_r)^2` when `center_coef > 0`. Average it for the batch loss."""
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"bradley_terry_loss: chosen {tuple(chosen_rewards.shape)} and rejected "
            f"{tuple(rejected_rewards.shape)} rewards differ in shape"
        )
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return losses


def reward_pair_metrics(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> dict[str, float]:
    """`accuracy` (fraction with r_c > r_r; ties count as wrong), mean rewards and margin."""
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    if c.numel() == 0:
        return {}
    acc = float((c > r).float().mean())
    return {
        "accuracy": acc,
        "rewards/accuracies": acc,
        "rewards/chosen": float(c.mean()),
        "rewards/rejected": float(r.mean()),
        "rewards/margins": float((c - r).mean()),
    }
