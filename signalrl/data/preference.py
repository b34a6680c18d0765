"""Preference data: load, validate and tokenise {prompt, chosen, rejected} (or KTO's
{prompt, completion, label}) rows from JSONL, Parquet or a saved Hugging Face dataset.

Fields are plain strings, or chat message lists (``[{"role": ..., "content": ...}, ...]``).
With messages the prompt is rendered by ``tokenizer.apply_chat_template(...,
add_generation_prompt=True)`` and a chosen / rejected / completion message list becomes the
assistant continuation text (the chat-rendered conversation minus the rendered prompt).

Every validation error names the file, the row (1-based: the line of a JSONL file without
blank lines) and the field.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from signalrl.data.collate import tokenize_sft

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


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PreferenceDataError(f"{path}: line {n}: not valid JSON: {e}") from None
        if not isinstance(row, dict):
            raise PreferenceDataError(f"{path}: line {n}: a row must be a JSON object")
        rows.append(row)
    return rows


def load_rows(path: str | Path, fmt: str = "auto") -> list[dict[str, Any]]:
    """Rows of a JSONL / Parquet file or a `save_to_disk` dataset directory, as dicts."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise PreferenceDataError(f"{p}: preference data file not found")
    fmt = _detect_format(p, fmt)
    datasets.disable_progress_bars()
    try:
        if fmt == "hf":
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise PreferenceDataError(
                        f"{p}: a DatasetDict needs a 'train' split; has {', '.join(ds)}"
                    )
                ds = ds["train"]
        else:
            builder = "json" if fmt == "jsonl" else "parquet"
            ds = datasets.load_dataset(builder, data_files=str(p), split="train")
    except PreferenceDataError:
        raise
    except Exception as e:  # arrow could not unify the types of a column, say
        if fmt != "jsonl":
            raise PreferenceDataError(f"{p}: could not load as {fmt}: {e}") from None
        return _read_jsonl(p)  # plain JSON parsing: the row checks below then name the row
    return [dict(r) for r in ds]


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
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if isinstance(completion, str):
        return prompt_text, completion
    if any(m["role"] != "assistant" for m in completion):
        raise PreferenceDataError(f"{where}: field '{name}': every message must be 'assistant'")
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if full.startswith(prompt_text):
        text = full[len(prompt_text) :]
    else:  # a template whose generation prompt is not a prefix: use the plain contents
        text = "".join(m["content"] for m in completion)
    if not text.strip():
        raise PreferenceDataError(f"{where}: field '{name}' renders to empty text")
    return prompt_text, text


def parse_rows(
    rows: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    kind: str,
    source: str,
) -> tuple[list[str], list[str], list[str] | None, list[bool] | None]:
    """Validate rows and render them to text: (prompts, completions, rejected, labels)."""
    fields = KTO_FIELDS if kind == "kto" else PAIRED_FIELDS
    if not rows:
        raise PreferenceDataError(f"{source}: no rows")
    prompts, completions, rejected, labels = [], [], [], []
    for n, row in enumerate(rows, start=1):
        where = f"{source}: row {n}"
        missing = [f for f in fields if f not in row]
        if missing:
            raise PreferenceDataError(
                f"{where}: missing field '{missing[0]}' (rows need {', '.join(fields)}; "
                f"has {', '.join(sorted(row)) or 'nothing'})"
            )
        prompt = _field(row, "prompt", where)
        if kind == "kto":
            comp = _field(row, "completion", where)
            label = row["label"]
            if not isinstance(label, bool):
                raise PreferenceDataError(
                    f"{where}: field 'label' must be true or false, got {label!r}"
                )
            p, c = _render(tokenizer, prompt, comp, where, "completion")
            prompts.append(p)
            completions.append(c)
            labels.append(label)
        else:
            chosen = _field(row, "chosen", where)
            rej = _field(row, "rejected", where)
            p, c = _render(tokenizer, prompt, chosen, where, "chosen")
            _, r = _render(tokenizer, prompt, rej, where, "rejected")
            if c == r:
                raise PreferenceDataError(f"{where}: field 'rejected' is identical to 'chosen'")
            prompts.append(p)
            completions.append(c)
            rejected.append(r)
    if kind == "kto":
        return prompts, completions, None, labels
    return prompts, completions, rejected, None


def load_preference_data(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    kind: str = "paired",
    fmt: str = "auto",
) -> PreferenceData:
    """Load, validate and tokenise (completions end with EOS, prompts have none)."""
    source = str(path)
    prompts, comps, rejected, labels = parse_rows(
        load_rows(path, fmt), tokenizer, kind=kind, source=source
    )
    p_ids, c_ids = tokenize_sft(tokenizer, prompts, comps, source=source)
    r_ids = None
    if rejected is not None:
        _, r_ids = tokenize_sft(tokenizer, prompts, rejected, source=source)
    return PreferenceData(p_ids, c_ids, r_ids, labels, prompts)


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
