"""`arithmetic`: seeded integer arithmetic problems with an exact-match verifier.

Difficulty knobs: `digits` (operand size: 1..10^digits - 1, or exactly `digits` digits with
`exact_digits`), `ops` (a subset of "+-*"), `operands` (how many numbers). Train and test are
disjoint by construction: a problem's split is decided by a hash of its text, so no train
problem can ever appear in the test split, whatever the sizes and seeds.

Prompts: `template: plain` (default) renders `prompt_template` (`"{expr}="`); `template:
r1_zero` renders the DeepSeek-R1-Zero prompt (`signalrl.tasks.dataset.R1_ZERO_TEMPLATE`) around
the question `"What is {expr}?"`, and the SFT completion becomes
`" <think> {expr}={value} </think> <answer> {value} </answer>"`; `template: chat` gives each
row `messages` (one user turn, `"What is {expr}?"`, also the row's plain `prompt`), which the
trainers, `signalrl eval` and `make-preferences` render with the model's chat template
(`signalrl.data.chat.render_row`); the completion stays `"{value}"`. With any template, a
completion holding an `<answer>...</answer>` block is judged on the last such block.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

from signalrl.rewards.format import extract_tagged_answer
from signalrl.tasks.base import Row
from signalrl.tasks.dataset import R1_ZERO_TEMPLATE

_INT = re.compile(r"-?\d+")
_ANSWER_TAG = re.compile(r"(?:answer\s*(?:is|:)|####)\s*(-?\d[\d,]*)", re.IGNORECASE)


def extract_int_answer(completion: str) -> str | None:
    """The final answer of a completion: after the last `Answer:`/`answer is`/`####` if any,
    else the last integer in the text. Returns the digits (commas removed) or None."""
    tagged = _ANSWER_TAG.findall(completion)
    if tagged:
        return tagged[-1].replace(",", "")
    found = _INT.findall(completion)
    return found[-1] if found else None


def _evaluate(numbers: list[int], ops: list[str]) -> int:
    # Standard precedence: * before + and -.
    terms: list[int] = [numbers[0]]
    signs: list[str] = []
    for op, n in zip(ops, numbers[1:], strict=True):
        if op == "*":
            terms[-1] *= n
        else:
            signs.append(op)
            terms.append(n)
    total = terms[0]
    for s, t in zip(signs, terms[1:], strict=True):
        total = total + t if s == "+" else total - t
    return total


@dataclass
class ArithmeticTask:
    digits: int = 2
    ops: str = "+"
    operands: int = 2
    exact_digits: bool = False
    n_train: int = 20000
    n_test: int = 500
    test_fraction: float = 0.1
    seed: int = 0
    prompt_template: str = "{expr}="
    template: str = "plain"
    name: str = field(default="arithmetic", init=False)

    def __post_init__(self) -> None:
        if self.digits < 1 or self.operands < 2:
            raise ValueError("arithmetic: need digits >= 1 and operands >= 2")
        bad = set(self.ops) - set("+-*")
        if not self.ops or bad:
            raise ValueError(
                f"arithmetic: ops must be a non-empty subset of '+-*', got {self.ops!r}"
            )
        if not 0 < self.test_fraction < 1:
            raise ValueError("arithmetic: test_fraction must be in (0, 1)")
        if "{expr}" not in self.prompt_template:
            raise ValueError("arithmetic: prompt_template must contain '{expr}'")
        if self.template not in ("plain", "r1_zero", "chat"):
            raise ValueError(
                f"arithmetic: template must be 'plain', 'r1_zero' or 'chat', got "
                f"{self.template!r}"
            )
        lo = 10 ** (self.digits - 1) if self.exact_digits else 0
        hi = 10**self.digits - 1
        self._lo, self._hi = lo, hi
        space = (hi - lo + 1) ** self.operands * len(self.ops) ** (self.operands - 1)
        self._space = space
        if self.n_test > space * self.test_fraction * 0.8:
            raise ValueError(
                f"arithmetic: n_test={self.n_test} is too many for a problem space of {space} "
                f"with test_fraction={self.test_fraction}"
            )

    # -- generation -------------------------------------------------------------------------
    def _is_test(self, expr: str) -> bool:
        h = int.from_bytes(hashlib.sha1(expr.encode()).digest()[:8], "big")
        return (h % 10_000) < self.test_fraction * 10_000

    def _random_problem(self, rng: random.Random) -> tuple[str, int]:
        numbers = [rng.randint(self._lo, self._hi) for _ in range(self.operands)]
        ops = [rng.choice(self.ops) for _ in range(self.operands - 1)]
        expr = str(numbers[0]) + "".join(f"{o}{n}" for o, n in zip(ops, numbers[1:], strict=True))
        return expr, _evaluate(numbers, ops)

    def render(self, expr: str) -> str:
        """The prompt for one expression under this task's template."""
        if self.template == "r1_zero":
            return R1_ZERO_TEMPLATE.replace("{prompt}", f"What is {expr}?")
        if self.template == "chat":
            return f"What is {expr}?"
        return self.prompt_template.format(expr=expr)

    def is_test(self, expr: str) -> bool:
        """Whether `expr` (e.g. `"37+48"`) belongs to the test part of the problem space."""
        return self._is_test(expr)

    def _row(self, expr: str, value: int) -> Row:
        completion = str(value)
        if self.template == "r1_zero":
            completion = f" <think> {expr}={value} </think> <answer> {value} </answer>"
        row: Row = {
            "prompt": self.render(expr),
            "answer": str(value),
            "completion": completion,
            "expr": expr,
        }
        if self.template == "chat":  # rendered by the model's chat template (render_row)
            row["messages"] = [{"role": "user", "content": row["prompt"]}]
        return row

    def _split(self, want_test: bool, n: int, seed: int, unique: bool) -> list[Row]:
        rng = random.Random(seed)
        rows: list[Row] = []
        seen: set[str] = set()
        tries = 0
        while len(rows) < n:
            tries += 1
            if tries > 200 * n + 10_000:
                raise ValueError(f"arithmetic: could not draw {n} problems; space too small")
            expr, value = self._random_problem(rng)
            if self._is_test(expr) != want_test or (unique and expr in seen):
                continue
            seen.add(expr)
            rows.append(self._row(expr, value))
        return rows

    def train(self) -> list[Row]:
        """`n_train` problems drawn with replacement from the train part of the space."""
        unique = self.n_train <= self._space * (1 - self.test_fraction) * 0.5
        return self._split(False, self.n_train, self.seed * 1_000_003 + 1, unique)

    def test(self) -> list[Row]:
        """`n_test` distinct problems from the test part of the space (fixed by `seed`)."""
        return self._split(True, self.n_test, self.seed * 1_000_003 + 2, True)

    # -- verification -------------------------------------------------------------------------
    def verify(self, prompt_row: Row, completion: str) -> float:
        """1.0 when the final integer answer (:meth:`extract`) equals the reference."""
        got = self.extract(completion)
        if got is None:
            return 0.0
        try:
            return 1.0 if int(got) == int(prompt_row["answer"]) else 0.0
        except ValueError:
            return 0.0

    def extract(self, completion: str) -> str | None:
        """The final integer answer of a completion, or None: inside the last
        `<answer>...</answer>` block if there is one, else as `extract_int_answer` finds it;
        in canonical form (``"007"`` is ``"7"``, ``"-0"`` is ``"0"``). :meth:`verify` judges
        this answer; evaluation votes over it for maj@k."""
        tagged = extract_tagged_answer(completion)
        got = extract_int_answer(tagged if tagged is not None else completion)
        if got is None:
            return None
        # canonical digits without int(), which refuses very long digit strings
        digits = got.lstrip("-").lstrip("0") or "0"
        return "-" + digits if got.startswith("-") and digits != "0" else digits
