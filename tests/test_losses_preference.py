"""Tests for signalrl.losses.preference.

Expected values are written out independently with the ``math`` module (scalars), not by
calling the code under test, so a wrong formula fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from signalrl.losses.preference import (
    DPO_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    PreferenceInput,
    dpo_loss,
    f_divergence_score,
    kto_loss,
    orpo_loss,
    preference_loss,
    preference_metrics,
    rpo_loss,
    simpo_loss,
)
from signalrl.registry import PREFERENCE_LOSSES

D = torch.float64


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=D)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# One pair used throughout: a = pc - rc = 1, b = pr - rr = -1, h = a - b = 2.
PC, PR, RC, RR = -1.0, -3.0, -2.0, -2.0
A, B, H = PC - RC, PR - RR, (PC - RC) - (PR - RR)


def one(loss_type: str, beta: float = 0.5, **kw: object) -> float:
    losses, _, _ = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=beta, loss_type=loss_type, **kw)
    assert losses.shape == (1,)
    return losses.item()


# --------------------------------------------------------------------------------------
# hand-computed values
# --------------------------------------------------------------------------------------


def test_sigmoid_value_and_rewards() -> None:
    losses, cr, rr = dpo_loss(t(PC, -2.0), t(PR, -1.0), t(RC, -2.0), t(RR, -2.0), beta=0.5)
    # pair 0: h = 2, loss = log(1 + e^-1); pair 1: h = 0 - 1 = -1, loss = log(1 + e^0.5)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))])
    assert losses[0].item() == pytest.approx(0.31326168751822286)
    assert cr.tolist() == pytest.approx([0.5, 0.0])
    assert rr.tolist() == pytest.approx([-0.5, 0.5])


def test_cdpo_label_smoothing() -> None:
    eps, z = 0.1, 0.5 * H
    expected = -(1 - eps) * logsig(z) - eps * logsig(-z)
    assert one("sigmoid", label_smoothing=eps) == pytest.approx(expected)
    assert expected == pytest.approx(0.9 * 0.31326168751822286 + 0.1 * 1.3132616875182228)


def test_robust() -> None:
    eps, z = 0.2, 0.5 * H
    expected = ((1 - eps) * -logsig(z) - eps * -logsig(-z)) / (1 - 2 * eps)
    assert one("robust", label_smoothing=eps) == pytest.approx(expected)
    # eps = 0 reduces to plain DPO
    assert one("robust") == pytest.approx(one("sigmoid"))
    with pytest.raises(ValueError, match="0.5"):
        one("robust", label_smoothing=0.5)


def test_ipo() -> None:
    assert one("ipo", beta=0.1) == pytest.approx((2.0 - 5.0) ** 2)  # (h - 1/(2*0.1))^2 = 9
    assert one("ipo", beta=0.25) == pytest.approx(0.0)
    # sequence logps + lengths == averaged logps (TRL's per-token normalisation)
    lc, lr = 4.0, 2.0
    with_len, _, _ = dpo_loss(
        t(PC),
        t(PR),
        t(RC),
        t(RR),
        beta=0.5,
        loss_type="ipo",
        chosen_lengths=t(lc),
        rejected_lengths=t(lr),
    )
    avg, _, _ = dpo_loss(t(PC / lc), t(PR / lr), t(RC / lc), t(RR / lr), beta=0.5, loss_type="ipo")
    expected = (A / lc - B / lr - 1.0) ** 2
    assert with_len.item() == pytest.approx(expected)
    assert avg.item() == pytest.approx(expected)


def test_hinge() -> None:
    assert one("hinge", beta=0.5) == pytest.approx(0.0)  # relu(1 - 1)
    assert one("hinge", beta=0.25) == pytest.approx(0.5)  # relu(1 - 0.5)
    assert one("hinge", beta=0.1) == pytest.approx(0.8)  # relu(1 - 0.2)


def test_exo_pair() -> None:
    def exo(z: float, e: float) -> float:
        return sig(z) * (logsig(z) - math.log(1 - e)) + sig(-z) * (logsig(-z) - math.log(e))

    assert one("exo_pair", label_smoothing=0.01) == pytest.approx(exo(1.0, 0.01))
    # eps = 0 falls back to the paper's 1e-3
    assert one("exo_pair") == pytest.approx(exo(1.0, 1e-3))


def test_nca_pair() -> None:
    beta = 0.5
    expected = -logsig(beta * A) - 0.5 * logsig(-beta * A) - 0.5 * logsig(-beta * B)
    assert one("nca_pair", beta=beta) == pytest.approx(expected)


def test_bco_pair() -> None:
    beta = 0.5
    assert one("bco_pair") == pytest.approx(-logsig(beta * A) - logsig(-beta * B))
    delta = 0.3
    expected = -logsig(beta * A - delta) - logsig(-(beta * B - delta))
    assert one("bco_pair", bco_delta=delta) == pytest.approx(expected)
    assert one("bco_pair", bco_delta=torch.tensor(delta)) == pytest.approx(expected)


def test_sppo_hard() -> None:
    beta = 0.5
    assert one("sppo_hard", beta=beta) == pytest.approx((A - 1.0) ** 2 + (B + 1.0) ** 2)
    assert one("sppo_hard", beta=0.25) == pytest.approx((A - 2.0) ** 2 + (B + 2.0) ** 2)


def test_aot_sorts_over_the_batch() -> None:
    pc, pr = t(-1.0, -2.0, -4.0), t(-3.0, -1.0, -2.0)  # pc - pr = [2, -1, -2]
    rc, rr = t(-2.0, -1.0, -1.0), t(-1.0, -2.0, -1.0)  # rc - rr = [-1, 1, 0]
    beta, eps = 0.5, 0.1
    d = [x - y for x, y in zip(sorted([2.0, -1.0, -2.0]), sorted([-1.0, 1.0, 0.0]), strict=True)]
    assert d == [-1.0, -1.0, 1.0]
    expected = [-(1 - eps) * logsig(beta * x) - eps * logsig(-beta * x) for x in d]
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="aot", label_smoothing=eps)
    assert losses.tolist() == pytest.approx(expected)
    # unpaired: sort chosen and rejected log-ratios separately
    a = sorted([1.0, -1.0, -3.0])  # pc - rc
    b = sorted([-2.0, 1.0, -1.0])  # pr - rr
    d2 = [x - y for x, y in zip(a, b, strict=True)]
    expected2 = [-logsig(beta * x) for x in d2]
    losses2, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="aot_unpaired")
    assert losses2.tolist() == pytest.approx(expected2)
    # paired DPO on the same batch is different (sorting matters)
    plain, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert not torch.allclose(torch.sort(plain).values, torch.sort(losses2).values)


def test_apo_zero_and_down() -> None:
    beta = 0.5
    assert one("apo_zero") == pytest.approx((1 - sig(beta * A)) + sig(beta * B))
    assert one("apo_down") == pytest.approx(sig(beta * A) + (1 - sig(beta * (A - B))))


def test_discopop() -> None:
    def disco(z: float, tau: float) -> float:
        m = sig(z / tau)
        return (1 - m) * -logsig(z) + m * math.exp(-z)

    assert one("discopop", beta=0.5) == pytest.approx(disco(1.0, 0.05))
    assert one("discopop", beta=0.01, discopop_tau=0.5) == pytest.approx(disco(0.02, 0.5))
    # no 0 * inf for a very wrong pair (TRL's literal form gives nan here in float32)
    losses, _, _ = dpo_loss(
        torch.tensor([-500.0]),
        torch.tensor([0.0]),
        torch.zeros(1),
        torch.zeros(1),
        beta=0.5,
        loss_type="discopop",
    )
    assert torch.isfinite(losses).all()
    assert losses.item() == pytest.approx(250.0, rel=1e-4)  # -log sig(-250) ~ 250


def test_sigmoid_norm_divides_by_length() -> None:
    lc, lr, beta = 4.0, 2.0, 0.5
    losses, cr, _ = dpo_loss(
        t(PC),
        t(PR),
        t(RC),
        t(RR),
        beta=beta,
        loss_type="sigmoid_norm",
        chosen_lengths=t(lc),
        rejected_lengths=t(lr),
    )
    assert losses.item() == pytest.approx(-logsig(beta * (A / lc - B / lr)))
    assert cr.item() == pytest.approx(beta * A)  # rewards stay un-normalised, as in TRL
    with pytest.raises(ValueError, match="chosen_lengths"):
        one("sigmoid_norm")


def test_every_loss_type_runs_and_is_finite() -> None:
    g = torch.Generator().manual_seed(0)
    x = [-torch.rand(6, generator=g, dtype=D) * 5 for _ in range(4)]
    lengths = torch.arange(1, 7, dtype=D)
    for lt in DPO_LOSS_TYPES:
        losses, cr, rr = dpo_loss(
            *x, loss_type=lt, chosen_lengths=lengths, rejected_lengths=lengths + 1
        )
        assert losses.shape == (6,), lt
        assert torch.isfinite(losses).all(), lt
    assert len(set(DPO_LOSS_TYPES)) == len(DPO_LOSS_TYPES) == 14


# --------------------------------------------------------------------------------------
# f-divergences
# --------------------------------------------------------------------------------------


def test_reverse_kl_is_plain_sigmoid() -> None:
    g = torch.Generator().manual_seed(1)
    x = [-torch.rand(5, generator=g, dtype=D) * 3 for _ in range(4)]
    plain, _, _ = dpo_loss(*x, beta=0.3)
    rkl, _, _ = dpo_loss(*x, beta=0.3, f_divergence_type="reverse_kl")
    alpha1, _, _ = dpo_loss(
        *x, beta=0.3, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0
    )
    torch.testing.assert_close(rkl, plain)
    torch.testing.assert_close(alpha1, plain)


@pytest.mark.parametrize(
    ("fdiv", "coef", "h"),
    [
        ("forward_kl", 0.5, math.exp(-B) - math.exp(-A)),
        ("js_divergence", 0.5, logsig(A) - logsig(B)),
        ("alpha_divergence", 0.5, (math.exp(-0.5 * A) - math.exp(-0.5 * B)) / -0.5),
        ("alpha_divergence", 0.0, math.exp(-B) - math.exp(-A)),  # a = 0 is forward KL
        ("alpha_divergence", 2.0, math.exp(A) - math.exp(B)),
    ],
)
def test_f_divergence_scores(fdiv: str, coef: float, h: float) -> None:
    beta = 0.5
    got = one("sigmoid", beta=beta, f_divergence_type=fdiv, f_alpha_divergence_coef=coef)
    assert got == pytest.approx(-logsig(beta * h))
    assert one("hinge", beta=beta, f_divergence_type=fdiv, f_alpha_divergence_coef=coef) == (
        pytest.approx(max(0.0, 1 - beta * h))
    )


def test_f_divergence_rejected_for_types_without_generalisation() -> None:
    for lt in ("bco_pair", "nca_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down"):
        with pytest.raises(ValueError, match="f-divergence"):
            one(lt, f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="reverse_kl"):
        one("sigmoid", f_divergence_type="tv")
    with pytest.raises(ValueError, match="alpha_divergence"):
        f_divergence_score(t(0.0), "bogus")
    assert set(F_DIVERGENCE_TYPES) == {
        "reverse_kl",
        "forward_kl",
        "js_divergence",
        "alpha_divergence",
    }


def test_f_divergence_no_overflow() -> None:
    x = torch.tensor([-200.0, 0.0, 200.0])
    for fdiv in F_DIVERGENCE_TYPES:
        assert torch.isfinite(f_divergence_score(x, fdiv, 3.0)).all(), fdiv


# --------------------------------------------------------------------------------------
# errors, gradients
# --------------------------------------------------------------------------------------


def test_unknown_type_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        one("dpo_plus_plus")
    msg = str(info.value)
    assert "dpo_plus_plus" in msg
    for lt in DPO_LOSS_TYPES:
        assert lt in msg


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="beta"):
        one("sigmoid", beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        one("sigmoid", label_smoothing=0.7)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(t(1.0, 2.0), t(1.0), t(1.0), t(1.0))
    with pytest.raises(TypeError):
        dpo_loss(t(1.0), t(1.0), t(1.0), t(1.0), betta=0.1)  # type: ignore[call-arg]


def test_gradients_reach_policy_not_rewards() -> None:
    beta = 0.5
    pc = t(PC).requires_grad_()
    pr = t(PR).requires_grad_()
    rc, rr = t(RC).requires_grad_(), t(RR).requires_grad_()
    losses, cr, rr_ = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert not cr.requires_grad and not rr_.requires_grad
    assert cr.grad_fn is None and rr_.grad_fn is None
    losses.sum().backward()
    # d/dpc [-log sig(beta h)] = -beta * sig(-beta h)
    assert pc.grad is not None and pr.grad is not None
    assert pc.grad.item() == pytest.approx(-beta * sig(-beta * H))
    assert pr.grad.item() == pytest.approx(beta * sig(-beta * H))
    # every type: gradient reaches the policy, rewards stay detached (beta = 0.3 keeps the
    # hinge off its kink at beta * h = 1)
    lengths = {"chosen_lengths": t(2.0), "rejected_lengths": t(3.0)}
    for lt in DPO_LOSS_TYPES:
        pc.grad = None
        pr.grad = None
        losses, cr, rr_ = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=lt, **lengths)
        assert not cr.requires_grad and not rr_.requires_grad, lt
        losses.sum().backward()
        assert pc.grad is not None and pc.grad.abs().item() > 0, lt
        if lt != "apo_down":  # APO-down deliberately lowers the chosen likelihood too
            assert pc.grad.item() < 0, lt  # raising the chosen log-prob lowers the loss


# --------------------------------------------------------------------------------------
# SimPO, ORPO, KTO
# --------------------------------------------------------------------------------------


def test_simpo() -> None:
    losses, cr, rr = simpo_loss(t(-1.0), t(-1.5), beta=2.0, gamma=0.5)
    z = 2.0 * 0.5 - 0.5
    assert losses.item() == pytest.approx(-logsig(z))
    assert cr.item() == pytest.approx(-2.0)
    assert rr.item() == pytest.approx(-3.0)
    smoothed, _, _ = simpo_loss(t(-1.0), t(-1.5), label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(-0.8 * logsig(z) - 0.2 * logsig(-z))


def test_orpo_value() -> None:
    # p_c = 1/2 (odds 1), p_r = 1/4 (odds 1/3): log odds ratio = log 3
    losses, log_odds = orpo_loss(t(math.log(0.5)), t(math.log(0.25)), beta=0.1)
    assert log_odds.item() == pytest.approx(math.log(3.0))
    assert losses.item() == pytest.approx(-0.1 * math.log(0.75))


def test_orpo_numerically_safe_near_zero() -> None:
    x_c, x_r = -1e-4, -2.0
    expected = (x_c - x_r) - (math.log(-math.expm1(x_c)) - math.log(-math.expm1(x_r)))
    _, lo32 = orpo_loss(torch.tensor([x_c]), torch.tensor([x_r]))
    assert lo32.item() == pytest.approx(expected, rel=1e-4)
    c = torch.tensor([0.0, -1e-12, -1e-7, -0.5], requires_grad=True)
    r = torch.tensor([-1.0, -1.0, -1.0, 0.0], requires_grad=True)
    losses, log_odds = orpo_loss(c, r)
    assert torch.isfinite(losses).all() and torch.isfinite(log_odds).all()
    losses.sum().backward()
    assert c.grad is not None and r.grad is not None
    assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()


def test_kto_desirable_undesirable_and_clamp() -> None:
    beta = 0.5
    policy, ref = t(-1.0, -1.0, -3.0), t(-2.0, -2.0, -2.0)  # logratios 1, 1, -1
    desirable = torch.tensor([True, False, False])
    losses, rewards = kto_loss(
        policy, ref, desirable, 0.4, beta=beta, desirable_weight=2.0, undesirable_weight=0.5
    )
    expected = [
        2.0 * (1 - sig(beta * (1.0 - 0.4))),
        0.5 * (1 - sig(beta * (0.4 - 1.0))),
        0.5 * (1 - sig(beta * (0.4 + 1.0))),
    ]
    assert losses.tolist() == pytest.approx(expected)
    assert rewards.tolist() == pytest.approx([0.5, 0.5, -0.5])
    assert not rewards.requires_grad
    # a negative KL estimate is clamped to 0
    neg, _ = kto_loss(policy, ref, desirable, torch.tensor(-0.3), beta=beta)
    zero, _ = kto_loss(policy, ref, desirable, 0.0, beta=beta)
    torch.testing.assert_close(neg, zero)
    assert neg[0].item() == pytest.approx(1 - sig(0.5))
    # the reference point is detached
    kl = torch.tensor(0.4, dtype=D, requires_grad=True)
    p = policy.clone().requires_grad_()
    out, _ = kto_loss(p, ref, desirable, kl, beta=beta)
    out.sum().backward()
    assert kl.grad is None and p.grad is not None


# --------------------------------------------------------------------------------------
# RPO, metrics
# --------------------------------------------------------------------------------------


def test_rpo() -> None:
    nll = t(2.0)
    losses, cr, _ = rpo_loss(t(PC), t(PR), t(RC), t(RR), nll, alpha=0.5, beta=0.5)
    assert losses.item() == pytest.approx(-logsig(0.5 * H) + 0.5 * 2.0)
    assert cr.item() == pytest.approx(0.5)


def test_preference_metrics() -> None:
    m = preference_metrics(t(1.0, -1.0, 0.5, 0.0), t(0.0, 0.0, 1.0, -1.0), t(-5.0, -7.0), t(-9.0))
    assert m == pytest.approx(
        {
            "rewards/chosen": 0.125,
            "rewards/rejected": 0.0,
            "rewards/accuracies": 0.5,
            "rewards/margins": 0.125,
            "logps/chosen": -6.0,
            "logps/rejected": -9.0,
        }
    )
    assert all(isinstance(v, float) for v in m.values())


# --------------------------------------------------------------------------------------
# the registered functions (PreferenceInput -> (losses, chosen_rewards, rejected_rewards))
# --------------------------------------------------------------------------------------

LC, LR = 4.0, 2.0  # completion lengths of the pair
EPS, DELTA, TAU = 0.1, 0.3, 0.05


def _smoothed(z: float, eps: float) -> float:
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


def _exo(z: float, e: float) -> float:
    return sig(z) * (logsig(z) - math.log(1 - e)) + sig(-z) * (logsig(-z) - math.log(e))


def _disco(z: float, tau: float) -> float:
    m = sig(z / tau)
    return (1 - m) * -logsig(z) + m * math.exp(-z)


# Each DPO-family entry at beta = 0.5 (bz = beta * h = 1), label_smoothing = EPS,
# bco_delta = DELTA, discopop_tau = TAU and lengths LC, LR, written out with `math`.
_BZ = 0.5 * H
DPO_EXPECTED: dict[str, float] = {
    "sigmoid": _smoothed(_BZ, EPS),
    "robust": ((1 - EPS) * -logsig(_BZ) - EPS * -logsig(-_BZ)) / (1 - 2 * EPS),
    "ipo": (A / LC - B / LR - 1.0) ** 2,  # lengths given: scores are length-normalised
    "hinge": max(0.0, 1 - _BZ),
    "exo_pair": _exo(_BZ, EPS),
    "nca_pair": -logsig(0.5 * A) - 0.5 * logsig(-0.5 * A) - 0.5 * logsig(-0.5 * B),
    "bco_pair": -logsig(0.5 * A - DELTA) - logsig(-(0.5 * B - DELTA)),
    "sppo_hard": (A - 1.0) ** 2 + (B + 1.0) ** 2,
    "aot": _smoothed(0.5 * ((PC - PR) - (RC - RR)), EPS),  # one pair: sorting is the identity
    "aot_unpaired": _smoothed(0.5 * (A - B), EPS),
    "apo_zero": (1 - sig(0.5 * A)) + sig(0.5 * B),
    "apo_down": sig(0.5 * A) + (1 - sig(0.5 * (A - B))),
    "discopop": _disco(_BZ, TAU),
    "sigmoid_norm": -logsig(0.5 * (A / LC - B / LR)),  # label_smoothing is not read
}


def _pair_input(**kw: object) -> PreferenceInput:
    args: dict[str, object] = dict(
        chosen_lengths=t(LC),
        rejected_lengths=t(LR),
        beta=0.5,
        label_smoothing=EPS,
        bco_delta=DELTA,
        discopop_tau=TAU,
    )
    args.update(kw)
    return PreferenceInput(t(PC), t(PR), t(RC), t(RR), **args)  # type: ignore[arg-type]


def test_dpo_expected_table_covers_the_dpo_types() -> None:
    assert set(DPO_EXPECTED) == set(DPO_LOSS_TYPES)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_registered_dpo_entries_hand_values(loss_type: str) -> None:
    x = _pair_input()
    direct = PREFERENCE_LOSSES.get(loss_type)(x)
    for losses, cr, rr in (direct, preference_loss(x, loss_type)):
        assert losses.shape == (1,)
        assert losses.item() == pytest.approx(DPO_EXPECTED[loss_type])
        assert cr.item() == pytest.approx(0.5 * A) and rr.item() == pytest.approx(0.5 * B)
        assert not cr.requires_grad and not rr.requires_grad
    via_dpo, _, _ = dpo_loss(
        t(PC),
        t(PR),
        t(RC),
        t(RR),
        beta=0.5,
        loss_type=loss_type,
        label_smoothing=EPS,
        bco_delta=DELTA,
        discopop_tau=TAU,
        chosen_lengths=t(LC),
        rejected_lengths=t(LR),
    )
    assert torch.equal(via_dpo, direct[0])


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_registered_dpo_entries_need_the_reference(loss_type: str) -> None:
    x = PreferenceInput(t(PC), t(PR), chosen_lengths=t(LC), rejected_lengths=t(LR))
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        preference_loss(x, loss_type)


def test_registered_f_divergence_through_preference_loss() -> None:
    x = _pair_input(label_smoothing=0.0, f_divergence_type="forward_kl")
    losses, _, _ = preference_loss(x, "sigmoid")
    assert losses.item() == pytest.approx(-logsig(0.5 * (math.exp(-B) - math.exp(-A))))
    with pytest.raises(ValueError, match="no f-divergence generalisation"):
        preference_loss(x, "bco_pair")
    with pytest.raises(ValueError, match="no f-divergence generalisation"):
        preference_loss(x, "simpo")
    with pytest.raises(ValueError, match="reverse_kl"):
        preference_loss(_pair_input(f_divergence_type="tv"), "sigmoid")


def test_registered_simpo_uses_average_logps() -> None:
    # avg_c = -4 / 4 = -1, avg_r = -3 / 2 = -1.5; z = 2 * 0.5 - 0.5 = 0.5
    x = PreferenceInput(
        t(-4.0),
        t(-3.0),
        chosen_lengths=t(4.0),
        rejected_lengths=t(2.0),
        beta=2.0,
        simpo_gamma=0.5,
        label_smoothing=0.2,
    )
    losses, cr, rr = preference_loss(x, "simpo")
    assert losses.item() == pytest.approx(-0.8 * logsig(0.5) - 0.2 * logsig(-0.5))
    assert (cr.item(), rr.item()) == pytest.approx((-2.0, -3.0))
    with pytest.raises(ValueError, match="chosen_lengths"):
        preference_loss(PreferenceInput(t(-4.0), t(-3.0)), "simpo")


def test_registered_orpo_is_nll_plus_odds_term() -> None:
    # avg_c = log 0.5 (2 tokens), avg_r = log 0.25 (3 tokens): log odds ratio = log 3
    x = PreferenceInput(
        t(2 * math.log(0.5)),
        t(3 * math.log(0.25)),
        chosen_lengths=t(2.0),
        rejected_lengths=t(3.0),
        beta=0.1,
    )
    losses, cr, rr = preference_loss(x, "orpo")
    assert losses.item() == pytest.approx(math.log(2.0) - 0.1 * math.log(0.75))
    assert cr.item() == pytest.approx(0.1 * math.log(0.5))
    assert rr.item() == pytest.approx(0.1 * math.log(0.25))


def test_registered_rpo_adds_chosen_token_mean_nll() -> None:
    x = _pair_input(label_smoothing=0.0, rpo_alpha=0.5)
    losses, cr, rr = preference_loss(x, "rpo")
    # DPO sigmoid + alpha * (-PC / LC)
    assert losses.item() == pytest.approx(-logsig(_BZ) + 0.5 * (-PC / LC))
    assert (cr.item(), rr.item()) == pytest.approx((0.5 * A, 0.5 * B))
    pc = t(PC).requires_grad_()
    x = PreferenceInput(pc, t(PR), t(RC), t(RR), t(LC), t(LR), beta=0.5, rpo_alpha=0.5)
    preference_loss(x, "rpo")[0].sum().backward()
    assert pc.grad is not None
    assert pc.grad.item() == pytest.approx(-0.5 * sig(-_BZ) - 0.5 / LC)


def test_registered_kto_returns_row_rewards_twice() -> None:
    x = PreferenceInput(
        t(-1.0, -1.0, -3.0),
        ref_chosen_logps=t(-2.0, -2.0, -2.0),
        desirable=torch.tensor([True, False, False]),
        kl_ref=0.4,
        beta=0.5,
        kto_desirable_weight=2.0,
        kto_undesirable_weight=0.5,
    )
    losses, cr, rr = preference_loss(x, "kto")
    expected = [
        2.0 * (1 - sig(0.5 * (1.0 - 0.4))),
        0.5 * (1 - sig(0.5 * (0.4 - 1.0))),
        0.5 * (1 - sig(0.5 * (0.4 + 1.0))),
    ]
    assert losses.tolist() == pytest.approx(expected)
    assert cr.tolist() == pytest.approx([0.5, 0.5, -0.5])
    assert rr is cr
    with pytest.raises(ValueError, match="desirable"):
        preference_loss(PreferenceInput(t(-1.0), ref_chosen_logps=t(-2.0)), "kto")


def test_preference_loss_shared_checks() -> None:
    with pytest.raises(ValueError, match="beta"):
        preference_loss(_pair_input(beta=0.0), "sigmoid")
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(_pair_input(label_smoothing=0.6), "simpo")
    with pytest.raises(ValueError, match="shape"):
        preference_loss(PreferenceInput(t(1.0, 2.0), t(1.0), t(1.0), t(1.0)), "sigmoid")
    with pytest.raises(ValueError, match="discopop_tau"):
        preference_loss(_pair_input(discopop_tau=0.0), "discopop")


# --------------------------------------------------------------------------------------
# bandit acceptance test: DPO recovers the closed-form optimal policy
# --------------------------------------------------------------------------------------


def test_bandit_dpo_recovers_closed_form_policy() -> None:
    """Tabular policy over K answers, trained on the *expected* DPO loss.

    Deterministic version of the stochastic experiment: an unordered pair {i, j} of distinct
    answers is drawn uniformly (probability 1 / C(K, 2)) and i is labelled "chosen" with the
    Bradley-Terry probability sigmoid(r_i - r_j). The expected loss is therefore the sum over
    ordered pairs (chosen=i, rejected=j) of sigmoid(r_i - r_j) / C(K, 2) * loss(i, j).
    Its minimiser is the DPO paper's closed form pi(y) ∝ pi_ref(y) exp(r(y) / beta), i.e.
    log pi(y)/pi_ref(y) - r(y)/beta is the same for every y.
    """
    k, beta = 5, 0.5
    r = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0], dtype=D)
    ref_logp = torch.full((k,), -math.log(k), dtype=D)  # theta = 0 at init -> uniform ref
    pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
    ci = torch.tensor([i for i, _ in pairs])
    ri = torch.tensor([j for _, j in pairs])
    weights = torch.sigmoid(r[ci] - r[ri]) / (k * (k - 1) / 2)
    assert weights.sum().item() == pytest.approx(1.0)

    theta = torch.zeros(k, dtype=D, requires_grad=True)

    def deviation() -> torch.Tensor:
        logp = torch.log_softmax(theta.detach(), dim=0)
        dev = (logp - ref_logp) - r / beta
        return dev - dev.mean()

    assert deviation().abs().max().item() > 2.0  # far from the optimum at init

    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=200,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logp = torch.log_softmax(theta, dim=0)
        losses, _, _ = dpo_loss(
            logp[ci], logp[ri], ref_logp[ci], ref_logp[ri], beta=beta, loss_type="sigmoid"
        )
        loss = (weights * losses).sum()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)

    assert deviation().abs().max().item() <= 0.05
    pi = torch.softmax(theta.detach(), dim=0)
    expected_pi = torch.softmax(r / beta, dim=0)
    torch.testing.assert_close(pi, expected_pi, atol=1e-3, rtol=0)
    assert int(pi.argmax()) == 4


# --------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------

finite = st.floats(min_value=-20.0, max_value=20.0, allow_nan=False)
betas = st.floats(min_value=0.01, max_value=2.0)


@settings(max_examples=60, deadline=None)
@given(pc=finite, pr=finite, rc=finite, rr=finite, d=st.floats(0.01, 5.0), beta=betas)
def test_sigmoid_decreasing_in_margin(
    pc: float, pr: float, rc: float, rr: float, d: float, beta: float
) -> None:
    base, _, _ = dpo_loss(t(pc), t(pr), t(rc), t(rr), beta=beta)
    more_chosen, _, _ = dpo_loss(t(pc + d), t(pr), t(rc), t(rr), beta=beta)
    less_rejected, _, _ = dpo_loss(t(pc), t(pr - d), t(rc), t(rr), beta=beta)
    assert more_chosen.item() <= base.item()
    assert less_rejected.item() <= base.item()


@settings(max_examples=60, deadline=None)
@given(
    pc=finite,
    pr=finite,
    rc=finite,
    rr=finite,
    beta=betas,
    eps=st.floats(min_value=0.0, max_value=0.45),
)
def test_swap_relations(
    pc: float, pr: float, rc: float, rr: float, beta: float, eps: float
) -> None:
    h = (pc - rc) - (pr - rr)
    fwd, _, _ = dpo_loss(t(pc), t(pr), t(rc), t(rr), beta=beta)
    swp, _, _ = dpo_loss(t(pr), t(pc), t(rr), t(rc), beta=beta)
    # softplus(-x) - softplus(x) = -x
    assert fwd.item() - swp.item() == pytest.approx(-beta * h, abs=1e-9)
    # robust DPO is unbiased: averaging over a label flipped with prob eps gives clean DPO
    rob, _, _ = dpo_loss(
        t(pc), t(pr), t(rc), t(rr), beta=beta, loss_type="robust", label_smoothing=eps
    )
    rob_swp, _, _ = dpo_loss(
        t(pr), t(pc), t(rr), t(rc), beta=beta, loss_type="robust", label_smoothing=eps
    )
    assert (1 - eps) * rob.item() + eps * rob_swp.item() == pytest.approx(fwd.item(), abs=1e-7)
    # hinge against its formula over the whole range
    hin, _, _ = dpo_loss(t(pc), t(pr), t(rc), t(rr), beta=beta, loss_type="hinge")
    assert hin.item() == pytest.approx(max(0.0, 1 - beta * h), abs=1e-9)
