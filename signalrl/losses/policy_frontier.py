"""More registered policy losses (``rl.loss_type``): GPG, SAPO, GMPO, DPPO (TV / KL),
GSPO-token, Clip-Cov and KL-Cov.

Each is ``fn(x: PolicyLossInput) -> (per_token_loss (B, T), metrics)`` like the entries of
:mod:`signalrl.losses.policy`, which builds the input and aggregates the result (see
:func:`signalrl.losses.policy.policy_loss`). Pure tensor functions; conventions in
docs/architecture.md ("Tensor conventions").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import Tensor

from signalrl.losses.policy import LOG_RATIO_CLAMP, PolicyLossInput, _frac, importance_ratio
from signalrl.registry import register_policy_loss

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    lo = (x & 0xFFFF) * c
    return (lo + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _hash32(x: Tensor) -> Tensor:
    """Wellons' `lowbias32` on int64 lanes, as `signalrl.rollout.noise.hash32` (the same
    integers on every device; losses/ does not import the rollout layer)."""
    x = x & _M32
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def _mix(key: Tensor, value: Tensor | int) -> Tensor:
    v = value if isinstance(value, Tensor) else torch.tensor(value, device=key.device)
    return _hash32(key ^ _hash32((v + 0x9E3779B9) & _M32))


# (seed, step, epoch, global row ids) of the micro-batch being trained: Clip-Cov's draw key
_CLIP_COV_KEY: ContextVar[tuple[int, int, int, Tensor] | None] = ContextVar(
    "clip_cov_key", default=None
)


@contextlib.contextmanager
def clip_cov_key(seed: int, step: int, epoch: int, rows: Tensor) -> Iterator[None]:
    """Within this block Clip-Cov's random pick is keyed by `(seed, step, epoch)` and the
    global indices `rows` `(B,)` of the micro-batch's rows (the trainer sets it)."""
    token = _CLIP_COV_KEY.set((seed, step, epoch, rows))
    try:
        yield
    finally:
        _CLIP_COV_KEY.reset(token)


def token_priorities(seed: int, step: int, epoch: int, rows: Tensor, width: int) -> Tensor:
    """`(B, width)` uniform-looking int64 priorities, a pure function of `(seed, step, epoch,
    row index, position)` (the counter-based hash of `signalrl.rollout.noise`): a token's
    priority does not depend on the other rows of its batch, their order or the device."""
    base = torch.tensor(seed & _M32, dtype=torch.long, device=rows.device)
    base = _mix(_mix(_mix(base, step & _M32), epoch & _M32), 1)
    keys = _mix(base.expand(rows.shape), rows.long() & _M32)
    pos = torch.arange(width, device=rows.device)
    return _hash32(keys[:, None] ^ _hash32(pos[None, :] + 0x9E3779B9))


__all__ = [
    "clip_cov",
    "clip_cov_key",
    "dppo_kl",
    "dppo_tv",
    "gmpo",
    "gpg",
    "gspo_token",
    "kl_cov",
    "sapo",
    "token_priorities",
]

Out = tuple[Tensor, dict[str, float]]


def _log_ratio(x: PolicyLossInput) -> Tensor:
    """``clamp(logp - old_logp, -20, 20)`` with 0 at masked positions (with grad)."""
    lr = torch.where(x.keep, x.logps - x.old_logps, 0.0)
    return lr.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _masked_mean(v: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep, v, 0.0).sum() / keep.sum().clamp(min=1)


def _ppo_terms(x: PolicyLossInput) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's two surrogate terms ``-A r`` and ``-A clip(r)`` and their max."""
    pg1 = -x.advantages * x.ratio
    pg2 = -x.advantages * x.ratio.clamp(1.0 - x.clip_low, 1.0 + x.clip_high)
    return pg1, pg2, torch.maximum(pg1, pg2)


def _clip_fracs(x: PolicyLossInput, ratio: Tensor) -> dict[str, float]:
    r, adv = ratio.detach(), x.advantages
    return {
        "clip_frac/low": _frac((adv < 0) & (r < 1.0 - x.clip_low), x.keep, x.n_tokens),
        "clip_frac/high": _frac((adv > 0) & (r > 1.0 + x.clip_high), x.keep, x.n_tokens),
    }


