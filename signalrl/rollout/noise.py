"""Counter-based sampling noise: the same tokens whatever the batch, the rank or the device.

A sampled token is `argmax(filtered_logits / T + Gumbel)` (the Gumbel-max trick: an exact
sample of `softmax(filtered_logits / T)`), where the Gumbel noise of vocabulary entry `v` at
position `t` of sample `j` of a prompt is a pure function of `(key(prompt), j, t, v)`, and a
prompt's key is a hash of `(seed, step, call, global prompt index)`. No generator state is
carried between rows: a prompt's samples do not depend on which other prompts share its
batch, on how prompts are split across ranks or micro-batches, or on a resume.

The hash is Chris Wellons' `lowbias32` on 32-bit lanes held in int64 tensors (every product
is split in 16-bit halves so nothing overflows), so the same integers come out on CPU and
CUDA. Two 32-bit hashes make a 53-bit uniform `u` in (0, 1); `g = -log(-log(u))`.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """`(x * c) mod 2**32` for `x` holding uint32 values, without int64 overflow."""
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """`lowbias32` of the low 32 bits of `x` (int64 in, int64 holding uint32 out)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def mix(key: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    """A new key from `key` and a counter `value` (broadcasting)."""
    v = value if isinstance(value, torch.Tensor) else torch.tensor(value, device=key.device)
    return hash32(key ^ hash32((v + _GOLDEN) & _M32))


def prompt_keys(seed: int, step: int, call: int, indices: torch.Tensor) -> torch.Tensor:
    """`(P,)` keys of the prompts at global positions `indices` of sampling call `call` of
    training step `step` under `seed`."""
    base = torch.tensor(seed & _M32, dtype=torch.long, device=indices.device)
    base = mix(mix(mix(base, step & _M32), call & _M32), 0)
    return mix(base.expand_as(indices), indices.long())


def row_keys(keys: torch.Tensor, n: int) -> torch.Tensor:
    """`(P * n,)` keys of the `n` samples of each prompt, rows grouped by prompt."""
    j = torch.arange(n, device=keys.device).repeat(keys.shape[0])
    return mix(keys.repeat_interleave(n), j)


def gumbel(keys: torch.Tensor, t: int, vocab: int, vocab_hash: torch.Tensor) -> torch.Tensor:
    """`(B, vocab)` float32 Gumbel noise for rows with `keys` `(B,)` at position `t`;
    `vocab_hash` is `hash32(arange(vocab))` (computed once per generation)."""
    k = mix(keys, t)[:, None]
    h1 = hash32(k ^ vocab_hash[None, :vocab])
    h2 = hash32(h1 ^ 0x5BD1E995)
    u = ((h1 >> 11).double() * 2.0**32 + h2.double() + 0.5) / 2.0**53
    return (-torch.log(-torch.log(u))).float()
