"""Hand-computed checks for signalrl.losses.policy_frontier: GPG, SAPO, GMPO, DPPO (TV/KL),
GSPO-token, Clip-Cov, KL-Cov, each through its registered name."""

from __future__ import annotations

import math

import pytest
import torch

from signalrl.losses.policy import PolicyLossInput, importance_ratio, policy_loss
from signalrl.losses.policy_frontier import (
    clip_cov,
    dppo_kl,
    dppo_tv,
    gmpo,
    gpg,
    gspo_token,
    kl_cov,
    sapo,
)
from signalrl.registry import POLICY_LOSSES

FRONTIER = ["gpg", "sapo", "gmpo", "dppo_tv", "dppo_kl", "gspo_token", "clip_cov", "kl_cov"]


def close(actual: torch.Tensor, expected: list | float, atol: float = 1e-5) -> None:
    exp = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.detach().double(), exp, atol=atol, rtol=1e-5)


def make(
    logps: list[list[float]],
    old: list[list[float]],
    adv: list[list[float]],
    mask: list[list[float]] | None = None,
    **knobs: float,
) -> PolicyLossInput:
    """A PolicyLossInput with clip range 0.2 / 0.2 unless ``knobs`` say otherwise."""
    lp = torch.tensor(logps, requires_grad=True)
    o = torch.tensor(old)
    m = torch.ones_like(o) if mask is None else torch.tensor(mask)
    clip_low, clip_high = knobs.pop("clip_low", 0.2), knobs.pop("clip_high", 0.2)
    return PolicyLossInput(
        logps=lp,
        old_logps=o,
        ratio=importance_ratio(lp, o, m, "token"),
        advantages=torch.tensor(adv),
        mask=m,
        keep=m > 0,
        n_tokens=int((m > 0).sum()),
        clip_low=clip_low,
        clip_high=clip_high,
        **knobs,  # type: ignore[arg-type]
    )


def grad_of(x: PolicyLossInput, per_token: torch.Tensor) -> torch.Tensor:
    (per_token * x.mask).sum().backward()
    assert x.logps.grad is not None
    return x.logps.grad


def test_all_frontier_losses_are_registered_in_both_views() -> None:
    assert set(FRONTIER) <= set(POLICY_LOSSES.names())
    assert set(FRONTIER) <= set(POLICY_LOSSES.registered())
    assert {n for n in POLICY_LOSSES.names() if POLICY_LOSSES.declared_meta(n, "agg")} == {
        "gmpo",
        "gspo_token",
    }


@pytest.mark.parametrize("name", FRONTIER)
def test_frontier_losses_run_through_policy_loss(name: str) -> None:
    torch.manual_seed(0)
    logps = (-torch.rand(3, 4) * 3).requires_grad_(True)
    old = logps.detach() + 0.1 * torch.randn(3, 4)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    loss, metrics = policy_loss(
        logps, old, torch.tensor([1.0, -1.0, 2.0]), mask, loss_type=name, cov_frac=0.5
    )
    loss.backward()
    assert torch.isfinite(loss) and logps.grad is not None
    assert torch.isfinite(logps.grad).all() and (logps.grad[mask == 0] == 0).all()
    assert all(math.isfinite(v) for v in metrics.values())


# --------------------------------------------------------------------------- gpg


def test_gpg_is_minus_advantage_times_logp_off_policy_too() -> None:
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -4.0]], requires_grad=True)
    old = torch.tensor([[-3.0, -0.1], [-2.0, -1.0]])  # far off-policy: no ratio, no clip
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, _ = policy_loss(
        logps, old, torch.tensor([1.0, -2.0]), mask, agg="token-mean", loss_type="gpg"
    )
    # per token -A logp = [1, 2], [-1, (masked)]; token mean over 3 tokens
    assert loss.item() == pytest.approx(2.0 / 3)
    loss.backward()
    assert logps.grad is not None
    close(logps.grad, [[-1 / 3, -1 / 3], [2 / 3, 0.0]])  # -A / n
    x = make([[-1.0]], [[-5.0]], [[3.0]])
    close(gpg(x)[0], [[3.0]])


# --------------------------------------------------------------------------- sapo


