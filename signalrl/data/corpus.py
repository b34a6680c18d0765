"""A synthetic *pretraining* corpus for the `arithmetic` task: the small-scale stand-in for the
web text a base model has read before R1-Zero-style RL.

The corpus teaches two things separately and never together:

* arithmetic knowledge, in plain text: worksheets of equations (`37+48=85`), worded sums
  (`The sum of 37 and 48 is 85.`, `Q: What is 37 plus 48?` / `A: 85`) and worked additions
  with carries (`37+48: 7+8=15, write 5 carry 1; 3+4+1=8, write 8. So 37+48=85.`);
* the R1 reasoning format, on *other* tasks only (comparing two numbers, first / last letter,
  capital letters, counting letters, the longer of two words): documents that use the
  DeepSeek-R1-Zero prompt template (`signalrl.tasks.dataset.R1_ZERO_TEMPLATE`) with a
  `<think>...</think> <answer>...</answer>` reply, documents that use the template but answer
  without tags, and documents with the tags outside the template.

What it never holds: the R1-Zero template around an arithmetic question, an `<answer>` (or
`<think>`) block about a sum, or any problem of the task's test split in any of the written
forms (every expression is drawn from the train part of the task's hash split, and worked
additions whose digit steps are test problems are skipped). So a model pretrained on it has
seen the knowledge and the format, but has to put them together itself, which is what GRPO
with format + accuracy rewards is then asked to teach (`recipes/r1zero-arithmetic.yaml`).

Every document is a `{"text": ..., "type": ...}` row for `trainer: sft` with `data.path`
(`data.kind: text`, loss on every token). Documents are 400-540 characters long, so batches
of them waste little on padding.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signalrl.tasks.arithmetic import ArithmeticTask, _evaluate
from signalrl.tasks.dataset import R1_ZERO_TEMPLATE

__all__ = [
    "DEFAULT_MIX",
    "DOC_TYPES",
    "CorpusStats",
    "arithmetic_expressions",
    "leaked_test_problems",
    "make_arithmetic_corpus",
    "parse_mix",
    "write_corpus",
]

#: Document types and their default share of the corpus (by number of documents).
DEFAULT_MIX: dict[str, float] = {
    "equations": 0.40,  # worksheets of a+b=c lines
    "worded": 0.20,  # sums in sentences and plain Q/A
    "worked": 0.05,  # additions with the carries written out
    "r1_tagged": 0.25,  # R1-Zero template, other tasks, <think>/<answer> reply
    "r1_plain": 0.03,  # R1-Zero template, other tasks, reply without tags
    "tagged": 0.07,  # <think>/<answer> on other tasks outside the template
}
DOC_TYPES = tuple(DEFAULT_MIX)

_WORDS = (
    "apple river stone house green table light water music garden paper window "
    "cloud bread chair horse plant smile train beach dream earth flame grape honey "
    "juice lemon maple night ocean piano queen robin sugar tiger uncle voice whale "
    "zebra candle forest planet silver rocket spring winter summer autumn bottle "
    "button carpet dragon engine feather guitar island jacket kettle ladder mirror "
    "needle orange pencil rabbit saddle teapot tunnel violin wallet yellow basket "
    "cat dog sun map cup hat pen box fox owl bee ant egg ice jam key leg net oak pig "
    "rug sky toy van web yak zip bird fish tree moon star book door lamp ring ship"
).split()
# Characters per document: arithmetic documents are filled to 80-100% of this, so that a
# batch (padded to its longest row) wastes little on padding beside the ~450-540 character
# R1-Zero template documents.
_TEXT_MAX = 520


@dataclass
class CorpusStats:
    docs: int
    chars: int
    by_type: dict[str, int]
    out: str = ""


def parse_mix(text: str) -> dict[str, float]:
    """`"equations=0.3,worded=0.2"` -> a mix (unnamed types get 0)."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in DEFAULT_MIX:
            raise ValueError(
                f"--mix {part!r}: expected type=weight with type one of {', '.join(DOC_TYPES)}"
            )
        try:
            mix[name] = float(value)
        except ValueError:
            raise ValueError(f"--mix {part!r}: weight must be a number") from None
    return mix


def _check_mix(mix: dict[str, float]) -> dict[str, float]:
    bad = set(mix) - set(DEFAULT_MIX)
    if bad:
        raise ValueError(
            f"corpus mix: unknown document types {sorted(bad)}; valid: {', '.join(DOC_TYPES)}"
        )
    if any(w < 0 for w in mix.values()) or not sum(mix.values()) > 0:
        raise ValueError("corpus mix: weights must be >= 0 with a positive sum")
    return {k: mix.get(k, 0.0) for k in DOC_TYPES}


