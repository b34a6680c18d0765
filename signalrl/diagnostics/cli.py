"""The `signalrl doctor` command body: a rich table (or JSON) of findings per run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from signalrl.diagnostics.doctor import DoctorError, Report, diagnose

HEALTHY = "no finding: the run looks healthy"
_STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan"}


def _table(report: Report) -> Any:
    from rich.table import Table

    table = Table(title=f"{report.path} ({report.steps} logged steps)", show_lines=True)
    table.add_column("id", no_wrap=True)
    table.add_column("severity", no_wrap=True)
    table.add_column("first step", no_wrap=True, justify="right")
    table.add_column("evidence", overflow="fold", ratio=3)
    table.add_column("suggestion", overflow="fold", ratio=2)
    for f in report.findings:
        table.add_row(f.id, f"[{_STYLE[f.severity]}]{f.severity}[/]", str(f.step),
                      f.evidence, f.suggestion)
    return table


def doctor_command(paths: list[Path], json_out: bool, rules_module: str | None, console: Any
                   ) -> int:
    """Diagnose each run in `paths` and print the findings.

    Exit code: 0 every run looks healthy, 1 some run has a finding, 2 a run could not be read.
    With `json_out`, prints one JSON list of `{"id", "severity", "step", "evidence",
    "suggestion"}` (each with `"run"` when several paths are given; an unreadable run is
    `{"run", "error"}`)."""
    extra = (rules_module,) if rules_module else ()
    code = 0
    out: list[dict[str, Any]] = []
    for path in paths:
        try:
            report = diagnose(path, extra_modules=extra)
        except DoctorError as e:
            code = 2
            if json_out:
                out.append({"run": str(path), "error": str(e)})
            else:
                console.print(f"[bold red]doctor:[/] {e}")
            continue
        if report.findings:
            code = max(code, 1)
        if json_out:
            for f in report.findings:
                d = f.to_dict()
                out.append({**d, "run": str(path)} if len(paths) > 1 else d)
            continue
        for note in report.notes:
            console.print(f"[yellow]note:[/] {note}")
        if report.findings:
            console.print(_table(report))
        else:
            console.print(f"{path}: {HEALTHY}")
        for rid, lack in report.cannot_run().items():
            console.print(f"[dim]{rid} cannot run (needs {', '.join(lack)})[/]")
    if json_out:
        console.print_json(json.dumps(out)) if hasattr(console, "print_json") else print(
            json.dumps(out))
    return code
