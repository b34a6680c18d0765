"""`arithmetic_tools`: long-operand arithmetic where the calculator is the way to the answer.

Problems are `a+b` or `a*b` with operands of `digits_min`..`digits_max` digits (4 to 6 by
default): too long for a tiny model to add or multiply reliably in its head. Rows are chat
rows (`messages`), so they need a tokenizer with a chat template (`model.tokenizer: bpe`).

With `tools: true` (default) the system message describes the `calculator` tool in the
Hermes / Qwen call form (the row sets `tools_in_messages`, so the environment does not add
the template's own tool listing and SFT on the task sees the same prompt as RL), and the SFT
completion is a tool-use demonstration written in ChatML (the format of the `bpe` preset
and of Qwen checkpoints): the call, the tool's result turn and the answer turn

    <tool_call>{"name": "calculator", "arguments": {"expression": "12345*678"}}</tool_call>
    <|im_end|>\\n<|im_start|>tool\\n8369910<|im_end|>\\n<|im_start|>assistant\\n8369910

(the row's `sft_messages` is that whole conversation, so `trainer: sft` on the task trains
the two assistant turns and masks the tool's turn: environment tokens, as in RL, where they
are never in the loss). With `tools: false`
the prompt is the question alone and the completion the answer: the no-tools baseline.

The verifier reads the final integer of the final assistant message (`extract`), so a call
that never comes back to an answer scores 0. Train and test are disjoint by a hash of the
expression, as in `arithmetic`.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

from signalrl.tasks.arithmetic import extract_int_answer
from signalrl.tasks.base import Row

SYSTEM_PROMPT = (
    "You have a calculator. Call it as "
    '<tool_call>{"name": "calculator", "arguments": {"expression": "..."}}</tool_call> '
    "and answer with the number it returns."
)


def tool_call_text(name: str, arguments: dict[str, object]) -> str:
    """A Hermes / Qwen tool call as a policy writes it."""
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


@dataclass
class ArithmeticToolsTask:
    digits_min: int = 4
    digits_max: int = 6
    ops: str = "+*"
    tools: bool = True
    n_train: int = 4000
    n_test: int = 200
    test_fraction: float = 0.1
    seed: int = 0
    name: str = field(default="arithmetic_tools", init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.digits_min <= self.digits_max:
            raise ValueError("arithmetic_tools: need 1 <= digits_min <= digits_max")
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"arithmetic_tools: ops must be a subset of '+-*', got {self.ops!r}")
        if not 0 < self.test_fraction < 1:
            raise ValueError("arithmetic_tools: test_fraction must be in (0, 1)")
        if self.n_train < 1 or self.n_test < 1:
            raise ValueError("arithmetic_tools: n_train and n_test must be >= 1")

    def _is_test(self, expr: str) -> bool:
        h = int.from_bytes(hashlib.sha1(expr.encode()).digest()[:8], "big")
        return (h % 10_000) < self.test_fraction * 10_000

    def _operand(self, rng: random.Random) -> int:
        d = rng.randint(self.digits_min, self.digits_max)
        return rng.randint(10 ** (d - 1), 10**d - 1)

    def _row(self, a: int, op: str, b: int) -> Row:
        expr = f"{a}{op}{b}"
        value = a + b if op == "+" else a - b if op == "-" else a * b
        question = f"What is {expr}?"
        messages = [{"role": "user", "content": question}]
        completion = str(value)
        if self.tools:
            messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
            call = tool_call_text("calculator", {"expression": expr})
            completion = f"{call}<|im_end|>\n<|im_start|>tool\n{value}<|im_end|>\n"
            completion += f"<|im_start|>assistant\n{value}"
        row: Row = {
            "prompt": question,
            "messages": messages,
            "answer": str(value),
            "completion": completion,
            "expr": expr,
        }
        if self.tools:
            row["tools_in_messages"] = True
            row["sft_messages"] = [
                *messages,
                {"role": "assistant", "content": call},
                {"role": "tool", "content": str(value)},
                {"role": "assistant", "content": str(value)},
            ]
        return row

    def _split(self, want_test: bool, n: int, seed: int) -> list[Row]:
        rng = random.Random(seed)
        rows: list[Row] = []
        seen: set[str] = set()
        while len(rows) < n:
            a, op, b = self._operand(rng), rng.choice(self.ops), self._operand(rng)
            expr = f"{a}{op}{b}"
            if self._is_test(expr) != want_test or expr in seen:
                continue
            seen.add(expr)
            rows.append(self._row(a, op, b))
        return rows

    def train(self) -> list[Row]:
        return self._split(False, self.n_train, self.seed * 1_000_003 + 1)

    def test(self) -> list[Row]:
        return self._split(True, self.n_test, self.seed * 1_000_003 + 2)

    def extract(self, completion: str) -> str | None:
        """The final integer of the (final assistant) message, or None."""
        got = extract_int_answer(completion)
        if got is None:
            return None
        digits = got.lstrip("-").lstrip("0") or "0"
        return "-" + digits if got.startswith("-") and digits != "0" else digits

    def verify(self, prompt_row: Row, completion: str) -> float:
        """1.0 when the final integer of the completion equals the answer."""
        got = self.extract(completion)
        return 1.0 if got is not None and got == prompt_row["answer"] else 0.0
