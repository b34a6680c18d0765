from __future__ import annotations

import builtins
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signalrl.config import RecipeError, recipe_from_dict
from signalrl.tasks import TASKS, make_task
from signalrl.tasks.countdown import (
    CountdownTask,
    ExpressionError,
    _evaluate,
    extract_expression,
    parse_expression,
    score_expression,
)


def small(**kw) -> CountdownTask:
    return CountdownTask(**{"n_train": 400, "n_test": 100, **kw})


def test_registered_and_deterministic():
    assert TASKS["countdown"] is CountdownTask
    a, b = small(), make_task("countdown", n_train=400, n_test=100)
    assert a.name == "countdown"
    assert a.train() == b.train() and a.test() == b.test()
    assert small(seed=1).train() != a.train()


def test_train_test_disjoint_across_seeds():
    def key(r):
        return (tuple(sorted(r["numbers"])), r["target"])

    t = small()
    train, test = {key(r) for r in t.train()}, [key(r) for r in t.test()]
    assert len(set(test)) == len(test) == 100
    assert len(train) == 400  # distinct
    assert not train & set(test)
    other = small(seed=7)  # the split is by hash of the problem, not by seed
    assert not {key(r) for r in other.train()} & set(test)


def test_every_generated_problem_is_solvable_and_in_range():
    t = small(n_numbers=[2, 5], ops="+-*/", max_target=500)
    for r in t.train() + t.test():
        assert 2 <= len(r["numbers"]) <= 5
        assert all(1 <= n <= 25 for n in r["numbers"])
        assert 1 <= r["target"] <= 500 and r["answer"] == str(r["target"])
        assert r["prompt"].startswith("Numbers: ")
        assert t.verify(r, r["completion"]) == 1.0
        assert t.verify(r, r["expr"]) == 1.0
        tree, used = parse_expression(r["expr"])
        assert sorted(used) == sorted(r["numbers"]) and _evaluate(tree) == r["target"]


def test_knobs():
    t = CountdownTask(
        n_numbers=3,
        max_number=9,
        ops="*",
        n_train=60,
        n_test=5,
        prompt_template="{numbers}|{target}|{ops}",
    )
    for r in t.train():
        assert len(r["numbers"]) == 3 and max(r["numbers"]) <= 9
        assert set(r["expr"]) <= set("0123456789*")
        assert r["prompt"] == f"{', '.join(map(str, r['numbers']))}|{r['target']}|*"
    divs = CountdownTask(ops="/", n_numbers=2, max_target=25, n_train=40, n_test=5)
    assert all("/" in r["expr"] for r in divs.train())


@pytest.mark.parametrize(
    "kw",
    [
        {"n_numbers": 1},
        {"n_numbers": [4, 3]},
        {"n_numbers": "4"},
        {"ops": "+^"},
        {"ops": ""},
        {"min_number": 5, "max_number": 4},
        {"min_target": 10, "max_target": 1},
        {"test_fraction": 1.0},
        {"prompt_template": "{numbers} only"},
        {"prompt_template": "{numbers} {target} {other}"},
    ],
)
def test_bad_knobs(kw):
    with pytest.raises(ValueError, match="countdown"):
        CountdownTask(**kw)


def test_too_small_space_fails_clearly():
    t = CountdownTask(n_numbers=2, max_number=2, ops="+", n_train=50, n_test=5)
    with pytest.raises(ValueError, match="too small"):
        t.train()


@pytest.mark.parametrize(
    "expr,value",
    [
        ("2+3*4", 14),
        ("(2+3)*4", 20),
        ("10-4-3", 3),  # left associative
        ("10-(4-3)", 9),
        ("24/4/2", 3),
        ("24/(4/2)", 12),
        ("7/2*4", 14),  # exact rationals on the way
        ("((((5))))", 5),
        ("3 × 4 − 2 ÷ 1", 10),
    ],
)
def test_parser_precedence_and_parentheses(expr, value):
    tree, _ = parse_expression(expr)
    assert _evaluate(tree) == Fraction(value)


