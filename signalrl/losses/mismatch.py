"""Rollout/train mismatch: the sampler's and the trainer's log-probs of the same tokens differ
(another engine, kernels or precision, a stale or quantised copy of the policy), so "on-policy"
samples are slightly off-policy. Pure tensor functions (see docs/architecture.md, "Tensor
conventions"): the diagnostics every online step logs, and importance-sampling corrections.

With ``d_t = logp_train_t - logp_sampler_t`` (both of the sampled token, ``(B, T)``) the
per-token importance ratio of the trainer's policy to the sampler's is ``w_t = exp(d_t)``.

Corrections (``rl.is_correction``):

- ``token_truncate`` -- truncated importance sampling (TIS; Yao et al. 2025, "Your Efficient RL
  Framework Secretly Brings You Off-Policy RL Training"): weight every token's loss by
  ``min(w_t, cap)``.
- ``token_mask`` -- IcePop-style masking (Ling Team 2025, "IcePop"): drop the tokens whose
  ``w_t`` is outside ``[low, high]`` from the loss (weight 0), keep the others at weight 1.
- ``sequence_truncate`` -- sequence-level TIS: ``min(prod_t w_t, cap)`` for every token of the
  sequence (the product over the sequence's tokens, computed in log space).
- ``sequence_mask`` -- sequence-level masked IS (MIS): drop whole sequences whose sequence
  ratio is outside ``[low, high]``.

The DeepSeek-V3.2 off-policy sequence mask (DeepSeek-AI 2025, "DeepSeek-V3.2"):
``off_policy_sequence_mask`` drops sequences with a negative advantage whose mean per-token
KL to the sampler (``mean_t -d_t``, the k1 estimate of KL(sampler || trainer)) exceeds a
bound: the samples the current policy would not have made, pushed down for nothing.

Weights are detached: they rescale the gradient, they are not differentiated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from signalrl.losses._checks import check_same_2d

__all__ = [
    "IS_CORRECTIONS",
    "is_weights",
    "mismatch_metrics",
    "off_policy_sequence_mask",
]

IS_CORRECTIONS: tuple[str, ...] = (
    "none",
    "token_truncate",
    "token_mask",
    "sequence_truncate",
    "sequence_mask",
)

#: |log-ratio| bound before ``exp`` (as in the policy losses).
LOG_RATIO_CLAMP = 20.0


def _log_ratio(train_logps: Tensor, sampler_logps: Tensor, mask: Tensor) -> Tensor:
    check_same_2d(train_logps=train_logps, sampler_logps=sampler_logps, mask=mask)
    keep = mask > 0
    return torch.where(keep, train_logps.detach() - sampler_logps.detach(), 0.0)


def mismatch_metrics(train_logps: Tensor, sampler_logps: Tensor, mask: Tensor) -> dict[str, float]:
    """``sampling/logp_diff/mean|max`` (``|d_t|`` over the tokens that count) and
    ``sampling/is_ratio/min|mean|max`` (``w_t = exp(d_t)``); zeros and ones when no token
    counts."""
    d = _log_ratio(train_logps, sampler_logps, mask)
    keep = mask > 0
    if not bool(keep.any()):
        return {
            "sampling/logp_diff/mean": 0.0,
            "sampling/logp_diff/max": 0.0,
            "sampling/is_ratio/min": 1.0,
            "sampling/is_ratio/mean": 1.0,
            "sampling/is_ratio/max": 1.0,
        }
    dk = d[keep].float()
    w = torch.exp(dk.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return {
        "sampling/logp_diff/mean": float(dk.abs().mean()),
        "sampling/logp_diff/max": float(dk.abs().max()),
        "sampling/is_ratio/min": float(w.min()),
        "sampling/is_ratio/mean": float(w.mean()),
        "sampling/is_ratio/max": float(w.max()),
    }


def is_weights(
    train_logps: Tensor,
    sampler_logps: Tensor,
    mask: Tensor,
    mode: str,
    *,
    cap: float = 2.0,
    low: float = 0.5,
    high: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """Detached per-token loss weights ``(B, T)`` of the correction ``mode`` (module
    docstring; ``none`` gives ones), and ``is/frac_truncated`` or ``is/frac_masked``: the
    share of the counted tokens whose weight the correction changed."""
    if mode not in IS_CORRECTIONS:
        raise ValueError(f"unknown is_correction {mode!r}; valid: {', '.join(IS_CORRECTIONS)}")
    if not cap > 0 or not 0 <= low <= 1 <= high:
        raise ValueError(f"need cap > 0 and low <= 1 <= high, got {cap}, {low}, {high}")
    d = _log_ratio(train_logps, sampler_logps, mask)
    keep = mask > 0
    n = max(int(keep.sum()), 1)
    if mode == "none":
        return torch.ones_like(d), {}
    if mode.startswith("sequence"):
        d = d.sum(-1, keepdim=True).expand_as(d)
    w = torch.exp(d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    if mode.endswith("truncate"):
        out = w.clamp(max=cap)
        return out, {"is/frac_truncated": float(((w > cap) & keep).sum()) / n}
    inside = (w >= low) & (w <= high)
    return inside.to(w.dtype), {"is/frac_masked": float((~inside & keep).sum()) / n}


def off_policy_sequence_mask(
    train_logps: Tensor,
    sampler_logps: Tensor,
    mask: Tensor,
    advantages: Tensor,
    bound: float,
) -> tuple[Tensor, float]:
    """DeepSeek-V3.2's off-policy sequence mask: ``(B, 1)`` zeros for the sequences with a
    negative advantage whose mean per-token ``k1`` KL(sampler || trainer) ``mean_t -d_t``
    exceeds ``bound``, ones elsewhere; and the masked share of the sequences.
    ``advantages``: ``(B,)`` or ``(B, T)`` (a sequence is negative when its token sum is)."""
    d = _log_ratio(train_logps, sampler_logps, mask)
    keep = (mask > 0).to(d.dtype)
    kl = -(d * keep).sum(-1) / keep.sum(-1).clamp(min=1.0)
    adv = advantages.detach()
    seq_adv = adv if adv.dim() == 1 else (adv * keep).sum(-1)
    drop = (seq_adv < 0) & (kl > bound)
    return (~drop).to(d.dtype).unsqueeze(-1), float(drop.float().mean())
