"""The DPO family of preference losses: one registered function per ``loss_type``.

Each entry is ``fn(x: PreferenceInput) -> (losses, chosen_rewards, rejected_rewards)``
(:data:`signalrl.registry.PREFERENCE_LOSSES`; call them through
:func:`signalrl.losses.preference.preference_loss` or :func:`~signalrl.losses.preference.dpo_loss`,
which run the shared input checks). The rewards are ``beta * (pc - rc)`` and
``beta * (pr - rr)``, detached, for every entry.

Notation: ``a = pc - rc`` and ``b = pr - rr`` are the chosen / rejected log-ratios of the
sequence log-probs; ``s_w = f'(a)``, ``s_l = f'(b)`` their f-divergence scores
(:func:`~signalrl.losses.preference.f_divergence_score`; ``s = a, b`` for the default reverse
KL) and ``h = s_w - s_l``, which for reverse KL is ``(pc - rc) - (pr - rr)``;
``eps = label_smoothing``, ``sig`` is the logistic sigmoid. Entries registered with
``f_divergence=True`` are the ones built on ``h``. Names and formulas follow Hugging Face
TRL's ``DPOTrainer``; deliberate differences are marked "Differs from TRL".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from signalrl.losses.preference import (
    PreferenceInput,
    PreferenceOutput,
    _as_lengths,
    _exp_cap,
    _paired_logps,
    _smoothed_sigmoid_loss,
    f_divergence_score,
)
from signalrl.registry import register_preference_loss

# EXO's epsilon when the caller leaves ``label_smoothing`` at 0 (log(0) is undefined); the
# value the EXO paper recommends.
_EXO_DEFAULT_EPSILON = 1e-3


def _logratios(x: PreferenceInput, loss_type: str) -> tuple[Tensor, Tensor]:
    """``(a, b) = (pc - rc, pr - rr)``."""
    pc, pr, rc, rr = _paired_logps(x, loss_type)
    return pc - rc, pr - rr


def _out(x: PreferenceInput, losses: Tensor, a: Tensor, b: Tensor) -> PreferenceOutput:
    return losses, (x.beta * a).detach(), (x.beta * b).detach()


def _score_diff(
    x: PreferenceInput, a: Tensor, b: Tensor, loss_type: str, normalise: bool = False
) -> Tensor:
    """``h = s_w - s_l`` (each score divided by its completion length when ``normalise``)."""
    s_w = f_divergence_score(a, x.f_divergence_type, x.f_alpha_divergence_coef)
    s_l = f_divergence_score(b, x.f_divergence_type, x.f_alpha_divergence_coef)
    if normalise:
        s_w = s_w / _as_lengths(x.chosen_lengths, s_w, "chosen_lengths", loss_type)
        s_l = s_l / _as_lengths(x.rejected_lengths, s_l, "rejected_lengths", loss_type)
    return s_w - s_l


@register_preference_loss("sigmoid", f_divergence=True)
def sigmoid(x: PreferenceInput) -> PreferenceOutput:
    """DPO, Rafailov et al. 2023 (arXiv:2305.18290): ``-log sig(beta h)``. With ``eps > 0``
    conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy preferences"):
    ``-(1-eps) log sig(beta h) - eps log sig(-beta h)``. (Differs from current TRL, whose
    ``sigmoid`` ignores ``label_smoothing``; older TRL releases implemented cDPO like this.)"""
    a, b = _logratios(x, "sigmoid")
    z = x.beta * _score_diff(x, a, b, "sigmoid")
    return _out(x, _smoothed_sigmoid_loss(z, float(x.label_smoothing)), a, b)


@register_preference_loss("robust", f_divergence=True)
def robust(x: PreferenceInput) -> PreferenceOutput:
    """Robust DPO, Chowdhury et al. 2024 (arXiv:2403.00409), unbiased when labels flip with
    probability ``eps < 0.5``:
    ``((1-eps)(-log sig(beta h)) - eps(-log sig(-beta h))) / (1 - 2 eps)``."""
    eps = float(x.label_smoothing)
    if eps >= 0.5:
        raise ValueError(f"robust DPO needs label_smoothing < 0.5, got {eps}")
    a, b = _logratios(x, "robust")
    z = x.beta * _score_diff(x, a, b, "robust")
    losses = ((1.0 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return _out(x, losses, a, b)


@register_preference_loss("ipo", f_divergence=True)
def ipo(x: PreferenceInput) -> PreferenceOutput:
    """IPO, Azar et al. 2023 (arXiv:2310.12036): ``(h - 1/(2 beta))^2``, beta being the
    paper's tau. IPO is meant for *length-averaged* log-probs: pass average log-probs, or
    sequence log-probs with ``chosen_lengths``/``rejected_lengths`` and the scores are divided
    by them (TRL's behaviour: ``h = s_w / L_w - s_l / L_l``)."""
    a, b = _logratios(x, "ipo")
    normalise = x.chosen_lengths is not None or x.rejected_lengths is not None
    h = _score_diff(x, a, b, "ipo", normalise=normalise)
    return _out(x, (h - 1.0 / (2.0 * x.beta)) ** 2, a, b)


@register_preference_loss("hinge", f_divergence=True)
def hinge(x: PreferenceInput) -> PreferenceOutput:
    """SLiC, Zhao et al. 2023 (arXiv:2305.10425): ``relu(1 - beta h)``."""
    a, b = _logratios(x, "hinge")
    z = x.beta * _score_diff(x, a, b, "hinge")
    return _out(x, torch.relu(1.0 - z), a, b)


@register_preference_loss("exo_pair", f_divergence=True)
def exo_pair(x: PreferenceInput) -> PreferenceOutput:
    """EXO, Ji et al. 2024 (arXiv:2402.00856, eq. 16), ``KL(q || p)`` with
    ``q = (sig(beta h), sig(-beta h))`` and ``p = (1 - eps, eps)``:
    ``sig(beta h)(log sig(beta h) - log(1-eps)) + sig(-beta h)(log sig(-beta h) - log eps)``;
    ``eps = 0`` is replaced by the paper's ``1e-3``."""
    eps = float(x.label_smoothing)
    e = eps if eps > 0.0 else _EXO_DEFAULT_EPSILON
    a, b = _logratios(x, "exo_pair")
    z = x.beta * _score_diff(x, a, b, "exo_pair")
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-e)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(e)
    )
    return _out(x, losses, a, b)


