"""Recipes: pydantic models for every section, one recipe class per trainer, YAML load/dump,
`--set` overrides.

A recipe is one YAML file; every key is validated and an unknown key is an error that names
the key and the file; a section that belongs to another trainer is an error naming it.
`load_recipe(path, overrides=["train.lr=1e-4"])` applies dotted overrides (values parsed as
YAML) before validation. Validating a recipe imports neither torch nor transformers.
"""

from signalrl.config.methods import (
    ALGORITHM_PRESETS,
    AggName,
    Algorithm,
    DistillConfig,
    PreferenceConfig,
    RewardModelConfig,
    RLConfig,
)
from signalrl.config.recipe import (
    RECIPES,
    DistillRecipe,
    OnlineRLRecipe,
    PreferenceRecipe,
    Recipe,
    RecipeBase,
    RecipeError,
    RewardModelRecipe,
    SFTRecipe,
    _format_errors,
    dump_recipe,
    load_recipe,
    parse_override,
    recipe_from_dict,
    set_dotted,
)
from signalrl.config.sections import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    SamplingConfig,
    Section,
    TaskConfig,
    TrainConfig,
)

__all__ = [
    "ALGORITHM_PRESETS",
    "RECIPES",
    "AggName",
    "Algorithm",
    "CheckpointConfig",
    "DataConfig",
    "DistillConfig",
    "DistillRecipe",
    "EvalConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "OnlineRLRecipe",
    "PreferenceConfig",
    "PreferenceRecipe",
    "RLConfig",
    "Recipe",
    "RecipeBase",
    "RecipeError",
    "RewardModelConfig",
    "RewardModelRecipe",
    "SFTRecipe",
    "SamplingConfig",
    "Section",
    "TaskConfig",
    "TrainConfig",
    "_format_errors",
    "dump_recipe",
    "load_recipe",
    "parse_override",
    "recipe_from_dict",
    "set_dotted",
]
