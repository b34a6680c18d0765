"""Host-side control of a helper process: spawn it, talk to it, time it out, kill it.

Two pools of long-lived helper processes use this module, each for the untrusted or
unbounded work it must not do in the caller's process:

* the sandbox pool (:mod:`signalrl.rewards.sandbox.pool`): sandboxed runners that execute
  generated programs against their tests;
* the math-verify pool (:mod:`signalrl.rewards.math`): workers that compare answers with
  sympy, whose long C calls no signal interrupts.

Both talk to their helper in lines over its stdin/stdout, and both need the same things:
a child in its own session (so that one kill reaches everything it started), writes and
reads that never block past a wall-clock deadline, a cap on what is read, the tail of its
stderr for the error message, and a way to end it that cannot hang: let it exit on end of
input (optional), then ``SIGKILL`` its process group, then reap it for a bounded time.
:func:`spawn` and :class:`Channel` are that code.

Standard library only, and nothing of ``signalrl``: importing it costs nothing beyond the
standard library. (The sandbox's runner, which runs inside the sandbox, does not use it:
it forks and times its test processes itself, see ``runner.py``.)
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
from typing import Any, cast

__all__ = [
    "REAP_S",
    "Channel",
    "ChildClosed",
    "ChildTimeout",
    "OutputCapExceeded",
    "Spawner",
    "kill_process_group",
    "spawn",
]

# How long a child that was sent SIGKILL may take to be reaped; after that it is left to
# the subprocess module, which reaps it later (a process stuck in the kernel can take long).
REAP_S = 10.0
_CHUNK = 65536


class ChildTimeout(Exception):
    """The child did not answer before the deadline."""


class ChildClosed(Exception):
    """The child closed its output (it exited), so no answer can come any more."""


class OutputCapExceeded(ChildClosed):
    """The child wrote more than the cap allows for one answer; the channel is closed."""


def spawn(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    stderr: bool = True,
    pass_fds: tuple[int, ...] = (),
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with pipes on stdin and stdout (and stderr, else ``/dev/null``).

    The child gets a new session, hence its own process group (see
    :func:`kill_process_group`), and no file descriptors of ours beyond its pipes (and
    ``pass_fds``).
    """
    return subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if stderr else subprocess.DEVNULL,
        cwd=cwd,
        env=env,
        start_new_session=True,
        close_fds=True,
        pass_fds=pass_fds,
    )


def kill_process_group(proc: subprocess.Popen[bytes]) -> None:
    """``SIGKILL`` the process group that :func:`spawn` made ``proc`` the leader of.

    Only while ``proc`` is not reaped, so that its pid (the group's id) cannot have been
    reused. Falls back to killing ``proc`` alone if the group cannot be signalled.
    """
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        try:
            proc.kill()
        except OSError:
            pass