@register_policy_loss("gpg")
def gpg(x: PolicyLossInput) -> Out:
    """GPG (Chu et al. 2025, "GPG: A Simple and Strong Reinforcement Learning Baseline for
    Model Reasoning", arXiv 2504.02546): plain policy gradient, no ratio, no clipping, no KL:
    ``l_t = -A_t * logp_t``, gradient ``-A_t grad(logp_t)`` (on-policy the PPO ratio is 1).

    As verl's ``compute_policy_loss_gpg``. The paper pairs it with ``token-mean`` and a
    group-mean advantage (its ``alpha`` rescaling of the advantage is not part of the loss).
    """
    return -x.advantages * x.logps, {}


@register_policy_loss("sapo")
def sapo(x: PolicyLossInput) -> Out:
    """SAPO (Gao et al. 2025, "Soft Adaptive Policy Optimization", arXiv 2511.20347): a soft
    sigmoid gate of the ratio replaces the hard clip:

    ``l_t = -f(r_t) A_t``, ``f(r) = sigmoid(tau (r - 1)) * 4 / tau``, ``tau = sapo_tau_pos``
    if ``A_t > 0`` else ``sapo_tau_neg`` (defaults 1.0 / 1.05, as verl and TRL). The gradient
    weight ``f'(r) r = 4 s (1 - s) r`` (``s = sigmoid(tau (r - 1))``) is 1 at ``r = 1`` and
    decays smoothly off-policy, faster for negative advantages. The paper averages with
    ``seq-mean-token-mean``. Metric ``sapo/gate_mean``: the mean gradient weight.
    """
    if x.sapo_tau_pos <= 0 or x.sapo_tau_neg <= 0:
        raise ValueError(f"SAPO temperatures must be > 0, got {x.sapo_tau_pos}, {x.sapo_tau_neg}")
    tau = torch.where(x.advantages > 0, x.sapo_tau_pos, x.sapo_tau_neg).to(x.ratio.dtype)
    s = torch.sigmoid(tau * (x.ratio - 1.0))
    sd = s.detach()
    weight = 4.0 * sd * (1.0 - sd) * x.ratio.detach()
    return -s * (4.0 / tau) * x.advantages, {"sapo/gate_mean": float(_masked_mean(weight, x.keep))}


@register_policy_loss("gmpo", agg="seq-mean-token-mean")
def gmpo(x: PolicyLossInput) -> Out:
    """GMPO (Zhao et al. 2025, "Geometric-Mean Policy Optimization", arXiv 2507.20673): the
    geometric mean of the token ratios, clipped per token in log space:

    ``L_i = -A_i exp(mean_{t in o_i} sgn(A_i) min(sgn(A_i) d_t, sgn(A_i) clamp(d_t, -clip_low,
    clip_high)))``, ``d_t = logp_t - old_logp_t``, ``A_i`` the mask-mean advantage of
    sequence ``i``. As verl's ``compute_policy_loss_geo_mean``: ``clip_low`` / ``clip_high``
    bound the LOG ratio (the paper: 0.4, i.e. ratios in ``(e^-0.4, e^0.4)``). ``L_i`` is put
    on every token of ``o_i``, so the registry requires ``agg="seq-mean-token-mean"`` (the
    paper's mean over sequences). Metrics: ``clip_frac/low`` (``A < 0``, ``d < -clip_low``)
    and ``clip_frac/high`` (``A > 0``, ``d > clip_high``) over tokens.
    """
    d = _log_ratio(x)
    w = torch.where(x.keep, x.mask, 0.0).to(d.dtype)
    n = w.sum(dim=-1).clamp(min=1e-8)
    adv = (x.advantages * w).sum(dim=-1) / n
    sgn = torch.sign(adv).unsqueeze(-1)
    d_min = sgn * torch.minimum(sgn * d, sgn * d.clamp(-x.clip_low, x.clip_high))
    seq_loss = -adv * torch.exp((d_min * w).sum(dim=-1) / n)
    per_token = seq_loss.unsqueeze(-1).expand_as(d)
    a, k = adv.unsqueeze(-1).expand_as(d), x.keep
    dd = d.detach()
    return per_token, {
        "clip_frac/low": _frac((a < 0) & (dd < -x.clip_low), k, x.n_tokens),
        "clip_frac/high": _frac((a > 0) & (dd > x.clip_high), k, x.n_tokens),
    }


