"""Code-execution rewards: run a completion's program against unit tests in a sandbox.

Two test conventions are supported:

* **MBPP**: ``tests`` is a list of statements (usually ``assert f(x) == y``); each one is a
  separate test, against a fresh sandboxed process of the program (so tests do not share
  state, and a test that hangs or crashes fails alone).
* **HumanEval**: ``tests`` is one string defining ``check(candidate)`` and ``entry_point``
  names the function to pass to it; that is a single test. HumanEval completions are often
  only the function body: prepend the prompt to the completion before calling.

The reward is the fraction of tests that pass. The tests never run in the program's
process: a trusted harness runs them and calls the program's functions through proxies
that exchange plain data only (builtin numbers, strings, bytes, ``None`` and containers of
them), so a program can pass a test only by answering its calls correctly, not by reaching
into the harness, reading the tests, or returning an object that equals everything. See
:mod:`signalrl.rewards.sandbox` for that trust boundary and for what the sandbox isolates
and how (bubblewrap when available, resource limits and a memory budget per check always).
The processes are forked by long-lived sandboxed runners kept in a pool (one per
concurrent check, started on first use), which is what makes a check cost milliseconds
rather than a sandbox start; :func:`close_sandbox_pool` stops the idle ones.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from signalrl.rewards.sandbox import (
    SANDBOX_MODES,
    SandboxLimits,
    TestOutcome,
    TestStatus,
    bwrap_status,
    close_sandbox_pool,
    run_python_tests,
)

__all__ = [
    "SandboxLimits",
    "TestOutcome",
    "TestStatus",
    "bwrap_status",
    "close_sandbox_pool",
    "code_reward",
    "code_reward_batch",
    "extract_code",
    "run_tests",
]

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+.\-]*)[^\n]*\n(.*?)```", re.DOTALL)
_OPEN_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+.\-]*)[^\n]*\n")
_PYTHON_TAGS = frozenset({"python", "py", "python3", "py3"})


def extract_code(completion: str) -> str:
    """The program in a completion.

    The last fenced block tagged ``python`` (or ``py``/``python3``) wins; otherwise the last
    fenced block of any language; otherwise, if a fence was opened but never closed (a
    truncated generation), the text after the last opening fence; otherwise the whole
    completion is taken as bare code.
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE_RE.finditer(completion)]
    python_blocks = [body for lang, body in blocks if lang in _PYTHON_TAGS]
    if python_blocks:
        return python_blocks[-1]
    if blocks:
        return blocks[-1][1]
    openings = list(_OPEN_FENCE_RE.finditer(completion))
    if openings:
        return completion[openings[-1].end() :]
    return completion


def _normalize_tests(
    tests: list[str] | str, entry_point: str | None
) -> tuple[list[str], str | None]:
    if isinstance(tests, str):
        if entry_point is None:
            raise ValueError(
                "tests is a string (HumanEval convention, defining check(candidate)), so "
                "entry_point must name the function to check; for MBPP-style asserts pass "
                "a list of strings"
            )
        if "check" not in tests:
            raise ValueError("a HumanEval-style tests string must define check(candidate)")
        return [tests], entry_point
    if not isinstance(tests, Sequence):
        raise TypeError(f"tests must be a list of str or a str, got {type(tests).__name__}")
    out: list[str] = []
    for i, test in enumerate(tests):
        if not isinstance(test, str):
            raise TypeError(f"tests[{i}] must be a str, got {type(test).__name__}")
        if not test.strip():
            raise ValueError(f"tests[{i}] is empty")
        out.append(test)
    if not out:
        raise ValueError("tests is empty: a reward needs at least one test")
    # entry_point is irrelevant for assert-style tests (MBPP rows often carry one anyway).
    return out, None


