"""Run untrusted Python programs against tests in a sandboxed subprocess.

This module is deliberately self-contained (standard library only): the same file is the
host-side API *and* the in-sandbox runner (``python -I sandbox.py``), so nothing of
``signalrl`` has to be importable inside the sandbox.

Layers of containment
---------------------
1. **bubblewrap** (``bwrap``), when it is installed and actually usable (user namespaces or
   root are required; this is probed once by running the real runner on a trivial job):
   a fresh root with read-only binds of ``/usr``, the libraries and the interpreter's
   prefix only (not the whole ``/``), private size-limited tmpfs ``/tmp`` and working
   directory ``/work``, new PID/network/IPC/UTS namespaces (no network at all, not even
   the host's loopback), ``--die-with-parent --new-session``, and an empty environment
   except a minimal ``PATH``.
2. **An unprivileged, per-run user id** when the host process is root (the usual case in
   containers): test processes ``setuid`` to a random high uid, so ``RLIMIT_NPROC``
   really applies (the kernel never enforces it for uid 0), they cannot signal the
   runner or the host, cannot read other processes' ``/proc/<pid>/environ`` and cannot
   write root-owned files. Leftover processes of that uid are swept with
   ``kill(-1, SIGKILL)`` issued *as that uid*.
3. **Resource limits** per test process: ``RLIMIT_CPU``, ``RLIMIT_AS`` (address space),
   ``RLIMIT_FSIZE`` (which also caps the captured output), ``RLIMIT_NPROC``,
   ``RLIMIT_NOFILE``, no core files; a wall-clock limit after which the test's process
   group is killed; and a host-side wall clock that kills the whole sandbox session.

Without bubblewrap (``sandbox="none"``, or ``"auto"`` when bwrap is missing or unusable,
which logs a warning once) layers 2 and 3 still apply, plus a clean environment and a
temporary working directory, but there is **no network or filesystem isolation**: the
program can open sockets and read world-readable files. When the host is not root there is
also no separate uid, so the program could signal processes of the same user.
Use ``sandbox="required"`` to refuse running without bubblewrap.

Each test runs in its own forked process (the program is executed again for every test),
so a test that hangs, crashes or exhausts a limit only fails itself. If the runner itself
dies, the remaining tests are re-run in a fresh sandbox.

A test counts as passed only when the harness, after executing the test to completion,
reports back with a random per-test token; exiting early (``sys.exit(0)``,
``os._exit(0)``) is an error, not a pass. The tests are passed to the runner through a
pipe, never written to disk, so the program cannot read them from a file. This is not a
defence against code that introspects the interpreter it runs in.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, cast

__all__ = [
    "SANDBOX_MODES",
    "SandboxLimits",
    "TestOutcome",
    "TestStatus",
    "bwrap_status",
    "run_python_tests",
]

logger = logging.getLogger(__name__)

TestStatus = Literal["passed", "failed", "error", "timeout", "killed"]
SandboxMode = Literal["auto", "required", "none"]
SANDBOX_MODES: tuple[str, ...] = ("auto", "required", "none")
_STATUSES = ("passed", "failed", "error", "timeout", "killed")

_DETAIL_CHARS = 1000
_OUTPUT_HEAD_BYTES = 600
_SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
# Random high uids for the unprivileged test processes (only used when the host is root).
_UID_BASE = 1_600_000_000
_UID_SPAN = 100_000_000
# Standard-library modules imported by the runner before it drops privileges when running
# without bubblewrap: the interpreter may live under a directory the sandbox uid cannot
# traverse (e.g. pyenv under /root), so later imports of these would fail.
_PREIMPORT = (
    "abc array base64 binascii bisect calendar cmath collections collections.abc contextlib "
    "copy csv dataclasses datetime decimal enum errno fractions functools glob hashlib heapq "
    "io itertools json locale math numbers operator pprint queue random re shlex socket "
    "statistics string struct textwrap time typing unicodedata uuid warnings weakref zlib"
).split()


@dataclass(frozen=True)
class TestOutcome:
    """The result of one test.

    Attributes:
        test: the test source (an ``assert`` statement, or the ``check`` program).
        passed: whether the test ran to completion without an exception.
        status: ``"passed"``; ``"failed"`` (an ``AssertionError``); ``"error"`` (any other
            exception, a syntax error, or the process exiting before the test finished);
            ``"timeout"`` (wall-clock or CPU limit); ``"killed"`` (terminated by a signal,
            e.g. a resource limit, or the sandbox died).
        detail: a short, truncated explanation (traceback tail, signal, output head).
    """

    __test__: ClassVar[bool] = False  # not a pytest test class

    test: str
    passed: bool
    status: TestStatus
    detail: str = ""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for each test process.

    Attributes:
        memory_bytes: ``RLIMIT_AS`` (virtual address space) per process.
        file_size_bytes: ``RLIMIT_FSIZE``; also caps the program's captured stdout/stderr.
        max_processes: ``RLIMIT_NPROC`` (processes and threads of the sandbox uid); only
            enforced for a non-root uid, i.e. under bwrap user namespaces or when the
            host is root and the sandbox drops to its own uid.
        max_open_files: ``RLIMIT_NOFILE``.
        cpu_seconds: ``RLIMIT_CPU`` per test; ``None`` means ``ceil(timeout) + 1``.
        tmpfs_bytes: size of each private tmpfs (``/tmp``, ``/work``) under bwrap.
        output_bytes: cap on the runner's own stdout/stderr read by the host.
    """

    memory_bytes: int = 1 << 30
    file_size_bytes: int = 16 << 20
    max_processes: int = 64
    max_open_files: int = 64
    cpu_seconds: float | None = None
    tmpfs_bytes: int = 64 << 20
    output_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "file_size_bytes", "max_processes", "max_open_files"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive int, got {value!r}")
        for name in ("tmpfs_bytes", "output_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive int, got {value!r}")
        if self.cpu_seconds is not None and not self.cpu_seconds > 0:
            raise ValueError(f"SandboxLimits.cpu_seconds must be > 0, got {self.cpu_seconds!r}")


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Backend:
    """How to launch the runner: with bwrap or not, and whether to drop to a private uid."""

    bwrap: str | None
    drop_uid: bool


