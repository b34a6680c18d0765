"""Preference data: load, validate and tokenise {prompt, chosen, rejected} (or KTO's
{prompt, completion, label}) rows from JSONL, Parquet or a saved Hugging Face dataset.

Fields are plain strings, or chat message lists (``[{"role": ..., "content": ...}, ...]``).
With messages the prompt is rendered by ``tokenizer.apply_chat_template(...,
add_generation_prompt=True)`` and a chosen / rejected / completion (a message list, or a
string: one assistant message) becomes the assistant continuation text (the chat-rendered
conversation minus the rendered prompt), which ends with the template's end of turn; the EOS
follows only when that is not already the EOS (as in `signalrl.data.sft`). Prompts start with
the BOS (once) where the tokenizer adds one.

JSONL is parsed line by line with :mod:`json` (no type inference across rows, so an error is
reported at the row that has it) and must be UTF-8; Parquet is read with :mod:`pyarrow`.
Every validation error names the file, the row (1-based; for JSONL also the line when blank
lines make the two differ) and the field.

Length (`max_length`, the recipe's `data.max_length`; the trainers default it to the model's
`max_position_embeddings`): a row longer than `max_length` tokens (prompt + completion + EOS;
for a pair, with the longer of chosen and rejected) is truncated as TRL's DPO trainer does,
never refused: the prompt keeps its last tokens (cut from the left, TRL's `keep_end`) and the
completions their first tokens (cut from the right, losing their EOS). The prompt is cut only
as far as needed to leave the completions `max_length - max_length // 2` tokens (all of them
when shorter); the completions are then cut to what the prompt leaves. The number of
truncated rows is `PreferenceData.truncated` (and a warning names the file and the first such
row); a pair whose chosen and rejected are identical once truncated is an error naming the
row. KTO data whose labels are all true or all false is loaded with a warning naming the
file and the counts (KTO needs both kinds).
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from signalrl.data.chat import assistant_continuation, encode_prompt, needs_eos, render_messages

PAIRED_FIELDS = ("prompt", "chosen", "rejected")
KTO_FIELDS = ("prompt", "completion", "label")
ROLES = ("system", "user", "assistant", "tool")


class PreferenceDataError(ValueError):
    """A preference data file that does not validate; names the file, row and field."""


@dataclass
class PreferenceData:
    """Tokenised rows. Paired: `completion_ids` is chosen, `rejected_ids` rejected. KTO:
    `completion_ids` with `labels` (True = desirable) and `rejected_ids` None."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    rejected_ids: list[list[int]] | None = None
    labels: list[bool] | None = None
    prompts: list[str] | None = None
    truncated: int = 0  # rows of the loaded file cut to max_length (a subset keeps 0)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def subset(self, idx: list[int]) -> PreferenceData:
        return PreferenceData(
            [self.prompt_ids[i] for i in idx],
            [self.completion_ids[i] for i in idx],
            None if self.rejected_ids is None else [self.rejected_ids[i] for i in idx],
            None if self.labels is None else [self.labels[i] for i in idx],
            None if self.prompts is None else [self.prompts[i] for i in idx],
        )


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise PreferenceDataError(
        f"{path}: cannot tell the format from the name; set data.format to jsonl, parquet or hf"
    )