def run_tests(
    completion: str,
    tests: list[str] | str,
    *,
    entry_point: str | None = None,
    timeout: float = 5.0,
    sandbox: str = "auto",
    limits: SandboxLimits | None = None,
) -> list[TestOutcome]:
    """Run the completion's program against each test in the sandbox.

    Args:
        completion: model output holding the program (fenced block or bare code).
        tests: a list of test statements (MBPP; one test each), or a string defining
            ``check(candidate)`` (HumanEval; one test, needs ``entry_point``).
        entry_point: the function passed to ``check`` (HumanEval only; ignored for lists).
        timeout: wall-clock seconds per test.
        sandbox: ``"auto"``, ``"required"`` or ``"none"`` (see
            :func:`signalrl.rewards.sandbox.run_python_tests`).
        limits: resource limits per test process.

    Returns:
        one :class:`TestOutcome` per test, in order.
    """
    if sandbox not in SANDBOX_MODES:
        raise ValueError(f"sandbox must be one of {SANDBOX_MODES}, got {sandbox!r}")
    program = extract_code(completion)
    test_list, entry = _normalize_tests(tests, entry_point)
    return run_python_tests(
        program, test_list, entry_point=entry, timeout=timeout, sandbox=sandbox, limits=limits
    )


def code_reward(
    completion: str,
    tests: list[str] | str,
    *,
    entry_point: str | None = None,
    timeout: float = 5.0,
    sandbox: str = "auto",
    limits: SandboxLimits | None = None,
) -> float:
    """Fraction of tests passed (in ``[0, 1]``) by the program in ``completion``.

    Arguments are those of :func:`run_tests`. A program that fails to load, times out or
    breaks a resource limit scores 0 on the affected tests; it cannot affect the caller.
    """
    outcomes = run_tests(
        completion,
        tests,
        entry_point=entry_point,
        timeout=timeout,
        sandbox=sandbox,
        limits=limits,
    )
    return sum(o.passed for o in outcomes) / len(outcomes)


def code_reward_batch(
    completions: Sequence[str],
    tests_list: Sequence[list[str] | str],
    *,
    entry_points: Sequence[str | None] | str | None = None,
    timeout: float = 5.0,
    sandbox: str = "auto",
    limits: SandboxLimits | None = None,
    max_workers: int | None = None,
) -> list[float]:
    """:func:`code_reward` for many completions, run in parallel.

    Args:
        completions: the model outputs.
        tests_list: the tests of each completion (same length as ``completions``).
        entry_points: ``None``, one entry point for all, or one per completion.
        timeout, sandbox, limits: as in :func:`run_tests`.
        max_workers: concurrent checks, each on its own pooled sandboxed runner; defaults
            to, and is capped at, ``os.cpu_count()``.

    Returns:
        one reward per completion, in order.
    """
    if isinstance(completions, str) or not isinstance(completions, Sequence):
        raise TypeError("completions must be a sequence of str")
    if isinstance(tests_list, str) or not isinstance(tests_list, Sequence):
        raise TypeError("tests_list must be a sequence with one tests entry per completion")
    n = len(completions)
    if len(tests_list) != n:
        raise ValueError(f"got {n} completions but {len(tests_list)} tests entries")
    if entry_points is None or isinstance(entry_points, str):
        entries: list[str | None] = [entry_points] * n
    else:
        entries = list(entry_points)
        if len(entries) != n:
            raise ValueError(f"got {n} completions but {len(entries)} entry_points")
    if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
        raise ValueError(f"max_workers must be a positive int, got {max_workers!r}")
    if n == 0:
        return []
    # Validate everything up front, so bad input fails before any sandbox starts.
    for i, (completion, tests) in enumerate(zip(completions, tests_list, strict=True)):
        if not isinstance(completion, str):
            raise TypeError(f"completions[{i}] must be a str, got {type(completion).__name__}")
        try:
            _normalize_tests(tests, entries[i])
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"tests_list[{i}]: {exc}") from None
    # Resolve the sandbox once here (probe + warning), not concurrently in the workers.
    if sandbox not in SANDBOX_MODES:
        raise ValueError(f"sandbox must be one of {SANDBOX_MODES}, got {sandbox!r}")
    if sandbox != "none":
        ok, reason = bwrap_status()
        if sandbox == "required" and not ok:
            raise RuntimeError(f"sandbox='required' but bubblewrap cannot be used: {reason}")
    cpus = os.cpu_count() or 1
    workers = min(max_workers or cpus, cpus, n)

    def one(i: int) -> float:
        return code_reward(
            completions[i],
            tests_list[i],
            entry_point=entries[i],
            timeout=timeout,
            sandbox=sandbox,
            limits=limits,
        )

    if workers == 1:
        return [one(i) for i in range(n)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="signalrl-code") as pool:
        return list(pool.map(one, range(n)))
