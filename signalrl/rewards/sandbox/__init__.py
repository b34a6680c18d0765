"""Run untrusted Python programs against tests in sandboxed, pooled subprocesses.

The trust boundary
------------------
The program and its tests never share a process. Per check, inside one sandbox:

* the **runner** (``runner.py``) is the sandbox's long-lived process. It reads the job (the
  program and the settings) from the host, forks the processes below, keeps the clock and
  cleans up. It **never reads a test**, nor anything derived from one (a failing test's
  traceback quotes the test): the host puts the tests on the runner's stdin behind the job,
  and only the harness reads them and reports on them.
* the **harness** (``harness.py``, forked by the runner once, before its first job, and
  reused for its checks) is trusted code. It runs each test in a fresh namespace, in which
  every name the program defines is a proxy. Calling one sends the arguments, as plain
  data, to the program's process and returns its answer, decoded into builtin values only
  (``int``, ``float``, ``complex``, ``str``, ``bytes``, ``bytearray``, ``bool``, ``None``,
  and ``list``, ``tuple``, ``dict``, ``set``, ``frozenset``, ``range`` of them). So
  ``assert add(1, 2) == 3`` (MBPP) and ``check(candidate)`` (HumanEval) compare real builtin
  values where only trusted code runs. No object, frame or ``__eq__`` of the program
  crosses over; a program exception arrives as the builtin exception class it derives
  from. The harness alone writes each test's status to the host. As root it runs as a
  private uid of its own, not dumpable.
* the **program process** (one per test, forked by the runner) runs the program and
  answers calls, and holds nothing else of value: no test, no report channel (it keeps only
  its socket to the harness), no way to reach the harness (another uid, not dumpable). So
  walking frames, ``gc.get_objects()``, patching builtins or ``sys.modules``, scanning its
  own memory, exiting early, printing a fake status, objects equal to everything or
  subclassing the expected type (sent as the builtin value inside them) all fail: a
  value that is not plain data, a malformed answer or an ended process fails the test,
  whatever the test does with the exception.

The host trusts nothing that comes back: it reads the runner's answers through
:mod:`~signalrl.rewards.sandbox.process` with deadlines and a byte cap, takes only lines
that carry the check's random nonce, and scores a test passed only when the harness said
so. What the program can still do is be right: it sees the arguments of the calls the
tests make, and the helper functions a HumanEval test calls (``poly`` in
``find_zero``'s check) are the program's own.

On the host run the other modules:

* :mod:`~signalrl.rewards.sandbox.config`: the public data types (:class:`TestOutcome`,
  :class:`SandboxLimits`, the sandbox modes);
* :mod:`~signalrl.rewards.sandbox.bwrap`: the backends (bubblewrap and its command line,
  or the fallback without it), the once-per-process probe :func:`bwrap_status`, and the
  choice of backend for a sandbox mode;
* :mod:`~signalrl.rewards.sandbox.userns` and :mod:`~signalrl.rewards.sandbox.cgroup`: the
  user namespace without user namespaces, and the memory cgroups, the runners start in;
* :mod:`~signalrl.rewards.sandbox.pool`: the pool of runners and the running of a check;
* :mod:`~signalrl.rewards.sandbox.process`: spawning a helper process, talking to it
  under a wall clock and killing its process group; shared with the math-verify worker
  pool of :mod:`signalrl.rewards.math`;
* this module: :func:`run_python_tests`, the entry point.

The three files that run inside the sandbox (``runner.py``, ``harness.py``, ``sweep.py``)
use the standard library only and are started or loaded by path, never imported.

How a check runs
----------------
The host keeps a small pool of long-lived **sandboxed runners** (one per concurrent caller,
at most ``os.cpu_count()`` kept idle), started on first use and reused. Starting a sandbox
(bubblewrap, the interpreter, the runner's imports) costs tens of milliseconds; a reused
runner only forks. A check (one program and its tests) is sent to an idle runner through a
pipe; the runner's harness reads the tests and runs them, and for each test the runner
forks one program process, which runs the program and answers the harness's calls under its
own resource limits and wall clock, so a test that hangs, crashes or exhausts a limit only
fails itself. Every test's
result is sent back as soon as it is known. If a runner dies (or stops answering), its
in-flight test is scored ``killed`` (or ``timeout``) and the remaining tests are re-run in
a fresh runner.

Layers of containment
---------------------
1. **bubblewrap** (``bwrap``), when it is installed and actually usable (user namespaces or
   root are required; this is probed once by running the real runner on a trivial job):
   a fresh root, remounted read-only, with read-only binds of ``/usr``, the libraries and
   the interpreter's prefix only (not the whole ``/``), private size-limited tmpfs ``/tmp``
   and working directory ``/work``, a ``/dev`` of the usual devices only, new
   PID/network/IPC/UTS namespaces (no network at all, not even the host's loopback),
   ``--die-with-parent --new-session``, and an empty environment except a minimal
   ``PATH``. No user namespace can be created inside (``unshare(CLONE_NEWUSER)`` fails):
   bwrap's ``--unshare-user --disable-userns``, or as root (where the program runs as a
   private uid, more than ``--unshare-user`` maps) a user namespace that maps every uid to
   itself and allows no nested one; bwrap checks it (``--assert-userns-disabled``), and
   :func:`bwrap_status` says when this bwrap cannot. As root the runner keeps only the
   capabilities it needs (set uid/gid, kill, and override file permissions to wipe the
   tmpfs).
2. **An unprivileged, per-check user id** when the host process is root (the usual case in
   containers): program processes ``setuid`` to a random high uid chosen for that check
   (and the harness to another), so ``RLIMIT_NPROC`` really applies (the kernel never
   enforces it for uid 0), they cannot signal the runner, the harness or the host, cannot
   read other processes' ``/proc/<pid>/environ`` and cannot write root-owned files.
3. **Resource limits** per program process: ``RLIMIT_CPU``, ``RLIMIT_AS`` (address space),
   ``RLIMIT_FSIZE`` (which also caps the captured output), ``RLIMIT_NPROC``,
   ``RLIMIT_NOFILE``, ``RLIMIT_MSGQUEUE`` = 0 (no POSIX message queues), no core files,
   ``PR_SET_NO_NEW_PRIVS``; a wall-clock limit after which the test's process group is
   killed; and a host-side wall clock that kills the whole runner if it stops answering.
4. **A memory budget per check** (:attr:`SandboxLimits.memory_budget_bytes`, 1 GiB by
   default): the memory of all the check's processes together, not of each. Where the host
   allows it (root, and cgroup v2 with the memory controller or a cgroup v1 memory
   hierarchy), every runner starts inside a memory cgroup of its own with that limit and no
   swap; since a runner runs one test at a time, that bounds the test's processes, whatever
   they fork, the files they write to the tmpfs, and the runner and harness themselves
   (about 30 MB). Past it the OOM killer ends a process (the program's first) and the test
   scores ``killed``. Elsewhere the program's process count is limited instead, to
   ``max(1, memory_budget_bytes // memory_bytes)`` (``RLIMIT_NPROC``), so processes x
   address space stays within the budget (with the defaults: no fork, no thread); this
   needs a non-root uid (a private uid, or bwrap without root). :func:`bwrap_status` says
   which applies.

Isolation between checks that share a runner
--------------------------------------------
After **every test** the runner kills every process the program left behind (all processes
of the check's private uid, or every process of its PID namespace but itself, the harness
and the namespace's init; processes that escaped into their own session included). After
**every check** it then empties ``/tmp``, ``/work`` and ``/dev/shm``, removes all System V
IPC objects of its IPC namespace, and verifies that the writable parts of the sandbox (the
modes, owners and extended attributes of ``/``, ``/tmp``, ``/work``, ``/dev``, ``/dev/shm``
and the entries of ``/dev``) are exactly as they were when the runner started; if anything
cannot be removed or differs, the runner exits and a fresh sandbox replaces it. The runner
is not dumpable (``PR_SET_DUMPABLE`` 0), so even a program process with the runner's own
uid (bwrap without root) cannot ptrace it or open its ``/proc/<pid>/mem`` or pipes; it can
only kill it (or the harness), which costs a restart and scores the in-flight test 0. The
runner holds only the current check's program; earlier programs are not referenced (their
bytes may remain in freed memory, which a forked program process could read by
introspection). It never holds tests.

Without bubblewrap (``sandbox="none"``, or ``"auto"`` when bwrap is missing or unusable,
which logs a warning once) layers 2 to 4 still apply, plus a clean environment and a fresh
temporary working directory per check (and, as root, the same user namespace without user
namespaces); leftover processes of the check's uid are killed after every test and its
System V IPC objects removed after every check. But there is **no network or filesystem
isolation**: the program can open sockets, read world-readable files and leave files in
world-writable host directories such as ``/tmp`` (where a later check could find them).
When the host is not root there is also no separate uid, so the program could signal
processes of the same user (the harness included), and user namespaces stay open.
Use ``sandbox="required"`` to refuse running without bubblewrap.
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
    """Run each test against ``program``, which runs afresh for each in its own process.

    The processes are forked by a pooled, sandboxed runner (see the module docstring for
    the trust boundary and what is isolated from the host and between checks).

    Args:
        program: Python source defining the solution.
        tests: test sources, run by the trusted harness, not in the program's process.
            Without ``entry_point`` each one is executed in a namespace holding the
            program's names (e.g. ``"assert add(1, 2) == 3"``): its functions (and other
            callables) as proxies that call them in the program's process, the values of
            its plain-data globals, and the standard-library modules it imported. With
            ``entry_point`` there must be exactly one test, defining ``check(candidate)``,
            which is called with the proxy of the program's ``entry_point`` (HumanEval
            convention). Only plain data crosses: a call whose arguments or result are not
            (e.g. an instance of the program's own class) fails the test.
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
