"""A recipe per trainer: a discriminated union on `trainer`, so a section that belongs to
another trainer is an error naming it; YAML load/dump and `--set` overrides."""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from signalrl.config.methods import DistillConfig, PreferenceConfig, RewardModelConfig, RLConfig
from signalrl.config.sections import (
    CheckpointConfig,
    DataConfig,
    DoctorConfig,
    EnvConfig,
    EvalConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    SamplingConfig,
    Section,
    TaskConfig,
    TrainConfig,
)
from signalrl.rewards.registry import RewardSpec


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping that repeats a key (plain YAML loaders silently keep the last one)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key repeated in one mapping, at any level, naming the
    dotted key and both lines (merge keys `<<` may still be overridden, as YAML intends)."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._paths: dict[int, str] = {}
        self._walk(node, "")
        return super().construct_document(node)

    def _walk(self, node: yaml.Node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else "?"
                self._paths[id(v)] = f"{path}.{key}" if path else str(key)
                self._walk(v, self._paths[id(v)])
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self._paths[id(v)] = f"{path}[{i}]"
                self._walk(v, self._paths[id(v)])

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                parent = getattr(self, "_paths", {}).get(id(node), "")
                name = f"{parent}.{key}" if parent else str(key)
                raise DuplicateKeyError(
                    f"line {line}: duplicate key '{name}' (first at line {first}); YAML "
                    "would silently keep only the last one: merge the two"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Parse YAML text with `UniqueKeyLoader` (a repeated key is a `DuplicateKeyError`)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


class RecipeBase(Section):
    """The sections every trainer reads."""

    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    doctor: DoctorConfig = Field(default_factory=DoctorConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        """The run directory is `output_dir/name`: `name` must be one plain path component
        (with `--overwrite`, `name: .` would replace the whole output directory)."""
        if not v.strip():
            raise ValueError("name is empty; it names the run directory <output_dir>/<name>")
        if v in (".", "..") or "/" in v or "\\" in v or os.path.isabs(v):
            raise ValueError(
                f"name {v!r} must be a single directory name (no '/', '\\', '.' or '..'); "
                "put the parent directories in output_dir"
            )
        if v.startswith("."):
            raise ValueError(
                f"name {v!r} starts with '.': hidden names are signalrl's temporary "
                "directories (.<name>.tmp-*, .<name>.old-*)"
            )
        if any(ord(c) < 32 for c in v):
            raise ValueError(f"name {v!r} holds a control character")
        return v

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @model_validator(mode="after")
    def _check_eval(self) -> RecipeBase:
        if self.eval.samples is not None and self.eval.samples < self.eval.k:
            raise ValueError("eval.samples must be >= eval.k")
        return self


class SFTRecipe(RecipeBase):
    trainer: Literal["sft"] = "sft"


class OnlineRLRecipe(RecipeBase):
    trainer: Literal["online_rl"] = "online_rl"
    rl: RLConfig = Field(default_factory=RLConfig)
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(type="task")],
        description="weighted reward terms; default: the task's verifier",
    )
    reward_on_error: Literal["raise", "zero"] = "raise"
    env: EnvConfig | None = Field(
        None, description="multi-turn rollouts with an environment or tools (signalrl.envs)"
    )

    @model_validator(mode="after")
    def _check_policy_lag(self) -> OnlineRLRecipe:
        if self.sampling.policy_lag and self.train.parallel == "fsdp2":
            raise ValueError(
                "sampling.policy_lag needs train.parallel none or ddp (its frozen copy of the "
                "policy would need the full weights on every rank under fsdp2)"
            )
        return self


class PreferenceRecipe(RecipeBase):
    trainer: Literal["preference"] = "preference"
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)

    @model_validator(mode="after")
    def _check_data(self) -> PreferenceRecipe:
        if not self.preference.online and not self.data.path:
            raise ValueError("trainer 'preference' needs data.path (a preference data file)")
        return self


class RewardModelRecipe(RecipeBase):
    trainer: Literal["reward_model"] = "reward_model"
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig)

    @model_validator(mode="after")
    def _check_data(self) -> RewardModelRecipe:
        if not self.data.path:
            raise ValueError("trainer 'reward_model' needs data.path (a preference data file)")
        if self.lora.enabled:
            raise ValueError(
                "lora.enabled: trainer 'reward_model' trains a sequence classifier (the whole "
                "model and its score head); LoRA applies to causal-LM policies only"
            )
        return self


