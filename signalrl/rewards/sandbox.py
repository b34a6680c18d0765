"""Run untrusted Python programs against tests in sandboxed, pooled subprocesses.

This module is deliberately self-contained (standard library only): the same file is the
host-side API *and* the in-sandbox runner (``python -I -S sandbox.py --serve``), so nothing
of ``signalrl`` has to be importable inside the sandbox. The runner's part comes first and
the runner stops reading there, so it does not import what only the host needs.

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

import json
import os
import select
import signal
import stat
import sys
import time
from typing import Any, cast

_STATUSES = ("passed", "failed", "error", "timeout", "killed")
_DETAIL_CHARS = 1000
_OUTPUT_HEAD_BYTES = 600
# Writable places inside the bubblewrap sandbox that are emptied after every check.
_SCRATCH_DIRS = ("/tmp", "/work", "/dev/shm")
# Places whose metadata (and, for /dev, entries) must be unchanged after every check.
_CHECKED_DIRS = ("/", "/tmp", "/work", "/dev", "/dev/shm")
# Standard-library modules imported by the runner before it drops privileges when running
# without bubblewrap: the interpreter may live under a directory the sandbox uid cannot
# traverse (e.g. pyenv under /root), so later imports of these would fail.
_PREIMPORT = (
    "abc array base64 binascii bisect calendar cmath collections collections.abc contextlib "
    "copy csv dataclasses datetime decimal enum errno fractions functools glob hashlib heapq "
    "io itertools json locale math numbers operator pprint queue random re shlex socket "
    "statistics string struct textwrap time typing unicodedata uuid warnings weakref zlib"
).split()


# --------------------------------------------------------------------------------------
# Sandbox side: ``python -I -S sandbox.py --serve ...`` reads framed JSON jobs on stdin.
# It comes first, and the runner stops reading the file before the host side (see the end
# of this section): a small runner makes each fork, one per test, cheaper.
# --------------------------------------------------------------------------------------


def _truncate(text: str, limit: int = _DETAIL_CHARS) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2 - 10
    return f"{text[:half]} ...[truncated]... {text[-half:]}"


def _has_exited(pid: int) -> bool:
    """Whether ``pid`` has exited, without reaping it (so its pid cannot be reused yet)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


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
    if hasattr(resource, "RLIMIT_MSGQUEUE"):  # POSIX message queues outlive processes
        settings.append((resource.RLIMIT_MSGQUEUE, 0, 0))
    for which, soft, hard in settings:
        try:
            _, old_hard = resource.getrlimit(which)
            if old_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, old_hard), min(hard, old_hard)
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass


_libc: Any = None


def _libc_call(name: str, *args: Any) -> int:
    """Call a libc function through ctypes (Linux); -1 when it is unavailable."""
    global _libc
    try:
        import ctypes

        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        return int(getattr(_libc, name)(*args))
    except Exception:  # noqa: BLE001 - purely defensive
        return -1


def _prctl(option: int, arg: int) -> None:
    """Call prctl(2) (Linux, best effort)."""
    _libc_call("prctl", option, arg, 0, 0, 0)


# How long the processes a test left behind may take to die once killed.
_SWEEP_S = 2.0

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
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
    if not job["isolated"]:
        # Die with the runner (under bwrap its PID namespace does that). Set after the uid
        # change, which clears the setting.
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        os.environ["HOME"] = workdir
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
    _format = traceback.format_exception

    def report(status: str, detail: str = "") -> None:
        data = f"{token} {status}\n{_truncate(detail)}".encode("utf-8", "replace")
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