# --------------------------------------------------------------------------------------
# Arithmetic knowledge (train split only)
# --------------------------------------------------------------------------------------


def arithmetic_expressions(task: ArithmeticTask, rng: random.Random) -> Callable[[], tuple]:
    """A drawer of `(expr, numbers, ops, value)` from the train part of `task`'s space."""

    def draw() -> tuple[str, list[int], list[str], int]:
        while True:
            numbers = [rng.randint(task._lo, task._hi) for _ in range(task.operands)]
            ops = [rng.choice(task.ops) for _ in range(task.operands - 1)]
            expr = str(numbers[0]) + "".join(
                f"{o}{n}" for o, n in zip(ops, numbers[1:], strict=True)
            )
            if not task.is_test(expr):
                return expr, numbers, ops, _evaluate(numbers, ops)

    return draw


_OP_WORD = {"+": "plus", "-": "minus", "*": "times"}


def _spaced(numbers: list[int], ops: list[str]) -> str:
    return str(numbers[0]) + "".join(f" {o} {n}" for o, n in zip(ops, numbers[1:], strict=True))


def _worded(numbers: list[int], ops: list[str], value: int, rng: random.Random) -> str:
    expr = "".join([str(numbers[0])] + [f"{o}{n}" for o, n in zip(ops, numbers[1:], strict=True)])
    words = str(numbers[0]) + "".join(
        f" {_OP_WORD[o]} {n}" for o, n in zip(ops, numbers[1:], strict=True)
    )
    forms = [
        f"{words} equals {value}.",
        f"{words} is {value}.",
        f"Q: What is {words}?\nA: {value}",
        f"What is {expr}? It is {value}.",
        f"We know that {_spaced(numbers, ops)} = {value}.",
    ]
    if len(numbers) == 2 and ops == ["+"]:
        a, b = numbers
        forms += [
            f"The sum of {a} and {b} is {value}.",
            f"If you add {b} to {a} you get {value}.",
            f"{a} and {b} make {value} together.",
        ]
    return rng.choice(forms)


