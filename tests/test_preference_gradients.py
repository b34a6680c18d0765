"""Autograd gradients of the preference losses against their analytic gradients."""

from __future__ import annotations

import torch

from signalrl.losses.preference import PreferenceInput, dpo_loss, preference_loss, simpo_loss


def _inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    return pc.requires_grad_(), pr.requires_grad_(), rc, rr


def test_dpo_sigmoid_gradient() -> None:
    beta = 0.3
    pc, pr, rc, rr = _inputs(1)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="sigmoid")
    losses.sum().backward()
    h = (pc - rc) - (pr - rr)
    s = torch.sigmoid(-beta * h).detach()
    # L = -log sigmoid(beta h): dL/dpc = -beta sigmoid(-beta h), dL/dpr = +beta sigmoid(-beta h)
    torch.testing.assert_close(pc.grad, -beta * s)
    torch.testing.assert_close(pr.grad, beta * s)


def test_ipo_gradient() -> None:
    beta = 0.5
    pc, pr, rc, rr = _inputs(2)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    losses.sum().backward()
    h = ((pc - rc) - (pr - rr)).detach()
    # L = (h - 1/(2 beta))^2: dL/dpc = 2 (h - 1/(2 beta)) = -dL/dpr
    torch.testing.assert_close(pc.grad, 2 * (h - 1 / (2 * beta)))
    torch.testing.assert_close(pr.grad, -2 * (h - 1 / (2 * beta)))


def test_simpo_gradient() -> None:
    beta, gamma = 2.0, 0.5
    g = torch.Generator().manual_seed(3)
    ac = (torch.randn(6, generator=g, dtype=torch.float64) - 1).requires_grad_()
    ar = (torch.randn(6, generator=g, dtype=torch.float64) - 1).requires_grad_()
    losses, _, _ = simpo_loss(ac, ar, beta=beta, gamma=gamma)
    losses.sum().backward()
    z = (beta * (ac - ar) - gamma).detach()
    # L = -log sigmoid(z): dL/dac = -beta sigmoid(-z), dL/dar = +beta sigmoid(-z)
    torch.testing.assert_close(ac.grad, -beta * torch.sigmoid(-z))
    torch.testing.assert_close(ar.grad, beta * torch.sigmoid(-z))


def test_reference_logps_get_no_gradient_through_the_rewards() -> None:
    pc, pr, rc, rr = _inputs(4)
    rc.requires_grad_()
    _, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_orpo_entry_gradient() -> None:
    # L = -avg_c - beta log sig(lo), lo = (c - r) - (log(1 - e^c) - log(1 - e^r)), avg = seq/len:
    # dL/dpc = (-1 - beta sig(-lo) / (1 - e^c)) / L_c
    beta = 0.3
    g = torch.Generator().manual_seed(5)
    lc = torch.tensor([2.0, 5.0, 3.0], dtype=torch.float64)
    lr = torch.tensor([4.0, 1.0, 3.0], dtype=torch.float64)
    pc = (-torch.rand(3, generator=g, dtype=torch.float64) * 4 - 0.1).requires_grad_()
    pr = (-torch.rand(3, generator=g, dtype=torch.float64) * 4 - 0.1).requires_grad_()
    x = PreferenceInput(pc, pr, chosen_lengths=lc, rejected_lengths=lr, beta=beta)
    losses, _, _ = preference_loss(x, "orpo")
    losses.sum().backward()
    c, r = (pc / lc).detach(), (pr / lr).detach()
    lo = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
    s = torch.sigmoid(-lo)
    torch.testing.assert_close(pc.grad, (-1 - beta * s / (1 - torch.exp(c))) / lc)
    torch.testing.assert_close(pr.grad, (beta * s / (1 - torch.exp(r))) / lr)


def test_kto_entry_gradient() -> None:
    # desirable: L = w_d (1 - sig(u)), u = beta (r - z0): dL/dp = -w_d beta sig(u) sig(-u)
    # undesirable: L = w_u (1 - sig(v)), v = beta (z0 - r): dL/dp = +w_u beta sig(v) sig(-v)
    beta, z0, wd, wu = 0.4, 0.2, 1.5, 0.5
    p = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    desirable = torch.tensor([True, False, True])
    x = PreferenceInput(
        p,
        ref_chosen_logps=ref,
        desirable=desirable,
        kl_ref=z0,
        beta=beta,
        kto_desirable_weight=wd,
        kto_undesirable_weight=wu,
    )
    preference_loss(x, "kto")[0].sum().backward()
    r = (p - ref).detach()
    u, v = beta * (r - z0), beta * (z0 - r)
    want = torch.where(
        desirable,
        -wd * beta * torch.sigmoid(u) * torch.sigmoid(-u),
        wu * beta * torch.sigmoid(v) * torch.sigmoid(-v),
    )
    torch.testing.assert_close(p.grad, want)
