from __future__ import annotations

import json
from pathlib import Path

import pytest

from signalrl.config import RecipeError, recipe_from_dict
from signalrl.rewards.format import format_reward
from signalrl.rewards.registry import RewardComposer, RewardSpec
from signalrl.tasks import TASKS, make_task
from signalrl.tasks.dataset import R1_ZERO_TEMPLATE, DatasetTask, DatasetTaskError

DATA = Path(__file__).parent / "data"
GSM8K, MATH, CODE = (
    DATA / "gsm8k_sample.jsonl",
    DATA / "math_sample.jsonl",
    DATA / "code_sample.jsonl",
)


def raw(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def both(path: Path, fmt: str, **kw) -> DatasetTask:
    """Every row of `path` in train and in test (order kept), to check rows one by one."""
    return DatasetTask(path=str(path), format=fmt, test_path=str(path), **kw)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_registered():
    assert TASKS["dataset"] is DatasetTask
    t = make_task("dataset", path=str(GSM8K), format="gsm8k", test_path=str(GSM8K))
    assert t.name == "dataset"


def test_gsm8k_rows_and_verify():
    t = both(GSM8K, "gsm8k")
    rows, src = t.train(), raw(GSM8K)
    assert len(rows) == len(src) == len(t.test())
    for row, r in zip(rows, src, strict=True):
        assert row["prompt"] == row["question"] == r["question"]
        assert row["answer"] == r["answer"].rsplit("####", 1)[1].strip()
        assert "<<" not in row["completion"] and row["completion"].endswith(row["answer"])
        assert t.verify(row, row["completion"]) == 1.0  # the reference solution
        assert t.verify(row, r["completion"]) == r["expected"]  # the sample's own labels
        assert t.verify(row, "The answer is 123456789.") == 0.0
    assert rows[1]["answer"] == "1,245" and t.verify(rows[1], "#### 1245") == 1.0


def test_math_rows_and_verify():
    t = both(MATH, "math")
    for row, r in zip(t.train(), raw(MATH), strict=True):
        assert row["prompt"] == r["problem"] and row["completion"] == r["solution"]
        assert f"\\boxed{{{row['answer']}}}" in r["solution"]
        assert t.verify(row, row["completion"]) == 1.0
        assert t.verify(row, f"So it is $\\boxed{{{row['answer']}}}$.") == 1.0
        assert t.verify(row, r["completion"]) == r["expected"]
        assert t.verify(row, "\\boxed{-1234}") == 0.0


def test_code_rows_and_verify():
    t = both(CODE, "code", code_timeout=10.0)
    rows, src = t.train(), raw(CODE)
    assert [r["tests"] for r in rows] == [r["tests"] for r in src]
    assert rows[3]["entry_point"] == "square" and rows[0]["entry_point"] is None
    assert "completion" not in rows[0]  # no canonical_solution/code column in the sample
    for i in (0, 1, 4):  # one MBPP pass, one partial, one HumanEval failure
        assert t.verify(rows[i], src[i]["completion"]) == src[i]["expected"]
    assert t.verify(rows[0], "def add(a, b):\n    return 7\n") == 0.0
    # a HumanEval body-only completion gets the prompt prepended
    assert t.verify(rows[3], "\n    return x * x\n") == 1.0


def test_code_canonical_solution_is_the_sft_completion(tmp_path):
    p = write_jsonl(
        tmp_path / "he.jsonl",
        [
            {
                "prompt": "def inc(x):\n",
                "canonical_solution": "def inc(x):\n    return x + 1\n",
                "tests": "def check(candidate):\n    assert candidate(1) == 2\n",
                "entry_point": "inc",
            }
        ],
    )
    t = both(p, "code")
    row = t.train()[0]
    assert row["completion"].startswith("def inc") and t.verify(row, row["completion"]) == 1.0


def test_generic_rows_and_verify(tmp_path):
    p = write_jsonl(
        tmp_path / "g.jsonl",
        [{"prompt": "2+2?", "answer": 4}, {"prompt": "Half?", "answer": "1/2"}],
    )
    t = both(p, "generic")
    a, b = t.train()
    assert a["answer"] == "4" and a["completion"] == "4"
    assert t.verify(a, "It is 4.") == 1.0 and t.verify(a, "5") == 0.0
    assert t.verify(b, "\\boxed{0.5}") == 1.0 and t.verify(b, "\\boxed{2}") == 0.0


def test_r1_zero_template(tmp_path):
    t = both(GSM8K, "gsm8k", template="r1_zero")
    row = t.train()[0]
    assert row["prompt"] == R1_ZERO_TEMPLATE.replace("{prompt}", row["question"])
    assert row["prompt"].startswith("A conversation between User and Assistant.")
    assert row["prompt"].endswith(f"User: {row['question']}. Assistant:")
    assert (
        row["completion"].startswith(" <think> ") and "<answer> 263 </answer>" in row["completion"]
    )
    assert t.verify(row, row["completion"]) == 1.0
    assert format_reward(row["completion"]) == 1.0
    # the tagged answer wins over numbers in the reasoning, both ways
    assert t.verify(row, "<think>maybe 263</think> <answer>300</answer>") == 0.0
    assert t.verify(row, "<think>300 - 37</think> <answer>263 cookies</answer>") == 1.0
    assert t.verify(row, "<think>x</think> <answer>The answer is 263.</answer>") == 1.0
    assert format_reward("263") == 0.0 and t.verify(row, "263") == 1.0  # accuracy only
    m = both(MATH, "math", template="r1_zero").train()[0]
    math_task = both(MATH, "math", template="r1_zero")
    assert math_task.verify(m, "<think></think><answer>\\frac{1}{2}</answer>") == 1.0
    assert math_task.verify(m, "<think></think><answer>\\frac{1}{3}</answer>") == 0.0
    assert math_task.verify(m, m["completion"]) == 1.0


def test_format_reward_is_a_reward_term_not_a_task_option():
    """The R1 format reward comes from a `format` term in the recipe's rewards, composed with
    the task's accuracy; the task has no option for it (an unknown keyword fails loudly)."""
    t = both(GSM8K, "gsm8k", template="r1_zero")
    row = t.train()[0]
    rewards = RewardComposer(
        [RewardSpec(type="format", weight=0.5), RewardSpec(type="task", name="accuracy")], t
    )
    tagged = "<think> 300 - 37 </think> <answer> 263 </answer>"
    got = rewards([row["prompt"]] * 3, [tagged, "263", "<answer> 1 </answer>"], [row] * 3, [1] * 3)
    assert got.components == {"format": [1.0, 0.0, 0.0], "accuracy": [1.0, 1.0, 0.0]}
    assert got.total == [1.5, 1.0, 0.0]
    with pytest.raises(ValueError, match="reward_format"):
        make_task("dataset", path=str(GSM8K), format="gsm8k", reward_format=True)


def test_extract_is_the_answer_verify_reads():
    t = both(GSM8K, "gsm8k")
    row = t.train()[0]
    assert t.extract("so 200 + 63 = 263. The answer is 263.") == "263"
    assert t.extract("<think> maybe 300 </think> <answer> 263 cookies </answer>") == "263"
    assert t.extract("no number here") is None
    for text in ("The answer is 263.", "<answer>263</answer>", "#### 263", "nothing"):
        assert t.verify(row, text) == float(t.extract(text) == "263")
    code = both(CODE, "code")
    program = "def add(a, b):\n    return a + b"
    assert code.extract(f"```python\n{program}\n```") == program
    assert code.extract(f"<answer>```python\n{program}\n```</answer>") == program


def test_chat_and_custom_templates():
    t = both(GSM8K, "gsm8k", template="chat", system_prompt="Be brief.")
    row = t.train()[0]
    assert row["prompt"] == row["question"]
    assert row["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": row["question"]},
    ]
    assert "messages" not in both(GSM8K, "gsm8k").train()[0]
    c = both(MATH, "math", template="Q: {prompt}\nA ({literal}):")
    r = c.train()[0]
    assert r["prompt"] == f"Q: {r['question']}\nA ({{literal}}):"


