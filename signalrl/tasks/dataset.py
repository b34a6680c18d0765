"""`dataset`: a verifiable task backed by a data file (JSONL, Parquet or a saved HF dataset).

``path`` (and optionally ``test_path``) name a ``.jsonl``/``.json`` file (one JSON object
per line, or one JSON array of objects), a ``.parquet`` file, or a directory written by
``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` directory gives its ``split`` /
``test_split`` split). JSONL is parsed line by line with :mod:`json` (so errors name the
line, and columns may mix types, e.g. MBPP lists and HumanEval strings in one file);
Parquet with :mod:`pyarrow`; directories with :func:`datasets.load_from_disk`.

Formats (the columns each row must have; ``columns`` renames dataset columns to these):

=========  ==============================================  =============================
format     columns                                         reward (:meth:`verify`)
=========  ==============================================  =============================
gsm8k      ``question``, ``answer`` ending in ``#### N``   ``math_reward`` against ``N``
math       ``problem``, ``solution`` with ``\\boxed{}``    ``math_reward`` against the box
code       ``prompt``, ``tests`` (list of assert strings,  ``code_reward`` (fraction of
           or a ``check(candidate)`` string plus an        tests passed, sandboxed)
           ``entry_point`` column)
generic    ``prompt``, ``answer`` (str or number)          ``math_reward``
=========  ==============================================  =============================

Rows (what :meth:`DatasetTask.train` / :meth:`DatasetTask.test` return) hold ``prompt``
(the rendered prompt), ``question`` (the raw question), ``answer`` (the final reference
answer: ``N`` for gsm8k, the box contents for math, ``""`` for code), ``completion`` (an SFT
target: the gsm8k answer without ``<<calc>>`` annotations, the math solution, the generic
answer, the code column ``canonical_solution``/``code`` if present, or ``completion_field``
when set; absent for code without one), ``source`` (``"file:row"``) and, for code, ``tests``
and ``entry_point``.

Templates (``template``):

* ``"plain"`` (default): the prompt is the question itself.
* ``"r1_zero"``: the DeepSeek-R1-Zero prompt (:data:`R1_ZERO_TEMPLATE`); SFT completions
  become ``" <think> reasoning </think> <answer> answer </answer>"``.
* ``"chat"``: the row also gets ``messages`` (an optional ``system_prompt`` message, then the
  user question) and ``prompt`` stays the plain question text. A trainer that sees
  ``messages`` should render them with ``tokenizer.apply_chat_template(messages,
  add_generation_prompt=True)`` instead of using ``prompt``.
* any other string containing ``{prompt}``: a custom template (only ``{prompt}`` is
  substituted; other braces are kept literally).

Verification: if the completion has an ``<answer>...</answer>`` block (what ``r1_zero``
asks for; honoured with every template), the last one is the answer; otherwise the whole
completion goes to the format's reward. :meth:`verify` is accuracy only; to also reward the
R1 ``<think>/<answer>`` format, list a ``format`` term next to the ``task`` term in the
recipe's ``rewards`` (e.g. ``- {type: format, weight: 0.5}``). :meth:`DatasetTask.extract`
gives the final answer :meth:`verify` reads (evaluation votes over it for maj@k).

Splits: with ``test_path`` the two files are train and test. Without it, a row goes to test
when a hash of its question falls under ``test_fraction``: deterministic, independent of
``seed`` (so runs with different seeds evaluate on the same problems), and duplicated
questions always land on the same side. ``n_train``/``n_test`` keep a ``seed``-chosen subset
(in file order).

Bad input fails when the task is built (so at recipe load time) with a
:class:`DatasetTaskError` naming the file, the row (1-based; the line for JSONL) and the
field.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signalrl.rewards.code import code_reward, extract_code
from signalrl.rewards.format import extract_tagged_answer
from signalrl.rewards.math import (
    _clean_phrase,  # the same phrase cleaning math_reward applies to "answer is ..."
    answers_match,
    extract_answer,
    extract_reference,
    find_last_boxed,
    math_reward,
)
from signalrl.tasks.base import Row

__all__ = ["FORMATS", "R1_ZERO_TEMPLATE", "TEMPLATES", "DatasetTask", "DatasetTaskError"]

FORMATS = ("gsm8k", "math", "code", "generic")
TEMPLATES = ("plain", "r1_zero", "chat")

#: The DeepSeek-R1-Zero prompt; ``{prompt}`` is replaced by the question.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)

_QUESTION = {"gsm8k": "question", "math": "problem", "code": "prompt", "generic": "prompt"}
_CALC_RE = re.compile(r"<<[^<>]*>>")


class DatasetTaskError(ValueError):
    """A dataset task's data does not validate; names the file, row and field."""