def test_sapo_soft_gate_values_and_gradient() -> None:
    # ratios 1.5 (A=+2, tau_pos=1), 0.5 (A=-1, tau_neg=1.05), 1.0 (A=+1)
    old = [[-1.0, -1.0, -1.0]]
    logps = [[-1.0 + math.log(1.5), -1.0 + math.log(0.5), -1.0]]
    x = make(logps, old, [[2.0, -1.0, 1.0]])
    per_token, metrics = sapo(x)
    s1 = 0.6224593  # sigmoid(0.5)
    s2 = 0.3716852  # sigmoid(1.05 * -0.5) = sigmoid(-0.525)
    close(per_token, [[-s1 * 4 * 2, s2 * 4 / 1.05, -0.5 * 4]])
    # d l / d logp = -A f'(r) r = -A * 4 s (1 - s) * r; exactly -A at r = 1 (the PG)
    w1, w2 = 4 * s1 * (1 - s1) * 1.5, 4 * s2 * (1 - s2) * 0.5
    close(grad_of(x, per_token), [[-2 * w1, w2, -1.0]])
    assert metrics["sapo/gate_mean"] == pytest.approx((w1 + w2 + 1.0) / 3, rel=1e-5)


def test_sapo_temperatures_come_through_policy_loss() -> None:
    old = torch.tensor([[-1.0]])
    logps = old + math.log(1.5)
    # tau_pos = 2: sigmoid(2 * 0.5) = sigmoid(1) = 0.7310586; l = -0.7310586 * 4 / 2 * A(=2)
    loss, _ = policy_loss(
        logps, old, torch.tensor([2.0]), torch.ones(1, 1), loss_type="sapo", sapo_tau_pos=2.0
    )
    assert loss.item() == pytest.approx(-0.7310586 * 2 * 2, rel=1e-6)
    with pytest.raises(ValueError, match="temperatures"):
        policy_loss(logps, old, torch.ones(1), torch.ones(1, 1), loss_type="sapo", sapo_tau_neg=0)


# --------------------------------------------------------------------------- gmpo


def test_gmpo_geometric_mean_with_log_space_clipping() -> None:
    # seq 1: A=+1, log-ratios [0.5, -0.1, 0.2]: only the upper bound bites -> [0.4, -0.1, 0.2]
    # seq 2: A=-1, log-ratios [-0.6, 0.3, (masked)]: only the lower bound -> [-0.4, 0.3]
    old = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    d = torch.tensor([[0.5, -0.1, 0.2], [-0.6, 0.3, 2.0]])
    logps = (old + d).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kw = {"clip_low": 0.4, "clip_high": 0.4, "loss_type": "gmpo"}
    loss, metrics = policy_loss(logps, old, torch.tensor([1.0, -1.0]), mask, **kw)  # type: ignore[arg-type]
    l1 = -math.exp(0.5 / 3)  # -exp(mean [0.4, -0.1, 0.2]) = -1.1813604
    l2 = math.exp(-0.1 / 2)  # exp(mean [-0.4, 0.3]) = 0.9512294
    assert loss.item() == pytest.approx((l1 + l2) / 2, rel=1e-6)
    assert metrics["clip_frac/high"] == pytest.approx(1 / 5)
    assert metrics["clip_frac/low"] == pytest.approx(1 / 5)
    loss.backward()
    assert logps.grad is not None
    # dL_i/dlogp_t = -A_i exp(mean) / |o_i| on unclipped tokens, 0 on clipped; mean of 2 seqs
    g1, g2 = l1 / 3 / 2, l2 / 2 / 2
    close(logps.grad, [[0.0, g1, g1], [0.0, g2, 0.0]])
    with pytest.raises(ValueError, match="requires agg"):
        policy_loss(logps, old, torch.ones(2), mask, agg="token-mean", loss_type="gmpo")


def test_gmpo_entry_spreads_sequence_loss_over_tokens() -> None:
    x = make([[-1.0, -1.0]], [[-1.0, -1.0]], [[2.0, 0.0]])  # on-policy, mean advantage 1
    per_token, metrics = gmpo(x)
    close(per_token, [[-1.0, -1.0]])
    assert metrics == {"clip_frac/low": 0.0, "clip_frac/high": 0.0}


# --------------------------------------------------------------------------- dppo


def _probs_input(p: list[float], q: list[float], adv: list[float], **kw: float) -> PolicyLossInput:
    return make([[math.log(v) for v in p]], [[math.log(v) for v in q]], [adv], **kw)


