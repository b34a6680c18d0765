"""Tests for signalrl.rewards.math (real math-verify, no mocks)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from signalrl.rewards.math import (
    answers_match,
    extract_answer,
    extract_reference,
    find_last_boxed,
    math_reward,
)

DATA = Path(__file__).parent / "data"

# (completion, reference, expected reward with percent_as_fraction=False)
EQUIVALENCE_CASES = [
    # thousands separators
    ("The answer is 1,000.", "1000", 1.0),
    (r"\boxed{1000}", "1,000", 1.0),
    ("The answer is 1,234,567", "1234567", 1.0),
    ("#### 1,234", "1234", 1.0),
    # fractions vs decimals
    (r"so \boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{\dfrac{3}{4}}", "0.75", 1.0),
    (r"\boxed{\tfrac{3}{4}}", r"\dfrac{3}{4}", 1.0),
    ("The answer is 1/3", "0.333333", 1.0),
    (r"\boxed{\frac{2}{3}}", "0.67", 0.0),
    # percentages (default: 50% means 50)
    (r"\boxed{50\%}", "0.5", 0.0),
    ("The answer is 50%", "50", 1.0),
    # wrong but close
    (r"\boxed{3.14}", "3.15", 0.0),
    (r"\boxed{1000}", "1001", 0.0),
    (r"\boxed{12}", "#### 1,200", 0.0),
    (r"\boxed{123456789}", "123456788", 0.0),
    # unterminated \boxed{: its contents never count
    (r"The answer is \boxed{42", "42", 0.0),
    (r"First \boxed{41}, no wait: \boxed{42", "42", 0.0),
    (r"First \boxed{41}, no wait: \boxed{42", "41", 1.0),
    # negative numbers
    (r"\boxed{-7}", "-7", 1.0),
    (r"\boxed{-7}", "7", 0.0),
    ("the temperature is now \u22124 degrees", "-4", 1.0),
    # intervals
    (r"\boxed{(1, 2]}", r"\boxed{(1,2]}", 1.0),
    (r"\boxed{[1, 2]}", "(1,2]", 0.0),
    (r"\boxed{(-\infty, 3)}", r"(-\infty,3)", 1.0),
    # sets
    (r"\boxed{\{3,1,2\}}", r"\{1,2,3\}", 1.0),
    (r"\boxed{\{1,2\}}", r"\{1,2,3\}", 0.0),
    # square roots and expressions
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1.0),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", 1.0),
    (r"\boxed{2\sqrt{3}}", r"3\sqrt{2}", 0.0),
    ("The answer is: x^2+2x+1", "(x+1)^2", 1.0),
    (r"\boxed{x^2+1}", "x^2-1", 0.0),
    # text around the answer
    ("Natalia sold 48 clips in April... Answer: 72 clips", "She sold 72.\n#### 72", 1.0),
    (r"**Final Answer:** $\frac{7}{2}$.", "3.5", 1.0),
    ("She has 5 apples and eats 2, leaving 3", "3", 1.0),
    (r"The total cost is $\boxed{\$18.00}$ dollars.", "18", 1.0),
    ("Answer:\n 42", "42", 1.0),
    (r"\boxed{\text{Monday}}", r"\text{Monday}", 1.0),
    # multiple boxed: the last wins
    (r"First \boxed{3}, then correcting myself, \boxed{4}", "4", 1.0),
    (r"First \boxed{3}, then correcting myself, \boxed{4}", "3", 0.0),
    # GSM8K / MATH references
    ("so 263 cookies", "12 * 25 = 300\n300 - 37 = 263\n#### 263", 1.0),
    ("so 1245 sheep", "#### 1,245", 1.0),
    ("so 1254 sheep", "#### 1,245", 0.0),
    ("so the answer is 0.5", r"Thus $x = \boxed{\frac{1}{2}}$.", 1.0),
    # no answer at all
    ("I do not know.", "5", 0.0),
    ("", "5", 0.0),
]


@pytest.mark.parametrize(("completion", "reference", "expected"), EQUIVALENCE_CASES)
def test_math_reward_table(completion: str, reference: str, expected: float) -> None:
    assert math_reward(completion, reference) == expected


def test_table_is_large_and_balanced() -> None:
    assert len(EQUIVALENCE_CASES) >= 40
    values = [e for *_, e in EQUIVALENCE_CASES]
    assert values.count(1.0) >= 15 and values.count(0.0) >= 15


@pytest.mark.parametrize(
    ("completion", "reference", "as_fraction", "expected"),
    [
        (r"\boxed{50\%}", "0.5", False, 0.0),
        (r"\boxed{50\%}", "0.5", True, 1.0),
        ("The answer is 50%", "50", False, 1.0),
        ("The answer is 50%", "50", True, 0.0),
        ("The rate is 12.5%", r"\frac{1}{8}", True, 1.0),
        ("The rate is 12.5%", "12.5", False, 1.0),
    ],
)
def test_percent_setting(completion: str, reference: str, as_fraction: bool, expected: float):
    assert math_reward(completion, reference, percent_as_fraction=as_fraction) == expected


def test_fallback_last_number_can_be_disabled() -> None:
    assert math_reward("she has 3 left", "3") == 1.0
    assert math_reward("she has 3 left", "3", fallback_last_number=False) == 0.0
    assert math_reward("The answer is 3", "3", fallback_last_number=False) == 1.0


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"a \boxed{1} b \boxed{\{1, 2\}} c", r"\{1, 2\}"),
        (r"\boxed{\frac{a}{b}", None),  # unterminated, and nothing numeric before it
        (r"3 then \boxed{", "3"),
        ("The final answer is $x = 5$.", "x = 5"),
        ("answer is 72 clips.", "72"),
        ("The answer is therefore 8", "8"),
        ("blah\n#### 1,234\n", "1,234"),
        ("costs 12.50 then 7", "7"),
        ("no digits", None),
        (r"\fbox{9}", "9"),
    ],
)
def test_extract_answer(completion: str, expected: str | None) -> None:
    assert extract_answer(completion) == expected


def test_find_last_boxed_nested_braces() -> None:
    assert find_last_boxed(r"\boxed{\frac{\sqrt{2}}{2}}") == r"\frac{\sqrt{2}}{2}"
    assert find_last_boxed(r"\boxed {7}") == "7"
    assert find_last_boxed(r"\boxed{\{1\}}") == r"\{1\}"
    assert find_last_boxed("nothing") is None


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("6 + 7 = 13\n#### 13", "13"),
        ("#### 1,234", "1,234"),
        (r"So $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        ("  42 ", "42"),
    ],
)
def test_extract_reference(reference: str, expected: str) -> None:
    assert extract_reference(reference) == expected


@pytest.mark.parametrize("bad", ["", "   ", "reasoning\n####   ", r"\boxed{}"])
def test_extract_reference_rejects_empty(bad: str) -> None:
    with pytest.raises(ValueError, match="no final answer"):
        extract_reference(bad)


def test_bad_input_errors() -> None:
    with pytest.raises(TypeError, match="completion must be a str"):
        math_reward(None, "1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="reference answer must be a str"):
        math_reward("1", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        math_reward("1", "1", timeout=0)
    with pytest.raises(ValueError, match="no final answer"):
        math_reward("1", "")


def test_answers_match_direct() -> None:
    assert answers_match("1,000", "1000")
    assert answers_match(r"\frac{1}{2}", "0.5")
    assert not answers_match("0.5", "50")


def test_works_off_the_main_thread() -> None:
    """math-verify's SIGALRM timeouts break in threads; ours must not."""
    results: list[float] = []

    def work() -> None:
        results.append(math_reward(r"\boxed{\frac{1}{2}}", "0.5"))
        results.append(math_reward(r"\boxed{3}", "4"))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0.0, 0.0, 1.0, 1.0]


