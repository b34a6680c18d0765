"""The method sections: `rl` (online RL and distillation), `preference`, `reward_model`,
`distill`. Names that pick an algorithm piece (`rl.advantage`, `rl.loss_type`,
`preference.loss_type`) are checked against the registries of `signalrl.registry`, which read
the built-in names without importing torch."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from signalrl.config.sections import Section, renamed
from signalrl.registry import ADVANTAGES, POLICY_LOSSES, PREFERENCE_LOSSES, Registry

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
        kl_coef=0.04,
    ),
    "dr_grpo": dict(
        advantage="group",
        adv_scale="none",
        loss_agg="seq-mean-token-sum-norm",
        clip_low=0.2,
        clip_high=0.2,
        kl_placement="off",
        kl_coef=0.0,
    ),
    "dapo": dict(
        advantage="group",
        adv_scale="group",
        loss_agg="token-mean",
        clip_low=0.2,
        clip_high=0.28,
        kl_placement="off",
        kl_coef=0.0,
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
        kl_coef=0.0,
    ),
    "rloo": dict(
        advantage="rloo",
        loss_agg="token-mean",
        clip_low=0.2,
        clip_high=0.2,
        kl_placement="reward",
        kl_coef=0.05,
    ),
    "reinforce_pp": dict(
        advantage="reinforce_pp",
        loss_agg="token-mean",
        clip_low=0.2,
        clip_high=0.2,
        kl_placement="reward",
        kl_coef=0.01,
    ),
    "ppo": dict(
        advantage="gae",
        loss_agg="token-mean",
        clip_low=0.2,
        clip_high=0.2,
        kl_placement="reward",
        kl_coef=0.05,
        whiten_advantages=True,
    ),
}

_PRESET_KEYS = frozenset(k for p in ALGORITHM_PRESETS.values() for k in p) | {"kl_estimator"}


def registry_meta(registry: Registry, name: str, key: str, default: Any = None) -> Any:
    """Metadata of a registry entry at validation time: read from the source for a built-in
    (no import), from the function's attribute for a user `module:function`."""
    if name in registry.declared():
        return registry.declared_meta(name, key, default)
    return getattr(registry.get(name), key, default)


