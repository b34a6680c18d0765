"""Autograd gradients of the preference losses against their analytic gradients."""

from __future__ import annotations

import torch

from signalrl.losses.preference import dpo_loss, simpo_loss


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    return pc.requires_grad_(), pr.requires_grad_(), rc, rr


def test_dpo_sigmoid_gradient():
    beta = 0.3
    pc, pr, rc, rr = _inputs(1)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="sigmoid")
    losses.sum().backward()
    h = (pc - rc) - (pr - rr)
    s = torch.sigmoid(-beta * h).detach()
    # L = -log sigmoid(beta h): dL/dpc = -beta sigmoid(-beta h), dL/dpr = +beta sigmoid(-beta h)
    torch.testing.assert_close(pc.grad, -beta * s)
    torch.testing.assert_close(pr.grad, beta * s)


def test_ipo_gradient():
    beta = 0.5
    pc, pr, rc, rr = _inputs(2)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    losses.sum().backward()
    h = ((pc - rc) - (pr - rr)).detach()
    # L = (h - 1/(2 beta))^2: dL/dpc = 2 (h - 1/(2 beta)) = -dL/dpr
    torch.testing.assert_close(pc.grad, 2 * (h - 1 / (2 * beta)))
    torch.testing.assert_close(pr.grad, -2 * (h - 1 / (2 * beta)))


def test_simpo_gradient():
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


def test_reference_logps_get_no_gradient_through_the_rewards():
    pc, pr, rc, rr = _inputs(4)
    rc.requires_grad_()
    _, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