def test_pathological_input_is_bounded() -> None:
    # A huge power tower must not hang the verifier: it either resolves or times out to 0.
    completion = r"\boxed{" + "9^{" * 30 + "9" + "}" * 30 + "}"
    assert math_reward(completion, "1", timeout=1.0) == 0.0


def test_timeout_off_the_main_thread_recovers() -> None:
    """In a thread the check runs in a helper process that is killed on timeout."""
    slow = r"\boxed{" + "9^{" * 30 + "9" + "}" * 30 + "}"
    results: list[float] = []

    def work() -> None:
        results.append(math_reward(slow, "1", timeout=1.0))
        results.append(math_reward(r"\boxed{\sqrt{12}}", r"2\sqrt{3}"))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert results == [0.0, 1.0]


def _rows(name: str) -> list[dict]:
    with open(DATA / name, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.mark.parametrize("row", _rows("gsm8k_sample.jsonl"), ids=lambda r: r["question"][:30])
def test_gsm8k_sample(row: dict) -> None:
    assert math_reward(row["completion"], row["answer"]) == row["expected"]


@pytest.mark.parametrize("row", _rows("math_sample.jsonl"), ids=lambda r: r["problem"][:30])
def test_math_sample(row: dict) -> None:
    assert math_reward(row["completion"], row["solution"]) == row["expected"]


def test_reference_solutions_score_themselves() -> None:
    for row in _rows("gsm8k_sample.jsonl"):
        assert math_reward(row["answer"], row["answer"]) == 1.0
    for row in _rows("math_sample.jsonl"):
        assert math_reward(row["solution"], row["solution"]) == 1.0


def test_worker_loads_this_module_by_path_without_the_rest_of_signalrl() -> None:
    """The helper process loads math.py by file path: no signalrl module gets imported."""
    from signalrl.rewards import math as math_rewards

    # The boot script serves requests until end of input, then runs what follows.
    report = "print(sorted(m for m in sys.modules if 'signalrl' in m and 'editable' not in m))\n"
    out = subprocess.run(
        [sys.executable, "-c", math_rewards._Worker._BOOT + report, math_rewards.__file__],
        input=json.dumps({"gold": "1/2", "pred": "0.5", "timeout": 30}) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.splitlines() == ["ready", '{"match": true}', "[]"], out.stderr[-2000:]
