"""The task interface: a deterministic source of prompts that knows its own verifier."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

Row = dict[str, Any]


@runtime_checkable
class Task(Protocol):
    """A verifiable task. Rows hold at least `prompt` (str) and `answer` (str); SFT uses
    `completion` (the reference completion text, without EOS).

    A task may also define `extract(completion) -> str | None`, the final answer `verify`
    reads from a completion (None: no answer); evaluation votes over it for maj@k. It is not
    part of the protocol, so tasks without it still are tasks (they get no maj@k)."""

    name: str

    def train(self) -> list[Row]: ...

    def test(self) -> list[Row]: ...

    def verify(self, prompt_row: Row, completion: str) -> float: ...
