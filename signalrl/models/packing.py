"""Padding-free training forwards: a batch's sequences packed into a few rows.

A `SequenceBatch` pads every row to the longest prompt plus the longest completion, so a batch
of 27- to 199-token rows spends about half of its forward and backward on padding. Here the
rows' real tokens are laid end to end instead, first-fit decreasing into bins of the batch's
width `W` (so no sequence is split and no bin is longer than the padded batch), and each
sequence's `position_ids` restart at 0. With `attention_mask=None` transformers reads the
restarts as sequence boundaries (`masking_utils.find_packed_sequence_indices`) and gives
every attention implementation a block-diagonal causal mask, so each token attends only to
its own sequence: the same log-probs as the padded forward, for the tokens that exist.
TRL's `padding_free` and the HF `DataCollatorWithFlattening` use the same position-id
convention (there with flash-attention's varlen kernels).

Only the positions that predict a completion token go through the LM head; their log-probs
are scattered back to the batch's `(N, T)` layout, so callers see the padded result.

`packing_supported(model)` checks once per model that a packed forward gives the same logits
as separate ones (an architecture that ignored the restarts would silently let sequences
attend to each other); trainers fall back to padded forwards where it does not.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from signalrl.data.collate import SequenceBatch

#: pack only when it removes at least this share of the padded batch's token slots
MIN_SAVING = 0.1

_SUPPORTED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (R, W): the sequences end to end, then pad tokens
    position_ids: torch.Tensor  # (R, W): 0.. within each sequence (and the trailing pad)
    predict_at: torch.Tensor  # (M,): flat index into R * W of the state predicting each token
    targets: torch.Tensor  # (M,): the completion tokens predicted
    rows: torch.Tensor  # (M,): their row in the (N, T) batch
    cols: torch.Tensor  # (M,): their column in the (N, T) batch

    @property
    def slots(self) -> int:
        return self.input_ids.numel()


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices, longest first) of total length <= `capacity` each."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        if lengths[i] > capacity:
            raise ValueError(f"sequence {i} has {lengths[i]} tokens, over the bin of {capacity}")
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def _spans(attn: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """Each row's first attended column and its number of tokens; None when some row's
    attended tokens are not one contiguous span (then packing would change the result)."""
    count = attn.sum(-1)
    first = torch.where(count > 0, attn.argmax(-1), 0)
    cols = torch.arange(attn.shape[1], device=attn.device)[None, :]
    span = (cols >= first[:, None]) & (cols < (first + count)[:, None])
    if not torch.equal(span, attn.bool()):
        return None
    return first.tolist(), count.tolist()


def pack_batch(batch: SequenceBatch, min_saving: float = MIN_SAVING) -> PackedBatch | None:
    """`batch` packed (see the module docstring), or None when packing would save less than
    `min_saving` of its token slots or a row is not one contiguous span of tokens."""
    n, width = batch.input_ids.shape
    spans = _spans(batch.attention_mask)
    if spans is None or n == 0:
        return None
    first, count = spans
    bins = first_fit_decreasing(count, width)
    if len(bins) * width > (1.0 - min_saving) * n * width:
        return None
    device = batch.input_ids.device
    # the trailing pad is its own sequence, so any token does: a real one (no pad-id warning)
    fill = int(batch.input_ids[0, first[0]])
    ids = torch.full((len(bins), width), fill, dtype=torch.long, device=device)
    pos = torch.zeros((len(bins), width), dtype=torch.long, device=device)
    where_row = torch.zeros(n, dtype=torch.long)
    where_off = torch.zeros(n, dtype=torch.long)
    for r, members in enumerate(bins):
        off = 0
        for i in members:
            ids[r, off : off + count[i]] = batch.input_ids[i, first[i] : first[i] + count[i]]
            pos[r, off : off + count[i]] = torch.arange(count[i], device=device)
            where_row[i], where_off[i] = r, off
            off += count[i]
        pos[r, off:] = torch.arange(width - off, device=device)  # the pad: its own sequence
    p = batch.prompt_width
    present = batch.attention_mask[:, p:].bool()
    rows, cols = present.nonzero(as_tuple=True)
    first_t = torch.tensor(first, dtype=torch.long, device=device)
    # completion token (i, j) sits at column p + j; the state before it predicts it
    offset_in_seq = p + cols - 1 - first_t[rows]
    rows_cpu = rows.cpu()
    predict_at = (where_row[rows_cpu] * width + where_off[rows_cpu]).to(device) + offset_in_seq
    targets = batch.completion_ids[rows, cols]
    return PackedBatch(ids, pos, predict_at, targets, rows, cols)


def padding_free(model: nn.Module, requested: bool, console: Any = None) -> bool:
    """Whether to pack `model`'s forwards: `requested` (`train.padding_free`) and the model
    passes `packing_supported`; says so on `console` (rich) when it does not."""
    if not requested or packing_supported(model):
        return requested
    if console is not None:
        console.print(
            "train.padding_free: this model's packed forward differs from separate ones (its "
            "attention ignores the position-id restarts); padded forwards instead"
        )
    return False


def packing_supported(model: nn.Module) -> bool:
    """Whether `model` gives two sequences packed into one row (position ids restarting,
    `attention_mask=None`) the logits it gives them apart; computed once per model."""
    known = _SUPPORTED.get(model)
    if known is not None:
        return known
    ok = _check(model)
    _SUPPORTED[model] = ok
    return ok


@torch.no_grad()
def _check(model: nn.Module) -> bool:
    try:
        param = next(model.parameters())
    except StopIteration:
        return False
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab < 2:
        return False
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab, (1, 5), generator=gen).to(param.device)
    b = torch.randint(0, vocab, (1, 4), generator=gen).to(param.device)
    was_training = model.training
    model.eval()
    try:
        apart = [
            model(
                input_ids=x,
                position_ids=torch.arange(x.shape[1], device=x.device)[None, :],
                use_cache=False,
            ).logits.float()
            for x in (a, b)
        ]
        pos = torch.cat([torch.arange(5), torch.arange(4)])[None, :].to(param.device)
        packed = model(
            input_ids=torch.cat([a, b], 1), position_ids=pos, attention_mask=None, use_cache=False
        ).logits.float()
    except Exception:  # noqa: BLE001  # an architecture that cannot take these inputs
        return False
    finally:
        model.train(was_training)
    tol = 1e-3 if param.dtype == torch.float32 else 5e-2
    want = torch.cat(apart, 1)
    scale = max(1.0, float(want.abs().max()))
    return bool((packed - want).abs().max() <= tol * scale)