def test_dppo_tv_masks_by_probability_shift_not_ratio() -> None:
    # (p, p_old, A): 0.8/0.5/+1 up by 0.3 > 0.2: masked; 0.6/0.5/+1 kept (r = 1.2);
    # 0.2/0.5/-1 down by 0.3: masked; 0.01/0.1/-1 kept although r = 0.1 (PPO would clip);
    # 0.8/0.5/-1 moved up with A < 0, the direction that is not pushed: kept (r = 1.6)
    p, q = [0.8, 0.6, 0.2, 0.01, 0.8], [0.5, 0.5, 0.5, 0.1, 0.5]
    x = _probs_input(p, q, [1.0, 1.0, -1.0, -1.0, -1.0])
    per_token, metrics = dppo_tv(x)
    close(per_token, [[0.0, -1.2 * math.log(0.6), 0.0, 0.1 * math.log(0.01), 1.6 * math.log(0.8)]])
    close(grad_of(x, per_token), [[0.0, -1.2, 0.0, 0.1, 1.6]])  # -A r on kept tokens
    assert metrics == pytest.approx({"clip_frac/low": 1 / 5, "clip_frac/high": 1 / 5})
    x = _probs_input(p, q, [1.0, 1.0, -1.0, -1.0, -1.0], dppo_ratio_cap=1.5)
    close(grad_of(x, dppo_tv(x)[0]), [[0.0, -1.2, 0.0, 0.1, 1.5]])  # weight capped at 1.5


def test_dppo_kl_masks_by_binary_kl() -> None:
    # binary KL p_old log(p_old/p) + (1-p_old) log((1-p_old)/(1-p)):
    # 0.8 vs 0.5: 0.5 ln(5/8) + 0.5 ln(5/2) = 0.2231 > 0.2 (up, A > 0): masked
    # 0.6 vs 0.5: 0.5 ln(5/6) + 0.5 ln(5/4) = 0.0204: kept
    # 0.01 vs 0.1: 0.1 ln 10 + 0.9 ln(0.9/0.99) = 0.1445 > clip_low = 0.1 (down, A < 0): masked
    x = _probs_input([0.8, 0.6, 0.01], [0.5, 0.5, 0.1], [1.0, 1.0, -1.0], clip_low=0.1)
    per_token, metrics = dppo_kl(x)
    close(per_token, [[0.0, -1.2 * math.log(0.6), 0.0]])
    close(grad_of(x, per_token), [[0.0, -1.2, 0.0]])
    assert metrics == pytest.approx({"clip_frac/low": 1 / 3, "clip_frac/high": 1 / 3})
    x = _probs_input([0.8, 0.6, 0.01], [0.5, 0.5, 0.1], [1.0, 1.0, -1.0], clip_low=0.15)
    close(dppo_kl(x)[0][0, 2], 0.1 * math.log(0.01))  # 0.1445 < 0.15: kept


# --------------------------------------------------------------------------- gspo_token


def test_gspo_token_sequence_ratio_with_token_advantages() -> None:
    # log-ratios [0.3, -0.1, 0.1]: s = exp(0.1) = 1.1051709, inside [0.8, 1.2]
    x = make([[-0.7, -1.1, -0.9]], [[-1.0, -1.0, -1.0]], [[1.0, -1.0, 2.0]])
    per_token, metrics = gspo_token(x)
    s = 1.1051709
    close(per_token, [[-s, s, -2 * s]])
    close(grad_of(x, per_token), [[-s, s, -2 * s]])  # -A_t s grad(logp_t): s, not r_t
    assert metrics == {"clip_frac/low": 0.0, "clip_frac/high": 0.0}
    # log-ratios [0.5, 0.3, 0.4]: s = exp(0.4) = 1.4918247 > 1.2: A > 0 tokens clipped
    x = make([[-0.5, -0.7, -0.6]], [[-1.0, -1.0, -1.0]], [[1.0, -1.0, 2.0]])
    per_token, metrics = gspo_token(x)
    s = 1.4918247
    close(per_token, [[-1.2, s, -2.4]])
    close(grad_of(x, per_token), [[0.0, s, 0.0]])
    assert metrics["clip_frac/high"] == pytest.approx(2 / 3)


def test_gspo_token_through_policy_loss_requires_sequence_mean() -> None:
    logps = torch.tensor([[-0.7, -1.1, -0.9]], requires_grad=True)
    old = torch.full((1, 3), -1.0)
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    loss, _ = policy_loss(logps, old, adv, torch.ones(1, 3), loss_type="gspo_token")
    assert loss.item() == pytest.approx(-2 * 1.1051709 / 3, rel=1e-6)  # mean of [-s, s, -2s]
    with pytest.raises(ValueError, match="requires agg"):
        policy_loss(logps, old, adv, torch.ones(1, 3), agg="token-mean", loss_type="gspo_token")


