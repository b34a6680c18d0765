"""Hand-computed checks for signalrl.losses.distill (reverse KL, generalized JSD of GKD)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from signalrl.losses.distill import generalized_jsd, reverse_kl_per_token

P_TEACHER = [0.7, 0.2, 0.1]
P_STUDENT = [0.2, 0.3, 0.5]
# KL(T || S) = 0.7 ln 3.5 + 0.2 ln(2/3) + 0.1 ln 0.2
KL_T_S = 0.6348973
# KL(S || T) = 0.2 ln(2/7) + 0.3 ln 1.5 + 0.5 ln 5
KL_S_T = 0.6758059


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def _ref_jsd(p_t: list[float], p_s: list[float], beta: float) -> float:
    m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s, strict=True)]
    return beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)


def _logits(p: list[float], shift: float = 0.0) -> torch.Tensor:
    # logits = log p + arbitrary constant (softmax is shift invariant)
    return (torch.tensor(p).log() + shift).view(1, 1, -1)


def close(actual: torch.Tensor, expected: float | list, atol: float = 1e-5) -> None:
    exp = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.detach().double(), exp, atol=atol, rtol=1e-5)


def test_reference_constants() -> None:
    assert _kl(P_TEACHER, P_STUDENT) == pytest.approx(KL_T_S, abs=1e-6)
    assert _kl(P_STUDENT, P_TEACHER) == pytest.approx(KL_S_T, abs=1e-6)


def test_reverse_kl_per_token() -> None:
    s = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    t = torch.tensor([[-1.5, -1.0]])
    out = reverse_kl_per_token(s, t)
    close(out, [[0.5, -1.0]])
    out.sum().backward()
    assert s.grad is not None
    close(s.grad, [[1.0, 1.0]])
    with pytest.raises(ValueError, match="same shape"):
        reverse_kl_per_token(torch.zeros(1, 2), torch.zeros(1, 3))


def test_reverse_kl_per_token_expectation_is_reverse_kl() -> None:
    # E_{y ~ student}[log s(y) - log t(y)] = KL(S || T): exact expectation over the 3 tokens
    s = torch.tensor(P_STUDENT).log().view(1, 3)
    t = torch.tensor(P_TEACHER).log().view(1, 3)
    k = reverse_kl_per_token(s, t)
    close((torch.tensor(P_STUDENT) * k[0]).sum(), KL_S_T)


def test_jsd_beta_endpoints_are_forward_and_reverse_kl() -> None:
    s = _logits(P_STUDENT, shift=1.3)
    t = _logits(P_TEACHER, shift=-0.4)
    close(generalized_jsd(s, t, beta=0.0), KL_T_S)  # forward KL(teacher || student)
    close(generalized_jsd(s, t, beta=1.0), KL_S_T)  # reverse KL(student || teacher)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_interior_matches_reference(beta: float) -> None:
    s = _logits(P_STUDENT)
    t = _logits(P_TEACHER)
    close(generalized_jsd(s, t, beta=beta), _ref_jsd(P_TEACHER, P_STUDENT, beta))


def test_jsd_hand_value_at_half() -> None:
    # M = [0.45, 0.25, 0.3]
    m = [0.45, 0.25, 0.3]
    expected = 0.5 * (
        0.7 * math.log(0.7 / 0.45) + 0.2 * math.log(0.2 / 0.25) + 0.1 * math.log(0.1 / 0.3)
    ) + 0.5 * (0.2 * math.log(0.2 / 0.45) + 0.3 * math.log(0.3 / 0.25) + 0.5 * math.log(0.5 / m[2]))
    out = generalized_jsd(_logits(P_STUDENT), _logits(P_TEACHER), beta=0.5)
    close(out, expected)
    close(out, 0.1513581, atol=1e-6)
    assert 0.0 < out.item() < math.log(2)


def test_jsd_symmetry() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 8, generator=g)
    b = torch.randn(2, 3, 8, generator=g)
    # beta = 0.5 is symmetric; in general JSD_beta(S, T) = JSD_{1 - beta}(T, S)
    close(generalized_jsd(a, b, beta=0.5), generalized_jsd(b, a, beta=0.5).item())
    close(generalized_jsd(a, b, beta=0.2), generalized_jsd(b, a, beta=0.8).item())
    # forward and reverse KL differ in general
    assert (
        abs(generalized_jsd(a, b, beta=0.0).item() - generalized_jsd(a, b, beta=1.0).item()) > 1e-3
    )


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([0.0, 0.3, 0.5, 1.0]), st.integers(0, 10_000))
def test_jsd_zero_when_equal_and_nonnegative(beta: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2, 2, 6, generator=g) * 3
    assert abs(generalized_jsd(a, a.clone(), beta=beta).item()) < 1e-6
    b = torch.randn(2, 2, 6, generator=g) * 3
    assert generalized_jsd(a, b, beta=beta).item() >= -1e-6


def test_jsd_mask_selects_and_weights_tokens() -> None:
    s = torch.cat([_logits(P_STUDENT), _logits(P_TEACHER)], dim=1)  # token 2: equal dists
    t = torch.cat([_logits(P_TEACHER), _logits(P_TEACHER)], dim=1)
    close(generalized_jsd(s, t, torch.tensor([[1.0, 0.0]]), beta=0.0), KL_T_S)
    close(generalized_jsd(s, t, torch.tensor([[1.0, 1.0]]), beta=0.0), KL_T_S / 2)
    close(generalized_jsd(s, t, None, beta=0.0), KL_T_S / 2)
    close(generalized_jsd(s, t, torch.tensor([[3.0, 1.0]]), beta=0.0), 3 * KL_T_S / 4)


def test_jsd_empty_mask_is_zero_with_grad() -> None:
    s = torch.randn(1, 2, 4, requires_grad=True)
    out = generalized_jsd(s, torch.randn(1, 2, 4), torch.zeros(1, 2))
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert s.grad is not None and (s.grad == 0).all()


def test_jsd_temperature() -> None:
    s = _logits(P_STUDENT) * 2.0
    t = _logits(P_TEACHER) * 2.0
    close(generalized_jsd(s, t, beta=0.0, temperature=2.0), KL_T_S)
    close(generalized_jsd(s, t, beta=1.0, temperature=2.0), KL_S_T)


def _direct_jsd(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Full-materialisation reference, written independently of the implementation."""
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    ps, pt = ls.exp(), lt.exp()
    if beta == 0.0:
        per = (pt * (lt - ls)).sum(-1)
    elif beta == 1.0:
        per = (ps * (ls - lt)).sum(-1)
    else:
        lm = torch.log(beta * pt + (1 - beta) * ps)
        per = beta * (pt * (lt - lm)).sum(-1) + (1 - beta) * (ps * (ls - lm)).sum(-1)
    return (per * mask).sum() / mask.sum()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_chunking_matches_direct_value_and_gradients(beta: float) -> None:
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 4, 10, generator=g, requires_grad=True)
    t = torch.randn(3, 4, 10, generator=g, requires_grad=True)
    mask = (torch.rand(3, 4, generator=g) > 0.3).float()
    ref = _direct_jsd(s, t, mask, beta)
    ref_gs, ref_gt = torch.autograd.grad(ref, (s, t))
    for chunk_size in (1, 3, 1000):
        out = generalized_jsd(s, t, mask, beta=beta, chunk_size=chunk_size)
        close(out, ref.item())
        gs, gt = torch.autograd.grad(out, (s, t))
        close(gs, ref_gs)
        close(gt, ref_gt)


def test_jsd_handles_minus_inf_logits_and_bf16() -> None:
    s = torch.cat([_logits(P_STUDENT), torch.full((1, 1, 1), -math.inf)], -1)
    t = torch.cat([_logits(P_TEACHER), torch.full((1, 1, 1), -math.inf)], -1)
    s.requires_grad_(True)
    for beta, expected in (
        (0.0, KL_T_S),
        (0.5, _ref_jsd(P_TEACHER, P_STUDENT, 0.5)),
        (1.0, KL_S_T),
    ):
        out = generalized_jsd(s, t, beta=beta)
        close(out, expected)
        (grad,) = torch.autograd.grad(out, s)
        assert torch.isfinite(grad).all()
    out16 = generalized_jsd(_logits(P_STUDENT).bfloat16(), _logits(P_TEACHER).bfloat16(), beta=0.0)
    assert out16.dtype == torch.float32
    close(out16, KL_T_S, atol=2e-2)


def test_jsd_validation() -> None:
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(x, x, beta=1.5)
    with pytest.raises(ValueError, match="same shape"):
        generalized_jsd(x, torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="mask must have shape"):
        generalized_jsd(x, x, torch.ones(1, 3))
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd(x, x, temperature=0.0)
