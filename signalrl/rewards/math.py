"""Math answer rewards: extract a final answer and check it with ``math-verify``.

Extraction (:func:`extract_answer`) looks, in order, for the last ``\\boxed{...}`` (with
balanced braces), the last ``Answer: ...`` / ``answer is ...`` phrase, the last GSM8K-style
``#### N`` line and, optionally, the last number in the text. An unterminated ``\\boxed{``
(a truncated generation) contributes nothing: the text from it onwards is ignored.

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
which is imported only when this module is imported as part of ``signalrl``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

if __package__:  # imported as signalrl.rewards.math; not in the worker (loaded by path)
    from signalrl.rewards.sandbox import process

__all__ = [
    "answers_match",
    "extract_answer",
    "extract_reference",
    "find_last_boxed",
    "math_reward",
]

logger = logging.getLogger(__name__)

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_RE = re.compile(r"\b(?:final\s+answer|answer)\s*(?:is\b\s*:?|:|=)\s*(.*)", re.IGNORECASE)
_HASH_RE = re.compile(r"####[ \t]*(.*)")
_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:{_NUM})(?:\s*/\s*\d+)?(?:\s*\\?%)?")
_PLAIN_NUMBER_RE = re.compile(rf"^(?:{_NUM})$")
_NUMBER_WITH_WORDS_RE = re.compile(rf"^\\?\$?\s*((?:{_NUM})(?:\s*\\?%)?)\s*[A-Za-z][A-Za-z .]*$")
_PERCENT_RE = re.compile(rf"^({_NUM})\s*\\?%$")
_CURRENCY_RE = re.compile(r"^\\?\$\s*(?=[-+]?[\d.])")
_EXPR_CHARS_RE = re.compile(r"^[\w\s+\-*/^().,=<>{}\[\]|!]+$")
_WORD_RE = re.compile(r"[A-Za-z]{3,}")
_MATH_WORDS = frozenset({"sqrt", "pi", "sin", "cos", "tan", "log", "exp", "abs", "inf", "oo"})
_MATH_SPAN_RE = re.compile(r"\$\$?([^$]+?)\$\$?|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)


# --------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------


def _is_escaped(text: str, index: int) -> bool:
    """Whether the character at ``index`` is preceded by an odd number of backslashes."""
    count = 0
    while index - count - 1 >= 0 and text[index - count - 1] == "\\":
        count += 1
    return count % 2 == 1


def _boxed_spans(text: str) -> tuple[list[tuple[int, int]], int | None]:
    """Contents spans of complete ``\\boxed{...}`` and the start of a dangling one."""
    spans: list[tuple[int, int]] = []
    pos = 0
    while True:
        match = _BOXED_RE.search(text, pos)
        if match is None:
            return spans, None
        depth, i = 1, match.end()
        while i < len(text) and depth:
            ch = text[i]
            if ch in "{}" and not _is_escaped(text, i):
                depth += 1 if ch == "{" else -1
            i += 1
        if depth:
            return spans, match.start()  # unterminated: nothing from here on counts
        spans.append((match.end(), i - 1))
        pos = i


def find_last_boxed(text: str) -> str | None:
    """Contents of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), else ``None``.

    Braces are matched with nesting; escaped braces (``\\{``) do not count. If a
    ``\\boxed{`` is never closed, it and everything after it are ignored.
    """
    spans, _ = _boxed_spans(text)
    if not spans:
        return None
    start, end = spans[-1]
    return text[start:end].strip()


def _looks_like_expression(phrase: str) -> bool:
    """A plain-text formula such as ``x^2+2x+1`` or ``sqrt(2)/2`` (not a sentence)."""
    if not _EXPR_CHARS_RE.match(phrase):
        return False
    words = _WORD_RE.findall(phrase)
    return all(word.lower() in _MATH_WORDS for word in words)


def _clean_phrase(phrase: str) -> str | None:
    """Reduce an ``answer is ...`` phrase to the answer itself."""
    phrase = phrase.strip().replace("**", "").replace("__", "").strip()
    phrase = phrase.rstrip(" .;,!").strip()
    if not phrase:
        return None
    spans = [next(g for g in m.groups() if g is not None) for m in _MATH_SPAN_RE.finditer(phrase)]
    if spans:
        return spans[-1].strip()
    words = _NUMBER_WITH_WORDS_RE.match(phrase)
    if words:
        return words.group(1)
    if "\\" in phrase or _PLAIN_NUMBER_RE.match(phrase) or _looks_like_expression(phrase):
        return phrase
    numbers = _NUMBER_RE.findall(phrase)
    if numbers:
        return numbers[-1].strip()
    return phrase


def extract_answer(completion: str, *, fallback_last_number: bool = True) -> str | None:
    """The final answer stated in a completion, as a string, or ``None``.

    Order: last ``\\boxed{}``; last ``Answer:`` / ``answer is``; last ``#### N``; the last
    number in the text (if ``fallback_last_number``). Text from an unterminated
    ``\\boxed{`` onwards is ignored.
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    text = completion.replace("\u2212", "-")
    spans, dangling = _boxed_spans(text)
    if spans:
        start, end = spans[-1]
        boxed = text[start:end].strip()
        if boxed:
            return boxed
    if dangling is not None:
        text = text[:dangling]
    for regex in (_ANSWER_RE, _HASH_RE):
        matches = list(regex.finditer(text))
        for match in reversed(matches):
            answer = _clean_phrase(match.group(1))
            if answer:
                return answer
    if fallback_last_number:
        numbers = _NUMBER_RE.findall(text)
        if numbers:
            return numbers[-1].strip()
    return None


def extract_reference(answer: str) -> str:
    """The final answer of a reference solution.

    GSM8K references (``"...reasoning...\\n#### 1,234"``) give the text after the last
    ``####``; MATH references give the last ``\\boxed{}``; anything else is taken as the
    answer itself.

    Raises:
        ValueError: when no answer can be found (empty string, empty ``####`` or box).
    """
    if not isinstance(answer, str):
        raise TypeError(f"reference answer must be a str, got {type(answer).__name__}")
    if "####" in answer:
        result = answer.rsplit("####", 1)[1].strip()
    else:
        boxed = find_last_boxed(answer)
        result = boxed if boxed is not None else answer.strip()
    if not result:
        raise ValueError(f"reference answer has no final answer: {answer[:200]!r}")
    return result


# --------------------------------------------------------------------------------------
# Normalisation and comparison
# --------------------------------------------------------------------------------------


def _normalize(answer: str, percent_as_fraction: bool) -> str:
    """Canonical LaTeX-ish form of an extracted answer, ready for ``math_verify.parse``."""
    s = answer.replace("\u2212", "-").strip()
    for _ in range(3):
        before = s
        s = s.strip().rstrip(".").strip()
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if s.startswith(left) and s.endswith(right) and len(s) > len(left) + len(right):
                s = s[len(left) : len(s) - len(right)].strip()
        s = _CURRENCY_RE.sub("", s)
        if s.startswith("\\text{") and s.endswith("}") and s.count("{") == 1:
            inner = s[len("\\text{") : -1].strip()
            if _PERCENT_RE.match(inner) or _PLAIN_NUMBER_RE.match(inner):
                s = inner
        if s == before:
            break
    percent = _PERCENT_RE.match(s)
    if percent:
        number = percent.group(1).replace(",", "")
        return f"\\frac{{{number}}}{{100}}" if percent_as_fraction else number
    if _PLAIN_NUMBER_RE.match(s):
        return s.replace(",", "")
    return s


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
    gold = _normalize(reference, percent_as_fraction)
    target = _normalize(pred, percent_as_fraction)
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
