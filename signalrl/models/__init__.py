"""Models: local Hugging Face checkpoints and tiny from-config presets.

`load_model("tiny")` builds a Qwen2-architecture model from a config in code together with the
character-level tokenizer; `load_model("/path/to/checkpoint")` loads any local
`AutoModelForCausalLM` directory with `from_pretrained`, exactly as a user with a real
checkpoint would. `save_model` writes a directory that plain `transformers` loads back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from signalrl.logging.run import user_mode
from signalrl.models.tokenizer import build_tokenizer


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


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def resolve_device(device: str | torch.device) -> str:
    """The torch device string for `model.device`: `auto` is `cuda` when a CUDA device is
    available, else `cpu`; `cpu`, `cuda`, `cuda:N` and `mps` are checked against this machine.
    A device the machine does not have, or a string that is not a device, is a ValueError
    naming `model.device`."""
    text = str(device).strip()
    if not _DEVICE.match(text):
        raise ValueError(
            f"model.device {text!r} is not a device; use auto, cpu, cuda, cuda:N or mps"
        )
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"model.device {text!r} but this machine has no CUDA device; use cpu or auto"
            )
        index = int(text.split(":", 1)[1]) if ":" in text else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(
                f"model.device {text!r} but this machine has {count} CUDA device"
                f"{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1}); use one of them or auto"
            )
    if text == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ValueError("model.device 'mps' but this machine has no MPS device; use cpu or auto")
    return text


ARCHITECTURES = ("qwen2", "qwen3", "llama", "mistral", "gemma", "gpt2")


def _architecture_config(architecture: str, p: Preset, common: dict[str, Any]) -> PretrainedConfig:
    """The config of `architecture` at preset size `p` (`common`: the token ids and vocab)."""
    from transformers import GemmaConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen3Config

    if architecture == "gpt2":
        return GPT2Config(
            n_embd=p.hidden_size,
            n_inner=p.intermediate_size,
            n_layer=p.num_hidden_layers,
            n_head=p.num_attention_heads,
            n_positions=p.max_position_embeddings,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    classes = {
        "qwen3": Qwen3Config,
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "gemma": GemmaConfig,
    }
    if architecture not in classes:
        raise ValueError(
            f"model.architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}"
        )
    extra: dict[str, Any] = {"sliding_window": None} if architecture == "mistral" else {}
    return classes[architecture](
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        head_dim=p.hidden_size // p.num_attention_heads,
        max_position_embeddings=p.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **extra,
        **common,
    )


def preset_config(
    name: str | Preset, tokenizer: PreTrainedTokenizerBase, architecture: str = "qwen2"
) -> PretrainedConfig:
    """The config of preset `name` (or a `Preset` size) for `architecture` (`ARCHITECTURES`):
    the vocabulary is the tokenizer's, embeddings are tied, dropout is off."""
    p = PRESETS[name] if isinstance(name, str) else name
    if architecture == "qwen2":
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
            bos_token_id=tokenizer.bos_token_id,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    common = {
        "vocab_size": len(tokenizer),
        "tie_word_embeddings": True,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    return _architecture_config(architecture, p, common)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> int | list[int] | None:
    """The generation config's EOS: the tokenizer's EOS, plus the token that ends an
    assistant turn in its chat template when that is another token (`<|im_end|>`,
    `<|eot_id|>`), so sampling stops at the end of a chat turn."""
    from signalrl.data.chat import end_of_turn_token

    eos = tokenizer.eos_token_id
    eot = end_of_turn_token(tokenizer)
    eot_id = tokenizer.convert_tokens_to_ids(eot) if eot else None
    if eot_id is None or eot_id == eos:
        return eos
    return [eos, eot_id] if eos is not None else [eot_id]


def build_preset_model(
    name: str | Preset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    architecture: str = "qwen2",
    seed: int = 0,
    attn_implementation: str | None = "sdpa",
    eos_token_id: int | list[int] | None = None,
) -> PreTrainedModel:
    """A freshly initialised (`seed`) model of preset `name` for `architecture`, with the
    tokenizer's pad and BOS ids and `eos_token_id` (default: `stop_token_ids(tokenizer)`) in
    its generation config."""
    config = preset_config(name, tokenizer, architecture)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if architecture == "qwen2":
            model = Qwen2ForCausalLM(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = (
        eos_token_id if eos_token_id is not None else stop_token_ids(tokenizer)
    )
    return model


def is_preset(name_or_path: str) -> bool:
    return name_or_path in PRESETS and not Path(name_or_path).is_dir()


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device = "cpu",
    seed: int = 0,
    attn_implementation: str | None = "sdpa",
    architecture: str = "qwen2",
    tokenizer: str = "char",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return `(model, tokenizer)` for a preset name or a local HF checkpoint directory.

    Presets (`tiny`, `small`, `base`) are freshly initialised with `seed`, built as
    `architecture` (`ARCHITECTURES`) with the preset `tokenizer` (`char`, `bpe`,
    `bpe-llama3`; see `signalrl.models.tokenizer`). A directory must hold a `config.json`
    loadable by `AutoModelForCausalLM` and a tokenizer; `architecture` and `tokenizer` do not
    apply to it.
    """
    torch_dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    if is_preset(name_or_path):
        tok = build_tokenizer(tokenizer)
        model = build_preset_model(
            name_or_path,
            tok,
            architecture=architecture,
            seed=seed,
            attn_implementation=attn_implementation,
            # the char tokenizer keeps its single EOS (its models' numbers depend on it)
            eos_token_id=tok.eos_token_id if tokenizer == "char" else None,
        )
        model = model.to(device=device, dtype=torch_dtype)
        return model, tok

    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor an "
            "existing local checkpoint directory"
        )
    if not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
        return _load_adapter_dir(path, torch_dtype, device, attn_implementation)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; not a Hugging Face checkpoint directory")
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = from_pretrained_checked(AutoModelForCausalLM, path, **kwargs).to(device)
    tok = load_tokenizer_checked(path)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"{path}: tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    check_tokenizer(model, tok, str(path))
    return model, tok


def _load_adapter_dir(
    path: Path, dtype: torch.dtype | None, device: torch.device, attn: str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A LoRA run's `final/` (or step checkpoint) holding only the adapter: its base model
    (`base_model_name_or_path` in `adapter_config.json`, a local checkpoint) with the adapter
    merged in, and the adapter directory's tokenizer."""
    from peft import PeftModel

    cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    base = cfg.get("base_model_name_or_path") or ""
    if not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: a LoRA adapter whose base model {base!r} is not a local checkpoint "
            "directory (a preset base is rebuilt only by its run); train with lora.merge: true "
            "and load final/merged, or start LoRA from a checkpoint directory"
        )
    model, tok = load_model(base, dtype=dtype, device=device, attn_implementation=attn)
    model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    if (path / "tokenizer_config.json").is_file():
        tok = load_tokenizer_checked(path)
        if tok.pad_token_id is None and tok.eos_token_id is not None:
            tok.pad_token = tok.eos_token
    check_tokenizer(model, tok, str(path))
    return model, tok


def _corrupt_file(path: Path) -> tuple[Path, str] | None:
    """The first file of checkpoint `path` that cannot be read, with the reason: config.json
    that is not JSON, or a `*.safetensors` file whose header or size is wrong (truncated)."""
    config = path / "config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return config, f"not valid JSON ({e})"
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):  # checks the header and the size
                pass
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            return f, str(e)
    return None


