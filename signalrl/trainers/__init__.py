"""Training loops, one per file; `run_recipe` picks the one a recipe names."""

from __future__ import annotations

from typing import Any

from signalrl.config import Recipe


def trainer_class(name: str) -> type:
    from signalrl.trainers.distill import DistillTrainer
    from signalrl.trainers.online_rl import OnlineRLTrainer
    from signalrl.trainers.preference import PreferenceTrainer
    from signalrl.trainers.reward_model import RewardModelTrainer
    from signalrl.trainers.sft import SFTTrainer

    table: dict[str, type] = {
        "sft": SFTTrainer,
        "online_rl": OnlineRLTrainer,
        "preference": PreferenceTrainer,
        "reward_model": RewardModelTrainer,
        "distill": DistillTrainer,
    }
    if name not in table:
        raise ValueError(f"unknown trainer {name!r}; available: {', '.join(table)}")
    return table[name]


def run_recipe(
    recipe: Recipe, *, resume: bool = False, overwrite: bool = False, **kw: Any
) -> dict[str, Any]:
    """Train as the recipe says; returns the final summary (accuracy, pass@k, seconds, model)."""
    trainer = trainer_class(recipe.trainer)(recipe, resume=resume, overwrite=overwrite, **kw)
    return trainer.train()
