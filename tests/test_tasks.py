from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from signalrl.tasks import make_task
from signalrl.tasks.arithmetic import ArithmeticTask, _evaluate, extract_int_answer


def test_deterministic_and_disjoint():
    a, b = ArithmeticTask(n_train=3000, n_test=300), ArithmeticTask(n_train=3000, n_test=300)
    assert a.train() == b.train() and a.test() == b.test()
    train = {r["expr"] for r in a.train()}
    test = [r["expr"] for r in a.test()]
    assert len(set(test)) == len(test) == 300
    assert not train & set(test)
    other = ArithmeticTask(n_train=3000, n_test=300, seed=1)
    assert other.test() != a.test()
    assert not {r["expr"] for r in other.train()} & set(test)  # split is by hash, not by seed


def test_rows_are_correct():
    t = ArithmeticTask(digits=3, ops="+-*", operands=3, n_train=500, n_test=50)
    for r in t.train() + t.test():
        assert r["prompt"] == r["expr"] + "="
        assert int(r["answer"]) == eval(r["expr"])  # noqa: S307 - test oracle on our own digits
        assert t.verify(r, r["completion"]) == 1.0
        assert t.verify(r, str(int(r["answer"]) + 1)) == 0.0


def test_difficulty_knobs():
    t = ArithmeticTask(digits=1, ops="*", operands=4, n_train=50, n_test=5, exact_digits=True)
    for r in t.train():
        nums = r["expr"].split("*")
        assert len(nums) == 4 and all(1 <= int(n) <= 9 for n in nums)


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("46", "46"),
        (" 46\n", "46"),
        ("-12", "-12"),
        ("12 then 46", "46"),
        ("Answer: 1,234", "1234"),
        ("the answer is 7.", "7"),
        ("#### 99", "99"),
        ("no digits", None),
        ("", None),
    ],
)
def test_extract(completion, expected):
    assert extract_int_answer(completion) == expected


def test_verify_exact():
    row = {"answer": "46"}
    t = ArithmeticTask(n_test=10, n_train=10)
    assert t.verify(row, "46") == 1.0
    assert t.verify(row, "046") == 1.0  # same integer
    assert t.verify(row, "47") == 0.0
    assert t.verify(row, "4.6") == 0.0
    assert t.verify(row, "") == 0.0


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("46", "46"),
        ("The answer is 46.", "46"),
        ("046", "46"),
        ("-0", "0"),
        ("-007", "-7"),
        ("Answer: 1,234", "1234"),
        ("<think> 40+6=46 </think> <answer> 46 </answer> 99", "46"),  # the tag wins
        ("no digits", None),
        ("<answer></answer>", None),
    ],
)
def test_task_extract_is_the_answer_verify_judges(completion, expected):
    t = ArithmeticTask(n_test=10, n_train=10)
    assert t.extract(completion) == expected
    assert t.verify({"answer": "46"}, completion) == float(expected == "46")


def test_task_extract_of_a_huge_number():
    t = ArithmeticTask(n_test=10, n_train=10)
    assert t.extract("9" * 5000) == "9" * 5000  # no int() limit on digit strings
    assert t.verify({"answer": "46"}, "9" * 5000) == 0.0


@given(st.lists(st.integers(0, 99), min_size=2, max_size=5), st.data())
def test_precedence_matches_python(nums, data):
    ops = [data.draw(st.sampled_from("+-*")) for _ in nums[1:]]
    expr = str(nums[0]) + "".join(f"{o}{n}" for o, n in zip(ops, nums[1:], strict=True))
    assert _evaluate(nums, ops) == eval(expr)  # noqa: S307


def test_bad_knobs():
    with pytest.raises(ValueError, match="ops"):
        ArithmeticTask(ops="/")
    with pytest.raises(ValueError, match="too many"):
        ArithmeticTask(digits=1, n_test=100)
    with pytest.raises(ValueError, match="unknown task"):
        make_task("chess")
