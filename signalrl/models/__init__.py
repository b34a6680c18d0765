"""Models: local Hugging Face checkpoints and tiny from-config presets.

`load_model("tiny")` builds a Qwen2-architecture model from a config in code together with the
character-level tokenizer; `load_model("/path/to/checkpoint")` loads any local
`AutoModelForCausalLM` directory with `from_pretrained`, exactly as a user with a real
checkpoint would. `save_model` writes a directory that plain `transformers` loads back.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from signalrl.models.tokenizer import build_char_tokenizer


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 512


PRESETS: dict[str, Preset] = {
    "tiny": Preset(128, 384, 4, 4, 2),  # ~0.8M parameters
    "small": Preset(256, 768, 8, 4, 2),  # ~6M
    "base": Preset(512, 1536, 8, 8, 4),  # ~25M
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def preset_config(name: str, tokenizer: PreTrainedTokenizerBase) -> Qwen2Config:
    p = PRESETS[name]
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        max_position_embeddings=p.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def is_preset(name_or_path: str) -> bool:
    return name_or_path in PRESETS and not Path(name_or_path).is_dir()


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device = "cpu",
    seed: int = 0,
    attn_implementation: str | None = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return `(model, tokenizer)` for a preset name or a local HF checkpoint directory.

    Presets (`tiny`, `small`, `base`) are freshly initialised with `seed`. A directory must
    hold a `config.json` loadable by `AutoModelForCausalLM` and a tokenizer.
    """
    torch_dtype = resolve_dtype(dtype)
    if is_preset(name_or_path):
        tokenizer = build_char_tokenizer()
        config = preset_config(name_or_path, tokenizer)
        if attn_implementation:
            config._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = None
        model = model.to(device=device, dtype=torch_dtype)
        return model, tokenizer

    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor an "
            "existing local checkpoint directory"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; not a Hugging Face checkpoint directory")
    kwargs = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{path}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    check_tokenizer(model, tokenizer, str(path))
    return model, tokenizer


def check_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Fail early when the tokenizer cannot belong to the model (ids beyond the embedding)."""
    n_embed = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_embed:
        raise ValueError(
            f"{where}: tokenizer has {len(tokenizer)} tokens but the model's embedding has "
            f"{n_embed} rows: wrong tokenizer for this model"
        )


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | os.PathLike[str],
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write an HF-format directory atomically: into a temp dir beside it, then rename.

    A reader never sees a half-written checkpoint; an existing directory is replaced.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        unwrapped = getattr(model, "module", model)
        unwrapped.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