def from_pretrained_checked(cls: Any, path: Path, **kwargs: Any) -> Any:
    """`cls.from_pretrained(path, **kwargs)`; a failure is a CheckpointError naming the
    corrupt file (a truncated `model.safetensors`, say) when one can be found."""
    try:
        return cls.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - every loader failure is reported with the file
        bad = _corrupt_file(path)
        if bad is not None:
            raise CheckpointError(
                f"{bad[0]}: corrupt or truncated checkpoint file ({bad[1]}); save or copy "
                "the checkpoint again"
            ) from e
        raise CheckpointError(f"{path}: could not load the model: {type(e).__name__}: {e}") from e


def load_tokenizer_checked(path: Path) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(path)`; a failure is a CheckpointError naming `path`.

    transformers 5 builds some families' tokenizers from the model type, not from the saved
    `tokenizer.json` (a `qwen2` config always gets `Qwen2Tokenizer`, with its own normaliser
    and pre-tokeniser): when the result splits text differently from the file, the file's
    pipeline is loaded as it is (`TokenizersBackend`), so a checkpoint reads its prompts as
    it was trained on them (the character preset lost every space and newline)."""
    try:
        tok = AutoTokenizer.from_pretrained(path)
        if not _matches_tokenizer_json(tok, path):
            from transformers import TokenizersBackend

            tok = TokenizersBackend.from_pretrained(path)
        return tok
    except Exception as e:  # noqa: BLE001 - a broken tokenizer file, a missing vocabulary
        raise CheckpointError(
            f"{path}: could not load the tokenizer (tokenizer.json / tokenizer_config.json): "
            f"{type(e).__name__}: {e}"
        ) from e


def _matches_tokenizer_json(tok: PreTrainedTokenizerBase, path: Path) -> bool:
    """Whether `tok` has the normaliser, pre-tokeniser and model type of `path/tokenizer.json`
    (True when there is no such file or no fast backend to compare)."""
    file = path / "tokenizer.json"
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or not file.is_file():
        return True
    saved, loaded = json.loads(file.read_text(encoding="utf-8")), json.loads(backend.to_str())
    keys = ("normalizer", "pre_tokenizer")
    same = all(saved.get(k) == loaded.get(k) for k in keys)
    return same and (saved.get("model") or {}).get("type") == (loaded.get("model") or {}).get(
        "type"
    )


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
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write an HF-format directory atomically: into a temp dir beside it, then rename.

    A reader never sees a half-written checkpoint; an existing directory is replaced.
    `state_dict` (e.g. an FSDP2 model's gathered full state) replaces the model's own.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    user_mode(tmp)  # mkdtemp makes it 0700; the final directory follows the user's umask
    try:
        unwrapped = getattr(model, "module", model)
        if state_dict is not None:
            unwrapped.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        else:
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
