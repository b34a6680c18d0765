"""The synthetic arithmetic pretraining corpus: what it holds and, above all, what it never
holds (the R1-Zero template on an arithmetic question, tags around a sum, a test problem)."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from signalrl.cli import app
from signalrl.data.corpus import (
    DOC_TYPES,
    leaked_test_problems,
    make_arithmetic_corpus,
    parse_mix,
)
from signalrl.rewards.format import format_reward
from signalrl.tasks import ArithmeticTask, make_task
from signalrl.tasks.dataset import R1_ZERO_TEMPLATE

HEAD = R1_ZERO_TEMPLATE.split("{prompt}")[0]
TAIL = R1_ZERO_TEMPLATE.split("{prompt}")[1]
SUM = re.compile(r"\d+\s*[-+*]\s*\d+")


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask(digits=2, ops="+", operands=2, n_test=300)


@pytest.fixture(scope="module")
def docs(task):
    return make_arithmetic_corpus(task, 600, seed=0)


def test_every_type_appears_and_is_deterministic(task, docs):
    assert {d["type"] for d in docs} == set(DOC_TYPES)
    assert make_arithmetic_corpus(task, 50, seed=3) == make_arithmetic_corpus(task, 50, seed=3)
    assert make_arithmetic_corpus(task, 50, seed=3) != make_arithmetic_corpus(task, 50, seed=4)


def test_no_test_problem_in_any_written_form(task, docs):
    assert all(not leaked_test_problems(task, d["text"]) for d in docs)
    # the checker itself sees every form the corpus writes
    a, b = task.test()[0]["expr"].split("+")
    for text in (f"{a}+{b}=1", f"{a} + {b} = 1", f"{a} plus {b}", f"The sum of {a} and {b}"):
        assert leaked_test_problems(task, text) == [f"{a}+{b}"], text


def test_template_and_tags_only_on_other_tasks(docs):
    templated = [d for d in docs if HEAD in d["text"]]
    assert {d["type"] for d in templated} == {"r1_tagged", "r1_plain"}
    for d in templated:
        question, reply = d["text"][len(HEAD) :].split(TAIL, 1)
        assert not SUM.search(question), question  # never an arithmetic question
        assert not SUM.search(reply)
        assert format_reward(reply) == (1.0 if d["type"] == "r1_tagged" else 0.0)
    for d in docs:
        for block in re.findall(r"<(think|answer)>(.*?)</\1>", d["text"], flags=re.DOTALL):
            assert not SUM.search(block[1]), block  # no sum inside a tag, ever
        if d["type"] in ("equations", "worded", "worked"):
            assert HEAD[:40] not in d["text"] and "<think>" not in d["text"]


def test_worked_additions_are_right(task, docs):
    worked = [d["text"] for d in docs if d["type"] == "worked"]
    assert worked
    for text in worked:
        for a, b, c in re.findall(r"So (\d+)\+(\d+)=(\d+)\.", text):
            assert int(a) + int(b) == int(c)


def test_mix_and_other_tasks(task):
    only = make_arithmetic_corpus(task, 40, seed=0, mix={"equations": 1.0})
    assert {d["type"] for d in only} == {"equations"}
    assert parse_mix("equations=0.5, r1_tagged=0.5") == {"equations": 0.5, "r1_tagged": 0.5}
    with pytest.raises(ValueError, match="type one of"):
        parse_mix("poems=1")
    with pytest.raises(ValueError, match="positive sum"):
        make_arithmetic_corpus(task, 5, mix={"equations": 0.0})
    # multiplication with three operands: equations in that space, no worked additions
    times = ArithmeticTask(digits=1, ops="*", operands=3, n_test=20)
    docs = make_arithmetic_corpus(times, 30, seed=0)
    assert "worked" not in {d["type"] for d in docs}
    assert all(not leaked_test_problems(times, d["text"]) for d in docs)


def test_make_corpus_cli(tmp_path):
    out = tmp_path / "corpus.jsonl"
    res = CliRunner().invoke(
        app,
        ["data", "make-corpus", "--out", str(out), "--docs", "30"]
        + ["--set", "task.digits=1", "--set", "task.n_test=5"],
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 30 and all(set(r) == {"text", "type"} for r in rows)
    t = make_task("arithmetic", digits=1, n_test=5)
    assert all(not leaked_test_problems(t, r["text"]) for r in rows)
    res = CliRunner().invoke(app, ["data", "make-corpus", "--out", str(out), "--task", "countdown"])
    assert res.exit_code == 2 and "no corpus generator" in res.output


def test_arithmetic_r1_zero_template():
    t = ArithmeticTask(digits=2, n_test=20, template="r1_zero")
    row = t.test()[0]
    assert row["prompt"] == R1_ZERO_TEMPLATE.replace("{prompt}", f"What is {row['expr']}?")
    assert format_reward(row["completion"]) == 1.0 and t.verify(row, row["completion"]) == 1.0
    ans = row["answer"]
    assert t.verify(row, f" <think> 1+1=2 </think> <answer> {ans} </answer>") == 1.0
    assert t.verify(row, f" <think> {ans} </think> <answer> 999 </answer> {ans}") == 0.0
    assert t.verify(row, f"the answer is {ans}") == 1.0  # no tags: the plain extraction
    # train/test split is the same whatever the template
    assert [r["expr"] for r in t.test()] == [
        r["expr"] for r in ArithmeticTask(digits=2, n_test=20).test()
    ]
    with pytest.raises(ValueError, match="template must be"):
        ArithmeticTask(template="bogus")
