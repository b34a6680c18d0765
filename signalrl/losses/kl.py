"""Per-token KL estimators from samples (Schulman 2020, "Approximating KL Divergence")."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["KL_KINDS", "LOG_RATIO_CLAMP", "kl_estimate"]

KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3")

#: |log-ratio| bound applied inside the k3 estimator before ``exp``.
LOG_RATIO_CLAMP = 20.0


def kl_estimate(
    logps: Tensor,
    ref_logps: Tensor,
    kind: Literal["k1", "k2", "k3"] = "k3",
) -> Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from tokens sampled from ``pi``.

    Estimators of Schulman (2020), "Approximating KL Divergence", with
    ``log_r = ref_logps - logps = log(pi_ref(x) / pi(x))``:

    - ``k1 = -log_r = logps - ref_logps`` (unbiased, high variance, can be negative);
    - ``k2 = log_r**2 / 2`` (biased, low variance, always >= 0);
    - ``k3 = exp(log_r) - log_r - 1`` (unbiased, low variance, always >= 0; the GRPO
      penalty of Shao et al. 2024).

    For numerical safety ``log_r`` is clamped to ``[-20, 20]`` in ``k3`` only (so ``exp``
    cannot overflow; the gradient is zero beyond the clamp). ``logps`` and ``ref_logps`` are
    ``(B, T)`` log-probabilities of the realised tokens; the result is ``(B, T)`` and keeps
    the gradient with respect to both inputs (apply the mask when aggregating).
    """
    if logps.shape != ref_logps.shape:
        raise ValueError(
            f"logps and ref_logps must have the same shape, got {tuple(logps.shape)} "
            f"and {tuple(ref_logps.shape)}"
        )
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; valid choices: {', '.join(KL_KINDS)}")
    log_r = ref_logps - logps
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r.pow(2)
    log_r = log_r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_r) - log_r - 1.0
