"""Preference-optimisation losses: the DPO family, SimPO, ORPO, RPO and KTO.

Every function here is a pure tensor function: no models, no I/O, no state. A trainer
computes sequence log-probabilities and passes them in.

Conventions (see docs/architecture.md, "Tensor conventions")
-----------------------------------------------------------
* A *sequence log-prob* is a ``(B,)`` float tensor: the sum of the per-token log-probs of
  the completion tokens, ``(logps * mask).sum(-1)``.
* An *average log-prob* ("avg") is that sum divided by the number of completion tokens,
  ``(logps * mask).sum(-1) / mask.sum(-1)``.
* ``pc, pr`` are the policy's chosen / rejected log-probs and ``rc, rr`` the reference's.
  The implicit DPO rewards are ``beta * (pc - rc)`` and ``beta * (pr - rr)``; they are
  returned *detached* (they are metrics, not part of the graph).
* Losses are returned per example, shape ``(B,)``; the trainer reduces them (usually with
  ``.mean()``).

Registry
--------
The losses a recipe selects by name (``preference.loss_type``) are registered in
:data:`signalrl.registry.PREFERENCE_LOSSES`, all with one signature,
``fn(x: PreferenceInput) -> (losses (B,), chosen_rewards (B,), rejected_rewards (B,))``:
the 14 DPO-family losses of :mod:`signalrl.losses.dpo` and, here, ``simpo`` and ``orpo``
(``reference_free=True``), ``rpo`` and ``kto`` (``unpaired=True``). Entries registered with
``f_divergence=True`` accept a non-default ``f_divergence_type``. A trainer calls
:func:`preference_loss`; a user loss with the same signature is selected as
``module:function``.

The DPO ``loss_type`` names and formulas follow Hugging Face TRL's ``DPOTrainer``; the few
places where we deliberately differ are marked "Differs from TRL" in the docstrings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from signalrl.registry import PREFERENCE_LOSSES, register_preference_loss

__all__ = [
    "DPO_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "PreferenceInput",
    "PreferenceOutput",
    "dpo_loss",
    "f_divergence_score",
    "kto_loss",
    "orpo_loss",
    "preference_loss",
    "preference_metrics",
    "rpo_loss",
    "simpo_loss",
]

#: The ``loss_type`` values accepted by :func:`dpo_loss`: the DPO family of
#: :mod:`signalrl.losses.dpo` (TRL's set, minus ``"sft"``, which needs token logits).
DPO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "robust",
    "ipo",
    "hinge",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)

#: The f-divergences of Wang et al. 2023 accepted as ``f_divergence_type``.
F_DIVERGENCE_TYPES: tuple[str, ...] = (
    "reverse_kl",
    "forward_kl",
    "js_divergence",
    "alpha_divergence",
)

# ORPO: average log-probs are clamped to at most this value so that log(1 - p) stays finite
# when p -> 1 (odds capped at ~1e6).
_ORPO_MAX_AVG_LOGP = -1e-6

#: What every registered preference loss returns: ``(losses, chosen_rewards,
#: rejected_rewards)``, each ``(B,)``, the rewards detached.
PreferenceOutput = tuple[Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class PreferenceInput:
    """What a preference loss gets (the one signature of ``PREFERENCE_LOSSES``).

    Log-probs are ``(B,)`` *sequence* log-probs (sums over the completion tokens):

    Attributes:
        policy_chosen_logps: the policy's chosen completions; for an unpaired loss (KTO)
            every row's completion, desirable or not (see ``desirable``).
        policy_rejected_logps: the policy's rejected completions (``None`` when unpaired).
        ref_chosen_logps, ref_rejected_logps: the reference's (``None`` for a
            reference-free loss; ``ref_rejected_logps`` ``None`` when unpaired).
        chosen_lengths, rejected_lengths: ``(B,)`` completion lengths in tokens (clamped to
            >= 1 here); used by simpo / orpo / rpo (averages), ``sigmoid_norm`` and ``ipo``.
        beta: inverse temperature / KL strength (IPO's tau, SimPO's beta, ORPO's lambda).
        label_smoothing: ``eps`` in ``[0, 0.5]`` (cDPO, robust, EXO, AOT, SimPO).
        f_divergence_type, f_alpha_divergence_coef: f-DPO (:func:`f_divergence_score`).
        bco_delta: BCO reward shift; discopop_tau: DiscoPOP temperature;
        simpo_gamma: SimPO margin; rpo_alpha: RPO's NLL weight.
        kto_desirable_weight, kto_undesirable_weight: KTO's ``w_d``, ``w_u``.
        desirable: KTO: ``(B,)`` bool, True for the desirable rows.
        kl_ref: KTO: the reference point, a detached estimate of ``KL(policy || ref)``.
    """

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor | None = None
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    bco_delta: float | Tensor = 0.0
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    rpo_alpha: float = 1.0
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    desirable: Tensor | None = None
    kl_ref: Tensor | float = 0.0


# --------------------------------------------------------------------------------------
# helpers (also used by signalrl.losses.dpo)
# --------------------------------------------------------------------------------------


def _exp_cap(dtype: torch.dtype) -> float:
    """Largest exponent whose ``exp`` is comfortably representable in ``dtype`` (<= 80)."""
    return min(80.0, math.log(torch.finfo(dtype).max) - 1.0)


def _capped_exp(x: Tensor) -> Tensor:
    """``exp(min(x, cap))``: an ``exp`` that cannot overflow to ``inf``."""
    return torch.exp(torch.clamp(x, max=_exp_cap(x.dtype)))


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"all inputs must have the same shape (B,), got {shapes}")


def _as_lengths(lengths: Tensor | None, like: Tensor, name: str, loss_type: str) -> Tensor:
    if lengths is None:
        raise ValueError(f"loss_type={loss_type!r} needs `{name}` (completion lengths, shape (B,))")
    lengths = torch.as_tensor(lengths, device=like.device).to(like.dtype)
    if lengths.shape != like.shape:
        raise ValueError(
            f"`{name}` must have shape {tuple(like.shape)}, got {tuple(lengths.shape)}"
        )
    return lengths.clamp(min=1.0)


def _required(value: Tensor | None, name: str, loss_type: str) -> Tensor:
    if value is None:
        raise ValueError(f"loss_type={loss_type!r} needs `{name}`")
    return value


def _paired_logps(x: PreferenceInput, loss_type: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(pc, pr, rc, rr)``; a ValueError when one is missing."""
    return (
        x.policy_chosen_logps,
        _required(x.policy_rejected_logps, "policy_rejected_logps", loss_type),
        _required(x.ref_chosen_logps, "ref_chosen_logps", loss_type),
        _required(x.ref_rejected_logps, "ref_rejected_logps", loss_type),
    )


def _average_logps(x: PreferenceInput, loss_type: str) -> tuple[Tensor, Tensor]:
    """The policy's average log-probs ``(pc / L_c, pr / L_r)``."""
    pc = x.policy_chosen_logps
    pr = _required(x.policy_rejected_logps, "policy_rejected_logps", loss_type)
    lc = _as_lengths(x.chosen_lengths, pc, "chosen_lengths", loss_type)
    lr = _as_lengths(x.rejected_lengths, pr, "rejected_lengths", loss_type)
    return pc / lc, pr / lr


def _smoothed_sigmoid_loss(z: Tensor, eps: float) -> Tensor:
    """``-(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)`` (cDPO-style label smoothing)."""
    if eps == 0.0:
        return -F.logsigmoid(z)
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of ``-log 2``."""
    return torch.where(
        x > -math.log(2.0),
        torch.log(-torch.expm1(x)),
        torch.log1p(-torch.exp(x)),
    )


# --------------------------------------------------------------------------------------
# f-divergence scores
# --------------------------------------------------------------------------------------


def f_divergence_score(
    logratios: Tensor,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> Tensor:
    r"""The f-DPO score ``f'(u)`` of a policy/reference log-ratio ``log u = log pi - log pi_ref``.

    Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with
    Diverse Divergence Constraints" (arXiv:2309.16240): replacing the reverse-KL regulariser
    of the RLHF objective by an f-divergence replaces the DPO log-ratio ``log u`` by ``f'(u)``;
    the DPO score becomes ``h = f'(u_w) - f'(u_l)``. With ``x = log u``:

    * ``reverse_kl``:       ``f'(u) = log u``                   -> ``x`` (plain DPO)
    * ``forward_kl``:       ``f'(u) = 1 - 1/u``                 -> ``1 - exp(-x)``
    * ``js_divergence``:    ``f'(u) = log(2u / (1 + u))``       -> ``log 2 + log sig(x)``
    * ``alpha_divergence``: ``f'(u) = (u^(a-1) - 1) / (a - 1)`` -> ``(exp((a-1)x) - 1)/(a-1)``

    with ``a = f_alpha_divergence_coef``; ``a -> 1`` is the reverse-KL limit (used when
    ``|a - 1| < 1e-6``) and ``a = 0`` is forward KL. This is TRL's current parameterisation
    (default ``a = 0.5``). The paper writes ``f'(u) = (1 - u^(-alpha)) / alpha``, i.e. its
    ``alpha`` equals ``1 - a`` here (older TRL releases used the paper's convention; the two
    coincide at the default 0.5). Additive constants cancel in ``h``.

    Exponents are clamped at ``min(80, log(dtype max) - 1)`` so ``exp`` cannot overflow
    (TRL clamps the alpha case the same way; we also clamp ``forward_kl``).
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1.0 - _capped_exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        a = float(f_alpha_divergence_coef)
        if abs(a - 1.0) < 1e-6:
            return logratios
        return (_capped_exp((a - 1.0) * logratios) - 1.0) / (a - 1.0)
    raise ValueError(
        f"unknown f_divergence_type {f_divergence_type!r}; valid: {', '.join(F_DIVERGENCE_TYPES)}"
    )


# --------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------


def _check_input(x: PreferenceInput, loss_type: str) -> None:
    """Checks shared by every preference loss: the f-divergence (known, and accepted by the
    entry), ``beta > 0``, ``label_smoothing`` in ``[0, 0.5]``, same-shape log-probs."""
    if x.f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(
            f"unknown f_divergence_type {x.f_divergence_type!r}; "
            f"valid: {', '.join(F_DIVERGENCE_TYPES)}"
        )
    key = "f_divergence"
    if x.f_divergence_type != "reverse_kl" and not PREFERENCE_LOSSES.meta(loss_type, key, False):
        with_f = [n for n in PREFERENCE_LOSSES.registered() if PREFERENCE_LOSSES.meta(n, key)]
        raise ValueError(
            f"loss_type={loss_type!r} has no f-divergence generalisation; "
            f"f_divergence_type={x.f_divergence_type!r} is only valid with "
            f"{', '.join(sorted(with_f))}"
        )
    if not x.beta > 0:
        raise ValueError(f"beta must be > 0, got {x.beta}")
    if not 0.0 <= float(x.label_smoothing) <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {x.label_smoothing}")
    logps = {
        "policy_chosen_logps": x.policy_chosen_logps,
        "policy_rejected_logps": x.policy_rejected_logps,
        "ref_chosen_logps": x.ref_chosen_logps,
        "ref_rejected_logps": x.ref_rejected_logps,
    }
    _check_same_shape(**{k: v for k, v in logps.items() if v is not None})


def preference_loss(x: PreferenceInput, loss_type: str) -> PreferenceOutput:
    """The ``PREFERENCE_LOSSES`` entry ``loss_type`` (a registered name or a user
    ``module:function``) applied to ``x``, after the shared checks of the inputs.

    Returns ``(losses (B,), chosen_rewards (B,), rejected_rewards (B,))``, rewards detached
    (an unpaired loss returns the rewards of all rows twice). An unknown name is a
    ValueError listing the valid ones."""
    fn = PREFERENCE_LOSSES.get(loss_type)
    _check_input(x, loss_type)
    return fn(x)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    bco_delta: float | Tensor = 0.0,
    discopop_tau: float = 0.05,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> PreferenceOutput:
    r"""Per-example loss of the DPO family, plus the implicit rewards.

    ``loss_type`` is one of :data:`DPO_LOSS_TYPES`; each is a registered function of
    :mod:`signalrl.losses.dpo` (formula and paper in its docstring), reached through
    :func:`preference_loss`. ``f_divergence_type`` (:func:`f_divergence_score`) changes the
    scores of the types built on ``h = s_w - s_l`` -- ``sigmoid``, ``sigmoid_norm``,
    ``robust``, ``ipo``, ``hinge``, ``exo_pair``, ``discopop``; with any other type a
    non-default f-divergence is a ``ValueError`` (as in TRL).

    The arguments are the fields of :class:`PreferenceInput` of the same names (``pc, pr, rc,
    rr`` are ``(B,)`` sequence log-probs; ``label_smoothing`` is read by ``sigmoid``,
    ``robust`` (``< 0.5``), ``exo_pair``, ``aot``, ``aot_unpaired``; the lengths by
    ``sigmoid_norm`` (required) and ``ipo`` (optional)).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``; the rewards are
        ``beta * (pc - rc)`` and ``beta * (pr - rr)``, detached.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    x = PreferenceInput(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        beta=beta,
        label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        bco_delta=bco_delta,
        discopop_tau=discopop_tau,
    )
    return preference_loss(x, loss_type)


# --------------------------------------------------------------------------------------
# RPO, SimPO, ORPO, KTO as tensor functions
# --------------------------------------------------------------------------------------


def rpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_nll: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    **dpo_kwargs: Any,
) -> PreferenceOutput:
    r"""RPO: a DPO-family loss plus a weighted NLL on the chosen completion.

    Pang et al. 2024, "Iterative Reasoning Preference Optimization" (arXiv:2404.19733):
    ``L_RPO = L_DPO + alpha * NLL(chosen)``, where the NLL is the negative log-likelihood of
    the chosen completion (TRL's ``rpo_alpha`` uses the token-mean cross-entropy; the paper
    normalises by length too). ``chosen_nll`` is ``(B,)`` or a scalar (broadcast).

    ``dpo_kwargs`` are forwarded to :func:`dpo_loss`.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)`` with
        ``losses = dpo_losses + alpha * chosen_nll`` (shape ``(B,)``).
    """
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        loss_type=loss_type,
        **dpo_kwargs,
    )
    return losses + alpha * chosen_nll, chosen_rewards, rejected_rewards


def simpo_loss(
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    r"""SimPO, Meng et al. 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward" (arXiv:2405.14734).

    Reference-free, on length-averaged log-probs: with
    ``z = beta * (avg_c - avg_r) - gamma``,
    ``loss = -(1 - eps) log sig(z) - eps log sig(-z)`` (``eps = label_smoothing``, 0 gives
    the paper's ``-log sig(z)``; this is TRL ``CPOTrainer``'s ``loss_type="simpo"``).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, rewards ``beta * avg`` detached.
    """
    _check_same_shape(chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps)
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    z = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    losses = _smoothed_sigmoid_loss(z, float(label_smoothing))
    return losses, (beta * chosen_avg_logps).detach(), (beta * rejected_avg_logps).detach()


def orpo_loss(
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, Tensor]:
    r"""The odds-ratio term of ORPO, Hong et al. 2024, "ORPO: Monolithic Preference
    Optimization without Reference Model" (arXiv:2403.07691).

    With ``odds(y) = p / (1 - p)`` and ``log p = avg`` (length-averaged log-prob):
    ``log_odds = (avg_c - avg_r) - (log(1 - exp(avg_c)) - log(1 - exp(avg_r)))`` and
    ``losses = -beta * log sig(log_odds)``. The full ORPO objective adds this to the
    chosen NLL (the registered ``orpo``). ``log(1 - exp(x))`` is evaluated stably (``expm1``
    near 0, ``log1p`` below ``-log 2``) and the averages are clamped to ``<= -1e-6`` so that
    ``p -> 1`` gives finite values and gradients.

    Returns:
        ``(losses, log_odds)``, both ``(B,)``; ``log_odds`` is detached (a metric).
    """
    _check_same_shape(chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps)
    c = torch.clamp(chosen_avg_logps, max=_ORPO_MAX_AVG_LOGP)
    r = torch.clamp(rejected_avg_logps, max=_ORPO_MAX_AVG_LOGP)
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    losses = -beta * F.logsigmoid(log_odds)
    return losses, log_odds.detach()


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_ref: Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    r"""Unpaired KTO, Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization" (arXiv:2402.01306).

    With ``r = policy_logps - ref_logps`` and the reference point
    ``z0 = max(kl_ref, 0)`` (detached; ``kl_ref`` is the trainer's estimate of
    ``KL(pi || pi_ref)``, e.g. from mismatched prompt/completion pairs):

    * desirable examples:   ``w_d * (1 - sig(beta (r - z0)))``
    * undesirable examples: ``w_u * (1 - sig(beta (z0 - r)))``

    ``desirable`` is a ``(B,)`` bool tensor. Returns ``(losses, rewards)``, both ``(B,)``,
    with ``rewards = beta * r`` detached.
    """
    _check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps)
    if desirable.shape != policy_logps.shape:
        raise ValueError(
            f"`desirable` must have shape {tuple(policy_logps.shape)}, got {tuple(desirable.shape)}"
        )
    desirable = desirable.to(device=policy_logps.device, dtype=torch.bool)
    logratios = policy_logps - ref_logps
    z0 = torch.as_tensor(kl_ref, dtype=logratios.dtype, device=logratios.device)
    z0 = z0.detach().clamp(min=0.0)
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - z0)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return losses, (beta * logratios).detach()


# --------------------------------------------------------------------------------------
# registered: reference-free, RPO, unpaired
# --------------------------------------------------------------------------------------


@register_preference_loss("simpo", reference_free=True)
def simpo(x: PreferenceInput) -> PreferenceOutput:
    """SimPO (Meng et al. 2024, arXiv:2405.14734), reference-free: on the average log-probs
    ``avg = seq / length``, ``z = beta (avg_c - avg_r) - simpo_gamma`` and
    ``-(1 - eps) log sig(z) - eps log sig(-z)`` (:func:`simpo_loss`). Rewards
    ``beta * avg``. Needs ``chosen_lengths`` and ``rejected_lengths``."""
    avg_c, avg_r = _average_logps(x, "simpo")
    return simpo_loss(
        avg_c, avg_r, beta=x.beta, gamma=x.simpo_gamma, label_smoothing=x.label_smoothing
    )


@register_preference_loss("orpo", reference_free=True)
def orpo(x: PreferenceInput) -> PreferenceOutput:
    """ORPO (Hong et al. 2024, arXiv:2403.07691), reference-free, on the average log-probs
    ``avg = seq / length``: ``-avg_c - beta log sig(log_odds)`` -- the chosen token-mean NLL
    plus the odds-ratio term of :func:`orpo_loss` (``beta`` is the paper's lambda). Rewards
    ``beta * avg``. Needs ``chosen_lengths`` and ``rejected_lengths``."""
    avg_c, avg_r = _average_logps(x, "orpo")
    odds, _ = orpo_loss(avg_c, avg_r, beta=x.beta)
    losses = -avg_c + odds
    return losses, (x.beta * avg_c).detach(), (x.beta * avg_r).detach()


@register_preference_loss("rpo", f_divergence=True)
def rpo(x: PreferenceInput) -> PreferenceOutput:
    """RPO (Pang et al. 2024, arXiv:2404.19733): DPO ``sigmoid`` (with ``label_smoothing``
    and the f-divergence) plus ``rpo_alpha`` times the chosen token-mean NLL
    ``-pc / chosen_lengths`` (:func:`rpo_loss`). Rewards as DPO. Needs ``chosen_lengths``."""
    pc, pr, rc, rr = _paired_logps(x, "rpo")
    nll = -(pc / _as_lengths(x.chosen_lengths, pc, "chosen_lengths", "rpo"))
    return rpo_loss(
        pc,
        pr,
        rc,
        rr,
        nll,
        alpha=x.rpo_alpha,
        loss_type="sigmoid",
        beta=x.beta,
        label_smoothing=x.label_smoothing,
        f_divergence_type=x.f_divergence_type,
        f_alpha_divergence_coef=x.f_alpha_divergence_coef,
        chosen_lengths=x.chosen_lengths,
        rejected_lengths=x.rejected_lengths,
    )


@register_preference_loss("kto", unpaired=True)
def kto(x: PreferenceInput) -> PreferenceOutput:
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306), unpaired: row ``i`` is one completion,
    ``policy_chosen_logps`` / ``ref_chosen_logps`` its log-probs, ``desirable[i]`` its label:
    ``w_d (1 - sig(beta (r - z0)))`` for desirable rows and ``w_u (1 - sig(beta (z0 - r)))``
    for the others, ``r = policy - ref``, ``z0 = max(kl_ref, 0)`` detached (:func:`kto_loss`).

    Returns ``(losses, rewards, rewards)``: the same ``(B,)`` tensor ``beta * r`` (detached)
    twice, one reward per row; split it with ``desirable`` for the chosen/rejected metrics.
    """
    ref = _required(x.ref_chosen_logps, "ref_chosen_logps", "kto")
    desirable = _required(x.desirable, "desirable", "kto")
    losses, rewards = kto_loss(
        x.policy_chosen_logps,
        ref,
        desirable,
        x.kl_ref,
        beta=x.beta,
        desirable_weight=x.kto_desirable_weight,
        undesirable_weight=x.kto_undesirable_weight,
    )
    return losses, rewards, rewards


# --------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------


def preference_metrics(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
) -> dict[str, float]:
    """The field's standard preference metrics, as batch means (floats).

    ``rewards/chosen``, ``rewards/rejected``: mean implicit rewards;
    ``rewards/accuracies``: fraction of pairs with chosen reward > rejected reward;
    ``rewards/margins``: mean of ``chosen - rejected`` rewards;
    ``logps/chosen``, ``logps/rejected``: mean policy log-probs.
    """
    cr = chosen_rewards.detach().float()
    rr = rejected_rewards.detach().float()
    return {
        "rewards/chosen": cr.mean().item(),
        "rewards/rejected": rr.mean().item(),
        "rewards/accuracies": (cr > rr).float().mean().item(),
        "rewards/margins": (cr - rr).mean().item(),
        "logps/chosen": policy_chosen_logps.detach().float().mean().item(),
        "logps/rejected": policy_rejected_logps.detach().float().mean().item(),
    }
