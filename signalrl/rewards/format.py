"""Format rewards: does a completion follow a required layout (e.g. DeepSeek-R1's tags)?"""

from __future__ import annotations

import re

__all__ = ["R1_PATTERN", "extract_tagged_answer", "format_reward"]

_BODY = r"(?:(?!</?think>|</?answer>).)*"  # any text without these tags

#: DeepSeek-R1 style: reasoning in ``<think>`` tags, then the answer in ``<answer>`` tags,
#: each exactly once (bodies may not contain the tags), nothing else around them except
#: whitespace. Matched against the whole completion with ``re.DOTALL``.
R1_PATTERN = rf"\s*<think>{_BODY}</think>\s*<answer>{_BODY}</answer>\s*"


def format_reward(completion: str, *, pattern: str | re.Pattern[str] = R1_PATTERN) -> float:
    """1.0 if the *whole* completion matches ``pattern`` (``re.fullmatch``, DOTALL), else 0.0.

    Args:
        completion: the model output.
        pattern: a regex string (compiled with ``re.DOTALL``) or a compiled pattern (used as
            is). The default is :data:`R1_PATTERN`.
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    return 1.0 if _compile(pattern).fullmatch(completion) else 0.0


def extract_tagged_answer(completion: str, tag: str = "answer") -> str | None:
    """The stripped contents of the last complete ``<tag>...</tag>`` block, or ``None``."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    if not isinstance(tag, str) or not re.fullmatch(r"[A-Za-z_][\w.\-]*", tag):
        raise ValueError(f"tag must be a plain tag name like 'answer', got {tag!r}")
    name = re.escape(tag)
    matches = re.findall(rf"<{name}>(.*?)</{name}>", completion, flags=re.DOTALL)
    return matches[-1].strip() if matches else None


_cache: dict[str, re.Pattern[str]] = {}


def _compile(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
    if isinstance(pattern, re.Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str or re.Pattern, got {type(pattern).__name__}")
    compiled = _cache.get(pattern)
    if compiled is None:
        try:
            compiled = re.compile(pattern, re.DOTALL)
        except re.error as exc:
            raise ValueError(f"invalid format pattern {pattern!r}: {exc}") from exc
        _cache[pattern] = compiled
    return compiled
