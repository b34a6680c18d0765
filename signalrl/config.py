"""Recipes: pydantic models for every section, YAML load/dump, `--set` overrides.

A recipe is one YAML file; every key is validated and an unknown key is an error that names
the key and the file. `load_recipe(path, overrides=["train.lr=1e-4"])` applies dotted
overrides (values parsed as YAML) before validation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from signalrl.rewards.registry import RewardSpec


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str = "tiny"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = Field(0, description="initialisation seed for presets")
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda:N")
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="eager is faster than sdpa for very small models on CPU"
    )


class TaskConfig(BaseModel):
    """`name` picks a built-in task; every other key is passed to the task's constructor."""

    model_config = ConfigDict(extra="allow")
    name: str = "arithmetic"

    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainConfig(Section):
    steps: int = Field(100, ge=1, description="optimizer steps")
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


class SamplingConfig(Section):
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    stop_strings: list[str] = Field(default_factory=list)


AggName = Literal[
    "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
]
Algorithm = Literal["grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "ppo"]

# Each algorithm is a preset of the pieces; any key set in a recipe wins over its preset.
ALGORITHM_PRESETS: dict[str, dict[str, Any]] = {
    "grpo": dict(
        advantage="group",
        adv_scale="group",
        loss_agg="seq-mean-token-mean",
        clip_low=0.2,
        clip_high=0.2,
        kl_placement="loss",
        beta=0.04,
    ),
    "dr_grpo": dict(
        advantage="group",
        adv_scale="none",
        loss_agg="seq-mean-token-sum-norm",
        clip_low=0.2,
        clip_high=0.2,
        kl_placement="off",
        beta=0.0,
    ),
    "dapo": dict(
        advantage="group",
        adv_scale="group",
        loss_agg="token-mean",
        clip_low=0.2,
        clip_high=0.28,
        kl_placement="off",
        beta=0.0,
        dynamic_sampling=True,
        overlong_cache="auto",
    ),
    "gspo": dict(
        advantage="group",
        adv_scale="group",
        loss_agg="seq-mean-token-mean",
        ratio_level="sequence",
        clip_low=3e-4,
        clip_high=4e-4,
        kl_placement="off",
        beta=0.0,
    ),
    "rloo": dict(
        advantage="rloo",
        loss_agg="token-mean",
        clip_low=0.2,
        clip_high=0.2,
        kl_placement="reward",
        beta=0.05,
    ),
    "reinforce_pp": dict(
        advantage="reinforce_pp",
        loss_agg="token-mean",
        clip_low=0.2,
        clip_high=0.2,
        kl_placement="reward",
        beta=0.01,
    ),
    "ppo": dict(
        advantage="gae",
        loss_agg="token-mean",
        clip_low=0.2,
        clip_high=0.2,
        kl_placement="reward",
        beta=0.05,
        whiten_advantages=True,
    ),
}


class RLConfig(Section):
    """Online RL. `algorithm` picks a preset (ALGORITHM_PRESETS); every other key left unset
    takes the preset's value, and any key set here overrides it."""

    algorithm: Algorithm = "grpo"
    group_size: int = Field(8, ge=1)
    mu: int = Field(1, ge=1, description="policy updates per batch of rollouts")
    advantage: Literal["group", "rloo", "reinforce_pp", "gae"] | None = None
    adv_scale: Literal["group", "batch", "none"] | None = None
    whiten_advantages: bool | None = None
    loss_agg: AggName | None = None
    ratio_level: Literal["token", "sequence"] | None = None
    loss_type: Literal["ppo", "cispo"] = "ppo"
    clip_low: float | None = Field(None, ge=0)
    clip_high: float | None = Field(None, ge=0)
    dual_clip: float | None = Field(None, gt=1)
    kl_placement: Literal["loss", "reward", "off"] | None = None
    beta: float | None = Field(None, ge=0, description="KL coefficient; 0 keeps no reference")
    kl_estimator: Literal["k1", "k2", "k3"] | None = Field(
        None, description="default: k3 in the loss, k1 in the reward"
    )
    dynamic_sampling: bool | None = None
    max_sampling_rounds: int = Field(4, ge=1, description="dynamic sampling: rounds per step")
    overlong_cache: int | Literal["auto"] | None = Field(
        None, description="DAPO soft overlong window in tokens; auto: max_new_tokens // 5"
    )
    overlong_factor: float = Field(1.0, ge=0)
    mask_truncated: bool = False
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    vf_coef: float = Field(0.5, ge=0)
    value_clip: float | None = Field(0.2, gt=0)
    critic_lr: float | None = Field(None, gt=0, description="default: train.lr")
    critic_path: str | None = Field(None, description="critic init; default: the policy")

    @model_validator(mode="after")
    def _fill_from_preset(self) -> RLConfig:
        preset = {
            "ratio_level": "token",
            "whiten_advantages": False,
            "dynamic_sampling": False,
            "adv_scale": "group",
            **ALGORITHM_PRESETS[self.algorithm],
        }
        if self.beta and self.kl_placement is None and preset["kl_placement"] == "off":
            preset["kl_placement"] = "loss"  # a KL asked for explicitly goes in the loss
        for key, value in preset.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.advantage in ("group", "rloo") and self.group_size < 2:
            raise ValueError(f"advantage {self.advantage!r} needs group_size >= 2")
        if self.ratio_level == "sequence" and self.loss_agg != "seq-mean-token-mean":
            raise ValueError("ratio_level 'sequence' (GSPO) needs loss_agg seq-mean-token-mean")
        if self.kl_estimator is None:
            object.__setattr__(
                self, "kl_estimator", "k1" if self.kl_placement == "reward" else "k3"
            )
        if self.kl_placement == "off" and self.beta:
            raise ValueError("beta > 0 with kl_placement 'off': set kl_placement to loss or reward")
        return self

    @property
    def uses_reference(self) -> bool:
        return bool(self.beta) and self.kl_placement != "off"


class EvalConfig(Section):
    every: int = Field(0, ge=0, description="evaluate every N steps (0: only at the end)")
    n: int | None = Field(None, ge=1, description="test problems used (default: all)")
    k: int = Field(0, ge=0, description="pass@k (0: greedy accuracy only)")
    samples: int | None = Field(None, ge=1, description="samples per problem for pass@k (>= k)")
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int | None = Field(None, ge=1)
    batch_size: int = Field(256, ge=1)


class LoggingConfig(Section):
    every: int = Field(1, ge=1)
    samples_every: int = Field(10, ge=0, description="0: never")
    samples_n: int = Field(4, ge=1)
    tensorboard: bool = True
    progress: bool = True


class CheckpointConfig(Section):
    every: int = Field(0, ge=0, description="save every N steps (0: only final/)")
    keep: int = Field(2, ge=1)


REFERENCE_FREE_LOSSES: tuple[str, ...] = ("simpo", "orpo")
EXTRA_PREFERENCE_LOSSES: tuple[str, ...] = ("simpo", "orpo", "kto", "rpo")


def preference_loss_types() -> tuple[str, ...]:
    """Every `preference.loss_type`: the DPO family plus SimPO, ORPO, KTO and RPO."""
    from signalrl.losses.preference import DPO_LOSS_TYPES

    return (*DPO_LOSS_TYPES, *EXTRA_PREFERENCE_LOSSES)


class PreferenceConfig(Section):
    """Preference optimisation (trainer `preference`); see `signalrl/trainers/preference.py`."""

    loss_type: str = Field(
        "sigmoid", description="a DPO loss type (sigmoid, ipo, robust, ...), simpo, orpo, kto, rpo"
    )
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, le=0.5)
    simpo_gamma: float = 0.5
    rpo_alpha: float = Field(1.0, ge=0, description="weight of the chosen NLL (rpo)")
    reference: Literal["copy", "lora", "precomputed", "none"] = "copy"
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    kto_desirable_weight: float = Field(1.0, ge=0)
    kto_undesirable_weight: float = Field(1.0, ge=0)
    online: bool = Field(
        False,
        description="online (iterative) DPO: each step samples the task's train prompts from "
        "the current policy and pairs the samples with the verifier (no data.path)",
    )
    online_samples: int = Field(8, ge=2, description="samples per prompt (online)")
    online_pairs_per_prompt: int = Field(1, ge=1, description="pairs per prompt (online)")

    @model_validator(mode="after")
    def _check(self) -> PreferenceConfig:
        valid = preference_loss_types()
        if self.loss_type not in valid:
            raise ValueError(
                f"preference.loss_type: unknown loss type {self.loss_type!r}; valid: "
                f"{', '.join(valid)}"
            )
        if self.online and self.reference == "precomputed":
            raise ValueError(
                "preference.online samples new completions every step; reference "
                "'precomputed' cannot score them (use copy or lora)"
            )
        if self.online and self.loss_type == "kto":
            raise ValueError("preference.online pairs samples; loss_type 'kto' is unpaired")
        if self.reference == "none" and self.loss_type not in REFERENCE_FREE_LOSSES:
            raise ValueError(
                f"preference.reference 'none' needs a reference-free loss "
                f"({', '.join(REFERENCE_FREE_LOSSES)}); loss_type {self.loss_type!r} needs a "
                "reference model (copy, lora or precomputed)"
            )
        return self


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
        None, ge=2, description="SFT: longest row in tokens (default: the model's positions)"
    )
    test_path: str | None = None
    test_fraction: float = Field(
        0.1, ge=0, lt=1, description="held-out rows for eval metrics when test_path is unset"
    )


