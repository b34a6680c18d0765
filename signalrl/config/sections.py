"""The sections every recipe has: model, task, train, sampling, eval, logging, checkpoint,
data. Standard library and pydantic only (validating a recipe imports no torch)."""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str = "tiny"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = Field(0, description="initialisation seed for presets")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
        description="auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps; checked "
        "against the machine when the model is loaded",
    )
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="eager is faster than sdpa for very small models on CPU"
    )
    architecture: Literal["qwen2", "qwen3", "llama", "mistral", "gemma", "gpt2"] = Field(
        "qwen2", description="presets only: the Hugging Face architecture built from config"
    )
    tokenizer: Literal["char", "bpe", "bpe-llama3"] = Field(
        "char",
        description="presets only: char (character level), bpe (byte-level BPE trained on "
        "the built-in corpus, ChatML template) or bpe-llama3 (the same BPE, Llama-3 template, "
        "a BOS token)",
    )


class TaskConfig(BaseModel):
    """`name` picks a built-in task; every other key is passed to the task's constructor."""

    model_config = ConfigDict(extra="allow")
    name: str = "arithmetic"

    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainConfig(Section):
    steps: int = Field(100, ge=1, description="optimizer steps")
    max_forward_tokens: int | None = Field(
        None,
        ge=1,
        description="also stop (then the final evaluation and final/) after the step at which "
        "student/forward_tokens reaches this: a budget in tokens instead of steps",
    )
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)
    batch_size: int = Field(32, ge=1, description="SFT: sequences per step; RL: prompts per step")
    micro_batch_size: int | None = Field(None, ge=1, description="rows per forward/backward")
    precision: Literal["fp32", "bf16"] = "fp32"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")
    parallel: Literal["auto", "none", "ddp", "fsdp2"] = Field(
        "auto",
        description="under torchrun: ddp (replicated model, gradients all-reduced) or fsdp2 "
        "(fully_shard per decoder layer and the root); auto: none for one rank, ddp otherwise",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward (HF's, use_reentrant=False)"
    )
    padding_free: bool = Field(
        True,
        description="SFT, preference and distillation forwards: pack a batch's sequences into "
        "fewer rows (position ids restarting per sequence) where that saves padding; off where "
        "the model fails the packed-vs-separate check (signalrl.models.packing)",
    )


class SamplingConfig(Section):
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    stop_strings: list[str] = Field(default_factory=list)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="rollout generation: auto (as training: train.precision), fp32, or bf16 "
        "(bf16 autocast, as a bf16 inference engine samples for an fp32 trainer)",
    )
    policy_lag: int = Field(
        0,
        ge=0,
        description="online RL: sample with the policy of this many optimizer steps ago "
        "(asynchronous RL's staleness; signalrl.rollout.stale); 0: the current policy",
    )


class EvalConfig(Section):
    every: int = Field(0, ge=0, description="evaluate every N steps (0: only at the end)")
    n: int | None = Field(None, ge=1, description="test problems used (default: all)")
    k: int = Field(0, ge=0, description="pass@k (0: greedy accuracy only)")
    samples: int | None = Field(None, ge=1, description="samples per problem for pass@k (>= k)")
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int | None = Field(None, ge=1)
    batch_size: int = Field(256, ge=1)
    train_pairs: int = Field(
        512,
        ge=0,
        description="preference: training pairs scored at the end (train_eval/; a seeded "
        "sample when there are more; 0: none)",
    )


SINKS = ("tensorboard", "wandb", "trackio")  # metric sinks beside metrics.jsonl
SINK_MODULES = {"wandb": "wandb", "trackio": "trackio"}  # the optional ones: import name


class LoggingConfig(Section):
    """Where the metrics go: `metrics.jsonl` always (the source of truth), and each of
    `sinks` (`signalrl.logging.sinks`): TensorBoard events in the run directory, a Weights &
    Biases run (its files under `<run>/wandb/`), a trackio run (trackio's local database, or
    its Space). `tensorboard: false` removes tensorboard from `sinks`."""

    every: int = Field(1, ge=1)
    samples_every: int = Field(10, ge=0, description="0: never")
    samples_n: int = Field(4, ge=1)
    tensorboard: bool = True
    sinks: list[str] = Field(
        default_factory=lambda: ["tensorboard"],
        description="metric sinks beside metrics.jsonl: tensorboard, wandb, trackio",
    )
    project: str = Field("signalrl", min_length=1, description="wandb / trackio project")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="default: wandb's own (WANDB_MODE, else online)"
    )
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _tensorboard_in_sinks(cls, data: Any) -> Any:
        """`tensorboard: false` drops tensorboard from `sinks`; `tensorboard` then says
        whether `sinks` holds it (a dumped recipe loads back the same)."""
        if not isinstance(data, dict) or not isinstance(data.get("sinks", []), list):
            return data
        sinks = list(data.get("sinks", ["tensorboard"]))
        if data.get("tensorboard", True) is False:
            sinks = [s for s in sinks if s != "tensorboard"]
        return {**data, "sinks": sinks, "tensorboard": "tensorboard" in sinks}

    @field_validator("sinks")
    @classmethod
    def _known_installed_sinks(cls, sinks: list[str]) -> list[str]:
        """An unknown or repeated sink is an error; so is a sink whose package is not
        installed (checked without importing it, before any model loads or file is written)."""
        import importlib.util

        for s in sinks:
            if s not in SINKS:
                raise ValueError(f"unknown sink {s!r}; available: {', '.join(SINKS)}")
            if sinks.count(s) > 1:
                raise ValueError(f"{s!r} is listed twice")
            module = SINK_MODULES.get(s)
            if module and importlib.util.find_spec(module) is None:
                raise ValueError(f"logging.sinks has {s}; pip install 'signalrl[{s}]'")
        return sinks


