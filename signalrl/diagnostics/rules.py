"""Declarative diagnosis rules for `signalrl doctor`.

A `Rule` names the metrics it `needs` (every name in `needs` must be logged, and at least one
of `needs_any` when that is set), a `window` (how many logged points the condition looks at),
a `check(series, rule) -> Hit | None` condition, a `message` template filled from the hit's
numbers, and the `suggestion` (a recipe key and value to try). A rule whose metrics are absent
is not run; `doctor` says which rules could not run and why.

User rules: `--rules mymodule` imports `mymodule` and takes its `RULES` list if it defines
one, else every module-level `Rule` instance (`load_rules`). A user rule with a built-in id
replaces the built-in one.

`rl.rollout_mismatch` needs `sampling/logp_diff/mean` (the mean |log p_sampler - log
p_trainer| per token): signalrl's online RL trainer logs it (`losses/mismatch.py`) and TRL's
`sampling/sampling_logp_difference/mean` maps to it. A trainer that does not log it gets the
rule listed as "cannot run (needs sampling/logp_diff/mean)" in the doctor's output.

Series values: `read_metrics` turns NaN into None and +-inf into +-1e308; `RunSeries` keeps
those as NaN / +-inf so `train.nan` sees them, and every other rule reads `finite(name)`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["info", "warning", "critical"]
Points = list[tuple[int, float]]

# -- thresholds (each with the reason for its value) ---------------------------------------------

LN2 = math.log(2.0)
NO_SIGNAL_LOSS_TOL = 0.01  # DPO loss within 0.01 of ln 2: margins under ~0.04, no preference
NO_SIGNAL_MARGIN = 0.05  # |reward margin| under 0.05: sigmoid(0.05) = 0.51, a coin flip
DISPLACEMENT_DROP = 2.0  # chosen sequence log-prob down by 2 nats (~7x less likely) is no noise
OVERFIT_TRAIN_ACC = 0.95  # the training pairs are (almost) all separated
OVERFIT_GAP = 0.2  # held-out accuracy 20 points under train: more than a few held-out pairs
OVERFIT_EVAL_LOSS_RISE = 0.05  # held-out loss 0.05 above its best: it turned upwards
MARGIN_BOUND = 8.0  # a reward margin of 8 has a sigmoid loss of 3e-4: nothing left to learn
BETA_SATURATE_MARGIN = 5.0  # margins above 5 within the first fifth of the run: beta too large
BETA_FROZEN_MARGIN = 1e-3  # implicit rewards < 1e-3, log-probs moved > 1 nat: beta tiny
BETA_FROZEN_LOGP_MOVE = 1.0
ZERO_VAR_FRAC = 0.8  # "most groups": 80% of groups give no advantage, 1/5 of the batch trains
ENTROPY_COLLAPSE_FRAC = 0.1  # entropy under a tenth of its start: the policy is near greedy
ENTROPY_COLLAPSE_ABS = 0.05  # ... and under 0.05 nats/token (a near-deterministic token)
ENTROPY_EXPLOSION_FACTOR = 2.0  # entropy doubled from its start: sampling near uniform noise
KL_BOUND = 1.0  # KL to the reference over 1 nat/token: the policy left the reference region
KL_JUMP = 10.0  # KL ten times its previous value in one logged step (and over 0.1)
KL_JUMP_MIN = 0.1
CLIP_SAT_FRAC = 0.2  # a fifth of tokens clipped: updates are far outside the trust region
TRUNC_FRAC = 0.5  # half the completions hit max_new_tokens
LENGTH_RISE = 1.5  # mean length up 50% ...
ACC_FLAT = 0.02  # ... while accuracy moved less than 2 points (flat within eval noise)
REWARD_RISE = 0.25  # reward (or a term) up by a quarter of its 0-1 range, far over batch noise
NO_IMPROVE_MIN_POINTS = 10  # judge "no improvement" only after 10 logged steps
NO_IMPROVE_DELTA = 0.01  # reward moved less than 0.01 from the first to the last window
MISMATCH_BOUND = 0.1  # sampler/trainer mean |log-prob diff| over 0.1 nats: a different policy
EV_BOUND = 0.01  # explained variance <= 0.01: no better than a constant (a frozen critic's
# constant prediction gives 0 +- 1e-9, so the bound cannot be 0 exactly)
DISTILL_DROP = 0.05  # reverse KL must fall by 5% from the first to the last window
GRAD_SPIKE_FACTOR = 10.0  # a grad norm ten times the running median
HUGE = 1e307  # read_metrics writes +-inf as +-1e308


@dataclass
class RunSeries:
    """The metric series of one run: name -> [(step, value)], plus the resolved config."""

    metrics: dict[str, Points]
    config: Mapping[str, Any] = field(default_factory=dict)

    def names(self) -> set[str]:
        return set(self.metrics)

    def raw(self, name: str) -> Points:
        return self.metrics.get(name, [])

    def finite(self, name: str) -> Points:
        return [(s, v) for s, v in self.metrics.get(name, []) if math.isfinite(v)]

    def cfg(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node


@dataclass
class Hit:
    """What a check found: the first step, the numbers for the message, optionally a
    suggestion that replaces the rule's default."""

    step: int
    values: dict[str, Any]
    suggestion: str | None = None


