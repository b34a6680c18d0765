"""The pool of long-lived sandboxed runners, and running one check on it.

A check (one program and its tests) goes to an idle runner of the right backend, as two
framed JSON messages on the runner's stdin: the job (program and settings), which the
runner reads, and the tests, which only the check's harness reads (see ``runner.py``); the
runner answers one line per test as soon as it is known. The host side of that
conversation, its deadlines and the killing of a runner that stops answering are the shared
helper-process code of :mod:`signalrl.rewards.sandbox.process`. Each runner lives in a
memory cgroup of its own where the host has them (:mod:`~signalrl.rewards.sandbox.cgroup`);
a test during which its OOM killer struck scores ``killed``. A runner whose check did not
end cleanly is not reused; when one dies mid-check, its in-flight test is scored ``killed``
(or ``timeout``) and the remaining tests are re-run in a fresh runner (:func:`_run_all`).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, cast

from signalrl.rewards.sandbox import cgroup, process
from signalrl.rewards.sandbox.config import (
    _DETAIL_CHARS,
    _STATUSES,
    SandboxLimits,
    TestOutcome,
    TestStatus,
    _truncate,
)

if TYPE_CHECKING:
    from signalrl.rewards.sandbox.bwrap import _Backend

logger = logging.getLogger(__name__)

# Random high uids for the unprivileged test processes (only used when the host is root).
_UID_BASE = 1_600_000_000
_UID_SPAN = 100_000_000
# Host-side patience beyond a test's own wall-clock limit (the runner kills and sweeps),
# and extra patience for a runner that is still starting (bwrap, interpreter, imports).
_SLACK_S = 5.0
_STARTUP_S = 15.0
# How long a runner that was told to stop (or has died) may take to exit before SIGKILL.
_EXIT_GRACE_S = 2.0
# How long to wait for the last words (stderr) of a runner that died.
_LAST_WORDS_S = 0.5
# Idle runners kept per sandbox configuration (more run while more threads check code).
_MAX_IDLE = max(2, os.cpu_count() or 1)


def _pick_uid(avoid: int | None = None) -> int:
    """A random high uid (not ``avoid``)."""
    while True:
        uid = _UID_BASE + random.SystemRandom().randrange(_UID_SPAN)
        if uid != avoid:
            return uid


def _proc_uids() -> dict[int, set[int]]:
    """Map real/effective/saved uid -> pids, read from /proc (Linux only)."""
    owners: dict[int, set[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return owners
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if line.startswith("Uid:"):
                        for uid in {int(x) for x in line.split()[1:4]}:
                            owners.setdefault(uid, set()).add(int(name))
                        break
        except (OSError, ValueError):
            continue
    return owners


def _kill_uid(uid: int) -> None:
    """SIGKILL every process owned by ``uid`` (host side, root only; best effort)."""
    for _ in range(50):
        pids = _proc_uids().get(uid, set())
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


@dataclass
class _Reply:
    """What a runner said about one check."""

    outcomes: dict[int, tuple[str, str]] = field(default_factory=dict)
    acked: bool = False  # the runner read the job (so any later death is the program's)
    done: bool = False  # the runner finished the check
    clean: bool = False  # ... and verified the sandbox is pristine again
    died: bool = False  # the runner exited (or flooded its output) before finishing
    timed_out: bool = False  # the runner stopped answering and was killed
    stderr: str = ""


class _Worker:
    """One long-lived runner process (a bwrap sandbox, or the fallback) and its pipes."""

    def __init__(self, backend: _Backend, tmpfs_bytes: int, budget: int) -> None:
        # The uid of the runner's harness (the programs get one per check).
        self.harness_uid = _pick_uid() if backend.drop_uid else None
        argv, env, fds = backend.runner_command(tmpfs_bytes, self.harness_uid)
        self.key = (backend, tmpfs_bytes, budget)
        self.fresh = True
        self.cgroup = cgroup.create(budget)
        if self.cgroup is not None:
            argv = self.cgroup.wrap(argv)
        try:
            self.proc = _SPAWNER.spawn(argv, env=env, cwd="/", pass_fds=fds)
        except BaseException:
            if self.cgroup is not None:
                self.cgroup.remove()
            raise
        self.channel = process.Channel(self.proc)

    def alive(self) -> bool:
        return self.channel.alive()

    def run(self, job: dict[str, Any], tests: dict[str, Any], timeout: float, cap: int) -> _Reply:
        """Send one check and collect the runner's records until it says it is done."""
        reply = _Reply()
        frames = b""
        for message in (job, tests):
            payload = json.dumps(message).encode()
            frames += b"%d\n" % len(payload) + payload
        prefix = job["nonce"].encode() + b" "
        patience = timeout + _SLACK_S + (_STARTUP_S if self.fresh else 0.0)
        self.fresh = False
        oom_kills = self.cgroup.oom_kills() if self.cgroup is not None else -1
        self.channel.send(frames, reply_cap=cap)
        deadline = time.monotonic() + patience
        note = b""
        try:
            while not reply.done:
                index = self._record(self.channel.read_line(deadline), prefix, reply)
                if index is not None:
                    deadline = time.monotonic() + timeout + _SLACK_S
                    oom_kills = self._blame_oom(index, oom_kills, reply)
        except process.ChildTimeout:
            reply.timed_out = True
        except process.ChildClosed as exc:
            reply.died = True
            if isinstance(exc, process.OutputCapExceeded):
                note = b"[the runner's output exceeded the cap]"
        err = self.channel.take_stderr() + note
        if reply.died or reply.timed_out:
            err += self.channel.drain_stderr(_LAST_WORDS_S) if reply.died else b""
            if self.cgroup is not None and self.cgroup.oom_kills() > oom_kills >= 0:
                err += b"; " + self._oom_detail().encode()
        reply.stderr = err.decode("utf-8", "replace")
        return reply

    def _oom_detail(self) -> str:
        assert self.cgroup is not None
        return (
            f"exceeded the memory budget of the check ({self.cgroup.limit >> 20} MiB): "
            "the OOM killer ended a process"
        )

    def _blame_oom(self, index: int, before: int, reply: _Reply) -> int:
        """Score test ``index`` killed if the cgroup's OOM killer struck during it."""
        if self.cgroup is None or before < 0:
            return before
        now = self.cgroup.oom_kills()
        if now > before:
            status, detail = reply.outcomes[index]
            reply.outcomes[index] = ("killed", f"{self._oom_detail()} ({status}: {detail})")
        return now

    @staticmethod
    def _record(line: bytes, prefix: bytes, reply: _Reply) -> int | None:
        """Parse one line of the runner; the test's index when it reported one."""
        if not line.startswith(prefix):
            return None
        try:
            record = json.loads(line[len(prefix) :])
        except ValueError:
            return None
        if not isinstance(record, dict):
            return None
        if record.get("ack"):
            reply.acked = True
        elif "done" in record:
            reply.done, reply.clean = True, bool(record.get("clean"))
        elif record.get("status") in _STATUSES and isinstance(record.get("index"), int):
            reply.outcomes[record["index"]] = (record["status"], str(record.get("detail", "")))
            return int(record["index"])
        return None

    def close(self, graceful: bool = True) -> None:
        """Stop the runner: let it exit on end of input (``graceful``), else SIGKILL it.

        Letting bwrap exit on its own avoids orphaning its namespace's init process while it
        is still being reaped (a zombie under some containers' non-reaping PID 1).
        """
        self.channel.stop(grace_s=_EXIT_GRACE_S if graceful else 0.0)
        if self.cgroup is not None:
            self.cgroup.remove()

    def end_input(self) -> None:
        """Close the runner's stdin: it exits after the check in progress, if any."""
        self.channel.end_input()


