"""`signalrl sweep` and `signalrl compare` write the overlay report of their runs
(`signalrl.report.overlay`): every run's curves, the doctor's findings, links to each run's
own report.html, and the printed output names where it is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from typer.testing import CliRunner

from signalrl.cli import app
from signalrl.report.overlay import overlay_report, run_findings

DATA = Path(__file__).parent / "data"
LOGGING = {"every": 1, "progress": False, "samples_every": 0, "tensorboard": False}


def _links(page: str) -> list[str]:
    return re.findall(r'<a href="([^"#]+)">report\.html</a>', page)


def test_sweep_writes_and_names_the_overlay_report(tmp_path: Path) -> None:
    recipe = {
        "name": "dpo", "output_dir": str(tmp_path / "runs"), "trainer": "preference",
        "model": {"name_or_path": "tiny"},
        "task": {"name": "arithmetic", "digits": 1, "n_train": 8, "n_test": 4},
        "data": {"path": str(DATA / "prefs_sample.jsonl"), "test_fraction": 0.25},
        "train": {"steps": 2, "lr": 1e-7, "batch_size": 4},
        "sampling": {"max_new_tokens": 3}, "eval": {"every": 0}, "logging": LOGGING,
    }
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(
        app, ["sweep", str(path), "--param", "preference.beta", "--values", "0.1,0.5"]
    )
    assert res.exit_code == 0, res.output
    report = tmp_path / "runs" / "dpo-sweep" / "report.html"
    assert f"report: {report}" in res.output.replace("\n", "")
    page = report.read_text()
    assert "Comparison of 2 runs" in page and "dpo-beta0.1" in page and "dpo-beta0.5" in page
    # each run's own report, linked relative to the sweep directory
    assert _links(page) == ["../dpo-beta0.1/report.html", "../dpo-beta0.5/report.html"]
    for link in _links(page):
        assert (report.parent / link).is_file()
    assert not re.search(r'(src|href)="(https?:)?//', page)  # self-contained: nothing fetched


def test_compare_writes_links_and_names_the_overlay_report(tmp_path: Path) -> None:
    base = {
        "name": "base", "seed": 0, "trainer": "online_rl",
        "model": {"name_or_path": "tiny", "attn_implementation": "eager"},
        "task": {"name": "arithmetic", "digits": 1, "n_train": 8, "n_test": 4},
        "train": {"steps": 3, "lr": 1e-3, "batch_size": 2},
        "rl": {"group_size": 2, "kl_coef": 0.0}, "sampling": {"max_new_tokens": 1},
        "eval": {"every": 1, "k": 0}, "logging": LOGGING,
    }
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(base))
    spec = {
        "trainer": "compare", "name": "cmp", "output_dir": str(tmp_path / "runs"),
        "start_eval": False,
        "runs": [
            {"name": "a", "recipe": str(tmp_path / "grpo.yaml")},
            {"name": "b", "recipe": str(tmp_path / "grpo.yaml"), "set": ["train.lr=0.002"]},
        ],
    }
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = CliRunner().invoke(app, ["compare", str(path)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "runs" / "cmp"
    report = out / "report.html"
    assert f"report: {report}" in res.output.replace("\n", "")
    assert "[report.html](report.html)" in (out / "compare.md").read_text()
    page = report.read_text()
    assert _links(page) == ["a/report.html", "b/report.html"]
    # max_new_tokens 1 truncates every completion (the rule needs 3 steps): the doctor's
    # finding is on the overlay
    assert "rl.truncation" in page
    assert any(f["id"] == "rl.truncation" for f in run_findings(out / "a"))


def test_overlay_report_of_an_unreadable_run_warns_and_returns_none(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    row = {"step": 1, "reward/mean": 0.5, "completion/truncated_frac": 0.0}
    (good / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    printed: list[str] = []

    class Console:
        def print(self, msg: str, **kw: object) -> None:
            printed.append(msg)

    assert overlay_report([good, not_a_run], tmp_path / "r.html", Console()) is None
    assert not (tmp_path / "r.html").exists() and "metrics.jsonl" in printed[0]
    assert run_findings(not_a_run) == []
    assert overlay_report([good, good], tmp_path / "r.html") == tmp_path / "r.html"


def test_report_command_marks_the_doctors_findings(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "reward/mean": 0.1, "completion/truncated_frac": 0.9} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    page = (run / "report.html").read_text()
    assert "rl.truncation" in page and "0.9 of completions" in page
