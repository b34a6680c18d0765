"""SFT and pretraining data from a user's file: validate rows and tokenise them with loss masks.

A data file (JSONL, JSON array, Parquet, or a directory saved with ``datasets``'
``save_to_disk``) holds rows of one of three kinds (``data.kind``; ``auto`` picks by the first
row's columns: ``messages``, then ``prompt`` + ``completion``, then ``text``):

==================  ==========================================  ================================
kind                row                                         loss on
==================  ==========================================  ================================
text                ``{"text": str}``                           every token (plain language-
                                                                model pretraining) and the EOS
prompt_completion   ``{"prompt": str, "completion": str}``      the completion and the EOS
messages            ``{"messages": [{role, content}, ...]}``    every assistant message, as the
                                                                tokenizer's chat template renders
                                                                it (plus EOS after a final
                                                                assistant turn unless the
                                                                template already ends in it)
==================  ==========================================  ================================

``text`` rows: when the tokenizer has a BOS token the row is ``[BOS] + text + [EOS]`` and
every text token is predicted; without one (Qwen-style tokenizers, the presets) the first text
token is the context and the loss covers the rest, so a model sees at inference exactly the
token layout it was trained on. ``prompt_completion`` and ``messages`` rows start with the
BOS (once, as context) when the tokenizer adds one (Llama, Mistral, Gemma), as the sampler's
prompts do; a chat template that writes the BOS itself gets no second one.

Every validation error names the file, the row (the line for JSONL) and the field; a file that
is not UTF-8 names the line and column of the first bad byte; a row longer than
``max_length`` tokens is an error, never silently cut.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from signalrl.data.chat import adds_bos, needs_eos, with_bos
from signalrl.data.preference import utf8_lines

KINDS = ("auto", "text", "prompt_completion", "messages")
ROLES = ("system", "user", "assistant", "tool")

__all__ = [
    "KINDS",
    "SFTDataError",
    "SFTExamples",
    "detect_kind",
    "load_sft_data",
    "read_data_file",
    "split_examples",
    "tokenize_rows",
]


class SFTDataError(ValueError):
    """An SFT data file that does not validate; names the file, row and field."""


@dataclass
class SFTExamples:
    """Tokenised rows: `prompt_ids[i]` is context only; `completion_ids[i]` carries the loss,
    weighted per token by `completion_masks[i]` (1.0 = trained, 0.0 = context)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completion_masks: list[list[float]]
    kind: str
    source: str

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def subset(self, idx: Sequence[int]) -> SFTExamples:
        return SFTExamples(
            [self.prompt_ids[i] for i in idx],
            [self.completion_ids[i] for i in idx],
            [self.completion_masks[i] for i in idx],
            self.kind,
            self.source,
        )

    @property
    def loss_tokens(self) -> int:
        return int(sum(sum(m) for m in self.completion_masks))


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def read_data_file(
    path: str | Path, file_format: str = "auto", split: str = "train"
) -> list[tuple[str, Any]]:
    """`(location, row)` pairs of a data file; location is `"file: line N"` (JSONL) or
    `"file: row N"`. `file_format` (`auto`, `jsonl`, `parquet`, `hf`) must agree with the
    path when set."""
    from signalrl.tasks.dataset import read_rows

    p = Path(path).expanduser()
    if not p.exists():
        raise SFTDataError(f"{p}: data file not found")
    if file_format != "auto":
        actual = (
            "hf"
            if p.is_dir()
            else {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}.get(
                p.suffix.lower(), "unknown"
            )
        )
        if actual != file_format:
            raise SFTDataError(
                f"{p}: data.format is {file_format!r} but the path looks like {actual!r} "
                "(.jsonl/.json, .parquet, or a save_to_disk directory)"
            )
    try:
        return read_rows(p, split)
    except UnicodeDecodeError:
        pass  # located below
    except ValueError as e:  # the reader's messages already name the file and line
        if "codec can't decode" not in str(e):
            raise SFTDataError(str(e)) from None
    utf8_lines(p, SFTDataError)  # raises, naming the line and column of the bad byte
    raise SFTDataError(f"{p}: not UTF-8 text; save the file as UTF-8")  # pragma: no cover


def detect_kind(row: Any, where: str) -> str:
    """The kind of a row by its columns: messages, prompt_completion or text."""
    if not isinstance(row, dict):
        raise SFTDataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    have = ", ".join(map(str, row)) or "none"
    raise SFTDataError(
        f"{where}: cannot tell the row kind from its columns ({have}); rows need 'text', "
        "'prompt' and 'completion', or 'messages' (or set data.kind)"
    )


def _string(row: dict[str, Any], name: str, where: str, kind: str) -> str:
    if name not in row or row[name] is None:
        have = ", ".join(map(str, row)) or "none"
        raise SFTDataError(f"{where}: missing field '{name}' ({kind} rows; columns: {have})")
    value = row[name]
    if not isinstance(value, str):
        raise SFTDataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise SFTDataError(f"{where}: field '{name}' is empty")
    return value


def _messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    if "messages" not in row or row["messages"] is None:
        have = ", ".join(map(str, row)) or "none"
        raise SFTDataError(f"{where}: missing field 'messages' (messages rows; columns: {have})")
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise SFTDataError(f"{where}: field 'messages' must be a non-empty list of messages")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise SFTDataError(
                f"{where}: field 'messages': message {j} must be a {{role, content}} mapping"
            )
        if m["role"] not in ROLES:
            raise SFTDataError(
                f"{where}: field 'messages': message {j} has role {m['role']!r}; valid: "
                f"{', '.join(ROLES)}"
            )
        if not isinstance(m["content"], str):
            raise SFTDataError(f"{where}: field 'messages': message {j} content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise SFTDataError(
            f"{where}: field 'messages' has no assistant message, so nothing to train on"
        )
    return out