def _worked(task: ArithmeticTask, a: int, b: int) -> str | None:
    """`a+b` with its column additions written out, or None when a digit step would be a test
    problem (so the corpus never shows one)."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps: list[str] = []
    carry = 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        if task.operands == 2 and "+" in task.ops and task.is_test(f"{x}+{y}"):
            return None
        s = x + y + carry
        lhs = f"{x}+{y}" + (f"+{carry}" if carry else "")
        if s >= 10:
            steps.append(f"{lhs}={s}, write {s % 10} carry 1")
        else:
            steps.append(f"{lhs}={s}, write {s}")
        carry = s // 10
    if carry:
        steps.append("write the carry 1")
    return f"{a}+{b}: " + "; ".join(steps) + f". So {a}+{b}={a + b}."


def _fill(first: str, more: Callable[[], str | None], sep: str, rng: random.Random) -> str:
    """Join pieces until the next would pass the length budget (at least `first`)."""
    text, target = first, rng.randint(_TEXT_MAX * 4 // 5, _TEXT_MAX)
    for _ in range(200):
        piece = more()
        if piece is None:
            continue
        if len(text) + len(sep) + len(piece) > target:
            break
        text += sep + piece
    return text


# --------------------------------------------------------------------------------------
# Other tasks, for the tags and the template
# --------------------------------------------------------------------------------------


def _other_task(rng: random.Random) -> tuple[str, str, str]:
    """(question, reasoning, answer) of a short task that is not arithmetic."""
    kind = rng.randrange(6)
    w = rng.choice(_WORDS)
    spelled = " ".join(w)
    if kind == 0:
        x, y = rng.sample(range(10, 100), 2)
        big = max(x, y)
        why = (
            f"{x // 10} tens and {y // 10} tens"
            if x // 10 != y // 10
            else f"same tens, ones {x % 10} and {y % 10}"
        )
        return f"Which is larger, {x} or {y}?", why, str(big)
    if kind == 1:
        return f"What is the last letter of {w}?", spelled, w[-1]
    if kind == 2:
        return f"What is the first letter of {w}?", spelled, w[0]
    if kind == 3:
        return f"Write {w} in capital letters", spelled, w.upper()
    if kind == 4:
        return f"How many letters are in {w}?", spelled, str(len(w))
    v = rng.choice(_WORDS)
    longer = w if len(w) >= len(v) else v
    return f"Which word is longer, {w} or {v}?", f"{len(w)} and {len(v)} letters", longer


def _r1_doc(rng: random.Random, tagged: bool) -> str:
    q, why, ans = _other_task(rng)
    if tagged:
        reply = f" <think> {why} </think> <answer> {ans} </answer>"
    else:
        reply = rng.choice([f" The answer is {ans}.", f" {ans}", f" It is {ans}."])
    return R1_ZERO_TEMPLATE.replace("{prompt}", q) + reply


def _tagged_doc(rng: random.Random) -> str:
    def one() -> str:
        q, why, ans = _other_task(rng)
        head = rng.choice(["Puzzle: ", "Exercise: ", "Question: ", ""])
        return f"{head}{q}\n<think> {why} </think>\n<answer> {ans} </answer>"

    return _fill(one(), one, "\n\n", rng)


# --------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------


def make_arithmetic_corpus(
    task: ArithmeticTask,
    n_docs: int,
    *,
    seed: int = 0,
    mix: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """`n_docs` documents `{"text", "type"}` (see the module docstring), deterministic in
    `seed`, with the task's test problems held out."""
    if n_docs < 1:
        raise ValueError("corpus: n_docs must be >= 1")
    weights = _check_mix(mix if mix is not None else DEFAULT_MIX)
    rng = random.Random(seed)
    draw = arithmetic_expressions(task, rng)
    adds = task.ops == "+" and task.operands == 2

    def equation() -> str:
        _, numbers, ops, value = draw()
        if rng.random() < 0.5:
            return f"{_spaced(numbers, ops)} = {value}"
        expr = str(numbers[0]) + "".join(f"{o}{n}" for o, n in zip(ops, numbers[1:], strict=True))
        return f"{expr}={value}"

    def worded() -> str:
        _, numbers, ops, value = draw()
        return _worded(numbers, ops, value, rng)

    def worked() -> str | None:
        _, numbers, _, _ = draw()
        return _worked(task, numbers[0], numbers[1])

    def worked_first() -> str:
        for _ in range(1000):
            piece = worked()
            if piece is not None:
                return piece
        raise ValueError("corpus: could not draw a worked addition outside the test split")

    types = list(weights)
    if not adds and weights["worked"] > 0:  # worked additions need two-operand sums
        weights = {**weights, "equations": weights["equations"] + weights["worked"], "worked": 0}
    docs: list[dict[str, Any]] = []
    for _ in range(n_docs):
        kind = rng.choices(types, weights=[weights[t] for t in types])[0]
        if kind == "equations":
            text = _fill(equation(), equation, "\n", rng)
        elif kind == "worded":
            text = _fill(worded(), worded, "\n", rng)
        elif kind == "worked":
            text = _fill(worked_first(), worked, "\n", rng)
        elif kind == "r1_tagged":
            text = _r1_doc(rng, tagged=True)
        elif kind == "r1_plain":
            text = _r1_doc(rng, tagged=False)
        else:
            text = _tagged_doc(rng)
        docs.append({"text": text, "type": kind})
    return docs


_CHAIN = re.compile(r"\d+(?:\s*[-+*]\s*\d+)+")
_WORDED = (
    (re.compile(r"\bsum of (\d+) and (\d+)", re.IGNORECASE), r"\1+\2"),
    (re.compile(r"\badd (\d+) to (\d+)", re.IGNORECASE), r"\2+\1"),
    (re.compile(r"\b(\d+) and (\d+) make\b"), r"\1+\2"),
    (re.compile(r" plus "), "+"),
    (re.compile(r" minus "), "-"),
    (re.compile(r" times "), "*"),
)


def leaked_test_problems(task: ArithmeticTask, text: str) -> list[str]:
    """Expressions in `text` that belong to `task`'s test split, in any of the corpus's
    written forms (`37+48`, `37 + 48`, `37 plus 48`, `the sum of 37 and 48`, ...)."""
    for pattern, repl in _WORDED:
        text = pattern.sub(repl, text)
    found = []
    for m in _CHAIN.finditer(text):
        expr = re.sub(r"\s+", "", m.group(0))
        if len(re.findall(r"\d+", expr)) == task.operands and task.is_test(expr):
            found.append(expr)
    return found


def write_corpus(
    out: str | Path,
    task: ArithmeticTask,
    n_docs: int,
    *,
    seed: int = 0,
    mix: dict[str, float] | None = None,
) -> CorpusStats:
    """Write the corpus as JSONL (written to a temporary file and renamed)."""
    docs = make_arithmetic_corpus(task, n_docs, seed=seed, mix=mix)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    tmp.replace(path)
    return CorpusStats(
        docs=len(docs),
        chars=sum(len(d["text"]) for d in docs),
        by_type=dict(Counter(d["type"] for d in docs)),
        out=str(path),
    )
