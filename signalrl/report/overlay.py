"""The overlay report of several runs (`signalrl sweep`, `signalrl compare`): one report.html
with every run's curves on shared plots and each run's doctor findings marked on them.

`overlay_report(run_dirs, out)` diagnoses each run with the built-in rules (a run the doctor
cannot judge simply has no findings), writes `out` and returns it, or returns None and says
why on `console` when the report cannot be written (the runs themselves are finished and their
results written already; a report must not fail them)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from signalrl.report.html import ReportError, write_report


def run_findings(run_dir: Path) -> list[dict[str, Any]]:
    """The doctor's findings of one run, each with the metrics its rule reads (the report's
    markers); [] when the doctor cannot read or judge the run."""
    from signalrl.diagnostics.doctor import DoctorError, diagnose
    from signalrl.diagnostics.rules import BUILTIN_RULES

    try:
        report = diagnose(run_dir)
    except DoctorError:
        return []
    needs = {r.id: list(r.needs or r.needs_any) for r in BUILTIN_RULES}
    return [{**f.to_dict(), "metrics": needs.get(f.id, [])} for f in report.findings]


def overlay_report(run_dirs: Sequence[str | Path], out: Path, console: Any = None) -> Path | None:
    """Write the overlay report of `run_dirs` to `out`; None (with a warning) if it fails."""
    paths = [Path(p) for p in run_dirs]
    findings = {str(p): run_findings(p) for p in paths}
    try:
        return write_report(paths, out, findings)
    except (ReportError, OSError) as e:
        if console is not None:
            console.print(f"[yellow]warning:[/yellow] {out} not written: {e}", highlight=False)
        return None
