"""Preference-optimisation losses: the DPO family, SimPO, ORPO, KTO, RPO and mixtures.

Every function here is a pure tensor function: no models, no I/O, no state. A trainer
computes sequence log-probabilities and passes them in.

Conventions
-----------
* A *sequence log-prob* is a ``(B,)`` float tensor: the sum of the per-token log-probs of
  the completion tokens, ``(logps * mask).sum(-1)``.
* An *average log-prob* ("avg") is that sum divided by the number of completion tokens,
  ``(logps * mask).sum(-1) / mask.sum(-1)``.
* ``pc, pr`` are the policy's chosen / rejected log-probs and ``rc, rr`` the reference's.
  The implicit DPO rewards are ``beta * (pc - rc)`` and ``beta * (pr - rr)``; they are
  returned *detached* (they are metrics, not part of the graph).
* Losses are returned per example, shape ``(B,)``; the trainer reduces them (usually with
  ``.mean()``).

The ``loss_type`` names and formulas of :func:`dpo_loss` follow Hugging Face TRL's
``DPOTrainer`` (``trl/trainer/dpo_trainer.py``); the few places where we deliberately differ
are marked "Differs from TRL" in the docstrings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DPO_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "combine_losses",
    "dpo_loss",
    "dpo_loss_mixture",
    "f_divergence_score",
    "kto_loss",
    "orpo_loss",
    "preference_metrics",
    "rpo_loss",
    "simpo_loss",
]

#: Every ``loss_type`` accepted by :func:`dpo_loss` (TRL's set, minus ``"sft"``, which needs
#: token logits and is handled by :func:`dpo_loss_mixture` / :func:`combine_losses`).
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

# Loss types built on the chosen-minus-rejected score difference; only these have an
# f-divergence generalisation (TRL rejects a non-default f-divergence for the others).
_F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"}
)

# Loss types that read ``label_smoothing``.
_LABEL_SMOOTHING_LOSS_TYPES = frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"})

# EXO's epsilon when the caller leaves ``label_smoothing`` at 0 (log(0) is undefined); the
# value the EXO paper recommends.
_EXO_DEFAULT_EPSILON = 1e-3

# ORPO: average log-probs are clamped to at most this value so that log(1 - p) stays finite
# when p -> 1 (odds capped at ~1e6).
_ORPO_MAX_AVG_LOGP = -1e-6


# --------------------------------------------------------------------------------------
# helpers
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
# DPO family
# --------------------------------------------------------------------------------------


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
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Per-example loss of the DPO family, plus the implicit rewards.

    Notation: ``a = pc - rc`` and ``b = pr - rr`` are the chosen / rejected log-ratios;
    ``s_w = f'(a)``, ``s_l = f'(b)`` their f-divergence scores (:func:`f_divergence_score`;
    ``s = a, b`` for the default reverse KL) and ``h = s_w - s_l``, which for reverse KL is
    ``(pc - rc) - (pr - rr)``. ``eps = label_smoothing``, ``sig`` is the logistic sigmoid.

    ``loss_type``:

    * ``sigmoid`` -- DPO, Rafailov et al. 2023 (arXiv:2305.18290):
      ``-log sig(beta h)``. With ``eps > 0`` it is conservative DPO (cDPO, Mitchell 2023,
      "A note on DPO with noisy preferences"): ``-(1-eps) log sig(beta h) - eps log sig(-beta h)``.
      (Differs from current TRL, whose ``sigmoid`` ignores ``label_smoothing``; older TRL
      releases implemented cDPO exactly like this.)
    * ``robust`` -- robust DPO, Chowdhury et al. 2024 (arXiv:2403.00409), an unbiased loss
      when labels flip with probability ``eps``:
      ``((1-eps)(-log sig(beta h)) - eps(-log sig(-beta h))) / (1 - 2 eps)``; ``eps < 0.5``.
    * ``ipo`` -- IPO, Azar et al. 2023 (arXiv:2310.12036): ``(h - 1/(2 beta))^2``, beta being
      the paper's tau. IPO is meant for *length-averaged* log-probs: either pass average
      log-probs (sum / completion length) for all four inputs, or pass sequence log-probs
      together with ``chosen_lengths``/``rejected_lengths`` and the scores are divided by
      them (TRL's behaviour: ``h = s_w / L_w - s_l / L_l``).
    * ``hinge`` -- SLiC, Zhao et al. 2023 (arXiv:2305.10425): ``relu(1 - beta h)``.
    * ``exo_pair`` -- EXO, Ji et al. 2024 (arXiv:2402.00856, eq. 16), ``KL(q || p)`` with
      ``q = (sig(beta h), sig(-beta h))`` and ``p = (1 - eps, eps)``:
      ``sig(beta h)(log sig(beta h) - log(1-eps)) + sig(-beta h)(log sig(-beta h) - log eps)``;
      ``eps = 0`` is replaced by the paper's ``1e-3``.
    * ``nca_pair`` -- NCA, Chen et al. 2024 (arXiv:2402.05369):
      ``-log sig(beta a) - 0.5 log sig(-beta a) - 0.5 log sig(-beta b)``.
    * ``bco_pair`` -- BCO, Jung et al. 2024 (arXiv:2404.04656), with reward shift
      ``delta = bco_delta`` (a running mean of the rewards, maintained by the trainer):
      ``-log sig(beta a - delta) - log sig(-(beta b - delta))``. Current TRL uses
      ``delta = 0`` (the default here); older TRL kept the running mean internally.
    * ``sppo_hard`` -- SPPO with hard win probabilities, Wu et al. 2024 (arXiv:2405.00675):
      ``(a - 1/(2 beta))^2 + (b + 1/(2 beta))^2``.
    * ``aot`` -- AOT paired, Melnyk et al. 2024 (arXiv:2406.05882): with
      ``d = sort(pc - pr) - sort(rc - rr)`` (each sorted over the batch),
      ``-(1-eps) log sig(beta d) - eps log sig(-beta d)``.
    * ``aot_unpaired`` -- AOT unpaired (same paper): ``d = sort(a) - sort(b)``, same loss.
      For both AOT types row ``i`` of the output belongs to the ``i``-th order statistic,
      not to input pair ``i`` (only the batch mean is meaningful).
    * ``apo_zero`` -- APO-zero, D'Oosterlinck et al. 2024 (arXiv:2408.06266, eq. 7):
      ``(1 - sig(beta a)) + sig(beta b)``.
    * ``apo_down`` -- APO-down (same paper, eq. 8): ``sig(beta a) + (1 - sig(beta (a - b)))``.
    * ``discopop`` -- DiscoPOP / log-ratio modulated loss, Chan et al. 2024
      (arXiv:2406.08414, eq. 5): with ``z = beta h`` and ``m = sig(z / tau)``,
      ``(1 - m)(-log sig(z)) + m exp(-z)``, ``tau = discopop_tau``. (Evaluated as
      ``exp(-z + log sig(z/tau))`` so that very negative ``z`` gives no ``0 * inf``.)
    * ``sigmoid_norm`` -- length-normalised DPO (TRL's ``sigmoid_norm``; the
      length-normalised DPO of Tulu 3, Lambert et al. 2024, arXiv:2411.15124):
      ``-log sig(beta (s_w / L_w - s_l / L_l))`` with ``L = chosen_lengths /
      rejected_lengths`` (required; clamped to >= 1). Pass *summed* log-probs.

    ``f_divergence_type`` (Wang et al. 2023, see :func:`f_divergence_score`) changes the
    scores for the types built on ``h`` -- ``sigmoid``, ``sigmoid_norm``, ``robust``,
    ``ipo``, ``hinge``, ``exo_pair``, ``discopop``; any other type with a non-default
    f-divergence is a ``ValueError`` (as in TRL).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` policy log-probs (``pc, pr``).
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` reference log-probs (``rc, rr``).
        beta: inverse temperature / KL strength (IPO's tau), > 0.
        loss_type: one of :data:`DPO_LOSS_TYPES`.
        label_smoothing: ``eps`` in ``[0, 0.5]`` (``< 0.5`` for ``robust``); read by
            ``sigmoid``, ``robust``, ``exo_pair``, ``aot``, ``aot_unpaired``.
        f_divergence_type: one of :data:`F_DIVERGENCE_TYPES`.
        f_alpha_divergence_coef: ``a`` of the alpha divergence (TRL convention).
        bco_delta: BCO reward shift (float or scalar tensor; detached).
        discopop_tau: DiscoPOP temperature.
        chosen_lengths, rejected_lengths: ``(B,)`` completion lengths (``sigmoid_norm``;
            optional for ``ipo``).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``; the rewards are
        ``beta * (pc - rc)`` and ``beta * (pr - rr)``, detached.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(
            f"unknown f_divergence_type {f_divergence_type!r}; "
            f"valid: {', '.join(F_DIVERGENCE_TYPES)}"
        )
    if f_divergence_type != "reverse_kl" and loss_type not in _F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"loss_type={loss_type!r} has no f-divergence generalisation; "
            f"f_divergence_type={f_divergence_type!r} is only valid with "
            f"{', '.join(sorted(_F_DIVERGENCE_LOSS_TYPES))}"
        )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    eps = float(label_smoothing)
    if not 0.0 <= eps <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {eps}")
    if loss_type == "robust" and eps >= 0.5:
        raise ValueError(f"robust DPO needs label_smoothing < 0.5, got {eps}")
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )

    pc, pr = policy_chosen_logps, policy_rejected_logps
    rc, rr = ref_chosen_logps, ref_rejected_logps
    chosen_logratios = pc - rc
    rejected_logratios = pr - rr

    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()

    # Scores (f-divergence transformed log-ratios; identity for reverse KL, which the check
    # above guarantees for the types that do not use them) and the DPO score difference h.
    s_w = f_divergence_score(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    s_l = f_divergence_score(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    normalise = loss_type == "sigmoid_norm" or (
        loss_type == "ipo" and (chosen_lengths is not None or rejected_lengths is not None)
    )
    if normalise:
        s_w = s_w / _as_lengths(chosen_lengths, s_w, "chosen_lengths", loss_type)
        s_l = s_l / _as_lengths(rejected_lengths, s_l, "rejected_lengths", loss_type)
    h = s_w - s_l
    z = beta * h

    a, b = chosen_logratios, rejected_logratios
    if loss_type in ("sigmoid", "sigmoid_norm"):
        losses = _smoothed_sigmoid_loss(z, eps if loss_type == "sigmoid" else 0.0)
    elif loss_type == "robust":
        losses = ((1.0 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - z)
    elif loss_type == "exo_pair":
        e = eps if eps > 0.0 else _EXO_DEFAULT_EPSILON
        losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-e)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(e)
        )
    elif loss_type == "nca_pair":
        losses = (
            -F.logsigmoid(beta * a) - 0.5 * F.logsigmoid(-beta * a) - 0.5 * F.logsigmoid(-beta * b)
        )
    elif loss_type == "bco_pair":
        delta = torch.as_tensor(bco_delta, dtype=a.dtype, device=a.device).detach()
        losses = -F.logsigmoid(beta * a - delta) - F.logsigmoid(-(beta * b - delta))
    elif loss_type == "sppo_hard":
        losses = (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    elif loss_type == "aot":
        d = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
        losses = _smoothed_sigmoid_loss(beta * d, eps)
    elif loss_type == "aot_unpaired":
        d = torch.sort(a, dim=0).values - torch.sort(b, dim=0).values
        losses = _smoothed_sigmoid_loss(beta * d, eps)
    elif loss_type == "apo_zero":
        losses = (1.0 - torch.sigmoid(beta * a)) + torch.sigmoid(beta * b)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * a) + (1.0 - torch.sigmoid(beta * (a - b)))
    else:  # discopop (membership in DPO_LOSS_TYPES was checked above)
        if not discopop_tau > 0:
            raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
        m = torch.sigmoid(z / discopop_tau)
        # m * exp(-z), computed in log space: exp(-z + log m)
        exp_term = torch.exp(
            torch.clamp(-z + F.logsigmoid(z / discopop_tau), max=_exp_cap(z.dtype))
        )
        losses = (1.0 - m) * -F.logsigmoid(z) + exp_term

    return losses, chosen_rewards, rejected_rewards


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
) -> tuple[Tensor, Tensor, Tensor]:
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


def combine_losses(components: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    r"""Weighted sum of named loss components: ``L = sum_k w_k * L_k``.

    The building block of mixed objectives such as MPO (Wang et al. 2024, "Enhancing the
    Reasoning Ability of Multimodal Large Language Models via Mixed Preference
    Optimization", arXiv:2411.10442: ``w_p * sigmoid + w_q * bco_pair + w_g * sft``) and RPO
    (``dpo + alpha * nll``). Components are ``(B,)`` per-example losses or scalars
    (broadcast); the result is their weighted sum, so taking its mean equals TRL's
    ``sum_k w_k * mean(L_k)``. A component with no entry in ``weights`` gets weight 1.0; a
    weight naming no component is a ``ValueError`` (it is almost certainly a typo).
    """
    if not components:
        raise ValueError("combine_losses needs at least one component")
    unknown = sorted(set(weights) - set(components))
    if unknown:
        raise ValueError(
            f"weights given for unknown components {unknown}; have {sorted(components)}"
        )
    total: Tensor | None = None
    for name, value in components.items():
        term = float(weights.get(name, 1.0)) * value
        total = term if total is None else total + term
    assert total is not None
    return total


def dpo_loss_mixture(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    loss_types: Sequence[str],
    weights: Sequence[float],
    beta: float = 0.1,
    sft_loss: Tensor | None = None,
    **kw: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Weighted mixture of DPO-family losses (TRL's multi-``loss_type``, e.g. MPO).

    ``losses = sum_k weights[k] * dpo_loss(..., loss_type=loss_types[k])`` per example,
    with the same ``beta`` and keyword arguments ``kw`` (forwarded to :func:`dpo_loss`) for
    every term. MPO (Wang et al. 2024, arXiv:2411.10442) is
    ``loss_types=("sigmoid", "bco_pair", "sft"), weights=(0.8, 0.2, 1.0)``: the name
    ``"sft"`` takes the caller's ``sft_loss`` (the chosen NLL, ``(B,)`` or scalar), since it
    needs token logits rather than sequence log-probs.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``; the rewards are
        ``beta * (pc - rc)`` and ``beta * (pr - rr)``, detached.
    """
    loss_types = list(loss_types)
    weights = [float(w) for w in weights]
    if not loss_types:
        raise ValueError("loss_types must not be empty")
    if len(weights) != len(loss_types):
        raise ValueError(
            f"weights must have one entry per loss type: {len(weights)} weights for "
            f"{len(loss_types)} loss types"
        )
    if len(set(loss_types)) != len(loss_types):
        raise ValueError(f"duplicate loss types in {loss_types}")
    components: dict[str, Tensor] = {}
    chosen_rewards = (beta * (policy_chosen_logps - ref_chosen_logps)).detach()
    rejected_rewards = (beta * (policy_rejected_logps - ref_rejected_logps)).detach()
    for lt in loss_types:
        if lt == "sft":
            if sft_loss is None:
                raise ValueError('loss type "sft" needs `sft_loss` (the chosen NLL)')
            components[lt] = sft_loss
            continue
        components[lt], _, _ = dpo_loss(
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            beta=beta,
            loss_type=lt,
            **kw,
        )
    losses = combine_losses(components, dict(zip(loss_types, weights, strict=True)))
    losses = losses.expand_as(chosen_rewards) if losses.dim() == 0 else losses
    return losses, chosen_rewards, rejected_rewards


# --------------------------------------------------------------------------------------
# reference-free and unpaired objectives
# --------------------------------------------------------------------------------------


def simpo_loss(
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
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
    chosen NLL (the trainer's job). ``log(1 - exp(x))`` is evaluated stably (``expm1`` near
    0, ``log1p`` below ``-log 2``) and the averages are clamped to ``<= -1e-6`` so that
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
