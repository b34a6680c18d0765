from __future__ import annotations

import json

import pytest
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


def _tiny_recipe(tmp_path, output_dir, extra=""):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: cli\noutput_dir: {output_dir}\ntrainer: sft\n"
        "task: {name: arithmetic, digits: 1, n_train: 50, n_test: 4}\n"
        "train: {steps: 1, batch_size: 4}\nsampling: {max_new_tokens: 3}\n"
        "logging: {progress: false}\n" + extra
    )
    return recipe


def test_train_into_an_unwritable_output_dir_names_the_directory(tmp_path):
    # root ignores chmod 555, but no one can make a directory below a regular file
    (tmp_path / "somefile").write_text("not a directory\n")
    out = tmp_path / "somefile" / "runs"
    res = runner.invoke(app, ["train", str(_tiny_recipe(tmp_path, out))])
    assert res.exit_code == 2, (res.output, res.exception)
    assert f"cannot write the run directory {out / 'cli'}" in res.output, res.output
    assert "Traceback" not in res.output


def test_train_on_a_full_disk_names_the_run_directory(tmp_path, monkeypatch):
    import errno

    import signalrl.trainers

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cli" / "x"))

    monkeypatch.setattr(signalrl.trainers, "run_recipe", full)
    res = runner.invoke(app, ["train", str(_tiny_recipe(tmp_path, tmp_path))])
    assert res.exit_code == 2, (res.output, res.exception)
    assert f"cannot write the run directory {tmp_path / 'cli'}" in res.output
    assert "No space left on device" in res.output


def test_model_device_cuda_without_cuda_is_a_clear_error(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = _tiny_recipe(tmp_path, tmp_path, "model: {device: cuda}\n")
    res = runner.invoke(app, ["train", str(recipe)])
    assert res.exit_code == 2, (res.output, res.exception)
    assert "model.device 'cuda' but this machine has no CUDA device; use cpu or auto" in res.output


EVAL = ["eval", "--model", "tiny", "--n", "2", "--max-new-tokens", "2", "--set", "task.digits=1"]
EVAL += ["--set", "task.n_test=4"]


def test_eval_out_makes_its_directory_and_never_loses_the_result(tmp_path):
    out = tmp_path / "new" / "dir" / "x.json"
    res = runner.invoke(app, [*EVAL, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["n"] == 2
    assert [p.name for p in out.parent.iterdir()] == ["x.json"]  # no temporary left
    (tmp_path / "somefile").write_text("")
    bad = tmp_path / "somefile" / "x.json"
    res = runner.invoke(app, [*EVAL, "--out", str(bad)])
    assert res.exit_code == 2, (res.output, res.exception)
    assert f"cannot write --out {bad}" in res.output and "Traceback" not in res.output
    assert '"n": 2' in res.stdout  # the finished evaluation is still printed


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--k", "-1"], "--k must be >= 0"),
        (["--n", "0"], "--n must be >= 1"),
        (["--k", "2", "--samples", "0"], "--samples must be >= 1"),
        (["--k", "4", "--samples", "2"], "--samples (2) must be >= --k (4)"),
        (["--samples", "4"], "--samples needs --k >= 1"),
        (["--temperature", "0"], "--temperature must be > 0"),
    ],
)
def test_eval_refuses_bad_numbers(args, msg):
    res = runner.invoke(app, ["eval", "--model", "tiny", *args])
    assert res.exit_code == 2, (res.output, res.exception)
    assert msg in res.output, res.output


def test_distill_without_a_teacher_is_one_clear_line(tmp_path):
    recipe = tmp_path / "d.yaml"
    recipe.write_text(f"name: d\noutput_dir: {tmp_path}\ntrainer: distill\nrl: {{group_size: 2}}\n")
    res = runner.invoke(app, ["train", str(recipe)])
    assert res.exit_code == 2, (res.output, res.exception)
    assert "needs distill.teacher" in res.output and "Traceback" not in res.output
    assert "got {" not in res.output  # no dump of the whole recipe
    recipe.write_text(
        f"name: d\noutput_dir: {tmp_path}\ntrainer: distill\n"
        f"distill: {{teacher: {tmp_path / 'missing'}}}\n"
    )
    res = runner.invoke(app, ["train", str(recipe)])
    assert res.exit_code == 2, (res.output, res.exception)
    assert str(tmp_path / "missing") in res.output
