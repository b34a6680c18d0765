"""`countdown`: reach a target number by combining given numbers with + - * /.

Every problem is solvable by construction: the numbers are drawn first, then a random
binary expression tree over them (each number a leaf, used exactly once) is evaluated, with
division allowed only where it is exact, and its value becomes the target. That expression
is the row's SFT `completion`.

Difficulty knobs: `n_numbers` (an int, or ``[lo, hi]`` for a count drawn per problem;
default 3 to 4), `min_number`/`max_number` (default 1..25), `ops` (a subset of ``"+-*/"``),
`min_target`/`max_target` (targets outside are redrawn). Train and test are disjoint by
construction: a problem's split is decided by a hash of its canonical text (sorted numbers
and target), so the same problem can never be in both, whatever the sizes and seeds.

Verification (:meth:`CountdownTask.verify`, also :func:`score_expression`):

* The expression is taken from the last ``<answer>...</answer>`` block if there is one,
  else from the text after the last ``Answer:`` on its line, else from the last non-empty
  line. Surrounding backticks, ``$`` and a trailing period are ignored, and a trailing
  ``= N`` is allowed if ``N`` is a number equal to the expression's value.
* It is parsed by a small recursive-descent parser (non-negative integer literals, binary
  ``+ - * /`` with the usual precedence and left associativity, parentheses; ``×``, ``÷``
  and ``−`` are read as ``*``, ``/`` and ``-``). Nothing is ever ``eval``-ed. **Unary minus
  and unary plus are rejected** (the game combines the given numbers with binary
  operations only), as are decimals, any other character, more than
  :data:`MAX_EXPRESSION_CHARS` characters or parentheses nested deeper than
  :data:`MAX_DEPTH`.
* The numbers used must be the given ones: with ``use_all=True`` (default) every given
  number exactly once, as a multiset (a number given twice must be used twice); with
  ``use_all=False`` any non-empty sub-multiset (each given number at most once).
* The value is computed exactly with :class:`fractions.Fraction` (so ``(7/2)*4`` is 14);
  division by zero scores 0.

The reward is 1.0 when the value equals the target, else 0.0; anything unparsable is 0.0.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from signalrl.tasks.base import Row

__all__ = [
    "CountdownTask",
    "ExpressionError",
    "extract_expression",
    "parse_expression",
    "score_expression",
]

#: Longest expression text the verifier will parse (longer ones score 0).
MAX_EXPRESSION_CHARS = 512
#: Deepest parenthesis nesting the verifier will parse (deeper ones score 0).
MAX_DEPTH = 64

_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_PREFIX_RE = re.compile(r"answer\s*:", re.IGNORECASE)
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_TRANSLATE = str.maketrans({"×": "*", "÷": "/", "−": "-", "–": "-"})


class ExpressionError(ValueError):
    """The text is not a well-formed countdown expression."""


# --------------------------------------------------------------------------------------
# Parsing and evaluation (no eval, ever)
# --------------------------------------------------------------------------------------


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in "0123456789":
            j = i
            while j < n and text[j] in "0123456789":
                j += 1
            tokens.append(text[i:j])
            i = j
        elif ch in "+-*/()":
            tokens.append(ch)
            i += 1
        else:
            raise ExpressionError(f"unexpected character {ch!r} at position {i}")
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := atom (('*'|'/') atom)* ;
    atom := INT | '(' expr ')'. Builds nested tuples ``(op, left, right)`` or ``int``."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ExpressionError("unexpected end of expression")
        self.pos += 1
        return tok

    def parse(self) -> object:
        if not self.tokens:
            raise ExpressionError("empty expression")
        node = self.expr()
        if self.peek() is not None:
            raise ExpressionError(f"unexpected {self.peek()!r} after a complete expression")
        return node

    def expr(self) -> object:
        node = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            node = (op, node, self.term())
        return node

    def term(self) -> object:
        node = self.atom()
        while self.peek() in ("*", "/"):
            op = self.take()
            node = (op, node, self.atom())
        return node

    def atom(self) -> object:
        tok = self.take()
        if tok == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ExpressionError(f"parentheses nested deeper than {MAX_DEPTH}")
            node = self.expr()
            if self.take() != ")":
                raise ExpressionError("expected ')'")
            self.depth -= 1
            return node
        if tok.isdigit():
            return int(tok)
        if tok in ("+", "-"):
            raise ExpressionError(f"unary {tok!r} is not allowed")
        raise ExpressionError(f"unexpected {tok!r}")


def parse_expression(text: str) -> tuple[object, list[int]]:
    """Parse an expression; returns ``(tree, numbers used in order)``.

    Raises:
        ExpressionError: on anything but integers, binary ``+ - * /`` and parentheses.
    """
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    tokens = _tokenize(text.translate(_TRANSLATE))
    tree = _Parser(tokens).parse()
    return tree, [int(t) for t in tokens if t.isdigit()]


def _evaluate(node: object) -> Fraction:
    """Exact value of a parsed tree; raises ZeroDivisionError on division by zero."""
    if isinstance(node, int):
        return Fraction(node)
    op, left, right = node  # type: ignore[misc]
    a, b = _evaluate(left), _evaluate(right)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b  # Fraction raises ZeroDivisionError for b == 0


def _strip_decorations(text: str) -> str:
    s = text.strip()
    for _ in range(3):
        before = s
        s = s.strip().rstrip(".").strip()
        if s.startswith("\\(") and s.endswith("\\)"):
            s = s[2:-2]
        s = s.strip("`$").strip()
        if s == before:
            break
    return s


def extract_expression(completion: str) -> str | None:
    """The candidate expression text of a completion (see the module docstring)."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    tagged = _ANSWER_TAG_RE.findall(completion)
    if tagged:
        text = tagged[-1]
    else:
        prefixed = list(_ANSWER_PREFIX_RE.finditer(completion))
        if prefixed:
            text = completion[prefixed[-1].end() :].split("\n", 1)[0]
        else:
            lines = [line for line in completion.splitlines() if line.strip()]
            if not lines:
                return None
            text = lines[-1]
    text = _strip_decorations(text)
    return text or None


