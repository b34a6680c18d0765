"""The two sides of a test inside the sandbox: the program's process and the test harness.

Loaded by the runner (``runner.py``) from its own directory, by path, never imported by the
host; under bwrap it is ``/sandbox/harness.py``, a read-only bind of this one file. Standard
library only. The runner forks, for every check, one **harness** process (:func:`harness_main`)
and, for every test, one **program process** (:func:`candidate_main`):

* The program process runs the untrusted program, and nothing else that matters: it never
  holds the tests (the runner, which it is forked from, never reads them), has no way to
  report a status, and answers calls through a socket with **plain data only**.
* The harness is trusted code: it reads the tests itself (from the runner's stdin, where the
  host put them behind the runner's job), runs them, and reports each status to the runner.
  Every name the program defines is a :class:`_Remote` proxy in the test's namespace: a call
  ``f(*args)`` sends the arguments to the program process and returns what it answered,
  decoded by :func:`from_plain` into builtin values only (``int``, ``float``, ``complex``,
  ``str``, ``bytes``, ``bytearray``, ``bool``, ``None``, ``list``, ``tuple``, ``dict``,
  ``set``, ``frozenset``, ``range``, and an iterator over a list). So ``assert f(1) == 2``
  compares real builtin values in a process where only trusted code runs; no object, frame
  or ``__eq__`` of the program crosses over. An exception the program raises is re-raised in
  the test as the builtin exception class it derives from (``SystemExit`` and other
  non-``Exception`` classes become an error that only a bare ``except`` catches, as they
  would be natively). A program that returns something else (an instance of its own class,
  say), that answers garbage, or whose process ends, fails that test, whatever the test
  does with the exception.

Wire format: one JSON message per line on the program's socket, values encoded by
:func:`to_plain` (lists as JSON arrays, other containers as one-key tagged objects); the
harness talks to the runner through a ``SOCK_SEQPACKET`` socket, one JSON message per packet
(``loaded``; then per test ``run`` with the program's socket end attached, ``finished`` with
the status alone, and the runner's ``verdict``), and writes each test's record (status and
detail) to the host itself, so the runner never holds anything derived from the tests.
"""

from __future__ import annotations

import builtins
import itertools
import json
import linecache
import os
import signal
import socket
import sys
import traceback
import types
from collections.abc import Callable
from typing import Any, NoReturn

_DETAIL_CHARS = 1000
# The largest answer (one line) the harness reads from the program.
_REPLY_CAP = 8 << 20
# Program globals larger than this (encoded) are not offered to the tests.
_VALUE_CAP = 256 << 10
# The deepest nesting of a value, and the most items an iterator may yield.
_MAX_DEPTH = 100
_MAX_ITEMS = 1 << 20
# Larger ints travel as hex (decimal conversion is limited to 4300 digits).
_BIG_INT_BITS = 10_000
# Program globals with more items than this are not offered to the tests.
_VALUE_ITEMS = 10_000
# Extra seconds the harness waits beyond the test's limit (the runner's clock comes first).
_ALARM_SLACK_S = 1.0
# Modules the program imported that the harness imports itself for the tests (by name).
_SAFE_MODULES = frozenset(
    (
        "abc array base64 binascii bisect calendar cmath collections contextlib copy csv "
        "dataclasses datetime decimal enum errno fractions functools glob hashlib heapq io "
        "itertools json locale math numbers operator os posixpath pprint queue random re "
        "shlex statistics string struct sys textwrap time typing unicodedata uuid warnings "
        "weakref zlib"
    ).split()
)

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38


def truncate(text: str, limit: int = _DETAIL_CHARS) -> str:
    """``text`` cut to ``limit`` characters, keeping its head and tail."""
    if len(text) <= limit:
        return text
    half = limit // 2 - 10
    return f"{text[:half]} ...[truncated]... {text[-half:]}"


# --------------------------------------------------------------------------------------
# Plain data: the only thing that crosses between the program and the tests
# --------------------------------------------------------------------------------------


class Unsupported(TypeError):
    """A value that cannot be sent as plain data."""


class _Iterated(list):  # type: ignore[type-arg]
    """What an iterator of the program yielded; sent as ``{"i": items}``."""


_SCALARS = (str, int, float, bool, type(None))


