"""The runner: the process inside the sandbox that runs the checks.

Started by the host (:mod:`signalrl.rewards.sandbox.pool`) as a script, never imported:
``python -I -S runner.py --serve (--isolated | --parent PID) [--preimport]``, under bwrap as
``/sandbox/runner.py``. It loads two more files by path from its own directory (under bwrap,
read-only binds as well): ``harness.py``, the two sides of a test, and ``sweep.py``, the
limits and privileges of the processes it forks, the killing of leftovers and the wiping of
the sandbox. Standard library only, and as little of it as it can: every program process is
forked from it, so a small runner makes each fork cheaper.

Protocol: on stdin, per check, two frames (``<length>\\n<json>``): the job (the program and
the settings), which the runner reads, and behind it the tests, which the runner **never
reads**: its harness process reads them, and writes each test's record to the host itself.
So no process forked from the runner (no program process) ever holds a test, or a failure's
traceback that quotes one, in its memory. The answers are lines ``<nonce> <json>`` on
stdout: ``{"ack": true}`` when the job was read, one ``{"index", "status", "detail"}`` per
test as soon as it is known, and ``{"done": true, "clean": ...}`` at the end (a check can
end before all its tests are reported when its harness died; the host runs the others
again).

The harness is forked once, before the first job (and again if it dies). Per test, on the
harness's request, the runner forks one program process (``harness.serve_calls``), hands it
the harness's socket, and keeps the clock: at the wall-clock limit it kills the program's
process group. When the harness has run the test (or the program's process ends, or the
limit passes) it kills what the test left behind (``sweep.sweep``) and tells the harness how
the program's process ended, which may decide the status. After every check it wipes and
verifies the sandbox (``sweep.cleanup``) and exits if that fails, so that the host starts a
fresh one. The package's docstring (:mod:`signalrl.rewards.sandbox`) describes the layers of
containment.
"""

from __future__ import annotations

import functools
import json
import os
import select
import signal
import socket
import stat
import sys
import time
import types
from typing import Any, NoReturn

_OUTPUT_HEAD_BYTES = 600
# Standard-library modules imported by the runner before it drops privileges when running
# without bubblewrap: the interpreter may live under a directory the sandbox uid cannot
# traverse (e.g. pyenv under /root), so later imports of these would fail.
_PREIMPORT = (
    "abc array base64 binascii bisect calendar cmath collections collections.abc contextlib "
    "copy csv dataclasses datetime decimal enum errno fractions functools glob hashlib heapq "
    "io itertools json locale math numbers operator pprint queue random re shlex socket "
    "statistics string struct textwrap time typing unicodedata uuid warnings weakref zlib"
).split()
# How long the harness may take, beyond a test's limit and the sweep, to report the test.
_HARNESS_GRACE_S = 2.0

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWUSER = 0x10000000


def _load(name: str) -> Any:
    """Load ``name`` (a file beside this one) as a module, without importing it by name."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    module = types.ModuleType("_sandbox_" + name.removesuffix(".py"))
    module.__file__ = path
    with open(path, encoding="utf-8") as fh:
        exec(compile(fh.read(), path, "exec"), module.__dict__)
    return module


_H = _load("harness.py")
_S = _load("sweep.py")


def _read_frame(fd: int) -> Any:
    """The next frame ``<length>\\n<json>`` from ``fd``, read exactly (not a byte beyond
    it, so the next frame stays in the pipe for whoever reads it); None at end of input."""
    header = b""
    while not header.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            if header:
                raise EOFError("end of input inside a frame header")
            return None
        header += chunk
        if len(header) > 24:
            raise ValueError("malformed frame header")
    left = int(header)
    parts = []
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("end of input inside a frame")
        parts.append(chunk)
        left -= len(chunk)
    return json.loads(b"".join(parts).decode("utf-8"))


def _keep_only(*fds: int) -> None:
    """Close every file descriptor from 3 up, except ``fds``."""
    start = 3
    for fd in sorted(fds):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, 1 << 16)


def _has_exited(pid: int) -> bool:
    """Whether ``pid`` has exited, without reaping it (so its pid cannot be reused yet)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _wait(pid: int) -> int:
    """Reap ``pid`` (or take its status if a sweep reaped it); its wait status."""
    if pid in _S.reaped:
        return int(_S.reaped.pop(pid))
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return 0


# --------------------------------------------------------------------------------------
# The forked processes: a program process per test, a harness per check
# --------------------------------------------------------------------------------------


