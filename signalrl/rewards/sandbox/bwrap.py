"""The backends that start a runner: bubblewrap, or the fallback without it.

:class:`_Backend` builds the runner's command line: under bubblewrap a fresh, read-only
root that shows only the system libraries, the interpreter and the runner script, with
new PID/network/IPC/UTS namespaces and only the capabilities the runner needs; without
bubblewrap the bare runner with a clean environment. :func:`bwrap_status` probes once
per process whether bubblewrap works here, by running the real runner on a trivial job,
and :func:`_resolve_backend` turns a sandbox mode (``auto``, ``required``, ``none``) into
a backend, warning once when ``auto`` falls back.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from dataclasses import dataclass

from signalrl.rewards.sandbox import pool
from signalrl.rewards.sandbox.config import SANDBOX_MODES, SandboxLimits

logger = logging.getLogger(__name__)

_SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
# Where bwrap shows the runner script (a read-only bind of runner.py).
_SANDBOX_RUNNER = "/sandbox/runner.py"
# Capabilities the runner keeps as root under bwrap when it drops to a private uid:
# set uid/gid, kill, and override file permissions to wipe the tmpfs.
_RUNNER_CAPS = ("SETUID", "SETGID", "KILL", "DAC_OVERRIDE", "FOWNER")

_probe_lock = threading.Lock()
_probe_result: tuple[_Backend | None, str] | None = None
_fallback_result: tuple[_Backend | None, str] | None = None
_warned_fallback = False
_python_cache: dict[str, tuple[str, list[str]]] = {}


@dataclass(frozen=True)
class _Backend:
    """How to launch the runner: with bwrap or not, and whether to drop to a private uid."""

    bwrap: str | None
    drop_uid: bool

    def runner_command(self, tmpfs_bytes: int) -> tuple[list[str], dict[str, str]]:
        """The runner's command line and environment (see the module docstring)."""
        exe, _ = _interpreter()
        env = {"PATH": _SANDBOX_PATH, "LANG": "C.UTF-8"}
        if self.bwrap is not None:
            argv = [*_bwrap_argv(self.bwrap, tmpfs_bytes, self.drop_uid), exe, "-I", "-S"]
            argv += [_SANDBOX_RUNNER, "--serve", "--isolated"]
        else:
            argv = [exe, "-I", "-S", _runner_path(), "--serve", "--parent", str(os.getpid())]
            if self.drop_uid and not _interpreter_accessible():
                argv.append("--preimport")
            env["HOME"] = "/"
        return argv, env


def _runner_path() -> str:
    """The runner script, which the host starts but never imports."""
    return os.path.join(os.path.dirname(os.path.realpath(__file__)), "runner.py")


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
    argv += ["--ro-bind", _runner_path(), _SANDBOX_RUNNER, "--remount-ro", "/"]
    argv += ["--chdir", "/work"]
    if os.geteuid() == 0:
        # As root bwrap would keep every capability; the runner needs only these (the
        # test processes lose them all when they switch to their own uid).
        argv += ["--cap-drop", "ALL"]
        if drop_uid:
            for cap in _RUNNER_CAPS:
                argv += ["--cap-add", f"CAP_{cap}"]
    return argv


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
