"""Custom reward functions used by the tests through `module:function` specs."""

from __future__ import annotations

import os


def has_seven(prompts, completions, **cols):
    return [1.0 if "7" in c else 0.0 for c in completions]


def wrong_length(prompts, completions, **cols):
    return [1.0]


def boom(prompts, completions, **cols):
    raise RuntimeError("reward server down")


def answer_column(prompts, completions, answer, **cols):
    return [1.0 if a in c else 0.0 for a, c in zip(answer, completions, strict=True)]


def fails_on_rank_1(prompts, completions, **cols):
    """Raises on torchrun rank 1 only (tests/test_distributed.py)."""
    if os.environ.get("RANK") == "1":
        raise RuntimeError("reward server down on rank 1")
    return [0.0 for _ in completions]
