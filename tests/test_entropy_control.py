"""Entropy control (`rl.entropy_coef`, `rl.entropy_target`, `rl.entropy_coef_lr`): the bonus
term, the entropy of the training forward (values and gradients against a direct computation,
plain and chunked LM head), the adaptive coefficient, its exact resume, a learning check;
and Clip-Cov's keyed random pick."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import signalrl.losses.policy_frontier as pf
import signalrl.models.logprobs as logprobs_mod
import signalrl.rollout.noise as noise
from signalrl.config import RecipeError, recipe_from_dict
from signalrl.data.collate import build_batch
from signalrl.logging.run import read_metrics
from signalrl.losses.entropy import (
    adapt_entropy_coef,
    entropy_bonus,
    hidden_token_logprobs_entropy,
    token_logprobs_entropy,
)
from signalrl.losses.policy import PolicyLossInput, entropy_from_logits, importance_ratio
from signalrl.losses.policy_frontier import clip_cov, clip_cov_key, token_priorities
from signalrl.models import load_model
from signalrl.models.logprobs import (
    completion_logps,
    completion_logps_entropy,
    shared_prefix_logps,
    shared_prefix_logps_entropy,
)
from signalrl.trainers import trainer_class

sys.path.insert(0, str(Path(__file__).parent))

# -- the pure functions ------------------------------------------------------------------------


def test_entropy_bonus_hand_computed() -> None:
    ent = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # token-mean: (1 + 2 + 3 + 0.5) / 4 = 1.625; times -0.2
    assert float(entropy_bonus(ent, mask, 0.2, "token-mean")) == pytest.approx(-0.325)
    # seq-mean-token-mean: (2 + 0.5) / 2 = 1.25; times -0.2
    assert float(entropy_bonus(ent, mask, 0.2, "seq-mean-token-mean")) == pytest.approx(-0.25)
    # seq-mean-token-sum-norm, max_len 4: (6 / 4 + 0.5 / 4) / 2 = 0.8125
    got = entropy_bonus(ent, mask, 1.0, "seq-mean-token-sum-norm", max_len=4)
    assert float(got) == pytest.approx(-0.8125)
    assert float(entropy_bonus(ent, mask, 0.0)) == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        entropy_bonus(ent, mask, -0.1)
    with pytest.raises(ValueError, match="differ"):
        entropy_bonus(ent, mask[:, :2], 0.1)


def test_adaptive_coefficient_hand_computed() -> None:
    # under the target: up by lr * (target - H) = 0.2 * 0.5
    assert adapt_entropy_coef(0.1, 0.5, 1.0, 0.2) == pytest.approx(0.2)
    # above it: down, but never below 0
    assert adapt_entropy_coef(0.1, 1.25, 1.0, 0.2) == pytest.approx(0.05)
    assert adapt_entropy_coef(0.1, 3.0, 1.0, 0.2) == 0.0
    assert adapt_entropy_coef(0.1, float("nan"), 1.0, 0.2) == 0.1
    with pytest.raises(ValueError, match="lr > 0"):
        adapt_entropy_coef(0.1, 0.5, 1.0, 0.0)


def test_logprobs_and_entropy_from_one_pass_equal_the_separate_functions() -> None:
    """Values and gradients of both outputs equal `token_logprobs`-style and
    `entropy_from_logits(z / tau)`, from logits and from hidden states through a head."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    head = nn.Linear(8, 11)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    tau = 0.7
    z = head(hidden) / tau
    want_lp = torch.log_softmax(z, -1).gather(-1, ids[..., None]).squeeze(-1)
    want_h = entropy_from_logits(z)
    direct_h = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    torch.testing.assert_close(want_h, direct_h, atol=1e-6, rtol=0)
    w = torch.linspace(-1, 1, 10).view(2, 5)
    (g_lp,) = torch.autograd.grad((want_lp * w).sum(), hidden, retain_graph=True)
    (g_h,) = torch.autograd.grad((want_h * w).sum(), hidden)
    for lp, h in (
        token_logprobs_entropy(head(hidden), ids, chunk_size=3, temperature=tau),
        hidden_token_logprobs_entropy(hidden, head, ids, chunk_size=3, tau=tau),
    ):
        torch.testing.assert_close(lp, want_lp, atol=1e-6, rtol=0)
        torch.testing.assert_close(h, want_h, atol=1e-6, rtol=0)
        (a,) = torch.autograd.grad((lp * w).sum(), hidden, retain_graph=True)
        (b,) = torch.autograd.grad((h * w).sum(), hidden)
        torch.testing.assert_close(a, g_lp, atol=1e-6, rtol=0)
        torch.testing.assert_close(b, g_h, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="integers"):
        token_logprobs_entropy(head(hidden), ids.float())


# -- the training forward ------------------------------------------------------------------------

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
ROWS = torch.tensor([0, 0, 1, 2, 2])
COMPS = [[20, 21, 22], [23, 24], [25, 26, 27, 28], [29], [30, 31, 32, 33, 34]]