def _candidate_main(job: dict[str, Any], position: int, chan_fd: int) -> NoReturn:
    """Forked program process: set up, then run the program and answer the harness's calls.

    It keeps only its socket to the harness; stdout and stderr go to an output file that
    the runner reads; it runs as the check's own uid, under the resource limits.
    """
    os.setpgid(0, 0)
    workdir = job["workdir"]
    os.chdir(workdir)
    try:  # while still privileged: a memory cgroup's OOM killer takes the program first
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write("1000")
    except OSError:
        pass
    _S.drop_privileges(job["uid"])
    if not job["isolated"]:
        # Die with the runner (under bwrap its PID namespace does that). Set after the uid
        # change, which clears the setting.
        _S.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        os.environ["HOME"] = workdir
    _S.prctl(_PR_SET_NO_NEW_PRIVS, 1)  # no gain from setuid binaries (bwrap sets it too)
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
    _keep_only(chan_fd)  # also closes null_fd, out_fd and the runner's own pipes
    _S.set_limits(job["limits"], job["timeout"])
    _H.serve_calls(job["program"], chan_fd)
    os._exit(0)


def _harness_main(ctrl_fd: int, uid: int | None, isolated: bool) -> NoReturn:
    """The harness, forked once per runner before the first job: for each check the runner
    announces, read its tests (the frame behind the job on the runner's stdin), run them,
    and report each test's record to the host itself (on a copy of the runner's stdout)."""
    ctrl = socket.socket(fileno=ctrl_fd)
    jobs_fd, host_fd = os.dup(0), os.dup(1)
    null_fd = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the tests read nothing and what they print goes nowhere
        os.dup2(null_fd, fd)
    _keep_only(ctrl_fd, jobs_fd, host_fd)
    os.chdir("/")
    _S.drop_privileges(uid)
    _S.prctl(_PR_SET_DUMPABLE, 0)  # not even a process of the same uid may ptrace it
    if not isolated:
        _S.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    while True:
        data = ctrl.recv(1 << 16)
        if not data:
            os._exit(0)
        job = json.loads(data)["job"]
        try:
            frame = _read_frame(jobs_fd)
        except (OSError, ValueError):
            frame = None
        ctrl.send(_H.dumps({"loaded": isinstance(frame, dict)}))
        if not isinstance(frame, dict):
            os._exit(1)
        _S.set_limits(job["limits"], job["timeout"], program=False)
        report = functools.partial(_report, host_fd, job["nonce"], frame["indices"])
        timeout = float(job["timeout"])
        if not _H.run_tests(ctrl, frame["tests"], frame["entry_point"], timeout, report):
            os._exit(1)
        ctrl.send(_H.dumps({"check_done": True}))
        del frame, job


def _report(
    fd: int, nonce: str, indices: list[int], position: int, status: str, detail: str
) -> None:
    """The harness's record of one test, written to the host."""
    _emit(nonce, {"index": indices[position], "status": status, "detail": detail}, fd)


class _Harness:
    """The runner's harness process, and the runner's end of the socket to it."""

    def __init__(self, uid: int | None, isolated: bool) -> None:
        self.uid = uid
        self.isolated = isolated
        self.pid: int | None = None
        self.ctrl: socket.socket | None = None

    def start(self) -> None:
        ctrl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            try:
                ctrl.close()
                _harness_main(theirs.fileno(), self.uid, self.isolated)
            finally:
                os._exit(70)
        theirs.close()
        self.pid, self.ctrl = pid, ctrl

    def stop(self) -> None:
        """Kill it (a fresh one starts for the next check)."""
        if self.pid is None or self.ctrl is None:
            return
        self.ctrl.close()
        if self.pid not in _S.reaped:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass
        _wait(self.pid)
        self.pid = self.ctrl = None

    def announce(self, job: dict[str, Any]) -> bool:
        """Tell it a check is coming (starting it if needed); False if it cannot take it."""
        message = _H.dumps({"job": {k: job[k] for k in ("nonce", "timeout", "limits")}})
        for _ in range(2):
            if self.ctrl is None:
                self.start()
            assert self.ctrl is not None
            try:
                self.ctrl.send(message)
                return True
            except OSError:  # it died while idle (the tests are still unread): again
                self.stop()
        return False


# --------------------------------------------------------------------------------------
# One test: fork the program process, keep the clock, collect the harness's verdict
# --------------------------------------------------------------------------------------


class _Program:
    """The program process of one test, as the runner watches it."""

    def __init__(self, pid: int, timeout: float) -> None:
        self.pid = pid
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.pidfd = None
        self.done = False  # killed, reaped and swept
        self.timed_out = False
        self.wait_status: int | None = None  # how it ended, if it ended on its own

    def finish(self, job: dict[str, Any], spare: set[int], grace: float = 0.0) -> None:
        """Kill its process group, reap it, and sweep what it left behind; first give it
        ``grace`` seconds to end on its own (it is ending: its socket closed)."""
        limit = time.monotonic() + grace
        while not _has_exited(self.pid) and time.monotonic() < limit:
            select.select([], [], [], 0.002)
        exited = _has_exited(self.pid)  # not reaped yet, so its process group id is ours
        for target in (-self.pid, self.pid):
            try:
                os.kill(target, signal.SIGKILL)
            except OSError:
                pass
        status = _wait(self.pid)
        self.wait_status = status if exited else None
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self.done = True
        _S.sweep(job, spare)


