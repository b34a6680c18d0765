"""What every benchmark script shares: the machine's load during a timed section, waiting for
an idle machine, and the software versions. Scripts import it as `from machine import ...`
(they run as `python benchmarks/NAME.py`, so `benchmarks/` is on `sys.path`).

A ratio measured while other processes used more than `BUSY_FRACTION` of the CPUs is not a
result: `load_verdict` says so, and the scripts print the ratio flagged (or refuse it).
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

BUSY_FRACTION = 0.05


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall, busy CPU seconds of the whole machine, CPU seconds of this process); Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
    t = os.times()
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), t.user + t.system


def other_cpu_fraction(start: tuple | None, end: tuple | None) -> float | None:
    """Share of all CPUs' time that other processes used between two snapshots: tells
    whether something else ran during a timed section."""
    if start is None or end is None or end[0] <= start[0]:
        return None
    other = (end[1] - start[1]) - (end[2] - start[2])
    return max(0.0, other) / ((end[0] - start[0]) * (os.cpu_count() or 1))


def wait_for_idle(max_seconds: float, console: Any, threshold: float = 0.10) -> None:
    """Block until other processes use under `threshold` of the CPUs over 5 s (at most
    `max_seconds`), so a timed section does not start while something else runs."""
    deadline = time.perf_counter() + max_seconds
    while time.perf_counter() < deadline:
        a = cpu_snapshot()
        time.sleep(5)
        busy = other_cpu_fraction(a, cpu_snapshot())
        if busy is None or busy < threshold:
            return
        console.print(f"waiting for an idle machine: other processes use {busy:.0%} of the CPUs")
    console.print("[yellow]machine still busy; timing anyway")


def load_verdict(*fractions: float | None) -> dict[str, Any]:
    """Whether the timed sections ran on an idle machine: `{"idle": bool, "max_other": f,
    "loadavg_1m": f}`; a ratio with `idle` false is reported flagged, never as a result."""
    known = [f for f in fractions if f is not None]
    worst = max(known) if known else None
    return {
        "idle": worst is not None and worst <= BUSY_FRACTION,
        "max_other_cpu_fraction": worst,
        "busy_threshold": BUSY_FRACTION,
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def versions() -> dict[str, str]:
    """Versions of the libraries a signalrl-vs-TRL benchmark depends on (TRL's side optional)."""
    import torch
    import transformers

    import signalrl

    out = {
        "signalrl": signalrl.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for name in ("trl", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out
