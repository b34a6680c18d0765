"""Preset tokenizers built with `tokenizers`, wrapped as HF fast tokenizers (`model.tokenizer`).

- `char` (default): every printable ASCII character and newline is one token, plus special
  tokens, with a ChatML template.
- `bpe`: a byte-level BPE (4096 merges and bytes) trained on the built-in corpus, with the
  special tokens, ChatML template and EOS list of a Qwen2 checkpoint.
- `bpe-llama3`: the same BPE with Llama-3's special tokens, chat template and a BOS the
  tokenizer adds.

Everything runs offline; each is saved and loaded like any Hugging Face tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import random
import string
import tempfile
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD = "<|pad|>"
EOS = "<|endoftext|>"
UNK = "<|unk|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD, EOS, UNK, IM_START, IM_END]

# ChatML, the format Qwen2 checkpoints use; `add_generation_prompt` opens an assistant turn.
# With `tools=` (JSON schemas) a system turn lists them in the Hermes / Qwen2.5 form (the
# conversation's own system message, if any, opens that turn); `tool` messages are ChatML turns.
TOOLS_SYSTEM = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}{{ '\\n</tools>\\n\\n' }}"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "{% endif %}"
)
CHAT_TEMPLATE = (
    TOOLS_SYSTEM + "{% for message in messages %}"
    "{% if not (tools and loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}{% endfor %}"
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


# --------------------------------------------------------------------------------------
# Byte-level BPE presets (`model.tokenizer: bpe | bpe-llama3`)
# --------------------------------------------------------------------------------------

#: Bumped whenever the training corpus or the trainer settings change (it keys the cache).
BPE_VERSION = 1
BPE_VOCAB = 4096  # merges + the 256 byte symbols; the special tokens come after

# Llama-3 special tokens
BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
LLAMA_PAD = "<|finetune_right_pad_id|>"

# The Llama-3 chat format: the template writes the BOS itself (as Meta's does), so a rendered
# conversation tokenised without special tokens starts with exactly one `<|begin_of_text|>`.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content']"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

#: The token that ends an assistant turn in each BPE preset's chat template; generation
#: stops at it as well as at the EOS (a list of EOS ids in the generation config).
END_OF_TURN = {"bpe": IM_END, "bpe-llama3": EOT}
TOKENIZER_KINDS = ("char", "bpe", "bpe-llama3")


def _pseudo_words(rng: random.Random, n: int) -> list[str]:
    """`n` Zipf-distributed pseudo-words built from syllables: a stand-in for ordinary text,
    so that the BPE vocabulary holds word pieces and not only arithmetic."""
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w"]
    onsets += ["br", "ch", "cl", "dr", "gr", "pl", "sh", "st", "th", "tr", "wh", "qu"]
    nuclei = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "oo", "ou", "y"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "st", "ck", "ll", "rt"]
    lexicon = []
    for _ in range(6000):
        syl = [rng.choice(onsets) + rng.choice(nuclei) + rng.choice(codas)]
        syl += [rng.choice(onsets[1:]) + rng.choice(nuclei) for _ in range(rng.randrange(3))]
        lexicon.append("".join(syl))
    weights = [1.0 / (i + 1) for i in range(len(lexicon))]
    return rng.choices(lexicon, weights=weights, k=n)


def bpe_training_text() -> list[str]:
    """The deterministic texts the BPE presets are trained on: the arithmetic pretraining
    corpus (`signalrl.data.corpus`), the `arithmetic` and `countdown` tasks' train splits (as
    plain and chat-style questions), the chat roles, and pseudo-word prose."""
    from signalrl.data.corpus import make_arithmetic_corpus
    from signalrl.tasks.arithmetic import ArithmeticTask
    from signalrl.tasks.countdown import CountdownTask

    texts = [d["text"] for d in make_arithmetic_corpus(ArithmeticTask(), 3000, seed=0)]
    for r in ArithmeticTask(n_train=5000).train():
        texts.append(f"{r['prompt']}{r['completion']}\nWhat is {r['expr']}? {r['answer']}")
    texts += [r["prompt"] + r["completion"] for r in CountdownTask().train()[:3000]]
    texts += ["system\nuser\nassistant\n"] * 50
    rng = random.Random(0)
    words = _pseudo_words(rng, 240_000)
    for i in range(0, len(words), 40):
        line = " ".join(words[i : i + 40])
        texts.append(line[:1].upper() + line[1:] + ".")
    return texts


def _train_bpe() -> Tokenizer:
    """Byte-level BPE (digits split one by one, as Qwen2's tokenizer does) trained on
    `bpe_training_text()`; no special tokens (the presets add theirs after the merges)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    backend.train_from_iterator(bpe_training_text(), trainer=trainer)
    return backend


def cache_dir() -> Path:
    """`$SIGNALRL_CACHE`, else `$XDG_CACHE_HOME/signalrl`, else `~/.cache/signalrl`."""
    if os.environ.get("SIGNALRL_CACHE"):
        return Path(os.environ["SIGNALRL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "signalrl"


def _bpe_cache_path() -> Path:
    key = hashlib.sha1(
        f"bpe-v{BPE_VERSION}-{BPE_VOCAB}-tokenizers-{tokenizers.__version__}".encode()
    ).hexdigest()[:12]
    return cache_dir() / "tokenizers" / f"bpe-{key}.json"


def base_bpe(use_cache: bool = True) -> Tokenizer:
    """The trained byte-level BPE (without special tokens). Training is deterministic and
    takes a few seconds; the result is cached on disk (`cache_dir()`) and rebuilt when the
    cache is missing, unreadable or unwritable."""
    path = _bpe_cache_path()
    if use_cache and path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:  # noqa: BLE001 - a corrupt cache file is rebuilt
            pass
    backend = _train_bpe()
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
            os.close(fd)
            backend.save(tmp)
            os.replace(tmp, path)  # atomic: parallel builders write the same bytes
        except OSError:
            pass
    return backend


def build_bpe_tokenizer(kind: str = "bpe", use_cache: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE preset as a HF fast tokenizer.

    - `bpe`: Qwen2-style. EOS and pad `<|endoftext|>`, no BOS, ChatML template ending turns
      with `<|im_end|>`.
    - `bpe-llama3`: Llama-3-style. `<|begin_of_text|>` BOS added by the post-processor
      (`tokenizer(text)` starts with it), EOS `<|end_of_text|>`, pad
      `<|finetune_right_pad_id|>`, a template whose turns end with `<|eot_id|>`.
    """
    backend = base_bpe(use_cache)
    if kind == "bpe":
        specials = [EOS, IM_START, IM_END]
        backend.add_special_tokens(specials)
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            eos_token=EOS,
            pad_token=EOS,
            bos_token=None,
            unk_token=None,
            additional_special_tokens=[IM_START, IM_END],
            model_max_length=4096,
        )
        tok.chat_template = CHAT_TEMPLATE
        return tok
    if kind == "bpe-llama3":
        specials = [BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, EOT, LLAMA_PAD]
        backend.add_special_tokens(specials)
        bos_id = backend.token_to_id(BEGIN_OF_TEXT)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BEGIN_OF_TEXT} $A",
            pair=f"{BEGIN_OF_TEXT} $A {BEGIN_OF_TEXT}:1 $B:1",
            special_tokens=[(BEGIN_OF_TEXT, bos_id)],
        )
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=BEGIN_OF_TEXT,
            eos_token=END_OF_TEXT,
            pad_token=LLAMA_PAD,
            unk_token=None,
            additional_special_tokens=[START_HEADER, END_HEADER, EOT],
            model_max_length=4096,
        )
        tok.chat_template = LLAMA3_CHAT_TEMPLATE
        return tok
    raise ValueError(f"model.tokenizer must be one of {', '.join(TOKENIZER_KINDS)}, got {kind!r}")


def build_tokenizer(kind: str = "char") -> PreTrainedTokenizerFast:
    """The preset tokenizer `kind` (`char`, `bpe` or `bpe-llama3`)."""
    if kind == "char":
        return build_char_tokenizer()
    return build_bpe_tokenizer(kind)