@dataclass
class Finding:
    """One diagnosis: the rule `id`, its `severity`, the first `step` it holds at, the
    `evidence` (with the numbers) and the `suggestion` (a recipe key and value)."""

    id: str
    severity: Severity
    step: int
    evidence: str
    suggestion: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "severity": self.severity,
            "step": self.step,
            "evidence": self.evidence,
            "suggestion": self.suggestion,
        }


Check = Callable[[RunSeries, "Rule"], "Hit | None"]


@dataclass
class Rule:
    """A declarative rule; see the module docstring."""

    id: str
    severity: Severity
    needs: tuple[str, ...]
    check: Check
    message: str
    suggestion: str
    window: int = 5
    needs_any: tuple[str, ...] = ()
    doc: str = ""

    def missing(self, names: set[str]) -> list[str]:
        """The metrics this rule lacks (empty when it can run)."""
        lack = [n for n in self.needs if n not in names]
        if self.needs_any and not any(n in names for n in self.needs_any):
            lack.append(" or ".join(self.needs_any))
        return lack

    def evaluate(self, series: RunSeries) -> Finding | None:
        if self.missing(series.names()):
            return None
        hit = self.check(series, self)
        if hit is None:
            return None
        vals = {k: _fmt(v) for k, v in hit.values.items()}
        return Finding(
            self.id, self.severity, hit.step, self.message.format(**vals),
            hit.suggestion or self.suggestion,
        )


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.3g}"
    return v


# -- helpers ----------------------------------------------------------------------------------


def mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def head_tail(pts: Points, w: int) -> tuple[float, float]:
    """Means of the first and last `w` values (`w` capped at a third of the series)."""
    w = max(1, min(w, len(pts) // 3 or 1))
    return mean(v for _, v in pts[:w]), mean(v for _, v in pts[-w:])


def rolling(pts: Points, w: int) -> Points:
    """Trailing means over `w` points, one per point from the w-th on."""
    return [(pts[i][0], mean(v for _, v in pts[i - w + 1 : i + 1])) for i in range(w - 1, len(pts))]


def first(pts: Points, pred: Callable[[float], bool]) -> tuple[int, float] | None:
    return next(((s, v) for s, v in pts if pred(v)), None)


def _accuracy(s: RunSeries) -> Points:
    return s.finite("eval/accuracy")


def _reward_trains(s: RunSeries) -> bool:
    """False for a distillation run whose reward is only watched (`distill.reward_weight`
    0): its reward rules would judge a number the gradient never sees."""
    return not (s.cfg("trainer") == "distill" and not s.cfg("distill.reward_weight", 0.0))


def _flat_or_falling(acc: Points) -> bool:
    return len(acc) >= 2 and acc[-1][1] - acc[0][1] < ACC_FLAT


# -- the catalogue -----------------------------------------------------------------------------

def _dpo_no_signal(s: RunSeries, r: Rule) -> Hit | None:
    """The DPO loss never leaves ln 2 and the margins stay near zero: the policy does not
    separate chosen from rejected (reward accuracy is then a coin flip on tiny margins)."""
    loss, mg = s.finite("loss"), s.finite("rewards/margins")
    if len(loss) < r.window or max(abs(v - LN2) for _, v in loss) > NO_SIGNAL_LOSS_TOL:
        return None
    top = max((abs(v) for _, v in mg), default=0.0)
    if top > NO_SIGNAL_MARGIN:
        return None
    dev = max(abs(v - LN2) for _, v in loss)
    acc = mean(v for _, v in s.finite("rewards/accuracies"))
    lp = s.finite("logps/chosen")
    moved = max(abs(v - lp[0][1]) for _, v in lp) if lp else 0.0
    # the policy moves but its implicit rewards (beta x log-ratio) do not: beta, not the lr
    fix = "preference.beta: higher (the policy moves, beta hides it)" if (
        moved > BETA_FROZEN_LOGP_MOVE) else None
    return Hit(loss[0][0], {"n": len(loss), "dev": dev, "acc": acc, "mg": top}, fix)


def _dpo_displacement(s: RunSeries, r: Rule) -> Hit | None:
    """Chosen log-probs fall steadily while the margins grow (Razin et al. 2024)."""
    lp, mg = s.finite("logps/chosen"), s.finite("rewards/margins")
    if len(lp) < 2 * r.window or len(mg) < 2 * r.window:
        return None
    lp0, lp1 = head_tail(lp, r.window)
    mg0, mg1 = head_tail(mg, r.window)
    roll = rolling(lp, r.window)
    falls = sum(b[1] < a[1] for a, b in zip(roll, roll[1:], strict=False)) / max(1, len(roll) - 1)
    if lp1 - lp0 > -DISPLACEMENT_DROP or mg1 <= mg0 or falls < 0.6:
        return None
    hit = first(roll, lambda v: v < lp0 - DISPLACEMENT_DROP)
    step = hit[0] if hit else lp[-1][0]
    return Hit(step, {"lp0": lp0, "lp1": lp1, "mg0": mg0, "mg1": mg1})


def _dpo_overfit(s: RunSeries, r: Rule) -> Hit | None:
    """Training pairs are separated while held-out pairs are not (or the held-out loss turns
    up), or the margins grow without bound."""
    tr = rolling(s.finite("rewards/accuracies"), r.window)
    sat = first(tr, lambda v: v >= OVERFIT_TRAIN_ACC)
    mg = s.finite("rewards/margins")
    if mg and mg[-1][1] > MARGIN_BOUND and mg[-1][1] >= max(v for _, v in mg):
        return Hit(first(mg, lambda v: v > MARGIN_BOUND)[0],  # type: ignore[index]
                   {"what": f"margins grew to {mg[-1][1]:.3g} (> {MARGIN_BOUND})"})
    if sat is None:
        return None
    ev = [(st, v) for st, v in s.finite("eval/rewards/accuracies") if st >= sat[0]]
    if ev and ev[-1][1] <= sat[1] - OVERFIT_GAP and ev[-1][1] <= max(v for _, v in ev):
        return Hit(sat[0], {"what": f"train reward accuracy {sat[1]:.3g} from step {sat[0]}, "
                            f"held-out {ev[-1][1]:.3g} at step {ev[-1][0]}"})
    el = s.finite("eval/loss")
    if len(el) >= 2:
        best = min(el, key=lambda p: p[1])
        if el[-1][1] > best[1] + OVERFIT_EVAL_LOSS_RISE and best[0] < el[-1][0]:
            return Hit(sat[0], {"what": f"train reward accuracy {sat[1]:.3g} from step {sat[0]}; "
                                f"held-out loss {best[1]:.3g} at step {best[0]} rose to "
                                f"{el[-1][1]:.3g} at step {el[-1][0]}"})
    return None


def _dpo_beta(s: RunSeries, r: Rule) -> Hit | None:
    """Implicit rewards saturate at once (beta too large) or never move although the policy
    does (beta too small)."""
    mg, lp = s.finite("rewards/margins"), s.finite("logps/chosen")
    beta = s.cfg("preference.beta", "?")
    early = mg[: max(r.window, len(mg) // 5)]
    sat = first(early, lambda v: v > BETA_SATURATE_MARGIN)
    if sat:
        return Hit(sat[0], {"beta": beta, "what": f"margin {sat[1]:.3g} already at step "
                            f"{sat[0]} (the sigmoid loss is saturated)"},
                   "preference.beta: lower (e.g. beta / 10)")
    moved = max(abs(v - lp[0][1]) for _, v in lp) if lp else 0.0
    rew = [abs(v) for n in ("rewards/chosen", "rewards/rejected") for _, v in s.finite(n)]
    if len(mg) >= r.window and max(rew, default=0.0) < BETA_FROZEN_MARGIN and (
        moved > BETA_FROZEN_LOGP_MOVE
    ):
        return Hit(mg[0][0], {"beta": beta, "what": f"implicit rewards stay under "
                              f"{BETA_FROZEN_MARGIN} while chosen log-probs moved {moved:.3g} "
                              "nats"},
                   "preference.beta: higher (e.g. beta * 10)")
    return None


def _rl_zero_variance(s: RunSeries, r: Rule) -> Hit | None:
    """Most groups have equal rewards, so their group-normalised advantage is zero."""
    z = s.finite("frac_zero_std_groups") if _reward_trains(s) else []
    roll = rolling(z, r.window)
    hit = first(roll, lambda v: v >= ZERO_VAR_FRAC)
    if hit is None or mean(v for _, v in roll[-r.window:]) < ZERO_VAR_FRAC:
        return None
    return Hit(hit[0], {"frac": hit[1], "last": roll[-1][1], "bound": ZERO_VAR_FRAC})


def _rl_entropy_collapse(s: RunSeries, r: Rule) -> Hit | None:
    """Entropy falls to a tenth of its start and near zero: the policy stopped exploring."""
    ent = s.finite("entropy")
    if len(ent) < r.window:
        return None
    e0 = mean(v for _, v in ent[:2])
    hit = first(ent, lambda v: v < ENTROPY_COLLAPSE_FRAC * e0 and v < ENTROPY_COLLAPSE_ABS)
    return Hit(hit[0], {"e0": e0, "e1": hit[1]}) if hit else None


def _rl_entropy_explosion(s: RunSeries, r: Rule) -> Hit | None:
    """Entropy doubles from its start: the policy drifts towards uniform noise."""
    ent = s.finite("entropy")
    if len(ent) < r.window:
        return None
    e0 = mean(v for _, v in ent[:2])
    roll = rolling(ent, min(3, len(ent)))
    hit = first(roll, lambda v: v > ENTROPY_EXPLOSION_FACTOR * e0)
    return Hit(hit[0], {"e0": e0, "e1": hit[1]}) if hit else None


def _rl_kl_blowup(s: RunSeries, r: Rule) -> Hit | None:
    """KL to the reference passes a bound or jumps tenfold in one logged step."""
    kl = s.finite("kl")
    hit = first(kl, lambda v: v > KL_BOUND)
    if hit:
        return Hit(hit[0], {"what": f"kl {hit[1]:.3g} > {KL_BOUND}"})
    for (_, a), (st, b) in zip(kl, kl[1:], strict=False):
        if b > KL_JUMP_MIN and b > KL_JUMP * max(a, 1e-6):
            return Hit(st, {"what": f"kl jumped from {a:.3g} to {b:.3g}"})
    return None


def _rl_clip_saturation(s: RunSeries, r: Rule) -> Hit | None:
    """A large share of tokens hits the PPO clip: the step is too large for the trust region."""
    lo, hi = dict(s.finite("clip_frac/low")), dict(s.finite("clip_frac/high"))
    tot = [(st, lo.get(st, 0.0) + hi.get(st, 0.0)) for st in sorted(set(lo) | set(hi))]
    roll = rolling(tot, r.window)
    hit = first(roll, lambda v: v > CLIP_SAT_FRAC)
    return Hit(hit[0], {"frac": hit[1], "bound": CLIP_SAT_FRAC}) if hit else None


def _rl_truncation(s: RunSeries, r: Rule) -> Hit | None:
    """Most completions stop at max_new_tokens: answers are cut off (and often scored 0)."""
    tf = s.finite("completion/truncated_frac")
    roll = rolling(tf, r.window)
    hit = first(roll, lambda v: v > TRUNC_FRAC)
    n = s.cfg("sampling.max_new_tokens", "not in the logs")
    return Hit(hit[0], {"frac": hit[1], "n": n}) if hit else None


def _rl_length_exploitation(s: RunSeries, r: Rule) -> Hit | None:
    """Completions grow longer while accuracy does not improve."""
    ln = s.finite("completion/mean_length")
    if len(ln) < 2 * r.window:
        return None
    l0, l1 = head_tail(ln, r.window)
    acc = _accuracy(s)
    acc = acc if len(acc) >= 2 else s.finite("reward/mean")  # one eval point shows no trend
    if l1 < LENGTH_RISE * l0 or not acc:
        return None
    a0, a1 = head_tail(acc, r.window) if len(acc) > 2 else (acc[0][1], acc[-1][1])
    if a1 - a0 >= ACC_FLAT:
        return None
    step = first(ln, lambda v: v >= LENGTH_RISE * l0)
    return Hit(step[0] if step else ln[-1][0], {"l0": l0, "l1": l1, "a0": a0, "a1": a1})


def _rl_reward_hacking(s: RunSeries, r: Rule) -> Hit | None:
    """Training reward (or one reward term) rises while held-out accuracy is flat or falls."""
    acc = _accuracy(s)
    if not _flat_or_falling(acc) or not _reward_trains(s):
        return None
    terms = ["reward/mean"] + sorted(
        n for n in s.names() if n.startswith("reward/") and n not in ("reward/mean", "reward/std")
    )
    for name in terms:
        pts = s.finite(name)
        if len(pts) < 2 * r.window:
            continue
        v0, v1 = head_tail(pts, r.window)
        if v1 - v0 >= REWARD_RISE:
            st = first(rolling(pts, r.window), lambda v, v0=v0: v >= v0 + REWARD_RISE)
            return Hit(st[0] if st else pts[-1][0], {
                "name": name, "v0": v0, "v1": v1, "a0": acc[0][1], "a1": acc[-1][1]})
    return None


def _rl_no_improvement(s: RunSeries, r: Rule) -> Hit | None:
    """Neither the training reward nor held-out accuracy moves over the run."""
    rw = s.finite("reward/mean")
    if len(rw) < NO_IMPROVE_MIN_POINTS or not _reward_trains(s):
        return None
    v0, v1 = head_tail(rw, r.window)
    acc = _accuracy(s)
    if v1 - v0 >= NO_IMPROVE_DELTA or (len(acc) >= 2 and acc[-1][1] - acc[0][1] >= ACC_FLAT):
        return None
    return Hit(rw[-1][0], {"v0": v0, "v1": v1, "n": len(rw)})


def _rl_rollout_mismatch(s: RunSeries, r: Rule) -> Hit | None:
    """The sampler's log-probs differ from the trainer's: the data is off-policy."""
    d = s.finite("sampling/logp_diff/mean")
    roll = rolling(d, r.window)
    hit = first(roll, lambda v: abs(v) > MISMATCH_BOUND)
    return Hit(hit[0], {"d": hit[1], "bound": MISMATCH_BOUND}) if hit else None


def _ppo_critic(s: RunSeries, r: Rule) -> Hit | None:
    """PPO's value model explains no variance of the returns."""
    ev = s.finite("explained_variance")
    if len(ev) < r.window:
        return None
    roll = rolling(ev, r.window)
    if roll[-1][1] > EV_BOUND:
        return None
    return Hit(ev[0][0], {"ev": roll[-1][1], "n": r.window})


def _distill_no_progress(s: RunSeries, r: Rule) -> Hit | None:
    """Reverse KL to the teacher does not fall."""
    kl = s.finite("distill/reverse_kl")
    if len(kl) < 2 * r.window:
        return None
    k0, k1 = head_tail(kl, r.window)
    if k1 <= (1 - DISTILL_DROP) * k0:
        return None
    return Hit(kl[-1][0], {"k0": k0, "k1": k1})


def _train_nan(s: RunSeries, r: Rule) -> Hit | None:
    """A NaN or an infinity in any metric (NaN is logged as null, inf as +-1e308)."""
    bad = sorted(
        (st, name) for name, pts in s.metrics.items() for st, v in pts
        if not math.isfinite(v) or abs(v) >= HUGE
    )
    if not bad:
        return None
    names = sorted({n for _, n in bad})
    return Hit(bad[0][0], {"names": ", ".join(names[:5]), "n": len(bad)})


def _train_grad_spikes(s: RunSeries, r: Rule) -> Hit | None:
    """A gradient norm ten times the running median of the steps before it."""
    g = s.finite("grad_norm")
    for i in range(r.window, len(g)):
        prev = sorted(v for _, v in g[i - r.window : i])
        med = prev[len(prev) // 2]
        if med > 0 and g[i][1] > GRAD_SPIKE_FACTOR * med:
            return Hit(g[i][0], {"g": g[i][1], "med": med, "f": GRAD_SPIKE_FACTOR})
    return None


def _rule(id: str, sev: Severity, needs: tuple[str, ...], check: Check, message: str,
          suggestion: str, window: int = 5, needs_any: tuple[str, ...] = ()) -> Rule:
    return Rule(id, sev, needs, check, message, suggestion, window, needs_any,
                (check.__doc__ or "").strip())


PREF = ("rewards/accuracies", "rewards/margins")
BUILTIN_RULES: list[Rule] = [
    _rule("dpo.no_signal", "critical", PREF + ("loss",), _dpo_no_signal,
          "loss stayed within {dev} of ln 2 over {n} steps, |margin| <= {mg} "
          "(reward accuracy {acc} on such margins is noise)",
          "train.lr: 10x higher (or check that chosen and rejected differ)"),
    _rule("dpo.likelihood_displacement", "warning", ("logps/chosen", "rewards/margins"),
          _dpo_displacement,
          "chosen log-prob fell {lp0} -> {lp1} while the margin grew {mg0} -> {mg1}",
          "preference.loss_type: rpo (or apo_zero; or train.lr lower)"),
    _rule("dpo.overfit", "warning", PREF, _dpo_overfit, "{what}",
          "preference.beta: larger (e.g. 0.5); train.steps: fewer"),
    _rule("dpo.beta_extreme", "warning", PREF + ("logps/chosen", "rewards/chosen"), _dpo_beta,
          "beta {beta}: {what}", "preference.beta"),
    _rule("rl.zero_variance", "critical", ("frac_zero_std_groups",), _rl_zero_variance,
          "{frac} of groups had equal rewards (last {last}, bound {bound})",
          "rl.group_size: 16 (or an easier task / a stronger start)", window=3),
    _rule("rl.entropy_collapse", "critical", ("entropy",), _rl_entropy_collapse,
          "entropy fell from {e0} to {e1} nats/token", "train.lr: 10x lower", window=3),
    _rule("rl.entropy_explosion", "warning", ("entropy",), _rl_entropy_explosion,
          "entropy rose from {e0} to {e1} nats/token",
          "train.lr: lower (or sampling.temperature: 0.8)",
          window=3),
    _rule("rl.kl_blowup", "critical", ("kl",), _rl_kl_blowup, "{what}",
          "train.lr: lower (or rl.kl_coef: higher)"),
    _rule("rl.clip_saturation", "warning", ("clip_frac/low", "clip_frac/high"),
          _rl_clip_saturation, "{frac} of tokens clipped (bound {bound})",
          "train.lr: lower (or rl.mu: 1)", window=3),
    _rule("rl.truncation", "warning", ("completion/truncated_frac",), _rl_truncation,
          "{frac} of completions hit max_new_tokens ({n})",
          "sampling.max_new_tokens: 2x higher (or rl.mask_truncated: true)", window=3),
    _rule("rl.length_exploitation", "warning", ("completion/mean_length",),
          _rl_length_exploitation,
          "mean length {l0} -> {l1} while accuracy {a0} -> {a1}",
          "rewards: add {type: length} (or rl.loss_type aggregation seq-mean-token-sum-norm)"),
    _rule("rl.reward_hacking", "critical", ("reward/mean", "eval/accuracy"), _rl_reward_hacking,
          "{name} rose {v0} -> {v1} while eval/accuracy went {a0} -> {a1}",
          "rewards: weight the task term up (or make the rewarded pattern stricter)"),
    _rule("rl.no_improvement", "info", ("reward/mean",), _rl_no_improvement,
          "reward/mean {v0} -> {v1} over {n} steps", "train.lr: higher (or train.steps: more)"),
    _rule("rl.rollout_mismatch", "warning", ("sampling/logp_diff/mean",), _rl_rollout_mismatch,
          "sampler vs trainer mean log-prob difference {d} (bound {bound})",
          "rl.is_correction: token_truncate (and match sampler/trainer precision)", window=3),
    _rule("ppo.critic_not_learning", "warning", ("explained_variance",), _ppo_critic,
          "explained variance {ev} over the last {n} steps",
          "rl.critic_lr: higher (or rl.vf_coef: 1.0)"),
    _rule("distill.no_progress", "warning", ("distill/reverse_kl",), _distill_no_progress,
          "distill/reverse_kl {k0} -> {k1}", "train.lr: higher (or distill.mode: gkd)"),
    _rule("train.nan", "critical", (), _train_nan,
          "non-finite values in {names} ({n} points)",
          "train.lr: lower (or train.precision: fp32)"),
    _rule("train.grad_spikes", "warning", ("grad_norm",), _train_grad_spikes,
          "grad_norm {g} is {f}x over the median {med} of the steps before",
          "train.lr: lower (or train.warmup_steps: 20, train.grad_clip: 1.0)"),
]


def load_rules(module: str) -> list[Rule]:
    """A user module's rules: its `RULES` list if it has one, else every module-level `Rule`."""
    mod = importlib.import_module(module)
    rules = getattr(mod, "RULES", None)
    if rules is None:
        rules = [v for v in vars(mod).values() if isinstance(v, Rule)]
    rules = list(rules)
    bad = [r for r in rules if not isinstance(r, Rule)]
    if bad:
        raise TypeError(f"{module}.RULES holds a {type(bad[0]).__name__}, not a Rule")
    return rules


def merge_rules(base: Sequence[Rule], extra: Sequence[Rule]) -> list[Rule]:
    """`base` with `extra` appended; an extra rule with a base id replaces it in place."""
    by_id = {r.id: r for r in extra}
    out = [by_id.pop(r.id, r) for r in base]
    return out + list(by_id.values())