def _dppo(x: PolicyLossInput, too_far_up: Tensor, too_far_down: Tensor) -> Out:
    """DPPO's masked loss ``-A sg(min(r, dppo_ratio_cap)) valid logp`` (see :func:`dppo_tv`)."""
    if x.dppo_ratio_cap <= 0:
        raise ValueError(f"dppo_ratio_cap must be > 0, got {x.dppo_ratio_cap}")
    invalid = torch.where(x.advantages > 0, too_far_up, too_far_down)
    valid = (~invalid).to(x.logps.dtype)
    weight = torch.exp(_log_ratio(x)).clamp(max=x.dppo_ratio_cap).detach()
    per_token = -x.advantages * weight * valid * x.logps
    return per_token, {
        "clip_frac/low": _frac(invalid & (x.advantages < 0), x.keep, x.n_tokens),
        "clip_frac/high": _frac(invalid & (x.advantages > 0), x.keep, x.n_tokens),
    }


@register_policy_loss("dppo_tv")
def dppo_tv(x: PolicyLossInput) -> Out:
    """DPPO-Binary-TV (Qi et al. 2026, "Rethinking the Trust Region in LLM Reinforcement
    Learning", arXiv 2602.04879; reference: sail-sg/Stable-RL ``core_algos.py``): a trust
    region on the divergence, not the ratio. With ``p = exp(logp)``, ``p_old = exp(old_logp)``
    (the binary TV proxy ``|p - p_old|``), a token is masked when it left the region in the
    direction its advantage pushes: ``A > 0`` and ``p - p_old > clip_high``, or ``A <= 0``
    and ``p - p_old < -clip_low``. ``l_t = -A_t sg(min(r_t, dppo_ratio_cap)) m_t logp_t`` (the
    gradient ``-A r grad(logp)`` of the unclipped surrogate on kept tokens, 0 on masked
    ones). ``clip_low`` / ``clip_high`` are the divergence bounds here, as in the reference.
    Metrics ``clip_frac/low`` / ``clip_frac/high``: masked tokens with ``A < 0`` / ``A > 0``.
    """
    delta = torch.exp(x.logps.detach()) - torch.exp(x.old_logps)
    return _dppo(x, delta > x.clip_high, delta < -x.clip_low)


@register_policy_loss("dppo_kl")
def dppo_kl(x: PolicyLossInput) -> Out:
    """DPPO-Binary-KL (Qi et al. 2026, arXiv 2602.04879, as :func:`dppo_tv`): the divergence
    is the KL of the binary distributions (the sampled token vs the rest),
    ``kl = p_old log(p_old / p) + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p + 1e-8))``; a
    token is masked when ``A > 0``, ``p > p_old`` and ``kl > clip_high``, or ``A <= 0``,
    ``p < p_old`` and ``kl > clip_low``. Same loss and metrics as :func:`dppo_tv`.
    """
    lp, lq = x.logps.detach(), x.old_logps
    p, q = torch.exp(lp), torch.exp(lq)
    kl = q * (lq - lp) + (1.0 - q) * torch.log((1.0 - q + 1e-8) / (1.0 - p + 1e-8))
    return _dppo(x, (kl > x.clip_high) & (p > q), (kl > x.clip_low) & (p < q))


@register_policy_loss("gspo_token", agg="seq-mean-token-mean")
def gspo_token(x: PolicyLossInput) -> Out:
    """GSPO-token (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071,
    eq. 13-14): the sequence ratio with per-token advantages,

    ``s_{i,t} = sg(s_i) * pi(y_t) / sg(pi(y_t))``, ``s_i = exp(mean_t (logp_t - old_logp_t))``,
    ``l_t = max(-A_{i,t} s_{i,t}, -A_{i,t} clip(s_{i,t}, 1 - clip_low, 1 + clip_high))``.
    The value of ``s_{i,t}`` is ``s_i`` and its gradient ``s_i grad(logp_t)``; with ``(B,)``
    advantages it equals GSPO. The ratio is always the sequence one (``ratio_level`` is not
    needed); the registry requires ``agg="seq-mean-token-mean"`` (the paper's
    ``1/G sum_i 1/|y_i| sum_t``). Metrics: PPO's ``clip_frac/low`` / ``clip_frac/high``.
    """
    s = importance_ratio(x.logps, x.old_logps, x.mask, "sequence")
    pg1 = -x.advantages * s
    pg2 = -x.advantages * s.clamp(1.0 - x.clip_low, 1.0 + x.clip_high)
    return torch.maximum(pg1, pg2), _clip_fracs(x, s)


def _covariance(x: PolicyLossInput) -> Tensor:
    """Per-token ``(A - mean A)(logp - mean logp)`` (means over kept tokens), detached."""
    adv, lp = x.advantages, x.logps.detach()
    return (adv - _masked_mean(adv, x.keep)) * (lp - _masked_mean(lp, x.keep))