class RLConfig(Section):
    """Online RL. `algorithm` picks a preset (ALGORITHM_PRESETS), merged under the recipe's own
    keys before validation, so every key the recipe sets overrides the preset and every field
    holds a real value. `advantage` and `loss_type` name registry entries (or a user
    `module:function`)."""

    algorithm: Algorithm = "grpo"
    group_size: int = Field(8, ge=1)
    mu: int = Field(1, ge=1, description="policy updates per batch of rollouts")
    advantage: str = Field("group", description="advantage estimator (registry name)")
    adv_scale: Literal["group", "batch", "none"] = "group"
    whiten_advantages: bool = False
    loss_agg: AggName = "seq-mean-token-mean"
    ratio_level: Literal["token", "sequence"] = "token"
    loss_type: str = Field("ppo", description="policy loss (registry name)")
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.2, ge=0)
    dual_clip: float | None = Field(None, gt=1)
    kl_placement: Literal["loss", "reward", "off"] = "loss"
    kl_coef: float = Field(0.04, ge=0, description="KL coefficient; 0 keeps no reference")
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k3", description="default: k3 in the loss, k1 in the reward"
    )
    dynamic_sampling: bool = False
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
    sapo_tau_pos: float = Field(1.0, gt=0, description="sapo: gate temperature, A > 0")
    sapo_tau_neg: float = Field(1.05, gt=0, description="sapo: gate temperature, A <= 0")
    cov_frac: float = Field(
        2e-4, gt=0, le=1, description="clip_cov / kl_cov: share of tokens selected"
    )
    clip_cov_lb: float = Field(1.0, description="clip_cov: covariance window, lower edge")
    clip_cov_ub: float = Field(5.0, description="clip_cov: covariance window, upper edge")
    kl_cov_coef: float = Field(1.0, ge=0, description="kl_cov: penalty coefficient")
    dppo_ratio_cap: float = Field(10.0, gt=0, description="dppo_*: cap on the IS weight")
    entropy_top_frac: float | None = Field(
        None, gt=0, le=1, description="80/20 rule: train only the top share of tokens by entropy"
    )
    entropy_coef: float = Field(
        0.0, ge=0, description="entropy bonus: adds -entropy_coef * H to the loss"
    )
    entropy_target: float | None = Field(
        None, ge=0, description="adaptive entropy: move entropy_coef to hold H near this (nats)"
    )
    entropy_coef_lr: float | None = Field(
        None, gt=0, description="adaptive entropy: coef += lr * (target - H) per step"
    )
    is_correction: Literal[
        "none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"
    ] = Field("none", description="rollout/train mismatch correction (signalrl.losses.mismatch)")
    is_cap: float = Field(2.0, gt=0, description="truncate modes: the weight cap")
    is_low: float = Field(0.5, ge=0, le=1, description="mask modes: lowest kept ratio")
    is_high: float = Field(2.0, ge=1, description="mask modes: highest kept ratio")
    off_policy_mask_kl: float | None = Field(
        None,
        gt=0,
        description="DeepSeek-V3.2 mask: drop negative-advantage sequences whose "
        "per-token KL to the sampler exceeds this",
    )

    @model_validator(mode="before")
    @classmethod
    def _merge_preset(cls, data: Any) -> Any:
        data = renamed(data, "rl", "beta", "kl_coef")
        if not isinstance(data, dict):
            return data
        algorithm = data.get("algorithm", "grpo")
        if algorithm not in ALGORITHM_PRESETS:
            return data  # the Literal reports it
        # a key set to null takes the preset's value
        own = {k: v for k, v in data.items() if not (v is None and k in _PRESET_KEYS)}
        preset = dict(ALGORITHM_PRESETS[algorithm])
        if own.get("kl_coef") and "kl_placement" not in own and preset["kl_placement"] == "off":
            preset["kl_placement"] = "loss"  # a KL asked for explicitly goes in the loss
        agg = POLICY_LOSSES.declared_meta(str(own.get("loss_type", "ppo")), "agg")
        if agg is not None:
            preset["loss_agg"] = agg  # a loss defined for one aggregation (gmpo, gspo_token)
        placement = own.get("kl_placement", preset["kl_placement"])
        preset["kl_estimator"] = "k1" if placement == "reward" else "k3"
        return {**preset, **own}

    @model_validator(mode="after")
    def _check(self) -> RLConfig:
        ADVANTAGES.check(self.advantage)
        POLICY_LOSSES.check(self.loss_type)
        if registry_meta(ADVANTAGES, self.advantage, "needs_groups") and self.group_size < 2:
            raise ValueError(f"advantage {self.advantage!r} needs group_size >= 2")
        agg = registry_meta(POLICY_LOSSES, self.loss_type, "agg")
        if agg is not None and self.loss_agg != agg:
            raise ValueError(f"loss_type {self.loss_type!r} needs loss_agg {agg!r}")
        if registry_meta(ADVANTAGES, self.advantage, "needs_greedy_baseline") and self.mu > 1:
            raise ValueError(f"advantage {self.advantage!r} (a greedy baseline) needs mu 1")
        if self.ratio_level == "sequence" and self.loss_agg != "seq-mean-token-mean":
            raise ValueError("ratio_level 'sequence' (GSPO) needs loss_agg seq-mean-token-mean")
        if self.kl_placement == "off" and self.kl_coef:
            raise ValueError(
                "kl_coef > 0 with kl_placement 'off': set kl_placement to loss or reward"
            )
        if (self.entropy_target is None) != (self.entropy_coef_lr is None):
            raise ValueError(
                "rl.entropy_target and rl.entropy_coef_lr go together: the adaptive entropy "
                "coefficient needs a target (nats) and an adaptation rate"
            )
        return self

    @property
    def uses_entropy(self) -> bool:
        """Whether the training forward computes the policy's entropy (a bonus or a target)."""
        return self.entropy_coef > 0 or self.entropy_target is not None

    @property
    def uses_reference(self) -> bool:
        return bool(self.kl_coef) and self.kl_placement != "off"

    @property
    def beta(self) -> float:
        """Deprecated read-only alias of `kl_coef`."""
        return self.kl_coef


