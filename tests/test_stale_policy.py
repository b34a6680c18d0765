"""sampling.policy_lag (signalrl.rollout.stale): the sampler generates with the policy of `k`
optimizer steps ago, its generation tokens count as the policy's, a resumed run samples with
the same stale weights, and FSDP2 is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from signalrl.config.recipe import RecipeError, load_recipe
from signalrl.logging import read_metrics
from signalrl.rollout.stale import StalePolicy
from signalrl.trainers import trainer_class

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "doctor-rollout-mismatch.yaml"


def test_the_sampler_holds_the_weights_of_k_steps_ago():
    policy = torch.nn.Linear(2, 1, bias=False)
    stale = StalePolicy(policy, lag=2)
    seen = []
    for step in range(5):  # `step` updates done; the weight after update u is u
        with torch.no_grad():
            policy.weight.fill_(float(step))
        sampler = stale.sampler(policy, step)
        assert stale.sampler(policy, step) is sampler  # a second call in a step: the same
        seen.append(float(sampler.weight[0, 0]))
    assert seen == [0.0, 0.0, 0.0, 1.0, 2.0]  # theta_{max(0, step - 2)}
    assert not any(p.requires_grad for p in stale.model.parameters())
    with pytest.raises(ValueError, match="lag must be >= 1"):
        StalePolicy(policy, lag=0)


def _run(out: Path, *sets: str, resume: bool = False) -> list[dict]:
    r = load_recipe(RECIPE, [f"output_dir={out}", "logging.progress=false", *sets])
    trainer_class("online_rl")(r, resume=resume).train()
    return read_metrics(out / r.name)


def test_stale_sampling_is_counted_and_resumes_exactly(tmp_path: Path):
    whole = _run(tmp_path / "a", "train.steps=6", "sampling.policy_lag=2")
    fresh = _run(tmp_path / "b", "train.steps=1", "sampling.policy_lag=0")
    # step 1 samples with theta_0 either way: the same tokens, counted as the policy's
    assert whole[0]["student/forward_tokens"] == fresh[0]["student/forward_tokens"] > 0
    part = ["train.steps=3", "sampling.policy_lag=2", "checkpoint.every=1"]
    _run(tmp_path / "c", *part)
    resumed = _run(tmp_path / "c", "train.steps=6", *part[1:], resume=True)
    assert [m["step"] for m in resumed] == [m["step"] for m in whole] == list(range(1, 7))
    for a, b in zip(whole, resumed, strict=True):
        gap = "sampling/logp_diff/mean"
        assert b[gap] == pytest.approx(a[gap], rel=1e-5, abs=1e-7), a["step"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7), a["step"]
    assert whole[-1]["sampling/logp_diff/mean"] > 0.05  # the lag is in effect after resume


def test_policy_lag_is_refused_under_fsdp2():
    with pytest.raises(RecipeError, match="sampling.policy_lag needs train.parallel none or ddp"):
        load_recipe(RECIPE, ["train.parallel=fsdp2"])


def test_bf16_sampling_opens_a_small_gap(tmp_path: Path):
    """sampling.precision: bf16 samples under bf16 autocast for the fp32 trainer: a gap far
    above fp32's rounding (about 1e-7) but, on the tiny preset, far under the doctor's 0.1."""
    sets = ["train.steps=2", "sampling.policy_lag=0"]
    bf16 = _run(tmp_path / "a", *sets, "sampling.precision=bf16")
    fp32 = _run(tmp_path / "b", *sets)
    gap = "sampling/logp_diff/mean"
    assert all(m[gap] < 1e-5 for m in fp32)
    assert all(1e-4 < m[gap] < 0.1 for m in bf16)
