"""The backends that start a runner: bubblewrap, or the fallback without it.

:class:`_Backend` builds the runner's command line: under bubblewrap a fresh, read-only
root that shows only the system libraries, the interpreter and the runner's three scripts,
with new PID/network/IPC/UTS namespaces, no way to create user namespaces inside, and only
the capabilities the runner needs; without bubblewrap the bare runner with a clean
environment. :func:`bwrap_status` probes once per process whether bubblewrap works here, by
running the real runner on a trivial job, and :func:`_resolve_backend` turns a sandbox mode
(``auto``, ``required``, ``none``) into a backend, warning once when ``auto`` falls back.

User namespaces inside the sandbox (``_Backend.userns``): ``"disable"`` is bwrap's own
``--unshare-user --disable-userns`` (without root, or as root without a private uid per
check); ``"identity"`` (root with a private uid per check, which needs more than the one uid
``--unshare-user`` maps) enters the namespace of :mod:`~signalrl.rewards.sandbox.userns`;
both add ``--assert-userns-disabled``, so bwrap refuses to start if it did not work.
``"open"`` is the fallback where neither works (an old bwrap, say): :func:`bwrap_status`
says so. Without bwrap, a root host's runner enters that same namespace itself
(``--userns-fd``); without bwrap and without root user namespaces stay open.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass

from signalrl.rewards.sandbox import cgroup, pool, userns
from signalrl.rewards.sandbox.config import SANDBOX_MODES, SandboxLimits

logger = logging.getLogger(__name__)

_SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
# Where bwrap shows the runner's scripts (read-only binds of these files of this package).
_SANDBOX_DIR = "/sandbox"
_SCRIPTS = ("runner.py", "harness.py", "sweep.py")
# The devices bwrap's --dev binds from the host; without all of them it fails, and /dev is
# made of those that exist.
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# Capabilities the runner keeps as root under bwrap when it drops to a private uid:
# set uid/gid, kill, and override file permissions to wipe the tmpfs.
_RUNNER_CAPS = ("SETUID", "SETGID", "KILL", "DAC_OVERRIDE", "FOWNER")

_probe_lock = threading.Lock()
_probe_result: tuple[_Backend | None, str] | None = None
_fallback_result: tuple[_Backend | None, str] | None = None
_warned_fallback = False
_python_cache: dict[str, tuple[str, list[str]]] = {}
_help_cache: dict[str, str] = {}


@dataclass(frozen=True)
class _Backend:
    """How to launch the runner: with bwrap or not, whether to drop to a private uid, and
    how user namespaces are kept from the sandbox (see the module docstring)."""

    bwrap: str | None
    drop_uid: bool
    userns: str = "open"

    def runner_command(
        self, tmpfs_bytes: int, harness_uid: int | None
    ) -> tuple[list[str], dict[str, str], tuple[int, ...]]:
        """The runner's command line, environment and inherited descriptors."""
        exe, _ = _interpreter()
        env = {"PATH": _SANDBOX_PATH, "LANG": "C.UTF-8"}
        uid = ["--harness-uid", str(harness_uid)] if harness_uid is not None else []
        if self.bwrap is not None:
            argv, fds = _bwrap_argv(self.bwrap, tmpfs_bytes, self.drop_uid, self.userns)
            argv += [exe, "-I", "-S", f"{_SANDBOX_DIR}/runner.py", "--serve", "--isolated"]
            return [*argv, *uid], env, fds
        argv = [exe, "-I", "-S", _script_path("runner.py"), "--serve", *uid]
        argv += ["--parent", str(os.getpid())]
        if self.drop_uid and not _interpreter_accessible():
            argv.append("--preimport")
        env["HOME"] = "/"
        if self.userns != "identity":
            return argv, env, ()
        fd, why = userns.identity_userns()
        if fd is None:
            raise OSError(f"no user namespace for the sandbox: {why}")
        return [*argv, "--userns-fd", str(fd)], env, (fd,)


def _script_path(name: str) -> str:
    """A script of the runner (which the host starts or binds, but never imports)."""
    return os.path.join(os.path.dirname(os.path.realpath(__file__)), name)


def _bwrap_help(bwrap: str) -> str:
    """``bwrap --help`` (cached), to see which options this bwrap has."""
    if bwrap not in _help_cache:
        try:
            out = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10)
            _help_cache[bwrap] = out.stdout + out.stderr
        except (OSError, subprocess.SubprocessError):
            _help_cache[bwrap] = ""
    return _help_cache[bwrap]


def _userns_modes(bwrap: str, drop_uid: bool) -> list[tuple[str, str]]:
    """The ways to keep user namespaces from the sandbox, best first, each with why it is
    (not) possible: ("disable" | "identity" | "open", note)."""
    text = _bwrap_help(bwrap)
    if "--disable-userns" not in text or "--assert-userns-disabled" not in text:
        return [("open", "this bwrap has no --disable-userns (bubblewrap >= 0.8 has)")]
    if not drop_uid:
        return [("disable", ""), ("open", "--unshare-user --disable-userns failed")]
    fd, why = userns.identity_userns()
    if fd is None or "--userns " not in text:
        return [("open", f"no user namespace for the private uids: {why}")]
    return [("identity", ""), ("open", "bwrap --userns failed")]