# --------------------------------------------------------------------------- clip_cov / kl_cov

# advantages mean 0, log-probs mean -2: cov = A (logp + 2) = [2, 2, 6, 6, 0, 0]
COV_ADV = [[2.0, -2.0, 3.0, -3.0, 0.0, 0.0]]
COV_LOGPS = [[-1.0, -3.0, 0.0, -4.0, -2.0, -2.0]]


def test_clip_cov_removes_tokens_in_the_covariance_window() -> None:
    x = make(COV_LOGPS, COV_LOGPS, COV_ADV, cov_frac=0.5)  # on-policy, r = 1
    per_token, metrics = clip_cov(x)
    # 3 may go; only tokens 0 and 1 have 1 < cov < 5 (6 is above the window): both removed
    close(per_token, [[0.0, 0.0, -3.0, 3.0, 0.0, 0.0]])
    close(grad_of(x, per_token), [[0.0, 0.0, -3.0, 3.0, 0.0, 0.0]])
    assert metrics["clip_frac/cov"] == pytest.approx(2 / 6)
    torch.manual_seed(0)
    x = make(COV_LOGPS, COV_LOGPS, COV_ADV, cov_frac=0.2)  # int(1.2) = 1: one of the two
    per_token, metrics = clip_cov(x)
    assert sorted(per_token[0, :2].tolist()) in ([-2.0, 0.0], [0.0, 2.0])
    assert metrics["clip_frac/cov"] == pytest.approx(1 / 6)


def test_clip_cov_skips_tokens_ppo_already_clipped() -> None:
    old = [[COV_LOGPS[0][0] - math.log(1.5), *COV_LOGPS[0][1:]]]  # token 0: r = 1.5, A > 0
    x = make(COV_LOGPS, old, COV_ADV, cov_frac=0.5)
    per_token, metrics = clip_cov(x)
    close(per_token, [[-2.4, 0.0, -3.0, 3.0, 0.0, 0.0]])  # token 0 keeps PPO's -A * 1.2
    assert metrics == pytest.approx(
        {"clip_frac/low": 0.0, "clip_frac/high": 1 / 6, "clip_frac/cov": 1 / 6}
    )


def test_kl_cov_penalises_the_top_covariance_tokens() -> None:
    # log-probs [-1, -3, 0, -3.5, -2.5, -2] (mean -2): cov = [2, 2, 6, 4.5, 0, 0]
    logps = [[-1.0, -3.0, 0.0, -3.5, -2.5, -2.0]]
    d = [0.1, 0.1, 0.2, -0.3, 0.0, 0.0]
    old = [[lp - di for lp, di in zip(logps[0], d, strict=True)]]
    x = make(logps, old, COV_ADV, cov_frac=1 / 3, kl_cov_coef=1.0)  # top int(2) = 2 tokens
    per_token, metrics = kl_cov(x)
    r = [math.exp(v) for v in d]
    plain = [-a * ri for a, ri in zip(COV_ADV[0], r, strict=True)]
    close(per_token, [[plain[0], plain[1], plain[2] + 0.2, plain[3] + 0.3, 0.0, 0.0]])
    # gradient -A r, plus coef * sign(d) on the penalised tokens 2 and 3
    grads = [-2 * r[0], 2 * r[1], -3 * r[2] + 1.0, 3 * r[3] - 1.0, 0.0, 0.0]
    close(grad_of(x, per_token), [grads])
    assert metrics == pytest.approx({"kl_cov/frac": 2 / 6})


def test_cov_knobs_are_validated() -> None:
    with pytest.raises(ValueError, match="cov_frac"):
        kl_cov(make(COV_LOGPS, COV_LOGPS, COV_ADV, cov_frac=0.0))
    with pytest.raises(ValueError, match="clip_cov_lb"):
        clip_cov(make(COV_LOGPS, COV_LOGPS, COV_ADV, clip_cov_lb=5.0, clip_cov_ub=1.0))
    with pytest.raises(ValueError, match="kl_cov_coef"):
        kl_cov(make(COV_LOGPS, COV_LOGPS, COV_ADV, kl_cov_coef=-1.0))