def score_expression(
    expression: str, numbers: Sequence[int], target: int | Fraction, *, use_all: bool = True
) -> float:
    """1.0 if ``expression`` uses the given ``numbers`` legally and equals ``target``."""
    lhs, _, rhs = expression.partition("=")
    if "=" in rhs:
        return 0.0
    try:
        tree, used = parse_expression(lhs)
    except ExpressionError:
        return 0.0
    given, got = Counter(int(n) for n in numbers), Counter(used)
    if use_all:
        if got != given:
            return 0.0
    elif not used or any(got[n] > given[n] for n in got):
        return 0.0
    try:
        value = _evaluate(tree)
    except ZeroDivisionError:
        return 0.0
    if rhs.strip():
        try:
            stated, _ = parse_expression(rhs)
        except ExpressionError:
            return 0.0
        if not isinstance(stated, int) or Fraction(stated) != value:
            return 0.0
    return 1.0 if value == Fraction(target) else 0.0


# --------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------


def _render(node: object) -> str:
    """Infix text with only the parentheses needed (left-associative + - * /)."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node  # type: ignore[misc]
    prec = _PRECEDENCE[op]
    ls, rs = _render(left), _render(right)
    if not isinstance(left, int) and _PRECEDENCE[left[0]] < prec:  # type: ignore[index]
        ls = f"({ls})"
    if not isinstance(right, int):
        rprec = _PRECEDENCE[right[0]]  # type: ignore[index]
        if rprec < prec or (rprec == prec and op in "-/"):
            rs = f"({rs})"
    return f"{ls}{op}{rs}"


@dataclass
class CountdownTask:
    n_numbers: int | list[int] | tuple[int, int] = (3, 4)
    min_number: int = 1
    max_number: int = 25
    ops: str = "+-*/"
    min_target: int = 1
    max_target: int = 1000
    use_all: bool = True
    n_train: int = 20000
    n_test: int = 500
    test_fraction: float = 0.1
    seed: int = 0
    prompt_template: str = "Numbers: {numbers}\nTarget: {target}\nExpression:"
    name: str = field(default="countdown", init=False)

    def __post_init__(self) -> None:
        counts = self.n_numbers
        if isinstance(counts, bool):
            raise ValueError("countdown: n_numbers must be an int or a [lo, hi] pair")
        if isinstance(counts, int):
            lo = hi = counts
        elif (
            isinstance(counts, (list, tuple))
            and len(counts) == 2
            and all(isinstance(c, int) and not isinstance(c, bool) for c in counts)
        ):
            lo, hi = counts
        else:
            raise ValueError(
                f"countdown: n_numbers must be an int or a [lo, hi] pair, got {counts!r}"
            )
        if not 2 <= lo <= hi or hi > 8:
            raise ValueError(f"countdown: n_numbers must be between 2 and 8, got {counts!r}")
        self._count_range = (lo, hi)
        if not 0 <= self.min_number <= self.max_number:
            raise ValueError("countdown: need 0 <= min_number <= max_number")
        bad = set(self.ops) - set("+-*/")
        if not self.ops or bad:
            raise ValueError(
                f"countdown: ops must be a non-empty subset of '+-*/', got {self.ops!r}"
            )
        if self.min_target > self.max_target:
            raise ValueError("countdown: need min_target <= max_target")
        if not 0 < self.test_fraction < 1:
            raise ValueError("countdown: test_fraction must be in (0, 1)")
        if self.n_train < 0 or self.n_test < 0:
            raise ValueError("countdown: n_train and n_test must be >= 0")
        for key in ("{numbers}", "{target}"):
            if key not in self.prompt_template:
                raise ValueError(f"countdown: prompt_template must contain '{key}'")
        try:
            self.prompt_template.format(numbers="1, 2", target=3, ops="+, -")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"countdown: prompt_template may only use {{numbers}}, {{target}} and "
                f"{{ops}} (write literal braces as {{{{ }}}}): {e!r}"
            ) from None

    # -- generation -------------------------------------------------------------------------
    @staticmethod
    def _key(numbers: Sequence[int], target: int) -> str:
        return " ".join(map(str, sorted(numbers))) + f" -> {target}"

    def _is_test(self, key: str) -> bool:
        h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
        return (h % 10_000) < self.test_fraction * 10_000

    def _tree(self, leaves: list[int], rng: random.Random) -> tuple[object, int] | None:
        if len(leaves) == 1:
            return leaves[0], leaves[0]
        k = rng.randint(1, len(leaves) - 1)
        left, right = self._tree(leaves[:k], rng), self._tree(leaves[k:], rng)
        if left is None or right is None:
            return None
        (lt, lv), (rt, rv) = left, right
        allowed = [o for o in self.ops if o != "/" or (rv != 0 and lv % rv == 0)]
        if not allowed:
            return None
        op = rng.choice(allowed)
        value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv // rv if rv else 0}[op]
        return (op, lt, rt), value

    def _random_problem(self, rng: random.Random) -> tuple[list[int], int, str] | None:
        count = rng.randint(*self._count_range)
        numbers = [rng.randint(self.min_number, self.max_number) for _ in range(count)]
        leaves = numbers[:]
        rng.shuffle(leaves)
        built = self._tree(leaves, rng)
        if built is None:
            return None
        tree, target = built
        if not self.min_target <= target <= self.max_target:
            return None
        return numbers, target, _render(tree)

    def _row(self, numbers: list[int], target: int, expr: str) -> Row:
        shown = ", ".join(map(str, numbers))
        prompt = self.prompt_template.format(numbers=shown, target=target, ops=", ".join(self.ops))
        return {
            "prompt": prompt,
            "answer": str(target),
            "completion": " " + expr,
            "numbers": list(numbers),
            "target": target,
            "expr": expr,
        }

    def _split(self, want_test: bool, n: int, seed: int) -> list[Row]:
        rng = random.Random(seed)
        rows: list[Row] = []
        seen: set[str] = set()
        tries = 0
        while len(rows) < n:
            tries += 1
            if tries > 200 * n + 10_000:
                raise ValueError(
                    f"countdown: could not draw {n} distinct problems; the problem space "
                    "(n_numbers, min/max_number, ops, min/max_target) is too small"
                )
            problem = self._random_problem(rng)
            if problem is None:
                continue
            numbers, target, expr = problem
            key = self._key(numbers, target)
            if key in seen or self._is_test(key) != want_test:
                continue
            seen.add(key)
            rows.append(self._row(numbers, target, expr))
        return rows

    def train(self) -> list[Row]:
        """`n_train` distinct problems from the train part of the space (fixed by `seed`)."""
        return self._split(False, self.n_train, self.seed * 1_000_003 + 1)

    def test(self) -> list[Row]:
        """`n_test` distinct problems from the test part of the space (fixed by `seed`)."""
        return self._split(True, self.n_test, self.seed * 1_000_003 + 2)

    # -- verification -------------------------------------------------------------------------
    def verify(self, prompt_row: Row, completion: str) -> float:
        expression = extract_expression(completion)
        if expression is None:
            return 0.0
        return score_expression(
            expression, prompt_row["numbers"], int(prompt_row["target"]), use_all=self.use_all
        )

    def extract(self, completion: str) -> str | None:
        """The expression a completion proposes (:func:`extract_expression`) with whitespace
        removed, or None: what :meth:`verify` scores, and what evaluation votes over for
        maj@k."""
        expression = extract_expression(completion)
        return None if expression is None else "".join(expression.split())
