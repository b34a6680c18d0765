from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from signalrl.cli import app
from signalrl.config import RecipeError
from signalrl.sweep import collect, parse_values, run_sweep, value_label

DATA = Path(__file__).parent / "data"


def test_parse_values_and_labels():
    assert parse_values("0.01, 0.1,1") == [0.01, 0.1, 1]
    assert parse_values("sigmoid,ipo") == ["sigmoid", "ipo"]
    assert parse_values("true,false") == [True, False]
    for bad in ("", "0.1,,0.2", "0.1,0.1"):
        with pytest.raises(ValueError, match="--values"):
            parse_values(bad)
    assert value_label("preference.beta", 0.1) == "beta0.1"
    assert value_label("preference.loss_type", "ipo") == "loss_typeipo"
    assert value_label("train.betas", [0.9, 0.95]) == "betas_0.9__0.95_"


def test_collect_prefers_kl_ref_then_logratio(tmp_path):
    rows = [
        {"step": 1, "rewards/accuracies": 0.0, "rewards/margins": 0.1},
        {"step": 2, "rewards/accuracies": 1.0, "rewards/margins": 0.3, "eval/logratio_chosen": 0.2},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = collect(tmp_path, tail=5)
    assert got["reward_accuracy"] == pytest.approx(0.5)
    assert got["margin"] == pytest.approx(0.2)
    assert got["kl"] == pytest.approx(0.2) and got["kl_source"] == "eval/logratio_chosen"
    assert math.isnan(got["test_accuracy"]) and math.isnan(got["eval_reward_accuracy"])
    rows[-1]["eval/kl_ref"] = 0.05
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert collect(tmp_path)["kl"] == pytest.approx(0.05)
    assert collect(tmp_path, tail=1)["reward_accuracy"] == pytest.approx(1.0)


def _recipe(tmp_path) -> Path:
    recipe = {
        "name": "dpo",
        "output_dir": str(tmp_path / "runs"),
        "trainer": "preference",
        "model": {"name_or_path": "tiny"},
        "task": {"name": "arithmetic", "digits": 1, "n_train": 8, "n_test": 4},
        "data": {"path": str(DATA / "prefs_sample.jsonl"), "test_fraction": 0.25},
        "preference": {"loss_type": "sigmoid"},
        "train": {"steps": 3, "lr": 2e-3, "batch_size": 6},
        "sampling": {"max_new_tokens": 3},
        "eval": {"every": 0},
        "logging": {"progress": False, "samples_every": 0, "tensorboard": False},
    }
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_sweep_cli_over_beta_writes_csv_json_png_and_table(tmp_path):
    path = _recipe(tmp_path)
    res = CliRunner().invoke(
        app,
        ["sweep", str(path), "--param", "preference.beta", "--values", "0.1,0.5"]
        + ["--set", "train.lr=0.003"],
    )
    assert res.exit_code == 0, res.output
    runs = tmp_path / "runs"
    for v in ("0.1", "0.5"):
        cfg = yaml.safe_load((runs / f"dpo-beta{v}" / "config.yaml").read_text())
        assert cfg["preference"]["beta"] == float(v) and cfg["train"]["lr"] == 0.003
    out = runs / "dpo-sweep"
    assert (out / "sweep.png").stat().st_size > 1000
    with (out / "sweep.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["value"] for r in table] == ["0.1", "0.5"]
    for r in table:
        for k in ("test_accuracy", "reward_accuracy", "eval_reward_accuracy", "margin", "kl"):
            assert math.isfinite(float(r[k])), (k, r)
        assert r["kl_source"] == "eval/kl_ref" and r["steps"] == "3"
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["param"] == "preference.beta" and [x["value"] for x in doc["runs"]] == [0.1, 0.5]
    # the printed table: a header with the key, one line per value
    lines = [x for x in res.stdout.splitlines() if x.strip().startswith("│")]
    assert "sweep over preference.beta" in res.stdout
    assert any("beta" in x and "test acc" in x for x in res.stdout.splitlines())
    assert sum(1 for x in lines if x.split("│")[1].strip() in ("0.1", "0.5")) == 2


def test_sweep_validates_every_value_before_training(tmp_path):
    path = _recipe(tmp_path)
    with pytest.raises(RecipeError, match=r"preference.beta"):
        run_sweep(path, "preference.beta", [0.1, -1.0])
    assert not (tmp_path / "runs").exists()
    with pytest.raises(RecipeError, match="swept key"):
        run_sweep(path, "preference.beta", [0.1], ["preference.beta=0.2"])
    res = CliRunner().invoke(app, ["sweep", str(path), "--param", "train.nope", "--values", "1"])
    assert res.exit_code == 2 and "unknown key 'train.nope'" in res.output
