from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from typer.testing import CliRunner

from signalrl.cli import app
from signalrl.data.make_preferences import make_preferences, pick_pairs, write_jsonl_atomic
from signalrl.data.preference import load_preference_data


def test_pick_pairs_first_of_each_kind_then_distinct_ones():
    comps = ["7", "", "8", "7", "x7", "9", "8"]
    scores = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert pick_pairs(comps, scores) == [("7", "8")]  # blank "" is never a rejected
    assert pick_pairs(comps, scores, k=5) == [("7", "8"), ("x7", "9")]
    assert pick_pairs(["7", "7"], [1.0, 1.0], k=3) == []  # no wrong sample
    assert pick_pairs(["1", " "], [0.0, 0.0]) == []  # no correct sample


def test_write_jsonl_atomic_leaves_no_temp_files(tmp_path):
    out = tmp_path / "sub" / "p.jsonl"
    write_jsonl_atomic([{"a": 1}, {"a": 2}], out)
    write_jsonl_atomic([{"a": 3}], out)  # replaces
    assert [json.loads(x) for x in out.read_text().splitlines()] == [{"a": 3}]
    assert [p.name for p in out.parent.iterdir()] == ["p.jsonl"]


@dataclass
class SevenTask:
    """Correct when the completion contains a '7': a random tiny model gets it sometimes."""

    name: str = "seven"
    rows: list = field(
        default_factory=lambda: (
            [{"prompt": f"{i}:", "answer": "7"} for i in range(12)]
            + [{"prompt": "0:", "answer": "7"}]
        )  # a duplicate prompt is used once
    )

    def train(self):
        return self.rows

    def test(self):
        return self.rows[:4]

    def verify(self, row, completion):
        return 1.0 if "7" in completion else 0.0


def test_make_preferences_pairs_are_verifier_labelled_and_deterministic(tmp_path, tiny):
    kw = dict(task=SevenTask(), samples=12, temperature=1.0, max_new_tokens=6, seed=3)
    st = make_preferences("tiny", tmp_path / "a.jsonl", pairs_per_prompt=2, **kw)
    assert st.prompts == 12
    assert st.pairs > 0 and st.skipped == st.skipped_no_correct + st.skipped_no_wrong
    rows = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(rows) == st.pairs
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected", "answer"}
        assert "7" in r["chosen"] and "7" not in r["rejected"] and r["rejected"].strip()
    assert max(sum(r["prompt"] == p for r in rows) for p in {r["prompt"] for r in rows}) <= 2
    prompts_with_pairs = len({r["prompt"] for r in rows})
    assert prompts_with_pairs + st.skipped == st.prompts
    make_preferences("tiny", tmp_path / "b.jsonl", pairs_per_prompt=2, **kw)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    # the output is the {prompt, chosen, rejected} format the preference loaders read
    _, tok = tiny
    assert len(load_preference_data(tmp_path / "a.jsonl", tok)) == st.pairs


def test_make_preferences_cli(tmp_path):
    out = tmp_path / "p.jsonl"
    args = ["data", "make-preferences", "--model", "tiny", "--out", str(out)]
    args += ["--samples", "4", "--n-prompts", "6", "--max-new-tokens", "3"]
    args += ["--set", "task.digits=1", "--set", "task.n_test=4"]
    res = CliRunner().invoke(app, args)
    # an untrained model gets no sum right: a clear error naming the counts, and no file
    # (the success path of the command runs in tests/test_reward_model.py's pipeline test)
    assert res.exit_code == 2, res.output
    assert "no pairs from 6 prompts" in res.output and "6 with" in res.output
    assert not out.exists()
    bad = CliRunner().invoke(app, [*args[:6], "--set", "train.lr=1"])
    assert bad.exit_code == 2 and "only takes task.* overrides" in bad.output
    few = CliRunner().invoke(app, [*args[:6], "--samples", "1"])
    assert few.exit_code == 2 and "samples must be >= 2" in few.output


def test_make_preferences_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        make_preferences(str(tmp_path / "nope"), tmp_path / "p.jsonl", task=SevenTask())