@register_preference_loss("nca_pair")
def nca_pair(x: PreferenceInput) -> PreferenceOutput:
    """NCA, Chen et al. 2024 (arXiv:2402.05369):
    ``-log sig(beta a) - 0.5 log sig(-beta a) - 0.5 log sig(-beta b)``."""
    a, b = _logratios(x, "nca_pair")
    beta = x.beta
    losses = -F.logsigmoid(beta * a) - 0.5 * F.logsigmoid(-beta * a) - 0.5 * F.logsigmoid(-beta * b)
    return _out(x, losses, a, b)


@register_preference_loss("bco_pair")
def bco_pair(x: PreferenceInput) -> PreferenceOutput:
    """BCO, Jung et al. 2024 (arXiv:2404.04656), with reward shift ``delta = bco_delta`` (a
    running mean of the rewards, kept by the trainer; detached):
    ``-log sig(beta a - delta) - log sig(-(beta b - delta))``. Current TRL uses
    ``delta = 0`` (the default); older TRL kept the running mean internally."""
    a, b = _logratios(x, "bco_pair")
    delta = torch.as_tensor(x.bco_delta, dtype=a.dtype, device=a.device).detach()
    losses = -F.logsigmoid(x.beta * a - delta) - F.logsigmoid(-(x.beta * b - delta))
    return _out(x, losses, a, b)


@register_preference_loss("sppo_hard")
def sppo_hard(x: PreferenceInput) -> PreferenceOutput:
    """SPPO with hard win probabilities, Wu et al. 2024 (arXiv:2405.00675):
    ``(a - 1/(2 beta))^2 + (b + 1/(2 beta))^2``."""
    a, b = _logratios(x, "sppo_hard")
    return _out(x, (a - 0.5 / x.beta) ** 2 + (b + 0.5 / x.beta) ** 2, a, b)


