"""Math answer rewards: extract a final answer and check it with ``math-verify``.

Extraction (:func:`extract_answer`, :func:`extract_reference`, in
:mod:`signalrl.rewards.math_extract`) reads the answer the way ``math_verify.parse`` does
wherever the completion gives it in a box (several boxes together are one answer) or in
an ``<answer>...</answer>`` block, and otherwise looks for an ``Answer: ...`` /
``answer is ...`` phrase, a GSM8K-style ``#### N`` line, a completion that is only a
formula and, optionally, the last number in the text. An unterminated ``\\boxed{`` (a
truncated generation) contributes nothing: the text from it onwards is ignored.

Comparison (:func:`answers_match`) normalises both sides (thousands separators, currency
signs, surrounding ``$``, percentages, a trailing period) and hands them to
``math_verify.parse`` / ``math_verify.verify``, which understands numbers, fractions vs
decimals, LaTeX expressions, sets, intervals and equations. Every check runs under a time
limit; errors and timeouts count as a mismatch.

``math-verify`` implements its own timeouts with ``SIGALRM``, which only works in the main
thread. We always disable those and enforce our own limit instead: every comparison runs in a
helper worker process, which times itself with a ``setitimer`` alarm and is killed and
replaced by the caller when that is not enough (a long C call inside sympy ignores signals).

The worker process loads this file by path (see ``_Worker._BOOT``) and runs
``_worker_loop``; there, this module imports only the standard library and
``math_verify``, not the rest of ``signalrl``. The host side of the worker (start it, send a
request, wait under a wall clock, kill its process group on timeout) is the helper-process
code it shares with the code sandbox's runner pool, :mod:`signalrl.rewards.sandbox.process`,
and the extraction (:mod:`signalrl.rewards.math_extract`, standard library only) is host
side too: both are imported only when this module is imported as part of ``signalrl``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

if __package__:  # imported as signalrl.rewards.math; not in the worker (loaded by path)
    # _clean_phrase: signalrl.tasks.dataset cleans <answer> blocks with it.
    from signalrl.rewards.math_extract import clean_phrase as _clean_phrase  # noqa: F401
    from signalrl.rewards.math_extract import (
        extract_answer,
        extract_reference,
        find_last_boxed,
        normalize_answer,
    )
    from signalrl.rewards.sandbox import process

__all__ = [
    "answers_match",
    "extract_answer",
    "extract_reference",
    "find_last_boxed",
    "math_reward",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# Comparison (runs in the worker process)
# --------------------------------------------------------------------------------------


def _parse(expr: str) -> list[Any]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    parsed = parse(f"${expr}$", extraction_config=config, parsing_timeout=None)  # type: ignore[arg-type]
    if not parsed:
        parsed = parse(expr, extraction_config=config, parsing_timeout=None)  # type: ignore[arg-type]
    return list(parsed)


def _compare_normalized(gold: str, pred: str) -> bool:
    """math-verify comparison of two normalised answers (no time limit of its own)."""
    from math_verify import verify

    gold_parsed = _parse(gold)
    pred_parsed = _parse(pred)
    if not gold_parsed or not pred_parsed:
        return gold.strip() == pred.strip() and bool(gold.strip())
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))  # type: ignore[arg-type]


def _silence_math_verify_timeout_warning() -> None:
    # math-verify warns once that its timeout is disabled; we enforce our own instead.
    try:
        import math_verify.grader as grader
        import math_verify.parser as parser

        grader.TIMEOUT_WARNING_SHOWN = True
        parser.TIMEOUT_WARNING_SHOWN = True
    except (ImportError, AttributeError):
        pass


class _CheckTimeout(BaseException):
    """Raised by our SIGALRM handler; a BaseException so library code cannot swallow it."""


def _call_with_alarm(fn: Callable[[], bool], timeout: float) -> bool:
    """Run ``fn`` in the main thread under a ``setitimer`` alarm; False on timeout."""
    state = {"armed": True}

    def handler(signum: int, frame: object) -> None:
        if state["armed"]:
            state["armed"] = False
            raise _CheckTimeout

    old_handler = signal.signal(signal.SIGALRM, handler)
    old_delay, old_interval = signal.getitimer(signal.ITIMER_REAL)
    started = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return fn()
        finally:
            state["armed"] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _CheckTimeout:
        logger.debug("math check timed out after %.2fs", timeout)
        return False
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:  # restore someone else's pending alarm
            remaining = max(old_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, old_interval)


class _Worker:
    """A helper process that runs comparisons (killable on timeout)."""

    _BOOT = (
        "import sys\n"
        "sys.path = [p for p in sys.path if p not in ('', '.')]\n"
        "import importlib.util\n"
        "spec = importlib.util.spec_from_file_location('_signalrl_math_worker', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "module._worker_loop()\n"
    )
    # Longest answer line accepted from the worker (it is {"match": true|false}).
    _REPLY_CAP = 1 << 16

    def __init__(self) -> None:
        argv = [sys.executable, "-c", self._BOOT, os.path.abspath(__file__)]
        self.channel = process.Channel(process.spawn(argv, stderr=False))
        ready = self._readline(time.monotonic() + 120.0)
        if ready != b"ready":
            self.kill()
            raise RuntimeError("the math-verify worker process failed to start")

    def _readline(self, deadline: float) -> bytes | None:
        """The worker's next line, or None if it did not come before ``deadline``."""
        try:
            return self.channel.read_line(deadline).strip()
        except (process.ChildTimeout, process.ChildClosed):
            return None

    def compare(self, gold: str, pred: str, timeout: float) -> bool | None:
        """The comparison result, or None if the worker timed out or died."""
        request = json.dumps({"gold": gold, "pred": pred, "timeout": timeout}) + "\n"
        self.channel.send(request.encode(), reply_cap=self._REPLY_CAP)
        # The worker enforces `timeout` itself; the margin covers scheduling delays.
        line = self._readline(time.monotonic() + timeout + 2.0)
        if line is None:
            return None
        try:
            return bool(json.loads(line)["match"])
        except (ValueError, KeyError, TypeError):
            return None

    def kill(self) -> None:
        """SIGKILL the worker's process group and reap it (bounded)."""
        self.channel.stop()


