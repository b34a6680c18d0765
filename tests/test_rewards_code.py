"""Tests for signalrl.rewards.code: real subprocess sandboxes, real attacks.

Each attack runs in two modes: under bubblewrap (``sandbox="required"``, skipped when bwrap
is not usable here) and in the fallback without bwrap (``sandbox="none"``). The fallback's
containment relies on dropping to a private uid, which needs root; attacks that cannot be
contained without bwrap (network, world-writable paths) or without root are skipped with
the reason.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path

import pytest

import signalrl.rewards.sandbox.bwrap as sandbox_bwrap
from signalrl.rewards.code import (
    TestOutcome,
    bwrap_status,
    code_reward,
    code_reward_batch,
    extract_code,
    run_tests,
)

DATA = Path(__file__).parent / "data"
IS_ROOT = os.geteuid() == 0

ADD = "```python\ndef add(a, b):\n    return a + b\n```"


@pytest.fixture(params=["required", "none"])
def mode(request: pytest.FixtureRequest) -> str:
    """Sandbox mode under test: bwrap ("required") or the fallback ("none")."""
    if request.param == "required":
        ok, reason = bwrap_status()
        if not ok:
            pytest.skip(f"bubblewrap not usable here: {reason}")
    return request.param


def _needs_containment(mode: str, what: str) -> None:
    if mode == "none" and not IS_ROOT:
        pytest.skip(f"without bwrap and without root there is no private uid to contain {what}")


# --------------------------------------------------------------------------------------
# Extraction (no sandbox)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("def f():\n    return 1\n", "def f():\n    return 1\n"),
        ("Sure:\n```python\nx = 1\n```\nDone.", "x = 1\n"),
        ("```python\nx = 1\n```\nbetter:\n```python\nx = 2\n```", "x = 2\n"),
        ("```python\nx = 1\n```\nshell:\n```bash\nls\n```", "x = 1\n"),
        ("```\nx = 3\n```", "x = 3\n"),
        ("```py\nx = 4\n```", "x = 4\n"),
        ("```text\nhi\n```\n```\nx = 5\n```", "x = 5\n"),
        ("truncated:\n```python\ndef f():\n    return", "def f():\n    return"),
    ],
)
def test_extract_code(completion: str, expected: str) -> None:
    assert extract_code(completion) == expected


# --------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------


def test_correct_solution_scores_one() -> None:
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add('a', 'b') == 'ab'"]
    assert code_reward(ADD, tests) == 1.0


def test_partially_correct_scores_fraction() -> None:
    completion = "def is_even(n):\n    return n % 2 == 0 or n == 3\n"
    tests = ["assert is_even(2)", "assert not is_even(3)", "assert not is_even(5)", "assert 1"]
    outcomes = run_tests(completion, tests)
    assert [o.status for o in outcomes] == ["passed", "failed", "passed", "passed"]
    assert code_reward(completion, tests) == 0.75
    failed = outcomes[1]
    assert isinstance(failed, TestOutcome)
    assert failed.test == "assert not is_even(3)" and not failed.passed
    assert "AssertionError" in failed.detail


def test_humaneval_check_candidate() -> None:
    check = "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\n"
    good = "```python\ndef square(x):\n    return x * x\n```"
    bad = "```python\ndef square(x):\n    return x + x\n```"
    assert code_reward(good, check, entry_point="square") == 1.0
    assert code_reward(bad, check, entry_point="square") == 0.0
    missing = run_tests(good, check, entry_point="cube")
    assert missing[0].status == "error" and "cube" in missing[0].detail


def test_errors_and_early_exits_are_not_passes() -> None:
    tests = ["assert f() == 1"]
    assert run_tests("def f(:\n  pass", tests)[0].status == "error"  # syntax error
    assert run_tests("def f():\n    raise KeyError('x')", tests)[0].status == "error"
    # Exiting with status 0 before the assertion must not count as passing.
    assert code_reward("import sys\nsys.exit(0)\ndef f():\n    return 2", tests) == 0.0
    assert code_reward("import os\ndef f():\n    os._exit(0)", tests) == 0.0
    assert code_reward("def f():\n    raise SystemExit(0)", tests) == 0.0


def test_tests_cannot_be_read_from_disk() -> None:
    # The tests travel through a pipe; the working directory holds no copy of them.
    program = (
        "import os\n"
        "def visible():\n"
        "    for root, _, files in os.walk('.'):\n"
        "        for name in files:\n"
        "            with open(os.path.join(root, name), errors='ignore') as fh:\n"
        "                if 'SENTINEL' in fh.read():\n"
        "                    return True\n"
        "    return False\n"
    )
    assert code_reward(program, ["assert not visible()  # SENTINEL"]) == 1.0


def test_stdlib_imports_work_in_sandbox() -> None:
    program = "import collections, heapq, itertools, math, re, fractions\nx = math.gcd(12, 18)"
    assert code_reward(program, ["assert x == 6"]) == 1.0


def test_hanging_test_does_not_take_the_others_down() -> None:
    program = "def spin():\n    while True:\n        pass\n"
    outcomes = run_tests(program, ["assert spin()", "assert 1 + 1 == 2"], timeout=1.0)
    assert [o.status for o in outcomes] == ["timeout", "passed"]


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="entry_point"):
        code_reward(ADD, "def check(candidate):\n    assert candidate(1, 2) == 3\n")
    with pytest.raises(ValueError, match="empty"):
        code_reward(ADD, [])
    with pytest.raises(ValueError, match="tests\\[1\\] is empty"):
        code_reward(ADD, ["assert 1", "  "])
    with pytest.raises(TypeError, match="tests\\[0\\]"):
        code_reward(ADD, [3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="completion"):
        code_reward(None, ["assert 1"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sandbox"):
        code_reward(ADD, ["assert 1"], sandbox="docker")
    with pytest.raises(ValueError, match="timeout"):
        code_reward(ADD, ["assert 1"], timeout=0)
    with pytest.raises(ValueError, match="entry_point"):
        code_reward(ADD, "def check(candidate):\n    pass\n", entry_point="not valid")
    with pytest.raises(ValueError, match="2 completions but 1"):
        code_reward_batch([ADD, ADD], [["assert 1"]])


def test_code_reward_batch_parallel_and_ordered() -> None:
    completions = [
        ADD,
        "def add(a, b):\n    return a - b\n",
        "def add(a, b):\n    while True:\n        pass\n",
        "def square(x):\n    return x * x\n",
    ]
    add_tests = ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]
    tests_list: list[list[str] | str] = [
        add_tests,
        add_tests,
        add_tests,
        "def check(candidate):\n    assert candidate(4) == 16\n",
    ]
    entry_points = [None, None, None, "square"]
    rewards = code_reward_batch(
        completions, tests_list, entry_points=entry_points, timeout=1.0, max_workers=2
    )
    assert rewards == [1.0, 0.5, 0.0, 1.0]
    assert code_reward_batch([], []) == []


def test_missing_bwrap_falls_back_or_raises(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Make bwrap unfindable and forget the cached probe (monkeypatch restores both).
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sandbox_bwrap, "_probe_result", None)
    monkeypatch.setattr(sandbox_bwrap, "_warned_fallback", False)
    ok, reason = bwrap_status()
    assert not ok and "not installed" in reason
    with pytest.raises(RuntimeError, match="required"):
        code_reward(ADD, ["assert add(1, 2) == 3"], sandbox="required")
    with caplog.at_level(logging.WARNING, logger="signalrl.rewards.sandbox"):
        assert code_reward(ADD, ["assert add(1, 2) == 3"], sandbox="auto") == 1.0
        assert code_reward(ADD, ["assert add(1, 2) == 3"], sandbox="auto") == 1.0
    warnings = [r for r in caplog.records if "falling back" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize("row", [json.loads(x) for x in open(DATA / "code_sample.jsonl")])
def test_code_sample_file(row: dict) -> None:
    reward = code_reward(row["completion"], row["tests"], entry_point=row.get("entry_point"))
    assert reward == row["expected"], row["task_id"]


# --------------------------------------------------------------------------------------
# Sandbox: each attack scores 0 and leaves the test process (and host) unharmed
# --------------------------------------------------------------------------------------


def _sanity(mode: str) -> None:
    """After an attack the sandbox still works (nothing exhausted, nothing broken)."""
    assert code_reward(ADD, ["assert add(2, 2) == 4"], sandbox=mode) == 1.0


def test_infinite_loop(mode: str) -> None:
    program = "def f():\n    while True:\n        pass\n"
    outcomes = run_tests(program, ["assert f()"], timeout=1.0, sandbox=mode)
    assert outcomes[0].status == "timeout" and not outcomes[0].passed
    _sanity(mode)


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


def test_fork_bomb(mode: str) -> None:
    _needs_containment(mode, "a fork bomb (RLIMIT_NPROC is per user)")
    marker = "srl" + secrets.token_hex(5)  # comm names are at most 15 bytes
    program = (
        "import ctypes, os\n"
        f"ctypes.CDLL(None).prctl(15, b'{marker}', 0, 0, 0)  # PR_SET_NAME, inherited\n"
        "def bomb():\n"
        "    while True:\n"
        "        try:\n"
        "            os.fork()\n"
        "        except OSError:\n"
        "            pass\n"
    )
    outcomes = run_tests(program, ["assert bomb()", "assert 1"], timeout=1.5, sandbox=mode)
    assert outcomes[0].status in ("timeout", "killed") and outcomes[1].passed
    deadline = time.monotonic() + 5.0
    while _processes_named(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_named(marker) == [], "fork bomb processes survived the sandbox"
    _sanity(mode)


def test_huge_allocation(mode: str) -> None:
    program = "def f():\n    x = bytearray(10 * 1024 ** 3)\n    return len(x) > 0\n"
    outcomes = run_tests(program, ["assert f()"], sandbox=mode)
    assert not outcomes[0].passed and outcomes[0].status in ("error", "killed")
    assert outcomes[0].status == "killed" or "MemoryError" in outcomes[0].detail
    _sanity(mode)


def test_write_outside_working_directory(mode: str, tmp_path: Path) -> None:
    _needs_containment(mode, "writes to the user's own files")
    host_dir = tmp_path / "host_only"
    host_dir.mkdir(mode=0o700)
    targets = [host_dir / "escaped.txt"]
    if mode != "none":  # without bwrap, world-writable directories like /tmp are writable
        targets.append(Path("/tmp") / f"signalrl-escape-{secrets.token_hex(6)}")
    program = (
        "def f():\n"
        f"    for path in {[str(t) for t in targets]!r}:\n"
        "        with open(path, 'w') as fh:\n"
        "            fh.write('escaped')\n"
        "    return True\n"
    )
    assert code_reward(program, ["assert f()"], sandbox=mode) == 0.0
    for target in targets:
        assert not target.exists(), f"{target} was written from the sandbox"
    _sanity(mode)


def test_network_connection(mode: str) -> None:
    if mode == "none":
        pytest.skip("without bwrap there is no network namespace to cut the network")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(5)
        server.setblocking(False)
        port = server.getsockname()[1]
        program = (
            "import socket\n"
            "def f():\n"
            f"    with socket.create_connection(('127.0.0.1', {port}), timeout=2) as s:\n"
            "        s.sendall(b'hello from the sandbox')\n"
            "    return True\n"
        )
        outcomes = run_tests(program, ["assert f()"], sandbox=mode)
        assert outcomes[0].status == "error"
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    _sanity(mode)


def test_printing_a_gigabyte(mode: str) -> None:
    program = (
        "import sys\n"
        "def f():\n"
        "    chunk = 'x' * (1 << 20)\n"
        "    for _ in range(1024):\n"
        "        sys.stdout.write(chunk)\n"
        "    sys.stdout.flush()\n"
        "    return True\n"
    )
    outcomes = run_tests(program, ["assert f()"], timeout=5.0, sandbox=mode)
    assert not outcomes[0].passed and outcomes[0].status in ("error", "killed")
    assert len(outcomes[0].detail) < 2000
    _sanity(mode)


def test_killing_the_parent(mode: str) -> None:
    _needs_containment(mode, "signals to the test process")
    program = (
        "import os, signal\n"
        "def f():\n"
        "    os.kill(os.getppid(), signal.SIGKILL)\n"
        f"    os.kill({os.getpid()}, signal.SIGKILL)\n"
        "    return True\n"
    )
    outcomes = run_tests(program, ["assert f()", "assert 2 > 1"], sandbox=mode)
    assert not outcomes[0].passed
    assert outcomes[1].passed  # the remaining test still ran
    _sanity(mode)  # and we are obviously still alive


def test_parent_environment_is_invisible(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _needs_containment(mode, "reading /proc/<pid>/environ of the user's processes")
    secret = "srl-secret-" + secrets.token_hex(8)
    monkeypatch.setenv("SIGNALRL_TEST_SECRET", secret)
    program = (
        "import os\n"
        "def leaked():\n"
        f"    needle = {secret!r}\n"
        "    if needle in repr(dict(os.environ)):\n"
        "        return True\n"
        "    for pid in os.listdir('/proc'):\n"
        "        try:\n"
        "            with open(f'/proc/{pid}/environ', 'rb') as fh:\n"
        "                if needle.encode() in fh.read():\n"
        "                    return True\n"
        "        except OSError:\n"
        "            pass\n"
        "    return False\n"
    )
    # Passing requires that the program ran *and* found nothing.
    assert code_reward(program, ["assert not leaked()"], sandbox=mode) == 1.0
    env_program = "import os\nkeys = sorted(os.environ)"
    assert code_reward(env_program, ["assert 'SIGNALRL_TEST_SECRET' not in keys"]) == 1.0


# --------------------------------------------------------------------------------------
# Reward hacking: the tests run where the program cannot reach; only plain data crosses
# --------------------------------------------------------------------------------------

HACKS = [json.loads(x) for x in open(DATA / "code_reward_hacks.jsonl")]
HUMANEVAL = [json.loads(x) for x in open(DATA / "humaneval_style.jsonl")]
MBPP = [json.loads(x) for x in open(DATA / "mbpp_style.jsonl")]


def test_the_two_reported_hacks_score_zero(mode: str) -> None:
    frame = (
        "def add(a, b):\n    return None\nimport sys\n"
        "sys._getframe(1).f_locals['report']('passed')\n"
    )
    equal = "class E:\n    def __eq__(self, o): return True\ndef add(a, b):\n    return E()\n"
    for program in (frame, equal):
        assert code_reward(program, ["assert add(1, 2) == 3"], sandbox=mode) == 0.0
    (outcome,) = run_tests(equal, ["assert add(1, 2) == 3"], sandbox=mode)
    assert outcome.status == "error" and "not plain data" in outcome.detail


@pytest.mark.parametrize("hack", HACKS, ids=[h["name"] for h in HACKS])
def test_reward_hacks_score_zero(mode: str, hack: dict) -> None:
    outcomes = run_tests(
        hack["completion"], hack["tests"], entry_point=hack["entry_point"], sandbox=mode
    )
    assert [o.passed for o in outcomes] == [False] * len(outcomes), outcomes


def test_tests_are_not_in_the_programs_memory(mode: str) -> None:
    # The program scans all its readable memory and every object the gc knows for the
    # marker that only the tests hold (the pattern never spells the marker out itself).
    marker = "srl-marker-" + secrets.token_hex(6)
    program = (
        "import ctypes, gc, re\n"
        f"PATTERN = {marker[:3] + '[' + marker[3] + ']' + marker[4:]!r}\n"
        "def seen():\n"
        "    found = []\n"
        "    with open('/proc/self/maps') as fh:\n"
        "        for line in fh.read().splitlines():\n"
        "            fields = line.split()\n"
        "            if 'r' not in fields[1] or fields[-1].startswith('[v'):\n"
        "                continue\n"
        "            start, end = (int(x, 16) for x in fields[0].split('-'))\n"
        "            if re.search(PATTERN.encode(), ctypes.string_at(start, end - start)):\n"
        "                found.append(line)\n"
        "    for obj in gc.get_objects():\n"
        "        items = obj.values() if isinstance(obj, dict) else obj\n"
        "        for text in items if isinstance(obj, (dict, list, tuple)) else ():\n"
        "            if isinstance(text, str) and re.search(PATTERN, text):\n"
        "                found.append('gc')\n"
        "    return found\n"
    )
    # An earlier check on the same runner whose failure's traceback quotes the marker.
    assert run_tests("x = 1", [f"assert x == 2  # {marker}"], sandbox=mode)[0].status == "failed"
    tests = [f"assert seen() == []  # {marker}", f"assert '{marker}'"]
    outcomes = run_tests(program, tests, sandbox=mode)
    assert [o.status for o in outcomes] == ["passed", "passed"], outcomes[0].detail


@pytest.mark.parametrize("problem", HUMANEVAL, ids=[p["task_id"] for p in HUMANEVAL])
def test_humaneval_style_problems(mode: str, problem: dict) -> None:
    """Canonical solutions pass, wrong ones fail (prompt + completion, check(candidate))."""
    for kind, expected in (("canonical_solution", 1.0), ("wrong_solution", 0.0)):
        program = problem["prompt"] + problem[kind]
        outcomes = run_tests(
            program, problem["test"], entry_point=problem["entry_point"], sandbox=mode
        )
        assert outcomes[0].passed == bool(expected), (kind, outcomes[0].detail)


@pytest.mark.parametrize("row", MBPP, ids=[r["task_id"] for r in MBPP])
def test_mbpp_style_problems(mode: str, row: dict) -> None:
    outcomes = run_tests(row["completion"], row["tests"], sandbox=mode)
    reward = sum(o.passed for o in outcomes) / len(outcomes)
    assert reward == row["expected"], [(o.status, o.detail) for o in outcomes]


def test_values_cross_as_builtin_types(mode: str) -> None:
    program = (
        "from collections import Counter, OrderedDict, namedtuple\n"
        "class Big(int):\n"
        "    def __eq__(self, other): return True\n"
        "    __hash__ = int.__hash__\n"
        "class MyError(KeyError):\n"
        "    pass\n"
        "Point = namedtuple('Point', 'x y')\n"
        "def echo(x):\n    return x\n"
        "def typed(x):\n    return type(x).__name__\n"
        "def big():\n    return Big(7)\n"
        "def point():\n    return Point(1, 2)\n"
        "def counts():\n    return Counter('aab')\n"
        "def ordered():\n    return OrderedDict(b=1, a=2)\n"
        "def fails():\n    raise MyError('k')\n"
        "def gen(n):\n    return (i * i for i in range(n))\n"
        "def kw(a, *, b=0):\n    return a - b\n"
    )
    tests = [
        "assert echo((1, [2, {3: (4,)}])) == (1, [2, {3: (4,)}])",
        "assert echo([1, 2]) != (1, 2) and type(echo((1,))) is tuple",
        "assert echo({1, 2}) == {1, 2} and type(echo(frozenset())) is frozenset",
        "assert echo(b'\\x00\\xff') == b'\\x00\\xff' and echo(bytearray(b'a')) == bytearray(b'a')",
        "import math\nassert math.isinf(echo(float('inf'))) and math.isnan(echo(float('nan')))",
        "assert echo(-0.0) == 0 and str(echo(-0.0)) == '-0.0' and echo(1 + 2j) == 1 + 2j",
        "assert echo(10 ** 100) == 10 ** 100 and echo(True) is True and echo(None) is None",
        "assert echo('\\u00e9\\U0001f600') == '\\u00e9\\U0001f600' and echo(range(3)) == range(3)",
        "assert typed((1,)) == 'tuple' and typed({}) == 'dict' and typed(2.0) == 'float'",
        "assert big() == 7 and big() != 8 and type(big()) is int",
        "assert point() == (1, 2)",
        "assert counts() == {'a': 2, 'b': 1} and type(counts()) is dict",
        "assert list(ordered()) == ['b', 'a']",
        "try:\n    fails()\nexcept KeyError as e:\n    assert type(e) is KeyError\n"
        "else:\n    assert False",
        "assert list(gen(4)) == [0, 1, 4, 9] and gen(1) != [0]",
        "assert kw(5, b=2) == 3",
    ]
    outcomes = run_tests(program, tests, sandbox=mode)
    assert [o.status for o in outcomes] == ["passed"] * len(tests), [
        (o.test, o.detail) for o in outcomes if not o.passed
    ]


def test_values_that_cannot_cross_fail_the_test(mode: str) -> None:
    program = (
        "class Thing:\n    pass\n"
        "def thing():\n    return Thing()\n"
        "def call(f):\n    return f(1)\n"
        "def deep():\n"
        "    x = []\n"
        "    for _ in range(500):\n"
        "        x = [x]\n"
        "    return x\n"
    )
    tests = [
        "assert thing() is not None",
        "assert call(lambda x: x) == 1",  # a function of the test cannot cross either
        "try:\n    deep()\nexcept Exception:\n    pass",  # not even caught: the test fails
    ]
    outcomes = run_tests(program, tests, sandbox=mode)
    assert [o.status for o in outcomes] == ["error"] * 3
    assert "Thing object is not plain data" in outcomes[0].detail
    assert "not plain data" in outcomes[1].detail and "nested" in outcomes[2].detail
