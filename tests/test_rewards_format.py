"""Tests for signalrl.rewards.format and signalrl.rewards.length (hand-computed values)."""

from __future__ import annotations

import re

import pytest

from signalrl.rewards.format import R1_PATTERN, extract_tagged_answer, format_reward
from signalrl.rewards.length import length_penalty, overlong_penalty


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>2+2 is 4</think><answer>4</answer>", 1.0),
        ("<think>\nmulti\nline\n</think>\n\n<answer>\n4\n</answer>\n", 1.0),
        ("  <think></think> <answer></answer>  ", 1.0),
        ("<answer>4</answer>", 0.0),  # no reasoning block
        ("<think>hm</think>", 0.0),  # no answer block
        ("Sure! <think>x</think><answer>4</answer>", 0.0),  # text before
        ("<think>x</think><answer>4</answer> Hope this helps!", 0.0),  # text after
        ("<think>x</think> between <answer>4</answer>", 0.0),  # text between
        ("<answer>4</answer><think>x</think>", 0.0),  # wrong order
        ("<think>x</think><answer>4", 0.0),  # unterminated
        ("<think>a</think><answer>1</answer><think>b</think><answer>2</answer>", 0.0),
        ("<think>a<think>b</think><answer>1</answer>", 0.0),  # nested tag
        ("", 0.0),
    ],
)
def test_format_reward_r1(completion: str, expected: float) -> None:
    assert format_reward(completion) == expected


def test_format_reward_custom_pattern() -> None:
    pattern = r"Reasoning:.*\nAnswer: \d+"
    assert format_reward("Reasoning: add\nthem\nAnswer: 12", pattern=pattern) == 1.0
    assert format_reward("Reasoning: add\nAnswer: twelve", pattern=pattern) == 0.0
    compiled = re.compile(r"<answer>\d+</answer>")
    assert format_reward("<answer>7</answer>", pattern=compiled) == 1.0
    assert format_reward("x <answer>7</answer>", pattern=compiled) == 0.0


def test_format_reward_bad_input() -> None:
    with pytest.raises(ValueError, match="invalid format pattern"):
        format_reward("x", pattern="(unclosed")
    with pytest.raises(TypeError, match="completion"):
        format_reward(b"<think></think>")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pattern"):
        format_reward("x", pattern=3)  # type: ignore[arg-type]


def test_r1_pattern_is_exported_string() -> None:
    assert isinstance(R1_PATTERN, str) and "<answer>" in R1_PATTERN


@pytest.mark.parametrize(
    ("completion", "tag", "expected"),
    [
        ("<think>a</think><answer> 42 </answer>", "answer", "42"),
        ("<answer>1</answer> then <answer>2</answer>", "answer", "2"),
        ("<think>\nplan\n</think><answer>x</answer>", "think", "plan"),
        ("<answer>unterminated", "answer", None),
        ("no tags", "answer", None),
    ],
)
def test_extract_tagged_answer(completion: str, tag: str, expected: str | None) -> None:
    assert extract_tagged_answer(completion, tag) == expected


def test_extract_tagged_answer_bad_tag() -> None:
    with pytest.raises(ValueError, match="tag"):
        extract_tagged_answer("<a>1</a>", "a>(")


# DAPO soft overlong punishment with max_len=100, cache=20: zero up to 80, linear to -1 at
# 100, -1 beyond.
@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (0, 0.0),
        (50, 0.0),
        (80, 0.0),
        (81, -0.05),
        (90, -0.5),
        (95, -0.75),
        (100, -1.0),
        (101, -1.0),
        (10_000, -1.0),
    ],
)
def test_overlong_penalty(length: int, expected: float) -> None:
    assert overlong_penalty(length, 100, 20) == pytest.approx(expected)


def test_overlong_penalty_edge_cases() -> None:
    # cache = 0: a hard cliff at max_len.
    assert overlong_penalty(100, 100, 0) == 0.0
    assert overlong_penalty(101, 100, 0) == -1.0
    # cache = max_len: linear over the whole range.
    assert overlong_penalty(25, 100, 100) == pytest.approx(-0.25)
    # DAPO's own setting: 20480 max, 4096 cache.
    assert overlong_penalty(16384, 20480, 4096) == 0.0
    assert overlong_penalty(18432, 20480, 4096) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="cache"):
        overlong_penalty(10, 100, 101)
    with pytest.raises(ValueError, match="max_len"):
        overlong_penalty(10, 0, 0)
    with pytest.raises(ValueError, match="length"):
        overlong_penalty(-1, 100, 10)
    with pytest.raises(TypeError, match="length"):
        overlong_penalty("10", 100, 10)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("length", "target", "coef", "expected"),
    [
        (50, 100, 0.5, 0.0),
        (100, 100, 0.5, 0.0),
        (150, 100, 0.5, -0.25),
        (300, 100, 0.5, -1.0),
        (120, 40, 1.0, -2.0),
        (500, 100, 0.0, 0.0),
    ],
)
def test_length_penalty(length: int, target: int, coef: float, expected: float) -> None:
    assert length_penalty(length, target, coef) == pytest.approx(expected)


def test_length_penalty_bad_input() -> None:
    with pytest.raises(ValueError, match="target"):
        length_penalty(10, 0, 1.0)
    with pytest.raises(ValueError, match="coef"):
        length_penalty(10, 5, -1.0)
    with pytest.raises(TypeError, match="coef"):
        length_penalty(10, 5, float("nan"))