def _receive(ctrl: socket.socket, deadline: float) -> tuple[dict[str, Any], list[int]] | None:
    """The harness's next message and the descriptors it carries; None on EOF or timeout."""
    poller = select.poll()
    poller.register(ctrl.fileno(), select.POLLIN)
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not poller.poll(max(1, int(remaining * 1000))):
        return None
    try:
        data, fds, _, _ = socket.recv_fds(ctrl, 1 << 16, 1)
    except OSError:
        return None
    try:
        message = json.loads(data) if data else None
    except ValueError:
        message = None
    if not isinstance(message, dict):
        for fd in fds:
            os.close(fd)
        return None
    return message, list(fds)


def _await_finished(
    ctrl: socket.socket, program: _Program, job: dict[str, Any], spare: set[int]
) -> dict[str, Any] | None:
    """Wait until the harness has run the test, killing the program at its deadline or when
    it ends; the harness's ``finished`` message (its status, no detail), None if it died."""
    backstop = program.deadline + _S.SWEEP_S + _HARNESS_GRACE_S
    while True:
        now = time.monotonic()
        if not program.done:
            if _has_exited(program.pid):
                program.finish(job, spare)
            elif now >= program.deadline:
                program.timed_out = True
                program.finish(job, spare)
        if now >= backstop:
            return None
        poller = select.poll()
        poller.register(ctrl.fileno(), select.POLLIN)
        if not program.done and program.pidfd is not None:
            poller.register(program.pidfd, select.POLLIN)
        until = backstop if program.done else program.deadline
        step = until - now
        if not program.done and program.pidfd is None:
            step = min(step, 0.05)  # without a pidfd, look for the exit every 50 ms
        try:
            events = poller.poll(max(1, int(step * 1000) + 1))
        except InterruptedError:
            continue
        if any(fd == ctrl.fileno() for fd, _ in events):
            received = _receive(ctrl, time.monotonic() + 1.0)
            return received[0] if received is not None else None


def _verdict(finished: dict[str, Any] | None, program: _Program) -> tuple[str | None, str]:
    """How the program's process decided the test: (status, detail), or (None, "") where
    the harness's own status stands."""
    harness = finished.get("status") if finished is not None else None
    gone = finished is None or bool(finished.get("gone"))
    if harness == "passed" and not gone:
        return None, ""
    if program.timed_out:
        return "timeout", f"exceeded the {program.timeout:g} s wall-clock limit"
    if harness in ("failed", "error", "timeout") and not gone:
        return None, ""
    wait_status = program.wait_status
    if wait_status is None:
        why = "the test harness stopped" if finished is None else "the program closed its socket"
        return "error", f"{why} before the test finished"
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        if sig == signal.SIGXCPU:
            return "timeout", "exceeded the CPU time limit (SIGXCPU)"
        if sig == signal.SIGXFSZ:
            return "killed", "exceeded the file/output size limit (SIGXFSZ)"
        return "killed", f"killed by {name}"
    code = os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status) else wait_status
    return "error", f"the process exited (status {code}) before the test finished"


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


def _run_test(
    job: dict[str, Any], position: int, chan_fd: int, ctrl: socket.socket, harness: int
) -> bool:
    """Fork the program process for one test and see it through: the harness runs the test
    and reports it; the runner gives it its verdict on the program's process (or reports
    the test itself if the harness died). Returns whether the harness can go on."""
    pid = os.fork()
    if pid == 0:
        try:
            _candidate_main(job, position, chan_fd)
        finally:
            os._exit(70)
    os.close(chan_fd)
    program = _Program(pid, float(job["timeout"]))
    finished = _await_finished(ctrl, program, job, {harness})
    if finished is not None and finished.get("finished") != position:
        finished = None
    if not program.done:
        program.finish(job, {harness}, grace=0.5 if finished and finished.get("gone") else 0.0)
    status, detail = _verdict(finished, program)
    final = status or (finished or {}).get("status")
    out_path = os.path.join(job["workdir"], f".output-{position}")
    output = "" if final == "passed" else _output_head(out_path)
    try:
        os.unlink(out_path)
    except OSError:
        pass
    if finished is not None:
        verdict = {"verdict": position, "status": status, "detail": detail, "output": output}
        try:
            ctrl.send(_H.dumps(verdict))
            return True
        except OSError:
            pass
    record = {"index": job["indices"][position], "status": status or "error"}
    record["detail"] = detail + (f"; output: {output}" if output else "")
    _emit(job["nonce"], record)
    return False


