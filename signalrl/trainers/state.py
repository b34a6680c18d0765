"""Resumable training state: the data order, the learning-rate schedule, the budget counters
and where checkpoints are."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from signalrl.config import RecipeBase

STATE_FILE = "trainer_state.pt"
STEP_DIR = re.compile(r"^step-(\d+)$")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(recipe: RecipeBase):  # noqa: ANN201
    t = recipe.train

    def f(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        span = max(1, t.steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        if t.schedule == "linear":
            frac = 1.0 - progress
        else:
            frac = 0.5 * (1.0 + math.cos(math.pi * progress))
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * frac

    return f


def latest_checkpoint(run_dir: Path) -> Path | None:
    ck = run_dir / "checkpoints"
    if not ck.is_dir():
        return None
    steps = [
        (int(m.group(1)), p)
        for p in ck.iterdir()
        if (m := STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return max(steps)[1] if steps else None


class DataCursor:
    """Epoch-wise shuffled order over `n` rows, resumable: `take(k)` returns the next k
    indices, reshuffling (seeded by the epoch) when an epoch ends."""

    def __init__(self, n: int, seed: int) -> None:
        if n <= 0:
            raise ValueError("no training rows")
        self.n, self.seed = n, seed
        self.order: list[int] = []
        self.cursor = 0
        self.epoch = 0

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.cursor >= len(self.order):
                self.order = list(range(self.n))
                random.Random(self.seed * 7919 + self.epoch).shuffle(self.order)
                self.epoch += 1
                self.cursor = 0
            step = min(k - len(out), len(self.order) - self.cursor)
            out.extend(self.order[self.cursor : self.cursor + step])
            self.cursor += step
        return out

    def state(self) -> dict[str, Any]:
        return {"order": self.order, "cursor": self.cursor, "epoch": self.epoch}

    def load(self, state: dict[str, Any]) -> None:
        self.order = list(state.get("order", []))
        self.cursor = int(state.get("cursor", 0))
        self.epoch = int(state.get("epoch", 0))


@dataclass
class Budget:
    """The two cumulative budget counters every trainer logs (for `signalrl compare`):
    `student/forward_tokens` (see `signalrl.rollout.collect.count_forward_tokens`) and
    `time/train_s` (seconds in training steps: sampling, scoring, forward, backward, update;
    evaluation, checkpoints and model loading excluded). Saved in every checkpoint."""

    forward_tokens: int = 0
    train_seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        return {
            "student/forward_tokens": float(self.forward_tokens),
            "time/train_s": self.train_seconds,
        }

    def exhausted(self, cap: int | None) -> bool:
        """`train.max_forward_tokens` reached (the counter is global: every rank agrees)."""
        return cap is not None and self.forward_tokens >= cap

    def state(self) -> dict[str, Any]:
        return {"forward_tokens": self.forward_tokens, "train_seconds": self.train_seconds}

    def load(self, state: dict[str, Any]) -> None:
        self.forward_tokens = int(state.get("forward_tokens", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))


#: What a resumed run may change: how long it runs and how it logs, evaluates and saves.
RESUME_MAY_CHANGE: tuple[str, ...] = (
    "train.steps",
    "train.max_forward_tokens",
    "logging.",
    "eval.",
    "checkpoint.",
    "doctor.",
)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resume_differences(saved: Path, recipe: RecipeBase) -> list[str]:
    """The recipe keys (outside `RESUME_MAY_CHANGE`) in which `recipe` differs from the
    run's saved `config.yaml`, as `key: saved -> new` lines."""
    import yaml

    from signalrl.config import RecipeError, recipe_from_dict

    try:
        old = recipe_from_dict(yaml.safe_load(saved.read_text()) or {}, str(saved))
    except (RecipeError, yaml.YAMLError) as e:
        return [f"the run's saved recipe does not validate: {e}"]
    a = _flatten(old.model_dump(mode="json"))
    b = _flatten(recipe.model_dump(mode="json"))
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in keys
        if not any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUME_MAY_CHANGE)
    ]


@dataclass
class MicroLoss:
    """One micro-batch's loss: a mean over its `units` (tokens, sequences or pairs); its
    `metrics` are averaged with the same weights; `aux` is handed back in order;
    `extra_loss` is backpropagated with the same weight but not logged as `loss` (e.g. a
    critic's value loss)."""

    loss: torch.Tensor
    units: float
    metrics: dict[str, float] = field(default_factory=dict)
    aux: Any = None
    extra_loss: torch.Tensor | None = None


@dataclass
class StepResult:
    """What the update of one step produced: per-epoch weighted metric sums (`loss` and the
    micro-batches' metrics), the first epoch's `aux` values, and the optimizer step's
    `grad_norm` and `lr`."""

    epochs: list[dict[str, float]]
    aux: list[Any]
    opt: dict[str, float]

    def metrics(self) -> dict[str, float]:
        """Each key's mean over the epochs that logged it."""
        out: dict[str, float] = {}
        for key in {k for e in self.epochs for k in e}:
            vals = [e[key] for e in self.epochs if key in e]
            out[key] = sum(vals) / len(vals)
        return {**out, **self.opt}