def _world_accessible(path: str) -> bool:
    """Whether ``path`` and all its ancestors are traversable/readable by any user."""
    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & 0o005 == 0o005:
            return False
        while path != "/":
            path = os.path.dirname(path)
            if not os.stat(path).st_mode & 0o001:
                return False
    except OSError:
        return False
    return True


def _interpreter_accessible() -> bool:
    return all(_world_accessible(d) for d in _interpreter()[1])


_probe_lock = threading.Lock()
_probe_result: tuple[_Backend | None, str] | None = None
_fallback_result: tuple[_Backend | None, str] | None = None
_warned_fallback = False
_python_cache: dict[str, tuple[str, list[str]]] = {}


def _runner_path() -> str:
    return os.path.realpath(__file__)


def _interpreter() -> tuple[str, list[str]]:
    """The resolved base interpreter and the directories it needs (its prefixes)."""
    exe = os.path.realpath(sys.executable)
    cached = _python_cache.get(exe)
    if cached is not None:
        return cached
    candidates = [sys.base_prefix, sys.base_exec_prefix, os.path.dirname(exe)]
    venv_root = os.path.dirname(os.path.dirname(exe))
    if os.path.exists(os.path.join(venv_root, "pyvenv.cfg")):
        candidates.append(venv_root)
    dirs: list[str] = []
    for path in sorted({os.path.realpath(p) for p in candidates}, key=len):
        if not any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs):
            dirs.append(path)
    _python_cache[exe] = (exe, dirs)
    return exe, dirs


