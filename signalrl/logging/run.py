"""The run directory (docs/architecture.md, "A run directory"): config.yaml, metrics.jsonl,
samples.jsonl, TensorBoard events.

`metrics.jsonl` is the source of truth: one JSON object per logged step. On resume, lines past
the checkpoint's step are dropped (and TensorBoard purges its events past it) so a step is
never logged twice.

Nothing a user has is deleted by mistake. `plan_run` decides what to do with the directory
before anything is loaded and touches nothing; the trainer validates everything (recipe,
model, data, task) and only then `open_run`s it: it takes an exclusive lock (`RunLock`) for
the life of the run, moves a run being replaced (`--overwrite`) aside to `.<name>.old-<pid>`
(deleted by `drop_replaced` once the new run has made its first step), removes what a failed
start left (a directory with no metrics, checkpoint or final model) and stale temporary
directories, and writes config.yaml.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from signalrl.config.sections import LoggingConfig


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


def user_mode(path: str | os.PathLike[str], directory: bool = True) -> None:
    """Give `path` the permissions a plain mkdir/open would have under the user's umask
    (temp files and directories are created 0700/0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


# -- reading and trimming JSONL logs ---------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL log; a torn final line (a crash mid-write, a full disk) is dropped
    with a warning; a bad line elsewhere is an error naming the file and the line."""
    lines = path.read_text(errors="replace").splitlines()
    rows: list[dict[str, Any]] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):
                warnings.warn(
                    f"{path}: line {n} is torn (incomplete JSON: {line[:60]!r}); dropped",
                    stacklevel=2,
                )
                continue
            raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
    return rows


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    return _read_jsonl(p)


# -- what to do with a run directory ------------------------------------------------------------

RUN_CONTENT = ("metrics.jsonl", "samples.jsonl", "checkpoints", "final")


def holds_run(path: Path) -> bool:
    """A directory holds a run when it has logged a step, a checkpoint or a final model (a
    directory with only a config.yaml or TensorBoard header is a start that failed)."""
    if not path.is_dir():
        return False
    for name in RUN_CONTENT:
        p = path / name
        if p.is_file() and p.stat().st_size > 0:
            return True
        if p.is_dir() and any(not c.name.startswith(".") for c in p.iterdir()):
            return True
    return False


@dataclass
class RunPlan:
    """What `open_run` will do: start a `new` run (the directory is absent, empty or a failed
    start), `resume` from `checkpoint`, or `replace` an existing run (`--overwrite`)."""

    path: Path
    mode: Literal["new", "resume", "replace"]
    checkpoint: Path | None = None


def plan_run(
    path: str | Path, *, resume: bool, overwrite: bool, checkpoint: Path | None
) -> RunPlan:
    """Decide, touching nothing, what happens to the run directory `path` (`checkpoint`:
    the latest usable checkpoint in it, if any)."""
    p = Path(path)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pass one")
    if not holds_run(p):
        foreign = sorted(c.name for c in _entries(p) if not _leftover(c))
        if foreign:
            raise FileExistsError(
                f"run directory {p} holds files that are not a run's ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}); move them or choose another name"
            )
        if resume and _entries(p):
            warnings.warn(f"--resume: {p} holds no run yet; starting it", stacklevel=2)
        return RunPlan(p, "new")
    if resume:
        if checkpoint is None:
            raise FileNotFoundError(
                f"--resume: run directory {p} has no checkpoint to resume from "
                "(checkpoint.every is 0, or the run stopped before its first checkpoint); "
                "pass --overwrite to start it over"
            )
        return RunPlan(p, "resume", checkpoint)
    if overwrite:
        return RunPlan(p, "replace")
    raise FileExistsError(
        f"run directory {p} already holds a run; pass --resume to continue it or "
        "--overwrite to start over"
    )


def _entries(path: Path) -> list[Path]:
    return list(path.iterdir()) if path.is_dir() else []


def _leftover(p: Path) -> bool:
    """What a start that failed before its first logged step can leave: the config, empty
    logs, TensorBoard headers, an empty checkpoints directory, a reference-log-prob cache,
    temporary directories."""
    name = p.name
    if name in ("config.yaml", "config.yaml.tmp", "ref_logps.pt") or name.startswith(".tmp"):
        return True
    if name.startswith("events.out.tfevents.") or (name.startswith(".") and ".tmp-" in name):
        return True
    if name == "wandb" and p.is_dir():  # the wandb sink's files: nothing logged without metrics
        return True
    if name in RUN_CONTENT:
        return (p.is_file() and p.stat().st_size == 0) or (p.is_dir() and not holds_run(p.parent))
    return False


class RunLock:
    """An exclusive `fcntl.flock` on `<output_dir>/.<name>.lock` for the life of a run; the
    file names the holder (pid, host, start time), reported to whoever else tries. Another
    process cannot take it; within one process it is counted (a script may build a second
    trainer on a run it already holds)."""

    _held: dict[str, list[int]] = {}  # path -> [fd, count], this process's locks

    def __init__(self, run_path: Path) -> None:
        self.run_path = run_path
        self.path = run_path.parent / f".{run_path.name}.lock"
        self._mine = False

    def acquire(self) -> None:
        key = str(self.path.resolve())
        if key in RunLock._held:
            RunLock._held[key][1] += 1
            self._mine = True
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RuntimeError(f"run directory {self.run_path} is in use: {holder}") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.ctime()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        RunLock._held[key] = [fd, 1]
        self._mine = True

    def release(self) -> None:
        if not self._mine:
            return
        self._mine = False
        key = str(self.path.resolve())
        entry = RunLock._held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del RunLock._held[key]
            os.ftruncate(entry[0], 0)
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])

    def __del__(self) -> None:
        self.release()


def _stale_temps(path: Path) -> list[Path]:
    dirs = [path, path / "checkpoints"]
    return [
        p
        for d in dirs
        if d.is_dir()
        for p in d.iterdir()
        if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)
    ]


class RunDir:
    """Rank 0's run directory: metrics.jsonl and samples.jsonl, and the metric sinks of
    `logging.sinks` (`signalrl.logging.sinks`: TensorBoard, wandb, trackio), which get every
    logged row and the doctor's findings."""

    def __init__(
        self,
        path: str | Path,
        *,
        purge_step: int | None = None,
        logging: LoggingConfig | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        from signalrl.logging.sinks import Sink, open_sinks

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.samples_path = self.path / "samples.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.final = self.path / "final"
        self.replaced: Path | None = None
        names = list(logging.sinks) if logging is not None else ["tensorboard"]
        self.sinks: list[Sink] = open_sinks(
            names,
            self.path,
            config=config,
            project=logging.project if logging is not None else "signalrl",
            wandb_mode=logging.wandb_mode if logging is not None else None,
            resume_step=purge_step,
        )

    @classmethod
    def open(
        cls,
        plan: RunPlan,
        *,
        resume_step: int | None,
        logging: LoggingConfig | None = None,
        config: dict[str, Any] | None = None,
    ) -> RunDir:
        """Make the planned run directory: move a replaced run aside, remove a failed start
        and stale temporary directories, then open it and its sinks (`logging`, a
        `LoggingConfig`; default TensorBoard alone; `config`: the resolved recipe;
        TensorBoard purges steps past `resume_step`)."""
        p = plan.path
        replaced = None
        if plan.mode == "replace":
            replaced = p.with_name(f".{p.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            p.rename(replaced)
        elif plan.mode == "new":
            for c in _entries(p):  # a failed start's leftovers (plan_run refused anything else)
                if _leftover(c):
                    shutil.rmtree(c) if c.is_dir() else c.unlink()
        for stale in _stale_temps(p):
            shutil.rmtree(stale, ignore_errors=True)
        run = cls(p, purge_step=resume_step, logging=logging, config=config)
        run.replaced = replaced
        return run

    def drop_replaced(self) -> None:
        """Delete the run this one replaced (once this one has started)."""
        if self.replaced is not None:
            shutil.rmtree(self.replaced, ignore_errors=True)
            self.replaced = None

    def restore_replaced(self) -> None:
        """Put the replaced run back (the new one failed before its first step)."""
        if self.replaced is not None:
            self.close()
            shutil.rmtree(self.path, ignore_errors=True)
            self.replaced.rename(self.path)
            self.replaced = None

    def write_config(self, text: str) -> None:
        tmp = self.path / "config.yaml.tmp"
        tmp.write_text(text)
        tmp.replace(self.path / "config.yaml")

    def truncate_metrics(self, step: int) -> None:
        for p in (self.metrics_path, self.samples_path):
            if not p.exists():
                continue
            kept = [r for r in _read_jsonl(p) if r.get("step", 0) <= step]
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(p)

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for sink in self.sinks:
            sink.log(step, row)

    def log_finding(self, finding: dict[str, Any]) -> None:
        """A new doctor finding (`Finding.to_dict()`), for the sinks."""
        for sink in self.sinks:
            sink.finding(finding)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        with self.samples_path.open("a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **{k: _clean(v) for k, v in r.items()}}) + "\n")

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()


class FollowerRun:
    """What a rank other than 0 knows of the run directory: its paths. Rank 0 writes
    (`RunDir`); every write here is a no-op."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        self.samples_path = self.path / "samples.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.final = self.path / "final"
        self.replaced: Path | None = None

    def drop_replaced(self) -> None: ...
    def restore_replaced(self) -> None: ...
    def write_config(self, text: str) -> None: ...
    def truncate_metrics(self, step: int) -> None: ...
    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None: ...
    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None: ...
    def log_finding(self, finding: dict[str, Any]) -> None: ...
    def close(self) -> None: ...