# --------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------


def _read_json(path: Path) -> list[tuple[str, Any]]:
    """(location, row) pairs of a JSONL file (or a single JSON array)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetTaskError(f"{path}: cannot read: {e}") from None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetTaskError(f"{path}: not valid JSON: {e}") from None
        return [(f"{path}: row {i}", row) for i, row in enumerate(data, start=1)]
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}: line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DatasetTaskError(f"{path}: line {n}: not valid JSON: {e}") from None
    return rows


def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - any arrow error means "not a parquet file"
        raise DatasetTaskError(f"{path}: could not read as Parquet: {e}") from None
    return [(f"{path}: row {i}", row) for i, row in enumerate(table.to_pylist(), start=1)]


def _read_hf_dir(path: Path, split: str) -> list[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - report any loader failure with the path
        raise DatasetTaskError(
            f"{path}: not a dataset saved with datasets' save_to_disk: {e}"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DatasetTaskError(
                f"{path}: the DatasetDict has no split {split!r}; it has {', '.join(ds)}"
            )
        ds = ds[split]
        path_label = f"{path}[{split}]"
    else:
        path_label = str(path)
    return [(f"{path_label}: row {i}", dict(row)) for i, row in enumerate(ds, start=1)]


def read_rows(path: str | Path, split: str = "train") -> list[tuple[str, Any]]:
    """Raw rows of a data file as ``(location, row)`` pairs; location is ``"file: line N"``
    (JSONL) or ``"file: row N"`` (1-based)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetTaskError(f"{p}: dataset file not found")
    if p.is_dir():
        return _read_hf_dir(p, split)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_json(p)
    if suffix in (".parquet", ".pq"):
        return _read_parquet(p)
    raise DatasetTaskError(
        f"{p}: unknown file type {suffix or '(none)'!r}; use .jsonl, .json, .parquet or a "
        "directory saved with datasets' save_to_disk"
    )


# --------------------------------------------------------------------------------------
# Row validation
# --------------------------------------------------------------------------------------


def _text(row: dict[str, Any], name: str, where: str, *, numbers: bool = False) -> str:
    if name not in row:
        have = ", ".join(map(str, row)) or "none"
        raise DatasetTaskError(f"{where}: missing field '{name}' (columns: {have})")
    value = row[name]
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DatasetTaskError(
            f"{where}: field '{name}' must be a string, got {type(value).__name__}"
        )
    if not value.strip():
        raise DatasetTaskError(f"{where}: field '{name}' is empty")
    return value


def _tests(row: dict[str, Any], where: str) -> tuple[list[str] | str, str | None]:
    if "tests" not in row:
        have = ", ".join(map(str, row)) or "none"
        raise DatasetTaskError(f"{where}: missing field 'tests' (columns: {have})")
    tests = row["tests"]
    if isinstance(tests, str):
        if "check" not in tests:
            raise DatasetTaskError(
                f"{where}: field 'tests' is a string, so it must define check(candidate) "
                "(HumanEval style); for MBPP-style asserts give a list of strings"
            )
        entry = row.get("entry_point")
        if not isinstance(entry, str) or not entry.strip().isidentifier():
            raise DatasetTaskError(
                f"{where}: field 'entry_point' must name the function to check (HumanEval "
                f"style tests), got {entry!r}"
            )
        return tests, entry.strip()
    if (
        not isinstance(tests, list)
        or not tests
        or not all(isinstance(t, str) and t.strip() for t in tests)
    ):
        raise DatasetTaskError(
            f"{where}: field 'tests' must be a non-empty list of non-empty strings (asserts) "
            f"or a check(candidate) string, got {str(tests)[:80]!r}"
        )
    return list(tests), None