def _grads(model: nn.Module, out: torch.Tensor) -> list[torch.Tensor]:
    weights = torch.linspace(-1.0, 1.0, out.numel()).view_as(out)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weights).sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


@pytest.mark.parametrize("path", ["plain", "chunked"])
def test_bonus_gradient_is_the_true_entropy_gradient(monkeypatch, path):
    """The entropies of `completion_logps_entropy` / `shared_prefix_logps_entropy` and the
    gradient of the bonus through them equal a direct computation from the whole model's
    logits (`-sum p log p` of `softmax(logits / tau)`), with the plain forward and with the
    chunked LM head (3 positions a chunk); the log-probs are those of the plain functions."""
    model, tok = load_model("tiny", seed=1)
    model.train()
    if path == "chunked":
        monkeypatch.setattr(logprobs_mod, "LOGIT_CHUNK_ELEMENTS", 3 * len(tok))
    batch = build_batch([PROMPTS[i] for i in ROWS.tolist()], COMPS, tok.pad_token_id)
    assert (logprobs_mod.chunked_head(model, 25) is not None) == (path == "chunked")
    t, tau, mask = batch.completion_ids.shape[1], 0.7, batch.completion_mask
    logits = (
        model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits[:, -(t + 1) : -1]
        / tau
    )
    true_h = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1) * mask
    want_bonus = -0.3 * (true_h * mask).sum() / mask.sum()
    want_grads = _grads(model, want_bonus[None])
    lp1, h1 = completion_logps_entropy(model, batch, temperature=tau)
    lp2, h2 = shared_prefix_logps_entropy(
        model, PROMPTS, ROWS, batch.completion_ids, mask, tok.pad_token_id, temperature=tau
    )
    plain = completion_logps(model, batch, temperature=tau)
    shared = shared_prefix_logps(
        model, PROMPTS, ROWS, batch.completion_ids, mask, tok.pad_token_id, temperature=tau
    )
    torch.testing.assert_close(lp1, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(lp2, shared, atol=1e-5, rtol=0)
    for h in (h1, h2):
        torch.testing.assert_close(h, true_h, atol=1e-5, rtol=0)
        got = _grads(model, entropy_bonus(h, mask, 0.3, "token-mean")[None])
        for a, b in zip(got, want_grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(float(g.abs().sum()) > 0 for g in want_grads)


# -- the trainer -----------------------------------------------------------------------------

COMMON = {
    "trainer": "online_rl",
    "model": {"name_or_path": "tiny", "attn_implementation": "eager"},
    "task": {"name": "arithmetic", "digits": 1, "n_train": 64, "n_test": 4},
    "sampling": {"max_new_tokens": 3},
    "eval": {"n": 2},
    "logging": {"progress": False, "samples_every": 0, "tensorboard": False},
}


def _recipe(tmp_path: Path, name: str, rl: dict, **over: dict) -> object:
    data = {"name": name, "output_dir": str(tmp_path), **COMMON}
    data["train"] = {"steps": 3, "lr": 5e-3, "batch_size": 2, **over.pop("train", {})}
    data["rl"] = {"algorithm": "grpo", "group_size": 4, "kl_coef": 0.0, **rl}
    data.update(over)
    return recipe_from_dict(data, "test")


def _run(recipe: object, resume: bool = False) -> list[dict]:
    trainer_class("online_rl")(recipe, resume=resume).train()
    return read_metrics(Path(recipe.output_dir) / recipe.name)  # type: ignore[attr-defined]


def test_entropy_target_needs_its_rate() -> None:
    for rl in ({"entropy_target": 1.0}, {"entropy_coef_lr": 0.1}):
        with pytest.raises(RecipeError, match="entropy_target and rl.entropy_coef_lr"):
            recipe_from_dict({"name": "x", **COMMON, "rl": rl}, "bad.yaml")
    with pytest.raises(RecipeError, match="entropy_coef"):
        recipe_from_dict({"name": "x", **COMMON, "rl": {"entropy_coef": -1.0}}, "bad.yaml")


def test_adaptive_coefficient_moves_towards_the_target(tmp_path):
    """A target far above the entropy raises the coefficient every step; a target of 0
    lowers it to 0. The logged `actor/entropy_coef` is the one each step used."""
    up = _run(_recipe(tmp_path, "up", {"entropy_target": 50.0, "entropy_coef_lr": 0.01}))
    coefs = [m["actor/entropy_coef"] for m in up]
    assert coefs[0] == 0.0 and all(b > a for a, b in zip(coefs, coefs[1:], strict=False))
    h = up[0]["actor/entropy"]
    assert coefs[1] == pytest.approx(0.01 * (50.0 - h), rel=1e-6)
    down = _run(
        _recipe(
            tmp_path,
            "down",
            {"entropy_coef": 0.02, "entropy_target": 0.0, "entropy_coef_lr": 0.005},
        )
    )
    coefs = [m["actor/entropy_coef"] for m in down]
    assert coefs[0] == 0.02 and coefs[1] < 0.02 and coefs[-1] == 0.0
    assert all(0 < m["actor/entropy"] < math.log(200) for m in down)


def test_resume_restores_the_coefficient_exactly(tmp_path):
    rl = {"entropy_coef": 0.01, "entropy_target": 50.0, "entropy_coef_lr": 0.01}
    whole = _run(_recipe(tmp_path, "whole", rl, train={"steps": 4}))
    _run(_recipe(tmp_path, "part", rl, train={"steps": 2}, checkpoint={"every": 1}))
    part = _run(
        _recipe(tmp_path, "part", rl, train={"steps": 4}, checkpoint={"every": 1}), resume=True
    )
    assert [m["step"] for m in part] == [m["step"] for m in whole] == [1, 2, 3, 4]
    for a, b in zip(whole, part, strict=True):
        assert b["actor/entropy_coef"] == a["actor/entropy_coef"], a["step"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7), a["step"]
    assert whole[-1]["actor/entropy_coef"] > whole[0]["actor/entropy_coef"]


def test_a_large_bonus_keeps_the_entropy_higher(tmp_path):
    """Seeded, 8 steps of GRPO on one-digit addition from a sharpened tiny model (final norm
    x6: sampler entropy 3.05 nats, the maximum is log 101 = 4.6): with coef 0 the entropy
    stays near 3.1, with coef 1 the bonus lifts it (measured: last 3 steps 3.14 vs 3.70). The
    training forward's entropy equals the sampler's at the same policy."""
    model, tok = load_model("tiny", seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(6.0)
    model.save_pretrained(tmp_path / "sharp")
    tok.save_pretrained(tmp_path / "sharp")
    spec = {
        "train": {"steps": 8, "lr": 5e-3, "batch_size": 4},
        "model": {"name_or_path": str(tmp_path / "sharp"), "attn_implementation": "eager"},
    }
    runs = {
        c: _run(_recipe(tmp_path, f"c{c}", {"entropy_coef": c, "loss_agg": "token-mean"}, **spec))
        for c in (0.0, 1.0)
    }
    assert runs[0.0][0]["entropy"] == pytest.approx(runs[1.0][0]["entropy"])
    last = {c: sum(m["entropy"] for m in r[-3:]) / 3 for c, r in runs.items()}
    assert last[1.0] > last[0.0] + 0.25, last
    assert last[1.0] > runs[1.0][0]["entropy"] + 0.25, last
    for m in runs[1.0]:
        assert m["actor/entropy"] == pytest.approx(m["entropy"], rel=1e-3)
    assert "actor/entropy" not in runs[0.0][0]


# -- Clip-Cov's random pick ---------------------------------------------------------------------


def _cov_input(logps: torch.Tensor, adv: torch.Tensor, frac: float) -> PolicyLossInput:
    lp = logps.clone().requires_grad_(True)
    m = torch.ones_like(lp)
    return PolicyLossInput(
        logps=lp,
        old_logps=logps.clone(),
        ratio=importance_ratio(lp, logps.clone(), m, "token"),
        advantages=adv,
        mask=m,
        keep=m > 0,
        n_tokens=int(m.sum()),
        clip_low=0.2,
        clip_high=0.2,
        cov_frac=frac,
        clip_cov_lb=-100.0,
        clip_cov_ub=100.0,
    )


def _removed(logps: torch.Tensor, adv: torch.Tensor, key: tuple) -> torch.Tensor:
    torch.manual_seed(int(torch.randint(0, 1000, (1,))))  # whatever torch's RNG holds
    with clip_cov_key(*key):
        per_token, _ = clip_cov(_cov_input(logps, adv, 0.25))
    return per_token.detach() == 0


def test_clip_cov_pick_is_keyed_by_seed_step_and_row():
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(6, 10, generator=g) * 3
    adv = torch.randn(6, 1, generator=g).expand(6, 10).contiguous()
    rows = torch.tensor([10, 11, 12, 13, 14, 15])
    a = _removed(logps, adv, (3, 7, 0, rows))
    assert int(a.sum()) == 15  # int(0.25 * 60), every token in the (wide) window
    assert torch.equal(_removed(logps, adv, (3, 7, 0, rows)), a)
    # another step, epoch or seed draws other tokens
    for key in ((3, 8, 0, rows), (3, 7, 1, rows), (4, 7, 0, rows)):
        assert not torch.equal(_removed(logps, adv, key), a), key
    # rows in another order (and their ids with them): the same tokens of the same rows
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.equal(_removed(logps[perm], adv[perm], (3, 7, 0, rows[perm])), a[perm])
    # a row's priorities do not depend on the rest of the batch
    full = token_priorities(3, 7, 0, rows, 10)
    assert torch.equal(token_priorities(3, 7, 0, rows[2:4], 10), full[2:4])
    with pytest.raises(ValueError, match="row ids"):
        _removed(logps, adv, (3, 7, 0, rows[:2]))
    # the hash is the rollout noise's (signalrl.rollout.noise), copied into losses/
    x = torch.randint(0, 2**32, (500,), dtype=torch.long, generator=g)
    assert torch.equal(pf._hash32(x), noise.hash32(x))
    assert torch.equal(pf._mix(x, 11), noise.mix(x, 11))