@pytest.mark.parametrize(
    "expr",
    ["", "-3+5", "5+-3", "+5", "5--3", "2**3", "2^3", "1.5*2", "(1+2", "1+2)", "1 2", "()",
     "abs(3)", "x+1", "1" + "+1" * 300, "(" * 70 + "1" + ")" * 70],
)  # fmt: skip
def test_parser_rejects(expr):
    with pytest.raises(ExpressionError):
        parse_expression(expr)


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("(3+5)*7", 1.0),
        (" (3+5)*7\n", 1.0),
        ("7*(5+3)", 1.0),  # any order of the numbers
        ("Let me think.\n3+5 is 8.\n(3+5)*7", 1.0),  # last line
        ("Answer: (3+5)*7\nDone", 1.0),
        ("<think>try 3*5*7</think> <answer>(3+5)*7</answer>", 1.0),
        ("<answer>(3+5)*7</answer>\n3*5*7", 1.0),  # the tag wins
        ("`(3+5)*7`.", 1.0),
        ("$(3+5)*7$", 1.0),
        ("(3+5)*7 = 56", 1.0),
        ("(3+5)*7 = 57", 0.0),  # a false statement
        ("(3+5)*7 = 56 = 56", 0.0),
        ("3*5+7", 0.0),  # wrong value
        ("(3+5)*7*1", 0.0),  # a number that was not given
        ("(3+3)*7", 0.0),  # reuses 3, misses 5
        ("(3+5)*7+3-3", 0.0),  # extra uses
        ("3+5", 0.0),  # missing 7 (use_all)
        ("(3+5)*7/0", 0.0),
        ("-3+5", 0.0),  # unary minus is not allowed
        ("", 0.0),
        ("I don't know", 0.0),
        ("56", 0.0),
    ],
)
def test_verify(completion, expected):
    t = small()
    row = {"numbers": [3, 5, 7], "target": 56, "answer": "56"}
    assert t.verify(row, completion) == expected


def test_division_by_zero_scores_zero():
    assert score_expression("5/(3-3)", [5, 3, 3], 1) == 0.0
    assert score_expression("(3-3)/5", [5, 3, 3], 0) == 1.0


def test_duplicate_numbers_are_a_multiset():
    assert score_expression("4*4+2", [4, 2, 4], 18) == 1.0
    assert score_expression("4*2+2", [4, 2, 4], 10) == 0.0
    assert score_expression("4*2", [4, 2, 4], 8) == 0.0


def test_use_all_false_allows_a_subset_once_each():
    t = small(use_all=False)
    row = {"numbers": [3, 5, 7], "target": 8}
    assert t.verify(row, "3+5") == 1.0
    assert t.verify(row, "3+5+7-7") == 0.0  # 7 twice
    assert t.verify(row, "4+4") == 0.0
    assert score_expression("2*4", [3, 5, 7], 8, use_all=False) == 0.0


@pytest.mark.parametrize(
    "payload",
    [
        "__import__('os').system('touch /tmp/pwned')",
        "<answer>__import__('os')</answer>",
        "exec('1')",
        "(lambda: 56)()",
        "[3, 5, 7]",
        "3+5 if True else 7",
        "\x00\x01",
        "9" * 100_000,
    ],
)
def test_injection_attempts_score_zero_without_running(payload, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("the verifier must never evaluate code")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    monkeypatch.setattr(builtins, "__import__", forbidden)
    t = small()
    assert t.verify({"numbers": [3, 5, 7], "target": 56}, payload) == 0.0


def test_extract_expression():
    assert extract_expression("a\n\n  1+2  \n\n") == "1+2"
    assert extract_expression("answer: 1+2 \nmore") == "1+2"
    assert extract_expression("<answer> 1+2 </answer>") == "1+2"
    assert extract_expression("   ") is None


def test_task_extract_is_the_expression_without_whitespace():
    t = small()
    row = {"numbers": [3, 5, 7], "target": 56}
    assert t.extract("<answer> (3 + 5) * 7 </answer>") == t.extract("(3+5)*7.") == "(3+5)*7"
    assert t.extract("Answer: (3+5) * 7 = 56") == "(3+5)*7=56"
    assert t.extract("  \n ") is None
    for text in ("<answer> (3 + 5) * 7 </answer>", "Answer: (3+5) * 7 = 56", "3 * 5 + 7"):
        assert t.verify(row, text) == t.verify(row, t.extract(text))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=2, max_size=5), st.data())
def test_random_trees_render_and_parse_back(numbers, data):
    # the renderer uses minimal parentheses: parsing its output must give the tree's value
    t = CountdownTask(n_train=1, n_test=1)
    import random

    built = t._tree(numbers, random.Random(data.draw(st.integers(0, 10**6))))
    if built is None:
        return
    from signalrl.tasks.countdown import _render

    tree, value = built
    parsed, used = parse_expression(_render(tree))
    assert _evaluate(parsed) == value and used == numbers


def test_recipe_validates():
    recipe = recipe_from_dict({"task": {"name": "countdown", "n_numbers": 3}}, "x")
    assert recipe.task.name == "countdown"
    recipe_from_dict({"task": {"name": "countdown", "n_numbers": [3, 5], "ops": "+-"}}, "x")
    with pytest.raises(RecipeError, match="n_numbers"):
        recipe_from_dict({"task": {"name": "countdown", "n_numbers": 1}}, "x")
    with pytest.raises(RecipeError, match="unknown key 'task.digits'"):
        recipe_from_dict({"task": {"name": "countdown", "digits": 3}}, "x")
