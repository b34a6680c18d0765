from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from signalrl.config import RecipeError, load_recipe, recipe_from_dict
from signalrl.logging import read_metrics
from signalrl.models import load_model, save_model
from signalrl.trainers import trainer_class
from signalrl.trainers.distill import DistillTrainer, check_same_vocab
from signalrl.trainers.sft import SFTTrainer

sys.path.insert(0, str(Path(__file__).parent))
from test_trainers import SevenTask  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SevenSFTTask(SevenTask):
    """SevenTask with SFT targets: the completion is '7' (then EOS)."""

    rows: list = field(
        default_factory=lambda: [
            {"prompt": f"{i}:", "answer": "7", "completion": "7"} for i in range(20)
        ]
    )


@pytest.fixture(scope="module")
def seven_teacher(tmp_path_factory) -> str:
    """A tiny model SFT-trained to answer '7': puts most of its mass on '7' then EOS."""
    out = tmp_path_factory.mktemp("teacher")
    r = recipe_from_dict(
        {
            "name": "teacher",
            "output_dir": str(out),
            "trainer": "sft",
            "model": {"name_or_path": "tiny", "seed": 0, "attn_implementation": "eager"},
            "train": {"steps": 30, "lr": 3e-3, "batch_size": 20},
            "logging": {"progress": False, "samples_every": 0, "tensorboard": False},
        },
        "teacher",
    )
    t = SFTTrainer(r, task=SevenSFTTask())
    for _ in range(r.train.steps):
        t.train_step()
    path = out / "seven"
    save_model(t.model, t.tokenizer, path)
    return str(path)


def _recipe(tmp_path, teacher, **over):
    data = {
        "name": "distill",
        "output_dir": str(tmp_path),
        "trainer": "distill",
        "seed": 0,
        "model": {"name_or_path": "tiny", "seed": 1, "attn_implementation": "eager"},
        "train": {"steps": 40, "lr": 5e-3, "batch_size": 4},
        "rl": {"group_size": 4},
        "sampling": {"max_new_tokens": 4},
        "distill": {"teacher": teacher},
        "eval": {"k": 0, "n": 4},
        "logging": {"progress": False, "samples_every": 0, "tensorboard": False},
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return recipe_from_dict(data, "test")


def _mean(xs):
    return sum(xs) / len(xs)


def test_on_policy_distillation_moves_student_to_teacher(tmp_path, seven_teacher):
    r = _recipe(tmp_path, seven_teacher)
    assert r.rl.loss_agg == "token-mean" and not r.rl.uses_reference
    assert trainer_class("distill") is DistillTrainer
    t = DistillTrainer(r, task=SevenTask())
    out = t.train()
    rows = read_metrics(tmp_path / "distill")
    tl = [x["distill/teacher_logp"] for x in rows if "distill/teacher_logp" in x]
    kl = [x["distill/reverse_kl"] for x in rows if "distill/reverse_kl" in x]
    rw = [x["reward/mean"] for x in rows if "reward/mean" in x]
    # observed (seed 0): teacher log-prob -12.2 -> -3.6, reverse KL 7.7 -> 2.5, reward 0.03 -> 0.74
    assert _mean(tl[-5:]) > _mean(tl[:5]) + 4.0, (tl[:5], tl[-5:])
    assert _mean(kl[-5:]) < 0.5 * _mean(kl[:5]), (kl[:5], kl[-5:])
    assert _mean(rw[-5:]) > _mean(rw[:5]) + 0.3, (rw[:5], rw[-5:])
    assert rows[0]["models/held"] == 2
    assert "eval/accuracy" in rows[-1] and "accuracy" in out


def test_advantage_is_negative_reverse_kl(tmp_path):
    # teacher == student (same preset, same seed): reverse KL ~ 0 and advantages ~ 0
    r = _recipe(tmp_path, "tiny", model={"seed": 0})
    t = DistillTrainer(r, task=SevenTask())
    roll, _ = t.collect()
    from signalrl.data.collate import build_batch

    batch = build_batch(roll["prompt_ids"], roll["completions"], t.tokenizer.pad_token_id)
    behaviour = torch.zeros(batch.completion_ids.shape)
    for i, lp in enumerate(roll["sampler_logps"]):
        behaviour[i, : lp.shape[0]] = lp
    slices = t._micro_slices(len(batch))
    adv, _ = t.advantages(roll["rewards"], batch, behaviour, None, slices, roll["prompt_ids"])
    assert adv.shape == batch.completion_ids.shape
    assert adv.abs().max() < 1e-4
    assert abs(t._distill_metrics["distill/reverse_kl"]) < 1e-4
    # with another teacher: the advantage is exactly -(student - teacher) on the tokens
    t.teacher, _ = load_model("tiny", seed=5)
    adv, _ = t.advantages(roll["rewards"], batch, behaviour, None, slices, roll["prompt_ids"])
    teacher = t._logps_no_grad(t.teacher, batch, roll["prompt_ids"], slices)
    mask = batch.completion_mask
    torch.testing.assert_close(adv, -(behaviour - teacher) * mask)
    assert adv.abs().max() > 0.1
    # reward mixing adds reward_weight * group-normalised reward on every token
    t.recipe.distill.reward_weight = 0.5
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0] * 4)
    mixed, _ = t.advantages(rewards, batch, behaviour, None, slices, roll["prompt_ids"])
    g = (rewards.view(-1, 4) - rewards.view(-1, 4).mean(-1, keepdim=True)) / (
        rewards.view(-1, 4).std(-1, keepdim=True) + 1e-6
    )
    torch.testing.assert_close(mixed - adv, 0.5 * g.flatten()[:, None] * mask)