class _Pool:
    """Idle runners per (backend, tmpfs size), reused across checks and threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[tuple[_Backend, int, int], list[_Worker]] = {}
        self._live: set[_Worker] = set()
        self.started = 0  # runners started so far (the tests look at it)

    def acquire(self, backend: _Backend, tmpfs_bytes: int, budget: int) -> _Worker:
        """An idle runner for ``backend`` (and tmpfs size and memory budget), or a new one."""
        dead: list[_Worker] = []
        worker: _Worker | None = None
        with self._lock:
            idle = self._idle.get((backend, tmpfs_bytes, budget), [])
            while idle:
                candidate = idle.pop()
                if candidate.alive():
                    worker = candidate
                    break
                dead.append(candidate)
                self._live.discard(candidate)
        for w in dead:
            w.close(graceful=False)
        if worker is not None:
            return worker
        worker = _Worker(backend, tmpfs_bytes, budget)
        with self._lock:
            self.started += 1
            self._live.add(worker)
        return worker

    def release(self, worker: _Worker) -> None:
        """Return a healthy runner; beyond one idle runner per core, stop it."""
        with self._lock:
            idle = self._idle.setdefault(worker.key, [])
            if len(idle) < _MAX_IDLE:
                idle.append(worker)
                return
            self._live.discard(worker)
        worker.close()

    def discard(self, worker: _Worker, graceful: bool) -> None:
        """Stop a runner that must not be reused."""
        with self._lock:
            self._live.discard(worker)
        worker.close(graceful=graceful)

    def close_all(self, backend: _Backend | None = None) -> None:
        """Stop the idle runners (of ``backend``, or all)."""
        with self._lock:
            keys = [k for k in self._idle if backend is None or k[0] == backend]
            workers = [w for k in keys for w in self._idle.pop(k)]
            for w in workers:
                self._live.discard(w)
        for w in workers:  # end of input for all first, so they exit in parallel
            w.end_input()
        for w in workers:
            w.close(graceful=True)

    def after_fork_in_child(self) -> None:
        """In a forked host process: forget (never signal) the parent's runners."""
        self._lock = threading.Lock()
        for w in list(self._live):
            w.channel.close_fds()
            w.cgroup = None  # the parent's to remove
        self._idle, self._live = {}, set()


