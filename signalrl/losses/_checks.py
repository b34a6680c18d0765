"""Input checks shared by the loss modules."""

from __future__ import annotations

from torch import Tensor


def check_same_2d(**tensors: Tensor) -> tuple[int, int]:
    """`(B, T)` of 2-D tensors that must all have the same shape; a ValueError names them."""
    shape: tuple[int, ...] | None = None
    for name, t in tensors.items():
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (B, T), got shape {tuple(t.shape)}")
        if shape is None:
            shape = tuple(t.shape)
        elif tuple(t.shape) != shape:
            desc = ", ".join(f"{k}={tuple(v.shape)}" for k, v in tensors.items())
            raise ValueError(f"shape mismatch: {desc} (all must have the same shape)")
    assert shape is not None
    return shape[0], shape[1]
