from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import pytest
import torch
from transformers import AutoModelForCausalLM

from signalrl.config import recipe_from_dict
from signalrl.logging import read_metrics
from signalrl.trainers import run_recipe
from signalrl.trainers.online_rl import OnlineRLTrainer
from signalrl.trainers.sft import SFTTrainer


def _sft(tmp_path, **over):
    data = {
        "name": "sft",
        "output_dir": str(tmp_path),
        "trainer": "sft",
        "model": {"name_or_path": "tiny"},
        "task": {"name": "arithmetic", "digits": 1, "n_train": 200, "n_test": 8},
        "train": {"steps": 6, "lr": 2e-3, "batch_size": 16, "micro_batch_size": 8},
        "sampling": {"max_new_tokens": 3},
        "eval": {"every": 3, "k": 2},
        "logging": {"progress": False, "samples_every": 0},
        "checkpoint": {"every": 2, "keep": 2},
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return recipe_from_dict(data, "test")


def test_sft_run_dir_layout_and_learning(tmp_path):
    r = _sft(tmp_path, train={"steps": 40})
    out = run_recipe(r)
    run = tmp_path / "sft"
    for name in ("config.yaml", "metrics.jsonl", "final/model.safetensors", "final/tokenizer.json"):
        assert (run / name).exists(), name
    assert list(run.glob("events.*")), "tensorboard events"
    ck = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ck == ["step-36", "step-38"], ck  # keep=2, final step goes to final/
    rows = read_metrics(run)
    assert [x["step"] for x in rows] == list(range(1, 41))
    first, last = rows[0]["loss"], sum(x["loss"] for x in rows[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert "eval/accuracy" in rows[-1] and "eval/pass@2" in rows[-1]
    assert out["model"] == str(run / "final")
    AutoModelForCausalLM.from_pretrained(run / "final")


def test_grad_accumulation_matches_one_batch(tmp_path):
    def first_step_grads(micro):
        r = _sft(tmp_path / f"m{micro}", train={"steps": 1, "micro_batch_size": micro})
        t = SFTTrainer(r)
        grads = {}

        def capture(step_scheduler=True):
            grads["g"] = torch.cat([p.grad.flatten() for p in t.model.parameters()])
            return {"grad_norm": 0.0, "lr": 0.0}

        t.optimizer_step = capture
        t.train_step()
        return grads["g"]

    full, accumulated = first_step_grads(16), first_step_grads(4)
    assert full.abs().max() > 1e-3
    torch.testing.assert_close(accumulated, full, atol=1e-6, rtol=1e-4)


def test_resume_continues_exactly(tmp_path):
    full = _sft(tmp_path / "a", train={"steps": 6})
    run_recipe(full)
    part = _sft(tmp_path / "b", train={"steps": 4})
    run_recipe(part)  # leaves checkpoints/step-2 (and final at 4)
    resumed = _sft(tmp_path / "b", train={"steps": 6})
    t = SFTTrainer(resumed, resume=True)
    assert t.step == 2
    t.train()
    a = read_metrics(tmp_path / "a" / "sft")
    b = read_metrics(tmp_path / "b" / "sft")
    assert [x["step"] for x in b] == list(range(1, 7))
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)


def test_existing_run_dir_is_not_clobbered(tmp_path):
    r = _sft(tmp_path, train={"steps": 1})
    run_recipe(r)
    with pytest.raises(FileExistsError, match="--resume"):
        run_recipe(r)
    run_recipe(r, overwrite=True)


@dataclass
class SevenTask:
    """A tiny verifiable task: the reward is 1 when the completion contains a '7'."""

    name: str = "seven"
    rows: list = field(
        default_factory=lambda: [{"prompt": f"{i}:", "answer": "7"} for i in range(20)]
    )

    def train(self):
        return self.rows

    def test(self):
        return self.rows[:8]

    def verify(self, row, completion):
        return 1.0 if "7" in completion else 0.0


def _grpo(tmp_path, **over):
    data = {
        "name": "grpo",
        "output_dir": str(tmp_path),
        "trainer": "online_rl",
        "seed": 0,
        "model": {"name_or_path": "tiny"},
        "train": {"steps": 30, "lr": 3e-3, "batch_size": 4},
        "rl": {"group_size": 8, "kl_coef": 0.0},
        "sampling": {"max_new_tokens": 4},
        "eval": {"k": 0, "n": 4},
        "logging": {"progress": False, "samples_every": 5, "samples_n": 2},
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return recipe_from_dict(data, "test")


def test_grpo_learns_a_tiny_task(tmp_path):
    """From a random tiny model (reward ~ 4 tokens x 1/100), GRPO must raise the reward."""
    torch.manual_seed(0)
    random.seed(0)
    t = OnlineRLTrainer(_grpo(tmp_path), task=SevenTask())
    t.train()
    rows = read_metrics(tmp_path / "grpo")
    early = sum(r["reward/mean"] for r in rows[:5]) / 5
    late = sum(r["reward/mean"] for r in rows[-5:]) / 5
    assert late > early + 0.4, (early, late)
    for key in (
        "reward/mean",
        "reward/std",
        "frac_zero_std_groups",
        "entropy",
        "clip_frac/low",
        "clip_frac/high",
        "completion/mean_length",
        "completion/truncated_frac",
        "grad_norm",
        "lr",
        "models/held",
    ):
        assert key in rows[0], key
    assert rows[0]["models/held"] == 1.0  # beta = 0: no reference model
    samples = [
        json.loads(x) for x in (tmp_path / "grpo" / "samples.jsonl").read_text().splitlines()
    ]
    assert samples and {"prompt", "completion", "reward", "advantage"} <= set(samples[0])


def test_grpo_with_kl_and_inner_epochs(tmp_path):
    r = _grpo(
        tmp_path,
        train={"steps": 3, "micro_batch_size": 8},
        rl={"kl_coef": 0.1, "mu": 2, "clip_high": 0.28},
    )
    t = OnlineRLTrainer(r, task=SevenTask())
    assert t.ref_model is not None
    t.train()
    rows = read_metrics(tmp_path / "grpo")
    assert rows[0]["models/held"] == 2.0
    assert all(x["kl"] >= 0 for x in rows)
    assert rows[-1]["kl"] > 0  # the policy moved away from the reference
    assert any(x["ratio/max"] != 1.0 for x in rows)  # mu=2: the second epoch sees ratios != 1


def test_nan_reward_fails_with_prompt_and_completion(tmp_path):
    class Bad(SevenTask):
        def verify(self, row, completion):
            return float("nan")

    t = OnlineRLTrainer(_grpo(tmp_path, train={"steps": 1}), task=Bad())
    with pytest.raises(ValueError, match=r"returned nan \(not a finite number\)\n  prompt: '\d+:'"):
        t.train_step()
