"""Distillation signals: per-token reverse KL (on-policy distillation) and the generalized
Jensen-Shannon divergence of GKD.

Pure tensor functions; see docs/architecture.md, "Tensor conventions".
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from signalrl.losses.policy import DEFAULT_CHUNK_SIZE, _check_chunk_size, _map_row_chunks

__all__ = ["generalized_jsd", "reverse_kl_per_token"]

# Log-probabilities are floored here before use so that -inf entries (e.g. logits masked to
# -inf) give 0 * finite = 0 instead of 0 * inf = NaN, in the value and in the gradient.
_LOGP_FLOOR = -1e30


def reverse_kl_per_token(student_logps: Tensor, teacher_logps: Tensor) -> Tensor:
    """Per-token single-sample estimate of the reverse KL ``KL(pi_student || pi_teacher)``.

    ``k_t = log pi_student(y_t) - log pi_teacher(y_t)`` for tokens ``y_t`` sampled from the
    student; its expectation under the student is the per-token reverse KL. This is the
    on-policy distillation signal of Agarwal et al. 2024 ("On-Policy Distillation of Language
    Models: Learning from Self-Generated Mistakes", GKD) and Thinking Machines 2025
    ("On-Policy Distillation"), where ``-k_t`` is used as a dense per-token reward/advantage
    with no critic. Shapes ``(B, T)``; the result keeps gradients (detach it before using it
    as a reward).
    """
    if student_logps.shape != teacher_logps.shape:
        raise ValueError(
            f"student_logps and teacher_logps must have the same shape, got "
            f"{tuple(student_logps.shape)} and {tuple(teacher_logps.shape)}"
        )
    return student_logps - teacher_logps


def _kl_rows(logp: Tensor, logq: Tensor) -> Tensor:
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)`` per row, from (floored) log-probs."""
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), full vocabulary.

    With ``P_T = softmax(teacher_logits / tau)``, ``P_S = softmax(student_logits / tau)`` per
    token and the mixture ``M = beta * P_T + (1 - beta) * P_S`` (computed in log space with a
    two-term logsumexp, ``log M = logsumexp(log P_T + log beta, log P_S + log(1 - beta))``):

    ``JSD_beta = beta * KL(P_T || M) + (1 - beta) * KL(P_S || M)`` for ``0 < beta < 1``,

    and at the ends, handled specially so they are exact:

    - ``beta = 0``: ``KL(P_T || P_S)`` -- forward KL (teacher-weighted, mode covering);
    - ``beta = 1``: ``KL(P_S || P_T)`` -- reverse KL (student-weighted, mode seeking).

    This is exactly the convention of TRL's ``GKDTrainer.generalized_jsd_loss`` (its ``beta``
    weights the teacher in the mixture; ``beta=0`` is forward KL, ``beta=1`` reverse KL).
    Note the interior formula tends to 0 as ``beta -> 0`` or ``1`` (it scales like
    ``beta * (1 - beta)``), so the end points are a deliberate discontinuity, as in TRL.
    ``beta=0.5`` is the usual symmetric JSD (bounded by ``log 2``). As in TRL the logits are
    divided by ``temperature`` and the loss is not rescaled by ``tau**2``.

    ``student_logits`` and ``teacher_logits`` are ``(B, T, V)`` (any ``(..., V)``, any float
    dtype); ``mask`` (shape ``logits.shape[:-1]``, optional) selects the tokens with
    ``mask > 0`` and weighs them by their mask value. Returns the (weighted) mean over those
    tokens as a float32 scalar; 0 (still connected to the graph) when no token counts.
    The selected tokens are processed in chunks of ``chunk_size`` (each cast to float32 on
    its own, recomputed in backward when a gradient is needed), so no float32
    ``(B, T, V)`` tensor is materialised. Gradients flow into both inputs; detach the teacher
    logits if the teacher is not to be trained.
    """
    _check_jsd_args(student_logits, teacher_logits, mask, beta, temperature, chunk_size)
    s_flat, t_flat, weights = _selected_tokens(student_logits, teacher_logits, mask)
    if s_flat.shape[0] == 0:
        return (student_logits.sum() * 0.0).float()
    per_token = _map_row_chunks(
        partial(_jsd_rows, beta=beta, temperature=temperature), [s_flat, t_flat], chunk_size
    )
    return (per_token * weights).sum() / weights.sum()


def _check_jsd_args(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    beta: float,
    temperature: float,
    chunk_size: int,
) -> None:
    """Raise ``ValueError`` on the arguments :func:`generalized_jsd` rejects."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.dim() < 2:
        raise ValueError(
            f"logits must have a vocabulary dimension (..., V), got {tuple(student_logits.shape)}"
        )
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_chunk_size(chunk_size)
    if mask is not None and mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"mask must have shape {tuple(student_logits.shape[:-1])}, got {tuple(mask.shape)}"
        )


def _selected_tokens(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``(N, V)`` student and teacher logits of the tokens that count (all tokens, or
    those with ``mask > 0``) and their float32 ``(N,)`` weights (1, or the mask values)."""
    V = student_logits.shape[-1]
    if mask is None:
        s_flat = student_logits.reshape(-1, V)
        t_flat = teacher_logits.reshape(-1, V)
        weights = torch.ones(s_flat.shape[0], dtype=torch.float32, device=s_flat.device)
        return s_flat, t_flat, weights
    keep = mask > 0
    return student_logits[keep], teacher_logits[keep], mask[keep].to(torch.float32)


def _jsd_rows(s: Tensor, t: Tensor, *, beta: float, temperature: float) -> Tensor:
    """Per-row generalized JSD of one chunk of student logits ``s`` and teacher logits ``t``
    (``(n, V)``, any float dtype), in float32; ``beta`` 0 and 1 are the exact KL end points."""
    log_s = torch.log_softmax(s.float() / temperature, dim=-1).clamp(min=_LOGP_FLOOR)
    log_t = torch.log_softmax(t.float() / temperature, dim=-1).clamp(min=_LOGP_FLOOR)
    if beta == 0.0:
        return _kl_rows(log_t, log_s)
    if beta == 1.0:
        return _kl_rows(log_s, log_t)
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    return beta * _kl_rows(log_t, log_m) + (1.0 - beta) * _kl_rows(log_s, log_m)