def _jsonl_questions(tmp_path: Path, n: int = 200) -> Path:
    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(n)]
    rows.append(dict(rows[0]))  # a duplicate question lands on the same side
    return write_jsonl(tmp_path / "qs.jsonl", rows)


def test_hash_split_is_deterministic_and_disjoint(tmp_path):
    p = _jsonl_questions(tmp_path)
    a = DatasetTask(path=str(p), test_fraction=0.25)
    b = DatasetTask(path=str(p), test_fraction=0.25, seed=5)
    assert a.train() == b.train() and a.test() == b.test()  # the split ignores the seed
    train, test = {r["question"] for r in a.train()}, {r["question"] for r in a.test()}
    assert not train & test and len(train) + len(test) == 200
    assert 20 < len(test) < 80
    assert len(a.train()) + len(a.test()) == 201
    bigger = DatasetTask(path=str(p), test_fraction=0.5)
    assert test <= {r["question"] for r in bigger.test()}  # monotone in test_fraction


def test_limits_are_seeded_subsets(tmp_path):
    p = _jsonl_questions(tmp_path)
    a = DatasetTask(path=str(p), test_fraction=0.25, n_train=30, n_test=10)
    assert len(a.train()) == 30 and len(a.test()) == 10
    assert a.train() == DatasetTask(path=str(p), test_fraction=0.25, n_train=30).train()
    other = DatasetTask(path=str(p), test_fraction=0.25, n_train=30, seed=1)
    assert other.train() != a.train()
    full = DatasetTask(path=str(p), test_fraction=0.25)
    order = [r["source"] for r in full.train()]
    picked = [order.index(r["source"]) for r in a.train()]
    assert picked == sorted(picked)  # file order kept


