"""More advantage estimators: OPO, GPG, REINFORCE++-baseline, pass@k, MaxRL, GDPO and ReMax.

Pure tensor functions with the conventions of :mod:`signalrl.losses.advantages`: sequence
rewards ``(N,)`` whose ``G = group_size`` rollouts of one prompt are contiguous, per-token
tensors ``(N, T)``, ``mask`` 1.0 on the completion tokens that count. Every result is a
detached training target.

Each ``*_advantages`` function is the formula on plain tensors; the registered entry (the
``rl.advantage`` name, ``fn(x: AdvantageInput) -> AdvantageOutput``) unpacks the
:class:`~signalrl.losses.advantages.AdvantageInput`. Where the KL goes in the reward
(``x.kl`` given), the group estimators use ``r = rewards - kl_coef * kl.sum(-1)`` as RLOO
does (verl's ``token_level_rewards.sum(-1)``); ``gdpo`` works on the raw reward terms and
ignores ``kl``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from signalrl.losses._checks import check_same_2d
from signalrl.losses.advantages import (
    GROUP_SCALES,
    AdvantageInput,
    AdvantageOutput,
    _check_groups,
    _float,
    group_advantages,
    token_level_rewards,
    whiten,
)
from signalrl.registry import register_advantage

__all__ = [
    "gdpo_advantages",
    "gpg_advantages",
    "grpo_passk_advantages",
    "maxrl_advantages",
    "opo_advantages",
    "reinforce_pp_baseline_advantages",
    "remax_advantages",
]


def _grouped(rewards: Tensor, group_size: int, what: str) -> tuple[Tensor, Tensor]:
    """``(N/G, G)`` detached float rewards (``G >= 2`` required) and the ``(N/G, 1)`` mask of
    constant groups (all rewards equal)."""
    _check_groups(rewards, group_size)
    if group_size < 2:
        raise ValueError(f"{what} needs group_size >= 2, got {group_size}")
    g = _float(rewards.detach()).view(-1, group_size)
    return g, g.amax(dim=-1, keepdim=True) == g.amin(dim=-1, keepdim=True)


def _seq_rewards(x: AdvantageInput) -> Tensor:
    """Sequence rewards with the in-reward KL subtracted (when ``kl`` is given)."""
    r = _float(x.rewards.detach())
    return r - x.kl_coef * x.kl.detach().sum(-1) if x.kl is not None else r


# --------------------------------------------------------------------------- the formulas


def opo_advantages(rewards: Tensor, lengths: Tensor, group_size: int) -> Tensor:
    """OPO's length-weighted baseline (Hao et al. 2025, "On-Policy RL with Optimal Reward
    Baseline", arXiv 2505.23585; verl ``compute_opo_outcome_advantage``).

    ``b_g = sum_{j in g} L_j r_j / sum_{j in g} L_j`` and ``A_i = r_i - b_g``, with ``L_j`` the
    completion length (the number of completion tokens, ``mask.sum(-1)``): the optimal
    variance-reducing baseline ``E[|grad log pi|^2 r] / E[|grad log pi|^2]`` with the squared
    gradient norm approximated by the length. A group whose lengths are all 0 uses the plain
    mean; a constant group gets exactly 0. Requires ``G >= 2``. Returns detached ``(N,)``.
    """
    g, constant = _grouped(rewards, group_size, "OPO")
    if lengths.shape != rewards.shape:
        raise ValueError(
            f"lengths must have shape {tuple(rewards.shape)}, got {tuple(lengths.shape)}"
        )
    L = _float(lengths.detach()).to(g.dtype).view(-1, group_size)
    if (L < 0).any():
        raise ValueError("lengths must be >= 0")
    total = L.sum(dim=-1, keepdim=True)
    weighted = (L * g).sum(dim=-1, keepdim=True) / total.clamp(min=1e-12)
    baseline = torch.where(total > 0, weighted, g.mean(dim=-1, keepdim=True))
    return torch.where(constant, 0.0, g - baseline).reshape(-1)


def gpg_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """GPG (Chu et al. 2025, "GPG: A Simple and Strong Reinforcement Learning Baseline for
    Model Reasoning", arXiv 2504.02546), its accurate gradient estimation.

    ``A_i = alpha * (r_i - mean_g)`` with ``alpha = M / M_valid``: ``M`` groups in the batch
    of which ``M_valid`` have non-zero reward variance (``alpha = 1`` when none is valid, all
    advantages being 0 then). This is the authors' ``loss / inverse_alpha`` with
    ``inverse_alpha = M_valid / M`` (AMAP-ML/GPG ``gpg_trainer.py``); verl's
    ``compute_gpg_outcome_advantage`` instead counts non-zero *rewards*. No std scaling
    (``F_norm = 1``). A constant group gets exactly 0. Requires ``G >= 2``. Returns ``(N,)``.
    """
    g, constant = _grouped(rewards, group_size, "GPG")
    n_valid = int((~constant).sum().item())
    alpha = g.shape[0] / max(n_valid, 1)
    centered = torch.where(constant, 0.0, g - g.mean(dim=-1, keepdim=True))
    return (alpha * centered).reshape(-1)


def reinforce_pp_baseline_advantages(rewards: Tensor, mask: Tensor, group_size: int) -> Tensor:
    """REINFORCE++-baseline (Hu et al. 2025, "REINFORCE++: Stabilizing Critic-Free Policy
    Optimization with Global Advantage Normalization", arXiv 2501.03262; verl
    ``compute_reinforce_plus_plus_baseline_outcome_advantage``).

    ``a_i = r_i - mean_g`` (the group mean as the baseline), broadcast over the completion
    tokens, then whitened over all unmasked tokens of the batch (:func:`whiten`, verl's
    ``masked_whiten``): ``A_{i,t} = (a_i - mu) / sqrt(var + 1e-8)`` on ``mask > 0``, with
    ``mu`` and the unbiased ``var`` taken over tokens (a longer completion counts more).
    Requires ``G >= 2``. Returns detached ``(N, T)``, 0 on masked positions.
    """
    g, _ = _grouped(rewards, group_size, "REINFORCE++-baseline")
    B, _T = check_same_2d(mask=mask)
    if B != g.numel():
        raise ValueError(f"mask has {B} rows, rewards {g.numel()}")
    m = (mask.detach() > 0).to(g.dtype)
    centered = (g - g.mean(dim=-1, keepdim=True)).reshape(-1)
    return whiten(centered[:, None] * m, m) * m


def grpo_passk_advantages(
    rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-6
) -> Tensor:
    """Pass@k advantages (Tang et al. 2025, "Optimizing Language Models for Inference Time
    Objectives using Reinforcement Learning", arXiv 2503.19595; verl
    ``compute_grpo_passk_outcome_advantage``).

    Only the best sample of each group gets a non-zero advantage:
    ``A_{argmax} = (r_max - r_second) / (std + eps)`` and ``A_j = 0`` for the others, where
    ``r_second`` is the second largest reward of the group (equal to ``r_max`` on a tie, so
    a tie gives 0) and ``std`` is the unbiased group std (``scale="group"``, verl's
    ``norm_adv_by_std_in_grpo``), the batch's (``"batch"``), or no division (``"none"``).
    Requires ``G >= 2``. Returns detached ``(N,)``.
    """
    g, _ = _grouped(rewards, group_size, "grpo_passk")
    if scale not in GROUP_SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid choices: {', '.join(GROUP_SCALES)}")
    top = g.topk(2, dim=-1).values
    gap = top[:, 0] - top[:, 1]
    if scale == "group":
        gap = gap / (g.std(dim=-1, unbiased=True) + eps)
    elif scale == "batch":
        gap = gap / (g.reshape(-1).std(unbiased=True) + eps)
    out = torch.zeros_like(g)
    out[torch.arange(g.shape[0]), g.argmax(dim=-1)] = gap
    return out.reshape(-1)


def maxrl_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """MaxRL (Tajwar, Zeng, Zhou, Song, et al. 2026, "Maximum Likelihood Reinforcement
    Learning", arXiv 2602.02710; Zanette-Labs/MaxRL).

    GRPO with the centred reward divided by the group *mean* (the pass rate) instead of the
    std: ``A_i = (r_i - mean_g) / (mean_g + eps)``, and ``A_i = 0`` when ``mean_g == 0`` (no
    success in the group). For binary rewards this averages the policy gradient over the
    successful rollouts only, an unbiased estimator of the gradient of the order-``G``
    truncation of ``log pass_rate`` (maximum likelihood in the limit ``G -> inf``). Defined
    for non-negative (pass/fail) rewards: a negative reward is a ValueError. Requires
    ``G >= 2``. Returns detached ``(N,)``.
    """
    g, constant = _grouped(rewards, group_size, "MaxRL")
    if (g < 0).any():
        raise ValueError("maxrl needs non-negative (pass/fail) rewards; got a negative reward")
    mean = g.mean(dim=-1, keepdim=True)
    adv = (g - mean) / (mean + eps)
    return torch.where(constant | (mean == 0), 0.0, adv).reshape(-1)


def gdpo_advantages(
    components: dict[str, Tensor],
    group_size: int,
    weights: dict[str, float] | None = None,
    eps: float = 1e-4,
) -> Tensor:
    """GDPO (Liu et al. 2026, "GDPO: Group reward-Decoupled Normalization Policy Optimization
    for Multi-reward RL Optimization", arXiv 2601.05242; NVlabs/GDPO ``grpo_trainer.py``).

    Each reward term ``k`` is normalised within its group first,
    ``A^k_i = (r^k_i - mean_g(r^k)) / (std_g(r^k) + eps)`` (0 on a group where the term is
    constant), then ``S_i = sum_k w_k A^k_i`` and the sum is normalised over the batch:
    ``A_i = (S_i - mean(S)) / (std(S) + eps)`` (unbiased stds). ``weights`` default to 1.0;
    a term without a weight is a ValueError. A group where every term is constant gets
    exactly 0 (``mean(S)`` is 0 since every group of ``S`` sums to 0). Requires ``G >= 2``.
    Returns detached ``(N,)``.
    """
    if not components:
        raise ValueError("gdpo needs the per-term rewards (AdvantageInput.components)")
    missing = sorted(set(components) - set(weights)) if weights is not None else []
    if missing:
        raise ValueError(f"gdpo: no weight for reward term(s) {', '.join(missing)}")
    shapes = {name: tuple(r.shape) for name, r in components.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"gdpo: reward terms of different shapes {shapes}")
    total: Tensor | None = None
    all_constant: Tensor | None = None
    for name, r in components.items():
        _, constant = _grouped(r, group_size, "GDPO")
        w = 1.0 if weights is None else float(weights[name])
        term = w * group_advantages(r, group_size, scale="group", eps=eps)
        total = term if total is None else total + term
        all_constant = constant if all_constant is None else all_constant & constant
    assert total is not None and all_constant is not None
    std = total.std(unbiased=True) if total.numel() > 1 else total.new_zeros(())
    adv = (total - total.mean()) / (std + eps)
    return torch.where(all_constant.expand(-1, group_size).reshape(-1), 0.0, adv)


def remax_advantages(rewards: Tensor, baseline_rewards: Tensor, group_size: int) -> Tensor:
    """ReMax (Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement
    Learning Method for Aligning Large Language Models", arXiv 2310.10505).

    ``A_i = r_i - b_p``: the baseline ``b_p`` is the reward of one greedy completion of the
    row's prompt ``p = i // G`` (``baseline_rewards`` is ``(N / G,)``). Any ``G >= 1``.
    Returns detached ``(N,)``.
    """
    r = _float(rewards.detach())
    return r - _row_baseline(baseline_rewards, rewards, group_size).to(r.dtype)


def _row_baseline(baseline_rewards: Tensor, rewards: Tensor, group_size: int) -> Tensor:
    """The ``(N / G,)`` per-prompt baseline repeated to one value per row, ``(N,)``."""
    _check_groups(rewards, group_size)
    n_prompts = rewards.numel() // group_size
    if baseline_rewards.shape != (n_prompts,):
        raise ValueError(
            f"baseline_rewards must have shape ({n_prompts},) (one per prompt), got "
            f"{tuple(baseline_rewards.shape)}"
        )
    b = _float(baseline_rewards.detach()).to(rewards.device)
    return b.repeat_interleave(group_size)


# --------------------------------------------------------------------------- registry entries


@register_advantage("opo", needs_groups=True)
def opo(x: AdvantageInput) -> AdvantageOutput:
    """OPO (Hao et al. 2025), ``(N,)``: :func:`opo_advantages` with the lengths
    ``mask.sum(-1)`` on the rewards (minus the in-reward KL)."""
    check_same_2d(mask=x.mask)
    return AdvantageOutput(opo_advantages(_seq_rewards(x), x.mask.sum(-1), x.group_size))


@register_advantage("gpg", needs_groups=True)
def gpg(x: AdvantageInput) -> AdvantageOutput:
    """GPG (Chu et al. 2025), ``(N,)``: :func:`gpg_advantages`."""
    return AdvantageOutput(gpg_advantages(_seq_rewards(x), x.group_size))


@register_advantage("reinforce_pp_baseline", needs_groups=True)
def reinforce_pp_baseline(x: AdvantageInput) -> AdvantageOutput:
    """REINFORCE++-baseline (Hu et al. 2025), ``(N, T)``:
    :func:`reinforce_pp_baseline_advantages`."""
    adv = reinforce_pp_baseline_advantages(_seq_rewards(x), x.mask, x.group_size)
    return AdvantageOutput(adv)


@register_advantage("grpo_passk", needs_groups=True)
def grpo_passk(x: AdvantageInput) -> AdvantageOutput:
    """Pass@k (Tang et al. 2025), ``(N,)``: :func:`grpo_passk_advantages` with
    ``scale=x.adv_scale``."""
    return AdvantageOutput(grpo_passk_advantages(_seq_rewards(x), x.group_size, x.adv_scale))


@register_advantage("maxrl", needs_groups=True)
def maxrl(x: AdvantageInput) -> AdvantageOutput:
    """MaxRL (Tajwar et al. 2026), ``(N,)``: :func:`maxrl_advantages` on the raw rewards
    (the KL is not subtracted: the estimator needs pass/fail rewards)."""
    return AdvantageOutput(maxrl_advantages(x.rewards, x.group_size))


@register_advantage("gdpo", needs_groups=True, needs_components=True)
def gdpo(x: AdvantageInput) -> AdvantageOutput:
    """GDPO (Liu et al. 2026), ``(N,)``: :func:`gdpo_advantages` on ``x.components`` with
    ``x.weights``, on the device of ``x.rewards`` (``RolloutBatch.components`` live on the
    CPU). Ignores ``rewards`` (so shaping is left out unless passed as a term) and ``kl``."""
    if x.components is None:
        raise ValueError("advantage 'gdpo' needs the per-term rewards (AdvantageInput.components)")
    comps = {k: v.to(x.rewards.device) for k, v in x.components.items()}
    return AdvantageOutput(gdpo_advantages(comps, x.group_size, x.weights))


@register_advantage("remax", needs_greedy_baseline=True)
def remax(x: AdvantageInput) -> AdvantageOutput:
    """ReMax (Li et al. 2023): :func:`remax_advantages`, ``(N,)``. With the KL in the reward
    (``x.kl`` given) it is per token, ``(N, T)``, as verl's
    ``compute_remax_outcome_advantage``: ``A_t = sum_{t' >= t} r_{t'} - b_p`` on the shaped
    per-token rewards (:func:`~signalrl.losses.advantages.token_level_rewards`). Needs
    ``x.baseline_rewards``, the rewards of one greedy rollout per prompt."""
    if x.baseline_rewards is None:
        raise ValueError(
            "advantage 'remax' needs the reward of one greedy rollout per prompt "
            "(AdvantageInput.baseline_rewards, shape (N // group_size,))"
        )
    if x.kl is None:
        return AdvantageOutput(remax_advantages(x.rewards, x.baseline_rewards, x.group_size))
    tok = token_level_rewards(x.rewards, x.mask, kl=x.kl, kl_coef=x.kl_coef)
    to_go = tok.flip(-1).cumsum(-1).flip(-1)
    b = _row_baseline(x.baseline_rewards, x.rewards, x.group_size).to(tok.dtype)
    return AdvantageOutput(torch.where(x.mask > 0, to_go - b[:, None], 0.0))
