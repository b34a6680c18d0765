"""The run directory (docs/architecture.md, "A run directory"): config.yaml, metrics.jsonl,
samples.jsonl, TensorBoard events.

`metrics.jsonl` is the source of truth: one JSON object per logged step. On resume, lines past
the checkpoint's step are dropped so a step is never logged twice.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class RunDir:
    def __init__(self, path: str | Path, *, tensorboard: bool = True) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.samples_path = self.path / "samples.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.final = self.path / "final"
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.path))

    @staticmethod
    def prepare(path: str | Path, *, resume: bool, overwrite: bool) -> None:
        """Refuse to mix two runs in one directory unless asked to resume or overwrite."""
        p = Path(path)
        if not p.exists() or not any(p.iterdir()):
            return
        if overwrite:
            shutil.rmtree(p)
        elif not resume:
            raise FileExistsError(
                f"run directory {p} already holds a run; pass --resume to continue it or "
                "--overwrite to start over"
            )

    def write_config(self, text: str) -> None:
        tmp = self.path / "config.yaml.tmp"
        tmp.write_text(text)
        tmp.replace(self.path / "config.yaml")

    def truncate_metrics(self, step: int) -> None:
        for p in (self.metrics_path, self.samples_path):
            if not p.exists():
                continue
            kept = [
                line
                for line in p.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step
            ]
            p.write_text("".join(line + "\n" for line in kept))

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        with self.samples_path.open("a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **{k: _clean(v) for k, v in r.items()}}) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
