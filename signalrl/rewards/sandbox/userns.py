"""Host side: the user namespace that keeps a root sandbox from creating user namespaces.

Inside the sandbox a program must not create user namespaces (``unshare(CLONE_NEWUSER)``):
they widen what of the kernel it can reach. bubblewrap's ``--disable-userns`` does that,
but only together with ``--unshare-user``, which maps a single uid into the sandbox; as
root, where every check's program runs as a private uid of its own, that is not enough. So
for root this module makes, once per process, a user namespace that maps every uid to
itself (nothing changes for files, signals or ``setuid``) and in which
``user.max_user_namespaces`` is 0, and bwrap enters it (``--userns FD
--assert-userns-disabled``). A small helper process creates it (the host process may have
threads, and ``unshare`` needs a single-threaded caller) and exits; the host keeps a
descriptor of the namespace open.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from signalrl.rewards.sandbox import process

__all__ = ["identity_userns"]

_HELPER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
    sys.stdout.write("error unshare: %s\n" % os.strerror(ctypes.get_errno()))
    sys.exit(1)
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()  # the host has written our uid and gid maps
with open("/proc/sys/user/max_user_namespaces", "w") as fh:
    fh.write("0")
sys.stdout.write("done\n"); sys.stdout.flush()
sys.stdin.readline()
"""
_FULL_MAP = "0 0 4294967295\n"  # every uid (but the invalid -1) to itself

_lock = threading.Lock()
_result: tuple[int | None, str] | None = None


def _make() -> tuple[int | None, str]:
    if os.geteuid() != 0:
        return None, "needs root"
    exe = os.path.realpath(sys.executable)
    channel = process.Channel(process.spawn([exe, "-I", "-S", "-c", _HELPER], cwd="/"))
    try:
        deadline = time.monotonic() + 10.0
        line = channel.read_line(deadline)
        if line != b"ready":
            return None, line.decode("utf-8", "replace") or "the helper failed"
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{channel.proc.pid}/{name}", "w", encoding="ascii") as fh:
                fh.write(_FULL_MAP)
        channel.send(b"go\n")
        if channel.read_line(deadline) != b"done":
            return None, "could not set user.max_user_namespaces in the new namespace"
        fd = os.open(f"/proc/{channel.proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        return fd, "a uid-identity user namespace with user.max_user_namespaces=0"
    except (OSError, process.ChildTimeout, process.ChildClosed) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        channel.stop(grace_s=1.0)


def identity_userns() -> tuple[int | None, str]:
    """A descriptor of that user namespace (made once, then cached), or None and why not."""
    global _result
    with _lock:
        if _result is None:
            _result = _make()
        return _result
