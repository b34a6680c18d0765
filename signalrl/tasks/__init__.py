"""Built-in verifiable tasks, by name."""

from __future__ import annotations

from typing import Any

from signalrl.tasks.arithmetic import ArithmeticTask
from signalrl.tasks.base import Row, Task
from signalrl.tasks.countdown import CountdownTask
from signalrl.tasks.dataset import DatasetTask

TASKS: dict[str, type] = {
    "arithmetic": ArithmeticTask,
    "countdown": CountdownTask,
    "dataset": DatasetTask,
}


def make_task(name: str, **kwargs: Any) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    try:
        return TASKS[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"task {name!r}: {e}") from e


__all__ = [
    "ArithmeticTask",
    "CountdownTask",
    "DatasetTask",
    "Row",
    "TASKS",
    "Task",
    "make_task",
]
