"""Policy-gradient losses: loss aggregation, PPO/DAPO clipped surrogate, GSPO, dual clip,
CISPO, clipped value loss, and memory-bounded per-token log-prob / entropy from logits.

Pure tensor functions. Conventions (docs/architecture.md, "Tensor conventions"): ``logps``
are ``(B, T)`` float32 log-probs of the realised tokens, ``mask`` is ``(B, T)`` float (1.0 on
completion tokens that count), advantages are ``(B,)`` or ``(B, T)``.

The per-token losses a recipe selects by name (``rl.loss_type``) are registered in
:data:`signalrl.registry.POLICY_LOSSES`: ``ppo`` and ``cispo``, each
``fn(x: PolicyLossInput) -> tuple[Tensor, dict[str, float]]``, and the later ones in
:mod:`signalrl.losses.policy_frontier` (gpg, sapo, gmpo, dppo_tv, dppo_kl, gspo_token,
clip_cov, kl_cov). A new loss is one more decorated function (or a user
``module:function``); :func:`policy_loss` does the rest. :func:`top_entropy_mask` is the
80/20 rule's token mask, usable with any loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from signalrl.losses._checks import check_same_2d as _check_same_2d
from signalrl.registry import POLICY_LOSSES, register_policy_loss

__all__ = [
    "AGG_MODES",
    "RATIO_LEVELS",
    "PolicyLossInput",
    "aggregate",
    "cispo",
    "entropy_from_logits",
    "explained_variance",
    "hidden_token_logprobs",
    "importance_ratio",
    "policy_loss",
    "ppo",
    "ratio_metrics",
    "token_logprobs",
    "top_entropy_mask",
    "value_loss",
]

AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
RATIO_LEVELS: tuple[str, ...] = ("token", "sequence")

#: Bound on |log pi - log pi_old| before ``exp`` in the importance ratio.
LOG_RATIO_CLAMP = 20.0

DEFAULT_CHUNK_SIZE = 1024

AggMode = Literal[
    "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
]


# --------------------------------------------------------------------------- validation


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


# --------------------------------------------------------------------------- aggregation


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    mode: AggMode | str,
    max_len: int | None = None,
) -> Tensor:
    """Reduce a ``(B, T)`` per-token loss to a scalar over the tokens where ``mask > 0``.

    With ``l_{i,t}`` the per-token loss, ``m_{i,t}`` the mask and ``|o_i| = sum_t m_{i,t}``:

    - ``"token-mean"``: ``sum_{i,t} m l / sum_{i,t} m`` -- every token weighs the same
      (DAPO, Yu et al. 2025).
    - ``"seq-mean-token-mean"``: ``mean_i (sum_t m l / |o_i|)`` -- the original GRPO
      objective (Shao et al. 2024).
    - ``"seq-mean-token-sum"``: ``mean_i sum_t m l``.
    - ``"seq-mean-token-sum-norm"``: ``mean_i (sum_t m l / max_len)`` -- Dr. GRPO (Liu et al.
      2025), a constant normaliser that removes the length bias; ``max_len`` is required.

    In the three ``seq-mean-*`` modes, rows with an empty mask are excluded from the outer mean.
    The mask may hold non-binary weights (they multiply the loss). An all-zero mask returns
    0 that is still connected to the graph (its gradient is zero), never NaN; values at masked
    positions (even NaN/inf) never reach the result.
    """
    _check_same_2d(per_token=per_token, mask=mask)
    _check_choice("aggregation mode", mode, AGG_MODES)
    if mode == "seq-mean-token-sum-norm":
        if max_len is None:
            raise ValueError("aggregation mode 'seq-mean-token-sum-norm' requires max_len")
        if max_len <= 0:
            raise ValueError(f"max_len must be positive, got {max_len}")
    keep = mask > 0
    w = torch.where(keep, mask, 0.0).to(per_token.dtype)
    weighted = torch.where(keep, per_token, 0.0) * w
    if mode == "token-mean":
        total = w.sum()
        return weighted.sum() / torch.where(total > 0, total, 1.0)
    seq_sum = weighted.sum(dim=-1)
    seq_weight = w.sum(dim=-1)
    nonempty = keep.any(dim=-1)
    if mode == "seq-mean-token-mean":
        seq_val = seq_sum / torch.where(nonempty, seq_weight, 1.0)
    elif mode == "seq-mean-token-sum":
        seq_val = seq_sum
    else:
        assert max_len is not None
        seq_val = seq_sum / float(max_len)
    n_seq = nonempty.sum().clamp(min=1).to(per_token.dtype)
    return torch.where(nonempty, seq_val, 0.0).sum() / n_seq


# --------------------------------------------------------------------------- policy loss


@dataclass(frozen=True)
class PolicyLossInput:
    """What a per-token policy loss gets (the one signature of the ``POLICY_LOSSES``
    registry, ``fn(x) -> (per_token_loss (B, T), metrics)``); built by :func:`policy_loss`.

    Attributes:
        logps: ``(B, T)`` log-probs of the realised tokens under the policy (with grad).
        old_logps: ``(B, T)`` behaviour-policy log-probs (detached).
        ratio: ``(B, T)`` importance ratio (with grad): per token, or GSPO's sequence ratio
            in its per-token gradient form (:func:`importance_ratio`).
        advantages: ``(B, T)`` detached, in ``logps``' dtype (a ``(B,)`` input broadcast).
        mask: ``(B, T)`` float mask; keep: ``mask > 0``; n_tokens: ``int(keep.sum())``.
        clip_low, clip_high: the clip range ``[1 - clip_low, 1 + clip_high]``.
        dual_clip: the dual-clip constant ``c > 1`` or ``None`` (only passed to losses
            registered with ``dual_clip=True``).
        sapo_tau_pos, sapo_tau_neg: SAPO's gate temperatures for ``A > 0`` / ``A <= 0``.
        cov_frac: the fraction of tokens Clip-Cov / KL-Cov select by covariance.
        clip_cov_lb, clip_cov_ub: Clip-Cov's covariance window ``(lb, ub)``.
        kl_cov_coef: KL-Cov's coefficient of ``|logp - old_logp|``.
        dppo_ratio_cap: DPPO's cap on the detached importance weight.

    The entry returns the ``(B, T)`` per-token loss (values at ``keep == False`` are ignored)
    and its own float metrics; :func:`policy_loss` aggregates it and adds the ratio metrics.
    """

    logps: Tensor
    old_logps: Tensor
    ratio: Tensor
    advantages: Tensor
    mask: Tensor
    keep: Tensor
    n_tokens: int
    clip_low: float
    clip_high: float
    dual_clip: float | None = None
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    cov_frac: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_coef: float = 1.0
    dppo_ratio_cap: float = 10.0


def _masked_stats(x: Tensor, keep: Tensor) -> tuple[float, float, float]:
    if not bool(keep.any()):
        return 1.0, 1.0, 1.0
    vals = x.detach()[keep].float()
    return float(vals.mean()), float(vals.max()), float(vals.min())


def _frac(cond: Tensor, keep: Tensor, n: int) -> float:
    return float((cond & keep).sum()) / max(n, 1)


def _check_policy_args(
    loss_type: str,
    clip_low: float,
    clip_high: float,
    agg: str,
    ratio_level: str,
    dual_clip: float | None,
) -> Callable[[PolicyLossInput], tuple[Tensor, dict[str, float]]]:
    """The argument checks of :func:`policy_loss` that do not need the tensors; returns the
    ``POLICY_LOSSES`` entry (an unknown name is a ValueError listing the valid ones)."""
    _check_choice("aggregation mode", agg, AGG_MODES)
    _check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    fn = POLICY_LOSSES.get(loss_type)
    if not 0.0 <= clip_low <= 1.0:
        raise ValueError(f"clip_low must be in [0, 1], got {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip is not None:
        key = "dual_clip"
        if not POLICY_LOSSES.meta(loss_type, key, False):
            with_dual = [n for n in POLICY_LOSSES.registered() if POLICY_LOSSES.meta(n, key)]
            raise ValueError(
                f"dual_clip is not defined for loss_type={loss_type!r}; "
                f"it is for {', '.join(sorted(with_dual))}"
            )
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if ratio_level == "sequence" and agg != "seq-mean-token-mean":
        raise ValueError(
            "ratio_level='sequence' (GSPO) averages the per-sequence loss over sequences; "
            f"use agg='seq-mean-token-mean', got {agg!r}"
        )
    needs_agg = POLICY_LOSSES.meta(loss_type, "agg")
    if needs_agg is not None and agg != needs_agg:
        raise ValueError(f"loss_type={loss_type!r} requires agg={needs_agg!r}, got {agg!r}")
    return fn


def _token_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    """Detached ``(B, T)`` advantages in ``like``'s dtype from ``(B,)`` or ``(B, T)``."""
    B, T = like.shape
    if advantages.shape == (B,):
        adv = advantages.detach().unsqueeze(-1).expand(B, T)
    elif advantages.shape == (B, T):
        adv = advantages.detach()
    else:
        raise ValueError(
            f"advantages must have shape ({B},) or ({B}, {T}), got {tuple(advantages.shape)}"
        )
    return adv.to(like.dtype)


