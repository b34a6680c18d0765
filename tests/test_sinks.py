"""Metric sinks (`logging.sinks`, signalrl/logging/sinks.py): a tiny real run logs to W&B
(offline) and trackio (its local database); what each recorded is read back through its own
format (W&B: the run's `.wandb` transaction log of `wandb_internal_pb2` records; trackio: its
SQLite storage API) and must equal metrics.jsonl step by step, with the resolved recipe as
the run config and the live doctor's finding attached. `signalrl doctor` reads the W&B run."""

from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from signalrl.config.recipe import RecipeError, load_recipe
from signalrl.logging.run import read_metrics

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["logging.progress=false"]

# trackio reads TRACKIO_DIR once, when it is imported: point it at a fresh directory first
if "trackio" not in sys.modules:
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="signalrl-trackio-")


def _same(a: Any, b: Any) -> bool:
    if a is None:  # metrics.jsonl writes NaN as null
        return isinstance(b, float) and math.isnan(b)
    return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)


def _numeric(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in row.items()
        if k != "step" and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))
    }


def _train(tmp_path: Path, sinks: str, *sets: str) -> Path:
    from signalrl.trainers import run_recipe

    r = load_recipe(
        ROOT / "recipes" / "doctor-nan.yaml",
        [f"output_dir={tmp_path}", f"logging.sinks={sinks}", *QUIET, *sets],
    )
    run_recipe(r)
    return tmp_path / r.name


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_and_trackio_record_what_metrics_jsonl_holds(tmp_path: Path, offline: None) -> None:
    """doctor-nan (6 SFT steps at lr 1e5: grad_norm NaN from step 3, `train.nan` fires)."""
    pytest.importorskip("wandb")
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    from signalrl.diagnostics.wandb_log import read_wandb_run

    run = _train(tmp_path, "[tensorboard,wandb,trackio]", f"name=sinks-{tmp_path.name}")
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[2]["grad_norm"] is None  # NaN

    # W&B: the offline run's transaction log
    (wb,) = (run / "wandb").glob("offline-run-*")
    history, config, summary = read_wandb_run(wb)
    assert [h["step"] for h in history] == [r["step"] for r in rows]
    for h, r in zip(history, rows, strict=True):
        want = _numeric(r)
        assert set(h) - {"step"} == set(want), r["step"]
        assert all(_same(want[k], h[k]) for k in want), (r["step"], want, h)
    assert config["trainer"] == "sft" and config["train"]["lr"] == 1e5
    assert config["logging"]["sinks"] == ["tensorboard", "wandb", "trackio"]
    (nan,) = [f for f in summary["doctor/findings"] if f["id"] == "train.nan"]
    assert nan["step"] == 3 and nan["severity"] == "critical"
    table = summary["doctor/findings_table"]
    assert table["_type"] == "table-file" and table["nrows"] == len(summary["doctor/findings"])

    # trackio: its local database
    logs = SQLiteStorage.get_logs("signalrl", run.name)
    assert [g["step"] for g in logs] == [r["step"] for r in rows]
    for g, r in zip(logs, rows, strict=True):
        want = _numeric(r)
        assert all(_same(want[k], g[k]) for k in want), (r["step"], want, g)
    cfg = SQLiteStorage.get_run_config("signalrl", run.name)
    assert cfg is not None and cfg["trainer"] == "sft" and cfg["train"]["steps"] == 6
    alerts = SQLiteStorage.get_alerts("signalrl", run_name=run.name)
    (alert,) = [a for a in alerts if "train.nan" in a["title"]]
    assert alert["step"] == 3 and alert["level"] == "error" and "grad_norm" in alert["text"]

    # TensorBoard still writes its events
    assert list(run.glob("events.out.tfevents.*"))


