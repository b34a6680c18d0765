"""The sandbox's public data types: test outcomes, resource limits, sandbox modes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

__all__ = ["SANDBOX_MODES", "SandboxLimits", "SandboxMode", "TestOutcome", "TestStatus"]

TestStatus = Literal["passed", "failed", "error", "timeout", "killed"]
SandboxMode = Literal["auto", "required", "none"]
SANDBOX_MODES: tuple[str, ...] = ("auto", "required", "none")

_STATUSES = ("passed", "failed", "error", "timeout", "killed")
# The runner truncates what it reports to the same length (runner.py has its own copy).
_DETAIL_CHARS = 1000


def _truncate(text: str, limit: int = _DETAIL_CHARS) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2 - 10
    return f"{text[:half]} ...[truncated]... {text[-half:]}"


@dataclass(frozen=True)
class TestOutcome:
    """The result of one test.

    Attributes:
        test: the test source (an ``assert`` statement, or the ``check`` program).
        passed: whether the test ran to completion without an exception.
        status: ``"passed"``; ``"failed"`` (an ``AssertionError``); ``"error"`` (any other
            exception, a syntax error, or the process exiting before the test finished);
            ``"timeout"`` (wall-clock or CPU limit); ``"killed"`` (terminated by a signal,
            e.g. a resource limit, or the sandbox died).
        detail: a short, truncated explanation (traceback tail, signal, output head).
    """

    __test__: ClassVar[bool] = False  # not a pytest test class

    test: str
    passed: bool
    status: TestStatus
    detail: str = ""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for a check and its processes.

    Attributes:
        memory_bytes: ``RLIMIT_AS`` (virtual address space) of each process of the program
            (and of the harness that runs the tests).
        memory_budget_bytes: the memory one check may hold in all its processes together.
            Where the host allows it (root, and a cgroup v2 memory controller or a cgroup
            v1 memory hierarchy), each sandboxed runner lives in a memory cgroup with this
            limit and no swap: it covers the program's processes and everything they fork,
            the files they write to the sandbox's tmpfs, and the runner and the harness
            (about 30 MB); past it the kernel's OOM killer ends a process (the program's
            first) and the test scores ``killed``. Elsewhere the program's processes are
            counted instead: ``RLIMIT_NPROC`` is ``max(1, memory_budget_bytes //
            memory_bytes)`` (at most ``max_processes``), so that processes x address space
            stays within the budget; with the defaults that is one process (no fork, no
            thread). :func:`~signalrl.rewards.sandbox.bwrap_status` says which applies.
        file_size_bytes: ``RLIMIT_FSIZE``; also caps the program's captured stdout/stderr.
        max_processes: ``RLIMIT_NPROC`` (processes and threads of the sandbox uid) where a
            memory cgroup bounds the check; only enforced for a non-root uid, i.e. under
            bwrap user namespaces or when the host is root and the sandbox drops to its own
            uid. (Without a private uid, the runner and the harness count too.)
        max_open_files: ``RLIMIT_NOFILE``.
        cpu_seconds: ``RLIMIT_CPU`` per test; ``None`` means ``ceil(timeout) + 1``.
        tmpfs_bytes: size of each private tmpfs (``/tmp``, ``/work``) under bwrap.
        output_bytes: cap on what the host reads from a runner for one check.
    """

    memory_bytes: int = 1 << 30
    file_size_bytes: int = 16 << 20
    max_processes: int = 64
    max_open_files: int = 64
    cpu_seconds: float | None = None
    tmpfs_bytes: int = 64 << 20
    output_bytes: int = 1 << 20
    memory_budget_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        for name in (
            "memory_bytes",
            "memory_budget_bytes",
            "file_size_bytes",
            "max_processes",
            "max_open_files",
            "tmpfs_bytes",
            "output_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive int, got {value!r}")
        if self.cpu_seconds is not None and not self.cpu_seconds > 0:
            raise ValueError(f"SandboxLimits.cpu_seconds must be > 0, got {self.cpu_seconds!r}")

    def process_limit(self, memory_cgroup: bool) -> int:
        """``RLIMIT_NPROC`` of the program: ``max_processes`` under a memory cgroup, else
        the count that keeps processes x ``memory_bytes`` within the budget."""
        if memory_cgroup:
            return self.max_processes
        return min(self.max_processes, max(1, self.memory_budget_bytes // self.memory_bytes))