def _bwrap_argv(bwrap: str, limits: SandboxLimits, drop_uid: bool) -> list[str]:
    """bwrap arguments that expose only the system libraries and the interpreter."""
    argv = [bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net"]
    argv += ["--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--clearenv"]
    argv += ["--setenv", "PATH", _SANDBOX_PATH, "--setenv", "HOME", "/work"]
    argv += ["--setenv", "LANG", "C.UTF-8"]
    argv += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    for etc in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime"):
        argv += ["--ro-bind-try", etc, etc]
    _, dirs = _interpreter()
    made: set[str] = set()
    for path in dirs:
        if path == "/usr" or path.startswith("/usr/"):
            continue
        # bwrap creates missing parents with mode 0700, which the sandbox uid could not
        # traverse (e.g. /root for a pyenv interpreter): create them world-traversable.
        parts = path.strip("/").split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            parent = "/" + "/".join(parts[:depth])
            if parent not in made:
                made.add(parent)
                argv += ["--perms", "0755", "--dir", parent]
        argv += ["--ro-bind", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    size = str(limits.tmpfs_bytes)
    argv += ["--size", size, "--perms", "1777", "--tmpfs", "/tmp"]
    argv += ["--size", size, "--perms", "1777", "--tmpfs", "/work"]
    argv += ["--ro-bind", _runner_path(), "/sandbox/runner.py", "--chdir", "/work"]
    if drop_uid:
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    return argv


def _pick_uid() -> int:
    return _UID_BASE + random.SystemRandom().randrange(_UID_SPAN)


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


def _communicate(
    proc: subprocess.Popen[bytes], payload: bytes, deadline: float, cap: int
) -> tuple[bytes, bytes, bool]:
    """Feed stdin and read stdout/stderr (each capped at ``cap`` bytes, the rest drained and
    discarded) until the process exits or ``deadline`` passes. Does not reap the process.

    Returns (stdout, stderr, timed_out).
    """
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    readers = set(buffers)
    writer: int | None = proc.stdin.fileno()
    view = memoryview(payload)
    poller = select.poll()  # not select(): host fds may exceed FD_SETSIZE
    for fd in readers:
        os.set_blocking(fd, False)
        poller.register(fd, select.POLLIN)
    os.set_blocking(writer, False)
    poller.register(writer, select.POLLOUT)
    exited_at: float | None = None
    timed_out = False
    while readers or writer is not None:
        now = time.monotonic()
        if now >= deadline:
            timed_out = True
            break
        if exited_at is None and _has_exited(proc.pid):
            exited_at = now
        if exited_at is not None and now - exited_at > 0.5:
            break  # exited; something else still holds the pipes open
        try:
            events = poller.poll(max(1, int(min(deadline - now, 0.1) * 1000)))
        except InterruptedError:
            continue
        for fd, _ in events:
            if fd == writer:
                try:
                    view = view[os.write(writer, view[:65536]) :]
                except BlockingIOError:
                    pass
                except OSError:  # broken pipe: the runner died
                    view = view[len(view) :]
                if not len(view):
                    poller.unregister(writer)
                    proc.stdin.close()
                    writer = None
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                readers.discard(fd)
                poller.unregister(fd)
                continue
            buf = buffers[fd]
            if len(buf) < cap:
                buf += chunk[: cap - len(buf)]
    if writer is not None:
        proc.stdin.close()
    out = bytes(buffers[proc.stdout.fileno()])
    err = bytes(buffers[proc.stderr.fileno()])
    return out, err, timed_out


def _has_exited(pid: int) -> bool:
    """Whether ``pid`` has exited, without reaping it (so its pid cannot be reused yet)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _run_once(
    program: str,
    tests: Sequence[str],
    indices: Sequence[int],
    entry_point: str | None,
    timeout: float,
    limits: SandboxLimits,
    backend: _Backend,
) -> tuple[dict[int, TestOutcome], bool, str]:
    """Launch one runner for ``indices``. Returns (outcomes, host_timed_out, stderr)."""
    exe, _ = _interpreter()
    uid = _pick_uid() if backend.drop_uid else None
    nonce = secrets.token_hex(16)
    workdir: str | None = None
    env = {"PATH": _SANDBOX_PATH, "LANG": "C.UTF-8"}
    if backend.bwrap is not None:
        argv = [*_bwrap_argv(backend.bwrap, limits, backend.drop_uid), exe, "-I"]
        argv.append("/sandbox/runner.py")
        sandbox_workdir = "/work"
        sweep = "uid" if uid is not None else "ns"
        cwd = "/"
    else:
        workdir = tempfile.mkdtemp(prefix="signalrl-sandbox-")
        if uid is not None:
            os.chown(workdir, uid, uid)
        os.chmod(workdir, 0o700)
        argv = [exe, "-I", _runner_path()]
        sandbox_workdir = workdir
        sweep = "uid" if uid is not None else "none"
        cwd = workdir
        env["HOME"] = workdir
    job = {
        "nonce": nonce,
        "program": program,
        "tests": [tests[i] for i in indices],
        "indices": list(indices),
        "entry_point": entry_point,
        "timeout": timeout,
        "limits": asdict(limits),
        "uid": uid,
        "sweep": sweep,
        "preimport": backend.bwrap is None and uid is not None and not _interpreter_accessible(),
        "workdir": sandbox_workdir,
    }
    payload = json.dumps(job).encode()
    deadline = time.monotonic() + len(indices) * (timeout + 1.0) + 15.0
    stdout = stderr = b""
    timed_out = False
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
        stdout, stderr, timed_out = _communicate(proc, payload, deadline, limits.output_bytes)
        # Let a finishing sandbox exit on its own: killing bwrap while it is still reaping
        # its namespace's init would orphan that process (a zombie under some containers'
        # non-reaping PID 1).
        grace = min(deadline, time.monotonic() + 2.0)
        while not timed_out and not _has_exited(proc.pid) and time.monotonic() < grace:
            time.sleep(0.002)
    finally:
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream is not None:
                    stream.close()
        if uid is not None and backend.bwrap is None:
            _kill_uid(uid)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    outcomes: dict[int, TestOutcome] = {}
    prefix = nonce.encode() + b" "
    wanted = set(indices)
    for line in stdout.splitlines():
        if not line.startswith(prefix):
            continue
        try:
            record = json.loads(line[len(prefix) :])
            index = int(record["index"])
            status = str(record["status"])
            detail = str(record.get("detail", ""))
        except (ValueError, KeyError, TypeError):
            continue
        if index in wanted and status in _STATUSES:
            outcomes[index] = TestOutcome(
                tests[index], status == "passed", cast(TestStatus, status), _truncate(detail)
            )
    return outcomes, timed_out, stderr.decode("utf-8", "replace")


def _run_all(
    program: str,
    tests: Sequence[str],
    entry_point: str | None,
    timeout: float,
    limits: SandboxLimits,
    backend: _Backend,
) -> list[TestOutcome]:
    results: dict[int, TestOutcome] = {}
    pending = list(range(len(tests)))
    while pending:
        got, timed_out, stderr = _run_once(
            program, tests, pending, entry_point, timeout, limits, backend
        )
        results.update(got)
        remaining = [i for i in pending if i not in got]
        if not remaining:
            break
        # The runner processes tests in order: the first unreported one was in flight.
        first = remaining[0]
        if timed_out:
            status: TestStatus = "timeout"
            detail = "the sandbox exceeded its wall-clock limit and was killed"
        else:
            status = "killed"
            detail = "the sandbox runner died"
        if stderr.strip():
            detail += f"; stderr: {stderr.strip()[-_DETAIL_CHARS // 2 :]}"
        results[first] = TestOutcome(tests[first], False, status, _truncate(detail))
        pending = remaining[1:]
    return [results[i] for i in range(len(tests))]


def _probe(backend: _Backend) -> str | None:
    """Run a trivial job; returns None if it works, else the reason it does not."""
    try:
        outcomes = _run_all(
            "x = 1",
            ["assert x == 1", "assert x == 2"],
            None,
            20.0,
            SandboxLimits(),
            backend,
        )
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    statuses = [o.status for o in outcomes]
    if statuses == ["passed", "failed"]:
        return None
    return f"probe job gave {statuses}: {outcomes[0].detail or outcomes[1].detail}"


def bwrap_status() -> tuple[bool, str]:
    """Whether bubblewrap is installed and usable here, and a human-readable reason.

    The check runs the real runner under bwrap once per process (cached). As root it first
    tries the configuration that drops to a private uid, then one without it.
    """
    global _probe_result
    with _probe_lock:
        if _probe_result is None:
            exe = shutil.which("bwrap")
            if exe is None:
                _probe_result = (None, "bwrap is not installed (apt-get install bubblewrap)")
            else:
                reasons = []
                found: _Backend | None = None
                variants = [True, False] if os.geteuid() == 0 else [False]
                for drop in variants:
                    reason = _probe(_Backend(exe, drop))
                    if reason is None:
                        found = _Backend(exe, drop)
                        break
                    reasons.append(reason)
                if found is not None:
                    _probe_result = (found, f"bwrap usable ({exe}, private uid={found.drop_uid})")
                else:
                    _probe_result = (None, f"bwrap at {exe} is not usable: {reasons[-1]}")
        backend, reason = _probe_result
    return backend is not None, reason


def _fallback_backend() -> _Backend:
    """The no-bwrap backend; as root, prefer dropping to a private uid if that works."""
    global _fallback_result
    with _probe_lock:
        if _fallback_result is None:
            variants = [True, False] if os.geteuid() == 0 else [False]
            reasons: list[str] = []
            for drop in variants:
                reason = _probe(_Backend(None, drop))
                if reason is None:
                    _fallback_result = (_Backend(None, drop), "")
                    break
                reasons.append(reason)
            else:
                _fallback_result = (None, reasons[-1])
            backend = _fallback_result[0]
            if backend is not None and not backend.drop_uid and os.geteuid() == 0:
                logger.warning(
                    "signalrl sandbox: cannot drop to a private uid (%s); programs run as root "
                    "with resource limits only",
                    reasons[0],
                )
            _, dirs = _interpreter()
            if backend is not None and backend.drop_uid and not _interpreter_accessible():
                logger.warning(
                    "signalrl sandbox: the interpreter under %s is not accessible to the "
                    "unprivileged sandbox uid; without bubblewrap, programs can only import "
                    "the standard-library modules the runner pre-imports.",
                    ", ".join(dirs),
                )
        backend, reason = _fallback_result
    if backend is None:
        raise RuntimeError(f"the fallback sandbox (no bwrap) does not work here: {reason}")
    return backend


def _resolve_backend(sandbox: str) -> _Backend:
    global _warned_fallback
    if sandbox not in SANDBOX_MODES:
        raise ValueError(f"sandbox must be one of {SANDBOX_MODES}, got {sandbox!r}")
    if sandbox == "none":
        return _fallback_backend()
    ok, reason = bwrap_status()
    if ok:
        assert _probe_result is not None and _probe_result[0] is not None
        return _probe_result[0]
    if sandbox == "required":
        raise RuntimeError(f"sandbox='required' but bubblewrap cannot be used: {reason}")
    with _probe_lock:
        warn, _warned_fallback = not _warned_fallback, True
    if warn:
        logger.warning(
            "signalrl sandbox: %s; falling back to resource limits, a clean environment and a "
            "temporary directory (no network or filesystem isolation). Pass "
            "sandbox='required' to refuse this.",
            reason,
        )
    return _fallback_backend()


def run_python_tests(
    program: str,
    tests: Sequence[str],
    *,
    entry_point: str | None = None,
    timeout: float = 5.0,
    sandbox: str = "auto",
    limits: SandboxLimits | None = None,
) -> list[TestOutcome]:
    """Run ``program`` followed by each test in its own sandboxed process.

    Args:
        program: Python source defining the solution.
        tests: test sources. Without ``entry_point`` each one is executed in the program's
            namespace (e.g. ``"assert add(1, 2) == 3"``). With ``entry_point`` there must be
            exactly one test, defining ``check(candidate)``, which is called with the
            program's ``entry_point`` object (HumanEval convention).
        entry_point: name of the function passed to ``check``.
        timeout: wall-clock seconds allowed per test (the program runs again for each).
        sandbox: ``"auto"`` (bwrap if usable, else the fallback with a one-time warning),
            ``"required"`` (bwrap or ``RuntimeError``) or ``"none"`` (the fallback).
        limits: resource limits; defaults to :class:`SandboxLimits`.

    Returns:
        one :class:`TestOutcome` per test, in order.
    """
    if not isinstance(program, str):
        raise TypeError(f"program must be a str, got {type(program).__name__}")
    if isinstance(tests, str) or not isinstance(tests, Sequence):
        raise TypeError(f"tests must be a sequence of str, got {type(tests).__name__}")
    for i, test in enumerate(tests):
        if not isinstance(test, str):
            raise TypeError(f"tests[{i}] must be a str, got {type(test).__name__}")
    if not tests:
        raise ValueError("tests is empty: nothing to run")
    if entry_point is not None:
        if not isinstance(entry_point, str) or not entry_point.isidentifier():
            raise ValueError(f"entry_point must be a Python identifier, got {entry_point!r}")
        if len(tests) != 1:
            raise ValueError("with entry_point, tests must hold exactly one check() program")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"the code sandbox needs Linux, this is {sys.platform}")
    limits = limits if limits is not None else SandboxLimits()
    backend = _resolve_backend(sandbox)
    return _run_all(program, list(tests), entry_point, float(timeout), limits, backend)


def _truncate(text: str, limit: int = _DETAIL_CHARS) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2 - 10
    return f"{text[:half]} ...[truncated]... {text[-half:]}"


# --------------------------------------------------------------------------------------
# Sandbox side: ``python -I sandbox.py`` reads a JSON job on stdin.
# --------------------------------------------------------------------------------------


def _drop_privileges(uid: int | None) -> None:
    if uid is None:
        return
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _set_child_limits(limits: dict[str, Any], timeout: float) -> None:
    import math
    import resource

    cpu = limits.get("cpu_seconds") or (math.ceil(timeout) + 1)
    cpu = max(1, math.ceil(cpu))
    settings = [
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, limits["memory_bytes"], limits["memory_bytes"]),
        (resource.RLIMIT_FSIZE, limits["file_size_bytes"], limits["file_size_bytes"]),
        (resource.RLIMIT_NOFILE, limits["max_open_files"], limits["max_open_files"]),
        (resource.RLIMIT_NPROC, limits["max_processes"], limits["max_processes"]),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    for which, soft, hard in settings:
        try:
            _, old_hard = resource.getrlimit(which)
            if old_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, old_hard), min(hard, old_hard)
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass


def _prctl(option: int, arg: int) -> None:
    """Call prctl(2) through ctypes (Linux, best effort)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)
    except Exception:  # noqa: BLE001 - purely defensive
        pass


_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _child_main(job: dict[str, Any], position: int, report_fd: int, token: str) -> None:
    """Forked test process: run the program, then one test; report via ``report_fd``."""
    import builtins
    import linecache
    import traceback
    import types

    os.setpgid(0, 0)
    workdir = job["workdir"]
    os.chdir(workdir)
    _drop_privileges(job["uid"])
    # Die with the runner. Set after the uid change, which clears the setting.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # Created after dropping privileges, so the program may read its own output.
    out_path = os.path.join(workdir, f".output-{position}")
    try:
        os.unlink(out_path)
    except OSError:
        pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    out_fd = os.open(out_path, flags, 0o600)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.closerange(3, report_fd)  # also closes null_fd/out_fd (they are not report_fd)
    os.closerange(report_fd + 1, 1 << 16)
    _set_child_limits(job["limits"], job["timeout"])

    # Keep private references: the program may monkeypatch modules before we report.
    _exec, _compile, _write, _exit = builtins.exec, builtins.compile, os.write, os._exit
    _dumps, _format = json.dumps, traceback.format_exception

    def report(status: str, detail: str = "") -> None:
        message = _dumps({"status": status, "detail": _truncate(detail)})
        data = (token + " " + message + "\n").encode("utf-8", "replace")
        try:
            _write(report_fd, data)
        finally:
            _exit(0)

    def describe(exc: BaseException) -> str:
        tb = exc.__traceback__
        if tb is not None and tb.tb_frame.f_code is _child_main.__code__:
            tb = tb.tb_next  # hide the harness frame
        try:
            return "".join(_format(type(exc), exc, tb))[-_DETAIL_CHARS:]
        except BaseException:  # noqa: BLE001 - user exceptions may have broken __str__
            return type(exc).__name__

    test = job["tests"][position]
    entry_point = job["entry_point"]
    for name, source in (("<solution>", job["program"]), ("<test>", test)):
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    module = types.ModuleType("solution")
    module.__dict__["__builtins__"] = builtins
    sys.modules["solution"] = module
    sys.argv = ["solution"]
    namespace = module.__dict__
    try:
        _exec(_compile(job["program"], "<solution>", "exec"), namespace)
    except BaseException as exc:  # noqa: BLE001 - SystemExit etc. are errors too
        report("error", "the program raised while loading:\n" + describe(exc))
    try:
        _exec(_compile(test, "<test>", "exec"), namespace)
        if entry_point is not None:
            check = namespace.get("check")
            if not callable(check):
                report("error", "the test program does not define check(candidate)")
            if entry_point not in namespace:
                report("error", f"the program does not define {entry_point!r}")
            check(namespace[entry_point])
    except AssertionError as exc:
        report("failed", describe(exc))
    except BaseException as exc:  # noqa: BLE001
        report("error", describe(exc))
    report("passed")


def _sweep(uid: int | None, mode: str) -> None:
    """Kill leftover processes of a finished test (see module docstring)."""
    if mode == "uid" and uid is not None:
        pid = os.fork()
        if pid == 0:
            try:
                _drop_privileges(uid)
                for _ in range(200):
                    try:
                        os.kill(-1, signal.SIGKILL)
                    except ProcessLookupError:
                        break
                    except PermissionError:
                        break
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    elif mode == "ns" and os.getpid() != 1:
        # Inside our own PID namespace: -1 reaches everything but init and ourselves.
        for _ in range(200):
            try:
                os.kill(-1, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                break
            _reap_all()
    _reap_all()


def _reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _wait_child(
    pid: int, report_fd: int, token: str, timeout: float
) -> tuple[str | None, str, int | None]:
    """Wait for a test process. Returns (reported status or None, detail, wait status)."""
    deadline = time.monotonic() + timeout
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    os.set_blocking(report_fd, False)
    buf = bytearray()
    exited = False
    report_open = True
    try:
        while True:
            if _has_exited(pid):  # not reaped yet, so its process group id stays ours
                exited = True
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            poller = select.poll()
            if report_open:
                poller.register(report_fd, select.POLLIN)
            if pidfd is not None:
                poller.register(pidfd, select.POLLIN)
            try:
                events = poller.poll(max(1, int(min(remaining, 0.05) * 1000)))
            except InterruptedError:
                continue
            if any(fd == report_fd for fd, _ in events) and _drain(report_fd, buf):
                report_open = False  # EOF: stop polling it
    finally:
        if pidfd is not None:
            os.close(pidfd)
    # Kill the test's whole process group (on timeout, or stragglers after it exited).
    for target in (-pid, pid):
        try:
            os.kill(target, signal.SIGKILL)
        except OSError:
            pass
    _, status = os.waitpid(pid, 0)
    wait_status = status if exited else None
    _drain(report_fd, buf)
    prefix = (token + " ").encode()
    for line in bytes(buf).splitlines():
        if line.startswith(prefix):
            try:
                record = json.loads(line[len(prefix) :])
                return str(record["status"]), str(record.get("detail", "")), wait_status
            except (ValueError, KeyError, TypeError):
                break
    return None, "", wait_status


def _drain(fd: int, buf: bytearray, cap: int = 1 << 16) -> bool:
    """Read what is available from non-blocking ``fd`` into ``buf``; True at end of file."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        if not chunk:
            return True
        if len(buf) < cap:
            buf += chunk[: cap - len(buf)]


def _output_head(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)  # not a FIFO/device planted there
        head = os.read(fd, _OUTPUT_HEAD_BYTES) if regular else b""
    except OSError:
        head = b""
    finally:
        os.close(fd)
    return head.decode("utf-8", "replace").strip()


def _classify(
    reported: str | None, detail: str, wait_status: int | None, timeout: float, output: str
) -> tuple[str, str]:
    if reported in ("passed", "failed", "error"):
        return reported, detail
    if wait_status is None:
        status, detail = "timeout", f"exceeded the {timeout:g} s wall-clock limit"
    elif os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        if sig == signal.SIGXCPU:
            status, detail = "timeout", "exceeded the CPU time limit (SIGXCPU)"
        elif sig == signal.SIGXFSZ:
            status, detail = "killed", "exceeded the file/output size limit (SIGXFSZ)"
        else:
            status, detail = "killed", f"killed by {name}"
    else:
        code = os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status) else wait_status
        status, detail = "error", f"the process exited (status {code}) before the test finished"
    if output:
        detail += f"; output: {output}"
    return status, detail


def _runner_main() -> int:
    """Entry point inside the sandbox: run each test of the job on stdin, print outcomes."""
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    nonce: str = job["nonce"]
    uid: int | None = job["uid"]
    timeout = float(job["timeout"])
    if job.get("preimport"):
        import importlib

        for name in _PREIMPORT:
            try:
                importlib.import_module(name)
            except ImportError:
                pass
    # Pre-import what the test processes need (they may lose access to the stdlib dir).
    import ctypes  # noqa: F401
    import linecache  # noqa: F401
    import math  # noqa: F401
    import resource
    import traceback  # noqa: F401
    import types  # noqa: F401

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Orphans of the test processes are re-parented to us, so we can reap them.
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    out = sys.stdout
    for position, index in enumerate(job["indices"]):
        report_r, report_w = os.pipe()
        token = secrets.token_hex(16)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(report_r)
                _child_main(job, position, report_w, token)
            finally:
                os._exit(70)
        os.close(report_w)
        try:
            reported, detail, wait_status = _wait_child(pid, report_r, token, timeout)
        finally:
            os.close(report_r)
        _sweep(uid, job["sweep"])
        out_path = os.path.join(job["workdir"], f".output-{position}")
        output = "" if reported == "passed" else _output_head(out_path)
        try:
            os.unlink(out_path)
        except OSError:
            pass
        status, detail = _classify(reported, detail, wait_status, timeout, output)
        record = json.dumps({"index": index, "status": status, "detail": _truncate(detail)})
        out.write(f"{nonce} {record}\n")
        out.flush()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(_runner_main())
    except BrokenPipeError:  # the host went away
        sys.exit(1)