class DistillRecipe(OnlineRLRecipe):
    """Distillation samples like online RL (the `rl` section: group size, aggregation, ...)."""

    trainer: Literal["distill"] = "distill"  # type: ignore[assignment]
    distill: DistillConfig = Field(default_factory=DistillConfig)

    @model_validator(mode="before")
    @classmethod
    def _distill_defaults(cls, data: Any) -> Any:
        """Distillation's policy-gradient defaults: token-mean and no reference KL (any key
        the recipe sets wins)."""
        if isinstance(data, dict):
            rl = data.get("rl") or {}
            if isinstance(rl, dict) and "beta" not in rl:
                data = {**data, "rl": {"loss_agg": "token-mean", "kl_coef": 0.0, **rl}}
            elif isinstance(rl, dict):
                data = {**data, "rl": {"loss_agg": "token-mean", **rl}}
        return data

    @model_validator(mode="after")
    def _check_distill(self) -> DistillRecipe:
        d = self.distill
        if self.env is not None and d.mode != "on_policy":
            raise ValueError(
                f"env: distill.mode {d.mode} does not take an environment (its loss would "
                "cover the environment's tokens); use distill.mode on_policy, where the "
                "teacher scores the student's multi-turn trajectories"
            )
        if not d.teacher:
            raise ValueError(
                "trainer 'distill' needs distill.teacher (a checkpoint directory or preset)"
            )
        if d.reward_weight > 0 and self.rl.group_size < 2:
            raise ValueError("distill.reward_weight > 0 needs rl.group_size >= 2")
        if d.mode != "on_policy" and d.reward_weight > 0:
            raise ValueError(
                f"distill.reward_weight > 0 is only supported with distill.mode on_policy "
                f"(got mode {d.mode!r})"
            )
        return self


RECIPES: dict[str, type[RecipeBase]] = {
    "sft": SFTRecipe,
    "online_rl": OnlineRLRecipe,
    "preference": PreferenceRecipe,
    "reward_model": RewardModelRecipe,
    "distill": DistillRecipe,
}

Recipe = Annotated[
    SFTRecipe | OnlineRLRecipe | PreferenceRecipe | RewardModelRecipe | DistillRecipe,
    Field(discriminator="trainer"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Recipe)


class RecipeError(ValueError):
    """A recipe that does not validate; the message names the file and the keys."""


def _format_errors(err: ValidationError, where: str) -> str:
    lines = [f"{where}: invalid recipe"]
    for e in err.errors():
        loc = list(e["loc"])
        if loc and loc[0] in RECIPES:  # the union's tag
            loc = loc[1:]
        key = ".".join(str(p) for p in loc)
        msg = e["msg"]
        if e["type"] == "value_error":  # our own validators: their message is the text
            msg = msg.removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'")
        elif not key:  # a check across sections: its message names the keys (no input dump)
            lines.append(f"  {msg}")
        else:
            lines.append(f"  {key}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def _check_sections(data: dict[str, Any], where: str) -> None:
    """A section of another trainer's recipe is an error naming it and its trainers."""
    trainer = data.get("trainer")
    if trainer not in RECIPES:
        return
    own = set(RECIPES[trainer].model_fields)
    for key in data:
        if key in own:
            continue
        owners = [t for t, cls in RECIPES.items() if key in cls.model_fields]
        if owners:
            raise RecipeError(
                f"{where}: section '{key}' does not belong to trainer {trainer!r} (it "
                f"configures trainer {' / '.join(repr(o) for o in owners)}); remove it or "
                "change 'trainer'"
            )


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
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {text!r}: the value is not valid YAML: {e}") from None
    return key, value


def recipe_from_dict(
    data: dict[str, Any], where: str = "<recipe>", overrides: list[str] | None = None
) -> Recipe:
    data = {"trainer": "sft", **data}
    for ov in overrides or []:
        key, value = parse_override(ov)
        set_dotted(data, key, value)
    _check_sections(data, where)
    try:
        recipe = _ADAPTER.validate_python(data)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, where)) from None
    _check_task(recipe, where)
    return recipe


def _check_task(recipe: RecipeBase, where: str) -> None:
    from signalrl.tasks import TASKS, make_task

    if recipe.task.name not in TASKS:
        raise RecipeError(
            f"{where}: task.name: unknown task {recipe.task.name!r}; available: "
            f"{', '.join(sorted(TASKS))}"
        )
    cls = TASKS[recipe.task.name]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in recipe.task.kwargs():
        if key not in fields:
            raise RecipeError(
                f"{where}: unknown key 'task.{key}' for task {recipe.task.name!r}; valid: "
                f"{', '.join(sorted(fields))}"
            )
    for key, value in _typed_task_kwargs(cls, recipe.task.kwargs(), where).items():
        setattr(recipe.task, key, value)
    try:
        make_task(recipe.task.name, **recipe.task.kwargs())
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{where}: task: {e}") from None


def _typed_task_kwargs(cls: type, kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    """Each `task.*` value checked against the task dataclass field's annotation (a number
    given as a string, `digits: "3"`, is converted as pydantic does); a value of the wrong
    type is a RecipeError naming `task.<key>` before the task is built."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: the task checks itself
        return kwargs
    out = dict(kwargs)
    for key, value in kwargs.items():
        if key not in hints:
            continue
        try:
            out[key] = TypeAdapter(hints[key]).validate_python(value)
        except ValidationError as e:
            msg = e.errors()[0]["msg"]
            raise RecipeError(
                f"{where}: task.{key}: {msg} (got {value!r}; task {cls.__name__} expects "
                f"{_type_name(hints[key])})"
            ) from None
    return out


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def load_recipe(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: recipe file not found")
    try:
        data = load_yaml(p.read_text(encoding="utf-8"))
    except DuplicateKeyError as e:
        raise RecipeError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{p}: not UTF-8 text ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: a recipe must be a mapping of sections")
    return recipe_from_dict(data, str(p), overrides)


def dump_recipe(recipe: RecipeBase) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
