"""Every registered policy loss and advantage estimator trains through the online trainer
(tiny model, arithmetic, a varying reward) without a NaN."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from signalrl.config import RecipeError, recipe_from_dict
from signalrl.logging import read_metrics
from signalrl.registry import ADVANTAGES, POLICY_LOSSES
from signalrl.trainers import run_recipe

sys.path.insert(0, str(Path(__file__).parent))


def _recipe(tmp_path: Path, name: str, rl: dict, **over) -> object:
    data = {
        "name": name,
        "output_dir": str(tmp_path),
        "trainer": "online_rl",
        "model": {"name_or_path": "tiny", "attn_implementation": "eager"},
        "task": {"name": "arithmetic", "digits": 1, "n_train": 32, "n_test": 4},
        "train": {"steps": 3, "lr": 1e-3, "batch_size": 2},
        "rl": {"algorithm": "grpo", "group_size": 4, "kl_coef": 0.0, **rl},
        "rewards": [
            {"type": "function", "fn": "user_pieces:char_code_reward", "name": "code"},
            {"type": "length", "target": 2, "weight": 0.5},
        ],
        "sampling": {"max_new_tokens": 3},
        "eval": {"n": 2},
        "logging": {"progress": False, "samples_every": 0, "tensorboard": False},
    }
    data.update(over)
    return recipe_from_dict(data, "test")


def _finite(rows: list[dict]) -> None:
    for row in rows:
        for key in ("loss", "grad_norm", "reward/mean"):
            assert row.get(key) is not None and math.isfinite(row[key]), (row["step"], key)


@pytest.mark.parametrize("loss", POLICY_LOSSES.names())
def test_every_policy_loss_trains(tmp_path, loss):
    run_recipe(_recipe(tmp_path, loss, {"loss_type": loss}))
    _finite(read_metrics(tmp_path / loss))


@pytest.mark.parametrize("estimator", ADVANTAGES.names())
def test_every_advantage_estimator_trains(tmp_path, estimator):
    rl = {"advantage": estimator}
    over = {}
    if estimator == "gae":
        rl = {"algorithm": "ppo"}
    if estimator == "maxrl":  # pass/fail rewards only (the length penalty is negative)
        over["rewards"] = [{"type": "function", "fn": "user_pieces:char_code_reward"}]
    run_recipe(_recipe(tmp_path, estimator, rl, **over))
    rows = read_metrics(tmp_path / estimator)
    _finite(rows)
    if estimator == "remax":
        assert all("reward/greedy_baseline" in r for r in rows)


def test_the_80_20_rule_masks_the_low_entropy_tokens(tmp_path):
    run_recipe(_recipe(tmp_path, "e", {"entropy_top_frac": 0.2}))
    _finite(read_metrics(tmp_path / "e"))


def test_a_loss_defined_for_one_aggregation_sets_it_or_refuses():
    r = _recipe(Path("/tmp"), "x", {"loss_type": "gmpo"})
    assert r.rl.loss_agg == "seq-mean-token-mean"
    with pytest.raises(RecipeError, match="needs loss_agg 'seq-mean-token-mean'"):
        _recipe(Path("/tmp"), "x", {"loss_type": "gspo_token", "loss_agg": "token-mean"})
