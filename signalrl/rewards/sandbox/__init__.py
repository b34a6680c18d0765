"""Run untrusted Python programs against tests in sandboxed, pooled subprocesses.

Parts, and the trust boundary
-----------------------------
Inside the sandbox runs only ``runner.py``, the **runner**: a standard-library-only script
that the host starts by file path (``python -I -S runner.py --serve``) and never imports,
so nothing of ``signalrl`` has to be importable, or visible, in the sandbox. The runner
forks the **test processes**, in which the untrusted program and its tests execute. The
runner trusts the jobs it reads from the host; the host trusts nothing that comes back:
it reads the runner's answers through :mod:`~signalrl.rewards.sandbox.process` with
deadlines and a byte cap, takes only lines that carry the check's random nonce, and
scores a test passed only when the runner says so.

On the host run the other modules:

* :mod:`~signalrl.rewards.sandbox.config`: the public data types (:class:`TestOutcome`,
  :class:`SandboxLimits`, the sandbox modes);
* :mod:`~signalrl.rewards.sandbox.bwrap`: the backends (bubblewrap and its command line,
  or the fallback without it), the once-per-process probe :func:`bwrap_status`, and the
  choice of backend for a sandbox mode;
* :mod:`~signalrl.rewards.sandbox.pool`: the pool of runners and the running of a check;
* :mod:`~signalrl.rewards.sandbox.process`: spawning a helper process, talking to it
  under a wall clock and killing its process group; shared with the math-verify worker
  pool of :mod:`signalrl.rewards.math`;
* this module: :func:`run_python_tests`, the entry point.

How a check runs
----------------
The host keeps a small pool of long-lived **sandboxed runners** (one per concurrent caller,
at most ``os.cpu_count()`` kept idle), started on first use and reused. Starting a sandbox
(bubblewrap, the interpreter, the runner's imports) costs tens of milliseconds; a reused
runner only forks. A check (one program and its tests) is sent to an idle runner through a
pipe; the runner forks **one process per test**, which executes the program and then that
test, each under its own resource limits and wall clock, so a test that hangs, crashes or
exhausts a limit only fails itself. Every test's result is sent back as soon as it is
known. If a runner dies (or stops answering), its in-flight test is scored ``killed`` (or
``timeout``) and the remaining tests are re-run in a fresh runner.

Layers of containment
---------------------
1. **bubblewrap** (``bwrap``), when it is installed and actually usable (user namespaces or
   root are required; this is probed once by running the real runner on a trivial job):
   a fresh root, remounted read-only, with read-only binds of ``/usr``, the libraries and
   the interpreter's prefix only (not the whole ``/``), private size-limited tmpfs ``/tmp``
   and working directory ``/work``, new PID/network/IPC/UTS namespaces (no network at all,
   not even the host's loopback), ``--die-with-parent --new-session``, and an empty
   environment except a minimal ``PATH``. As root the runner keeps only the capabilities
   it needs (set uid/gid, kill, and override file permissions to wipe the tmpfs).
2. **An unprivileged, per-check user id** when the host process is root (the usual case in
   containers): test processes ``setuid`` to a random high uid chosen for that check, so
   ``RLIMIT_NPROC`` really applies (the kernel never enforces it for uid 0), they cannot
   signal the runner or the host, cannot read other processes' ``/proc/<pid>/environ``
   and cannot write root-owned files.
3. **Resource limits** per test process: ``RLIMIT_CPU``, ``RLIMIT_AS`` (address space),
   ``RLIMIT_FSIZE`` (which also caps the captured output), ``RLIMIT_NPROC``,
   ``RLIMIT_NOFILE``, ``RLIMIT_MSGQUEUE`` = 0 (no POSIX message queues), no core files; a
   wall-clock limit after which the test's process group is killed; and a host-side wall
   clock that kills the whole runner if it stops answering.

Isolation between checks that share a runner
--------------------------------------------
After **every test** the runner kills every other process in its PID namespace
(``kill(-1)``; processes that escaped into their own session included). After **every
check** it then empties ``/tmp``, ``/work`` and ``/dev/shm``, removes all System V IPC
objects of its IPC namespace, and verifies that the writable parts of the sandbox (the
modes, owners and extended attributes of ``/``, ``/tmp``, ``/work``, ``/dev``, ``/dev/shm``
and the entries of ``/dev``) are exactly as they were when the runner started; if anything
cannot be removed or differs, the runner exits and a fresh sandbox replaces it. The runner
is not dumpable (``PR_SET_DUMPABLE`` 0), so even a test process with the runner's own uid
(bwrap without root) cannot ptrace it or open its ``/proc/<pid>/mem`` or pipes; it can only
kill it, which costs a restart and scores the in-flight test 0. The runner holds only the
current check; earlier programs and tests are not referenced (their bytes may remain in
freed memory, which a forked test process could read by introspection).

Without bubblewrap (``sandbox="none"``, or ``"auto"`` when bwrap is missing or unusable,
which logs a warning once) layers 2 and 3 still apply, plus a clean environment and a fresh
temporary working directory per check; leftover processes of the check's uid are killed
after every test and its System V IPC objects removed after every check. But there is **no
network or filesystem isolation**: the program can open sockets, read world-readable files
and leave files in world-writable host directories such as ``/tmp`` (where a later check
could find them). When the host is not root there is also no separate uid, so the program
could signal processes of the same user.
Use ``sandbox="required"`` to refuse running without bubblewrap.

A test counts as passed only when the harness, after executing the test to completion,
reports back with a random per-test token; exiting early (``sys.exit(0)``,
``os._exit(0)``) is an error, not a pass. The tests are passed to the runner through a
pipe, never written to disk, so the program cannot read them from a file. This is not a
defence against code that introspects the interpreter it runs in.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from signalrl.rewards.sandbox.bwrap import _Backend as _Backend
from signalrl.rewards.sandbox.bwrap import _fallback_backend as _fallback_backend
from signalrl.rewards.sandbox.bwrap import _resolve_backend, bwrap_status
from signalrl.rewards.sandbox.config import (
    SANDBOX_MODES,
    SandboxLimits,
    TestOutcome,
    TestStatus,
)
from signalrl.rewards.sandbox.config import SandboxMode as SandboxMode
from signalrl.rewards.sandbox.pool import _POOL as _POOL
from signalrl.rewards.sandbox.pool import _run_all, close_sandbox_pool
from signalrl.rewards.sandbox.pool import _Worker as _Worker

__all__ = [
    "SANDBOX_MODES",
    "SandboxLimits",
    "TestOutcome",
    "TestStatus",
    "bwrap_status",
    "close_sandbox_pool",
    "run_python_tests",
]


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

    The processes are forked by a pooled, sandboxed runner (see the module docstring for
    what is isolated from the host and between checks).

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