def test_doctor_reads_a_wandb_offline_run(tmp_path: Path, offline: None) -> None:
    pytest.importorskip("wandb")
    from signalrl.diagnostics.doctor import diagnose

    run = _train(tmp_path, "[wandb]", "name=wb-doctor")
    assert not list(run.glob("events.out.tfevents.*"))  # tensorboard not listed: none
    (wb,) = (run / "wandb").glob("offline-run-*")
    from_wandb, from_jsonl = diagnose(wb), diagnose(run)
    assert from_wandb.steps == from_jsonl.steps == 6
    assert [f.to_dict() for f in from_wandb.findings] == [f.to_dict() for f in from_jsonl.findings]
    assert "train.nan" in {f.id for f in from_wandb.findings}


def test_wandb_log_reader_rejects_a_corrupt_file(tmp_path: Path, offline: None) -> None:
    pytest.importorskip("wandb")
    from signalrl.diagnostics.doctor import DoctorError, diagnose
    from signalrl.diagnostics.wandb_log import read_records

    run = _train(tmp_path, "[wandb]", "name=wb-corrupt", "train.steps=2")
    (f,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    assert len(read_records(f)) > 3
    data = bytearray(f.read_bytes())
    data[40] ^= 0xFF  # a byte inside the first record
    f.write_bytes(bytes(data))
    with pytest.raises(DoctorError, match="bad checksum"):
        diagnose(f.parent)


def test_wait_for_exit_needs_the_logs_last_record(tmp_path: Path, offline: None) -> None:
    """The sink returns only once the W&B log holds its exit record (wandb's service may
    still be writing after finish() returns): a log cut before that record is not done."""
    pytest.importorskip("wandb")
    from signalrl.diagnostics.wandb_log import find_wandb_file, read_records, wait_for_exit

    run = _train(tmp_path, "[wandb]", "name=wb-exit", "train.steps=2")
    (wb,) = (run / "wandb").glob("offline-run-*")
    assert wait_for_exit(wb, timeout=0.0)
    f = find_wandb_file(wb)
    assert f is not None
    data, last = f.read_bytes(), read_records(f)[-1]
    f.write_bytes(data[: data.rindex(last) - 7])  # drop the exit record and its chunk header
    assert not wait_for_exit(wb, timeout=0.3)


def test_sink_keys_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = ROOT / "recipes" / "doctor-nan.yaml"
    with pytest.raises(RecipeError, match=r"logging\.sinks.*unknown sink 'mlflow'"):
        load_recipe(recipe, ["logging.sinks=[tensorboard,mlflow]"])
    with pytest.raises(RecipeError, match="listed twice"):
        load_recipe(recipe, ["logging.sinks=[wandb,wandb]"])
    # tensorboard: false takes it out of the list (the old key keeps working)
    r = load_recipe(recipe, ["logging.tensorboard=false"])
    assert r.logging.sinks == [] and not r.logging.tensorboard
    r = load_recipe(recipe, [])
    assert r.logging.sinks == ["tensorboard"] and r.logging.tensorboard
    r = load_recipe(recipe, ["logging.sinks=[]"])
    assert not r.logging.tensorboard

    # a sink whose package is missing fails at recipe time, naming the extra to install
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a)
    )
    missing = r"logging\.sinks has wandb; pip install 'signalrl\[wandb\]'"
    with pytest.raises(RecipeError, match=missing):
        load_recipe(recipe, ["logging.sinks=[tensorboard,wandb]"])


def test_missing_package_fails_before_the_run_directory_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from typer.testing import CliRunner

    from signalrl.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "trackio" else real(n, *a)
    )
    res = CliRunner().invoke(
        app,
        [
            "train",
            str(ROOT / "recipes" / "doctor-nan.yaml"),
            "--set",
            f"output_dir={tmp_path}",
            "--set",
            "logging.sinks=[trackio]",
        ],
    )
    assert res.exit_code != 0
    assert "pip install 'signalrl[trackio]'" in res.output
    assert not (tmp_path / "doctor-nan").exists()
