"""`signalrl compare`: named runs from one start, accuracy against the student's budget."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from signalrl.cli import app
from signalrl.compare import (
    footnote,
    is_compare_file,
    load_compare,
    method_label,
    run_compare,
)
from signalrl.config import RecipeError
from signalrl.logging import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, runs: list[dict] | None = None, **top) -> Path:
    base = {
        "name": "base",
        "seed": 0,
        "model": {"name_or_path": "tiny", "attn_implementation": "eager"},
        "task": {"name": "arithmetic", "digits": 1, "n_train": 8, "n_test": 4},
        "train": {"steps": 2, "lr": 1e-3, "batch_size": 2},
        "rl": {"group_size": 2},
        "sampling": {"max_new_tokens": 3},
        "eval": {"every": 1, "k": 0},
        "logging": {"every": 1, "progress": False, "samples_every": 0, "tensorboard": False},
    }
    (tmp_path / "grpo.yaml").write_text(
        yaml.safe_dump({**base, "trainer": "online_rl", "rl": {"group_size": 2, "kl_coef": 0.0}})
    )
    (tmp_path / "distill.yaml").write_text(
        yaml.safe_dump({**base, "trainer": "distill", "distill": {"teacher": "tiny"}})
    )
    spec = {
        "trainer": "compare",
        "name": "cmp",
        "output_dir": str(tmp_path / "runs"),
        "set": ["model.seed=1"],
        "runs": runs
        or [
            {"name": "grpo", "recipe": str(tmp_path / "grpo.yaml")},
            {"name": "on_policy", "recipe": str(tmp_path / "distill.yaml")},
            {
                "name": "gkd",
                "recipe": str(tmp_path / "distill.yaml"),
                "set": ["distill.mode=gkd", "distill.lmbda=1.0"],
            },
        ],
        **top,
    }
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_compare_cli_writes_table_curves_and_plot(tmp_path):
    path = _write(tmp_path)
    assert is_compare_file(path) and not is_compare_file(tmp_path / "grpo.yaml")
    res = CliRunner().invoke(app, ["compare", str(path), "--set", "train.lr=0.002"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "runs" / "cmp"
    for name in ("grpo", "on_policy", "gkd"):
        cfg = yaml.safe_load((out / name / "config.yaml").read_text())
        assert cfg["model"]["seed"] == 1 and cfg["train"]["lr"] == 0.002
    assert cfg["distill"]["mode"] == "gkd"
    with (out / "compare.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["grpo", "on_policy", "gkd"]
    assert table[0]["method"] == "grpo" and table[1]["method"] == "distill/on_policy"
    assert table[2]["method"] == "distill/gkd(lmbda=1,beta=0.5,dataset)"
    for r in table:
        assert 0 <= float(r["accuracy"]) <= 1 and float(r["forward_tokens"]) > 0
        assert float(r["train_s"]) > 0 and float(r["elapsed_s"]) >= float(r["train_s"])
        assert r["steps"] == "2"
    doc = json.loads((out / "compare.json").read_text())
    start = doc["start_accuracy"]["grpo"]
    assert set(doc["start_accuracy"].values()) == {start}  # one start model, evaluated once
    for run in doc["runs"]:
        curve = run["curve"]
        # the start point, the step-1 evaluation, the final evaluation
        assert [p["step"] for p in curve] == [0, 1, 2]
        assert curve[0] == {"step": 0, "forward_tokens": 0.0, "train_s": 0.0, "accuracy": start}
        tokens = [p["forward_tokens"] for p in curve]
        assert tokens == sorted(tokens) and tokens[-1] == run["forward_tokens"]
    with (out / "curves.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 9
    md = (out / "compare.md").read_text()
    assert "| run | method | accuracy |" in md and "| gkd |" in md
    assert "teacher's forward passes are not counted" in md and "offline preference" not in md
    assert (out / "compare.png").stat().st_size > 5000
    assert "on_policy" in res.output and "results:" in res.output  # the printed table

    # --resume reuses finished runs without training them again
    before = (out / "grpo" / "metrics.jsonl").read_text()
    res = CliRunner().invoke(app, ["train", str(path), "--set", "train.lr=0.002", "--resume"])
    assert res.exit_code == 0, res.output
    assert "finished, reused" in res.output
    assert (out / "grpo" / "metrics.jsonl").read_text() == before
    # a finished run with another configuration is not silently reused
    res = CliRunner().invoke(app, ["compare", str(path), "--resume"])
    assert res.exit_code == 2 and "another configuration" in res.output
    # without --resume or --overwrite, occupied run directories stop it before any training
    res = CliRunner().invoke(app, ["compare", str(path)])
    assert res.exit_code == 2 and "already hold runs" in res.output
    assert (out / "grpo" / "metrics.jsonl").read_text() == before


def test_compare_validates_every_run_first(tmp_path):
    path = _write(tmp_path)
    runs = yaml.safe_load(path.read_text())["runs"]
    with pytest.raises(RecipeError, match="repeated: grpo"):
        load_compare(_write(tmp_path, [runs[0], runs[0]]))
    bad = [runs[0], {**runs[1], "set": ["distill.mode=nope"]}]
    with pytest.raises(RecipeError, match="(?s)run 'on_policy'.*distill.mode"):
        load_compare(_write(tmp_path, bad))
    with pytest.raises(RecipeError, match="unknown key 'sets'"):
        load_compare(_write(tmp_path, sets=["x=1"]))
    with pytest.raises(RecipeError, match="multiple of logging.every"):
        load_compare(_write(tmp_path, runs, set=["logging.every=2", "eval.every=3"]))
    rm = {"name": "rm", "recipe": str(ROOT / "recipes" / "reward-model-arithmetic.yaml")}
    with pytest.raises(RecipeError, match="does not measure task accuracy"):
        load_compare(_write(tmp_path, [rm]))
    sft = {**runs[0], "set": ["trainer=sft"]}  # the online_rl recipe's rl section is foreign
    with pytest.raises(RecipeError, match="section 'rl' does not belong to trainer 'sft'"):
        load_compare(_write(tmp_path, [sft]))
    with pytest.raises(RecipeError, match="name .a/b.: use letters"):
        load_compare(_write(tmp_path, [{**runs[0], "name": "a/b"}]))
    # nothing was trained
    assert not (tmp_path / "runs").exists()
    res = CliRunner().invoke(app, ["compare", str(_write(tmp_path, [runs[0], runs[0]]))])
    assert res.exit_code == 2 and "repeated" in res.output


def test_repository_comparison_file_validates():
    path = ROOT / "recipes" / "distill-compare-arithmetic.yaml"
    spec, recipes = load_compare(path)
    names = [n for n, _ in recipes]
    assert names == ["on_policy", "off_policy", "gkd", "grpo"]
    labels = {n: method_label(r) for n, r in recipes}
    assert labels["grpo"] == "grpo" and labels["gkd"].startswith("distill/gkd")
    # the same start, budget and prompts x samples per step for every method
    for _, r in recipes:
        assert r.model.name_or_path == "runs/sft-arithmetic/final"
        assert (r.train.steps, r.train.batch_size, r.rl.group_size) == (
            recipes[0][1].train.steps,
            16,
            8,
        )
        assert r.eval.every and r.eval.every % r.logging.every == 0
        assert r.run_dir.parent == spec.out_dir
    teachers = {r.distill.teacher for _, r in recipes if r.trainer == "distill"}
    assert teachers == {"runs/teacher-base-arithmetic-3/final"}


def test_metrics_rows_carry_the_counters(tmp_path):
    path = _write(tmp_path, [{"name": "grpo", "recipe": str(tmp_path / "grpo.yaml")}])
    run_compare(path)
    rows = read_metrics(tmp_path / "runs" / "cmp" / "grpo")
    assert all("student/forward_tokens" in r and "time/train_s" in r for r in rows)


def test_name_option_moves_the_results(tmp_path):
    path = _write(tmp_path)
    spec, recipes = load_compare(path, name="other")
    assert spec.out_dir == tmp_path / "runs" / "other"
    assert all(r.run_dir.parent == spec.out_dir for _, r in recipes)
    with pytest.raises(RecipeError, match="use letters"):
        load_compare(path, name="../x")


def test_repository_dpo_comparison_file_validates():
    spec, recipes = load_compare(ROOT / "recipes" / "dpo-compare-arithmetic.yaml")
    labels = {n: method_label(r) for n, r in recipes}
    assert labels == {
        "offline_dpo": "dpo/sigmoid",
        "online_dpo": "online_dpo/sigmoid",
        "grpo": "grpo",
    }
    by = dict(recipes)
    # one start, one budget: 300 steps x 16 prompts x 8 samples for the online arms
    for r in by.values():
        assert r.model.name_or_path == "runs/sft-arithmetic/final"
        assert (r.train.steps, r.train.batch_size) == (300, 16)
    assert by["online_dpo"].preference.online_samples == by["grpo"].rl.group_size == 8
    assert by["offline_dpo"].data.path == "runs/prefs-budget-arithmetic.jsonl"


def test_footnote_names_only_the_exclusions_that_apply():
    rl = {"trainer": "online_rl"}
    assert "not counted" not in footnote([rl])
    assert "teacher" in footnote([rl, {"trainer": "distill"}])
    text = footnote([rl, {"trainer": "preference", "online": False}])
    assert "offline preference runs" in text and "teacher" not in text
    assert "not counted" not in footnote([{"trainer": "preference", "online": True}])
