"""LoRA adapters on the policy (the recipe's `lora:` section), with peft.

- `lora_target_modules(model, requested)`: the module names to adapt; by default peft's own
  per-architecture mapping (`q_proj`, `v_proj` for Qwen2/Llama, `c_attn` for GPT-2). A name
  the model does not have is a ValueError naming `lora.target_modules` and the linear
  modules the model has, raised before anything trains.
- `apply_lora(model, cfg)`: the model wrapped as a trainable `PeftModel` (only the adapter
  trains; peft keeps adapter weights in float32 on a half-precision base).
- `AdapterDisabled(policy)`: the frozen base of a LoRA policy used as a reference model, with
  no second copy of the weights: its `forward` (and `signalrl.models.logprobs`, through
  `logprob_context`) runs the policy in eval mode, without gradients, with the adapter
  disabled. Its `parameters()` are empty: the weights are the policy's.
- `load_adapter(base, path)`: a step checkpoint or `final/` of a LoRA run (an
  `adapter_config.json` directory) on its base model, trainable.
- `merged_copy(model)`: a plain HF model with the adapter merged (for `final/merged/`).
- `enable_gradient_checkpointing(model)`: HF's, non-reentrant (the other memory knob of
  `TrainerBase.load_policy`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"


class LoraSettings(Protocol):
    """What `apply_lora` reads (the recipe's `lora:` section, `signalrl.config.LoraConfig`)."""

    r: int
    alpha: int
    dropout: float
    target_modules: list[str] | None


def _default_mapping() -> dict[str, Any]:
    try:  # the public re-export of recent peft versions
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:  # older layouts keep it in peft.utils.constants / other.py
        from peft.utils.constants import (  # type: ignore[no-redef]
            TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping,
        )
    return dict(mapping)


def _is_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2's c_attn, c_proj, c_fc) is a linear layer with a transposed
    # weight; peft adapts both
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct leaf names of the model's linear layers (what `target_modules` can name)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _is_linear(m)})


def lora_target_modules(model: nn.Module, requested: list[str] | None) -> list[str] | str:
    """The module names to adapt: `requested` (each checked against the model's module names)
    or, when None, peft's default for `model.config.model_type` (a list, or for a few
    architectures a regular expression)."""
    have = linear_module_names(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if requested is None:
        default = _default_mapping().get(str(model_type))
        if default is None:
            raise ValueError(
                f"lora.target_modules: peft has no default for architecture {model_type!r}; "
                f"name the modules to adapt, among the model's linear modules: {', '.join(have)}"
            )
        return default if isinstance(default, str) else list(default)
    if not requested:
        raise ValueError(
            "lora.target_modules is empty; leave it out for peft's default or name modules "
            f"among the model's linear modules: {', '.join(have)}"
        )
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}
    missing = [t for t in requested if t not in names]
    if missing:
        raise ValueError(
            f"lora.target_modules: {', '.join(map(repr, missing))} not in the model "
            f"({model_type}); its linear modules are: {', '.join(have)}"
        )
    return list(requested)


def apply_lora(model: nn.Module, cfg: LoraSettings) -> Any:
    """`model` wrapped with a trainable LoRA adapter as `cfg` says (a peft `PeftModel`)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, cfg.target_modules)
    conv1d = isinstance(targets, list) and any(
        type(m).__name__ == "Conv1D" and n.rsplit(".", 1)[-1] in targets
        for n, m in model.named_modules()
    )
    peft_cfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        fan_in_fan_out=conv1d,  # Conv1D stores its weight transposed
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def enable_gradient_checkpointing(model: Any) -> None:
    """HF gradient (activation) checkpointing with `use_reentrant=False`, which needs no
    input that requires grad (a frozen LoRA base works as is)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"train.gradient_checkpointing: {type(model).__name__} does not support it"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # its name in recent transformers
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_peft(model: Any) -> bool:
    """Whether `model` is a peft model with adapters (it can disable them)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is a saved peft adapter (a LoRA run's checkpoint or `final/`)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter(base: nn.Module, path: str | Path, trainable: bool = True) -> Any:
    """The adapter saved in `path` on `base` (a peft `PeftModel`)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(path), is_trainable=trainable)


def merged_copy(model: Any) -> Any:
    """A plain HF model: a copy of the peft `model` with its adapter merged into the weights
    (the policy itself is left as it is)."""
    return copy.deepcopy(model).merge_and_unload()


class AdapterDisabled(nn.Module):
    """The base of a LoRA `policy` as a frozen reference model, sharing its weights.

    Usable wherever a reference model is called (`ref(input_ids=...)`, `completion_logps(ref,
    ...)`, `shared_prefix_logps(ref, ...)`): `config`, `get_base_model()` and the forward
    signature are the policy's. The policy is not a submodule, so `parameters()` and
    `state_dict()` are empty (no second copy is counted or saved)."""

    def __init__(self, policy: Any) -> None:
        super().__init__()
        if not is_peft(policy):
            raise TypeError(f"AdapterDisabled needs a peft model, got {type(policy).__name__}")
        object.__setattr__(self, "policy", policy)  # not registered: no shared parameters
        self.eval()

    @property
    def config(self) -> Any:
        return self.policy.config

    def get_base_model(self) -> nn.Module:
        return self.policy.get_base_model()

    @contextlib.contextmanager
    def logprob_context(self) -> Iterator[None]:
        """Inside: the policy computes the base model's function (eval mode, adapter
        disabled, no gradients); its training mode is restored on exit."""
        policy = self.policy
        was_training = policy.training
        policy.eval()
        try:
            with torch.no_grad(), policy.disable_adapter():
                yield
        finally:
            policy.train(was_training)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.logprob_context():
            return self.policy(*args, **kwargs)


def logprob_context(model: Any) -> contextlib.AbstractContextManager[Any]:
    """The context a model's log-probs are computed in (`AdapterDisabled`: the adapter
    disabled; any other model: none)."""
    ctx = getattr(model, "logprob_context", None)
    return ctx() if callable(ctx) else contextlib.nullcontext()