class _WorkerPool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()

    def compare(self, gold: str, pred: str, timeout: float) -> bool:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = _Worker()
            with self._lock:
                self._all.add(worker)
        result = worker.compare(gold, pred, timeout)
        if result is None:
            worker.kill()
            with self._lock:
                self._all.discard(worker)
            return False
        with self._lock:
            self._idle.append(worker)
        return result

    def close(self) -> None:
        with self._lock:
            workers, self._all, self._idle = list(self._all), set(), []
        for worker in workers:
            worker.kill()


_pool = _WorkerPool()
atexit.register(_pool.close)


def _worker_loop() -> None:
    """Body of the helper process: one JSON request per line on stdin."""
    _silence_math_verify_timeout_warning()
    import math_verify  # noqa: F401 - fail at start-up, not on the first request

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            gold, pred, timeout = str(request["gold"]), str(request["pred"]), request["timeout"]
            match = _call_with_alarm(partial(_safe_compare, gold, pred), float(timeout))
        except Exception:  # noqa: BLE001 - a malformed request must not kill the worker
            match = False
        out.write(json.dumps({"match": match}) + "\n")
        out.flush()


def _safe_compare(gold: str, pred: str) -> bool:
    try:
        return _compare_normalized(gold, pred)
    except Exception:  # noqa: BLE001 - any parser/sympy failure is a mismatch
        logger.debug("math-verify comparison failed", exc_info=True)
        return False


def _check_timeout(timeout: float) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")


def answers_match(
    pred: str, reference: str, *, percent_as_fraction: bool = False, timeout: float = 5.0
) -> bool:
    """Whether two already-extracted answers are mathematically equivalent.

    ``pred`` is the model's answer, ``reference`` the gold one (the comparison is not fully
    symmetric, e.g. for equations). With ``percent_as_fraction=False`` a bare percentage
    ``50%`` means ``50``; with ``True`` it means ``0.5``. Errors and timeouts give False.
    """
    if not isinstance(pred, str) or not isinstance(reference, str):
        raise TypeError("pred and reference must be str")
    _check_timeout(timeout)
    gold = normalize_answer(reference, percent_as_fraction)
    target = normalize_answer(pred, percent_as_fraction)
    if not gold or not target:
        return False
    if gold == target:
        return True
    # Always in a helper process: a SIGALRM cannot interrupt sympy inside one long C call
    # (e.g. the integer power of a tower like 9^{9^{9^...}}), but the host can kill the process.
    try:
        return _pool.compare(gold, target, float(timeout))
    except (OSError, RuntimeError):
        logger.warning("math-verify worker unavailable; counting the answer as wrong")
        return False


def math_reward(
    completion: str,
    answer: str,
    *,
    fallback_last_number: bool = True,
    percent_as_fraction: bool = False,
    timeout: float = 5.0,
) -> float:
    """1.0 if the completion's final answer equals the reference answer, else 0.0.

    Args:
        completion: the model output.
        answer: the reference: a bare answer, a GSM8K solution ending in ``#### N`` or a
            MATH solution containing ``\\boxed{}`` (see :func:`extract_reference`).
        fallback_last_number: use the last number of the completion when it states no
            explicit answer.
        percent_as_fraction: read ``50%`` as ``0.5`` (True) or as ``50`` (False).
        timeout: seconds allowed for the comparison; a timeout scores 0.0.

    Raises:
        ValueError: if the reference has no answer or ``timeout`` is not positive.
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    _check_timeout(timeout)
    reference = extract_reference(answer)
    pred = extract_answer(completion, fallback_last_number=fallback_last_number)
    if pred is None:
        return 0.0
    matched = answers_match(
        pred, reference, percent_as_fraction=percent_as_fraction, timeout=timeout
    )
    return 1.0 if matched else 0.0