# --------------------------------------------------------------------------------------
# Segments: (text, trained?) pieces of one row
# --------------------------------------------------------------------------------------


def _chat_segments(
    tokenizer: PreTrainedTokenizerBase, msgs: list[dict[str, str]], where: str
) -> list[tuple[str, bool]]:
    """Context / assistant pieces of a conversation, from incremental chat-template renders."""

    def render(m: list[dict[str, str]], gen: bool) -> str:
        return str(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen))

    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix, full = render(msgs[:i], True), render(msgs[: i + 1], False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise SFTDataError(
                f"{where}: field 'messages': the tokenizer's chat template does not render "
                f"message {i} as a continuation of the messages before it; cannot tell the "
                "assistant tokens apart"
            )
        segments.append((prefix[len(done) :], False))
        segments.append((full[len(prefix) :], True))
        done = full
    whole = render(msgs, False)
    if not whole.startswith(done):
        raise SFTDataError(f"{where}: field 'messages': inconsistent chat template renders")
    segments.append((whole[len(done) :], False))
    if (
        msgs[-1]["role"] == "assistant"
        and tokenizer.eos_token
        and needs_eos(tokenizer, segments[-2][0])
    ):
        segments.append((tokenizer.eos_token, True))
    return [(t, w) for t, w in segments if t]


def _row_segments(
    tokenizer: PreTrainedTokenizerBase, row: Any, kind: str, where: str
) -> list[tuple[str, bool]]:
    if not isinstance(row, dict):
        raise SFTDataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if kind == "text":
        return [(_string(row, "text", where, kind), True)]
    if kind == "prompt_completion":
        return [
            (_string(row, "prompt", where, kind), False),
            (_string(row, "completion", where, kind), True),
        ]
    if not getattr(tokenizer, "chat_template", None):
        raise SFTDataError(
            f"{where}: field 'messages': the tokenizer has no chat template to render messages"
        )
    return _chat_segments(tokenizer, _messages(row, where), where)


def tokenize_rows(
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[tuple[str, Any]],
    kind: str = "auto",
    *,
    max_length: int | None = None,
    source: str = "data",
) -> SFTExamples:
    """Validate and tokenise `(location, row)` pairs of one kind into prompt / completion ids
    with per-token loss masks (see the module docstring for what each kind trains on)."""
    if kind not in KINDS:
        raise SFTDataError(f"data.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not rows:
        raise SFTDataError(f"{source}: no rows")
    if kind == "auto":
        kind = detect_kind(rows[0][1], rows[0][0])
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    adds = adds_bos(tokenizer)
    if eos is None:
        raise SFTDataError(f"{source}: the tokenizer has no eos token to end rows with")
    out = SFTExamples([], [], [], kind, source)
    for where, row in rows:
        ids: list[int] = []
        mask: list[float] = []
        for text, trained in _row_segments(tokenizer, row, kind, where):
            if text == tokenizer.eos_token:
                piece = [eos]
            else:
                piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids.extend(piece)
            mask.extend([1.0 if trained else 0.0] * len(piece))
        if kind == "text":  # [BOS] text EOS, or text EOS with the first token as context
            ids = ([bos] if bos is not None and ids[:1] != [bos] else []) + ids + [eos]
            mask = [1.0] * len(ids)
        else:  # the BOS a BOS-adding tokenizer puts first (once), as context
            front = with_bos(tokenizer, ids, adds)
            mask = [0.0] * (len(front) - len(ids)) + mask
            ids = front
        if kind == "prompt_completion":  # the completion ends with EOS
            ids, mask = ids + [eos], mask + [1.0]
        split = 1 if kind == "text" else (mask.index(1.0) if 1.0 in mask else len(mask))
        if split == 0 or split >= len(ids):
            field = {"text": "text", "prompt_completion": "prompt"}.get(kind, "messages")
            raise SFTDataError(f"{where}: field '{field}' tokenises to nothing to train on")
        if max_length is not None and len(ids) > max_length:
            raise SFTDataError(
                f"{where}: the row is {len(ids)} tokens, over data.max_length={max_length} "
                "(rows are never cut; shorten or split it, or raise max_length)"
            )
        out.prompt_ids.append(ids[:split])
        out.completion_ids.append(ids[split:])
        out.completion_masks.append(mask[split:])
    return out


def load_sft_data(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    kind: str = "auto",
    file_format: str = "auto",
    max_length: int | None = None,
) -> SFTExamples:
    """Read, validate and tokenise a data file (see the module docstring)."""
    return tokenize_rows(
        tokenizer,
        read_data_file(path, file_format),
        kind,
        max_length=max_length,
        source=str(path),
    )


def split_examples(
    data: SFTExamples, fraction: float, seed: int
) -> tuple[SFTExamples, SFTExamples | None]:
    """Hold out `round(fraction * n)` rows (at least 1 when fraction > 0 and n > 1)."""
    n = len(data)
    k = round(fraction * n)
    if fraction > 0 and n > 1:
        k = min(max(k, 1), n - 1)
    if k == 0:
        return data, None
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return data.subset(sorted(order[k:])), data.subset(sorted(order[:k]))