def _run_check(job: dict[str, Any], harness: _Harness) -> bool:
    """Have the harness run the check's tests, forking a program process for each. Returns
    False if the tests' frame may still be (partly) unread on stdin, so that the next job
    cannot be read."""
    if not harness.announce(job):
        return False
    assert harness.ctrl is not None and harness.pid is not None
    ctrl, pid = harness.ctrl, harness.pid
    patience = float(job["timeout"]) + _S.SWEEP_S + _HARNESS_GRACE_S
    loaded = _receive(ctrl, time.monotonic() + patience)
    if loaded is None or not loaded[0].get("loaded"):
        harness.stop()
        return False
    ok = True
    for position in range(len(job["indices"])):
        request = _receive(ctrl, time.monotonic() + patience)
        if request is None or request[0].get("run") != position or len(request[1]) != 1:
            for fd in request[1] if request is not None else []:
                os.close(fd)
            ok = False
            break
        if not _run_test(job, position, request[1][0], ctrl, pid):
            ok = False
            break
    if ok:  # the harness has reported the last test
        done = _receive(ctrl, time.monotonic() + patience)
        ok = done is not None and bool(done[0].get("check_done"))
    if not ok:
        harness.stop()
    return True


def _emit(nonce: str, record: dict[str, Any], fd: int = 1) -> None:
    """Write one record to the host, in one write (so within the pipe's atomic size)."""
    detail = str(record.get("detail", ""))
    while True:
        if "detail" in record:
            record = {**record, "detail": _H.truncate(detail)}
        line = f"{nonce} {json.dumps(record)}\n"
        if len(line) <= 4000 or len(detail) < 100:
            break
        detail = detail[: len(detail) // 2]
    data = memoryview(line.encode("ascii"))
    while data:
        data = data[os.write(fd, data) :]


def _prepare(argv: list[str]) -> None:
    """Set the runner up before it reads its first job."""
    if "--userns-fd" in argv:  # without bwrap: enter the namespace that has no user namespaces
        fd = int(argv[argv.index("--userns-fd") + 1])
        if _S.libc_call("setns", fd, _CLONE_NEWUSER) != 0:
            sys.exit("the runner could not enter its user namespace")
        os.close(fd)
    if "--parent" in argv:  # without bwrap (which has --die-with-parent): die with the host
        # (Set after setns, whose change of credentials clears it.)
        _S.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != int(argv[argv.index("--parent") + 1]):
            sys.exit(1)
    # Not dumpable: processes of the same uid cannot ptrace us or open /proc/<pid>/fd/*.
    _S.prctl(_PR_SET_DUMPABLE, 0)
    # Orphans of the program processes are re-parented to us, so we can reap them.
    _S.prctl(_PR_SET_CHILD_SUBREAPER, 1)
    if "--preimport" in argv:
        import importlib

        for name in _PREIMPORT:
            try:
                importlib.import_module(name)
            except ImportError:
                pass
    # Pre-import what the forked processes need (they may lose access to the stdlib dir),
    # and what ``site`` would have provided without its start-up cost (``-S``): the
    # site-packages directories (without .pth hooks) and the exit()/quit() builtins.
    import math  # noqa: F401
    import resource
    import site

    site.setquit()
    for path in site.getsitepackages():
        if os.path.isdir(path) and path not in sys.path:
            sys.path.append(path)
    _S.libc_call("getpid")  # load libc through ctypes now
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Exempt everything imported so far from garbage collection: a collection in a forked
    # process would otherwise touch (and so copy) every page of the runner's heap.
    import gc

    gc.freeze()


def _serve(argv: list[str]) -> int:
    """Entry point inside the sandbox: run checks read from stdin until end of input.

    Arguments: ``--isolated`` under bwrap; ``--parent PID`` without it (the runner dies
    with the host process); ``--preimport`` to import the standard library up front;
    ``--userns-fd FD`` (without bwrap) to enter that user namespace first;
    ``--harness-uid UID``: the uid of the harness.
    """
    isolated = "--isolated" in argv
    _prepare(argv)
    baseline = _S.fs_state() if isolated else None
    uid = int(argv[argv.index("--harness-uid") + 1]) if "--harness-uid" in argv else None
    harness = _Harness(uid, isolated)
    harness.start()  # before the first job: it never holds a program
    while True:
        job = _read_frame(0)
        if job is None:
            return 0
        nonce = job["nonce"]
        _emit(nonce, {"ack": True})
        clean = _run_check(job, harness)
        spare = {harness.pid} if harness.pid is not None else set()
        clean = clean and _S.cleanup(job, baseline, spare)
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
