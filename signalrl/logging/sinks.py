"""Metric sinks beside `metrics.jsonl` (`logging.sinks`): TensorBoard, Weights & Biases,
trackio.

`metrics.jsonl` stays the source of truth; every sink gets the same rows: the same metric
names, values and step (`RunDir.log_metrics` hands each the cleaned row it wrote), the
resolved recipe as the run's config, and each new doctor finding (`RunDir.log_finding`, from
the live doctor). Only rank 0 holds a `RunDir`, so only rank 0 writes to a sink.

- **tensorboard**: `torch.utils.tensorboard.SummaryWriter` in the run directory (purges the
  steps past a resumed checkpoint).
- **wandb**: a run whose files go to `<run>/wandb/` (`wandb sync` uploads an offline one);
  its id is kept in `<run>/wandb/signalrl-run-id` so a `--resume` continues the same W&B run.
  Findings: the run summary's `doctor/findings` (a list, updated as they come) and, at the
  end, a `doctor/findings` table. `logging.wandb_mode` (or `WANDB_MODE`) picks online/offline.
- **trackio**: a run named after the run directory in trackio's database (`TRACKIO_DIR`,
  default `~/.cache/huggingface/trackio`), resumed by name on `--resume` (steps logged past
  the checkpoint before the interruption stay there). Findings: trackio alerts (level from
  the severity, at the finding's step).

The optional packages are checked when the recipe is validated (`LoggingConfig`), so a
missing one fails before any model loads or file is written.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import sys
import warnings
from pathlib import Path
from typing import Any, Protocol

WANDB_ID_FILE = "signalrl-run-id"


class Sink(Protocol):
    def log(self, step: int, row: dict[str, Any]) -> None: ...
    def finding(self, finding: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a row as `metrics.jsonl` holds it (without `step`; booleans and
    strings left out; None, which is how metrics.jsonl writes a NaN, is NaN again)."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if v is None:
            out[k] = math.nan
        elif k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
    return out


class TensorBoardSink:
    def __init__(self, path: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(path), purge_step=purge_step)

    def log(self, step: int, row: dict[str, Any]) -> None:
        for k, v in scalars(row).items():
            self.writer.add_scalar(k, v, step)

    def finding(self, finding: dict[str, Any]) -> None:
        self.writer.add_text("doctor/findings", _finding_text(finding), finding["step"])

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbSink:
    def __init__(
        self, path: Path, config: dict[str, Any], project: str, mode: str | None, resume: bool
    ) -> None:
        import wandb

        root = path / "wandb"
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        run_id = run_id or secrets.token_hex(4)  # 8 characters of [0-9a-f], as wandb's
        self.run = wandb.init(
            project=project,
            name=path.name,
            id=run_id,
            resume="allow",
            dir=str(path),
            config=config,
            mode=mode,
            settings=wandb.Settings(console="off", save_code=False),
        )
        id_file.write_text(run_id + "\n")
        self.run_dir = Path(self.run.dir).parent  # wandb/offline-run-*/ (or run-*/)
        self.findings: list[dict[str, Any]] = []

    def log(self, step: int, row: dict[str, Any]) -> None:
        self.run.log(scalars(row), step=step)

    def finding(self, finding: dict[str, Any]) -> None:
        self.findings.append(finding)
        self.run.summary["doctor/findings"] = list(self.findings)

    def close(self) -> None:
        import wandb

        if self.findings:
            cols = ["id", "severity", "step", "evidence", "suggestion"]
            table = wandb.Table(columns=cols, data=[[f[c] for c in cols] for f in self.findings])
            self.run.summary["doctor/findings_table"] = table
        self.run.finish()
        from signalrl.diagnostics.wandb_log import wait_for_exit

        # finish() can return before wandb's service has written the log's end: a run
        # directory is complete (readable by `signalrl doctor`) when the trainer returns
        if not wait_for_exit(self.run_dir):
            warnings.warn(f"{self.run_dir}: the W&B log has no exit record yet", stacklevel=2)


class TrackioSink:
    def __init__(self, path: Path, config: dict[str, Any], project: str, resume: bool) -> None:
        import trackio

        with _stdout_to_stderr():  # trackio prints; stdout is the command's result
            self.run = trackio.init(
                project=project,
                name=path.name,
                config=config,
                resume="allow" if resume else "never",
            )

    def log(self, step: int, row: dict[str, Any]) -> None:
        self.run.log(scalars(row), step=step)

    def finding(self, finding: dict[str, Any]) -> None:
        from trackio import AlertLevel

        level = {"critical": AlertLevel.ERROR, "warning": AlertLevel.WARN}
        with _stdout_to_stderr():
            self.run.alert(
                title=f"doctor: {finding['id']}",
                text=f"{finding['evidence']} -> {finding['suggestion']}",
                level=level.get(finding["severity"], AlertLevel.INFO),
                step=finding["step"],
            )

    def close(self) -> None:
        import trackio
        from trackio import context_vars

        with _stdout_to_stderr():
            if context_vars.current_run.get() is self.run:
                trackio.finish()  # and unset as current (else atexit finishes it again)
            else:
                self.run.finish()


def _stdout_to_stderr() -> contextlib.redirect_stdout[Any]:
    return contextlib.redirect_stdout(sys.stderr)


def _finding_text(f: dict[str, Any]) -> str:
    return f"{f['id']} ({f['severity']}) at step {f['step']}: {f['evidence']} -> {f['suggestion']}"


def open_sinks(
    names: list[str],
    path: Path,
    *,
    config: dict[str, Any] | None = None,
    project: str = "signalrl",
    wandb_mode: str | None = None,
    resume_step: int | None = None,
) -> list[Sink]:
    """The sinks `names` of the run directory `path` (`resume_step`: the checkpoint's step on
    a resume, else None). A sink that fails to open closes the ones opened before it."""
    sinks: list[Sink] = []
    resume = resume_step is not None
    try:
        for name in names:
            if name == "tensorboard":
                sinks.append(TensorBoardSink(path, resume_step))
            elif name == "wandb":
                sinks.append(WandbSink(path, config or {}, project, wandb_mode, resume))
            elif name == "trackio":
                sinks.append(TrackioSink(path, config or {}, project, resume))
            else:
                raise ValueError(f"logging.sinks: unknown sink {name!r}")
    except BaseException:
        for s in sinks:
            s.close()
        raise
    return sinks