class Spawner:
    """Starts children from one long-lived thread.

    ``PR_SET_PDEATHSIG`` (e.g. ``bwrap --die-with-parent``) fires when the *thread* that
    started the child exits, not the process. Children that outlive the call (and the
    worker threads of a ``ThreadPoolExecutor``) that first needed them are started here.
    Create a new one in a forked child process (the thread does not survive a fork).
    """

    def __init__(self, name: str = "signalrl-spawner") -> None:
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._requests: list[tuple[list[str], dict[str, Any], list[Any]]] = []
        self._thread: threading.Thread | None = None

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """:func:`spawn` ``argv`` (with ``kwargs``) from the long-lived thread."""
        slot: list[Any] = []
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._requests.append((argv, kwargs, slot))
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
                argv, kwargs, slot = self._requests.pop(0)
            try:
                result: tuple[bool, Any] = (True, spawn(argv, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                result = (False, exc)
            with self._cond:
                slot.append(result)
                self._cond.notify_all()


class Channel:
    """Line-based talk with a child started by :func:`spawn`, under wall-clock deadlines.

    All pipes are non-blocking and served by one ``poll`` loop: what :meth:`send` queued is
    written while :meth:`read_line` waits for the answer, so a child that stops reading
    cannot block the caller, and stderr (if piped) is collected meanwhile, up to
    ``stderr_cap`` bytes, so a chatty child cannot fill the pipe and stall either.
    """

    def __init__(self, proc: subprocess.Popen[bytes], stderr_cap: int = 8192) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self._in_fd = proc.stdin.fileno()
        self._out_fd = proc.stdout.fileno()
        self._err_fd = proc.stderr.fileno() if proc.stderr is not None else None
        self._poller = select.poll()  # not select(): host fds may exceed FD_SETSIZE
        for fd in (self._in_fd, self._out_fd, self._err_fd):
            if fd is not None:
                os.set_blocking(fd, False)
        self._poller.register(self._out_fd, select.POLLIN)
        self._err_open = self._err_fd is not None
        if self._err_fd is not None:
            self._poller.register(self._err_fd, select.POLLIN)
        self._unsent = memoryview(b"")
        self._writing = False  # stdin is registered with the poller
        self._lines = bytearray()  # stdout read but not yet returned
        self._closed: ChildClosed | None = None  # why no more lines will come
        self._received = 0  # stdout bytes read since the last send()
        self._cap: int | None = None
        self._stderr = bytearray()
        self._stderr_cap = stderr_cap

    def alive(self) -> bool:
        """Whether the child has not exited yet."""
        return self.proc.poll() is None

    def send(self, data: bytes, *, reply_cap: int | None = None) -> None:
        """Queue ``data`` for the child's stdin, and cap its answer at ``reply_cap`` bytes.

        What the pipe takes now is written at once, the rest while :meth:`read_line`
        waits. The count of bytes read from stdout restarts here. A child that has closed
        its stdin loses the data (its end of output will follow).
        """
        self._received, self._cap = 0, reply_cap
        if self.proc.stdin is None or self.proc.stdin.closed:  # after end_input()
            return
        self._unsent = memoryview(bytes(self._unsent) + data) if self._unsent else memoryview(data)
        self._write()
        if self._unsent and not self._writing:
            self._poller.register(self._in_fd, select.POLLOUT)
            self._writing = True

    def read_line(self, deadline: float) -> bytes:
        """The next line of the child's stdout (without its newline).

        Raises:
            ChildTimeout: no full line before ``deadline`` (a ``time.monotonic()`` value).
            ChildClosed: the child closed its stdout first (it exited or crashed).
            OutputCapExceeded: it wrote more than the ``reply_cap`` of the last send.
        """
        while True:
            end = self._lines.find(b"\n")
            if end >= 0:
                line = bytes(self._lines[:end])
                del self._lines[: end + 1]
                return line
            if self._closed is not None:
                raise type(self._closed)(*self._closed.args)
            self._pump(deadline)

    def take_stderr(self) -> bytes:
        """The stderr collected so far (at most ``stderr_cap`` bytes), and forget it."""
        data, self._stderr = bytes(self._stderr), bytearray()
        return data

    def drain_stderr(self, wait_s: float) -> bytes:
        """What a dying child still writes to stderr until it closes it, for up to ``wait_s``
        seconds and at most ``stderr_cap`` bytes (besides what :meth:`take_stderr` holds)."""
        out = bytearray()
        if self._err_fd is None or not self._err_open:
            return b""
        deadline = time.monotonic() + wait_s
        while len(out) < self._stderr_cap and time.monotonic() < deadline:
            try:
                chunk = os.read(self._err_fd, self._stderr_cap)
            except BlockingIOError:
                select.select([], [], [], 0.01)
                continue
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return bytes(out[: self._stderr_cap])

    def end_input(self) -> None:
        """Close the child's stdin (a line-serving child exits at end of input)."""
        if self._writing:
            self._poller.unregister(self._in_fd)
            self._writing = False
        self._unsent = memoryview(b"")
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def stop(self, grace_s: float = 0.0) -> None:
        """End the child for good, in a bounded time.

        With ``grace_s`` > 0 its stdin is closed first and it may exit on its own for that
        long; then its process group gets ``SIGKILL`` (:func:`kill_process_group`), it is
        reaped (waiting at most :data:`REAP_S`), and the pipes are closed.
        """
        if grace_s > 0:
            self.end_input()
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            kill_process_group(self.proc)
            try:
                self.proc.wait(timeout=REAP_S)
            except subprocess.TimeoutExpired:
                pass
        self.close_fds()

    def close_fds(self) -> None:
        """Close our ends of the pipes, without signalling the child (e.g. after a fork)."""
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    def _pump(self, deadline: float) -> None:
        """One round of I/O: wait (until ``deadline`` at most) for the pipes, serve them."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ChildTimeout(f"no answer within the deadline (pid {self.proc.pid})")
        try:
            events = self._poller.poll(max(1, int(remaining * 1000)))
        except InterruptedError:
            return
        for fd, _ in events:
            if fd == self._in_fd and self._writing:
                self._write()
                if not self._unsent:
                    self._poller.unregister(self._in_fd)
                    self._writing = False
            elif fd == self._err_fd:
                self._read_stderr()
            elif fd == self._out_fd and self._closed is None:
                self._read_stdout()

    def _write(self) -> None:
        if not self._unsent:
            return
        try:
            written = os.write(self._in_fd, self._unsent[:_CHUNK])
        except BlockingIOError:
            return
        except OSError:  # broken pipe: the child is gone; the end of its output will follow
            written = len(self._unsent)
        self._unsent = self._unsent[written:]

    def _read_stdout(self) -> None:
        try:
            chunk = os.read(self._out_fd, _CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._closed = ChildClosed(f"the child (pid {self.proc.pid}) closed its output")
        else:
            self._received += len(chunk)
            if self._cap is not None and self._received > self._cap:
                self._closed = OutputCapExceeded(f"the child's output exceeded {self._cap} bytes")
            else:
                self._lines += chunk
                return
        self._poller.unregister(self._out_fd)

    def _read_stderr(self) -> None:
        assert self._err_fd is not None
        try:
            chunk = os.read(self._err_fd, _CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._poller.unregister(self._err_fd)
            self._err_open = False
            return
        room = self._stderr_cap - len(self._stderr)
        if room > 0:
            self._stderr += chunk[:room]
