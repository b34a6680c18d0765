"""The runner: the process inside the sandbox that executes the untrusted tests.

Started by the host (:mod:`signalrl.rewards.sandbox.pool`) as a script, never imported:
``python -I -S runner.py --serve (--isolated | --parent PID) [--preimport]``, under bwrap as
``/sandbox/runner.py`` (a read-only bind of this one file). It uses the standard library
only, and as little of it as it can: every test process is forked from it, so a small
runner makes each fork cheaper.

Protocol: framed jobs (``<length>\\n<json>``) on stdin, one per check; the answers are lines
``<nonce> <json>`` on stdout: ``{"ack": true}`` when the job was read, one
``{"index", "status", "detail"}`` per test as soon as it is known, and ``{"done": true,
"clean": ...}`` at the end. The runner forks one process per test (:func:`_child_main`),
which runs the program and then that test under resource limits and a wall clock, and
reports through a pipe with a random per-test token. After every test it kills what the
test left behind (:func:`_sweep`); after every check it wipes and verifies the sandbox
(:func:`_cleanup`) and exits if that fails, so that the host starts a fresh one. The
package's docstring (:mod:`signalrl.rewards.sandbox`) describes the layers of containment.
"""

from __future__ import annotations

import json
import os
import select
import signal
import stat
import sys
import time
from typing import Any, NoReturn, cast

# The host keeps its own copy of this limit (signalrl.rewards.sandbox.config).
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

    def report(status: str, detail: str = "") -> NoReturn:
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
    _, waited = os.waitpid(pid, 0)
    wait_status = waited if exited else None
    _drain(report_fd, buf)
    # The report: "<token> <status>\n<detail>", written once, right before the exit.
    data = bytes(buf)
    prefix = (token + " ").encode()
    start = 0 if data.startswith(prefix) else data.find(b"\n" + prefix) + 1
    if start or data.startswith(prefix):
        reported, _, detail = data[start + len(prefix) :].partition(b"\n")
        return reported.decode("ascii", "replace"), detail.decode("utf-8", "replace"), wait_status
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
    if sys.argv[1:2] != ["--serve"]:
        sys.exit("usage: python -I -S runner.py --serve (--isolated | --parent PID) [--preimport]")
    try:
        sys.exit(_serve(sys.argv[2:]))
    except BrokenPipeError:  # the host went away
        sys.exit(1)
