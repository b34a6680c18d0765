"""Inside the sandbox: the runner's housekeeping. Limits and privileges of the processes it
forks, killing what a test left behind, and wiping the sandbox after a check.

Loaded by the runner (``runner.py``) from its own directory by path, never imported by the
host; under bwrap it is ``/sandbox/sweep.py``, a read-only bind of this one file. Standard
library only.

:func:`sweep` runs after every test while the runner's harness is alive, so it must kill
the program's processes and only those: with a private uid per check the runner
switches its real and effective uid to that uid for one ``kill(-1)`` (which then reaches
exactly that uid's processes, and not the harness, which runs as another uid); in a PID
namespace without a private uid it kills every process of the namespace but the runner, the
harness and the namespace's init. :func:`cleanup` runs after every check: it sweeps the
same way, empties the scratch directories, removes System V IPC objects and verifies that
the sandbox's writable places are as they were at start.
"""

from __future__ import annotations

import os
import select
import signal
import stat
import time
from typing import Any, cast

# How long the processes a test left behind may take to die once killed.
SWEEP_S = 2.0
# Writable places inside the bubblewrap sandbox that are emptied after every check.
_SCRATCH_DIRS = ("/tmp", "/work", "/dev/shm")
# Places whose metadata (and, for /dev, entries) must be unchanged after every check.
_CHECKED_DIRS = ("/", "/tmp", "/work", "/dev", "/dev/shm")

# Wait statuses of children reaped while sweeping, for whoever waits for them later.
reaped: dict[int, int] = {}

_libc: Any = None


def libc_call(name: str, *args: Any) -> int:
    """Call a libc function through ctypes (Linux); -1 when it is unavailable."""
    global _libc
    try:
        import ctypes

        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        return int(getattr(_libc, name)(*args))
    except Exception:  # noqa: BLE001 - purely defensive
        return -1


def prctl(option: int, arg: int) -> None:
    """Call prctl(2) (Linux, best effort)."""
    libc_call("prctl", option, arg, 0, 0, 0)


def drop_privileges(uid: int | None) -> None:
    """Become ``uid`` (its own gid, no supplementary groups), if given."""
    if uid is None:
        return
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def set_limits(limits: dict[str, Any], timeout: float, *, program: bool = True) -> None:
    """Resource limits for a program process (or, with ``program=False``, the harness)."""
    import math
    import resource

    cpu = max(1, math.ceil(limits.get("cpu_seconds") or (math.ceil(timeout) + 1)))
    memory = limits["memory_bytes"]
    if not program:  # the harness, for this check (soft only: the next may allow more)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = memory if hard == resource.RLIM_INFINITY else min(memory, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        return
    size, files, nproc = (limits[k] for k in ("file_size_bytes", "max_open_files", "nproc"))
    settings = [
        (resource.RLIMIT_AS, memory, memory),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_FSIZE, size, size),
        (resource.RLIMIT_NOFILE, files, files),
        (resource.RLIMIT_NPROC, nproc, nproc),
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


def _kill_as(uid: int) -> None:
    """SIGKILL every process of ``uid``: ``kill(-1)`` with real and effective uid ``uid``.

    The saved uid stays 0, so the runner gets its own uid (and capabilities) back. One
    ``kill(-1)`` is enough: the kernel holds the task list while it signals, so a process
    that forks meanwhile is either signalled or fails to fork.
    """
    os.setresuid(uid, uid, 0)
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.setresuid(0, 0, 0)


def _kill_all_but(spare: set[int]) -> None:
    """SIGKILL every process of this PID namespace but init, us and ``spare``."""
    keep = {1, os.getpid(), *spare}
    deadline = time.monotonic() + SWEEP_S
    while time.monotonic() < deadline:
        victims = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in keep]
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        _reap(0.0, spare)


def _children() -> set[int]:
    """Our children, from /proc (zombies included)."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children", encoding="ascii") as fh:
            return {int(p) for p in fh.read().split()}
    except OSError:  # no CONFIG_PROC_CHILDREN: scan every process's parent
        found = set()
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == me:
                        found.add(int(entry))
            except (OSError, ValueError, IndexError):
                continue
        return found


def _reap(seconds: float, spare: set[int]) -> bool:
    """Reap exited children until none but ``spare`` is left (True) or ``seconds`` pass.

    Every process a test leaves behind is our descendant (we are a child subreaper), so
    having no other child left proves they are all gone.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid:
            reaped[pid] = status
            continue
        if spare and _children() <= spare:
            return True
        if time.monotonic() >= deadline:
            return False
        select.select([], [], [], 0.001)  # killed processes take a moment to exit


def sweep(job: dict[str, Any], spare: set[int]) -> bool:
    """Kill every process the program left behind (but ``spare``, the harness) and reap them.

    ``job["sweep"]`` says how: ``"ns"`` (in our own PID namespace), ``"uid"`` (a private
    uid, without a namespace) or ``"none"`` (neither: only finished children are reaped).
    Returns False if some process was still alive after :data:`SWEEP_S` seconds.
    """
    mode, uid = job["sweep"], job["uid"]
    if mode == "none":
        _reap(0.0, spare)
        return True
    if uid is not None:
        _kill_as(uid)
    elif mode == "ns" and os.getpid() != 1:
        if spare:
            _kill_all_but(spare)
        else:
            try:
                os.kill(-1, signal.SIGKILL)
            except OSError:
                pass
    return _reap(SWEEP_S, spare)


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


def fs_state() -> tuple[Any, ...]:
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
                libc_call("shmctl", ident, 0, None)  # IPC_RMID
            elif kind == "msg":
                libc_call("msgctl", ident, 0, None)
            else:
                libc_call("semctl", ident, 0, 0)
    except OSError:
        return False
    finally:
        if switched:
            os.seteuid(0)
    return not _ipc_objects(owner)


def cleanup(job: dict[str, Any], baseline: tuple[Any, ...] | None, spare: set[int]) -> bool:
    """After a check: kill leftovers (but ``spare``, the harness), empty the scratch space,
    remove IPC objects, and verify that the sandbox is as it was at start. False means: do
    not reuse this runner.
    """
    uid = job["uid"]
    clean = sweep(job, spare)
    reaped.clear()
    if not clean:
        return False
    if not job["isolated"]:  # the fallback: the host removes the per-check directory
        return uid is None or _remove_ipc(uid, uid)
    clean = all([_empty_dir(path) for path in _SCRATCH_DIRS])
    clean = _remove_ipc(None, uid) and clean
    return clean and fs_state() == baseline