def _sweep(uid: int | None, mode: str) -> bool:
    """Kill every leftover process of a finished test and reap them all.

    ``"ns"``: we are the runner in our own PID namespace, so ``kill(-1)`` reaches every
    process but the namespace's init and ourselves. ``"uid"``: a helper switches to the
    test's uid and sends ``kill(-1)``, which reaches exactly that uid's processes. One
    ``kill(-1)`` is enough: the kernel holds the task list while it signals, so a process
    that forks meanwhile is either signalled or fails to fork. (Its return value says
    nothing useful: it reports success whenever *any* other process exists, even one it
    was not allowed to signal.) Every process a test leaves behind is our descendant (we
    are a child subreaper), so having no child left proves they are all gone. ``"none"``
    (no private uid, no namespace): only finished children are reaped.

    Returns False if some process was still alive after ``_SWEEP_S`` seconds.
    """
    if mode == "uid" and uid is not None:
        pid = os.fork()
        if pid == 0:
            try:
                _drop_privileges(uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    elif mode == "ns" and os.getpid() != 1:
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
    else:
        _reap(0.0)
        return True
    return _reap(_SWEEP_S)


def _reap(seconds: float) -> bool:
    """Reap exited children until none is left (True) or ``seconds`` pass (False)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid:
            continue
        if time.monotonic() >= deadline:
            return False
        select.select([], [], [], 0.001)  # killed processes take a moment to exit


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
            # With a pidfd the poll wakes up when the process exits; without one, poll
            # for its exit every 50 ms.
            step = remaining if pidfd is not None else min(remaining, 0.05)
            try:
                events = poller.poll(max(1, int(step * 1000)))
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
    # The report: "<token> <status>\n<detail>", written once, right before the exit.
    data = bytes(buf)
    prefix = (token + " ").encode()
    start = 0 if data.startswith(prefix) else data.find(b"\n" + prefix) + 1
    if start or data.startswith(prefix):
        status, _, detail = data[start + len(prefix) :].partition(b"\n")
        return status.decode("ascii", "replace"), detail.decode("utf-8", "replace"), wait_status
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


def _run_test(job: dict[str, Any], position: int) -> tuple[str, str]:
    """Fork one test process, wait for it, kill its leftovers; returns (status, detail)."""
    timeout = float(job["timeout"])
    report_r, report_w = os.pipe()
    token = os.urandom(16).hex()
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
    _sweep(job["uid"], job["sweep"])
    out_path = os.path.join(job["workdir"], f".output-{position}")
    output = "" if reported == "passed" else _output_head(out_path)
    try:
        os.unlink(out_path)
    except OSError:
        pass
    return _classify(reported, detail, wait_status, timeout, output)


def _remove(path: str) -> None:
    """Remove ``path`` (a directory recursively), making directories writable first."""
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        if st.st_mode & 0o700 != 0o700:
            os.chmod(path, 0o700)
        for name in os.listdir(path):
            _remove(os.path.join(path, name))
        os.rmdir(path)
    else:
        os.unlink(path)


def _empty_dir(path: str) -> bool:
    """Remove everything inside ``path``; False if something could not be removed."""
    try:
        if not os.path.isdir(path):
            return True
        for name in os.listdir(path):
            _remove(os.path.join(path, name))
        return not os.listdir(path)
    except (OSError, RecursionError, ValueError):
        return False


def _fs_state() -> tuple[Any, ...]:
    """The metadata of the sandbox's writable places, compared before and after checks."""
    state: list[Any] = []
    for path in _CHECKED_DIRS:
        try:
            st = os.lstat(path)
            state.append((path, st.st_mode, st.st_uid, st.st_gid))
            state.append(tuple(sorted(os.listxattr(path, follow_symlinks=False))))
        except OSError as exc:
            state.append((path, type(exc).__name__))
    for path in ("/dev", "/dev/shm"):
        try:
            with os.scandir(path) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    st = entry.stat(follow_symlinks=False)
                    state.append((entry.path, entry.inode(), st.st_mode, st.st_uid, st.st_size))
        except OSError as exc:
            state.append((path, type(exc).__name__))
    return tuple(state)


def _ipc_objects(owner: int | None) -> list[tuple[str, int]]:
    """System V IPC objects (kind, id) visible here; only those of ``owner`` if given."""
    found: list[tuple[str, int]] = []
    for kind, id_column in (("shm", "shmid"), ("msg", "msqid"), ("sem", "semid")):
        try:
            with open(f"/proc/sysvipc/{kind}", encoding="ascii", errors="replace") as fh:
                header = fh.readline().split()
                rows = [line.split() for line in fh if line.strip()]
        except OSError:
            continue
        try:
            at_id, at_uid, at_cuid = (header.index(c) for c in (id_column, "uid", "cuid"))
        except ValueError:
            continue
        for row in rows:
            try:
                uids = {int(row[at_uid]), int(row[at_cuid])}
                if owner is None or owner in uids:
                    found.append((kind, int(row[at_id])))
            except (IndexError, ValueError):
                continue
    return found


def _remove_ipc(owner: int | None, as_uid: int | None) -> bool:
    """Remove System V IPC objects (all, or ``owner``'s); True if none is left.

    Removing needs the owner's effective uid (or ``CAP_SYS_ADMIN``, which the runner
    lacks under bwrap), so with ``as_uid`` the runner switches its effective uid briefly.
    """
    objects = _ipc_objects(owner)
    if not objects:
        return True
    switched = as_uid is not None and os.geteuid() == 0
    try:
        if switched:
            os.seteuid(cast(int, as_uid))
        for kind, ident in objects:
            if kind == "shm":
                _libc_call("shmctl", ident, 0, None)  # IPC_RMID
            elif kind == "msg":
                _libc_call("msgctl", ident, 0, None)
            else:
                _libc_call("semctl", ident, 0, 0)
    except OSError:
        return False
    finally:
        if switched:
            os.seteuid(0)
    return not _ipc_objects(owner)


def _cleanup(job: dict[str, Any], baseline: tuple[Any, ...] | None) -> bool:
    """After a check: kill leftovers, empty the scratch space, remove IPC objects, and
    verify that the sandbox is as it was at start. False means: do not reuse this runner.
    """
    uid = job["uid"]
    if not _sweep(uid, job["sweep"]):
        return False
    if not job["isolated"]:  # the fallback: the host removes the per-check directory
        return uid is None or _remove_ipc(uid, uid)
    clean = all([_empty_dir(path) for path in _SCRATCH_DIRS])
    clean = _remove_ipc(None, uid) and clean
    return clean and _fs_state() == baseline


def _read_job(stream: Any) -> dict[str, Any] | None:
    """The next framed job (``<length>\\n<json>``) from ``stream``; None at end of input."""
    header = stream.readline()
    if not header:
        return None
    payload = stream.read(int(header))
    return cast("dict[str, Any]", json.loads(payload.decode("utf-8")))


def _emit(nonce: str, record: dict[str, Any]) -> None:
    data = memoryview(f"{nonce} {json.dumps(record)}\n".encode("utf-8", "replace"))
    while data:
        data = data[os.write(1, data) :]


def _serve(argv: list[str]) -> int:
    """Entry point inside the sandbox: run checks read from stdin until end of input.

    Arguments: ``--isolated`` under bwrap; ``--parent PID`` without it (the runner dies
    with the host process); ``--preimport`` to import the standard library up front.
    """
    isolated = "--isolated" in argv
    if "--parent" in argv:  # without bwrap (which has --die-with-parent): die with the host
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != int(argv[argv.index("--parent") + 1]):
            return 1
    # Not dumpable: processes of the same uid cannot ptrace us or open /proc/<pid>/fd/*.
    _prctl(_PR_SET_DUMPABLE, 0)
    # Orphans of the test processes are re-parented to us, so we can reap them.
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    if "--preimport" in argv:
        import importlib

        for name in _PREIMPORT:
            try:
                importlib.import_module(name)
            except ImportError:
                pass
    # Pre-import what the test processes need (they may lose access to the stdlib dir),
    # and what ``site`` would have provided without its start-up cost (``-S``): the
    # site-packages directories (without .pth hooks) and the exit()/quit() builtins.
    import linecache  # noqa: F401
    import math  # noqa: F401
    import resource
    import site
    import traceback  # noqa: F401
    import types  # noqa: F401

    site.setquit()
    for path in site.getsitepackages():
        if os.path.isdir(path) and path not in sys.path:
            sys.path.append(path)
    _libc_call("getpid")  # load libc through ctypes now
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Exempt everything imported so far from garbage collection: a collection in a forked
    # test process would otherwise touch (and so copy) every page of the runner's heap.
    import gc

    gc.freeze()
    baseline = _fs_state() if isolated else None
    stream = sys.stdin.buffer
    while True:
        job = _read_job(stream)
        if job is None:
            return 0
        nonce = job["nonce"]
        _emit(nonce, {"ack": True})
        for position, index in enumerate(job["indices"]):
            status, detail = _run_test(job, position)
            _emit(nonce, {"index": index, "status": status, "detail": _truncate(detail)})
        clean = _cleanup(job, baseline)
        _emit(nonce, {"done": True, "clean": clean})
        del job
        if not clean:
            return 0


if __name__ == "__main__":
    # The runner needs nothing below this point. Stopping here keeps the host side's
    # imports (logging, subprocess, dataclasses, ...) out of the runner, which halves the
    # memory every test process is forked from.
    if sys.argv[1:2] != ["--serve"]:
        sys.exit("usage: python -I -S sandbox.py --serve (--isolated | --parent PID) [--preimport]")
    try:
        sys.exit(_serve(sys.argv[2:]))
    except BrokenPipeError:  # the host went away
        sys.exit(1)


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------

import atexit  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import ClassVar, Literal  # noqa: E402

__all__ = [
    "SANDBOX_MODES",
    "SandboxLimits",
    "TestOutcome",
    "TestStatus",
    "bwrap_status",
    "close_sandbox_pool",
    "run_python_tests",
]

logger = logging.getLogger(__name__)

TestStatus = Literal["passed", "failed", "error", "timeout", "killed"]
SandboxMode = Literal["auto", "required", "none"]
SANDBOX_MODES: tuple[str, ...] = ("auto", "required", "none")

_SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
# Random high uids for the unprivileged test processes (only used when the host is root).
_UID_BASE = 1_600_000_000
_UID_SPAN = 100_000_000
# Host-side patience beyond a test's own wall-clock limit (the runner kills and sweeps),
# and extra patience for a runner that is still starting (bwrap, interpreter, imports).
_SLACK_S = 5.0
_STARTUP_S = 15.0
# How long a runner that was told to stop (or has died) may take to exit before SIGKILL.
_EXIT_GRACE_S = 2.0
# Idle runners kept per sandbox configuration (more run while more threads check code).
_MAX_IDLE = max(2, os.cpu_count() or 1)


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
        output_bytes: cap on what the host reads from a runner for one check.
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


def _bwrap_argv(bwrap: str, tmpfs_bytes: int, drop_uid: bool) -> list[str]:
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
    size = str(tmpfs_bytes)
    argv += ["--size", size, "--perms", "1777", "--tmpfs", "/tmp"]
    argv += ["--size", size, "--perms", "1777", "--tmpfs", "/work"]
    argv += ["--ro-bind", _runner_path(), "/sandbox/runner.py", "--remount-ro", "/"]
    argv += ["--chdir", "/work"]
    if os.geteuid() == 0:
        # As root bwrap would keep every capability; the runner needs only these (the
        # test processes lose them all when they switch to their own uid).
        argv += ["--cap-drop", "ALL"]
        if drop_uid:
            for cap in ("SETUID", "SETGID", "KILL", "DAC_OVERRIDE", "FOWNER"):
                argv += ["--cap-add", f"CAP_{cap}"]
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


class _Spawner:
    """Starts runners from one long-lived thread.

    ``bwrap --die-with-parent`` (``PR_SET_PDEATHSIG``) fires when the *thread* that
    started bwrap exits, not the process; runners outlive the calls (and the worker
    threads of a ``ThreadPoolExecutor``) that first needed them, so they are started here.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._requests: list[tuple[list[str], dict[str, str], list[Any]]] = []
        self._thread: threading.Thread | None = None

    def popen(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` (pipes on stdin/stdout/stderr, new session) from the thread."""
        slot: list[Any] = []
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="signalrl-sandbox-spawner", daemon=True
                )
                self._thread.start()
            self._requests.append((argv, env, slot))
            self._cond.notify_all()
            while not slot:
                self._cond.wait()
        ok, value = slot[0]
        if not ok:
            raise value
        return cast("subprocess.Popen[bytes]", value)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._requests:
                    self._cond.wait()
                argv, env, slot = self._requests.pop(0)
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd="/",
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
                result: tuple[bool, Any] = (True, proc)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                result = (False, exc)
            with self._cond:
                slot.append(result)
                self._cond.notify_all()


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

    def __init__(self, backend: _Backend, tmpfs_bytes: int) -> None:
        exe, _ = _interpreter()
        env = {"PATH": _SANDBOX_PATH, "LANG": "C.UTF-8"}
        if backend.bwrap is not None:
            argv = [*_bwrap_argv(backend.bwrap, tmpfs_bytes, backend.drop_uid), exe, "-I"]
            argv += ["-S", "/sandbox/runner.py", "--serve", "--isolated"]
        else:
            argv = [exe, "-I", "-S", _runner_path(), "--serve", "--parent", str(os.getpid())]
            if backend.drop_uid and not _interpreter_accessible():
                argv.append("--preimport")
            env["HOME"] = "/"
        self.key = (backend, tmpfs_bytes)
        self.fresh = True
        self.proc = _SPAWNER.popen(argv, env)
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr
        self._fds = (self.proc.stdin.fileno(), self.proc.stdout.fileno(), self.proc.stderr.fileno())
        for fd in self._fds:
            os.set_blocking(fd, False)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, job: dict[str, Any], timeout: float, cap: int) -> _Reply:
        """Send one check and collect the runner's records until it says it is done."""
        reply = _Reply()
        payload = json.dumps(job).encode()
        view = memoryview(b"%d\n" % len(payload) + payload)
        prefix = job["nonce"].encode() + b" "
        writer: int | None
        writer, out_fd, err_fd = self._fds
        patience = timeout + _SLACK_S + (_STARTUP_S if self.fresh else 0.0)
        self.fresh = False
        deadline = time.monotonic() + patience
        poller = select.poll()  # not select(): host fds may exceed FD_SETSIZE
        poller.register(writer, select.POLLOUT)
        poller.register(out_fd, select.POLLIN)
        poller.register(err_fd, select.POLLIN)
        pending = bytearray()
        err = bytearray()
        received = 0
        while not (reply.done or reply.died):
            now = time.monotonic()
            if now >= deadline:
                reply.timed_out = True
                break
            try:
                events = poller.poll(max(1, int((deadline - now) * 1000)))
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == writer:
                    try:
                        view = view[os.write(writer, view[:65536]) :]
                    except BlockingIOError:
                        continue
                    except OSError:  # broken pipe: the runner is gone; EOF will follow
                        view = view[len(view) :]
                    if not len(view):
                        poller.unregister(writer)
                        writer = None
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if fd == err_fd:
                    if not chunk:
                        poller.unregister(err_fd)
                    elif len(err) < 8192:
                        err += chunk[: 8192 - len(err)]
                    continue
                if not chunk:
                    reply.died = True
                    break
                received += len(chunk)
                if received > cap:
                    reply.died = True
                    err += b"[the runner's output exceeded the cap]"
                    break
                pending += chunk
                *lines, rest = bytes(pending).split(b"\n")
                pending = bytearray(rest)
                for line in lines:
                    if self._record(line, prefix, reply):
                        deadline = time.monotonic() + timeout + _SLACK_S
        if reply.died:
            err += self._drain_stderr(err_fd)
        reply.stderr = err.decode("utf-8", "replace")
        return reply

    @staticmethod
    def _record(line: bytes, prefix: bytes, reply: _Reply) -> bool:
        """Parse one line of the runner; True when it reported a test."""
        if not line.startswith(prefix):
            return False
        try:
            record = json.loads(line[len(prefix) :])
        except ValueError:
            return False
        if not isinstance(record, dict):
            return False
        if record.get("ack"):
            reply.acked = True
        elif "done" in record:
            reply.done, reply.clean = True, bool(record.get("clean"))
        elif record.get("status") in _STATUSES and isinstance(record.get("index"), int):
            reply.outcomes[record["index"]] = (record["status"], str(record.get("detail", "")))
            return True
        return False

    def _drain_stderr(self, fd: int) -> bytes:
        """What the dead runner (or bwrap) left on stderr, waiting briefly for it to exit."""
        out = bytearray()
        deadline = time.monotonic() + 0.5
        while len(out) < 8192 and time.monotonic() < deadline:
            try:
                chunk = os.read(fd, 8192)
            except BlockingIOError:
                select.select([], [], [], 0.01)
                continue
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return bytes(out[:8192])

    def close(self, graceful: bool = True) -> None:
        """Stop the runner: let it exit on end of input (``graceful``), else SIGKILL it.

        Letting bwrap exit on its own avoids orphaning its namespace's init process while it
        is still being reaped (a zombie under some containers' non-reaping PID 1).
        """
        if graceful:
            self._end_input()
            try:
                self.proc.wait(timeout=_EXIT_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()
        self._close_fds()

    def _end_input(self) -> None:
        """Close the runner's stdin: it exits after the check in progress, if any."""
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def _close_fds(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


class _Pool:
    """Idle runners per (backend, tmpfs size), reused across checks and threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[tuple[_Backend, int], list[_Worker]] = {}
        self._live: set[_Worker] = set()
        self.started = 0  # runners started so far (the tests look at it)

    def acquire(self, backend: _Backend, tmpfs_bytes: int) -> _Worker:
        """An idle runner for ``backend``, or a new one."""
        dead: list[_Worker] = []
        worker: _Worker | None = None
        with self._lock:
            idle = self._idle.get((backend, tmpfs_bytes), [])
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
        worker = _Worker(backend, tmpfs_bytes)
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
            w._end_input()
        for w in workers:
            w.close(graceful=True)

    def after_fork_in_child(self) -> None:
        """In a forked host process: forget (never signal) the parent's runners."""
        self._lock = threading.Lock()
        for w in list(self._live):
            w._close_fds()
        self._idle, self._live = {}, set()


_SPAWNER = _Spawner()
_POOL = _Pool()


def _after_fork_in_child() -> None:
    global _SPAWNER
    _SPAWNER = _Spawner()
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
    worker = _POOL.acquire(backend, limits.tmpfs_bytes)
    fresh = worker.fresh
    uid = _pick_uid() if backend.drop_uid else None
    workdir: str | None = None
    if backend.bwrap is not None:
        sandbox_workdir, sweep = "/work", "ns"
    else:
        workdir = sandbox_workdir = tempfile.mkdtemp(prefix="signalrl-sandbox-")
        if uid is not None:
            os.chown(workdir, uid, uid)
        os.chmod(workdir, 0o700)
        sweep = "uid" if uid is not None else "none"
    job = {
        "nonce": secrets.token_hex(16),
        "program": program,
        "tests": [tests[i] for i in indices],
        "indices": list(indices),
        "entry_point": entry_point,
        "timeout": timeout,
        "limits": asdict(limits),
        "uid": uid,
        "sweep": sweep,
        "isolated": backend.bwrap is not None,
        "workdir": sandbox_workdir,
    }
    reply = _Reply(died=True)
    try:
        reply = worker.run(job, timeout, limits.output_bytes)
    finally:
        if reply.done and reply.clean:
            _POOL.release(worker)
        else:
            _POOL.discard(worker, graceful=not reply.timed_out)
            if uid is not None and backend.bwrap is None:
                _kill_uid(uid)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return reply, fresh


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
        reply, fresh = _run_on_worker(
            program, tests, pending, entry_point, timeout, limits, backend
        )
        for index, (status, detail) in reply.outcomes.items():
            if index in pending:
                results[index] = TestOutcome(
                    tests[index], status == "passed", cast(TestStatus, status), _truncate(detail)
                )
        remaining = [i for i in pending if i not in results]
        if not remaining:
            break
        if not reply.acked and not fresh:
            # A reused runner that died while idle never saw the job: not the program's
            # fault, so run it again on another runner (a fresh one at the latest).
            pending = remaining
            continue
        # The runner processes tests in order: the first unreported one was in flight.
        first = remaining[0]
        if reply.timed_out:
            status: TestStatus = "timeout"
            detail = "the sandbox exceeded its wall-clock limit and was killed"
        else:
            status = "killed"
            detail = "the sandbox runner died"
        if reply.stderr.strip():
            detail += f"; stderr: {reply.stderr.strip()[-_DETAIL_CHARS // 2 :]}"
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
    _POOL.close_all(backend)
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
