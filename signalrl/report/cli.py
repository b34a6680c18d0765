"""`signalrl report RUN_DIR... [--out FILE]`: the run report of one run, or a comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from signalrl.report.html import ReportError, write_report


def report_command(
    run_dirs: list[Path],
    out: Path | None,
    console: Console,
    findings: dict[str, list[dict[str, Any]]] | None = None,
) -> int:
    """Write the report of `run_dirs` and print where it is; returns the exit status (0, or 2
    with an error printed on `console`). `out` defaults to `<run>/report.html` for one run and
    is required for several. `findings` (run directory -> the doctor's findings) defaults to
    the doctor's diagnosis of each run's logs."""
    if not run_dirs:
        return _error(console, "give at least one run directory")
    if out is None:
        if len(run_dirs) > 1:
            return _error(
                console,
                f"{len(run_dirs)} run directories: pass --out FILE for the comparison report",
            )
        out = Path(run_dirs[0]) / "report.html"
    if out.is_dir():
        return _error(console, f"--out {out} is a directory: give a file name (report.html)")
    if findings is None:  # the doctor's findings of each run, read again from its logs
        from signalrl.report.overlay import run_findings

        findings = {str(p): run_findings(Path(p)) for p in run_dirs}
    try:
        path = write_report(list(run_dirs), out, findings)
    except ReportError as e:
        return _error(console, str(e))
    except OSError as e:
        return _error(console, f"cannot write {out}: {e.strerror or e}")
    console.print(f"report: {path}", highlight=False, soft_wrap=True)
    return 0


def _error(console: Console, msg: str) -> int:
    console.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)
    return 2