def test_tokenizer_mismatch_names_sizes_and_token(tmp_path):
    model, tok = load_model("tiny")
    n = len(tok.get_vocab())
    tok.add_tokens(["<extra_tok>"])
    model.resize_token_embeddings(len(tok))
    save_model(model, tok, tmp_path / "teacher")
    with pytest.raises(ValueError) as e:
        DistillTrainer(_recipe(tmp_path, str(tmp_path / "teacher")), task=SevenTask())
    msg = str(e.value)
    assert f"{n + 1} (teacher)" in msg and f"{n} (student)" in msg, msg
    assert "'<extra_tok>'" in msg, msg
    _, student = load_model("tiny")
    check_same_vocab(student, load_model("tiny")[1])  # same vocabulary: no error


def test_off_policy_lowers_nll_on_teacher_samples(tmp_path, seven_teacher):
    r = _recipe(tmp_path, seven_teacher, distill={"mode": "off_policy"}, train={"steps": 15})
    t = DistillTrainer(r, task=SevenTask())
    t.train()
    rows = read_metrics(tmp_path / "distill")
    nll = [x["distill/nll"] for x in rows if "distill/nll" in x]
    # observed: 4.6 -> 0.01
    assert _mean(nll[-3:]) < 0.5 * _mean(nll[:3]), nll
    assert rows[0]["models/held"] == 2


def test_distill_recipe_needs_a_teacher(tmp_path):
    with pytest.raises(RecipeError, match="distill.teacher"):
        recipe_from_dict({"trainer": "distill"}, "x")
    with pytest.raises(RecipeError, match="group_size"):
        recipe_from_dict(
            {
                "trainer": "distill",
                "distill": {"teacher": "tiny", "reward_weight": 1.0},
                "rl": {"group_size": 1, "advantage": "reinforce_pp"},
            },
            "x",
        )
    r = recipe_from_dict(
        {"trainer": "distill", "distill": {"teacher": "t"}, "rl": {"beta": 0.1}}, "x"
    )
    assert r.rl.beta == 0.1 and r.rl.loss_agg == "token-mean"
    r = load_recipe(ROOT / "recipes" / "distill-arithmetic.yaml")
    assert r.trainer == "distill" and r.distill.teacher == "runs/teacher-arithmetic/final"
    assert (r.train.batch_size, r.rl.group_size, r.train.steps) == (16, 8, 300)