@register_preference_loss("aot")
def aot(x: PreferenceInput) -> PreferenceOutput:
    """AOT paired, Melnyk et al. 2024 (arXiv:2406.05882): with
    ``d = sort(pc - pr) - sort(rc - rr)`` (each sorted over the batch),
    ``-(1-eps) log sig(beta d) - eps log sig(-beta d)``. Row ``i`` of the losses belongs to
    the ``i``-th order statistic, not to input pair ``i`` (only the batch mean is meaningful)."""
    pc, pr, rc, rr = _paired_logps(x, "aot")
    a, b = pc - rc, pr - rr
    d = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
    return _out(x, _smoothed_sigmoid_loss(x.beta * d, float(x.label_smoothing)), a, b)


@register_preference_loss("aot_unpaired")
def aot_unpaired(x: PreferenceInput) -> PreferenceOutput:
    """AOT unpaired, Melnyk et al. 2024 (arXiv:2406.05882): ``d = sort(a) - sort(b)``, then
    ``-(1-eps) log sig(beta d) - eps log sig(-beta d)`` (rows are order statistics, as in
    ``aot``)."""
    a, b = _logratios(x, "aot_unpaired")
    d = torch.sort(a, dim=0).values - torch.sort(b, dim=0).values
    return _out(x, _smoothed_sigmoid_loss(x.beta * d, float(x.label_smoothing)), a, b)


@register_preference_loss("apo_zero")
def apo_zero(x: PreferenceInput) -> PreferenceOutput:
    """APO-zero, D'Oosterlinck et al. 2024 (arXiv:2408.06266, eq. 7):
    ``(1 - sig(beta a)) + sig(beta b)``."""
    a, b = _logratios(x, "apo_zero")
    return _out(x, (1.0 - torch.sigmoid(x.beta * a)) + torch.sigmoid(x.beta * b), a, b)


@register_preference_loss("apo_down")
def apo_down(x: PreferenceInput) -> PreferenceOutput:
    """APO-down, D'Oosterlinck et al. 2024 (arXiv:2408.06266, eq. 8):
    ``sig(beta a) + (1 - sig(beta (a - b)))``."""
    a, b = _logratios(x, "apo_down")
    return _out(x, torch.sigmoid(x.beta * a) + (1.0 - torch.sigmoid(x.beta * (a - b))), a, b)


@register_preference_loss("discopop", f_divergence=True)
def discopop(x: PreferenceInput) -> PreferenceOutput:
    """DiscoPOP / log-ratio modulated loss, Chan et al. 2024 (arXiv:2406.08414, eq. 5): with
    ``z = beta h`` and ``m = sig(z / tau)``, ``(1 - m)(-log sig(z)) + m exp(-z)``,
    ``tau = discopop_tau > 0``. (``m exp(-z)`` is evaluated as ``exp(-z + log sig(z/tau))``
    so that very negative ``z`` gives no ``0 * inf``.)"""
    tau = x.discopop_tau
    if not tau > 0:
        raise ValueError(f"discopop_tau must be > 0, got {tau}")
    a, b = _logratios(x, "discopop")
    z = x.beta * _score_diff(x, a, b, "discopop")
    m = torch.sigmoid(z / tau)
    exp_term = torch.exp(torch.clamp(-z + F.logsigmoid(z / tau), max=_exp_cap(z.dtype)))
    return _out(x, (1.0 - m) * -F.logsigmoid(z) + exp_term, a, b)


@register_preference_loss("sigmoid_norm", f_divergence=True)
def sigmoid_norm(x: PreferenceInput) -> PreferenceOutput:
    """Length-normalised DPO (TRL's ``sigmoid_norm``; the length-normalised DPO of Tulu 3,
    Lambert et al. 2024, arXiv:2411.15124): ``-log sig(beta (s_w / L_w - s_l / L_l))`` with
    ``L = chosen_lengths / rejected_lengths`` (required; clamped to >= 1); pass *summed*
    log-probs. ``label_smoothing`` is not read; the rewards stay un-normalised, as in TRL."""
    a, b = _logratios(x, "sigmoid_norm")
    z = x.beta * _score_diff(x, a, b, "sigmoid_norm", normalise=True)
    return _out(x, _smoothed_sigmoid_loss(z, 0.0), a, b)