class PreferenceConfig(Section):
    """Preference optimisation (trainer `preference`); see `signalrl/trainers/preference.py`.
    `loss_type` names a `signalrl.registry.PREFERENCE_LOSSES` entry or a user
    `module:function`; `beta` is the DPO temperature (the implicit reward scale)."""

    loss_type: str = Field(
        "sigmoid", description="a DPO loss type (sigmoid, ipo, robust, ...), simpo, orpo, kto, rpo"
    )
    beta: float = Field(0.1, gt=0, description="DPO temperature (implicit reward scale)")
    label_smoothing: float = Field(0.0, ge=0, le=0.5)
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = (
        Field("reverse_kl", description="f-DPO divergence (Wang et al. 2023)")
    )
    f_alpha_divergence_coef: float = Field(0.5, description="alpha of alpha_divergence")
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

    @property
    def reference_free(self) -> bool:
        return bool(registry_meta(PREFERENCE_LOSSES, self.loss_type, "reference_free"))

    @property
    def unpaired(self) -> bool:
        return bool(registry_meta(PREFERENCE_LOSSES, self.loss_type, "unpaired"))

    @property
    def uses_reference(self) -> bool:
        return not self.reference_free and self.reference != "none"

    @model_validator(mode="after")
    def _check(self) -> PreferenceConfig:
        try:
            PREFERENCE_LOSSES.check(self.loss_type)
        except ValueError as e:
            raise ValueError(f"preference.loss_type: {e}") from None
        if self.f_divergence_type != "reverse_kl" and not registry_meta(
            PREFERENCE_LOSSES, self.loss_type, "f_divergence"
        ):
            raise ValueError(
                f"preference.f_divergence_type {self.f_divergence_type!r}: loss_type "
                f"{self.loss_type!r} has no f-divergence generalisation"
            )
        if self.online and self.reference == "precomputed":
            raise ValueError(
                "preference.online samples new completions every step; reference "
                "'precomputed' cannot score them (use copy or lora)"
            )
        if self.online and self.unpaired:
            raise ValueError(
                f"preference.online pairs samples; loss_type {self.loss_type!r} is unpaired"
            )
        if self.reference == "none" and not self.reference_free:
            free = [n for n, m in PREFERENCE_LOSSES.declared().items() if m.get("reference_free")]
            raise ValueError(
                f"preference.reference 'none' needs a reference-free loss "
                f"({', '.join(free)}); loss_type {self.loss_type!r} needs a "
                "reference model (copy, lora or precomputed)"
            )
        return self


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
    teacher samples), with the full-vocabulary generalised JSD (`jsd_beta`) to the teacher."""

    teacher: str | None = Field(None, description="teacher checkpoint directory or preset")
    teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="the frozen teacher's weights (default: model.dtype)"
    )
    mode: Literal["on_policy", "off_policy", "gkd"] = "on_policy"
    reward_weight: float = Field(
        0.0, ge=0, description="adds this times the group-normalised verifier reward per token"
    )
    lmbda: float = Field(0.5, ge=0, le=1, description="gkd: share of steps on student samples")
    jsd_beta: float = Field(
        0.5, ge=0, le=1, description="gkd: JSD mixture weight (0: forward KL, 1: reverse KL)"
    )
    gkd_data: Literal["dataset", "teacher"] = Field(
        "dataset", description="gkd: the off-policy batches (task reference answers or teacher)"
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        return renamed(data, "distill", "beta", "jsd_beta")

    @property
    def beta(self) -> float:
        """Deprecated read-only alias of `jsd_beta`."""
        return self.jsd_beta
