from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from signalrl.config import ALGORITHM_PRESETS, RecipeError, recipe_from_dict
from signalrl.logging import read_metrics
from signalrl.rewards.registry import RewardComposer, RewardError, RewardSpec
from signalrl.trainers.online_rl import OnlineRLTrainer

sys.path.insert(0, str(Path(__file__).parent))
from test_trainers import SevenTask  # noqa: E402


def _recipe(tmp_path, algorithm, **rl):
    return recipe_from_dict(
        {
            "name": algorithm,
            "output_dir": str(tmp_path),
            "trainer": "online_rl",
            "seed": 0,
            "model": {"name_or_path": "tiny"},
            "train": {"steps": 30, "lr": 3e-3, "batch_size": 4},
            "rl": {"algorithm": algorithm, "group_size": 8, **rl},
            "sampling": {"max_new_tokens": 4},
            "eval": {"k": 0, "n": 4},
            "logging": {"progress": False, "samples_every": 0, "tensorboard": False},
        },
        "test",
    )


@pytest.mark.parametrize("algorithm", sorted(ALGORITHM_PRESETS))
def test_every_algorithm_raises_the_reward(tmp_path, algorithm):
    extra = {"clip_low": 0.2, "clip_high": 0.2} if algorithm == "gspo" else {}
    if algorithm == "ppo":
        extra = {"critic_lr": 3e-3}
    torch.manual_seed(0)
    t = OnlineRLTrainer(_recipe(tmp_path, algorithm, **extra), task=SevenTask())
    t.train()
    rows = read_metrics(tmp_path / algorithm)
    rewards = [r["reward/mean"] for r in rows if r.get("reward/mean") is not None]
    early, late = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert late > early + 0.3, (algorithm, early, late)
    held = rows[0]["models/held"]
    rl = t.recipe.rl
    assert held == 1 + (rl.kl_coef > 0) + (rl.advantage == "gae")
    if algorithm == "ppo":
        assert "value_loss" in rows[0] and "explained_variance" in rows[-1]
    if rl.kl_coef > 0:
        assert "kl" in rows[-1]
    assert rows[0]["memory/peak_mb"] > 0


def test_presets_fill_and_recipe_overrides_win():
    r = recipe_from_dict({"trainer": "online_rl", "rl": {"algorithm": "dapo"}}, "x")
    assert (r.rl.clip_low, r.rl.clip_high, r.rl.loss_agg) == (0.2, 0.28, "token-mean")
    assert r.rl.dynamic_sampling and r.rl.kl_coef == 0.0 and not r.rl.uses_reference
    r = recipe_from_dict(
        {"trainer": "online_rl", "rl": {"algorithm": "dapo", "clip_high": 0.3, "kl_coef": 0.1}}, "x"
    )
    assert r.rl.clip_high == 0.3 and r.rl.kl_placement == "loss" and r.rl.uses_reference
    r = recipe_from_dict({"trainer": "online_rl", "rl": {"algorithm": "dr_grpo"}}, "x")
    assert r.rl.adv_scale == "none" and r.rl.loss_agg == "seq-mean-token-sum-norm"
    r = recipe_from_dict({"trainer": "online_rl", "rl": {"algorithm": "ppo"}}, "x")
    assert r.rl.advantage == "gae" and r.rl.kl_placement == "reward" and r.rl.kl_estimator == "k1"
    with pytest.raises(RecipeError, match="kl_placement"):
        recipe_from_dict(
            {
                "trainer": "online_rl",
                "rl": {"algorithm": "dapo", "kl_placement": "off", "kl_coef": 0.1},
            },
            "x",
        )
    with pytest.raises(RecipeError, match="GSPO"):
        recipe_from_dict(
            {"trainer": "online_rl", "rl": {"algorithm": "gspo", "loss_agg": "token-mean"}}, "x"
        )


class HalfTask(SevenTask):
    """Reward 1 for odd prompts only when a '7' appears: many groups are all-zero."""

    def verify(self, row, completion):
        return 1.0 if int(row["prompt"][:-1]) % 2 and "7" in completion else 0.0


def test_dapo_dynamic_sampling_keeps_only_groups_with_variance(tmp_path):
    r = _recipe(tmp_path, "dapo", max_sampling_rounds=3)
    t = OnlineRLTrainer(r, task=HalfTask())
    roll, stats = t.collect()
    assert stats["dynamic_sampling/rounds"] >= 1
    if roll:
        groups = roll.rewards.view(-1, 8)
        assert (groups.std(-1) > 0).all()
        assert len(groups) == stats["batch/groups"] <= 4
        assert 0 < stats["dynamic_sampling/kept_frac"] <= 1


def test_overlong_shaping_and_mask_truncated(tmp_path):
    r = _recipe(tmp_path, "dapo", overlong_cache=2, dynamic_sampling=False, mask_truncated=True)
    t = OnlineRLTrainer(r, task=SevenTask())
    roll, _ = t.collect()
    lengths = [len(c) for c in roll.completion_ids]
    for n, pen in zip(lengths, roll.shaping.tolist(), strict=True):
        expected = 0.0 if n <= 2 else (2 - n) / 2  # max_len 4, cache 2
        assert pen == pytest.approx(expected)
    metrics, _ = t.train_step()
    assert "reward/overlong" in metrics