def _n_selected(x: PolicyLossInput) -> int:
    if not 0.0 < x.cov_frac <= 1.0:
        raise ValueError(f"cov_frac must be in (0, 1], got {x.cov_frac}")
    return max(int(x.cov_frac * x.n_tokens), 1)


@register_policy_loss("clip_cov")
def clip_cov(x: PolicyLossInput) -> Out:
    """Clip-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for
    Reasoning Language Models", arXiv 2505.22617; as verl's ``compute_policy_loss_clip_cov``).

    The PPO surrogate ``l_t = max(-A r, -A clip(r))``, with the gradient of a few tokens of
    high covariance ``cov_t = (A_t - mean A)(logp_t - mean logp)`` removed (``l_t = 0``):
    among kept tokens not already clipped by PPO with ``clip_cov_lb < cov_t < clip_cov_ub``,
    ``max(int(cov_frac * n_tokens), 1)`` are drawn at random: the candidates of lowest
    `token_priorities` (keyed by `clip_cov_key`'s seed, step, epoch and global row ids; rows
    ``0..B-1`` of seed 0, step 0 outside it), so the draw is reproducible, whatever torch's
    RNG state, and a row's tokens get the same priorities however the batch is split or
    ordered. Defaults as verl: ``cov_frac=2e-4``, ``(lb, ub) = (1, 5)``. Metrics: PPO's clip
    fractions and ``clip_frac/cov`` (the tokens removed).
    """
    if x.clip_cov_lb >= x.clip_cov_ub:
        raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got {x.clip_cov_lb}, {x.clip_cov_ub}")
    pg1, pg2, per_token = _ppo_terms(x)
    cov = _covariance(x)
    window = (cov > x.clip_cov_lb) & (cov < x.clip_cov_ub)
    cand = torch.nonzero(x.keep & ~(pg2.detach() > pg1.detach()) & window)
    key = _CLIP_COV_KEY.get() or (0, 0, 0, torch.arange(cov.shape[0], device=cov.device))
    if key[3].shape != cov.shape[:1]:
        raise ValueError(f"clip_cov_key: {tuple(key[3].shape)} row ids for {cov.shape[0]} rows")
    prio = token_priorities(*key[:3], key[3].to(cov.device), cov.shape[1])
    order = torch.argsort(prio[cand[:, 0], cand[:, 1]], stable=True)
    cand = cand[order[: _n_selected(x)]]
    corr = torch.ones_like(per_token)
    corr[cand[:, 0], cand[:, 1]] = 0.0
    metrics = _clip_fracs(x, x.ratio)
    metrics["clip_frac/cov"] = len(cand) / max(x.n_tokens, 1)
    return per_token * corr, metrics


@register_policy_loss("kl_cov")
def kl_cov(x: PolicyLossInput) -> Out:
    """KL-Cov (Cui et al. 2025, arXiv 2505.22617; as verl's ``compute_policy_loss_kl_cov``).

    The unclipped surrogate ``l_t = -A_t r_t``, plus ``kl_cov_coef * |logp_t - old_logp_t|``
    on the ``max(int(cov_frac * n_tokens), 1)`` kept tokens of largest covariance
    ``cov_t = (A_t - mean A)(logp_t - mean logp)`` (top-k, deterministic). Defaults:
    ``cov_frac=2e-4`` (the paper: 2e-3 for 7B, 2e-4 for 32B), ``kl_cov_coef=1``.
    Metric ``kl_cov/frac``: the tokens penalised.
    """
    if x.kl_cov_coef < 0:
        raise ValueError(f"kl_cov_coef must be >= 0, got {x.kl_cov_coef}")
    per_token = -x.advantages * x.ratio
    if x.n_tokens == 0:
        return per_token, {"kl_cov/frac": 0.0}
    cov = torch.where(x.keep, _covariance(x), -torch.inf).flatten()
    top = torch.topk(cov, _n_selected(x)).indices
    chosen = torch.zeros_like(cov, dtype=torch.bool)
    chosen[top] = True
    chosen = chosen.view_as(per_token)
    penalty = x.kl_cov_coef * (x.logps - x.old_logps).abs()
    per_token = torch.where(chosen, per_token + penalty, per_token)
    return per_token, {"kl_cov/frac": int(chosen.sum()) / x.n_tokens}
