"""Hand-computed checks for signalrl.losses: advantages, KL estimators, policy/value losses."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from signalrl.losses.advantages import (
    AdvantageInput,
    compute_advantages,
    gae,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    token_level_rewards,
    whiten,
)
from signalrl.losses.kl import kl_estimate
from signalrl.losses.policy import (
    PolicyLossInput,
    aggregate,
    cispo,
    entropy_from_logits,
    explained_variance,
    importance_ratio,
    policy_loss,
    ppo,
    ratio_metrics,
    token_logprobs,
    top_entropy_mask,
    value_loss,
)


def close(actual: torch.Tensor, expected: list | float, atol: float = 1e-5) -> None:
    exp = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.detach().double(), exp, atol=atol, rtol=1e-5)


# --------------------------------------------------------------------------- group advantages


def test_group_advantages_group_scale_hand_values() -> None:
    # group 1: [1, 0, 1] mean 2/3, unbiased std sqrt(1/3); group 2: [1, 0, 0] mean 1/3
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    a = group_advantages(r, 3, scale="group", eps=0.0)
    close(a, [0.5773503, -1.1547005, 0.5773503, 1.1547005, -0.5773503, -0.5773503])


def test_group_advantages_three_scales_with_constant_group() -> None:
    r = torch.tensor([1.0, 3.0, 0.0, 0.0])  # second group is constant
    # group: [1, 3] -> mean 2, unbiased std sqrt(2)
    close(group_advantages(r, 2, "group", eps=0.0), [-0.7071068, 0.7071068, 0.0, 0.0])
    # batch: unbiased std of [1, 3, 0, 0] is sqrt(6 / 3) = sqrt(2); centred by group mean
    close(group_advantages(r, 2, "batch", eps=0.0), [-0.7071068, 0.7071068, 0.0, 0.0])
    # none (Dr. GRPO): only centred
    close(group_advantages(r, 2, "none"), [-1.0, 1.0, 0.0, 0.0])
    # default eps=1e-6 changes the value slightly but not the zeros
    a = group_advantages(r, 2)
    close(a, [-1 / (math.sqrt(2) + 1e-6), 1 / (math.sqrt(2) + 1e-6), 0.0, 0.0])


def test_group_advantages_batch_differs_from_group() -> None:
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    # batch unbiased std: mean 0.5, var = 6 * 0.25 / 5 = 0.3
    s = math.sqrt(0.3)
    expected = [1 / 3 / s, -2 / 3 / s, 1 / 3 / s, 2 / 3 / s, -1 / 3 / s, -1 / 3 / s]
    close(group_advantages(r, 3, "batch", eps=0.0), expected)


def test_group_advantages_constant_and_singleton_groups_are_zero_not_nan() -> None:
    close(group_advantages(torch.tensor([2.0, 2.0, 2.0]), 3), [0.0, 0.0, 0.0])
    # 0.1 * 3 / 3 != 0.1 in floating point: still exactly zero, even with eps=0
    for scale in ("group", "batch", "none"):
        a = group_advantages(torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64), 3, scale, eps=0.0)
        assert (a == 0).all()
    a = group_advantages(torch.tensor([5.0, -1.0]), 1)
    assert not torch.isnan(a).any()
    close(a, [0.0, 0.0])
    # integer rewards are accepted and give float advantages
    close(group_advantages(torch.tensor([1, 0]), 2, "none"), [0.5, -0.5])


def test_group_advantages_validation() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(torch.zeros(4), 2, scale="std")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="positive int"):
        group_advantages(torch.zeros(4), 0)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=2, max_value=5),
    st.sampled_from(["group", "batch", "none"]),
    st.data(),
)
def test_group_advantages_zero_group_mean(
    n_groups: int, g: int, scale: str, data: st.DataObject
) -> None:
    vals = data.draw(st.lists(st.floats(-10, 10), min_size=n_groups * g, max_size=n_groups * g))
    a = group_advantages(torch.tensor(vals, dtype=torch.float64), g, scale=scale)  # type: ignore[arg-type]
    assert torch.isfinite(a).all()
    assert a.view(n_groups, g).mean(-1).abs().max() < 1e-6


# --------------------------------------------------------------------------- RLOO


def test_rloo_hand_values() -> None:
    close(rloo_advantages(torch.tensor([1.0, 3.0, 0.0, 0.0]), 2), [-2.0, 2.0, 0.0, 0.0])
    # [1, 0, 1]: 1 - mean(0, 1) = 0.5, 0 - mean(1, 1) = -1
    close(rloo_advantages(torch.tensor([1.0, 0.0, 1.0]), 3), [0.5, -1.0, 0.5])
    with pytest.raises(ValueError, match=">= 2"):
        rloo_advantages(torch.tensor([1.0, 0.0]), 1)
    with pytest.raises(ValueError, match="does not divide"):
        rloo_advantages(torch.zeros(3), 2)


# --------------------------------------------------------------------------- token rewards / R++


MASK = torch.tensor(
    [
        [0.0, 1.0, 1.0, 1.0, 0.0],  # prompt token, 3 completion tokens, padding
        [0.0, 0.0, 1.0, 1.0, 1.0],  # 2 prompt tokens, 3 completion tokens
        [0.0, 0.0, 0.0, 0.0, 0.0],  # empty
    ]
)


def test_token_level_rewards_hand_values() -> None:
    kl = torch.arange(15, dtype=torch.float32).view(3, 5) / 10
    out = token_level_rewards(torch.tensor([1.0, 2.0, 3.0]), MASK, kl=kl, kl_coef=0.1)
    close(
        out,
        [
            [0.0, -0.01, -0.02, 1.0 - 0.03, 0.0],
            [0.0, 0.0, -0.07, -0.08, 2.0 - 0.09],
            [0.0, 0.0, 0.0, 0.0, 0.0],
        ],
    )
    close(
        token_level_rewards(torch.tensor([1.0, 2.0, 3.0]), MASK),
        [[0, 0, 0, 1, 0], [0, 0, 0, 0, 2], [0, 0, 0, 0, 0]],
    )
    with pytest.raises(ValueError, match=r"\(3,\)"):
        token_level_rewards(torch.zeros(2), MASK)


def test_whiten_hand_values() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    s = math.sqrt(5 / 3)  # unbiased std of 1, 2, 3, 4
    close(whiten(x, m, eps=0.0), [[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]])
    close(whiten(x, m, shift_mean=False, eps=0.0), [[1 / s, 2 / s, 3 / s], [4 / s, 0.0, 0.0]])


def _reference_reinforce_pp(
    r: list[list[float]], m: list[list[float]], gamma: float
) -> list[list[float]]:
    rets = [[0.0] * len(row) for row in r]
    for i, row in enumerate(r):
        running = 0.0
        for t in reversed(range(len(row))):
            if m[i][t] > 0:
                running = row[t] + gamma * running
                rets[i][t] = running
    vals = [rets[i][t] for i in range(len(r)) for t in range(len(r[i])) if m[i][t] > 0]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return [
        [
            (rets[i][t] - mean) / math.sqrt(var + 1e-8) if m[i][t] > 0 else 0.0
            for t in range(len(row))
        ]
        for i, row in enumerate(r)
    ]


def test_reinforce_pp_hand_values() -> None:
    r = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # gamma=1 returns: [1, 1, -], [2, 2, 2]; mean 1.6, unbiased var 0.3
    s = math.sqrt(0.3)
    a = reinforce_pp_advantages(r, m, gamma=1.0, eps=0.0)
    close(a, [[-0.6 / s, -0.6 / s, 0.0], [0.4 / s, 0.4 / s, 0.4 / s]])


def test_reinforce_pp_matches_reference_loop() -> None:
    g = torch.Generator().manual_seed(0)
    r = torch.randn(3, 6, generator=g)
    m = torch.tensor(
        [
            [0, 0, 1, 1, 1, 0],
            [0, 1, 1, 0, 1, 1],  # a hole in the middle (e.g. a masked tool output)
            [1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.float32,
    )
    r_masked = r.clone()
    r_masked[m == 0] = float("nan")  # masked rewards must never leak in
    for gamma in (1.0, 0.9):
        got = reinforce_pp_advantages(r_masked, m, gamma=gamma)
        close(got, _reference_reinforce_pp(r.tolist(), m.tolist(), gamma), atol=1e-4)


# --------------------------------------------------------------------------- GAE


def _reference_gae(
    r: list[list[float]], v: list[list[float]], m: list[list[float]], gamma: float, lam: float
) -> tuple[list[list[float]], list[list[float]]]:
    adv = [[0.0] * len(row) for row in r]
    ret = [[0.0] * len(row) for row in r]
    for i in range(len(r)):
        idx = [t for t in range(len(r[i])) if m[i][t] > 0]
        last_adv = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            next_v = v[i][idx[k + 1]] if k + 1 < len(idx) else 0.0
            delta = r[i][t] + gamma * next_v - v[i][t]
            last_adv = delta + gamma * lam * last_adv
            adv[i][t] = last_adv
            ret[i][t] = last_adv + v[i][t]
    return adv, ret


def test_gae_hand_values() -> None:
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    v = torch.tensor([[9.0, 0.5, 0.8, 9.0]])  # values at prompt/padding must be ignored
    m = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    # last token: delta = 1 + 0 - 0.8 = 0.2 (no bootstrap); before: delta = 0 + 0.8 - 0.5 = 0.3
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    close(adv, [[0.0, 0.5, 0.2, 0.0]])
    close(ret, [[0.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.5)
    close(adv, [[0.0, 0.3 + 0.5 * 0.2, 0.2, 0.0]])
    close(ret, [[0.0, 0.9, 1.0, 0.0]])


def test_gae_matches_reference_loop_with_prompt_and_padding() -> None:
    g = torch.Generator().manual_seed(1)
    r = torch.randn(3, 7, generator=g)
    v = torch.randn(3, 7, generator=g, requires_grad=True)
    m = torch.tensor(
        [
            [0, 0, 1, 1, 1, 0, 0],
            [0, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 1, 0, 1, 0],
        ],
        dtype=torch.float32,
    )
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8)):
        adv, ret = gae(r, v, m, gamma=gamma, lam=lam)
        ref_adv, ref_ret = _reference_gae(r.tolist(), v.tolist(), m.tolist(), gamma, lam)
        close(adv, ref_adv, atol=1e-5)
        close(ret, ref_ret, atol=1e-5)
        assert not adv.requires_grad and not ret.requires_grad


def test_gae_validation() -> None:
    with pytest.raises(ValueError, match="same shape"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="lam"):
        gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), lam=1.5)


# --------------------------------------------------------------------------- registered estimators


def test_registered_group_estimator_hand_values() -> None:
    r = torch.tensor([1.0, 3.0, 0.0, 0.0])
    mask = torch.ones(4, 2)
    kl = torch.full((4, 2), 5.0)  # group advantages ignore a KL in the reward
    out = compute_advantages(AdvantageInput(r, mask, 2, kl=kl, kl_coef=1.0), "group")
    close(out.advantages, [-1 / (math.sqrt(2) + 1e-6), 1 / (math.sqrt(2) + 1e-6), 0.0, 0.0])
    assert out.returns is None
    none = compute_advantages(AdvantageInput(r, mask, 2, adv_scale="none"), "group")
    close(none.advantages, [-1.0, 1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="group, batch, none"):
        compute_advantages(AdvantageInput(r, mask, 2, adv_scale="std"), "group")


def test_registered_rloo_estimator_subtracts_sequence_kl() -> None:
    r = torch.tensor([1.0, 3.0, 0.0, 0.0])
    mask = torch.ones(4, 2)
    close(compute_advantages(AdvantageInput(r, mask, 2), "rloo").advantages, [-2, 2, 0, 0])
    # sequence KL sums: [0.5, 1.5, 1.0, 0.0]; r - 0.2 * kl = [0.9, 2.7, -0.2, 0.0]
    kl = torch.tensor([[0.25, 0.25], [1.0, 0.5], [1.0, 0.0], [0.0, 0.0]])
    out = compute_advantages(AdvantageInput(r, mask, 2, kl=kl, kl_coef=0.2), "rloo")
    close(out.advantages, [-1.8, 1.8, -0.2, 0.2])
    assert out.returns is None


def test_registered_reinforce_pp_estimator_hand_values() -> None:
    r = torch.tensor([1.0, 2.0])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    kl = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # shaped rewards: [[0, 1, -], [0, -0.5, 2]]; gamma=1 returns [[1, 1], [1.5, 1.5, 2]]
    out = compute_advantages(AdvantageInput(r, m, 1, kl=kl, kl_coef=0.5), "reinforce_pp")
    rets = [1.0, 1.0, 1.5, 1.5, 2.0]
    mu = sum(rets) / 5
    s = math.sqrt(sum((v - mu) ** 2 for v in rets) / 4 + 1e-8)
    close(
        out.advantages,
        [[(1 - mu) / s, (1 - mu) / s, 0.0], [(1.5 - mu) / s, (1.5 - mu) / s, (2 - mu) / s]],
    )
    assert out.returns is None


def test_registered_gae_estimator_hand_values_and_whitening() -> None:
    r = torch.tensor([1.0])
    v = torch.tensor([[9.0, 0.5, 0.8, 9.0]])
    m = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    kl = torch.tensor([[0.0, 0.2, 0.0, 0.0]])
    # token rewards [0, -0.1, 1, 0]: deltas 0.2 (last) and -0.1 + 0.8 - 0.5 = 0.2; lam=0.5
    x = AdvantageInput(r, m, 1, kl=kl, kl_coef=0.5, values=v, gamma=1.0, lam=0.5)
    out = compute_advantages(x, "gae")
    close(out.advantages, [[0.0, 0.2 + 0.5 * 0.2, 0.2, 0.0]])
    assert out.returns is not None
    close(out.returns, [[0.0, 0.8, 1.0, 0.0]])
    white = compute_advantages(AdvantageInput(r, m, 1, values=v, lam=0.5, whiten=True), "gae")
    # without the KL: deltas 0.3 and 0.2 -> raw [0.4, 0.2], whitened +-1/sqrt(2); the returns
    # come from the raw advantages
    close(white.advantages, [[0.0, 1 / math.sqrt(2), -1 / math.sqrt(2), 0.0]], atol=1e-4)
    close(white.returns, [[0.0, 0.9, 1.0, 0.0]])
    with pytest.raises(ValueError, match="values"):
        compute_advantages(AdvantageInput(r, m, 1), "gae")


# --------------------------------------------------------------------------- KL estimators


def test_kl_estimators_hand_values() -> None:
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])  # log r = ref - logp = [-0.5, 1.0]
    close(kl_estimate(logp, ref, "k1"), [[0.5, -1.0]])
    close(kl_estimate(logp, ref, "k2"), [[0.125, 0.5]])
    close(kl_estimate(logp, ref, "k3"), [[math.exp(-0.5) - 0.5, math.e - 2.0]])
    close(kl_estimate(logp, ref), [[0.1065307, 0.7182818]])


def test_kl_k3_clamps_log_ratio_and_has_right_gradient() -> None:
    logp = torch.tensor([[0.0, -100.0]])
    ref = torch.tensor([[-100.0, 0.0]])
    k3 = kl_estimate(logp, ref, "k3")
    assert torch.isfinite(k3).all()
    close(k3, [[math.exp(-20) + 19.0, math.exp(20) - 21.0]], atol=1.0)
    # d k3 / d logp = 1 - exp(ref - logp) for unclamped values
    lp = torch.tensor([[-1.0]], requires_grad=True)
    kl_estimate(lp, torch.tensor([[-1.5]]), "k3").sum().backward()
    assert lp.grad is not None
    close(lp.grad, [[1 - math.exp(-0.5)]])


def test_kl_validation() -> None:
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(torch.zeros(1, 2), torch.zeros(1, 2), "low_var_kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same shape"):
        kl_estimate(torch.zeros(1, 2), torch.zeros(1, 3))


# --------------------------------------------------------------------------- aggregation

PER_TOKEN = torch.tensor(
    [[1.0, 2.0, 3.0, float("nan")], [5.0, 6.0, float("inf"), 0.0], [7.0, 8.0, 9.0, 10.0]]
)
AGG_MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", 17 / 5),
        ("seq-mean-token-mean", (2.0 + 5.5) / 2),  # the empty row is excluded
        ("seq-mean-token-sum", (6.0 + 11.0) / 2),
        ("seq-mean-token-sum-norm", (6.0 / 4 + 11.0 / 4) / 2),
    ],
)
def test_aggregate_modes(mode: str, expected: float) -> None:
    x = PER_TOKEN.clone().requires_grad_(True)
    out = aggregate(x, AGG_MASK, mode, max_len=4)
    close(out, expected)
    out.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad[AGG_MASK == 0] == 0).all()


def test_aggregate_gradients() -> None:
    x = torch.ones(3, 4, requires_grad=True)
    aggregate(x, AGG_MASK, "seq-mean-token-mean").backward()
    assert x.grad is not None
    close(x.grad, [[1 / 6, 1 / 6, 1 / 6, 0], [1 / 4, 1 / 4, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_aggregate_empty_mask_is_zero_with_grad(mode: str) -> None:
    x = torch.randn(2, 3, requires_grad=True)
    out = aggregate(x, torch.zeros(2, 3), mode, max_len=3)
    assert out.requires_grad
    assert out.item() == 0.0
    out.backward()
    assert x.grad is not None and (x.grad == 0).all()


def test_aggregate_validation() -> None:
    with pytest.raises(ValueError, match="requires max_len"):
        aggregate(torch.ones(1, 2), torch.ones(1, 2), "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean"):
        aggregate(torch.ones(1, 2), torch.ones(1, 2), "mean")
    with pytest.raises(ValueError, match="shape mismatch"):
        aggregate(torch.ones(1, 2), torch.ones(1, 3), "token-mean")


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.data())
def test_aggregate_of_ones_is_one(b: int, t: int, data: st.DataObject) -> None:
    bits = data.draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t).filter(any))
    mask = torch.tensor(bits, dtype=torch.float32).view(b, t)
    ones = torch.ones(b, t)
    close(aggregate(ones, mask, "token-mean"), 1.0)
    close(aggregate(ones, mask, "seq-mean-token-mean"), 1.0)
    # seq-mean-token-sum of ones is the mean length of the non-empty rows
    lengths = mask.sum(-1)
    close(aggregate(ones, mask, "seq-mean-token-sum"), lengths[lengths > 0].mean().item())


# --------------------------------------------------------------------------- policy loss

RATIOS = [0.7, 0.9, 1.1, 1.25, 1.35]


def _ppo_inputs(ratios: list[float], rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    old = torch.full((rows, len(ratios)), -2.0)
    logps = (old + torch.log(torch.tensor(ratios))).clone().requires_grad_(True)
    return logps, old


def test_policy_loss_asymmetric_clip_values_metrics_and_grads() -> None:
    logps, old = _ppo_inputs(RATIOS)
    adv = torch.tensor([1.0, -1.0])  # (B,) broadcast over tokens
    mask = torch.ones(2, 5)
    loss, metrics = policy_loss(
        logps, old, adv, mask, clip_low=0.2, clip_high=0.28, agg="token-mean"
    )
    # A > 0: -min(r, clip(r)); only r = 1.35 > 1.28 is clipped (1.25 is not: clip-higher)
    row0 = [-0.7, -0.9, -1.1, -1.25, -1.28]
    # A < 0: max(r, clip(r)); only r = 0.7 < 0.8 is clipped (to 0.8)
    row1 = [0.8, 0.9, 1.1, 1.25, 1.35]
    close(loss, (sum(row0) + sum(row1)) / 10)
    close(loss, 0.017)
    assert metrics["clip_frac/high"] == pytest.approx(1 / 10)
    assert metrics["clip_frac/low"] == pytest.approx(1 / 10)
    assert metrics["ratio/max"] == pytest.approx(1.35, abs=1e-5)
    assert metrics["ratio/min"] == pytest.approx(0.7, abs=1e-5)
    assert metrics["ratio/mean"] == pytest.approx(1.06, abs=1e-5)
    assert "dual_clip_frac" not in metrics
    loss.backward()
    # d(-A r)/d logp = -A r on unclipped tokens, 0 on clipped ones; token-mean divides by 10
    assert logps.grad is not None
    close(
        logps.grad,
        [[-0.07, -0.09, -0.11, -0.125, 0.0], [0.0, 0.09, 0.11, 0.125, 0.135]],
    )


def test_policy_loss_symmetric_clip_clips_more_and_mask_excludes_tokens() -> None:
    logps, old = _ppo_inputs(RATIOS)
    adv = torch.tensor([[1.0] * 5, [-1.0] * 5])  # (B, T) advantages
    mask = torch.ones(2, 5)
    _, metrics = policy_loss(logps, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert metrics["clip_frac/high"] == pytest.approx(2 / 10)  # 1.25 and 1.35
    assert metrics["clip_frac/low"] == pytest.approx(1 / 10)
    mask[1, 0] = 0.0  # drop the low-clipped token
    mask[0, 4] = 0.0
    loss, metrics = policy_loss(logps, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert metrics["clip_frac/low"] == 0.0
    assert metrics["clip_frac/high"] == pytest.approx(1 / 8)
    # seq-mean-token-mean: row0 (-0.7-0.9-1.1-1.2)/4, row1 (0.9+1.1+1.25+1.35)/4
    close(loss, ((-0.7 - 0.9 - 1.1 - 1.2) / 4 + (0.9 + 1.1 + 1.25 + 1.35) / 4) / 2)


def test_policy_loss_on_policy_equals_minus_advantage() -> None:
    logps = torch.full((2, 3), -1.0, requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    loss, metrics = policy_loss(logps, logps.detach(), adv, torch.ones(2, 3))
    close(loss, -(2.0 - 1.0) / 2)
    assert metrics["clip_frac/low"] == metrics["clip_frac/high"] == 0.0
    loss.backward()
    assert logps.grad is not None
    close(logps.grad, [[-2 / 6] * 3, [1 / 6] * 3])


def test_gspo_sequence_ratio_is_geometric_mean_and_clips_per_sequence() -> None:
    old = torch.full((2, 3), -1.0)
    log_r = torch.tensor([[0.1, 0.3, -0.1], [0.2, 0.4, 9.0]])  # 9.0 is masked
    logps = (old + log_r).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([1.0, 1.0])
    loss, metrics = policy_loss(logps, old, adv, mask, ratio_level="sequence")
    s0 = math.exp(0.1)  # geometric mean of exp(0.1), exp(0.3), exp(-0.1)
    s1 = math.exp(0.3)  # geometric mean of exp(0.2), exp(0.4); > 1.2 so clipped
    assert metrics["ratio/min"] == pytest.approx(s0, abs=1e-5)
    assert metrics["ratio/max"] == pytest.approx(s1, abs=1e-5)
    assert metrics["ratio/mean"] == pytest.approx((3 * s0 + 2 * s1) / 5, abs=1e-5)
    assert metrics["clip_frac/high"] == pytest.approx(2 / 5)
    close(loss, (-s0 - 1.2) / 2)
    loss.backward()
    assert logps.grad is not None
    # row 0: d/dlogp_t [(1/2)(1/3) sum_t -s0 exp(logp_t - sg)] = -s0 / 6; row 1 fully clipped
    close(logps.grad, [[-s0 / 6] * 3, [0.0, 0.0, 0.0]])


def test_gspo_token_advantages_use_token_gradient_form() -> None:
    # GSPO-token: per-token advantages with s_{i,t} = sg(s_i) exp(logp_t - sg(logp_t)), so the
    # gradient at token t is -A_t s_i / (|o_i| B) (not the mean of A over the sequence)
    old = torch.full((1, 3), -1.0)
    logps = (old + torch.tensor([[0.1, 0.3, -0.1]])).requires_grad_(True)
    adv = torch.tensor([[1.0, 2.0, 3.0]])
    loss, _ = policy_loss(logps, old, adv, torch.ones(1, 3), ratio_level="sequence")
    s0 = math.exp(0.1)
    close(loss, -s0 * (1.0 + 2.0 + 3.0) / 3)
    loss.backward()
    assert logps.grad is not None
    close(logps.grad, [[-s0 / 3, -2 * s0 / 3, -3 * s0 / 3]])


def test_gspo_requires_sequence_aggregation() -> None:
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        policy_loss(x, x, torch.ones(1), torch.ones(1, 2), ratio_level="sequence", agg="token-mean")
    with pytest.raises(ValueError, match="token, sequence"):
        policy_loss(x, x, torch.ones(1), torch.ones(1, 2), ratio_level="seq")  # type: ignore[arg-type]


def test_dual_clip_caps_negative_advantage_loss() -> None:
    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[5.0, 2.0, 5.0]])).requires_grad_(True)
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3)
    plain, _ = policy_loss(logps, old, adv, mask, agg="token-mean")
    close(plain, (5.0 + 2.0 - 1.2) / 3)
    loss, metrics = policy_loss(logps, old, adv, mask, agg="token-mean", dual_clip=3.0)
    # token 0: max(5, 1.2) = 5 capped at -c A = 3; token 1: 2 < 3 unchanged; token 2: A > 0
    close(loss, (3.0 + 2.0 - 1.2) / 3)
    assert metrics["dual_clip_frac"] == pytest.approx(1 / 3)
    loss.backward()
    assert logps.grad is not None
    close(logps.grad, [[0.0, 2.0 / 3, 0.0]])
    with pytest.raises(ValueError, match="> 1"):
        policy_loss(logps, old, adv, mask, dual_clip=1.0)
    with pytest.raises(ValueError, match="ppo"):
        policy_loss(logps, old, adv, mask, dual_clip=3.0, loss_type="cispo")


def test_cispo_keeps_gradient_on_clipped_tokens() -> None:
    old = torch.full((1, 3), -1.0)
    ratios = [0.5, 1.0, 1.5]
    logps = (old + torch.log(torch.tensor([ratios]))).requires_grad_(True)
    adv = torch.tensor([1.0])
    mask = torch.ones(1, 3)
    loss, metrics = policy_loss(
        logps, old, adv, mask, clip_low=0.2, clip_high=0.28, agg="token-mean", loss_type="cispo"
    )
    w = [0.8, 1.0, 1.28]  # detached clipped IS weights
    lp = [-1.0 + math.log(r) for r in ratios]
    close(loss, -sum(wi * li for wi, li in zip(w, lp, strict=True)) / 3)
    assert metrics["clip_frac/high"] == pytest.approx(1 / 3)
    assert metrics["clip_frac/low"] == pytest.approx(1 / 3)
    loss.backward()
    assert logps.grad is not None
    close(logps.grad, [[-0.8 / 3, -1.0 / 3, -1.28 / 3]])
    # PPO on the same inputs gives zero gradient on the clipped r = 1.5 token
    logps.grad = None
    ppo, _ = policy_loss(logps, old, adv, mask, clip_low=0.2, clip_high=0.28, agg="token-mean")
    ppo.backward()
    close(logps.grad, [[-0.5 / 3, -1.0 / 3, 0.0]])


def test_policy_loss_validation() -> None:
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"\(2,\) or \(2, 3\)"):
        policy_loss(x, x, torch.ones(3), m)
    with pytest.raises(ValueError, match="'grpo'; valid: cispo, clip_cov, dppo_kl"):
        policy_loss(x, x, torch.ones(2), m, loss_type="grpo")
    with pytest.raises(ValueError, match="shape mismatch"):
        policy_loss(x, torch.zeros(2, 4), torch.ones(2), m)


def _input(
    ratio: list[list[float]], adv: list[list[float]], dual_clip: float | None = None
) -> PolicyLossInput:
    """PPO-style inputs with clip range [0.8, 1.2] and every token counting."""
    old = torch.full((len(ratio), len(ratio[0])), -1.0)
    logps = (old + torch.log(torch.tensor(ratio))).requires_grad_(True)
    mask = torch.ones_like(old)
    return PolicyLossInput(
        logps=logps,
        old_logps=old,
        ratio=importance_ratio(logps, old, mask, "token"),
        advantages=torch.tensor(adv),
        mask=mask,
        keep=mask > 0,
        n_tokens=int(mask.sum()),
        clip_low=0.2,
        clip_high=0.2,
        dual_clip=dual_clip,
    )


def test_registered_ppo_per_token_loss_and_metrics() -> None:
    x = _input([[0.5, 1.0, 1.5], [0.5, 1.0, 5.0]], [[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    per_token, metrics = ppo(x)
    # A > 0: -min(r, clip r); A < 0: max(r, clip r)
    close(per_token, [[-0.5, -1.0, -1.2], [0.8, 1.0, 5.0]])
    assert metrics == pytest.approx({"clip_frac/low": 1 / 6, "clip_frac/high": 1 / 6})
    per_token, metrics = ppo(_input([[0.5, 1.0, 5.0]], [[-1.0, -1.0, -1.0]], dual_clip=3.0))
    close(per_token, [[0.8, 1.0, 3.0]])  # 5 capped at -c A = 3
    assert metrics["dual_clip_frac"] == pytest.approx(1 / 3)


def test_registered_cispo_per_token_loss_and_metrics() -> None:
    x = _input([[0.5, 1.0, 1.5]], [[2.0, 2.0, -1.0]])
    per_token, metrics = cispo(x)
    lp = [-1.0 + math.log(r) for r in (0.5, 1.0, 1.5)]
    close(per_token, [[-0.8 * 2 * lp[0], -2 * lp[1], 1.2 * lp[2]]])
    assert metrics == pytest.approx({"clip_frac/low": 1 / 3, "clip_frac/high": 1 / 3})
    per_token.sum().backward()
    assert x.logps.grad is not None
    close(x.logps.grad, [[-1.6, -2.0, 1.2]])  # the clipped weight is detached


def test_importance_ratio_levels_and_ratio_metrics() -> None:
    old = torch.zeros(1, 3)
    logps = torch.tensor([[0.2, -0.2, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    close(importance_ratio(logps, old, mask, "token"), [[math.exp(0.2), math.exp(-0.2), 1.0]])
    close(importance_ratio(logps, old, mask, "sequence"), [[1.0, 1.0, 1.0]])
    m = ratio_metrics(torch.tensor([[0.5, 2.0, 9.0]]), mask > 0)
    assert m == pytest.approx({"ratio/mean": 1.25, "ratio/max": 2.0, "ratio/min": 0.5})
    assert ratio_metrics(torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.bool))["ratio/mean"] == 1


# --------------------------------------------------------------------------- value loss


def test_value_loss_clipping() -> None:
    values = torch.tensor([[1.0, 2.0, 0.0, 5.0]], requires_grad=True)
    old = torch.tensor([[0.8, 1.5, 0.5, 0.0]])
    returns = torch.tensor([[1.5, 2.5, 0.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, metrics = value_loss(values, old, returns, mask, clip=0.2)
    # t0: v inside the clip range -> 0.5*0.25; t1: v_clip = 1.7 -> 0.5*0.64 (clipped);
    # t2: v_clip = 0.3 -> 0.5*0.09 (clipped); t3 masked
    close(loss, (0.125 + 0.32 + 0.045) / 3)
    assert metrics["value/clip_frac"] == pytest.approx(2 / 3)
    loss.backward()
    assert values.grad is not None
    close(values.grad, [[(1.0 - 1.5) / 3, 0.0, 0.0, 0.0]])
    unclipped, metrics = value_loss(values, old, returns, mask, clip=None)
    close(unclipped, 0.5 * (0.25 + 0.25 + 0.0) / 3)
    assert metrics["value/clip_frac"] == 0.0


def test_explained_variance() -> None:
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0, 99.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    assert explained_variance(r, r, m) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(r, 2.5), r, m) == pytest.approx(0.0)
    # V = 2R: var(R - V) = var(R) -> 0; V = R + 1: var(R - V) = 0 -> 1
    assert explained_variance(2 * r, r, m) == pytest.approx(0.0)
    assert explained_variance(r + 1.0, r, m) == pytest.approx(1.0)
    assert math.isnan(explained_variance(r, torch.ones_like(r), m))


# --------------------------------------------------------------------------- from logits


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_token_logprobs_matches_log_softmax_gather(chunk_size: int) -> None:
    g = torch.Generator().manual_seed(2)
    full = torch.randn(2, 6, 11, generator=g).requires_grad_(True)
    logits = full[:, :-1]  # non-contiguous, as in logits[:, :-1] vs ids[:, 1:]
    ids = torch.randint(0, 11, (2, 5), generator=g)
    for temperature in (1.0, 0.7):
        got = token_logprobs(logits, ids, chunk_size=chunk_size, temperature=temperature)
        ref = torch.log_softmax(logits / temperature, -1).gather(-1, ids[..., None])[..., 0]
        assert got.dtype == torch.float32 and got.shape == (2, 5)
        close(got, ref.detach())
        (g1,) = torch.autograd.grad(got.sum(), full)
        (g2,) = torch.autograd.grad(ref.sum(), full)
        close(g1, g2)


def test_token_logprobs_bf16_and_validation() -> None:
    logits = torch.randn(2, 3, 7).to(torch.bfloat16)
    ids = torch.randint(0, 7, (2, 3))
    got = token_logprobs(logits, ids, chunk_size=2)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None])[..., 0]
    assert got.dtype == torch.float32
    close(got, ref)
    with pytest.raises(ValueError, match="ids must have shape"):
        token_logprobs(logits, ids[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, ids, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(logits, ids, chunk_size=0)


def test_entropy_from_logits() -> None:
    # uniform over 4 -> log 4; one-hot-ish -> ~0
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    close(entropy_from_logits(logits, chunk_size=1), [[math.log(4), 0.0]])
    # p = [0.5, 0.25, 0.25] -> H = 1.5 ln 2
    p = torch.tensor([0.5, 0.25, 0.25])
    close(entropy_from_logits(p.log().view(1, 1, 3)), [[1.5 * math.log(2)]])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 9, generator=g, requires_grad=True)
    got = entropy_from_logits(x, chunk_size=5)
    ref = -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1)
    close(got, ref.detach())
    (g1,) = torch.autograd.grad(got.sum(), x)
    (g2,) = torch.autograd.grad(ref.sum(), x)
    close(g1, g2)
    assert entropy_from_logits(x.to(torch.bfloat16)).dtype == torch.float32


# --------------------------------------------------------------------------- 80/20 entropy mask


def test_top_entropy_mask_keeps_the_highest_entropy_fraction() -> None:
    entropy = torch.tensor([[0.1, 2.0, 0.5, 3.0, 9.0], [1.0, 0.2, 4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0]])
    # 7 tokens count (the 9.0 is masked): ceil(0.3 * 7) = 3 -> entropies 4.0, 3.0, 2.0
    close(top_entropy_mask(entropy, mask, 0.3), [[0, 1, 0, 1, 0], [0, 0, 1, 0, 0]])
    # ceil(0.2 * 7) = 2 -> 4.0, 3.0
    close(top_entropy_mask(entropy, mask), [[0, 0, 0, 1, 0], [0, 0, 1, 0, 0]])
    close(top_entropy_mask(entropy, mask, 1.0), mask.tolist())
    # 0.2 * 15 = 3.0000000000000004 in floating point: still 3 tokens, not 4
    many = torch.arange(15.0).view(1, 15)
    close(top_entropy_mask(many, torch.ones(1, 15)), [[0.0] * 12 + [1.0] * 3])


def test_top_entropy_mask_ties_weights_and_empty_mask() -> None:
    flat = torch.ones(2, 3)
    close(top_entropy_mask(flat, torch.ones(2, 3)), torch.ones(2, 3).tolist())  # ties kept
    weights = torch.tensor([[0.5, 2.0, 0.0]])
    out = top_entropy_mask(torch.tensor([[1.0, 0.5, 7.0]]), weights, 0.5)
    close(out, [[0.5, 0.0, 0.0]])  # keeps the mask's weight; the 7.0 does not count
    close(top_entropy_mask(torch.ones(1, 2), torch.zeros(1, 2)), [[0.0, 0.0]])
    with pytest.raises(ValueError, match="frac"):
        top_entropy_mask(flat, flat, 0.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        top_entropy_mask(flat, torch.ones(2, 4))


def test_entropy_mask_composes_with_any_loss() -> None:
    logps = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    mask = torch.ones(1, 3) * top_entropy_mask(torch.tensor([[0.1, 5.0, 0.2]]), torch.ones(1, 3))
    loss, _ = policy_loss(logps, logps.detach(), torch.tensor([2.0]), mask, agg="token-mean")
    assert loss.item() == pytest.approx(-2.0)  # only the entropy-5 token: -A r = -2
    loss.backward()
    assert logps.grad is not None
    close(logps.grad, [[0.0, -2.0, 0.0]])


def test_policy_loss_input_new_knobs_default_and_agg_metadata() -> None:
    x = _input([[1.0]], [[1.0]])  # built without the frontier knobs
    assert (x.sapo_tau_pos, x.sapo_tau_neg, x.cov_frac) == (1.0, 1.05, 2e-4)
    assert (x.clip_cov_lb, x.clip_cov_ub, x.kl_cov_coef, x.dppo_ratio_cap) == (1.0, 5.0, 1.0, 10.0)
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="loss_type='gmpo' requires agg='seq-mean-token-mean'"):
        policy_loss(z, z, torch.ones(1), torch.ones(1, 2), agg="token-mean", loss_type="gmpo")
