from __future__ import annotations

import json

from typer.testing import CliRunner

from signalrl.cli import app

runner = CliRunner()

FAST = [
    "--set",
    "sft.train.steps=4",
    "--set",
    "sft.task.n_test=8",
    "--set",
    "sft.eval.k=2",
    "--set",
    "grpo.train.steps=2",
    "--set",
    "grpo.train.batch_size=2",
    "--set",
    "grpo.task.n_test=8",
    "--set",
    "grpo.eval.k=2",
    "--set",
    "sft.logging.progress=false",
    "--set",
    "grpo.logging.progress=false",
]


def test_quickstart_writes_summary(tmp_path):
    res = runner.invoke(app, ["quickstart", "--out", str(tmp_path / "qs"), *FAST])
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert s["test_problems"] == 8
    for stage in ("sft", "grpo"):
        assert set(s[stage]) == {"accuracy", "pass_at_2", "seconds", "model"}
        assert 0.0 <= s[stage]["accuracy"] <= 1.0
        assert (tmp_path / "qs" / stage / "final" / "config.json").is_file()
    assert s["grpo"]["model"] == str(tmp_path / "qs" / "grpo" / "final")
    assert "greedy accuracy" in res.output


def test_train_and_eval_commands(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: cli\noutput_dir: {tmp_path}\ntrainer: sft\n"
        "task: {name: arithmetic, digits: 1, n_train: 50, n_test: 4}\n"
        "train: {steps: 2, batch_size: 4}\nsampling: {max_new_tokens: 3}\n"
        "logging: {progress: false}\n"
    )
    res = runner.invoke(app, ["train", str(recipe), "--set", "train.lr=0.001"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()[0])["lr"] > 0
    res = runner.invoke(app, ["train", str(recipe)])
    assert res.exit_code == 2 and "--resume" in res.output
    out = tmp_path / "eval.json"
    res = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(tmp_path / "cli" / "final"),
            "--task",
            "arithmetic",
            "--k",
            "2",
            "--n",
            "4",
            "--max-new-tokens",
            "3",
            "--set",
            "task.digits=1",
            "--set",
            "task.n_test=4",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["n"] == 4 and "pass@2" in result and "accuracy" in result


def test_cli_errors_are_clear(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  stepz: 3\n")
    res = runner.invoke(app, ["train", str(recipe)])
    assert res.exit_code == 2 and "unknown key 'train.stepz'" in res.output
    res = runner.invoke(app, ["eval", "--model", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "neither a preset" in res.output
    res = runner.invoke(app, ["quickstart", "--out", str(tmp_path / "q"), "--set", "x.y=1"])
    assert res.exit_code == 2 and "sft." in res.output