class RewardModelConfig(Section):
    """Reward model training (trainer `reward_model`); see `signalrl/trainers/reward_model.py`."""

    center_coef: float = Field(
        0.0, ge=0, description="adds center_coef * (r_chosen + r_rejected)^2 (TRL's centring)"
    )


class DistillConfig(Section):
    """Distillation from a teacher (trainer `distill`); see `signalrl/trainers/distill.py`.

    `on_policy`: the student samples, the teacher scores the samples in one forward pass and
    `-(logp_student - logp_teacher)` per token is the advantage (Agarwal et al. 2024; Thinking
    Machines 2025). `off_policy`: the teacher generates and the student is trained with NLL on
    the teacher's samples (sequence-level KD, the baseline). `gkd`: with probability `lmbda`
    a step trains on student samples, else on `gkd_data` (the task's reference completions or
    teacher samples), with the full-vocabulary generalised JSD (`beta`) to the teacher."""

    teacher: str | None = Field(None, description="teacher checkpoint directory or preset")
    teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="the frozen teacher's weights (default: model.dtype)"
    )
    mode: Literal["on_policy", "off_policy", "gkd"] = "on_policy"
    reward_weight: float = Field(
        0.0, ge=0, description="adds this times the group-normalised verifier reward per token"
    )
    lmbda: float = Field(0.5, ge=0, le=1, description="gkd: share of steps on student samples")
    beta: float = Field(
        0.5, ge=0, le=1, description="gkd: JSD mixture weight (0: forward KL, 1: reverse KL)"
    )
    gkd_data: Literal["dataset", "teacher"] = Field(
        "dataset", description="gkd: the off-policy batches (task reference answers or teacher)"
    )


