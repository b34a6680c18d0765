"""Tests for the pooled sandbox runners: reuse, and isolation between the checks that share
a runner (files, processes, IPC), restart of dead runners, the memory budget of a check, user
namespaces, the harness out of the program's reach. Real bubblewrap, real processes.

Three configurations run the isolation tests where they are available:

* ``bwrap``: what ``sandbox="required"`` resolves to here (as root: a private uid per check);
* ``bwrap-shared-uid`` (root only): bwrap without the private uid, so the program processes
  have the runner's own uid, as under bwrap without root; they can kill the runner and
  write to ``/dev``, which the runner must notice;
* ``none``: the fallback without bwrap (its containment needs root).
"""

from __future__ import annotations

import ast
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import signalrl.rewards.math as math_rewards
import signalrl.rewards.sandbox as sb
import signalrl.rewards.sandbox.bwrap as sandbox_bwrap
import signalrl.rewards.sandbox.cgroup as sandbox_cgroup
import signalrl.rewards.sandbox.pool as sandbox_pool
from signalrl.rewards.code import bwrap_status, code_reward
from signalrl.rewards.sandbox import process

IS_ROOT = os.geteuid() == 0
ADD = "def add(a, b):\n    return a + b\n"
SANDBOX_DIR = Path(sb.__file__).parent
SCRIPTS = ("runner.py", "harness.py", "sweep.py")  # what runs inside the sandbox


def _bwrap_backend() -> sb._Backend:
    ok, reason = bwrap_status()
    if not ok:
        pytest.skip(f"bubblewrap not usable here: {reason}")
    return sb._resolve_backend("required")


def _shared_uid_backend() -> sb._Backend:
    """bwrap as root without the private uid (user namespaces kept out as bwrap can)."""
    exe = _bwrap_backend().bwrap
    assert exe is not None
    return sb._Backend(exe, drop_uid=False, userns=sandbox_bwrap._userns_modes(exe, False)[0][0])


def _idle(backend: sb._Backend, limits: sb.SandboxLimits | None = None) -> list[sb._Worker]:
    limits = limits or sb.SandboxLimits()
    return sb._POOL._idle[(backend, limits.tmpfs_bytes, limits.memory_budget_bytes)]


@pytest.fixture(params=["bwrap", "bwrap-shared-uid", "none"])
def backend(request: pytest.FixtureRequest) -> sb._Backend:
    """A sandbox configuration (see the module docstring)."""
    if request.param == "bwrap":
        return _bwrap_backend()
    if request.param == "bwrap-shared-uid":
        if not IS_ROOT:
            pytest.skip("as non-root, 'bwrap' already is the shared-uid configuration")
        return _shared_uid_backend()
    if not IS_ROOT:
        pytest.skip("without bwrap and without root there is no private uid per check")
    return sb._fallback_backend()


def _run(
    backend: sb._Backend,
    program: str,
    tests: list[str],
    timeout: float = 5.0,
    limits: sb.SandboxLimits | None = None,
) -> list[str]:
    outcomes = sb._run_all(program, tests, None, timeout, limits or sb.SandboxLimits(), backend)
    return [o.status for o in outcomes]


