"""Entropy control: the policy's full-vocabulary entropy at the trained tokens, computed in
the same chunked pass as the sampled tokens' log-probs, the entropy bonus of the loss, and
the adaptive coefficient that holds the entropy near a target.

`token_logprobs_entropy` / `hidden_token_logprobs_entropy` return, per position, both
``log p(y_t)`` and ``H_t = -sum_v p_v log p_v`` of ``p = softmax(z / tau)`` from one float32
cast of a chunk of logits (from logits, or from hidden states through the LM head), so the
entropy costs no extra ``(B, T, V)`` tensor; with gradients the chunks are recomputed in
backward (activation checkpointing), as in `signalrl.losses.policy.token_logprobs`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from signalrl.losses.policy import (
    DEFAULT_CHUNK_SIZE,
    AggMode,
    _check_chunk_size,
    _check_logits,
    _map_row_chunks,
    aggregate,
)

__all__ = [
    "adapt_entropy_coef",
    "entropy_bonus",
    "hidden_token_logprobs_entropy",
    "token_logprobs_entropy",
]


def _logp_and_entropy(z: Tensor, y: Tensor, tau: float) -> Tensor:
    """`(n, 2)`: column 0 ``log p(y)``, column 1 ``H`` of ``softmax(z / tau)`` (float32)."""
    z = z.float()
    if tau != 1.0:
        z = z / tau
    logz = torch.logsumexp(z, dim=-1)
    p = torch.softmax(z, dim=-1)
    lp = z.gather(-1, y).squeeze(-1) - logz
    return torch.stack([lp, logz - (p * z).sum(dim=-1)], dim=-1)


def _split(out: Tensor, shape: torch.Size) -> tuple[Tensor, Tensor]:
    out = out.view(-1, 2)
    return out[:, 0].reshape(shape), out[:, 1].reshape(shape)


def token_logprobs_entropy(
    logits: Tensor,
    ids: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """``(log p(y_t), H_t)`` of ``softmax(logits / temperature)`` for ``logits`` ``(..., V)``.

    ``log p(y_t) = z_{y_t}/tau - logsumexp(z/tau)`` and ``H_t = logsumexp(z/tau) -
    sum_v softmax(z/tau)_v z_v/tau``; both float32 with the shape of ``ids``, from chunks of
    ``chunk_size`` positions (one float32 chunk at a time, recomputed in backward). The same
    values as `token_logprobs` and `entropy_from_logits(logits / temperature)`.
    """
    _check_logits(logits)
    _check_chunk_size(chunk_size)
    if ids.shape != logits.shape[:-1] or ids.is_floating_point() or temperature <= 0:
        raise ValueError(
            f"ids {tuple(ids.shape)} ({ids.dtype}) for logits {tuple(logits.shape)}, "
            f"temperature {temperature}: ids must be integers shaped like logits[..., 0]"
        )
    flat = logits.reshape(-1, logits.shape[-1])
    out = _map_row_chunks(
        lambda z, y: _logp_and_entropy(z, y, temperature),
        [flat, ids.reshape(-1, 1).long()],
        chunk_size,
    )
    return _split(out, ids.shape)


def hidden_token_logprobs_entropy(
    hidden: Tensor, head: Callable[[Tensor], Tensor], ids: Tensor, chunk_size: int, tau: float = 1.0
) -> tuple[Tensor, Tensor]:
    """`token_logprobs_entropy(head(hidden), ids, temperature=tau)` without the ``(B, T, V)``
    logits: ``head`` maps ``(n, H)`` hidden rows to ``(n, V)`` logits and runs on
    ``chunk_size`` rows at a time (under activation checkpointing when a gradient is needed).
    """
    _check_chunk_size(chunk_size)
    if ids.shape != hidden.shape[:-1] or tau <= 0:
        raise ValueError(f"ids {tuple(ids.shape)} for hidden {tuple(hidden.shape)}, tau {tau}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = _map_row_chunks(
        lambda h, y: _logp_and_entropy(head(h), y, tau),
        [flat, ids.reshape(-1, 1).long()],
        chunk_size,
    )
    return _split(out, ids.shape)


def entropy_bonus(
    entropy: Tensor,
    mask: Tensor,
    coef: float,
    agg: AggMode = "token-mean",
    max_len: int | None = None,
) -> Tensor:
    """The entropy term added to the policy loss: ``-coef * agg(H, mask)``.

    ``H`` ``(B, T)`` is the policy's full-vocabulary entropy at each completion token
    (``H_t = -sum_v pi(v | s_t) log pi(v | s_t)``, with gradient), aggregated with ``mask``
    exactly as the policy loss is (`signalrl.losses.policy.aggregate`: ``token-mean`` is
    ``sum(H * m) / sum(m)``). Minimising the loss then maximises the entropy with weight
    ``coef`` (the entropy bonus of A3C, Mnih et al. 2016, and PPO, Schulman et al. 2017).
    """
    if coef < 0:
        raise ValueError(f"entropy coefficient must be >= 0, got {coef}")
    if entropy.shape != mask.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)} and mask {tuple(mask.shape)} differ")
    return -coef * aggregate(entropy, mask, agg, max_len=max_len)


def adapt_entropy_coef(coef: float, entropy: float, target: float, lr: float) -> float:
    """One step of the adaptive entropy coefficient: ``c' = max(0, c + lr * (H* - H))``.

    The coefficient rises while the measured entropy ``H`` is below the target ``H*`` and falls
    (never below 0) while it is above: an integral controller on the entropy, as in SAC's
    automatic temperature (Haarnoja et al. 2018) and Skywork-OR1's adaptive entropy control
    (He et al. 2025).
    """
    if lr <= 0 or target < 0:
        raise ValueError(f"entropy adaptation needs lr > 0 and target >= 0, got {lr}, {target}")
    if entropy != entropy:  # NaN: no measurement, keep the coefficient
        return coef
    return max(0.0, coef + lr * (target - entropy))
