"""Code verifications per second on this machine: MBPP-size programs, the full sandbox.

Each verification runs one completion against its assert-list tests (MBPP convention, 2-3
asserts) with `signalrl.rewards.code.code_reward_batch`, one sandboxed runner per core.
`--suite humaneval` runs the canonical solutions of `tests/data/humaneval_style.jsonl`
instead (one `check(candidate)` each, up to 60 calls of the program per check).
Reports verifications per second and milliseconds per verification for `--sandbox
required` (bubblewrap) and `none` (resource limits only), so the cost of isolation is
visible; also the CPU time the verifications took (this process plus the sandboxes: a
measure that other load on the machine disturbs less than wall time), the share of the
CPUs that other processes used meanwhile, and the cost of the first check on a cold pool
(starting a sandboxed runner).

    python benchmarks/code_verify_throughput.py --n 1000
    python benchmarks/code_verify_throughput.py --n 1000 --repeat 5 --wait-idle 300
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from signalrl.rewards.code import bwrap_status, code_reward_batch
from signalrl.rewards.sandbox import close_sandbox_pool

PROGRAMS = [
    (
        "def add(a, b):\n    return a + b\n",
        ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"],
    ),
    (
        "def is_even(n):\n    return n % 2 == 0\n",
        ["assert is_even(2)", "assert not is_even(3)", "assert is_even(0)"],
    ),
    (
        "def rev(s):\n    return s[::-1]\n",
        ["assert rev('abc') == 'cba'", "assert rev('') == ''", "assert rev('a') == 'a'"],
    ),
    (
        "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
        + "        a, b = b, a + b\n    return a\n",
        ["assert fib(0) == 0", "assert fib(10) == 55", "assert fib(1) == 1"],
    ),
    ("def wrong(x):\n    return x + 1\n", ["assert wrong(1) == 3", "assert wrong(0) == 1"]),
]

_TICK = os.sysconf("SC_CLK_TCK")
_HUMANEVAL = Path(__file__).resolve().parents[1] / "tests" / "data" / "humaneval_style.jsonl"


def suite_items(suite: str) -> list[tuple[str, list[str] | str, str | None, float]]:
    """(completion, tests, entry point, expected reward) of each program of the suite."""
    if suite == "mbpp":
        wrong = PROGRAMS[4][0]
        return [(c, t, None, 0.5 if c == wrong else 1.0) for c, t in PROGRAMS]
    rows = [json.loads(line) for line in _HUMANEVAL.read_text().splitlines() if line]
    return [(r["prompt"] + r["canonical_solution"], r["test"], r["entry_point"], 1.0) for r in rows]


def machine_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all CPUs; Linux)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / _TICK  # minus idle and iowait


def tree_cpu_seconds() -> float:
    """CPU seconds used by this process and all its descendants, live or reaped.

    The sandboxed runners are descendants (inside bwrap's PID namespace, but visible here);
    each test process they fork is reaped by its runner, so it is in the runner's
    cutime/cstime.
    """
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        parents[pid] = int(fields[1])
        cpu[pid] = sum(int(x) for x in fields[11:15]) / _TICK  # utime stime cutime cstime
    me = os.getpid()
    total, frontier = 0.0, [me]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        total += sum(cpu[p] for p in children)
        frontier = children
    t = os.times()
    return total + t.user + t.system + t.children_user + t.children_system


def wait_for_idle(max_seconds: float, console: Console, threshold: float = 0.10) -> None:
    """Block until the machine's CPUs are under ``threshold`` busy over 5 s (at most
    ``max_seconds``), so a timed run does not start while something else runs."""
    deadline = time.perf_counter() + max_seconds
    cpus = os.cpu_count() or 1
    while time.perf_counter() < deadline:
        before = machine_busy_seconds()
        time.sleep(5)
        busy = (machine_busy_seconds() - before) / (5 * cpus)
        if busy < threshold:
            return
        console.print(f"waiting for an idle machine: the CPUs are {busy:.0%} busy")
    console.print("[yellow]machine still busy; timing anyway")


def measure(n: int, sandbox: str, suite: str = "mbpp") -> dict:
    """One timed batch of ``n`` verifications (after a cold start and a warm-up)."""
    programs = suite_items(suite)
    items = [programs[i % len(programs)] for i in range(n)]
    completions = [c for c, _, _, _ in items]
    tests = [t for _, t, _, _ in items]
    entry_points = [e for _, _, e, _ in items]
    close_sandbox_pool()
    t0 = time.perf_counter()
    code_reward_batch(completions[:1], tests[:1], entry_points=entry_points[:1], sandbox=sandbox)
    cold = time.perf_counter() - t0  # that started one runner
    warm = 4 * (os.cpu_count() or 1)  # starts one runner per core
    code_reward_batch(
        completions[:warm], tests[:warm], entry_points=entry_points[:warm], sandbox=sandbox
    )
    load = os.getloadavg()[0]
    busy0, cpu0, t0 = machine_busy_seconds(), tree_cpu_seconds(), time.perf_counter()
    rewards = code_reward_batch(completions, tests, entry_points=entry_points, sandbox=sandbox)
    dt = time.perf_counter() - t0
    cpu = tree_cpu_seconds() - cpu0
    other = max(0.0, machine_busy_seconds() - busy0 - cpu) / (dt * (os.cpu_count() or 1))
    n_tests = sum(1 if isinstance(t, str) else len(t) for t in tests)
    return {
        "suite": suite,
        "sandbox": sandbox,
        "verifications": n,
        "seconds": dt,
        "verifications_per_s": n / dt,
        "ms_per_verification": 1000 * dt / n,
        "cpu_ms_per_verification": 1000 * cpu / n,
        "tests_per_s": n_tests / dt,
        "cold_start_ms": 1000 * cold,
        "loadavg_1m_before": load,
        "other_processes_cpu_fraction": other,
        "all_correct": rewards == [r for _, _, _, r in items],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="verifications per timed run")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per sandbox mode")
    ap.add_argument("--wait-idle", type=float, default=0.0, help="max seconds to wait")
    ap.add_argument("--out", default=None, help="write all runs as JSON here")
    ap.add_argument("--suite", choices=("mbpp", "humaneval"), default="mbpp", help="programs")
    args = ap.parse_args()
    console = Console(width=220)
    ok, why = bwrap_status()
    modes = (["required"] if ok else []) + ["none"]
    runs = []
    for mode in modes:
        for _ in range(args.repeat):
            if args.wait_idle:
                wait_for_idle(args.wait_idle, console)
            runs.append(measure(args.n, mode, args.suite))
    table = Table(title=f"code verification throughput, {os.cpu_count()} CPUs ({why})")
    for col in runs[0]:
        table.add_column(col, justify="right")
    for r in runs:
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()])
    console.print(table)
    for mode in modes:
        rates = [r["verifications_per_s"] for r in runs if r["sandbox"] == mode]
        console.print(
            f"{mode}: median {statistics.median(rates):.1f} verifications/s "
            f"(best {max(rates):.1f}, {len(rates)} runs of {args.n})"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(runs, f, indent=2)


if __name__ == "__main__":
    main()
