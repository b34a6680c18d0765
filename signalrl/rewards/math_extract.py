"""Final-answer extraction and normalisation for :mod:`signalrl.rewards.math` (stdlib only).

:func:`extract_answer` reads a completion's final answer as a string, in this order:

1. The last complete ``<answer>...</answer>`` block, if any: its content is the answer, read
   with steps 2-4, else its last math span, else its last number (whatever
   ``fallback_last_number`` says: the block holds nothing but the answer).
2. math-verify's anchored answers, read the way ``math_verify.parse`` reads them: the
   Minerva ``final answer is X. I hope`` sentence first, then the rightmost of the boxes and
   ``final answer ... is X`` phrases. Several boxes form one answer, joined by commas (a
   set or tuple for math-verify): all boxes of one math environment (``$...$``, ``\\[...\\]``,
   ...) and of environments chained by ``,`` / ``and`` / ``or``; outside environments, the
   last box and the boxes before it that are close to it (under 10 characters apart, or
   under 70 with a ``,``, ``;``, ``and`` or ``or`` between and another content).
3. Our own anchors: the last ``Answer: ...`` / ``answer is ...`` phrase, the last ``#### N``.
4. A completion that is nothing but a formula (one ``$...$`` / ``\\(...\\)`` / ``\\[...\\]``
   span, a number or a plain expression) is its own answer.
5. Optionally (``fallback_last_number``), the last number in the text.

An unterminated ``\\boxed{`` (a truncated generation) contributes nothing: the text from it
onwards is ignored (math-verify would read the rest of the text as its content).

Step 2 is ported from math-verify 0.9 (``math_verify/parser.py`` and
``latex2sympy2_extended/math_normalization.py``, MIT licence, (c) The HuggingFace Team), with
two changes that bound its cost on degenerate generations: the environments holding boxes
are found by a linear scanner (:class:`_EnvScanner`) instead of math-verify's backtracking
regular expressions, and a ``final answer is`` phrase is read only among the last 20 of
them, with at most ``_SPAN_CAP`` characters of math after it. ``\\boxed {x}`` (a space before
the brace) and ``\\fbox{x}`` count as boxes everywhere, which math-verify misses in places.

This module imports only the standard library; :mod:`signalrl.rewards.math` compares the
extracted answers with math-verify in its worker process.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from functools import partial

__all__ = [
    "clean_phrase",
    "extract_answer",
    "extract_reference",
    "find_last_boxed",
    "normalize_answer",
]

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# "answer is X" / "answer: X" / "answer = X" (group 1), or "answer" then a math span (group 2)
_ANSWER_RE = re.compile(
    r"\b(?:final\s+answer|answer)(?:\s*(?:is\b\s*:?|:|=)\s*(.*)"
    r"|\s+(?s:(\$\$.{1,2000}?\$\$|\$(?:\\\$|[^$]){1,2000}\$|\\\(.{1,2000}?\\\)"
    r"|\\\[.{1,2000}?\\\])))",
    re.IGNORECASE,
)
_HASH_RE = re.compile(r"####[ \t]*(.*)")
# A number; a comma is a thousands separator only in the form 1,234,567 (like math-verify).
_NUM = r"[-+]?(?:[1-9]\d{0,2}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:{_NUM})(?:\s*/\s*\d+)?(?:\s*\\?%)?")
_PLAIN_NUMBER_RE = re.compile(rf"^(?:{_NUM})$")
_SPACED_THOUSANDS_RE = re.compile(r"^[-+]?[1-9]\d{0,2}(?: \d{3})+(?:\.\d+)?$")
_NUMBER_WITH_WORDS_RE = re.compile(rf"^\\?\$?\s*((?:{_NUM})(?:\s*\\?%)?)\s*[A-Za-z][A-Za-z .]*$")
_PERCENT_RE = re.compile(rf"^({_NUM})\s*\\?%$")
_CURRENCY_RE = re.compile(r"^\\?\$\s*(?=[-+]?[\d.])")
_EXPR_CHARS_RE = re.compile(r"^[\w\s+\-*/^().,=<>{}\[\]|!]+$")
_WORD_RE = re.compile(r"[A-Za-z]{3,}")
_MATH_WORDS = frozenset({"sqrt", "pi", "sin", "cos", "tan", "log", "exp", "abs", "inf", "oo"})
_MATH_SPAN_RE = re.compile(
    r"\$\$?((?:\\\$|[^$])+?)\$\$?|\\\((.{1,2000}?)\\\)|\\\[(.{1,2000}?)\\\]", re.DOTALL
)
_WHOLE_SPAN_RE = re.compile(r"\$\$(.+)\$\$|\$(.+)\$|\\\((.+)\\\)|\\\[(.+)\\\]", re.DOTALL)
_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
_FORMULA_SIGN_RE = re.compile(r"[\d\\+\-*/^=<>()\[\]{}|!]")


# --------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------


def _is_escaped(text: str, index: int) -> bool:
    """Whether the character at ``index`` is preceded by an odd number of backslashes."""
    count = 0
    while index - count - 1 >= 0 and text[index - count - 1] == "\\":
        count += 1
    return count % 2 == 1


def _boxed_spans(text: str) -> tuple[list[tuple[int, int]], int | None]:
    """Contents spans of complete ``\\boxed{...}`` and the start of a dangling one."""
    spans: list[tuple[int, int]] = []
    pos = 0
    while True:
        match = _BOXED_RE.search(text, pos)
        if match is None:
            return spans, None
        depth, i = 1, match.end()
        while i < len(text) and depth:
            ch = text[i]
            if ch in "{}" and not _is_escaped(text, i):
                depth += 1 if ch == "{" else -1
            i += 1
        if depth:
            return spans, match.start()  # unterminated: nothing from here on counts
        spans.append((match.end(), i - 1))
        pos = i


def find_last_boxed(text: str) -> str | None:
    """Contents of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), else ``None``.

    Braces are matched with nesting; escaped braces (``\\{``) do not count. If a
    ``\\boxed{`` is never closed, it and everything after it are ignored. (The answer of a
    text with several boxes is :func:`extract_answer`'s business, not this function's.)
    """
    spans, _ = _boxed_spans(text)
    if not spans:
        return None
    start, end = spans[-1]
    return text[start:end].strip()


def _closing_brace(text: str, opening: int, limit: int) -> int | None:
    depth = 1
    for i in range(opening + 1, limit):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


_SEPARATOR_RE = re.compile(r"\b(and|or)\b|,|;")


def _boxes_join(between: str, earlier: str, later: str) -> bool:
    """Whether a box belongs to the answer of the box after it (math-verify's rule)."""
    if len(between) < 10:
        return True
    return earlier != later and len(between) < 70 and bool(_SEPARATOR_RE.search(between))


def _boxed_contents(text: str, grouped: bool) -> list[str]:
    """The contents of the boxes of ``text`` that make up its answer, in order.

    A port of math-verify's ``extract_boxed_content``: scanning from the right, every box
    (``grouped=False``) or the last one and those :func:`_boxes_join` ties to it
    (``grouped=True``); a repeat of the content just taken is dropped.
    """
    results: list[str] = []
    current = limit = len(text)
    later_start: int | None = None
    while True:
        start = max(text.rfind("\\boxed", 0, current), text.rfind("\\fbox", 0, current))
        if start < 0:
            break
        i = start + (6 if text.startswith("\\boxed", start) else 5)
        while i < limit and text[i].isspace():
            i += 1
        if i >= limit:
            break
        end = _closing_brace(text, i, limit) if text[i] == "{" else None
        if end is None:
            if not results:
                results.append(text[i:].strip())
            break
        content = text[i + 1 : end].strip()
        if grouped and later_start is not None:
            if not _boxes_join(text[end + 1 : later_start], content, results[-1]):
                break
        if not results or results[-1] != content:
            results.append(content)
        later_start = current = limit = start
    return results[::-1]


# --------------------------------------------------------------------------------------
# math-verify's anchored answers (priorities 0 and 50 of math_verify.parse)
# --------------------------------------------------------------------------------------


_SPAN_CAP = 2000  # longest math span content read after a phrase (bounds the regex work)
_PERCENT = r"\\?%|[Pp]ercent|[Pp]ercentage|[Pp]ct"


def _env_pattern(prefix: str) -> str:
    """math-verify's math environments (``make_latex_env_pattern``), group ``{prefix}c<k>``."""
    parts = [r"(?:[^$]|\$(?!\$))", r"(?:[^\\]|\\(?!\]))", r"(?:\\[$]|[^\n$])"]
    parts += [r"(?:[^\\\n]|\\(?!\)))", r"[^\n\]\[]"]
    body = [rf"{c}{{1,{_SPAN_CAP}}}?" for c in parts]
    number = r"-?\d+(?:[.,]\d+)?"
    envs = [
        rf"(?<!\\)\$\$(?P<{prefix}c0>{body[0]})(?<!\\)\$\$",
        rf"(?<!\\)\\\[(?P<{prefix}c1>{body[1]})(?<!\\)\\\]",
        rf"(?<!\\|\d)\$(?P<{prefix}c2>{body[2]})(?<!\\)\$",
        rf"(?<!\\)\\\((?P<{prefix}c3>{body[3]})(?<!\\)\\\)",
        rf"\s\[(?P<{prefix}c4>{body[4]})\]\s",
        rf"(?P<{prefix}c5>-?\\frac{{{number}}}{{{number}}})",
    ]
    return rf"(?:(?:{'|'.join(envs)})\s*(?P<{prefix}pct>{_PERCENT})?)"


def _env_chain() -> str:
    """Up to six environments joined by ``,`` / ``and`` / ``or`` (groups ``e0``..``e5``)."""
    joined = "".join(rf"(?:\s*(?:,?and|,?or|,)\s*{_env_pattern(f'e{i}')})?" for i in range(1, 6))
    return _env_pattern("e0") + joined


def _expr_or_number() -> str:
    """math-verify's plain-text number or expression (``lazy_expr_regex``)."""
    number = (
        r"(?<!\d)(?:(?P<int1>-?[1-9]\d{0,2}(?:[ ,]\d{3})+)(?P<dec1>\.\d+)?|"
        r"(?P<int2>-?\d+)(?P<dec2>[.,]\d+)|(?P<dec3>\.\d+)|(?P<int3>-?\d+))"
        r"(?P<npct>\s*(?:%|[Pp]ercent|\s*[Pp]ercentage|\s*[Pp]ct))?"
    )
    ops = r"\+\-\*\×\/\^\(\)\÷"
    chars = rf"[\d\.\s{ops}]"
    expr = rf"(?P<expr>-?\(?-?\d{chars}*[{ops}]{chars}+\)?)"
    prefix = r"(?:^|\s|\=)(?:\*\*)?"
    suffix = r"(?:\*\*)?(?:\.|,|:|\s|\)|\$|$)"
    currency = re.escape("$€£¥₹₽₪₩₫฿₡₢₣₤₥₦₧₨₭₮₯₰₱₲₳₴₵₶₷₸₺₻₼₾₿")
    return rf"(?:{prefix}{expr}{suffix}|{prefix}[{currency}]?{number})"


def _phrase_patterns() -> list[list[tuple[re.Pattern[str], str]]]:
    """The ``final answer is`` patterns of priority 0 and of priority 50."""
    env, expr = _env_chain(), _expr_or_number()
    first = [
        (rf"(?i:final answer is)\:?\s*{env}\.?\s?I hope", "env", re.DOTALL),
        (rf"(?i:final answer is)\:?\s*{expr}\.?\s?I hope", "expr", 0),
    ]
    second = [
        (rf"(?i:final answer.{{0,100}}?)\s+is\:?\s*{env}", "env", re.DOTALL),
        (rf"(?i:final answer.{{0,100}}?)\s+is\:?{expr}", "expr", 0),
        (r"\\(?:boxed|fbox)\s*\{.+\}", "box", re.DOTALL),
    ]
    return [[(re.compile(p, flags), kind) for p, kind, flags in group] for group in (first, second)]


_PHRASES = _phrase_patterns()
_FINAL_ANSWER_RE = re.compile(r"final answer", re.IGNORECASE)
_MAX_PHRASES = 20
_OPENER_RE = re.compile(r"\$|\\[(\[]|\s\[")
_HAS_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{.+?\}", re.DOTALL)
_ENV_TAIL_RE = re.compile(rf"\s*({_PERCENT})?")
_CHAIN_SEP_RE = re.compile(r"\s*(?:,?and|,?or|,)\s*")
# In math-verify's order: opener, closer, whether the content may span lines, and a
# character the content may not hold besides the closer ("" for none).
_ENVS: tuple[tuple[str, str, bool, str], ...] = (
    ("$$", "$$", True, ""),
    ("\\[", "\\]", True, ""),
    ("$", "$", False, ""),
    ("\\(", "\\)", False, ""),
    ("[", "]", False, "["),
)


class _Positions:
    """Sorted positions of a substring in a text, for first-at-or-after queries (bisect)."""

    def __init__(self, text: str, needle: str, unescaped: bool = False) -> None:
        found = (m.start() for m in re.finditer(f"(?={re.escape(needle)})", text))
        # "escaped" as math-verify's look-behinds see it: right after any backslash
        self.at = [i for i in found if not (unescaped and i and text[i - 1] == "\\")]

    def first(self, start: int) -> int:
        i = bisect.bisect_left(self.at, start)
        return self.at[i] if i < len(self.at) else -1


class _EnvScanner:
    """math-verify's boxed-context environments, found in linear time.

    math-verify matches them with nested lazy regular expressions that backtrack for
    minutes on some inputs (many unclosed ``\\(`` on one line, a ``$$`` with many boxes
    after it); this finds the same environments with one bisect per opener.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        needles = {"$$", "\\]", "\\)", "]", "[", "\n"}
        self.pos = {n: _Positions(text, n) for n in needles}
        self.pos["$"] = _Positions(text, "$", unescaped=True)  # an escaped $ is content

    def _escaped(self, i: int) -> bool:
        return i > 0 and self.text[i - 1] == "\\"

    def env_at(self, s: int) -> tuple[int, str, str | None] | None:
        """(end, content, percent) of the environment math-verify matches at ``s``."""
        text = self.text
        if text[s].isspace():  # the " [ ... ] " form starts with the white space
            if not text.startswith("[", s + 1):
                return None
            s += 1
        elif self._escaped(s):
            return None
        for opener, closer, multiline, excluded in _ENVS:
            if not text.startswith(opener, s) or (opener == "$" and s and text[s - 1].isdigit()):
                continue
            c = s + len(opener)
            j = self.pos[closer].first(c)  # the content cannot hold the closer
            if j <= c or (closer != "]" and self._escaped(j)):
                continue
            barriers = ([] if multiline else ["\n"]) + ([excluded] if excluded else [])
            if any(0 <= self.pos[b].first(c) < j for b in barriers):
                continue
            end = j + len(closer)
            if closer == "]" and not (end < len(text) and text[end].isspace()):
                continue
            tail = _ENV_TAIL_RE.match(text, end)  # white space and a percent sign, if any
            return (tail.end(), text[c:j], tail.group(1)) if tail else (end, text[c:j], None)
        return None

    def box_chains(self) -> list[tuple[int, int, list[tuple[str, str | None]]]]:
        """(start, end, [(content, percent)]) of every chain of environments with a box."""
        chains: list[tuple[int, int, list[tuple[str, str | None]]]] = []
        pos, link = 0, -1
        while (opener := _OPENER_RE.search(self.text, pos)) is not None:
            found = self.env_at(opener.start())
            if found is None or not _HAS_BOX_RE.search(found[1]):
                pos, link = opener.start() + 1, -1
                continue
            end, content, percent = found
            if opener.start() == link and len(chains[-1][2]) < 6:
                chains[-1] = (chains[-1][0], end, [*chains[-1][2], (content, percent)])
            else:
                chains.append((opener.start(), end, [(content, percent)]))
            sep = _CHAIN_SEP_RE.match(self.text, end)
            pos, link = end, (sep.end() if sep else -1)
        return chains


def _env_answer(envs: list[tuple[str, str | None]]) -> str:
    """All boxes of each environment, the environments joined (math-verify: a set)."""
    answers = []
    for content, percent in envs:
        inner = _boxed_contents(content, grouped=False) or [content.strip()]
        answers.append(",".join(inner) + ("\\%" if percent else ""))
    return ",".join(answers)


def _from_match(match: re.Match[str], kind: str) -> str:
    """The answer string of one phrase or plain-box match, as math-verify normalises it."""
    if kind == "box":
        return ",".join(_boxed_contents(match.group(0), grouped=True))
    groups = match.groupdict()
    if kind == "expr":
        integer = next((groups[k] for k in ("int1", "int2", "int3") if groups.get(k)), "")
        decimal = next((groups[k] for k in ("dec1", "dec2", "dec3") if groups.get(k)), "")
        if not integer and not decimal:
            return (groups.get("expr") or "").strip()
        sign = "-" if integer.startswith("-") else ""
        digits = integer.lstrip("-").replace(",", "").replace(" ", "").lstrip("0") or "0"
        number = f"{sign}{digits}{decimal.replace(',', '.')}"
        return number + ("\\%" if groups.get("npct") else "")
    envs = []
    for i in range(6):
        content = next((groups[f"e{i}c{k}"] for k in range(6) if groups.get(f"e{i}c{k}")), None)
        if content is not None:
            envs.append((content, groups.get(f"e{i}pct")))
    return _env_answer(envs)


def _anchored_answer(text: str) -> str | None:
    """The answer math-verify's boxes and ``final answer is`` phrases give, else None.

    Priority 0 (the Minerva sentence), then priority 50 (boxes, environments with boxes,
    ``final answer ... is``); within one, the match that ends last wins. An empty box
    gives ``""``.
    """
    # Only the last phrases can give the match that ends last: bound the work on texts that
    # repeat "final answer" thousands of times (each try reads up to _SPAN_CAP characters).
    anchors = [m.start() for m in _FINAL_ANSWER_RE.finditer(text)]
    phrases_from = anchors[-_MAX_PHRASES] if len(anchors) > _MAX_PHRASES else 0
    for priority, patterns in enumerate(_PHRASES):
        best: tuple[int, int] | None = None
        answer: Callable[[], str] = str
        for pattern, kind in patterns:
            for match in pattern.finditer(text, 0 if kind == "box" else phrases_from):
                if best is None or (match.end(), -match.start()) > best:
                    best, answer = (match.end(), -match.start()), partial(_from_match, match, kind)
        if priority == 1 and "\\" in text:
            for start, end, envs in _EnvScanner(text).box_chains():
                if best is None or (end, -start) > best:
                    best, answer = (end, -start), partial(_env_answer, envs)
        if best is not None:
            return answer().strip()
    return None


# --------------------------------------------------------------------------------------
# Phrases, formulas and the extraction order
# --------------------------------------------------------------------------------------


def _looks_like_expression(phrase: str) -> bool:
    """A plain-text formula such as ``x^2+2x+1`` or ``sqrt(2)/2`` (not a sentence)."""
    if not _EXPR_CHARS_RE.match(phrase):
        return False
    words = _WORD_RE.findall(phrase)
    return all(word.lower() in _MATH_WORDS for word in words)


def clean_phrase(phrase: str) -> str | None:
    """Reduce an ``answer is ...`` phrase to the answer itself."""
    phrase = phrase.strip().replace("**", "").replace("__", "").strip()
    phrase = phrase.rstrip(" .;,!").strip()
    if not phrase:
        return None
    spans = [next(g for g in m.groups() if g is not None) for m in _MATH_SPAN_RE.finditer(phrase)]
    if spans:
        return spans[-1].strip()
    words = _NUMBER_WITH_WORDS_RE.match(phrase)
    if words:
        return words.group(1)
    if "\\" in phrase or _PLAIN_NUMBER_RE.match(phrase) or _looks_like_expression(phrase):
        return phrase
    numbers = _NUMBER_RE.findall(phrase)
    if numbers:
        return numbers[-1].strip()
    return phrase


def _whole_formula(text: str) -> str | None:
    """The text itself when it is nothing but one formula (a math span, number, expression)."""
    s = text.strip().rstrip(".").strip()
    span = _WHOLE_SPAN_RE.fullmatch(s)
    if span:
        content = next(g for g in span.groups() if g is not None)
        closing = ("$$", "$", "\\)", "\\]")[span.groups().index(content)]
        return content.strip() if closing not in content and content.strip() else None
    if not s or "\n" in s or any(d in s for d in ("$", "\\(", "\\[")):
        return None
    if _PLAIN_NUMBER_RE.match(s) or _SPACED_THOUSANDS_RE.match(s):
        return s
    if not (_FORMULA_SIGN_RE.search(s) or len(s) == 1):
        return None  # a word or two ("odd", "I do") is not a formula
    words = _WORD_RE.findall(_COMMAND_RE.sub(" ", s))
    # a run of two or more letters that is not a function name makes it a sentence ("It is 4")
    letters = re.findall(r"[A-Za-z]{2,}", _COMMAND_RE.sub(" ", s))
    if any(w.lower() not in _MATH_WORDS for w in letters):
        return None
    if ("\\" in s or _EXPR_CHARS_RE.match(s)) and all(w.lower() in _MATH_WORDS for w in words):
        return s
    return None


def _extract(text: str, fallback_last_number: bool) -> str | None:
    _, dangling = _boxed_spans(text)
    if dangling is not None:
        text = text[:dangling]
    anchored = _anchored_answer(text)
    if anchored:
        return anchored
    for regex in (_ANSWER_RE, _HASH_RE):
        for match in reversed(list(regex.finditer(text))):
            answer = clean_phrase(match.group(match.lastindex or 1))
            if answer:
                return answer
    formula = _whole_formula(text)
    if formula:
        return formula
    if fallback_last_number:
        numbers = _NUMBER_RE.findall(text)
        if numbers:
            return numbers[-1].strip()
    return None


def extract_answer(completion: str, *, fallback_last_number: bool = True) -> str | None:
    """The final answer stated in a completion, as a string, or ``None``.

    Order (see the module docstring): the last ``<answer>`` block; boxes and ``final answer
    is`` phrases as math-verify reads them (several boxes can make one answer, joined by
    commas); ``Answer:`` / ``answer is``; ``#### N``; a completion that is only a formula;
    the last number (if ``fallback_last_number``). Text from an unterminated ``\\boxed{``
    onwards is ignored.
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    text = completion.replace("\u2212", "-")
    tagged = _ANSWER_TAG_RE.findall(text)
    if tagged:  # the block holds the answer: else its last math span, else its last number
        content = tagged[-1].strip()
        return _extract(content, fallback_last_number=False) or clean_phrase(content)
    return _extract(text, fallback_last_number)


def extract_reference(answer: str) -> str:
    """The final answer of a reference solution.

    GSM8K references (``"...reasoning...\\n#### 1,234"``) give the text after the last
    ``####``; MATH references give their boxed answer (several boxes together are one
    answer, as in :func:`extract_answer`); anything else is taken as the answer itself.

    Raises:
        ValueError: when no answer can be found (empty string, empty ``####`` or box).
    """
    if not isinstance(answer, str):
        raise TypeError(f"reference answer must be a str, got {type(answer).__name__}")
    if "####" in answer:
        result = answer.rsplit("####", 1)[1].strip()
    else:
        text = answer.replace("\u2212", "-")
        spans, dangling = _boxed_spans(text)
        anchored = _anchored_answer(text if dangling is None else text[:dangling])
        if anchored is None and spans:  # only empty boxes
            anchored = find_last_boxed(text)
        result = anchored if anchored is not None else answer.strip()
    if not result:
        raise ValueError(f"reference answer has no final answer: {answer[:200]!r}")
    return result


# --------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------


def normalize_answer(answer: str, percent_as_fraction: bool) -> str:
    """Canonical LaTeX-ish form of an extracted answer, ready for ``math_verify.parse``."""
    s = answer.replace("\u2212", "-").strip()
    for _ in range(3):
        before = s
        s = s.strip().rstrip(".").strip()
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if s.startswith(left) and s.endswith(right) and len(s) > len(left) + len(right):
                s = s[len(left) : len(s) - len(right)].strip()
        s = _CURRENCY_RE.sub("", s)
        if s.startswith("\\text{") and s.endswith("}") and s.count("{") == 1:
            inner = s[len("\\text{") : -1].strip()
            if _PERCENT_RE.match(inner) or _PLAIN_NUMBER_RE.match(inner):
                s = inner
        if s == before:
            break
    percent = _PERCENT_RE.match(s)
    if percent:
        number = percent.group(1).replace(",", "")
        return f"\\frac{{{number}}}{{100}}" if percent_as_fraction else number
    if _PLAIN_NUMBER_RE.match(s) or _SPACED_THOUSANDS_RE.match(s):
        return s.replace(",", "").replace(" ", "")
    return s