class Recipe(Section):
    name: str = "run"
    trainer: Literal["sft", "online_rl", "preference", "reward_model", "distill"] = "sft"
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(type="task")],
        description="weighted reward terms (online RL); default: the task's verifier",
    )
    reward_on_error: Literal["raise", "zero"] = "raise"
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)

    @model_validator(mode="before")
    @classmethod
    def _distill_defaults(cls, data: Any) -> Any:
        """Distillation's policy-gradient defaults: token-mean and no reference KL (any key
        the recipe sets wins)."""
        if isinstance(data, dict) and data.get("trainer") == "distill":
            rl = data.get("rl") or {}
            if isinstance(rl, dict):
                data = {**data, "rl": {"loss_agg": "token-mean", "beta": 0.0, **rl}}
        return data

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.eval.samples is not None and self.eval.samples < self.eval.k:
            raise ValueError("eval.samples must be >= eval.k")
        online_pref = self.trainer == "preference" and self.preference.online
        needs_file = self.trainer in ("preference", "reward_model") and not online_pref
        if needs_file and not self.data.path:
            raise ValueError(f"trainer {self.trainer!r} needs data.path (a preference data file)")
        if self.trainer == "distill":
            if not self.distill.teacher:
                raise ValueError(
                    "trainer 'distill' needs distill.teacher (a checkpoint directory or preset)"
                )
            if self.distill.reward_weight > 0 and self.rl.group_size < 2:
                raise ValueError("distill.reward_weight > 0 needs rl.group_size >= 2")
            if self.distill.mode != "on_policy" and self.distill.reward_weight > 0:
                raise ValueError(
                    f"distill.reward_weight > 0 is only supported with distill.mode on_policy "
                    f"(got mode {self.distill.mode!r})"
                )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


class RecipeError(ValueError):
    """A recipe that does not validate; the message names the file and the keys."""


def _format_errors(err: ValidationError, where: str) -> str:
    lines = [f"{where}: invalid recipe"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise RecipeError(f"--set {dotted}: '{k}' is not a section")
        cur = nxt
    cur[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"--set {text!r}: empty key")
    return key, yaml.safe_load(raw) if raw.strip() else ""


def recipe_from_dict(
    data: dict[str, Any], where: str = "<recipe>", overrides: list[str] | None = None
) -> Recipe:
    data = dict(data)
    for ov in overrides or []:
        key, value = parse_override(ov)
        set_dotted(data, key, value)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, where)) from None
    _check_task(recipe, where)
    return recipe


def _check_task(recipe: Recipe, where: str) -> None:
    from signalrl.tasks import TASKS, make_task

    if recipe.task.name not in TASKS:
        raise RecipeError(
            f"{where}: task.name: unknown task {recipe.task.name!r}; available: "
            f"{', '.join(sorted(TASKS))}"
        )
    import dataclasses

    cls = TASKS[recipe.task.name]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in recipe.task.kwargs():
        if key not in fields:
            raise RecipeError(
                f"{where}: unknown key 'task.{key}' for task {recipe.task.name!r}; valid: "
                f"{', '.join(sorted(fields))}"
            )
    try:
        make_task(recipe.task.name, **recipe.task.kwargs())
    except ValueError as e:
        raise RecipeError(f"{where}: task: {e}") from None


def load_recipe(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: recipe file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: a recipe must be a mapping of sections")
    return recipe_from_dict(data, str(p), overrides)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
