"""Reward functions for the torchrun tests (imported by name from `module:function` specs)."""

from __future__ import annotations

import os


def has_seven(prompts, completions, **cols):
    return [1.0 if "7" in c else 0.0 for c in completions]


def fails_on_rank_1(prompts, completions, **cols):
    if os.environ.get("RANK") == "1":
        raise RuntimeError("reward server down on rank 1")
    return [0.0 for _ in completions]
