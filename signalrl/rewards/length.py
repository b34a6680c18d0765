"""Length shaping: DAPO's soft overlong punishment and a simple linear length penalty."""

from __future__ import annotations

import math

__all__ = ["length_penalty", "overlong_penalty"]


def _check_number(name: str, value: float, *, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


def overlong_penalty(length: int, max_len: int, cache: int) -> float:
    """DAPO soft overlong punishment (Yu et al., 2025, eq. 13), added to the task reward.

    With ``L`` the completion length (tokens), ``L_max`` the generation limit and
    ``L_cache`` the punishment interval::

        0                              if L <= L_max - L_cache
        ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
        -1                             if L > L_max

    so the penalty falls linearly from 0 to -1 over the last ``cache`` tokens.

    Raises:
        ValueError: if ``max_len <= 0``, ``cache < 0``, ``cache > max_len`` or ``length < 0``.
    """
    length_f = _check_number("length", length)
    max_f = _check_number("max_len", max_len, allow_zero=False)
    cache_f = _check_number("cache", cache)
    if cache_f > max_f:
        raise ValueError(f"cache ({cache}) must not exceed max_len ({max_len})")
    threshold = max_f - cache_f
    if length_f <= threshold:
        return 0.0
    if length_f <= max_f:
        return (threshold - length_f) / cache_f  # cache > 0 here, since threshold < L <= max
    return -1.0


def length_penalty(length: int, target: int, coef: float) -> float:
    """A linear penalty for exceeding a target length: ``-coef * max(0, L - target) / target``.

    Zero up to ``target``, then it decreases by ``coef`` for every ``target`` tokens of
    excess (e.g. ``coef=0.5``, ``target=100``: length 150 gives -0.25, 300 gives -1.0).
    Shorter completions are never rewarded for being short. It is unbounded below; combine
    with :func:`overlong_penalty` or clip if a bounded penalty is needed.

    Raises:
        ValueError: if ``target <= 0`` or ``coef < 0`` or ``length < 0``.
    """
    length_f = _check_number("length", length)
    target_f = _check_number("target", target, allow_zero=False)
    coef_f = _check_number("coef", coef)
    if length_f <= target_f:
        return 0.0
    return -coef_f * (length_f - target_f) / target_f