_SPAWNER = process.Spawner("signalrl-sandbox-spawner")
_POOL = _Pool()


def _after_fork_in_child() -> None:
    global _SPAWNER
    _SPAWNER = process.Spawner("signalrl-sandbox-spawner")
    _POOL.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def close_sandbox_pool() -> None:
    """Stop the idle sandboxed runners kept for reuse (they restart on demand).

    Runners also stop when the process exits (``bwrap --die-with-parent``, and at exit).
    """
    _POOL.close_all()


atexit.register(close_sandbox_pool)


def _run_on_worker(
    program: str,
    tests: Sequence[str],
    indices: Sequence[int],
    entry_point: str | None,
    timeout: float,
    limits: SandboxLimits,
    backend: _Backend,
) -> tuple[_Reply, bool]:
    """Run ``indices`` on a pooled runner. Returns (reply, whether the runner was fresh)."""
    worker = _POOL.acquire(backend, limits.tmpfs_bytes, limits.memory_budget_bytes)
    fresh = worker.fresh
    uid = _pick_uid(worker.harness_uid) if backend.drop_uid else None
    workdir: str | None = None
    if backend.bwrap is not None:
        sandbox_workdir, sweep = "/work", "ns"
    else:
        workdir = sandbox_workdir = tempfile.mkdtemp(prefix="signalrl-sandbox-")
        if uid is not None:
            os.chown(workdir, uid, uid)
        os.chmod(workdir, 0o700)
        sweep = "uid" if uid is not None else "none"
    settings = asdict(limits)
    settings["nproc"] = limits.process_limit(worker.cgroup is not None)
    job = {
        "nonce": secrets.token_hex(16),
        "program": program,
        "indices": list(indices),
        "timeout": timeout,
        "limits": settings,
        "uid": uid,
        "sweep": sweep,
        "isolated": backend.bwrap is not None,
        "workdir": sandbox_workdir,
    }
    # Read by the check's harness only, never by the runner (see runner.py).
    frame: dict[str, Any] = {
        "tests": [tests[i] for i in indices],
        "entry_point": entry_point,
        "indices": list(indices),
    }
    reply = _Reply(died=True)
    try:
        reply = worker.run(job, frame, timeout, limits.output_bytes)
    finally:
        if reply.done and reply.clean:
            _POOL.release(worker)
        else:
            _POOL.discard(worker, graceful=not reply.timed_out)
            if uid is not None and backend.bwrap is None:
                _kill_uid(uid)
                _kill_uid(cast(int, worker.harness_uid))
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    if not reply.acked and worker.proc.returncode == cgroup.JOIN_FAILED:
        cgroup.disable("a runner could not join its memory cgroup")
        logger.warning("signalrl sandbox: runners cannot join their memory cgroup; not using one")
        fresh = False  # not the program's fault: run it again
    return reply, fresh


def _run_all(
    program: str,
    tests: Sequence[str],
    entry_point: str | None,
    timeout: float,
    limits: SandboxLimits,
    backend: _Backend,
) -> list[TestOutcome]:
    """Run every test, on as many runners as it takes; one outcome per test, in order."""
    results: dict[int, TestOutcome] = {}
    pending = list(range(len(tests)))
    while pending:
        reply, fresh = _run_on_worker(
            program, tests, pending, entry_point, timeout, limits, backend
        )
        for index, (verdict, detail) in reply.outcomes.items():
            if index in pending:
                results[index] = TestOutcome(
                    tests[index], verdict == "passed", cast(TestStatus, verdict), _truncate(detail)
                )
        remaining = [i for i in pending if i not in results]
        if not remaining:
            break
        if not reply.acked and not fresh:
            # A reused runner that died while idle never saw the job: not the program's
            # fault, so run it again on another runner (a fresh one at the latest).
            pending = remaining
            continue
        if reply.done and len(remaining) < len(pending):
            # The check's harness died (the runner reported the test it was on): run the
            # others again.
            pending = remaining
            continue
        # The runner processes tests in order: the first unreported one was in flight.
        first = remaining[0]
        if reply.timed_out:
            status: TestStatus = "timeout"
            detail = "the sandbox exceeded its wall-clock limit and was killed"
        elif reply.done:
            status, detail = "error", "the sandbox's test harness ended before this test"
        else:
            status = "killed"
            detail = "the sandbox runner died"
        if reply.stderr.strip():
            detail += f"; stderr: {reply.stderr.strip()[-_DETAIL_CHARS // 2 :]}"
        results[first] = TestOutcome(tests[first], False, status, _truncate(detail))
        pending = remaining[1:]
    return [results[i] for i in range(len(tests))]