def to_plain(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON-ready data: builtin scalars and lists as they are, other builtin
    containers as ``{tag: items}``. Subclasses of builtin types are sent as their builtin
    base value (an ``int`` subclass's overridden ``__eq__`` is lost on the way), numpy
    values through ``tolist()``, iterators as the list they yield.

    Raises:
        Unsupported: for anything else (e.g. an instance of a class of the program).
    """
    kind = type(value)
    if kind in _SCALARS:
        if kind is int and value.bit_length() > _BIG_INT_BITS:  # past int/str's digit limit
            return {"n": hex(value)}
        return value
    if depth > _MAX_DEPTH:
        raise Unsupported(f"the value is nested more than {_MAX_DEPTH} levels deep")
    deeper = depth + 1
    if kind is list or kind is _Iterated:
        items = [to_plain(v, deeper) for v in value]
        return items if kind is list else {"i": items}
    if kind is tuple:
        return {"t": [to_plain(v, deeper) for v in value]}
    if kind is dict:
        return {"d": [[to_plain(k, deeper), to_plain(v, deeper)] for k, v in value.items()]}
    if kind is set or kind is frozenset:
        return {"s" if kind is set else "f": [to_plain(v, deeper) for v in value]}
    if kind is bytes or kind is bytearray:
        return {"b" if kind is bytes else "y": value.hex()}
    if kind is complex:
        return {"c": [value.real, value.imag]}
    if kind is range:
        return {"r": [value.start, value.stop, value.step]}
    return to_plain(_builtin_base(value), deeper)


def _builtin_base(value: Any) -> Any:
    """The builtin value of an instance of a subclass of a builtin type, and the like."""
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(memoryview(value))
    if isinstance(value, tuple):
        return tuple(tuple.__iter__(value))
    if isinstance(value, list):
        return list(list.__iter__(value))
    if isinstance(value, dict):
        return dict(dict.items(value))
    if isinstance(value, set):
        return set(set.__iter__(value))
    if isinstance(value, frozenset):
        return frozenset(frozenset.__iter__(value))
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(type(value), "__next__") and hasattr(type(value), "__iter__"):
        items = _Iterated(itertools.islice(value, _MAX_ITEMS + 1))
        if len(items) > _MAX_ITEMS:
            raise Unsupported(f"the iterator yields more than {_MAX_ITEMS} items")
        return items
    raise Unsupported(
        f"a {type(value).__name__} object is not plain data (only builtin numbers, strings, "
        "bytes, None, and lists, tuples, dicts and sets of them can be passed)"
    )


def from_plain(data: Any, depth: int = 0) -> Any:
    """Decode :func:`to_plain` data into builtin values only (strict: anything unexpected
    raises ``ValueError``)."""
    kind = type(data)
    if kind in _SCALARS:
        return data
    if depth > _MAX_DEPTH + 1:
        raise ValueError("the value is nested too deeply")
    deeper = depth + 1
    if kind is list:
        return [from_plain(v, deeper) for v in data]
    if kind is not dict or len(data) != 1:
        raise ValueError(f"malformed value: {kind.__name__}")
    ((tag, body),) = data.items()
    if tag == "n":
        if type(body) is not str:
            raise ValueError("malformed int")
        return int(body, 16)
    if tag in ("b", "y"):
        if type(body) is not str:
            raise ValueError("malformed bytes")
        return bytes.fromhex(body) if tag == "b" else bytearray.fromhex(body)
    if tag in ("c", "r"):
        if type(body) is not list or len(body) != (2 if tag == "c" else 3):
            raise ValueError("malformed number")
        if tag == "r" and all(type(x) is int for x in body):
            return range(*body)
        if tag == "c" and all(type(x) in (int, float) for x in body):
            return complex(body[0], body[1])
        raise ValueError("malformed number")
    if type(body) is not list:
        raise ValueError("malformed container")
    if tag == "d":
        if not all(type(kv) is list and len(kv) == 2 for kv in body):
            raise ValueError("malformed dict")
        return {from_plain(k, deeper): from_plain(v, deeper) for k, v in body}
    items = [from_plain(v, deeper) for v in body]
    if tag == "t":
        return tuple(items)
    if tag == "s":
        return set(items)
    if tag == "f":
        return frozenset(items)
    if tag == "i":
        return iter(items)
    raise ValueError(f"malformed value: unknown tag {tag!r}")


def dumps(message: dict[str, Any]) -> bytes:
    """One wire message (a JSON line)."""
    return (json.dumps(message, separators=(",", ":")) + "\n").encode("ascii")


def _describe(exc: BaseException) -> str:
    """The traceback of ``exc``, without the frames of this file at its top."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    try:
        return "".join(traceback.format_exception(type(exc), exc, tb))[-_DETAIL_CHARS:]
    except BaseException:  # noqa: BLE001 - user exceptions may have broken __str__
        return type(exc).__name__


def _safe_str(value: Any, limit: int = 500) -> str:
    try:
        return str(value)[:limit]
    except BaseException:  # noqa: BLE001
        return "<unprintable>"


# --------------------------------------------------------------------------------------
# The program's side: run the program, answer calls
# --------------------------------------------------------------------------------------


def serve_calls(program: str, chan_fd: int) -> NoReturn:
    """Run ``program``, offer its names to the harness, answer calls until end of input."""
    send_fd, loads, write, exit_ = chan_fd, json.loads, os.write, os._exit

    def send(message: dict[str, Any]) -> None:
        try:
            data = memoryview(dumps(message))
        except BaseException as exc:  # noqa: BLE001 - e.g. an int too long for a str
            data = memoryview(dumps({"unsupported": _safe_str(exc)}))
        while data:
            data = data[write(send_fd, data) :]

    linecache.cache["<solution>"] = (len(program), None, program.splitlines(True), "<solution>")
    module = types.ModuleType("solution")
    namespace = module.__dict__
    namespace["__builtins__"] = builtins
    sys.modules["solution"] = module
    sys.argv = ["solution"]
    try:
        exec(compile(program, "<solution>", "exec"), namespace)
    except BaseException as exc:  # noqa: BLE001 - SystemExit etc. are errors too
        send({"load_error": _describe(exc)})
        exit_(0)
    send({"ready": _exports(namespace)})
    reader = os.fdopen(os.dup(chan_fd), "rb", buffering=1 << 16)
    for line in reader:
        send(_answer(namespace, line, loads))
    exit_(0)


def _exports(namespace: dict[str, Any]) -> dict[str, Any]:
    """The program's names, for the harness: functions (and other callables), modules, and
    the values of its plain-data globals."""
    callables: list[str] = []
    modules: dict[str, str] = {}
    values: dict[str, Any] = {}
    for name, value in list(namespace.items()):
        if not isinstance(name, str) or (name.startswith("__") and name.endswith("__")):
            continue
        try:
            if isinstance(value, types.ModuleType):
                modules[name] = str(value.__name__)
            elif callable(value):
                callables.append(name)
            elif not hasattr(type(value), "__next__"):  # an iterator would be used up
                if hasattr(value, "__len__") and len(value) > _VALUE_ITEMS:
                    continue
                encoded = to_plain(value)
                if len(dumps({"v": encoded})) <= _VALUE_CAP:
                    values[name] = encoded
        except BaseException:  # noqa: BLE001, S112 - not plain data: not offered
            continue
    return {"callables": callables, "modules": modules, "values": values}


def _answer(namespace: dict[str, Any], line: bytes, loads: Any) -> dict[str, Any]:
    """Run one call request and describe its outcome as a message."""
    try:
        request = loads(line)
        function = namespace[request["call"]]
        args = [from_plain(a) for a in request["args"]]
        kwargs = {str(k): from_plain(v) for k, v in request["kwargs"]}
        result = function(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - reported to the test as its builtin base
        try:
            names = [str(c.__name__) for c in type(exc).__mro__]
        except BaseException:  # noqa: BLE001
            names = ["Exception"]
        return {"raise": names, "msg": _safe_str(exc), "tb": _describe(exc)}
    try:
        plain = to_plain(result)
    except BaseException as exc:  # noqa: BLE001
        return {"unsupported": _safe_str(exc)}
    return {"ok": plain}


# --------------------------------------------------------------------------------------
# The harness's side: run the tests, call the program through proxies
# --------------------------------------------------------------------------------------


class _Abort(BaseException):
    """The test cannot go on: the program's process ended, answered garbage, etc."""


class _ProgramExit(BaseException):
    """The program raised ``SystemExit``, ``KeyboardInterrupt`` or another non-Exception."""


class _TestTimeout(BaseException):
    """The harness's own alarm: the test ran past its time."""


_alarm = {"armed": False, "fired": False}


def _on_alarm(signum: int, frame: Any) -> None:
    if _alarm["armed"]:
        _alarm["fired"] = True
        raise _TestTimeout


class _Session:
    """The harness's end of the socket to one program process.

    A failure of the conversation itself (the process ended, an answer too long, malformed
    or not plain data) is *sticky*: it decides the test's status, even if the test code
    catches the exception raised for it.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")
        self.failure: tuple[str, str] | None = None
        self.gone = False  # the program's process ended (or closed its socket)
        self.callables: set[str] = set()

    def fail(self, detail: str, gone: bool = False) -> NoReturn:
        self.gone = self.gone or gone
        if self.failure is None:
            self.failure = ("error", detail)
        raise _Abort(detail)

    def receive(self) -> dict[str, Any]:
        try:
            line = self.reader.readline(_REPLY_CAP + 1)
        except OSError:
            line = b""
        if not line.endswith(b"\n"):
            if len(line) > _REPLY_CAP:
                self.fail(f"an answer of the program exceeded {_REPLY_CAP} bytes")
            self.fail("the program's process ended before the test finished", gone=True)
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if type(message) is not dict:
            self.fail("the program sent a malformed answer")
        return message

    def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.failure is not None:
            raise _Abort(self.failure[1])
        try:
            plain_args = [to_plain(a) for a in args]
            plain_kwargs = [[k, to_plain(v)] for k, v in kwargs.items()]
        except Unsupported as exc:
            self.fail(f"the test passes {name}() a value that is not plain data: {exc}")
        try:
            self.sock.sendall(dumps({"call": name, "args": plain_args, "kwargs": plain_kwargs}))
        except OSError:
            self.fail("the program's process ended before the test finished", gone=True)
        reply = self.receive()
        if "ok" in reply:
            try:
                return from_plain(reply["ok"])
            except Exception:  # noqa: BLE001 - ValueError, TypeError (unhashable), ...
                self.fail(f"{name}() answered with a malformed value")
        if "raise" in reply:
            raise _exception(reply)
        if "unsupported" in reply:
            why = _safe_str(reply["unsupported"])
            self.fail(f"{name}() returned a value that cannot be passed to the test: {why}")
        self.fail("the program sent a malformed answer")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class _Remote:
    """A function (or class, or other callable) of the program, called in its process."""

    __slots__ = ("_name", "_session")

    def __init__(self, name: str, session: _Session) -> None:
        self._name = name
        self._session = session

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._session.call(self._name, args, kwargs)

    def __repr__(self) -> str:
        return f"<function {self._name} of the program>"

    @property
    def __name__(self) -> str:
        return self._name


def _exception(reply: dict[str, Any]) -> BaseException:
    """The exception to raise in the test for one the program raised: the first builtin
    class in the program exception's MRO (its own classes do not cross over)."""
    names, message = reply.get("raise"), _safe_str(reply.get("msg", ""))
    exc: BaseException | None = None
    for name in names if type(names) is list else []:
        cls = getattr(builtins, name, None) if type(name) is str else None
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            continue
        if not issubclass(cls, Exception):
            exc = _ProgramExit(f"the program raised {name}: {message}")
            break
        try:
            exc = cls(message)
        except Exception:  # noqa: BLE001, S112 - needs other arguments: try its base
            continue
        break
    if exc is None:
        exc = _ProgramExit(f"the program raised an exception: {message}")
    if hasattr(exc, "add_note"):
        exc.add_note("raised in the program:\n" + _safe_str(reply.get("tb", ""), _DETAIL_CHARS))
    return exc


def _namespace(ready: Any, session: _Session) -> dict[str, Any]:
    """The test's namespace: a proxy for each callable of the program, the values of its
    plain-data globals, and the standard-library modules it imported (imported here)."""
    import importlib

    namespace: dict[str, Any] = {"__builtins__": builtins, "__name__": "__test__"}
    if type(ready) is not dict:
        return namespace
    modules, values, callables = (ready.get(k) for k in ("modules", "values", "callables"))
    for name, module in modules.items() if type(modules) is dict else ():
        top = module.partition(".")[0] if type(module) is str else ""
        known = module in sys.modules and top in sys.stdlib_module_names and top[:1] != "_"
        if name.isidentifier() and (top in _SAFE_MODULES or known):
            try:
                namespace[name] = importlib.import_module(module)
            except Exception:  # noqa: BLE001, S110 - not importable here: not offered
                pass
    for name, value in values.items() if type(values) is dict else ():
        try:
            namespace[name] = from_plain(value)
        except Exception:  # noqa: BLE001, S110
            pass
    for name in callables if type(callables) is list else []:
        if type(name) is str and name.isidentifier():
            namespace[name] = _Remote(name, session)
            session.callables.add(name)
    return namespace


def _execute(session: _Session, test: str, entry_point: str | None) -> tuple[str, str]:
    """Run one test against the program behind ``session``: (status, detail)."""
    try:
        ready = session.receive()
        if "load_error" in ready:
            why = _safe_str(ready["load_error"], _DETAIL_CHARS)
            return "error", "the program raised while loading:\n" + why
        namespace = _namespace(ready.get("ready"), session)
        linecache.cache["<test>"] = (len(test), None, test.splitlines(True), "<test>")
        exec(compile(test, "<test>", "exec"), namespace)
        if entry_point is not None:
            check = namespace.get("check")
            if not callable(check):
                return "error", "the test program does not define check(candidate)"
            if entry_point not in session.callables:
                return "error", f"the program does not define {entry_point!r}"
            check(_Remote(entry_point, session))
    except _TestTimeout:
        raise
    except AssertionError as exc:
        return "failed", _describe(exc)
    except BaseException as exc:  # noqa: BLE001 - SystemExit etc. are errors too
        return "error", _describe(exc)
    return "passed", ""


def _run_one(
    ctrl: socket.socket, position: int, test: str, entry_point: str | None, timeout: float
) -> tuple[str, str, bool]:
    """Have the runner start a program process for test ``position``, then run the test.

    Returns (status, detail, whether the program's process ended before the test did).
    """
    mine, theirs = socket.socketpair()
    try:
        socket.send_fds(ctrl, [dumps({"run": position})], [theirs.fileno()])
    finally:
        theirs.close()
    session = _Session(mine)
    _alarm["fired"] = False
    status, detail = "error", ""
    try:
        try:
            _alarm["armed"] = True
            signal.setitimer(signal.ITIMER_REAL, timeout + _ALARM_SLACK_S)
            status, detail = _execute(session, test, entry_point)
        finally:
            _alarm["armed"] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _TestTimeout:
        pass
    finally:
        session.close()
    if _alarm["fired"]:
        status, detail = "timeout", f"the test did not finish within {timeout:g} s"
    elif session.failure is not None:
        status, detail = session.failure
    return status, detail, session.gone


def run_tests(
    ctrl: socket.socket,
    tests: list[str],
    entry_point: str | None,
    timeout: float,
    report: Callable[[int, str, str], None],
) -> bool:
    """The harness's work: run each test (see the module docstring).

    Per test: ask the runner (through ``ctrl``) for a program process, run the test, tell
    the runner only its status (``finished``), take the runner's ``verdict`` on how the
    program's process ended, and ``report`` the test's status and detail to the host. The
    details (whose tracebacks quote the tests) never reach the runner, so no program
    process forked from it later can find them in its memory. Returns False if the runner
    broke off the conversation.
    """
    signal.signal(signal.SIGALRM, _on_alarm)
    for position, test in enumerate(tests):
        status, detail, gone = _run_one(ctrl, position, test, entry_point, timeout)
        ctrl.send(dumps({"finished": position, "status": status, "gone": gone}))
        data = ctrl.recv(1 << 16)
        verdict = json.loads(data) if data else None
        if type(verdict) is not dict or verdict.get("verdict") != position:
            return False
        if verdict.get("status") is not None:
            status, detail = str(verdict["status"]), str(verdict.get("detail", ""))
        if verdict.get("output"):
            detail += f"; output: {verdict['output']}"
        report(position, status, detail)
    return True
