"""Built-in verifiable tasks, by name."""

from __future__ import annotations

from typing import Any

from signalrl.tasks.arithmetic import ArithmeticTask
from signalrl.tasks.arithmetic_tools import ArithmeticToolsTask
from signalrl.tasks.base import Row, Task
from signalrl.tasks.countdown import CountdownTask
from signalrl.tasks.dataset import DatasetTask
from signalrl.tasks.guess_number import GuessNumberTask

TASKS: dict[str, type] = {
    "arithmetic": ArithmeticTask,
    "arithmetic_tools": ArithmeticToolsTask,
    "countdown": CountdownTask,
    "dataset": DatasetTask,
    "guess_number": GuessNumberTask,
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
    "ArithmeticToolsTask",
    "CountdownTask",
    "DatasetTask",
    "GuessNumberTask",
    "Row",
    "TASKS",
    "Task",
    "make_task",
]