def _processes_named(name: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as fh:
                    if fh.read().strip() == name:
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def _runner_pid(worker: sb._Worker) -> int:
    """The runner of a pooled worker (inside bwrap's namespace, or the process itself); not
    its harness, a fork of it one level further down."""
    for pid in [worker.proc.pid, *_descendants(worker.proc.pid)]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
            if not argv[0].endswith(b"bwrap") and any(a.endswith(b"runner.py") for a in argv):
                return pid
        except OSError:
            continue
    raise AssertionError("no runner found")


def _descendants(pid: int) -> list[int]:
    """All descendants of ``pid`` (from /proc), deepest last."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def test_runners_are_reused(backend: sb._Backend) -> None:
    assert _run(backend, ADD, ["assert add(1, 2) == 3"]) == ["passed"]
    started = sb._POOL.started
    for _ in range(5):
        assert _run(backend, ADD, ["assert add(1, 2) == 3", "assert add(1, 1) == 3"]) == [
            "passed",
            "failed",
        ]
    assert sb._POOL.started == started


def test_files_do_not_reach_the_next_check(backend: sb._Backend) -> None:
    name = "srl-leak-" + secrets.token_hex(6)
    places = [name, os.path.join("~", name)]
    if backend.bwrap is not None:  # without bwrap, the host's /tmp etc. are shared (documented)
        places += [os.path.join(d, name) for d in ("/tmp", "/dev/shm", "/")]
    writer = (
        "import os\n"
        "def leave():\n"
        f"    for place in {places!r}:\n"
        "        place = os.path.expanduser(place)\n"
        "        try:\n"
        "            os.makedirs(place + '.d/sub', exist_ok=True)\n"
        "            os.chmod(place + '.d', 0)\n"
        "            with open(place, 'w') as fh:\n"
        "                fh.write('from the previous check')\n"
        "        except OSError:\n"
        "            pass\n"
        "    return True\n"
    )
    reader = (
        "import os\n"
        "def found():\n"
        f"    return [p for p in {places!r}\n"
        "            if os.path.lexists(os.path.expanduser(p))\n"
        "            or os.path.lexists(os.path.expanduser(p) + '.d')]\n"
    )
    assert _run(backend, writer, ["assert leave()"]) == ["passed"]
    started = sb._POOL.started
    assert _run(backend, reader, ["assert found() == [], found()"]) == ["passed"]
    assert sb._POOL.started == started  # the same runner, wiped, not a fresh one


def test_capabilities(backend: sb._Backend) -> None:
    if backend.bwrap is None:
        pytest.skip("without bwrap the runner is the host's own process")
    program = (
        "import os\n"
        "def caps(pid=None):\n"
        "    with open(f'/proc/{pid or os.getpid()}/status') as fh:\n"
        "        line = next(x for x in fh if x.startswith('CapEff:'))\n"
        "    return int(line.split()[1], 16)\n"
        "def runner_caps():\n"
        "    return caps(os.getppid())\n"
    )
    # setuid, setgid, kill, dac_override, fowner: what the runner needs with a private uid.
    runner_may = sum(1 << bit for bit in (7, 6, 5, 1, 3)) if backend.drop_uid else 0
    tests = [
        "assert caps() == 0",
        f"assert runner_caps() & ~{runner_may} == 0, hex(runner_caps())",
    ]
    assert _run(backend, program, tests) == ["passed", "passed"]


def test_background_process_does_not_outlive_its_test(backend: sb._Backend) -> None:
    marker = "srl" + secrets.token_hex(5)  # comm names are at most 15 bytes
    daemon = (
        "import ctypes, os, time\n"
        "def detach():\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        "        if os.fork() == 0:\n"
        f"            ctypes.CDLL(None).prctl(15, b'{marker}', 0, 0, 0)  # PR_SET_NAME\n"
        "            time.sleep(60)\n"
        "        os._exit(0)\n"
        "    time.sleep(0.2)\n"
        "    return True\n"
    )
    assert _run(backend, daemon, ["assert detach()"]) == ["passed"]
    assert _processes_named(marker) == [], "a background process survived its test"
    if backend.bwrap is not None:
        # Inside the PID namespace only bwrap's init, the runner, the check's harness (the
        # runner's other child) and the program's process are left.
        alone = (
            "import os\n"
            "def parent(pid):\n"
            "    with open(f'/proc/{pid}/stat') as fh:\n"
            "        return int(fh.read().rsplit(')', 1)[1].split()[1])\n"
            "me, runner = os.getpid(), os.getppid()\n"
            "pids = {int(p) for p in os.listdir('/proc') if p.isdigit()} - {1, runner, me}\n"
            "harnesses = {p for p in pids if parent(p) == runner}\n"
            "others = pids - harnesses\n"
        )
        test = "assert not others and len(harnesses) == 1, (others, harnesses)"
        assert _run(backend, alone, [test]) == ["passed"]


def test_sysv_ipc_does_not_reach_the_next_check(backend: sb._Backend) -> None:
    key = 0x5000_0000 + secrets.randbelow(1 << 24)
    create = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def create():\n"
        f"    msq = libc.msgget({key}, 0o1666)  # IPC_CREAT | 0o666\n"
        f"    shm = libc.shmget({key}, 4096, 0o1666)\n"
        f"    sem = libc.semget({key}, 1, 0o1666)\n"
        "    return msq >= 0 and shm >= 0 and sem >= 0\n"
    )
    probe = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"found = [libc.msgget({key}, 0), libc.shmget({key}, 0, 0), libc.semget({key}, 0, 0)]\n"
    )
    assert _run(backend, create, ["assert create()"]) == ["passed"]
    assert _run(backend, probe, ["assert found == [-1, -1, -1], found"]) == ["passed"]
    if backend.bwrap is None:  # the host's own IPC namespace: nothing is left there either
        for kind in ("msg", "shm", "sem"):
            with open(f"/proc/sysvipc/{kind}") as fh:
                assert str(key) not in {line.split()[0] for line in fh if line.strip()}


def test_posix_message_queues_are_refused(backend: sb._Backend) -> None:
    program = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def mq():\n"
        "    if not hasattr(libc, 'mq_open'):\n"
        "        return -1\n"
        f"    return libc.mq_open(b'/srl-{secrets.token_hex(4)}', os.O_CREAT | os.O_RDWR,"
        " 0o600, None)\n"
    )
    assert _run(backend, program, ["assert mq() == -1"]) == ["passed"]


def test_a_runner_that_died_while_idle_is_replaced(
    backend: sb._Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    tests = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]
    for pretend_alive in (False, True):
        assert _run(backend, ADD, tests) == ["passed", "passed"]
        idle = _idle(backend)
        assert idle
        for worker in idle:
            # The runner itself (inside bwrap's namespace), so that it is surely gone
            # once its bwrap has exited.
            os.kill(_runner_pid(worker), signal.SIGKILL)
            worker.proc.wait(timeout=30)
        if pretend_alive:  # the runner dies between the pool's check and the job
            monkeypatch.setattr(sb._Worker, "alive", lambda self: True)
        # Not the program's fault: no test is scored 0 for it.
        assert _run(backend, ADD, tests) == ["passed", "passed"]
        monkeypatch.undo()


def test_program_that_kills_its_runner(backend: sb._Backend) -> None:
    program = "import os, signal\ndef f():\n    os.kill(os.getppid(), signal.SIGKILL)\n"
    tests = ["f()", "assert 1 + 1 == 2"]
    started = sb._POOL.started
    statuses = _run(backend, program, tests)
    if backend.drop_uid:  # the runner is out of reach
        assert statuses == ["error", "passed"]
        assert sb._POOL.started == started
    else:  # killed: its test scores 0, the next one runs in a fresh runner
        assert statuses == ["killed", "passed"]
        assert sb._POOL.started > started
    assert _run(backend, ADD, ["assert add(2, 3) == 5"]) == ["passed"]


def test_changes_that_cannot_be_wiped_retire_the_runner() -> None:
    if not IS_ROOT:
        pytest.skip("needs the shared-uid bwrap configuration (root)")
    backend = _shared_uid_backend()
    name = "srl-" + secrets.token_hex(6)
    vandal = (
        "import os\n"
        "def vandalise():\n"
        f"    open('/dev/{name}', 'w').close()\n"
        "    os.chmod('/work', 0o700)\n"
        "    return True\n"
    )
    assert _run(backend, ADD, ["assert add(1, 1) == 2"]) == ["passed"]
    started = sb._POOL.started
    assert _run(backend, vandal, ["assert vandalise()"]) == ["passed"]
    check = f"import os, stat\nmode = stat.S_IMODE(os.stat('/work').st_mode)\nname = {name!r}\n"
    test = "assert mode == 0o1777 and name not in os.listdir('/dev')"
    assert _run(backend, check, [test]) == ["passed"]
    assert sb._POOL.started == started + 1  # that runner was retired, a fresh one started


def test_forked_host_process_starts_its_own_runners() -> None:
    backend = _bwrap_backend()
    assert _run(backend, ADD, ["assert add(1, 2) == 3"]) == ["passed"]
    pid = os.fork()
    if pid == 0:  # the child must neither use nor stop the parent's runners
        code = 1
        try:
            ok = _run(backend, ADD, ["assert add(1, 2) == 3"]) == ["passed"]
            sb.close_sandbox_pool()
            code = 0 if ok else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not done:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert done and os.waitstatus_to_exitcode(status) == 0
    started = sb._POOL.started
    assert code_reward(ADD, ["assert add(1, 2) == 3"], sandbox="required") == 1.0
    assert sb._POOL.started == started  # the parent's runner is still there and works


# --------------------------------------------------------------------------------------
# The runner is standalone; the host's helper-process code is shared with math.py
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_runner_imports_only_the_standard_library_and_no_host_module_imports_it(
    script: str,
) -> None:
    imported: set[str] = set()
    for node in ast.walk(ast.parse((SANDBOX_DIR / script).read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module, "the runner must not import relatively"
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
    assert imported and imported <= set(sys.stdlib_module_names), imported
    # The host side never imports the runner's scripts (it starts or binds them by path).
    probe = (
        "import sys, signalrl.rewards.code, signalrl.rewards.math, signalrl.rewards.sandbox\n"
        "print([m for m, mod in sys.modules.items()"
        f" if (getattr(mod, '__file__', None) or '').endswith({script!r})])\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_runner_process_holds_only_standard_library_modules(backend: sb._Backend) -> None:
    # Each test process is forked from the runner, so it sees the runner's sys.modules.
    program = (
        "import sys\n"
        "main = sys.modules['__main__'].__file__\n"
        "foreign = sorted(m for m in sys.modules if m not in ('__main__', 'solution')\n"
        "                 and m.split('.')[0] not in sys.stdlib_module_names)\n"
    )
    tests = ["assert main.endswith('/runner.py'), main", "assert foreign == [], foreign"]
    assert _run(backend, program, tests) == ["passed", "passed"]


def _spy_on_channels(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, process.Channel]]:
    """Record every ChildTimeout and every ungraceful stop() of a shared Channel."""
    events: list[tuple[str, process.Channel]] = []
    read_line, stop = process.Channel.read_line, process.Channel.stop

    def spy_read_line(self: process.Channel, deadline: float) -> bytes:
        try:
            return read_line(self, deadline)
        except process.ChildTimeout:
            events.append(("timeout", self))
            raise

    def spy_stop(self: process.Channel, grace_s: float = 0.0) -> None:
        events.append(("kill" if grace_s == 0 else "stop", self))
        stop(self, grace_s)

    monkeypatch.setattr(process.Channel, "read_line", spy_read_line)
    monkeypatch.setattr(process.Channel, "stop", spy_stop)
    return events


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie that no one reaps counts as gone)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except (OSError, IndexError):
            return True
        time.sleep(0.05)
    return False


def test_shared_channel_times_out_and_kills_the_whole_process_group() -> None:
    parent = (
        "import os, sys, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
        "sys.stdin.readline()\n"  # never answers the request below
        "time.sleep(60)\n"
    )
    channel = process.Channel(process.spawn([sys.executable, "-c", parent]))
    grandchild = int(channel.read_line(time.monotonic() + 30))
    channel.send(b"request\n", reply_cap=100)
    started = time.monotonic()
    with pytest.raises(process.ChildTimeout):
        channel.read_line(started + 0.3)
    assert 0.3 <= time.monotonic() - started < 5
    channel.stop()
    assert channel.proc.returncode == -signal.SIGKILL
    assert _gone(grandchild), "the child's own child survived the kill of its process group"


def test_math_worker_and_sandbox_runner_time_out_through_the_same_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = _spy_on_channels(monkeypatch)
    # math.py: a worker that stops answering is killed by the host and scores a mismatch.
    workers = math_rewards._WorkerPool()
    worker = math_rewards._Worker()
    workers._idle.append(worker)
    workers._all.add(worker)
    os.kill(worker.channel.proc.pid, signal.SIGSTOP)
    assert workers.compare("1", "1.0", timeout=0.2) is False
    assert ("timeout", worker.channel) in events and ("kill", worker.channel) in events
    assert worker.channel.proc.returncode == -signal.SIGKILL
    # The sandbox pool: a runner that stops answering is killed by the same code, and the
    # check it never saw is run again on a fresh runner.
    backend = sb._resolve_backend("auto")
    assert _run(backend, ADD, ["assert add(1, 2) == 3"]) == ["passed"]
    runner = _idle(backend)[-1]
    assert type(runner.channel) is type(worker.channel) is process.Channel
    runner_pid = _runner_pid(runner)
    os.kill(runner_pid, signal.SIGSTOP)
    monkeypatch.setattr(sandbox_pool, "_SLACK_S", 0.5)
    assert _run(backend, ADD, ["assert add(1, 2) == 3"], timeout=0.5) == ["passed"]
    assert ("timeout", runner.channel) in events and ("kill", runner.channel) in events
    assert runner.proc.returncode is not None and _gone(runner_pid)


# --------------------------------------------------------------------------------------
# The memory budget of a check, user namespaces, the harness out of the program's reach
# --------------------------------------------------------------------------------------

HOG = (
    "import os, time\n"
    "def hog(children, mb):\n"
    "    pids = []\n"
    "    for _ in range(children):\n"
    "        pid = os.fork()\n"
    "        if pid == 0:\n"
    "            try:\n"
    "                block = bytearray(b'x') * (mb << 20)  # written: resident\n"
    "                time.sleep(1.5)  # all of them hold theirs at once\n"
    "                os._exit(0 if len(block) else 1)\n"
    "            except BaseException:\n"
    "                os._exit(1)\n"
    "        pids.append(pid)\n"
    "    return all(os.waitpid(p, 0)[1] == 0 for p in pids)\n"
)
# 3 children x 300 MB = 900 MB, each under the 400 MiB address-space limit, over the budget.
BUDGET = sb.SandboxLimits(memory_bytes=400 << 20, memory_budget_bytes=512 << 20)


def _needs_private_uid_or_namespace(backend: sb._Backend) -> None:
    if backend.bwrap is None and not backend.drop_uid:
        pytest.skip("without bwrap and without root nothing contains the program's processes")


def test_memory_budget_bounds_the_whole_check(backend: sb._Backend) -> None:
    _needs_private_uid_or_namespace(backend)
    cgroup_on = sandbox_cgroup.status()[0]
    if not cgroup_on and IS_ROOT and not backend.drop_uid:
        pytest.skip("no memory cgroup, and RLIMIT_NPROC does not apply to root")
    one_child = sb._run_all(HOG, ["assert hog(1, 300)"], None, 10.0, BUDGET, backend)
    if cgroup_on:  # within the budget (without a cgroup: one process only, no fork)
        assert [o.status for o in one_child] == ["passed"], one_child[0].detail
    (outcome,) = sb._run_all(HOG, ["assert hog(3, 300)"], None, 10.0, BUDGET, backend)
    assert not outcome.passed
    assert (
        code_reward(
            HOG,
            ["assert hog(3, 300)"],
            sandbox="none" if backend.bwrap is None else "required",
            limits=BUDGET,
        )
        == 0.0
    )
    worker = _idle(backend, BUDGET)[-1] if _idle(backend, BUDGET) else None
    if cgroup_on:
        assert outcome.status == "killed" and "memory budget" in outcome.detail, outcome.detail
        assert worker is not None and worker.cgroup is not None
        for peak in ("memory.max_usage_in_bytes", "memory.peak"):
            path = Path(worker.cgroup.path) / peak
            if path.exists():  # the kernel kept the whole check within the budget
                assert int(path.read_text()) <= BUDGET.memory_budget_bytes
    else:  # the fallback: one process per check (512 MiB // 400 MiB): the forks fail
        assert "BlockingIOError" in outcome.detail or "Resource" in outcome.detail


def test_without_a_memory_cgroup_the_forks_are_counted(
    backend: sb._Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not backend.drop_uid:  # as root RLIMIT_NPROC does not apply; else the runner counts
        pytest.skip("needs a private uid per check (root), so that only the program counts")
    monkeypatch.setattr(sandbox_cgroup, "_found", (None, 0, "disabled by the test"))
    limits = sb.SandboxLimits(memory_bytes=400 << 20, memory_budget_bytes=999 << 20)
    assert limits.process_limit(False) == 2 and limits.process_limit(True) == 64
    try:
        outcomes = sb._run_all(
            HOG, ["assert hog(1, 100)", "assert hog(3, 100)"], None, 10.0, limits, backend
        )
        assert all(w.cgroup is None for w in _idle(backend, limits))
    finally:
        sb._POOL.close_all(backend)
    # Two processes (the program and one child): one fork works, a second one fails.
    assert [o.status for o in outcomes] == ["passed", "error"], outcomes[1].detail
    assert "BlockingIOError" in outcomes[1].detail
    assert sb.SandboxLimits().process_limit(False) == 1  # defaults: 1 GiB / 1 GiB


def test_user_namespaces_cannot_be_created_inside(backend: sb._Backend) -> None:
    if backend.userns == "open":  # bwrap too old, or the fallback without root
        pytest.skip(f"user namespaces cannot be kept out here: {bwrap_status()[1]}")
    program = (
        "import ctypes, os\n"
        "def new_userns():\n"
        "    if hasattr(os, 'unshare'):\n"
        "        try:\n"
        "            os.unshare(os.CLONE_NEWUSER)\n"
        "            return True\n"
        "        except OSError:\n"
        "            return False\n"
        "    return ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0\n"
        "def in_a_child():\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        os._exit(1 if new_userns() else 0)\n"
        "    return os.waitpid(pid, 0)[1] != 0\n"
    )
    assert _run(backend, program, ["assert not new_userns()", "assert not in_a_child()"]) == [
        "passed",
        "passed",
    ]


def test_bwrap_status_says_how_user_namespaces_and_memory_are_kept() -> None:
    backend = _bwrap_backend()
    reason = bwrap_status()[1]
    assert "user namespaces" in reason and "memory budget" in reason
    assert ("NOT disabled" in reason) == (backend.userns == "open")


def test_the_harness_is_out_of_the_programs_reach(backend: sb._Backend) -> None:
    # The harness (the runner's other child) holds the tests: the program can neither read
    # its memory or descriptors nor, with a private uid, signal it.
    program = (
        "import os, signal\n"
        "def harness():\n"
        "    me, runner = os.getpid(), os.getppid()\n"
        "    for p in os.listdir('/proc'):\n"
        "        try:\n"
        "            with open(f'/proc/{p}/stat') as fh:\n"
        "                if int(fh.read().rsplit(')', 1)[1].split()[1]) == runner:\n"
        "                    if int(p) != me:\n"
        "                        return int(p)\n"
        "        except (OSError, ValueError):\n"
        "            pass\n"
        "def reach():\n"
        "    pid, got = harness(), []\n"
        "    for path in ('mem', 'environ', 'fd/0', 'fd/3', 'fd/4'):\n"
        "        try:\n"
        "            with open(f'/proc/{pid}/{path}', 'rb') as fh:\n"
        "                fh.read(1)\n"
        "            got.append(path)\n"
        "        except OSError:\n"
        "            pass\n"
        "    try:\n"
        "        os.kill(pid, 0)\n"
        "        got.append('signal')\n"
        "    except OSError:\n"
        "        pass\n"
        "    return got\n"
    )
    expected = "[]" if backend.drop_uid else "['signal']"  # same uid: kill() is allowed
    assert _run(backend, program, [f"assert harness() and reach() == {expected}, reach()"]) == [
        "passed"
    ]


def _load_harness() -> types.ModuleType:
    """harness.py loaded by path, as the runner does."""
    path = SANDBOX_DIR / "harness.py"
    module = types.ModuleType("_sandbox_harness")
    module.__file__ = str(path)
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    return module


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        3,
        -(10**40),
        2.5,
        float("inf"),
        "\u00e9\U0001f600",
        b"\x00\xff",
        bytearray(b"ab"),
        1 - 2j,
        range(1, 9, 3),
        [1, [2, (3, {4: frozenset({5})})]],
        {(1, 2): {"a": None}, 3: {4.5}},
        (),
        set(),
    ],
)
def test_plain_data_round_trips_exactly(value: object) -> None:
    h = _load_harness()
    back = h.from_plain(json.loads(json.dumps(h.to_plain(value))))
    assert back == value and type(back) is type(value)
    assert repr(back) == repr(value)


def test_plain_data_is_decoded_strictly() -> None:
    h = _load_harness()
    for bad in (
        {"x": 1},
        {"t": 1},
        {"d": [[1]]},
        {"s": [[1]]},
        {"c": ["a", 1]},
        {"t": [], "s": []},
    ):
        with pytest.raises((ValueError, TypeError)):
            h.from_plain(bad)
    nested: list = []
    for _ in range(200):
        nested = [nested]
    with pytest.raises(h.Unsupported):
        h.to_plain(nested)
    with pytest.raises(h.Unsupported):
        h.to_plain(object())
    assert type(h.to_plain(True)) is bool and h.to_plain(iter([1])) == {"i": [1]}


def test_program_that_kills_the_harness(backend: sb._Backend) -> None:
    program = (
        "import os, signal\n"
        "def kill_harness():\n"
        "    me, runner = os.getpid(), os.getppid()\n"
        "    for p in os.listdir('/proc'):\n"
        "        try:\n"
        "            with open(f'/proc/{p}/stat') as fh:\n"
        "                parent = int(fh.read().rsplit(')', 1)[1].split()[1])\n"
        "        except (OSError, ValueError):\n"
        "            continue\n"
        "        if parent == runner and int(p) != me:\n"
        "            os.kill(int(p), signal.SIGKILL)\n"
        "            return True\n"
    )
    tests = ["assert kill_harness()", "assert 1 + 1 == 2", "assert 2 + 2 == 4"]
    statuses = _run(backend, program, tests)
    # Out of reach with a private uid (PermissionError); else it dies, its test scores 0,
    # and a new harness runs the others.
    assert statuses == ["error", "passed", "passed"]
    assert _run(backend, ADD, ["assert add(2, 3) == 5"]) == ["passed"]


def test_a_bwrap_without_disable_userns_still_works_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _bwrap_backend()
    monkeypatch.setattr(sandbox_bwrap, "_bwrap_help", lambda exe: "")  # as bubblewrap < 0.8
    monkeypatch.setattr(sandbox_bwrap, "_probe_result", None)
    ok, reason = bwrap_status()
    assert ok and "user namespaces NOT disabled" in reason and "--disable-userns" in reason
    try:
        assert code_reward(ADD, ["assert add(1, 2) == 3"], sandbox="required") == 1.0
    finally:
        backend = sb._resolve_backend("required")
        assert backend.userns == "open"
        sb._POOL.close_all(backend)


def test_memory_cgroup_v2_is_found_and_limited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cgroup v2 path, on a fake hierarchy (this machine may only have v1)."""
    root = tmp_path / "unified"
    own = root / "user.slice" / "me"
    own.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    (own / "cgroup.controllers").write_text("cpu pids\n")  # no memory delegated here
    stale = root / "signalrl-999999999-3"  # left by a process that is gone
    stale.mkdir()
    monkeypatch.setattr(sandbox_cgroup, "_mounts", lambda: [(str(root), "/", "cgroup2", [])])
    monkeypatch.setattr(sandbox_cgroup, "_own_paths", lambda: ("/user.slice/me", None))
    monkeypatch.setattr(sandbox_cgroup, "_found", None)
    ok, where = sandbox_cgroup.status()
    assert ok and where == f"memory cgroup v2 under {root}", where
    assert "+memory" in (root / "cgroup.subtree_control").read_text()
    assert not stale.exists()
    group = sandbox_cgroup.create(123 << 20)
    assert group is not None and Path(group.path).parent == root
    assert (Path(group.path) / "memory.max").read_text() == str(123 << 20)
    assert group.oom_kills() == -1
    (Path(group.path) / "memory.events").write_text("low 0\noom 1\noom_kill 2\n")
    assert group.oom_kills() == 2
    wrapped = group.wrap(["python", "runner.py"])
    assert wrapped[:2] == ["/bin/sh", "-c"] and wrapped[-2:] == ["python", "runner.py"]
    assert wrapped[3] == os.path.join(group.path, "cgroup.procs")
    sandbox_cgroup.disable("test")
    assert sandbox_cgroup.create(1 << 30) is None
    assert sandbox_cgroup.status() == (False, "memory cgroups disabled: test")
