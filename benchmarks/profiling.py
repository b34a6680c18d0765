"""Where a training step's time goes: `torch.profiler` over a few steps of a benchmark run,
summarised by phase (forward, backward, optimizer) and by kind of op (matmuls, attention,
the LM head's log-softmax, copies and indexing, the rest of the elementwise ops), in
milliseconds per step. The part of the wall time spent outside any op ("outside ops":
Python, the framework's bookkeeping, the data collator, dispatch) is the step's wall time
minus the time inside ops.

Set `SIGNALRL_BENCH_PROFILE=K` (or `K,SKIP`) for any of the vs-TRL scripts:
`trl_common.StepLog.mark()`, called at the end of every step by both frameworks, starts the
profiler after SKIP steps (default 2) and stops it K steps later; the script then prints
the table and labels its ratio "profiled run, not a timing result" (the profiler adds a few
microseconds per op, which makes "outside ops" a little high). Time with an unprofiled run.
"""

from __future__ import annotations

import os
import time
from typing import Any

PHASES = ("forward and the rest", "backward", "optimizer")

KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "matmul",
        (
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::baddbmm",
            "aten::addmv",
            "aten::mv",
            "aten::matmul",
            "aten::linear",
            "aten::dot",
        ),
    ),
    (
        "attention",
        (
            "scaled_dot_product",
            "flash_attention",
            "aten::_softmax",
            "aten::_softmax_backward_data",
            "aten::softmax",
        ),
    ),
    (
        "log-softmax, gather, loss",
        (
            "log_softmax",
            "logsumexp",
            "aten::gather",
            "nll_loss",
            "cross_entropy",
            "take_along_dim",
            "aten::scatter",
        ),
    ),
    (
        "copies, cat, indexing",
        (
            "aten::copy_",
            "aten::cat",
            "aten::index",
            "aten::_index_put",
            "aten::index_put",
            "aten::index_select",
            "aten::clone",
            "aten::_to_copy",
            "aten::fill_",
            "aten::zero_",
            "aten::zeros",
            "aten::empty",
            "aten::masked_fill",
            "aten::where",
            "aten::nonzero",
            "aten::cumsum",
            "aten::arange",
            "aten::full",
            "aten::embedding",
            "aten::embedding_dense_backward",
            "aten::stack",
            "aten::contiguous",
            "aten::repeat",
            "aten::expand",
            "aten::slice",
            "aten::view",
            "aten::reshape",
        ),
    ),
)


def profile_request() -> tuple[int, int]:
    """(skip, steps) from `SIGNALRL_BENCH_PROFILE` ("K" or "K,SKIP"); steps 0: no profile."""
    raw = os.environ.get("SIGNALRL_BENCH_PROFILE", "").strip()
    if not raw:
        return 0, 0
    parts = [int(x) for x in raw.split(",")]
    return (parts[1] if len(parts) > 1 else 2), parts[0]


def kind_of(name: str) -> str:
    for kind, keys in KINDS:
        if any(k in name for k in keys):
            return kind
    return "elementwise, norms, other ops"


def phase_of(event: Any) -> str:
    """The phase an event ran in, from its ancestors' names."""
    e = event
    while e is not None:
        name = e.name
        if name.startswith("Optimizer.") or "optimizer" in name.lower():
            return "optimizer"
        if name.startswith("autograd::engine::evaluate_function"):
            return "backward"
        e = e.cpu_parent
    return "forward and the rest"


def summarize(events: Any, steps: int, wall: float) -> dict[str, Any]:
    """ms per step by phase and by kind (self times of the ops), and outside ops."""
    by_phase = dict.fromkeys(PHASES, 0.0)
    by_kind: dict[str, float] = {k: 0.0 for k, _ in KINDS}
    by_kind["elementwise, norms, other ops"] = 0.0
    inside = 0.0
    for e in events:
        if not e.name.startswith("aten::") or e.self_cpu_time_total <= 0:
            continue
        us = float(e.self_cpu_time_total)
        inside += us
        by_phase[phase_of(e)] += us
        by_kind[kind_of(e.name)] += us
    per = 1e-3 / max(steps, 1)  # us -> ms per step
    wall_ms = wall * 1e3 / max(steps, 1)
    return {
        "profiled_steps": steps,
        "wall_ms_per_step": wall_ms,
        "inside_ops_ms": inside * per,
        "outside_ops_ms": max(wall_ms - inside * per, 0.0),
        "by_phase_ms": {k: v * per for k, v in by_phase.items()},
        "by_kind_ms": {k: v * per for k, v in by_kind.items()},
    }


class StepProfiler:
    """Profile the steps after the first `skip` (marks counted by `on_mark`) for `steps`."""

    def __init__(self, skip: int, steps: int) -> None:
        self.skip, self.steps = skip, steps
        self.marks = 0
        self.prof: Any = None
        self.started = 0.0
        self.result: dict[str, Any] | None = None

    def on_mark(self) -> None:
        import torch

        self.marks += 1
        if self.steps <= 0 or self.result is not None:
            return
        if self.marks == self.skip:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.start()
            self.started = time.perf_counter()
        elif self.prof is not None and self.marks == self.skip + self.steps:
            wall = time.perf_counter() - self.started
            self.prof.stop()
            self.result = summarize(self.prof.events(), self.steps, wall)
            self.prof = None


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one column per run (e.g. signalrl, TRL), ms per step."""
    names = list(rows)
    lines = ["| ms per step | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]

    def line(label: str, get: Any) -> None:
        vals = [get(rows[n]) for n in names]
        lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")

    line("step (wall, profiled)", lambda r: r["wall_ms_per_step"])
    for p in PHASES:
        line(f"ops in {p}", lambda r, p=p: r["by_phase_ms"][p])
    for k in rows[names[0]]["by_kind_ms"]:
        line(f"ops: {k}", lambda r, k=k: r["by_kind_ms"][k])
    line("outside ops (Python, framework, data)", lambda r: r["outside_ops_ms"])
    return "\n".join(lines)
