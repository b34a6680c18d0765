"""Chat rendering and special tokens, shared by every path that turns rows into token ids.

One function renders a task row for a model (`render_row`): the trainers, `signalrl eval` and
`signalrl data make-preferences` all call it, so a chat model is scored on exactly the prompt
it was trained on. A row with `messages` (a chat task, e.g. `template: chat`) is rendered by
the tokenizer's chat template with the generation prompt; other rows keep their `prompt`.

The rest answers, for any Hugging Face tokenizer, the questions a real checkpoint raises:

- `end_of_turn_token`: the special token the chat template writes after an assistant message
  (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, `<end_of_turn>` for Gemma), found by
  rendering a probe conversation;
- `adds_bos` / `with_bos`: whether the tokenizer puts a BOS in front of a text it encodes
  (Llama, Mistral, Gemma do; Qwen does not), and the ids with that BOS added once (never a
  second one when the text, e.g. a chat template's render, already starts with it);
- `assistant_continuation`: the text the template writes for an assistant reply after a
  rendered prompt (the reply and its end of turn), and `needs_eos`: whether a completion
  still needs the EOS (not when it already ends with it: every path appends it by the same
  rule, so an SFT and a DPO chat row end alike and never with two end tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

__all__ = [
    "adds_bos",
    "assistant_continuation",
    "encode_prompt",
    "end_of_turn_token",
    "has_chat_template",
    "needs_eos",
    "render_messages",
    "render_row",
    "render_rows",
    "with_bos",
]

_PROBE = "signalrl probe reply 7f3a"


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_messages(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool,
) -> str:
    """`apply_chat_template(messages, tokenize=False, ...)` as a string."""
    return str(
        tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    )


def render_row(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any]) -> dict[str, Any]:
    """The row as the model sees it: a row with `messages` gets `prompt` = the chat template's
    render of them with the generation prompt (when the tokenizer has a template); any other
    row is returned unchanged. Every trainer, `signalrl eval` and `make-preferences` use it."""
    msgs = row.get("messages")
    if not msgs or not has_chat_template(tokenizer):
        return row
    return {**row, "prompt": render_messages(tokenizer, msgs, add_generation_prompt=True)}


def render_rows(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    return [render_row(tokenizer, r) for r in rows]


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    names = set(tokenizer.all_special_tokens)
    try:
        names.update(tokenizer.get_added_vocab())
    except (AttributeError, NotImplementedError):  # pragma: no cover - slow tokenizers
        pass
    return sorted(names, key=len, reverse=True)  # longest first: `<|im_end|>` before `<`


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The special token the chat template writes right after an assistant message, or None
    (no template, or the reply is not followed by a special token)."""
    if not has_chat_template(tokenizer):
        return None
    msgs = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = render_messages(tokenizer, msgs, add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template that refuses the probe has no known turn end
        return None
    at = text.rfind(_PROBE)
    if at < 0:
        return None
    tail = text[at + len(_PROBE) :].lstrip()
    for name in _special_tokens(tokenizer):
        if name and tail.startswith(name):
            return name
    return None


def needs_eos(tokenizer: PreTrainedTokenizerBase, text: str) -> bool:
    """Whether a completion `text` still needs the EOS appended: not when it already ends
    (trailing whitespace aside) with the EOS, e.g. a chat turn of a template whose end of turn
    is the EOS (instruct checkpoints: `<|im_end|>`, `<|eot_id|>`). A template whose turn end
    is another token (`<|im_end|>` with EOS `<|endoftext|>`) still gets the EOS after it: a
    model whose generation stops at the EOS only must learn to write it."""
    eos = tokenizer.eos_token
    return not (eos and text.rstrip().endswith(eos))


def assistant_continuation(
    tokenizer: PreTrainedTokenizerBase,
    prompt_messages: Sequence[dict[str, Any]],
    reply: str | Sequence[dict[str, Any]],
) -> str | None:
    """The text the chat template writes for the assistant `reply` (a string, or a list of
    assistant messages) after `prompt_messages` rendered with the generation prompt: the reply
    and the template's end of turn (e.g. `"85<|im_end|>\\n"`). None when the generation prompt
    is not a prefix of the full render (the caller then falls back to the plain text)."""
    replies = [{"role": "assistant", "content": reply}] if isinstance(reply, str) else reply
    prompt = render_messages(tokenizer, prompt_messages, add_generation_prompt=True)
    full = render_messages(
        tokenizer, list(prompt_messages) + list(replies), add_generation_prompt=False
    )
    return full[len(prompt) :] if full.startswith(prompt) else None


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer puts its BOS in front of a text it encodes with special tokens
    (Llama, Mistral, Gemma tokenizers; not Qwen's, nor the presets' `char` and `bpe`)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def with_bos(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], bos: bool | None = None
) -> list[int]:
    """`ids` with the BOS in front when the tokenizer adds one (`bos`: `adds_bos(tokenizer)`,
    computed when None) and `ids` do not already start with it."""
    if bos is None:
        bos = adds_bos(tokenizer)
    bos_id = tokenizer.bos_token_id
    if not bos or bos_id is None or (ids and ids[0] == bos_id):
        return list(ids)
    return [bos_id, *ids]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of prompt texts: encoded without special tokens (a chat template writes its
    own), then the BOS added once where the tokenizer adds one (`with_bos`)."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    bos = adds_bos(tokenizer)
    return [with_bos(tokenizer, list(x), bos) if x else [] for x in ids]