def test_split_leaving_nothing_fails(tmp_path):
    p = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "a?", "answer": "1"}])
    with pytest.raises(DatasetTaskError, match="one.jsonl.*leaves no"):
        DatasetTask(path=str(p))


def test_parquet_and_saved_dataset(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = raw(GSM8K)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "g.parquet")
    from_parquet = both(tmp_path / "g.parquet", "gsm8k")
    jsonl = both(GSM8K, "gsm8k")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "source"} for r in rs]  # noqa: E731
    assert strip(from_parquet.train()) == strip(jsonl.train())
    assert from_parquet.train()[2]["source"].endswith("g.parquet: row 3")

    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:4]),
            "test": datasets.Dataset.from_list(rows[4:]),
        }
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    t = DatasetTask(path=str(tmp_path / "hf"), format="gsm8k", test_path=str(tmp_path / "hf"))
    assert len(t.train()) == 4 and len(t.test()) == 2
    assert strip(t.test()) == strip(jsonl.train())[4:]
    with pytest.raises(DatasetTaskError, match="no split 'validation'"):
        DatasetTask(path=str(tmp_path / "hf"), format="gsm8k", split="validation")


def test_columns_and_completion_field(tmp_path):
    p = write_jsonl(
        tmp_path / "m.jsonl",
        [{"q": "1+1?", "sol": "It is \\boxed{2}.", "hint": "two"}] * 2,
    )
    t = both(p, "math", columns={"problem": "q", "solution": "sol"}, completion_field="hint")
    row = t.train()[0]
    assert row["question"] == "1+1?" and row["answer"] == "2" and row["completion"] == "two"
    with pytest.raises(DatasetTaskError, match=r"line 1: missing column 'query'"):
        both(p, "math", columns={"problem": "query", "solution": "sol"})