def _dev_argv() -> list[str]:
    """bwrap arguments for /dev: ``--dev``, or (where the host lacks one of its devices) a
    small tmpfs with the devices that exist, ``/dev/fd`` and ``/dev/shm``."""
    if all(os.path.exists(f"/dev/{name}") for name in _DEVICES):
        return ["--dev", "/dev"]
    argv = ["--size", str(1 << 20), "--perms", "0755", "--tmpfs", "/dev"]
    for name in _DEVICES:
        if os.path.exists(f"/dev/{name}"):
            argv += ["--dev-bind", f"/dev/{name}", f"/dev/{name}"]
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0")):
        argv += ["--symlink", target, f"/dev/{name}"]
    argv += ["--symlink", "/proc/self/fd/1", "/dev/stdout"]
    argv += ["--symlink", "/proc/self/fd/2", "/dev/stderr"]
    return [*argv, "--perms", "1777", "--dir", "/dev/shm"]


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


def _bwrap_argv(
    bwrap: str, tmpfs_bytes: int, drop_uid: bool, userns_mode: str
) -> tuple[list[str], tuple[int, ...]]:
    """bwrap arguments that expose only the system libraries and the interpreter, and the
    descriptors bwrap must inherit."""
    argv = [bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net"]
    fds: tuple[int, ...] = ()
    if userns_mode == "disable":
        argv += ["--unshare-user", "--disable-userns", "--assert-userns-disabled"]
    elif userns_mode == "identity":
        fd, why = userns.identity_userns()
        if fd is None:
            raise OSError(f"no user namespace for the sandbox: {why}")
        argv += ["--userns", str(fd), "--assert-userns-disabled"]
        fds = (fd,)
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
    argv += ["--proc", "/proc", *_dev_argv()]
    size = str(tmpfs_bytes)
    argv += ["--size", size, "--perms", "1777", "--tmpfs", "/tmp"]
    argv += ["--size", size, "--perms", "1777", "--tmpfs", "/work"]
    for name in _SCRIPTS:
        argv += ["--ro-bind", _script_path(name), f"{_SANDBOX_DIR}/{name}"]
    argv += ["--remount-ro", "/", "--chdir", "/work"]
    if os.geteuid() == 0:
        # As root bwrap would keep every capability; the runner needs only these (the
        # test processes lose them all when they switch to their own uid).
        argv += ["--cap-drop", "ALL"]
        if drop_uid:
            for cap in _RUNNER_CAPS:
                argv += ["--cap-add", f"CAP_{cap}"]
    return argv, fds


def _probe(backend: _Backend) -> str | None:
    """Run a trivial job; returns None if it works, else the reason it does not."""
    try:
        outcomes = pool._run_all(
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
    pool._POOL.close_all(backend)
    return f"probe job gave {statuses}: {outcomes[0].detail or outcomes[1].detail}"


def bwrap_status() -> tuple[bool, str]:
    """Whether bubblewrap is installed and usable here, and a human-readable reason.

    The check runs the real runner under bwrap once per process (cached). As root it first
    tries the configuration that drops to a private uid, then one without it; each with
    user namespaces kept from the sandbox if this bwrap can, else without (and the reason
    says so). The reason also says how the memory of a check is bounded.
    """
    global _probe_result
    with _probe_lock:
        if _probe_result is None:
            exe = shutil.which("bwrap")
            if exe is None:
                _probe_result = (None, "bwrap is not installed (apt-get install bubblewrap)")
            else:
                _probe_result = _probe_bwrap(exe)
        backend, reason = _probe_result
    return backend is not None, reason


def _probe_bwrap(exe: str) -> tuple[_Backend | None, str]:
    reasons: list[str] = []
    for drop in [True, False] if os.geteuid() == 0 else [False]:
        notes: list[str] = []
        for mode, note in _userns_modes(exe, drop):
            backend = _Backend(exe, drop, mode)
            reason = _probe(backend)
            if reason is None:
                if mode == "open":
                    where = "; ".join(n for n in [*notes, note] if n)
                    users = f"user namespaces NOT disabled inside ({where})"
                else:
                    users = f"user namespaces disabled inside ({mode})"
                return backend, (
                    f"bwrap usable ({exe}, private uid={drop}, {users}; {_memory_note()})"
                )
            reasons.append(reason)
            notes.append(f"{mode}: {reason}")
    return None, f"bwrap at {exe} is not usable: {reasons[-1]}"


def _memory_note() -> str:
    ok, where = cgroup.status()
    if ok:
        return f"memory budget per check: {where}"
    return f"memory budget per check: process count x address space ({where})"


def _fallback_backend() -> _Backend:
    """The no-bwrap backend; as root, prefer dropping to a private uid if that works."""
    global _fallback_result
    with _probe_lock:
        if _fallback_result is None:
            variants = [(True, "identity"), (True, "open")] if os.geteuid() == 0 else []
            reasons: list[str] = []
            for drop, mode in [*variants, (False, "open")]:
                if mode == "identity" and userns.identity_userns()[0] is None:
                    continue
                reason = _probe(_Backend(None, drop, mode))
                if reason is None:
                    _fallback_result = (_Backend(None, drop, mode), "")
                    break
                reasons.append(reason)
            else:
                _fallback_result = (None, reasons[-1])
            _warn_about_fallback(_fallback_result[0], reasons)
        backend, reason = _fallback_result
    if backend is None:
        raise RuntimeError(f"the fallback sandbox (no bwrap) does not work here: {reason}")
    return backend


def _warn_about_fallback(backend: _Backend | None, reasons: list[str]) -> None:
    """Log what the fallback backend that was found cannot contain."""
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


def _resolve_backend(sandbox: str) -> _Backend:
    """The backend for a sandbox mode (``auto``, ``required`` or ``none``)."""
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