def importance_ratio(
    logps: Tensor, old_logps: Tensor, mask: Tensor, level: Literal["token", "sequence"] | str
) -> Tensor:
    """The ``(B, T)`` importance ratio of :func:`policy_loss` (with grad through ``logps``).

    ``level="token"``: ``r_t = exp(clamp(logp_t - old_logp_t, -20, 20))``.
    ``level="sequence"`` (GSPO, Zheng et al. 2025): ``s_i = exp(mean_{t in o_i}(logp_t -
    old_logp_t))`` (mask-weighted, clamped likewise) in the gradient form
    ``s_{i,t} = sg(s_i) * exp(logp_t - sg(logp_t))``, whose value is ``s_i`` and gradient
    ``s_i grad(logp_t)``. Masked positions hold a log-ratio of 0.
    """
    _check_choice("ratio_level", level, RATIO_LEVELS)
    keep = mask > 0
    log_ratio = torch.where(keep, logps - old_logps.detach(), 0.0)
    if level == "token":
        return torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    w = torch.where(keep, mask, 0.0).to(logps.dtype)
    seq_len = w.sum(dim=-1).clamp(min=1e-8)
    seq_log_ratio = (log_ratio * w).sum(dim=-1) / seq_len
    seq_ratio = torch.exp(seq_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    safe_logps = torch.where(keep, logps, 0.0)
    return seq_ratio.detach().unsqueeze(-1) * torch.exp(safe_logps - safe_logps.detach())


def ratio_metrics(ratio: Tensor, keep: Tensor) -> dict[str, float]:
    """``ratio/mean``, ``ratio/max``, ``ratio/min`` over the tokens with ``keep`` (1.0 when
    none counts)."""
    r_mean, r_max, r_min = _masked_stats(ratio, keep)
    return {"ratio/mean": r_mean, "ratio/max": r_max, "ratio/min": r_min}


@register_policy_loss("ppo", dual_clip=True)
def ppo(x: PolicyLossInput) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017), with DAPO's clip-higher and dual clip.

    ``l_t = max(-r_t A, -clip(r_t) A)``, ``clip(r) = clamp(r, 1 - clip_low, 1 + clip_high)``;
    ``clip_low != clip_high`` is DAPO's asymmetric "clip-higher" (Yu et al. 2025). With
    ``dual_clip=c`` (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL")
    the loss of ``A < 0`` tokens is capped: ``l_t = min(max(-r_t A, -clip(r_t) A), -c A)``.

    Metrics: ``clip_frac/low`` (``A < 0`` and ``r < 1 - clip_low``), ``clip_frac/high``
    (``A > 0`` and ``r > 1 + clip_high``), and with ``dual_clip`` ``dual_clip_frac`` (the
    ``-c A`` cap is active); fractions of the tokens that count.
    """
    lo, hi = 1.0 - x.clip_low, 1.0 + x.clip_high
    adv, keep, n = x.advantages, x.keep, x.n_tokens
    clipped_ratio = x.ratio.clamp(lo, hi)
    r_det = x.ratio.detach()
    pg1 = -adv * x.ratio
    pg2 = -adv * clipped_ratio
    per_token = torch.maximum(pg1, pg2)
    metrics = {
        "clip_frac/low": _frac((adv < 0) & (r_det < lo), keep, n),
        "clip_frac/high": _frac((adv > 0) & (r_det > hi), keep, n),
    }
    if x.dual_clip is not None:
        pg3 = -x.dual_clip * adv
        capped = (adv < 0) & (per_token.detach() > pg3)
        per_token = torch.where(adv < 0, torch.minimum(per_token, pg3), per_token)
        metrics["dual_clip_frac"] = _frac(capped, keep, n)
    return per_token, metrics


@register_policy_loss("cispo")
def cispo(x: PolicyLossInput) -> tuple[Tensor, dict[str, float]]:
    """CISPO (MiniMax-M1, MiniMax 2025): ``l_t = -sg(clip(r_t)) * A * logp_t``.

    The clipped importance weight is detached, so every token keeps a gradient
    ``-clip(r_t) A grad(logp_t)`` (the paper uses a very large ``clip_low``, i.e. no lower
    bound; ``clip_low=1.0`` gives that). The weight is truncated whatever the sign of ``A``,
    so ``clip_frac/low`` / ``clip_frac/high`` count ``r < 1 - clip_low`` / ``r > 1 +
    clip_high``.
    """
    lo, hi = 1.0 - x.clip_low, 1.0 + x.clip_high
    clipped_ratio = x.ratio.clamp(lo, hi)
    r_det = x.ratio.detach()
    per_token = -clipped_ratio.detach() * x.advantages * x.logps
    metrics = {
        "clip_frac/low": _frac(r_det < lo, x.keep, x.n_tokens),
        "clip_frac/high": _frac(r_det > hi, x.keep, x.n_tokens),
    }
    return per_token, metrics


def policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: AggMode | str = "seq-mean-token-mean",
    max_len: int | None = None,
    ratio_level: Literal["token", "sequence"] = "token",
    dual_clip: float | None = None,
    loss_type: str = "ppo",
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    cov_frac: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    kl_cov_coef: float = 1.0,
    dppo_ratio_cap: float = 10.0,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped policy-gradient loss: PPO / DAPO / GSPO / dual clip / CISPO / user losses.

    ``loss_type`` names a ``POLICY_LOSSES`` entry (:func:`ppo`, :func:`cispo`) or a user
    ``module:function`` with the same signature (``fn(x: PolicyLossInput) -> (per_token,
    metrics)``). Steps: validate; ``r = importance_ratio(logps, old_logps, mask,
    ratio_level)`` (``advantages`` ``(B,)`` broadcast over tokens or ``(B, T)``; detached,
    as is ``old_logps``); the entry's per-token loss; :func:`aggregate` with ``agg`` and
    ``max_len``; the ratio metrics.

    ``ratio_level="sequence"`` is GSPO (Zheng et al. 2025, "Group Sequence Policy
    Optimization"): clipping is decided per sequence, and the per-sequence loss is the token
    mean averaged over sequences, so ``agg`` must be ``"seq-mean-token-mean"`` (anything
    else raises); GSPO uses much smaller clip ranges than PPO (the paper: 3e-4 / 4e-4).
    ``dual_clip`` is accepted only by entries registered with ``dual_clip=True`` (PPO); an
    entry registered with ``agg=...`` (gmpo, gspo_token) requires that ``agg``. The last
    keywords are the :class:`PolicyLossInput` knobs of the frontier losses (checked there).

    Metrics (python floats, over tokens with ``mask > 0``): the entry's (``clip_frac/low``,
    ``clip_frac/high``, ``dual_clip_frac``), then ``ratio/mean``, ``ratio/max``,
    ``ratio/min`` (1.0 when no token counts; under GSPO over tokens, each carrying its
    sequence ratio).
    """
    _check_same_2d(logps=logps, old_logps=old_logps, mask=mask)
    fn = _check_policy_args(loss_type, clip_low, clip_high, agg, ratio_level, dual_clip)
    adv = _token_advantages(advantages, logps)
    keep = mask > 0
    ratio = importance_ratio(logps, old_logps, mask, ratio_level)
    x = PolicyLossInput(
        logps=logps,
        old_logps=old_logps.detach(),
        ratio=ratio,
        advantages=adv,
        mask=mask,
        keep=keep,
        n_tokens=int(keep.sum()),
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        sapo_tau_pos=sapo_tau_pos,
        sapo_tau_neg=sapo_tau_neg,
        cov_frac=cov_frac,
        clip_cov_lb=clip_cov_lb,
        clip_cov_ub=clip_cov_ub,
        kl_cov_coef=kl_cov_coef,
        dppo_ratio_cap=dppo_ratio_cap,
    )
    per_token, metrics = fn(x)
    loss = aggregate(per_token, mask, agg, max_len=max_len)
    return loss, {**metrics, **ratio_metrics(ratio, keep)}


def top_entropy_mask(entropy: Tensor, mask: Tensor, frac: float = 0.2) -> Tensor:
    """The 80/20 rule (Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens
    Drive Effective RL for LLM Reasoning", arXiv 2506.01939): train only on the batch's
    highest-entropy tokens.

    ``k = ceil(frac * n)`` with ``n`` the tokens where ``mask > 0``; the result is ``mask``
    where ``entropy >= `` the ``k``-th largest entropy among them (ties at the threshold are
    all kept) and 0 elsewhere, in ``mask``'s dtype, detached. Multiply the loss mask by it
    (any loss). ``entropy`` is the ``(B, T)`` per-token entropy of the sampling policy.
    """
    _check_same_2d(entropy=entropy, mask=mask)
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    keep = mask > 0
    n = int(keep.sum())
    if n == 0:
        return torch.zeros_like(mask)
    k = max(1, math.ceil(frac * n - 1e-9))
    threshold = torch.topk(entropy.detach()[keep].float(), k).values[-1]
    chosen = keep & (entropy.detach().float() >= threshold)
    return torch.where(chosen, mask.detach(), 0.0).to(mask.dtype)


# --------------------------------------------------------------------------- value loss


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip: float | None = 0.2,
    agg: AggMode | str = "token-mean",
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value-function loss of PPO (Schulman et al. 2017; as in OpenAI baselines).

    ``v_clip = old + clamp(v - old, -clip, clip)`` and
    ``l_t = 0.5 * max((v - R)^2, (v_clip - R)^2)``, reduced with :func:`aggregate`.
    ``clip=None`` disables clipping (``l_t = 0.5 (v - R)^2``). ``old_values`` and ``returns``
    are detached. Metric ``value/clip_frac``: fraction of tokens with ``mask > 0`` where the
    clipped term is strictly larger (so the clip is what the gradient sees).
    """
    _check_same_2d(values=values, old_values=old_values, returns=returns, mask=mask)
    if clip is not None and clip < 0:
        raise ValueError(f"clip must be >= 0 or None, got {clip}")
    keep = mask > 0
    n_tokens = int(keep.sum())
    ret = returns.detach().to(values.dtype)
    vf1 = (values - ret).pow(2)
    if clip is None:
        per_token = 0.5 * vf1
        clip_frac = 0.0
    else:
        old = old_values.detach().to(values.dtype)
        v_clipped = old + (values - old).clamp(-clip, clip)
        vf2 = (v_clipped - ret).pow(2)
        per_token = 0.5 * torch.maximum(vf1, vf2)
        clip_frac = _frac(vf2.detach() > vf1.detach(), keep, n_tokens)
    loss = aggregate(per_token, mask, agg, max_len=max_len)
    return loss, {"value/clip_frac": clip_frac}


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """Explained variance of the value predictions, ``1 - Var[R - V] / Var[R]``, over tokens
    with ``mask > 0`` (a standard PPO diagnostic, e.g. OpenAI baselines; 1 is perfect, 0 is
    no better than a constant, negative is worse). Returns ``nan`` when ``Var[R] = 0`` or no
    token counts (the quantity is undefined there).
    """
    _check_same_2d(values=values, returns=returns, mask=mask)
    keep = mask > 0
    if not bool(keep.any()):
        return float("nan")
    v = values.detach()[keep].double()
    r = returns.detach()[keep].double()
    var_r = torch.var(r, unbiased=False)
    if float(var_r) == 0.0:
        return float("nan")
    return float(1.0 - torch.var(r - v, unbiased=False) / var_r)


# --------------------------------------------------------------------------- from logits


def _map_row_chunks(fn: Callable[..., Tensor], inputs: Sequence[Tensor], chunk_size: int) -> Tensor:
    """Apply ``fn`` to row chunks of 2-D ``inputs`` (split along dim 0) and concatenate.

    When a gradient is needed, each chunk runs under activation checkpointing so that only
    one chunk's float32 intermediates are alive at a time, in the backward pass as well.
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    outs: list[Tensor] = []
    for parts in zip(*(t.split(chunk_size, dim=0) for t in inputs), strict=True):
        if needs_grad:
            out = checkpoint(fn, *parts, use_reentrant=False)
            assert isinstance(out, Tensor)
            outs.append(out)
        else:
            outs.append(fn(*parts))
    if not outs:
        return torch.zeros(0, dtype=torch.float32, device=inputs[0].device)
    return torch.cat(outs)


def _check_logits(logits: Tensor, name: str = "logits") -> None:
    if logits.dim() < 2:
        raise ValueError(
            f"{name} must have a vocabulary dimension (..., V), got {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {logits.dtype}")


def entropy_from_logits(logits: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Per-token entropy of ``softmax(logits)``: ``H = logsumexp(z) - sum_v softmax(z)_v z_v``.

    ``logits`` is ``(B, T, V)`` (any ``(..., V)``; bf16/fp16 allowed); the result has shape
    ``logits.shape[:-1]`` in float32. Computed over chunks of ``chunk_size`` tokens, each cast
    to float32 on its own, so no float32 ``(B, T, V)`` tensor is ever materialised (with
    gradients, chunks are recomputed in backward via activation checkpointing). The input
    is flattened to ``(B*T, V)`` with ``reshape``, which copies (in its own dtype) only if the
    logits are not contiguous. Entropy bonus as in Mnih et al. 2016 / Schulman et al. 2017.
    """
    _check_logits(logits)
    _check_chunk_size(chunk_size)
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])

    def _chunk(z: Tensor) -> Tensor:
        z = z.float()
        logz = torch.logsumexp(z, dim=-1)
        p = torch.softmax(z, dim=-1)
        return logz - (p * z).sum(dim=-1)

    return _map_row_chunks(_chunk, [flat], chunk_size).view(lead)


def token_logprobs(
    logits: Tensor,
    ids: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
) -> Tensor:
    """Float32 log-probabilities of ``ids`` under ``softmax(logits / temperature)``.

    ``log p(y_t) = z_{t, y_t} / tau - logsumexp_v(z_{t, v} / tau)`` for ``logits`` ``(B, T, V)``
    (any ``(..., V)``) and integer ``ids`` of shape ``logits.shape[:-1]``; result has the same
    shape as ``ids``. Computed in chunks of ``chunk_size`` tokens, each cast to float32 on
    its own (no float32 ``(B, T, V)`` log-softmax; chunks are recomputed in backward via
    activation checkpointing when a gradient is needed). The caller aligns ``logits`` and
    ``ids`` (usually ``logits[:, :-1]`` with ``input_ids[:, 1:]``). This is the standard
    sampled-token log-likelihood of the policy-gradient theorem (Williams 1992).
    """
    _check_logits(logits)
    _check_chunk_size(chunk_size)
    if ids.shape != logits.shape[:-1]:
        raise ValueError(
            f"ids must have shape {tuple(logits.shape[:-1])} (logits without the vocabulary "
            f"dim), got {tuple(ids.shape)}"
        )
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    flat_ids = ids.reshape(-1, 1).long()

    def _chunk(z: Tensor, y: Tensor) -> Tensor:
        z = z.float()
        if temperature != 1.0:
            z = z / temperature
        return z.gather(-1, y).squeeze(-1) - torch.logsumexp(z, dim=-1)

    return _map_row_chunks(_chunk, [flat, flat_ids], chunk_size).view(ids.shape)


def hidden_token_logprobs(
    hidden: Tensor, head: Callable[[Tensor], Tensor], ids: Tensor, chunk_size: int, tau: float = 1.0
) -> Tensor:
    """``token_logprobs(head(hidden), ids, temperature=tau)`` without the ``(B, T, V)`` logits.

    ``hidden`` ``(B, T, H)`` (any ``(..., H)``), ``head`` maps ``(n, H)`` rows to ``(n, V)``
    logits (the LM head); per row ``z = head(h_t)``, ``log p(y_t) = z_{y_t} / tau -
    logsumexp_v(z_v / tau)`` in float32. ``head`` runs on ``chunk_size`` rows at a time, under
    activation checkpointing when a gradient is needed, so only one chunk's logits exist.
    """
    _check_chunk_size(chunk_size)
    if ids.shape != hidden.shape[:-1] or tau <= 0:
        raise ValueError(f"ids {tuple(ids.shape)} for hidden {tuple(hidden.shape)}, tau {tau}")

    def _chunk(h: Tensor, y: Tensor) -> Tensor:
        z = head(h).float() / tau if tau != 1.0 else head(h).float()
        return z.gather(-1, y).squeeze(-1) - torch.logsumexp(z, dim=-1)

    flat = hidden.reshape(-1, hidden.shape[-1])
    return _map_row_chunks(_chunk, [flat, ids.reshape(-1, 1).long()], chunk_size).view(ids.shape)
