"""Advantage estimators: group normalisation (GRPO, Dr. GRPO), RLOO, REINFORCE++ and GAE.

Pure tensor functions. Conventions (see docs/architecture.md, "Tensor conventions"):

- sequence rewards are ``(N,)``; the rollouts of one prompt are contiguous groups of size ``G``;
- per-token tensors are ``(B, T)``; ``mask`` is ``(B, T)`` float, 1.0 on completion tokens
  that count and 0.0 on prompt and padding positions.

Advantages and returns are training *targets*: every estimator here works on detached inputs
and returns tensors that carry no gradient. ``whiten`` is a generic utility and does not
detach.

The estimators a recipe selects by name (``rl.advantage``) are registered in
:data:`signalrl.registry.ADVANTAGES`, each a pure function with one signature,
``fn(x: AdvantageInput) -> AdvantageOutput``: ``group``, ``rloo``, ``reinforce_pp`` and
``gae`` here, and the estimators of :mod:`signalrl.losses.advantages_frontier` (``opo``,
``gpg``, ``reinforce_pp_baseline``, ``grpo_passk``, ``maxrl``, ``gdpo``, ``remax``). A user
estimator with that signature is selected as ``module:function`` (set
``fn.needs_values = True`` on it if it reads the critic's ``values``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from signalrl.losses._checks import check_same_2d as _check_same_2d
from signalrl.registry import ADVANTAGES, register_advantage

__all__ = [
    "GROUP_SCALES",
    "AdvantageInput",
    "AdvantageOutput",
    "compute_advantages",
    "gae",
    "group_advantages",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "token_level_rewards",
    "whiten",
]

GROUP_SCALES: tuple[str, ...] = ("group", "batch", "none")


def _float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.to(torch.float32)


def _check_groups(rewards: Tensor, group_size: int) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide the number of rewards N={rewards.numel()}"
        )


def _check_gamma(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-6,
) -> Tensor:
    """Group-relative advantages of GRPO and its variants.

    ``rewards`` is ``(N,)`` with the ``G = group_size`` rollouts of each prompt contiguous.
    With ``mean_g`` the mean of the group a reward belongs to:

    - ``scale="group"`` (GRPO, Shao et al. 2024, "DeepSeekMath"):
      ``A_i = (r_i - mean_g) / (std_g + eps)`` where ``std_g`` is the unbiased (``G - 1``)
      sample standard deviation of the group; a group of size 1 has ``std_g = 0``.
      A constant group (including any group of size 1) gets exactly zero advantages, for
      every ``scale`` and even with ``eps=0``.
    - ``scale="batch"``: ``A_i = (r_i - mean_g) / (std_batch + eps)`` with ``std_batch`` the
      unbiased standard deviation of all ``N`` rewards (0 when ``N == 1``).
    - ``scale="none"`` (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training"):
      ``A_i = r_i - mean_g``, no division, which removes the difficulty bias of std scaling.

    Returns a detached float tensor of shape ``(N,)``.
    """
    _check_groups(rewards, group_size)
    if scale not in GROUP_SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid choices: {', '.join(GROUP_SCALES)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    r = _float(rewards.detach())
    grouped = r.view(-1, group_size)
    # A constant group has exactly zero advantage (no rounding noise, no 0/0 even if eps=0).
    constant = grouped.amax(dim=-1, keepdim=True) == grouped.amin(dim=-1, keepdim=True)
    centered = torch.where(constant, 0.0, grouped - grouped.mean(dim=-1, keepdim=True))
    if scale == "none":
        return centered.reshape(-1)
    if scale == "group":
        if group_size > 1:
            std = grouped.std(dim=-1, unbiased=True, keepdim=True)
        else:
            std = torch.zeros_like(grouped)
        scaled = centered / (std + eps)
    else:  # scale == "batch"
        std_b = r.std(unbiased=True) if r.numel() > 1 else r.new_zeros(())
        scaled = centered / (std_b + eps)
    return torch.where(constant, 0.0, scaled).reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE Leave-One-Out advantages (Ahmadian et al. 2024, "Back to Basics").

    Each reward minus the mean of the other ``G - 1`` rewards of its group:
    ``A_i = r_i - (sum_{j in g} r_j - r_i) / (G - 1)``, equivalently
    ``G / (G - 1) * (r_i - mean_g)``. Requires ``G >= 2``. Returns detached ``(N,)``.
    """
    _check_groups(rewards, group_size)
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2, got {group_size}")
    grouped = _float(rewards.detach()).view(-1, group_size)
    others = (grouped.sum(dim=-1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)


def _last_token_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the last position with ``mask > 0`` per row, and whether the row has any."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, torch.full_like(positions, -1)).max(dim=-1).values
    return last.clamp(min=0), last >= 0


def token_level_rewards(
    seq_rewards: Tensor,
    mask: Tensor,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
) -> Tensor:
    """Per-token rewards for REINFORCE++ / PPO (Ouyang et al. 2022 reward shaping; Hu 2025).

    ``r_t = R * [t == last completion token] - kl_coef * kl_t`` on unmasked tokens and 0 on
    masked ones, where ``R`` is the sequence reward ``(B,)`` and ``kl`` an optional ``(B, T)``
    per-token KL estimate (e.g. :func:`signalrl.losses.kl.kl_estimate`). The last completion
    token is the last position of the row with ``mask > 0`` (leading prompt zeros and
    trailing padding are fine); a row with an empty mask gets all zeros. Returns detached
    ``(B, T)``.
    """
    B, T = _check_same_2d(mask=mask)
    if seq_rewards.shape != (B,):
        raise ValueError(f"seq_rewards must have shape ({B},), got {tuple(seq_rewards.shape)}")
    if kl is not None:
        _check_same_2d(mask=mask, kl=kl)
    out = torch.zeros(B, T, dtype=torch.float32, device=mask.device)
    last, has_any = _last_token_index(mask)
    rows = torch.arange(B, device=mask.device)
    out[rows, last] = torch.where(has_any, _float(seq_rewards.detach()).to(out.dtype), 0.0)
    if kl is not None and kl_coef != 0.0:
        out = out - kl_coef * kl.detach().to(out.dtype)
    return torch.where(mask > 0, out, 0.0)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten ``x`` over the unmasked entries of the whole batch.

    ``y = (x - mu) / sqrt(var + eps)`` (or ``x / sqrt(var + eps)`` when ``shift_mean=False``),
    where ``mu`` and ``var`` are the mean and the unbiased (``n - 1``) variance of ``x`` over
    positions with ``mask > 0`` (``var = 0`` when ``n <= 1``). Masked positions are 0 in the
    output. This is the advantage whitening of PPO implementations (e.g. Ouyang et al. 2022;
    TRL's ``masked_whiten``). Keeps gradients.
    """
    _check_same_2d(x=x, mask=mask)
    keep = mask > 0
    xm = torch.where(keep, x, 0.0)
    n = keep.sum().to(xm.dtype)
    mean = xm.sum() / n.clamp(min=1.0)
    var = torch.where(keep, x - mean, 0.0).pow(2).sum() / (n - 1.0).clamp(min=1.0)
    y = (xm - mean) if shift_mean else xm
    return torch.where(keep, y * torch.rsqrt(var + eps), 0.0)


def reinforce_pp_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    eps: float = 1e-8,
) -> Tensor:
    """REINFORCE++ advantages (Hu 2025, "REINFORCE++").

    Discounted return-to-go over the unmasked tokens of each row,
    ``G_t = r_t + gamma * G_{t'}`` with ``t'`` the next unmasked position (masked positions
    are skipped and contribute no reward), then whitened over all unmasked tokens of the
    global batch: ``A_t = (G_t - mean(G)) / sqrt(var(G) + eps)`` (see :func:`whiten`).
    ``token_rewards`` usually comes from :func:`token_level_rewards` (sequence reward on the
    last completion token minus a per-token KL penalty). Masked positions get 0.
    Returns detached ``(B, T)``.
    """
    _check_same_2d(token_rewards=token_rewards, mask=mask)
    _check_gamma("gamma", gamma)
    m = mask.detach() > 0
    r = torch.where(m, _float(token_rewards.detach()), 0.0)
    returns = torch.zeros_like(r)
    running = r.new_zeros(r.shape[0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = torch.where(m[:, t], r[:, t] + gamma * running, running)
        returns[:, t] = running
    return whiten(returns, m.to(r.dtype), shift_mean=True, eps=eps)


def gae(
    token_rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation").

    Over the unmasked positions ``t_1 < t_2 < ... < t_n`` of a row:
    ``delta_k = r_{t_k} + gamma * V_{t_{k+1}} - V_{t_k}`` with ``V_{t_{n+1}} = 0`` (no bootstrap
    past the last completion token) and ``A_{t_k} = delta_k + gamma * lam * A_{t_{k+1}}``.
    Masked positions (prompt, padding, or holes) are skipped and get advantage 0.
    ``returns = advantages + values`` on unmasked tokens, 0 elsewhere.

    Returns raw (not whitened) ``(advantages, returns)``, both detached ``(B, T)``; whiten the
    advantages with :func:`whiten` if desired.
    """
    _check_same_2d(token_rewards=token_rewards, values=values, mask=mask)
    _check_gamma("gamma", gamma)
    _check_gamma("lam", lam)
    m = mask.detach() > 0
    r = _float(token_rewards.detach())
    v = _float(values.detach()).to(r.dtype)
    advantages = torch.zeros_like(r)
    next_value = r.new_zeros(r.shape[0])
    next_adv = r.new_zeros(r.shape[0])
    for t in range(r.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = delta + gamma * lam * next_adv
        mt = m[:, t]
        advantages[:, t] = torch.where(mt, adv_t, 0.0)
        next_adv = torch.where(mt, adv_t, next_adv)
        next_value = torch.where(mt, v[:, t], next_value)
    returns = torch.where(m, advantages + v, 0.0)
    return advantages, returns


# --------------------------------------------------------------------------- registry entries


@dataclass(frozen=True)
class AdvantageInput:
    """What an advantage estimator gets (the one signature of the ``ADVANTAGES`` registry).

    Attributes:
        rewards: ``(N,)`` sequence rewards; the ``group_size`` rollouts of one prompt are
            contiguous rows.
        mask: ``(N, T)`` float completion mask (1.0 on the tokens that count).
        group_size: rollouts per prompt ``G`` (divides ``N``).
        kl: ``(N, T)`` per-token estimate of ``KL(policy || ref)``, already multiplied by
            ``mask``; present only when the KL goes in the reward (``None`` otherwise).
        kl_coef: weight of ``kl`` in the reward.
        values: ``(N, T)`` critic values (estimators registered with ``needs_values=True``).
        adv_scale: ``"group"``, ``"batch"`` or ``"none"`` (see :func:`group_advantages`).
        gamma: discount; lam: GAE's lambda.
        whiten: whiten the GAE advantages over the batch's unmasked tokens.
        components: per reward term, its raw ``(N,)`` values (``RolloutBatch.components``),
            for estimators that normalise each term separately (``gdpo``).
        weights: per reward term, its weight in the total (the recipe's
            ``rewards[i].weight``), keyed like ``components``; ``None`` means all 1.0.
        baseline_rewards: ``(N // group_size,)`` reward of one extra greedy rollout per
            prompt, for estimators registered with ``needs_greedy_baseline=True``
            (``remax``); ``None`` otherwise.
        token_rewards: ``(N, T)`` per-token rewards of multi-turn episodes (each turn's
            reward on its last sampled token; row sums are ``rewards``), used by the
            estimators on token-level rewards (``reinforce_pp``, ``gae``) in place of the
            sequence reward on the last token; ``None`` (single-turn): ``rewards`` there.

    Completion lengths are ``mask.sum(-1)`` (used by ``opo``).
    """

    rewards: Tensor
    mask: Tensor
    group_size: int
    kl: Tensor | None = None
    kl_coef: float = 0.0
    values: Tensor | None = None
    adv_scale: str = "group"
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = False
    components: dict[str, Tensor] | None = None
    weights: dict[str, float] | None = None
    baseline_rewards: Tensor | None = None
    token_rewards: Tensor | None = None


@dataclass(frozen=True)
class AdvantageOutput:
    """An estimator's result: ``advantages`` ``(N,)`` (one per sequence, broadcast over its
    tokens) or ``(N, T)`` (per token), and the value targets ``returns`` ``(N, T)`` of the
    estimators that train a critic (``None`` otherwise). Both detached."""

    advantages: Tensor
    returns: Tensor | None = None


def _shaped_rewards(x: AdvantageInput) -> Tensor:
    """Per-token rewards: the sequence reward on the last completion token (or, given,
    ``token_rewards``: each turn's reward on its last sampled token) minus ``kl_coef * kl``
    (when ``kl`` is given), 0 where ``mask`` is 0; see :func:`token_level_rewards`."""
    kl_coef = x.kl_coef if x.kl is not None else 0.0
    if x.token_rewards is None:
        return token_level_rewards(x.rewards, x.mask, kl=x.kl, kl_coef=kl_coef)
    _check_same_2d(mask=x.mask, token_rewards=x.token_rewards)
    out = _float(x.token_rewards.detach()).to(torch.float32)
    if x.kl is not None and kl_coef != 0.0:
        out = out - kl_coef * x.kl.detach().to(out.dtype)
    return torch.where(x.mask > 0, out, 0.0)


@register_advantage("group", needs_groups=True)
def group(x: AdvantageInput) -> AdvantageOutput:
    """GRPO / Dr. GRPO group-relative advantages, ``(N,)``: :func:`group_advantages` with
    ``scale=x.adv_scale`` (Shao et al. 2024; Liu et al. 2025). Ignores ``kl``."""
    scale: Any = x.adv_scale  # validated by group_advantages
    return AdvantageOutput(group_advantages(x.rewards, x.group_size, scale=scale))


@register_advantage("rloo", needs_groups=True)
def rloo(x: AdvantageInput) -> AdvantageOutput:
    """RLOO leave-one-out advantages, ``(N,)`` (Ahmadian et al. 2024): on
    ``r = rewards - kl_coef * kl.sum(-1)`` (the sequence KL in the reward, when ``kl`` is
    given), ``A_i = r_i - mean_{j != i in g} r_j`` (:func:`rloo_advantages`)."""
    r = x.rewards - x.kl_coef * x.kl.sum(-1) if x.kl is not None else x.rewards
    return AdvantageOutput(rloo_advantages(r, x.group_size))


@register_advantage("reinforce_pp")
def reinforce_pp(x: AdvantageInput) -> AdvantageOutput:
    """REINFORCE++ (Hu 2025), ``(N, T)``: the discounted return-to-go (``gamma``) of the
    shaped per-token rewards (:func:`token_level_rewards`: reward on the last token, or
    multi-turn ``token_rewards`` on each turn's last sampled token, minus ``kl_coef * kl``),
    whitened over the batch (:func:`reinforce_pp_advantages`)."""
    return AdvantageOutput(reinforce_pp_advantages(_shaped_rewards(x), x.mask, gamma=x.gamma))


@register_advantage("gae", needs_values=True)
def gae_advantages(x: AdvantageInput) -> AdvantageOutput:
    """PPO's GAE (Schulman et al. 2016), ``(N, T)``, on the shaped per-token rewards
    (:func:`token_level_rewards`, or multi-turn ``token_rewards``) and the critic's
    ``values``, with ``gamma`` and ``lam`` (:func:`gae`); with ``whiten``,
    ``A = whiten(A, mask) * mask``. ``returns`` are the value targets ``A_raw + V`` (from the
    raw, unwhitened advantages)."""
    if x.values is None:
        raise ValueError("advantage 'gae' needs the critic's values (AdvantageInput.values)")
    adv, returns = gae(_shaped_rewards(x), x.values, x.mask, gamma=x.gamma, lam=x.lam)
    if x.whiten:
        adv = whiten(adv, x.mask) * x.mask
    return AdvantageOutput(adv, returns)


def compute_advantages(x: AdvantageInput, estimator: str) -> AdvantageOutput:
    """Run the ``ADVANTAGES`` entry ``estimator`` (a registered name or a user
    ``module:function``) on ``x``; an unknown name is a ValueError listing the valid ones."""
    return ADVANTAGES.get(estimator)(x)
