"""Code verifications per second on this machine: MBPP-size programs, the full sandbox.

Each verification runs one completion against its assert-list tests (MBPP convention) with
`signalrl.rewards.code.code_reward_batch`, bounded by the cores. Reports verifications per
second and seconds per verification for `--sandbox required` (bubblewrap) and `none`
(resource limits only), so the cost of isolation is visible.

    python benchmarks/code_verify_throughput.py --n 200
"""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console
from rich.table import Table

from signalrl.rewards.code import bwrap_status, code_reward_batch

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


def measure(n: int, sandbox: str) -> dict:
    items = [PROGRAMS[i % len(PROGRAMS)] for i in range(n)]
    code_reward_batch([items[0][0]], [items[0][1]], sandbox=sandbox)  # warm-up
    t0 = time.perf_counter()
    rewards = code_reward_batch([c for c, _ in items], [t for _, t in items], sandbox=sandbox)
    dt = time.perf_counter() - t0
    expected = [1.0 if c != PROGRAMS[4][0] else 0.5 for c, _ in items]
    return {
        "sandbox": sandbox,
        "verifications": n,
        "seconds": dt,
        "verifications_per_s": n / dt,
        "ms_per_verification": 1000 * dt / n,
        "tests_per_s": sum(len(t) for _, t in items) / dt,
        "all_correct": rewards == expected,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ok, why = bwrap_status()
    modes = (["required"] if ok else []) + ["none"]
    results = [measure(args.n, m) for m in modes]
    table = Table(title=f"code verification throughput ({why})")
    for col in results[0]:
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()])
    Console(width=200).print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