class DoctorConfig(Section):
    """The live doctor (`signalrl.diagnostics`): the rules run at every logging step and each
    new finding is printed once (and listed in report.html); `stop_on` severities stop the
    run cleanly (a checkpoint, then the final evaluation and `final/`)."""

    enabled: bool = True
    stop_on: list[Literal["warning", "critical"]] = Field(default_factory=list)
    rules: str | None = Field(None, description="a module of your own rules ('mymodule')")


class LoraConfig(Section):
    """A peft LoRA adapter on the policy (any trainer). The frozen base with the adapter
    disabled is the reference where a trainer needs one, so a KL costs no second model copy;
    `final/` holds the adapter, and with `merge: true` the merged model."""

    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        None, description="module names to adapt (default: peft's for the architecture)"
    )
    merge: bool = Field(False, description="final/ also holds the merged model (final/merged)")


class CheckpointConfig(Section):
    every: int = Field(0, ge=0, description="save every N steps (0: only final/)")
    keep: int = Field(2, ge=1)


class DataConfig(Section):
    """A data file. Preference trainers: rows {prompt, chosen, rejected} or, for kto,
    {prompt, completion, label}. SFT (optional; without it SFT trains on the task's train
    split): rows {text} (loss on every token: pretraining), {prompt, completion} or chat
    {messages} (`kind`; see `signalrl.data.sft`). Relative paths are relative to the working
    directory. `train_subset: k` (SFT and online RL) trains on the first k train rows,
    repeated: `train_subset: 1` is 1-shot RLVR (Wang et al. 2025)."""

    train_subset: int | None = Field(None, ge=1, description="first k train rows only")

    path: str | None = None
    format: Literal["auto", "jsonl", "parquet", "hf"] = "auto"
    kind: Literal["auto", "text", "prompt_completion", "messages"] = Field(
        "auto", description="SFT rows: text, prompt_completion or messages (auto: by columns)"
    )
    max_length: int | None = Field(
        None,
        ge=2,
        description="longest row in tokens (default: the model's positions); SFT refuses a "
        "longer row, preference and reward-model rows are truncated (and counted)",
    )
    test_path: str | None = None
    test_fraction: float = Field(
        0.1, ge=0, lt=1, description="held-out rows for eval metrics when test_path is unset"
    )


class EnvConfig(Section):
    """Multi-turn rollouts (`signalrl.envs`, `signalrl.rollout.multiturn`): the environment
    each trajectory talks to, and its limits. Without an `env` section online RL samples one
    completion per prompt as before."""

    type: Literal["single_turn", "tools", "function"] = "tools"
    tools: list[str] = Field(
        default_factory=list,
        description="type tools: built-in tools (calculator, python) or 'module:function'",
    )
    cls: str | None = Field(None, description="type function: 'module:ClassName'")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to cls(...)")
    max_turns: int = Field(4, ge=1, description="assistant turns per trajectory")
    max_total_tokens: int = Field(
        256, ge=1, description="sampled plus environment tokens after the prompt"
    )
    tool_timeout: float = Field(5.0, gt=0, description="wall-clock seconds per tool call")
    sandbox: Literal["auto", "required", "none"] = Field(
        "auto", description="the python tool's sandbox (signalrl.rewards.sandbox)"
    )
    error_reward: float = Field(0.0, description="reward added per malformed or failed call")
    turn_rewards: Literal["per_turn", "sum"] = Field(
        "per_turn",
        description="per_turn: GAE and REINFORCE++ get each turn's reward on its last sampled "
        "token; sum: the episode's total on its last one (group estimators always use the total)",
    )


def renamed(data: Any, section: str, old: str, new: str) -> Any:
    """A `before`-validator helper: accept the deprecated key `old` of `section` as `new`
    (with a FutureWarning) for one release; both at once is an error."""
    if not isinstance(data, dict) or old not in data:
        return data
    if new in data:
        raise ValueError(f"{section}.{old} is the old name of {section}.{new}: set only {new}")
    warnings.warn(
        f"recipe key '{section}.{old}' is deprecated: use '{section}.{new}' (the old name is "
        "accepted in this release and will be removed in the next)",
        FutureWarning,
        stacklevel=2,
    )
    data = dict(data)
    data[new] = data.pop(old)
    return data