def utf8_lines(path: Path, error: type[ValueError] = ValueError) -> list[str]:
    """The lines of a text file decoded as UTF-8 (a leading byte-order mark is dropped); a
    byte that is not UTF-8 is an `error` naming the file, the line and the column."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise error(
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {col}); "
            "save the file as UTF-8"
        ) from None
    return text.splitlines()


def _where(source: str, n: int, line: int | None = None) -> str:
    return f"{source}: row {n}" if line in (None, n) else f"{source}: row {n} (line {line})"


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    """(location, row) of a JSONL file (or of a `.json` file holding one JSON array)."""
    lines = utf8_lines(path, PreferenceDataError)
    text = "\n".join(lines)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PreferenceDataError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, list):
            raise PreferenceDataError(f"{path}: a JSON file must hold an array of rows")
        return [(_where(str(path), n), row) for n, row in enumerate(data, start=1)]
    rows: list[tuple[str, Any]] = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = _where(str(path), len(rows) + 1, line_no)
        try:
            rows.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            raise PreferenceDataError(f"{where}: not valid JSON: {e}") from None
    return rows


def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - any arrow error means "not a parquet file"
        raise PreferenceDataError(f"{path}: could not load as parquet: {e}") from None
    return [(_where(str(path), n), r) for n, r in enumerate(table.to_pylist(), start=1)]


def _read_hf(path: Path) -> list[tuple[str, Any]]:
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - report any loader failure with the path
        raise PreferenceDataError(f"{path}: could not load as hf: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise PreferenceDataError(
                f"{path}: a DatasetDict needs a 'train' split; has {', '.join(ds)}"
            )
        ds = ds["train"]
    return [(_where(str(path), n), dict(r)) for n, r in enumerate(ds, start=1)]


def read_located_rows(path: str | Path, fmt: str = "auto") -> list[tuple[str, Any]]:
    """`(location, row)` pairs of a JSONL / Parquet file or a `save_to_disk` directory; the
    location is `"file: row N"` (JSONL: with `(line M)` when blank lines shift it)."""
    p = Path(path)
    if not p.exists():
        raise PreferenceDataError(f"{p}: preference data file not found")
    fmt = _detect_format(p, fmt)
    try:
        if fmt == "hf":
            return _read_hf(p)
        if fmt == "parquet":
            return _read_parquet(p)
        return _read_jsonl(p)
    except OSError as e:
        raise PreferenceDataError(f"{p}: cannot read: {e}") from None


def load_rows(path: str | Path, fmt: str = "auto") -> list[dict[str, Any]]:
    """Rows of a JSONL / Parquet file or a `save_to_disk` dataset directory, as dicts."""
    rows = read_located_rows(path, fmt)
    for where, row in rows:
        if not isinstance(row, dict):
            raise PreferenceDataError(f"{where}: a row must be a JSON object")
    return [row for _, row in rows]


def _check_messages(value: list[Any], where: str) -> None:
    if not value:
        raise PreferenceDataError(f"{where}: empty message list")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PreferenceDataError(f"{where}: message {j} must be a {{role, content}} mapping")
        if m["role"] not in ROLES:
            raise PreferenceDataError(
                f"{where}: message {j} has role {m['role']!r}; valid: {', '.join(ROLES)}"
            )
        if not isinstance(m["content"], str):
            raise PreferenceDataError(f"{where}: message {j} content must be a string")


def _field(row: dict[str, Any], name: str, where: str) -> str | list[dict[str, Any]]:
    if name not in row or row[name] is None:
        raise PreferenceDataError(f"{where}: missing field '{name}'")
    value = row[name]
    if isinstance(value, str):
        if not value.strip():
            raise PreferenceDataError(f"{where}: field '{name}' is empty")
        return value
    if isinstance(value, list):
        _check_messages(value, f"{where}: field '{name}'")
        return value
    raise PreferenceDataError(
        f"{where}: field '{name}' must be a string or a list of chat messages, got "
        f"{type(value).__name__}"
    )


def _render(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | list[dict[str, Any]],
    completion: str | list[dict[str, Any]],
    where: str,
    name: str,
) -> tuple[str, str]:
    """Prompt text and continuation text for one (prompt, completion) pair."""
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise PreferenceDataError(
                f"{where}: field '{name}' is a message list but 'prompt' is a string"
            )
        return prompt, completion
    prompt_text = render_messages(tokenizer, prompt, add_generation_prompt=True)
    if not isinstance(completion, str) and any(m["role"] != "assistant" for m in completion):
        raise PreferenceDataError(f"{where}: field '{name}': every message must be 'assistant'")
    # the reply as the template writes it, with its end of turn (a string reply is one
    # assistant message), so it ends as the model's own turns end when it samples
    text = assistant_continuation(tokenizer, prompt, completion)
    if text is None:  # a template whose generation prompt is not a prefix: the plain contents
        text = (
            completion if isinstance(completion, str) else "".join(m["content"] for m in completion)
        )
    if not text.strip():
        raise PreferenceDataError(f"{where}: field '{name}' renders to empty text")
    return prompt_text, text


def parse_rows(
    rows: Sequence[Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    kind: str,
    source: str,
    where: Sequence[str] | None = None,
) -> tuple[list[str], list[str], list[str] | None, list[bool] | None]:
    """Validate rows and render them to text: (prompts, completions, rejected, labels).
    `where` (one location per row, from `read_located_rows`) names the rows in errors;
    without it they are `source: row N`."""
    fields = KTO_FIELDS if kind == "kto" else PAIRED_FIELDS
    if not rows:
        raise PreferenceDataError(f"{source}: no rows")
    prompts, completions, rejected, labels = [], [], [], []
    for n, row in enumerate(rows, start=1):
        at = where[n - 1] if where is not None else _where(source, n)
        if not isinstance(row, dict):
            raise PreferenceDataError(
                f"{at}: a row must be a JSON object, got {type(row).__name__}"
            )
        missing = [f for f in fields if f not in row]
        if missing:
            raise PreferenceDataError(
                f"{at}: missing field '{missing[0]}' (rows need {', '.join(fields)}; "
                f"has {', '.join(sorted(row)) or 'nothing'})"
            )
        prompt = _field(row, "prompt", at)
        if kind == "kto":
            comp = _field(row, "completion", at)
            label = row["label"]
            if not isinstance(label, bool):
                raise PreferenceDataError(
                    f"{at}: field 'label' must be true or false, got {label!r}"
                )
            p, c = _render(tokenizer, prompt, comp, at, "completion")
            prompts.append(p)
            completions.append(c)
            labels.append(label)
        else:
            chosen = _field(row, "chosen", at)
            rej = _field(row, "rejected", at)
            p, c = _render(tokenizer, prompt, chosen, at, "chosen")
            _, r = _render(tokenizer, prompt, rej, at, "rejected")
            if c == r:
                raise PreferenceDataError(f"{at}: field 'rejected' is identical to 'chosen'")
            prompts.append(p)
            completions.append(c)
            rejected.append(r)
    if kind == "kto":
        _check_labels(labels, source)
        return prompts, completions, None, labels
    return prompts, completions, rejected, None


def _check_labels(labels: list[bool], source: str) -> None:
    """KTO learns from desirable AND undesirable rows: one kind only is a warning."""
    good = sum(labels)
    bad = len(labels) - good
    if good and bad:
        return
    which = "true (desirable)" if good else "false (undesirable)"
    missing = "undesirable" if good else "desirable"
    warnings.warn(
        f"{source}: every KTO label is {which}: {good} desirable and {bad} undesirable rows. "
        f"KTO needs both kinds; with no {missing} rows that half of the loss never trains",
        UserWarning,
        stacklevel=3,
    )


def truncate_row(
    prompt: list[int], completions: list[list[int]], max_length: int
) -> tuple[list[int], list[list[int]], bool]:
    """Fit `prompt + completion` into `max_length` tokens for every completion (TRL's DPO
    rule, see the module docstring): the prompt keeps its last tokens, the completions their
    first ones. Returns (prompt, completions, whether anything was cut)."""
    longest = max(len(c) for c in completions)
    if len(prompt) + longest <= max_length:
        return prompt, completions, False
    keep_completion = min(longest, max_length - max_length // 2)
    keep_prompt = min(len(prompt), max_length - keep_completion)
    budget = max_length - keep_prompt
    return prompt[len(prompt) - keep_prompt :], [c[:budget] for c in completions], True


def _ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def warn_truncated(source: str, count: int, total: int, first: str, max_length: int) -> None:
    if count:
        warnings.warn(
            f"{source}: {count} of {total} rows are longer than data.max_length={max_length} "
            f"tokens and were truncated (the prompt from the left, the completions from the "
            f"right), the first at {first}; raise data.max_length to keep them whole",
            UserWarning,
            stacklevel=3,
        )


def load_preference_data(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    kind: str = "paired",
    fmt: str = "auto",
    max_length: int | None = None,
) -> PreferenceData:
    """Load, validate and tokenise (completions end with EOS, prompts have none); with
    `max_length`, rows longer than that are truncated (see the module docstring) and counted
    in `PreferenceData.truncated`."""
    source = str(path)
    located = read_located_rows(path, fmt)
    where = [w for w, _ in located]
    prompts, comps, rejected, labels = parse_rows(
        [r for _, r in located], tokenizer, kind=kind, source=source, where=where
    )
    eos = tokenizer.eos_token_id
    if eos is None:
        raise PreferenceDataError(f"{source}: the tokenizer has no eos token to end rows with")
    p_ids = encode_prompt(tokenizer, prompts)  # the BOS once, where the tokenizer adds one
    cols = [comps] if rejected is None else [comps, rejected]
    # EOS after a completion unless it already ends with it (a chat reply whose turn end is
    # the EOS: never `<|im_end|>` `\n` `<|im_end|>`), the rule of the SFT path
    c_cols = [
        [
            c + ([eos] if needs_eos(tokenizer, t) else [])
            for c, t in zip(_ids(tokenizer, col), col, strict=True)
        ]
        for col in cols
    ]
    truncated, first = 0, ""
    for i, p in enumerate(p_ids):
        if not p:
            raise PreferenceDataError(f"{where[i]}: field 'prompt' tokenises to nothing")
        if max_length is None:
            continue
        p_ids[i], cut, changed = truncate_row(p, [col[i] for col in c_cols], max_length)
        if not changed:
            continue
        truncated, first = truncated + 1, first or where[i]
        for col, c in zip(c_cols, cut, strict=True):
            col[i] = c
        if len(cut) == 2 and cut[0] == cut[1]:
            raise PreferenceDataError(
                f"{where[i]}: 'chosen' and 'rejected' are identical once truncated to "
                f"data.max_length={max_length} tokens; raise data.max_length"
            )
    warn_truncated(source, truncated, len(p_ids), first, max_length or 0)
    r_ids = c_cols[1] if rejected is not None else None
    return PreferenceData(p_ids, c_cols[0], r_ids, labels, prompts, truncated)


def heldout_indices(n: int, fraction: float, seed: int, keys: list[str] | None = None) -> list[int]:
    """Sorted indices of the held-out rows: `round(fraction * n)` rows (at least 1 when
    fraction > 0 and n > 1, never all of them). With `keys` (the rows' prompts), whole groups
    of rows that share a key are held out together, taken in a seeded random order until the
    count is reached, so no held-out prompt is also a training prompt (pairs of one prompt
    differ by a digit: a row-level split would measure memorisation of the prompt)."""
    k = round(fraction * n)
    if fraction > 0 and n > 1:
        k = min(max(k, 1), n - 1)
    if k == 0:
        return []
    rng = random.Random(seed)
    if keys is None:
        order = list(range(n))
        rng.shuffle(order)
        return sorted(order[:k])
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    names = list(groups)
    rng.shuffle(names)
    held: list[int] = []
    for name in names:
        if len(held) >= k or len(held) + len(groups[name]) >= n:
            break
        held.extend(groups[name])
    return sorted(held)


def split_data(
    data: PreferenceData, fraction: float, seed: int
) -> tuple[PreferenceData, PreferenceData | None]:
    """Hold out about `fraction` of the rows, whole prompts at a time (`heldout_indices`)."""
    n = len(data)
    test = heldout_indices(n, fraction, seed, data.prompts)
    if not test:
        return data, None
    held = set(test)
    return data.subset([i for i in range(n) if i not in held]), data.subset(test)