def test_reward_composition_weights_and_components():
    task = SevenTask()
    specs = [
        RewardSpec(type="task", weight=2.0),
        RewardSpec(type="function", fn="rewards_plugin:answer_column", name="ans"),
        RewardSpec(type="format", weight=0.5),
    ]
    sys.path.insert(0, str(Path(__file__).parent))
    comp = RewardComposer(specs, task)
    rows = [{"prompt": "1:", "answer": "7"}, {"prompt": "2:", "answer": "9"}]
    res = comp(["1:", "2:"], ["x7", "<think>a</think><answer>9</answer>"], rows, [2, 30])
    assert res.components == {"task": [1.0, 0.0], "ans": [1.0, 1.0], "format": [0.0, 1.0]}
    assert res.total == [3.0, 1.5]


def test_reward_errors_raise_or_zero():
    sys.path.insert(0, str(Path(__file__).parent))
    rows = [{"prompt": "1:", "answer": "7"}]
    short = RewardComposer([RewardSpec(type="function", fn="rewards_plugin:wrong_length")])
    with pytest.raises(RewardError, match="returned 1 values for 2 completions"):
        short(["1:", "1:"], ["a", "b"], rows * 2, [1, 1])
    boom = RewardComposer([RewardSpec(type="function", fn="rewards_plugin:boom")])
    with pytest.raises(RewardError, match="reward server down") as e:
        boom(["1:"], ["a7"], rows, [2])
    assert "prompt: '1:'" in str(e.value) and "completion: 'a7'" in str(e.value)
    zero = RewardComposer([RewardSpec(type="function", fn="rewards_plugin:boom")], on_error="zero")
    res = zero(["1:"], ["a"], rows, [1])
    assert res.total == [0.0] and res.errors == 1
    with pytest.raises(RewardError, match="module:function"):
        RewardComposer([RewardSpec(type="function", fn="nocolon")])
    with pytest.raises(RewardError, match="unique"):
        RewardComposer([RewardSpec(type="task"), RewardSpec(type="task")], SevenTask())


def test_custom_function_reward_trains(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    r = recipe_from_dict(
        {
            "name": "fn",
            "output_dir": str(tmp_path),
            "trainer": "online_rl",
            "model": {"name_or_path": "tiny"},
            "train": {"steps": 25, "lr": 3e-3, "batch_size": 4},
            "rl": {"algorithm": "grpo", "kl_coef": 0.0},
            "sampling": {"max_new_tokens": 4},
            "rewards": [{"type": "function", "fn": "rewards_plugin:has_seven"}],
            "eval": {"n": 4},
            "logging": {"progress": False, "tensorboard": False},
        },
        "test",
    )
    OnlineRLTrainer(r, task=SevenTask()).train()
    rows = read_metrics(tmp_path / "fn")
    assert "reward/function" in rows[0]
    assert sum(x["reward/mean"] for x in rows[-5:]) > sum(x["reward/mean"] for x in rows[:5]) + 1


def test_train_subset_is_one_shot(tmp_path):
    r = recipe_from_dict(
        {
            "name": "oneshot",
            "output_dir": str(tmp_path),
            "trainer": "online_rl",
            "model": {"name_or_path": "tiny"},
            "train": {"steps": 1, "batch_size": 3},
            "rl": {"algorithm": "grpo", "kl_coef": 0.0, "group_size": 2},
            "sampling": {"max_new_tokens": 2},
            "data": {"train_subset": 1},
            "logging": {"progress": False, "tensorboard": False},
        },
        "test",
    )
    t = OnlineRLTrainer(r, task=SevenTask())
    assert len(t.rows) == 1
    roll, _ = t.collect()
    assert {row["prompt"] for row in roll.rows} == {"0:"}
    with pytest.raises(ValueError, match="train_subset=99"):
        OnlineRLTrainer(
            r.model_copy(update={"data": r.data.model_copy(update={"train_subset": 99})}),
            task=SevenTask(),
            overwrite=True,
        )


def test_rows_with_messages_use_the_chat_template(tmp_path):
    class ChatTask(SevenTask):
        def train(self):
            return [
                {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "answer": "7"}
            ]

    r = _recipe(tmp_path, "grpo", kl_coef=0.0)
    t = OnlineRLTrainer(r, task=ChatTask())
    assert t.rows[0]["prompt"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_skipping_zero_advantage_rows_keeps_the_gradient_exact(tmp_path):
    """Rows with advantage 0 are not run through the model; the gradient must equal the one
    computed with every row (forced here by a vanishing KL term that keeps all rows)."""

    def grads(sub, **rl):
        r = _recipe(tmp_path / sub, "grpo", **rl)
        r = r.model_copy(
            update={
                "train": r.train.model_copy(update={"batch_size": 8}),
                "sampling": r.sampling.model_copy(update={"max_new_tokens": 10}),
            }
        )
        t = OnlineRLTrainer(r, task=SevenTask())
        out = {}

        def capture(step_scheduler=True):
            out["g"] = torch.cat(
                [p.grad.flatten() for p in t.model.parameters() if p.grad is not None]
            )
            t.optimizer.zero_grad(set_to_none=True)
            return {"grad_norm": 0.0, "lr": 0.0}

        t.optimizer_step = capture
        metrics, _ = t.train_step()
        return out["g"], metrics

    skipped, m1 = grads("a", kl_coef=0.0)
    full, m2 = grads("b", kl_coef=1e-12)
    assert 0 < m1["batch/trained_rows"] < m2["batch/trained_rows"] == 64
    assert skipped.abs().max() > 0
    torch.testing.assert_close(skipped, full, atol=1e-7, rtol=1e-5)