# --------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------


@dataclass
class DatasetTask:
    path: str
    format: str = "generic"
    test_path: str | None = None
    test_fraction: float = 0.1
    seed: int = 0
    template: str = "plain"
    system_prompt: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    columns: dict[str, str] | None = None
    completion_field: str | None = None
    split: str = "train"
    test_split: str = "test"
    math_timeout: float = 5.0
    code_timeout: float = 5.0
    sandbox: str = "auto"
    name: str = field(default="dataset", init=False)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(
                f"dataset: format must be one of {', '.join(FORMATS)}, got {self.format!r}"
            )
        if self.template not in TEMPLATES and "{prompt}" not in self.template:
            raise ValueError(
                f"dataset: template must be one of {', '.join(TEMPLATES)} or a string "
                f"containing '{{prompt}}', got {self.template!r}"
            )
        if self.system_prompt is not None and self.template != "chat":
            raise ValueError("dataset: system_prompt needs template: chat")
        if not 0 < self.test_fraction < 1:
            raise ValueError("dataset: test_fraction must be in (0, 1)")
        for key in ("n_train", "n_test"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ValueError(f"dataset: {key} must be a positive int or null")
        if self.columns is not None and (
            not isinstance(self.columns, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.columns.items())
        ):
            raise ValueError("dataset: columns must map field names to column names")
        if self.sandbox not in ("auto", "required", "none"):
            raise ValueError("dataset: sandbox must be auto, required or none")
        for key in ("math_timeout", "code_timeout"):
            if not getattr(self, key) > 0:
                raise ValueError(f"dataset: {key} must be positive")
        train = self._load(self.path, self.split)
        if self.test_path is not None:
            test = self._load(self.test_path, self.test_split)
        else:
            test = [r for r in train if self._is_test(r["question"])]
            train = [r for r in train if not self._is_test(r["question"])]
            for label, rows in (("train", train), ("test", test)):
                if not rows:
                    raise DatasetTaskError(
                        f"{self.path}: the hash split with test_fraction={self.test_fraction} "
                        f"leaves no {label} rows; change test_fraction or give test_path"
                    )
        self._train = self._limit(train, self.n_train, 1)
        self._test = self._limit(test, self.n_test, 2)

    # -- loading ------------------------------------------------------------------------------
    def _load(self, path: str, split: str) -> list[Row]:
        raw = read_rows(path, split)
        if not raw:
            raise DatasetTaskError(f"{path}: no rows")
        return [self._parse(row, where) for where, row in raw]

    def _parse(self, raw: Any, where: str) -> Row:
        if not isinstance(raw, dict):
            raise DatasetTaskError(f"{where}: a row must be an object, got {type(raw).__name__}")
        if self.columns:
            raw = dict(raw)
            for canonical, column in self.columns.items():
                if column not in raw:
                    raise DatasetTaskError(
                        f"{where}: missing column '{column}' (mapped to '{canonical}' by "
                        f"columns; columns: {', '.join(map(str, raw)) or 'none'})"
                    )
                raw[canonical] = raw[column]
        question = _text(raw, _QUESTION[self.format], where)
        row: Row = {"question": question, "source": where}
        reasoning: str | None = None
        completion: str | None = None
        if self.format == "gsm8k":
            solution = _text(raw, "answer", where)
            if "####" not in solution:
                raise DatasetTaskError(
                    f"{where}: field 'answer' has no '#### N' final answer (gsm8k format)"
                )
            try:
                row["answer"] = extract_reference(solution)
            except ValueError:
                raise DatasetTaskError(f"{where}: field 'answer' has an empty '####'") from None
            reasoning = _CALC_RE.sub("", solution.rsplit("####", 1)[0]).strip()
            completion = _CALC_RE.sub("", solution).strip()
        elif self.format == "math":
            solution = _text(raw, "solution", where)
            boxed = find_last_boxed(solution)
            if not boxed:
                raise DatasetTaskError(
                    f"{where}: field 'solution' has no complete, non-empty \\boxed{{...}}"
                )
            row["answer"] = extract_reference(solution)  # several boxes are one answer
            reasoning = completion = solution.strip()
        elif self.format == "generic":
            row["answer"] = _text(raw, "answer", where, numbers=True).strip()
            completion = row["answer"]
        else:  # code
            row["tests"], row["entry_point"] = _tests(raw, where)
            row["answer"] = ""
            for key in ("canonical_solution", "code"):
                if isinstance(raw.get(key), str) and raw[key].strip():
                    completion = raw[key]
                    break
        if self.completion_field is not None:
            completion = _text(raw, self.completion_field, where)
            reasoning = None
        elif self.template == "r1_zero" and self.format != "code":
            inner = f" {reasoning} " if reasoning else " "
            completion = f" <think>{inner}</think> <answer> {row['answer']} </answer>"
        if completion is not None:
            row["completion"] = completion
        row["prompt"] = self._render(question)
        if self.template == "chat":
            messages = [{"role": "user", "content": question}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            row["messages"] = messages
        return row

    def _render(self, question: str) -> str:
        if self.template in ("plain", "chat"):
            return question
        template = R1_ZERO_TEMPLATE if self.template == "r1_zero" else self.template
        return template.replace("{prompt}", question)

    @staticmethod
    def _is_test_hash(question: str, fraction: float) -> bool:
        h = int.from_bytes(hashlib.sha1(question.strip().encode()).digest()[:8], "big")
        return (h % 10_000) < fraction * 10_000

    def _is_test(self, question: str) -> bool:
        return self._is_test_hash(question, self.test_fraction)

    def _limit(self, rows: list[Row], n: int | None, salt: int) -> list[Row]:
        if n is None or n >= len(rows):
            return rows
        keep = sorted(random.Random(self.seed * 1_000_003 + salt).sample(range(len(rows)), n))
        return [rows[i] for i in keep]

    # -- the Task protocol ----------------------------------------------------------------
    def train(self) -> list[Row]:
        return [dict(r) for r in self._train]

    def test(self) -> list[Row]:
        return [dict(r) for r in self._test]

    def verify(self, prompt_row: Row, completion: str) -> float:
        """Accuracy: 1.0/0.0 for math formats, the fraction of tests passed for code."""
        tagged = extract_tagged_answer(completion)
        if self.format == "code":
            program = extract_code(tagged if tagged is not None else completion)
            entry = prompt_row.get("entry_point")
            if entry and not re.search(rf"\bdef\s+{re.escape(entry)}\s*\(", program):
                # HumanEval completions are often just the body: put the prompt before it.
                program = prompt_row["question"] + program
            return code_reward(
                program,
                prompt_row["tests"],
                entry_point=entry,
                timeout=self.code_timeout,
                sandbox=self.sandbox,
            )
        reference = prompt_row["answer"]
        if tagged is None:
            return math_reward(completion, reference, timeout=self.math_timeout)
        pred = extract_answer(tagged, fallback_last_number=False) or _clean_phrase(tagged)
        if not pred:
            return 0.0
        return 1.0 if answers_match(pred, reference, timeout=self.math_timeout) else 0.0

    def extract(self, completion: str) -> str | None:
        """The final answer of a completion as :meth:`verify` reads it, or None: the program
        for code, else the math answer (inside the last ``<answer>`` block if there is one).
        Evaluation votes over it for maj@k."""
        tagged = extract_tagged_answer(completion)
        if self.format == "code":
            return extract_code(tagged if tagged is not None else completion).strip() or None
        if tagged is not None:
            return extract_answer(tagged, fallback_last_number=False) or _clean_phrase(tagged)
        return extract_answer(completion)
