"""A character-level tokenizer built with `tokenizers`, wrapped as a HF fast tokenizer.

The presets use it so everything runs offline: every printable ASCII character and newline is
one token, plus special tokens. It is saved and loaded like any Hugging Face tokenizer.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD = "<|pad|>"
EOS = "<|endoftext|>"
UNK = "<|unk|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD, EOS, UNK, IM_START, IM_END]

# ChatML, the format Qwen2 checkpoints use; `add_generation_prompt` opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def characters() -> list[str]:
    """The ordinary (non-special) vocabulary: printable ASCII without the other whitespace."""
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    return sorted(set(chars), key=chars.index)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer (special tokens first, ids 0..4)."""
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS + characters():
        vocab.setdefault(tok, len(vocab))
    # BPE with no merges splits every word into characters; Fuse joins them back on decode.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        bos_token=None,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=4096,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
