"""Rollout/train mismatch diagnostics and importance-sampling corrections, by hand."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from signalrl.losses.mismatch import is_weights, mismatch_metrics, off_policy_sequence_mask

sys.path.insert(0, str(Path(__file__).parent))

# two sequences of 3 tokens, the second with 2 tokens; d = train - sampler
TRAIN = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
SAMPLER = torch.tensor([[-1.5, -2.0, -0.1], [-0.2, -1.1, 9.0]])  # last one is padding
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
D = [[0.5, 0.0, -0.4], [-0.8, 0.1]]


def test_mismatch_metrics_by_hand():
    m = mismatch_metrics(TRAIN, SAMPLER, MASK)
    flat = [0.5, 0.0, -0.4, -0.8, 0.1]
    assert m["sampling/logp_diff/mean"] == pytest.approx(sum(abs(x) for x in flat) / 5)
    assert m["sampling/logp_diff/max"] == pytest.approx(0.8)
    assert m["sampling/is_ratio/min"] == pytest.approx(math.exp(-0.8))
    assert m["sampling/is_ratio/max"] == pytest.approx(math.exp(0.5))
    assert m["sampling/is_ratio/mean"] == pytest.approx(sum(math.exp(x) for x in flat) / 5)
    empty = mismatch_metrics(TRAIN, SAMPLER, torch.zeros_like(MASK))
    assert empty["sampling/is_ratio/mean"] == 1.0 and empty["sampling/logp_diff/max"] == 0.0


def test_token_truncate_and_mask_by_hand():
    w, m = is_weights(TRAIN, SAMPLER, MASK, "token_truncate", cap=1.5)
    want = [[min(math.exp(0.5), 1.5), 1.0, math.exp(-0.4)], [math.exp(-0.8), math.exp(0.1)]]
    torch.testing.assert_close(w[0], torch.tensor(want[0]))
    torch.testing.assert_close(w[1, :2], torch.tensor(want[1]))
    assert m["is/frac_truncated"] == pytest.approx(1 / 5)  # exp(0.5) = 1.65 > 1.5
    w, m = is_weights(TRAIN, SAMPLER, MASK, "token_mask", low=0.6, high=1.5)
    # exp(0.5)=1.65 > 1.5 and exp(-0.8)=0.45 < 0.6 are dropped
    torch.testing.assert_close(w * MASK, torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]]))
    assert m["is/frac_masked"] == pytest.approx(2 / 5)
    ones, _ = is_weights(TRAIN, SAMPLER, MASK, "none")
    assert torch.equal(ones, torch.ones_like(TRAIN))


def test_sequence_corrections_by_hand():
    w, _ = is_weights(TRAIN, SAMPLER, MASK, "sequence_truncate", cap=10.0)
    # sequence ratios: exp(0.5 + 0 - 0.4) = exp(0.1), exp(-0.8 + 0.1) = exp(-0.7)
    torch.testing.assert_close(w[0], torch.full((3,), math.exp(0.1)))
    torch.testing.assert_close(w[1, :2], torch.full((2,), math.exp(-0.7)))
    w, m = is_weights(TRAIN, SAMPLER, MASK, "sequence_mask", low=0.6, high=2.0)
    torch.testing.assert_close(w * MASK, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert m["is/frac_masked"] == pytest.approx(2 / 5)


def test_weights_are_detached_and_bad_modes_fail():
    t = TRAIN.clone().requires_grad_(True)
    w, _ = is_weights(t, SAMPLER, MASK, "token_truncate")
    assert not w.requires_grad
    with pytest.raises(ValueError, match="unknown is_correction 'tis'"):
        is_weights(TRAIN, SAMPLER, MASK, "tis")
    with pytest.raises(ValueError, match="low <= 1 <= high"):
        is_weights(TRAIN, SAMPLER, MASK, "token_mask", low=1.2)


def test_off_policy_sequence_mask_drops_negative_far_sequences():
    # k1 KL(sampler || trainer) per token = -d: row 0 mean -(0.1)/3 < 0, row 1 mean 0.35
    adv = torch.tensor([-1.0, -1.0])
    keep, frac = off_policy_sequence_mask(TRAIN, SAMPLER, MASK, adv, bound=0.3)
    assert keep.flatten().tolist() == [1.0, 0.0] and frac == 0.5
    keep, _ = off_policy_sequence_mask(TRAIN, SAMPLER, MASK, torch.tensor([-1.0, 1.0]), 0.3)
    assert keep.flatten().tolist() == [1.0, 1.0]  # a positive advantage is never masked


def test_correction_brings_the_off_policy_gradient_to_the_on_policy_one():
    """A controlled mismatch: the sampler draws the first completion token at temperature
    1.1, the trainer's policy is temperature 1.0. Over every possible token (an exact
    expectation, no sampling noise) the REINFORCE gradient with sequence-level IS equals the
    on-policy gradient, truncated IS is closer to it than no correction, and no correction
    is biased."""
    from signalrl.data.collate import build_batch
    from signalrl.models import load_model
    from signalrl.models.logprobs import completion_logps

    model, tok = load_model("tiny", seed=0)
    with torch.no_grad():  # sharper logits (the final norm's scale), so the temperature matters
        model.model.norm.weight.mul_(30.0)
    prompt = tok("12+3=", add_special_tokens=False)["input_ids"]
    vocab = model.config.vocab_size
    batch = build_batch([prompt] * vocab, [[y] for y in range(vocab)], tok.pad_token_id)
    reward = torch.tensor([float(y % 3 == 0) for y in range(vocab)])

    def logps() -> torch.Tensor:
        return completion_logps(model, batch)  # (V, 1) log p(y | prompt) at temperature 1

    def gradient(objective: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        objective.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
        log_q = torch.log_softmax(logits / 1.1, -1)  # the sampler's distribution
        q = log_q.exp()
    lp = logps()
    on_policy = gradient((lp[:, 0].exp() * reward).sum())  # grad E_p[r]
    baseline = float((q * reward).sum())  # the group mean the sampler's samples give
    sampler_lp = log_q[:, None]
    mask = torch.ones_like(lp)

    def estimate(mode: str, cap: float = 100.0) -> torch.Tensor:
        lp = logps()
        w, _ = is_weights(lp, sampler_lp, mask, mode, cap=cap)
        return gradient((q[:, None] * w * (reward - baseline)[:, None] * lp).sum())

    def error(g: torch.Tensor) -> float:
        return float((g - on_policy).norm() / on_policy.norm())

    ratio = (lp.detach()[:, 0] - log_q).exp()
    cap = 1.0 + 0.5 * (float(ratio.max()) - 1.0)  # truncates the most under-sampled tokens
    uncorrected, exact = error(estimate("none")), error(estimate("sequence_truncate"))
    truncated = error(estimate("token_truncate", cap=cap))
    assert exact < 1e-4, exact
    assert uncorrected > 0.05, uncorrected
    assert exact < truncated < uncorrected, (exact, truncated, uncorrected)


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_online_rl_logs_the_mismatch_and_trains_with_a_correction(tmp_path, mode):
    from signalrl.config import recipe_from_dict
    from signalrl.logging import read_metrics
    from signalrl.trainers import run_recipe

    r = recipe_from_dict(
        {
            "name": "is",
            "output_dir": str(tmp_path),
            "trainer": "online_rl",
            "model": {"name_or_path": "tiny", "attn_implementation": "eager"},
            "task": {"name": "arithmetic", "digits": 1, "n_train": 32, "n_test": 4},
            "train": {"steps": 3, "lr": 1e-3, "batch_size": 2},
            "rl": {
                "algorithm": "rloo",
                "group_size": 4,
                "is_correction": mode,
                "off_policy_mask_kl": 0.5,
            },
            "rewards": [{"type": "function", "fn": "user_pieces:char_code_reward"}],
            "sampling": {"max_new_tokens": 3},
            "eval": {"n": 2},
            "logging": {"progress": False, "samples_every": 0, "tensorboard": False},
        },
        "test",
    )
    run_recipe(r)
    rows = read_metrics(tmp_path / "is")
    for row in rows:
        # sampler and trainer run the same weights and temperature here: no mismatch
        assert row["sampling/logp_diff/max"] < 1e-3
        assert row["sampling/is_ratio/mean"] == pytest.approx(1.0, abs=1e-3)
        assert math.isfinite(row["loss"]) and "is/frac_off_policy_masked" in row