@pytest.mark.parametrize(
    "fmt,rows,pattern",
    [
        ("gsm8k", [{"question": "q", "answer": "#### 1"}, {"answer": "#### 2"}],
         r"line 2: missing field 'question'"),
        ("gsm8k", [{"question": "   ", "answer": "#### 1"}], r"line 1: field 'question' is empty"),
        ("gsm8k", [{"question": "q", "answer": "1"}], r"line 1: field 'answer' has no '#### N'"),
        ("gsm8k", [{"question": "q", "answer": "x ####"}], r"line 1: field .answer. has an empty"),
        ("gsm8k", [{"question": 3, "answer": "#### 1"}], r"line 1: field .question. must be a str"),
        ("math", [{"problem": "p", "solution": "it is 3"}], r"line 1: field 'solution' has no"),
        ("math", [{"problem": "p", "solution": "\\boxed{3"}], r"line 1: field 'solution' has no"),
        ("code", [{"prompt": "p", "tests": "assert f()"}], r"line 1: field 'tests' is a string"),
        ("code", [{"prompt": "p", "tests": [1, 2]}], r"line 1: field 'tests' must be a non-empty"),
        ("code", [{"prompt": "p", "tests": []}], r"line 1: field 'tests' must be a non-empty"),
        ("code", [{"prompt": "p", "tests": "def check(c): pass"}], r"line 1: field 'entry_point'"),
        ("code", [{"prompt": "p"}], r"line 1: missing field 'tests'"),
        ("generic", [{"prompt": "p", "answer": ""}], r"line 1: field 'answer' is empty"),
        ("generic", [{"prompt": "p", "answer": None}], r"line 1: field 'answer' must be a string"),
        ("generic", [["p", "a"]], r"line 1: a row must be an object"),
    ],
)  # fmt: skip
def test_bad_rows_name_file_row_and_field(tmp_path, fmt, rows, pattern):
    p = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DatasetTaskError, match=r"bad\.jsonl: " + pattern):
        both(p, fmt)


def test_bad_files(tmp_path):
    with pytest.raises(DatasetTaskError, match="not found"):
        DatasetTask(path=str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DatasetTaskError, match="unknown file type"):
        DatasetTask(path=str(tmp_path / "x.csv"))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "answer": "1"}\n\n{oops\n')
    with pytest.raises(DatasetTaskError, match=r"broken\.jsonl: line 3: not valid JSON"):
        DatasetTask(path=str(tmp_path / "broken.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetTaskError, match="no rows"):
        DatasetTask(path=str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DatasetTaskError, match="Parquet"):
        DatasetTask(path=str(tmp_path / "bad.parquet"))


@pytest.mark.parametrize(
    "kw",
    [
        {"format": "csv"},
        {"template": "fancy"},
        {"system_prompt": "hi"},
        {"test_fraction": 0.0},
        {"n_train": 0},
        {"sandbox": "maybe"},
        {"columns": {"prompt": 3}},
    ],
)
def test_bad_options(kw):
    with pytest.raises(ValueError, match="dataset"):
        DatasetTask(path=str(GSM8K), **kw)


def test_recipe_validates():
    task = {"name": "dataset", "path": str(GSM8K), "format": "gsm8k", "test_path": str(GSM8K)}
    recipe = recipe_from_dict({"task": {**task, "template": "r1_zero"}}, "x")
    assert recipe.task.name == "dataset"
    with pytest.raises(RecipeError, match=r"x: task: .*missing\.jsonl: dataset file not found"):
        recipe_from_dict({"task": {**task, "path": "missing.jsonl"}}, "x")
    with pytest.raises(RecipeError, match=r"math_sample\.jsonl: line 1: missing field 'question'"):
        recipe_from_dict({"task": {**task, "path": str(MATH)}}, "x")
    with pytest.raises(RecipeError, match="unknown key 'task.question_field'"):
        recipe_from_dict({"task": {**task, "question_field": "q"}}, "x")


def test_a_math_solution_with_several_boxes_has_them_all_as_its_answer(tmp_path):
    import json

    from signalrl.tasks.dataset import DatasetTask

    p = tmp_path / "m.jsonl"
    rows = [
        {
            "problem": f"Solve x^2 + x - 2 = 0 ({i})",
            "solution": r"So \(\boxed{1}\) and \(\boxed{-2}\).",
        }
        for i in range(4)
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = DatasetTask(path=str(p), format="math", test_fraction=0.5)
    row = (t.train() + t.test())[0]
    assert row["answer"] == "1,-2"
    assert t.verify(row, r"\boxed{-2, 1}") == 1.0 and t.verify(row, r"\boxed{-2}") == 0.0
