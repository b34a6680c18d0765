"""Host side: a memory cgroup per sandboxed runner, which bounds the memory of a check.

Every runner (its bwrap, or its bare interpreter without bwrap) starts inside a cgroup of its
own whose memory limit is :attr:`SandboxLimits.memory_budget_bytes
<signalrl.rewards.sandbox.config.SandboxLimits.memory_budget_bytes>`, with swap disallowed.
A runner runs one test at a time, so that limit bounds all the memory of the check in
progress: the program's process and everything it forks, files it writes to the sandbox's
tmpfs, and the runner and the harness themselves (about 30 MB). Past it the kernel's OOM
killer ends a process in that cgroup (the program's processes first: they have the highest
``oom_score_adj``), and the pool scores the test ``killed`` (it reads the cgroup's OOM kill
count after every test).

Where this is possible: cgroup v2 with the memory controller available to a cgroup we may
create children in (our own, or the hierarchy's root), or a cgroup v1 memory hierarchy we
may write (both usually need root). :func:`status` says which was found, or why none; where
none is, the runner limits the number of processes instead (see ``SandboxLimits``).
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import threading
import time

__all__ = ["JOIN_FAILED", "MemoryCgroup", "create", "disable", "status"]

_NAME = re.compile(r"signalrl-(\d+)-\d+")
# The command that puts itself into a cgroup (its cgroup.procs is $0) and then becomes the
# runner, so that bwrap and everything it starts are inside from the start.
_JOIN = 'echo $$ > "$0" || exit 97; exec "$@"'
# The exit status of that command when it could not join.
JOIN_FAILED = 97

_lock = threading.Lock()
_found: tuple[str | None, int, str] | None = None  # (base directory, version, description)
_counter = itertools.count()
_leftovers: set[str] = set()


class MemoryCgroup:
    """One runner's cgroup."""

    def __init__(self, path: str, version: int, limit: int) -> None:
        self.path = path
        self.version = version
        self.limit = limit

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv``, started inside this cgroup."""
        return ["/bin/sh", "-c", _JOIN, os.path.join(self.path, "cgroup.procs"), *argv]

    def oom_kills(self) -> int:
        """How many processes the OOM killer has ended in this cgroup so far (-1: unknown)."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            with open(os.path.join(self.path, name), encoding="ascii") as fh:
                for line in fh:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        return -1

    def remove(self, wait_s: float = 1.0) -> None:
        """Remove the cgroup once its processes are gone (later, at exit, if they are not)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                os.rmdir(self.path)
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                with _lock:
                    _leftovers.add(self.path)
                return
            break
        with _lock:
            _leftovers.discard(self.path)


def _write(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as fh:
        fh.write(value)


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read()
    except OSError:
        return ""


def _mounts() -> list[tuple[str, str, str, list[str]]]:
    """(mount point, root, fs type, super options) of the cgroup file systems."""
    found = []
    for line in _read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            found.append((fields[4], fields[3], tail[0], tail[2].split(",")))
    return found


def _own_paths() -> tuple[str | None, str | None]:
    """Our cgroup in the v2 hierarchy and in the v1 memory hierarchy (from /proc)."""
    v2 = v1 = None
    for line in _read("/proc/self/cgroup").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            if parts[0] == "0" and parts[1] == "":
                v2 = parts[2]
            elif "memory" in parts[1].split(","):
                v1 = parts[2]
    return v2, v1


def _candidates() -> list[tuple[str, int]]:
    """Directories where a runner's cgroup could go, best first: (directory, version)."""
    own_v2, own_v1 = _own_paths()
    out: list[tuple[str, int]] = []
    for version in (2, 1):
        for point, root, fstype, options in _mounts():
            if (fstype == "cgroup2") != (version == 2):
                continue
            if version == 1 and "memory" not in options:
                continue
            own = own_v2 if version == 2 else own_v1
            if own is not None and (own == root or own.startswith(root.rstrip("/") + "/")):
                out.append((os.path.join(point, own[len(root.rstrip("/")) :].lstrip("/")), version))
            out.append((point, version))
    return out


def _usable(base: str, version: int) -> bool:
    """Whether we can make a memory-limited cgroup under ``base``."""
    if version == 2:
        if "memory" not in _read(os.path.join(base, "cgroup.controllers")).split():
            return False
        if "memory" not in _read(os.path.join(base, "cgroup.subtree_control")).split():
            try:
                _write(os.path.join(base, "cgroup.subtree_control"), "+memory")
            except OSError:
                return False
    probe = os.path.join(base, f"signalrl-{os.getpid()}-probe")
    try:
        os.mkdir(probe)
    except OSError:
        return False
    try:
        knob = "memory.max" if version == 2 else "memory.limit_in_bytes"
        _write(os.path.join(probe, knob), str(1 << 30))
        return True
    except OSError:
        return False
    finally:
        try:
            os.rmdir(probe)
        except OSError:
            pass


def _remove_stale(base: str) -> None:
    """Remove the cgroups that earlier processes (now gone) left under ``base``."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        match = _NAME.fullmatch(name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            try:
                os.rmdir(os.path.join(base, name))
            except OSError:
                pass


def _find() -> tuple[str | None, int, str]:
    global _found
    with _lock:
        if _found is None:
            _found = (None, 0, "no writable cgroup with the memory controller")
            for base, version in _candidates():
                if os.path.isdir(base) and _usable(base, version):
                    _remove_stale(base)
                    _found = (base, version, f"memory cgroup v{version} under {base}")
                    break
        return _found


def status() -> tuple[bool, str]:
    """Whether each runner gets a memory cgroup here, and a description."""
    base, _, description = _find()
    return base is not None, description


def disable(why: str) -> None:
    """Use no memory cgroup from now on (in this process)."""
    global _found
    _find()
    with _lock:
        _found = (None, 0, f"memory cgroups disabled: {why}")


def create(limit: int) -> MemoryCgroup | None:
    """A new cgroup limited to ``limit`` bytes (no swap), or None where there is none."""
    base, version, _ = _find()
    if base is None:
        return None
    path = os.path.join(base, f"signalrl-{os.getpid()}-{next(_counter)}")
    try:
        os.mkdir(path)
    except OSError:
        return None
    try:
        _write(
            os.path.join(path, "memory.max" if version == 2 else "memory.limit_in_bytes"),
            str(limit),
        )
    except OSError:
        os.rmdir(path)
        return None
    for knob, value in (("memory.swap.max", "0"), ("memory.memsw.limit_in_bytes", str(limit))):
        if os.path.exists(os.path.join(path, knob)):
            try:
                _write(os.path.join(path, knob), value)
            except OSError:
                pass
    return MemoryCgroup(path, version, limit)


def _remove_leftovers() -> None:
    with _lock:
        paths = list(_leftovers)
    for path in paths:
        MemoryCgroup(path, 0, 0).remove(wait_s=0.5)


atexit.register(_remove_leftovers)
