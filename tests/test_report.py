"""The run report (signalrl/report): one self-contained report.html from real short runs."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from signalrl.config import recipe_from_dict
from signalrl.report.cli import report_command
from signalrl.report.html import MAX_POINTS, ReportError, pick_samples, write_report
from signalrl.trainers import run_recipe

DATA = Path(__file__).parent / "data"
COMMON = {
    "model": {"name_or_path": "tiny"},
    "sampling": {"max_new_tokens": 3},
    "checkpoint": {"every": 0},
}


def _grpo(out: Path) -> Path:
    r = recipe_from_dict(
        {
            **COMMON,
            "name": "grpo",
            "output_dir": str(out),
            "trainer": "online_rl",
            "task": {"name": "arithmetic", "digits": 1, "n_train": 32, "n_test": 4},
            "train": {"steps": 4, "lr": 3e-3, "batch_size": 2},
            "rl": {"algorithm": "grpo", "group_size": 4},
            "eval": {"every": 2, "k": 2, "n": 4},
            "logging": {"progress": False, "samples_every": 2, "samples_n": 4},
        },
        "test",
    )
    run_recipe(r)
    return out / "grpo"


def _dpo(out: Path) -> Path:
    r = recipe_from_dict(
        {
            **COMMON,
            "name": "dpo",
            "output_dir": str(out),
            "trainer": "preference",
            "task": {"name": "arithmetic", "digits": 1, "n_train": 8, "n_test": 4},
            "data": {"path": str(DATA / "prefs_sample.jsonl"), "test_fraction": 0.2},
            "preference": {"loss_type": "sigmoid", "beta": 0.1},
            "train": {"steps": 4, "lr": 2e-3, "batch_size": 6},
            "eval": {"every": 2},
            "logging": {"progress": False, "samples_every": 0},
        },
        "test",
    )
    run_recipe(r)
    return out / "dpo"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("report-runs")
    return {"rl": _grpo(out), "dpo": _dpo(out)}


def _plots(text: str) -> dict[str, int]:
    """data-metrics of every plot -> the number of findings marked on it."""
    return {
        m: int(n)
        for m, n in re.findall(
            r'<figure class="plot" data-metrics="([^"]*)" '
            r'data-marks="(\d+)"',
            text,
        )
    }


def _self_contained(text: str) -> None:
    assert "<script" not in text.lower()
    assert "<link" not in text.lower() and "@import" not in text and "url(" not in text
    assert not re.search(r'(src|href)="(https?:)?//', text)


def test_rl_report_curves_final_numbers_and_escaped_samples(runs, tmp_path):
    run = tmp_path / "rl"
    shutil.copytree(runs["rl"], run)
    with (run / "samples.jsonl").open("a") as f:
        row = {"step": 4, "prompt": "<script>alert(1)</script>", "completion": "a & <b>b</b>"}
        f.write(json.dumps({**row, "answer": "7", "reward": 99.0}) + "\n")
    text = write_report([run], run / "report.html").read_text()
    _self_contained(text)
    plots = _plots(text)
    for key in ("reward/mean", "kl", "entropy", "completion/mean_length", "clip_frac/low"):
        assert any(key in p.split() for p in plots), (key, plots)
    assert "eval/accuracy eval/sample_accuracy" in plots
    assert not any("rewards/margins" in p for p in plots)
    assert text.count("<svg") == len(plots) and "<polyline" in text
    assert "wall time" in text and "eval/pass@2" in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "<script>" not in text
    assert "a &amp; &lt;b&gt;b&lt;/b&gt;" in text
    best = text.index("&lt;script&gt;")
    assert text.rfind('class="best"', 0, best) > text.rfind('class="worst"', 0, best)
    assert "<details><summary>Resolved config" in text and "trainer: online_rl" in text
    assert "No findings." in text


def test_preference_report_has_margins_accuracies_and_logps(runs, tmp_path):
    text = write_report([runs["dpo"]], tmp_path / "dpo.html").read_text()
    _self_contained(text)
    plots = _plots(text)
    assert "rewards/margins eval/rewards/margins" in plots
    assert "rewards/accuracies eval/rewards/accuracies" in plots
    assert "logps/chosen logps/rejected" in plots
    assert not any("reward/mean" in p.split() or p == "kl" for p in plots)
    assert "train_eval/rewards/accuracies" in text
    assert "No samples logged" in text


def test_findings_table_and_markers(runs, tmp_path):
    findings = [
        {
            "id": "kl_spike",
            "severity": "warning",
            "step": 2,
            "metric": "kl",
            "evidence": "kl <0.5> & rising",
            "suggestion": "lower <lr>",
        },
        {"id": "grad_blowup", "severity": "error", "first_step": 3, "metrics": ["grad_norm"]},
        {"id": "no_metric", "severity": "info", "step": 1, "evidence": "plain"},
    ]
    out = write_report([runs["rl"]], tmp_path / "r.html", {str(runs["rl"]): findings})
    text = out.read_text()
    plots = _plots(text)
    assert plots["kl"] == 1 and plots["grad_norm"] == 1  # a plot added for the finding
    assert sum(plots.values()) == 2
    assert text.count('class="mark"') == 2 and "kl_spike (warning) at step 2" in text
    table = text[text.index('<table class="findings">') :]
    table = table[: table.index("</table>")]
    for s in ("kl_spike", "grad_blowup", "no_metric", "kl &lt;0.5&gt; &amp; rising"):
        assert s in table
    assert "lower &lt;lr&gt;" in table and 'class="sev-error"' in table


def test_comparison_of_two_runs(runs, tmp_path):
    findings = {str(runs["rl"]): [{"id": "x", "severity": "warning", "step": 2, "metric": "loss"}]}
    text = write_report([runs["rl"], runs["dpo"]], tmp_path / "c.html", findings).read_text()
    assert "Comparison of 2 runs" in text
    compare = text[text.index('<section class="compare">') : text.index('<section class="run"')]
    plots = _plots(compare)
    assert "loss" in plots and plots["loss"] == 1 and "reward/mean" in plots
    loss = compare[compare.index('data-metrics="loss"') :]
    loss = loss[: loss.index("</figure>")]
    assert loss.count("<polyline") == 2 and "grpo" in loss and "dpo" in loss
    assert text.count('<section class="run"') == 2 and 'href="#run-1"' in text


def test_missing_or_empty_metrics_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="has no metrics.jsonl"):
        write_report([tmp_path / "empty"], tmp_path / "x.html")
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(ReportError, match="is empty"):
        write_report([tmp_path / "empty"], tmp_path / "x.html")
    with pytest.raises(ReportError, match="does not exist"):
        write_report([tmp_path / "nope"], tmp_path / "x.html")
    buf = io.StringIO()
    assert report_command([tmp_path / "empty"], None, Console(file=buf, width=200)) == 2
    assert "error:" in buf.getvalue() and "is empty" in buf.getvalue()
    assert not (tmp_path / "x.html").exists()


def test_report_command_default_out_and_several_runs(runs, tmp_path):
    run = tmp_path / "dpo"
    shutil.copytree(runs["dpo"], run)
    buf = io.StringIO()
    console = Console(file=buf, width=300)
    assert report_command([run], None, console) == 0
    assert (run / "report.html").is_file() and str(run / "report.html") in buf.getvalue()
    assert report_command([run, runs["rl"]], None, console) == 2
    assert "--out" in buf.getvalue()
    assert report_command([run, runs["rl"]], tmp_path / "both.html", console) == 0


def _synthetic_run(path: Path, steps: int) -> Path:
    path.mkdir()
    rows = [
        {"step": s, "loss": 2.0 / s, "lr": 1e-3, "time/elapsed_s": 0.5 * s}
        | ({"eval/loss": 2.5 / s, "eval/accuracy": s / steps} if s % 25 == 0 else {})
        for s in range(1, steps + 1)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.yaml").write_text("name: long\ntrainer: sft\n")
    return path


def test_long_run_is_downsampled_and_small(tmp_path):
    run = _synthetic_run(tmp_path / "long", 3000)
    text = write_report([run], tmp_path / "long.html").read_text()
    assert set(_plots(text)) == {"loss eval/loss", "eval/accuracy"}
    points = [len(p.split()) for p in re.findall(r'<polyline points="([^"]*)"', text)]
    assert max(points) == MAX_POINTS and len(text) < 100_000
    assert "1500.0 s" in text  # wall time: time/elapsed_s of the last row


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_screenshot_is_not_blank(runs, tmp_path):
    out = write_report([runs["rl"]], tmp_path / "shot.html")
    png = tmp_path / "shot.png"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}"]
    cmd += ["--window-size=1280,1600", out.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert png.is_file() and png.stat().st_size > 20_000
    pil = pytest.importorskip("PIL.Image")
    img = pil.open(png).convert("RGB").resize((320, 400))
    colors = img.getcolors(maxcolors=1 << 16) or []
    white = sum(n for n, c in colors if min(c) > 245)
    assert white < 0.97 * 320 * 400 and len(colors) > 50


@pytest.mark.parametrize(
    ("trainer", "keys", "expected"),
    [
        ("distill", ["distill/reverse_kl", "reward/mean"], {"distill/reverse_kl", "reward/mean"}),
        ("reward_model", ["loss", "accuracy"], {"loss", "accuracy"}),
        ("sft", ["loss", "lr"], {"loss"}),
    ],
)
def test_each_trainer_gets_its_curves(tmp_path, trainer, keys, expected):
    (tmp_path / "r").mkdir()
    rows = [{"step": s, **{k: 1.0 / s for k in keys}} for s in range(1, 6)]
    (tmp_path / "r" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r" / "config.yaml").write_text(f"trainer: {trainer}\n")
    text = write_report([tmp_path / "r"], tmp_path / "r.html").read_text()
    assert set(_plots(text)) == expected


def test_best_and_worst_samples_never_mislabel_a_tie():
    rows = [
        {"step": 1, "completion": c, "reward": r} for c, r in zip("abcd", [1, 0, 1, 1], strict=True)
    ]
    rows += [{"step": 2, "completion": c, "reward": 0.5} for c in "efg"]
    picked = [(s, kind, r["completion"]) for s, kind, r in pick_samples(rows)]
    assert picked == [
        (1, "best", "a"),
        (1, "best", "c"),
        (1, "worst", "b"),
        (2, "tied", "e"),
        (2, "tied", "f"),
    ]
