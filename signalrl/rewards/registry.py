"""Reward composition: a recipe lists reward terms with weights; each term is a function of
the batch `(prompts, completions, rows, lengths) -> list[float]`, built from its spec.

Terms: `task` (the task's own verifier), `math` (math-verify against `row["answer"]`),
`code` (sandboxed tests in `row["tests"]`), `format` (R1 `<think>/<answer>` or a regex),
`length` (linear penalty above `target` tokens), `model` (a trained reward model) and
`function` (`module:function`, called as `fn(prompts, completions, **row_columns)`).
The total is `sum_i weight_i * r_i`; every term's mean is logged as `reward/<name>`.
A term that raises or returns NaN/None/a bool/a list of the wrong length fails with the prompt
and completion (`on_error: raise`), or scores 0 and is counted (`on_error: zero`). A numpy
scalar or a 0-d tensor is a number (its `.item()`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from signalrl.registry import import_function

Row = dict[str, Any]
BatchReward = Callable[[list[str], list[str], list[Row], list[int]], list[float]]


class RewardSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["task", "math", "code", "format", "length", "model", "function"] = "task"
    weight: float = 1.0
    name: str | None = None
    path: str | None = Field(None, description="model: reward model directory")
    fn: str | None = Field(None, description="function: 'module:function'")
    pattern: str | None = Field(None, description="format: a regex (default: R1 tags)")
    target: int | None = Field(None, ge=1, description="length: tokens before the penalty")
    coef: float = Field(1.0, ge=0, description="length: penalty per `target` excess tokens")
    timeout: float = Field(5.0, gt=0, description="math/code: seconds per check")
    sandbox: Literal["auto", "required", "none"] = "auto"

    @property
    def label(self) -> str:
        return self.name or self.type


class RewardError(ValueError):
    pass


@dataclass
class RewardResult:
    total: list[float]
    components: dict[str, list[float]]
    errors: int


def _import_fn(spec: str) -> Callable[..., Any]:
    try:
        return import_function(spec, "reward function")
    except ValueError as e:
        raise RewardError(str(e)) from None


def build_term(spec: RewardSpec, task: Any = None, device: Any = None) -> BatchReward:
    """One reward term as a batch function."""
    if spec.type == "task":
        if task is None:
            raise RewardError("reward 'task' needs a task")
        return lambda p, c, rows, n: [task.verify(r, x) for r, x in zip(rows, c, strict=True)]
    if spec.type == "math":
        from signalrl.rewards.math import math_reward

        return lambda p, c, rows, n: [
            math_reward(x, str(r["answer"]), timeout=spec.timeout)
            for r, x in zip(rows, c, strict=True)
        ]
    if spec.type == "code":
        from signalrl.rewards.code import code_reward_batch

        def code(p: list[str], c: list[str], rows: list[Row], n: list[int]) -> list[float]:
            return code_reward_batch(
                c,
                [r["tests"] for r in rows],
                entry_points=[r.get("entry_point") for r in rows],
                timeout=spec.timeout,
                sandbox=spec.sandbox,
            )

        return code
    if spec.type == "format":
        from signalrl.rewards.format import R1_PATTERN, format_reward

        pattern = spec.pattern or R1_PATTERN
        return lambda p, c, rows, n: [format_reward(x, pattern=pattern) for x in c]
    if spec.type == "length":
        from signalrl.rewards.length import length_penalty

        if spec.target is None:
            raise RewardError("reward 'length' needs target")
        target = spec.target
        return lambda p, c, rows, n: [length_penalty(k, target, spec.coef) for k in n]
    if spec.type == "model":
        from signalrl.rewards.model import RewardModelScorer

        if not spec.path:
            raise RewardError("reward 'model' needs path (a reward model directory)")
        scorer = RewardModelScorer(spec.path, device=device)

        def model_reward(p: list[str], c: list[str], rows: list[Row], n: list[int]) -> list[float]:
            return scorer.score(p, c)

        model_reward.scorer = scorer  # type: ignore[attr-defined]  # trainers count held models
        return model_reward
    if spec.type == "function":
        if not spec.fn:
            raise RewardError("reward 'function' needs fn: 'module:function'")
        fn = _import_fn(spec.fn)

        def call(p: list[str], c: list[str], rows: list[Row], n: list[int]) -> list[float]:
            cols = {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("prompt",)}
            return list(fn(p, c, **cols))

        return call
    raise RewardError(f"unknown reward type {spec.type!r}")  # pragma: no cover


def as_number(v: Any) -> Any:
    """A numpy scalar (`np.float32(1.0)`, `np.int64(1)`) or a 0-d tensor as the Python number
    it holds (`.item()`); anything else unchanged. A numpy bool becomes a Python bool, which
    the composer still refuses (a reward is a number, not a truth value)."""
    if isinstance(v, (int, float, str, bytes)) or v is None:
        return v
    item, shape = getattr(v, "item", None), getattr(v, "shape", None)
    if callable(item) and shape is not None and tuple(shape) == ():
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            return v
    return v


class RewardComposer:
    """Weighted sum of reward terms with per-term logging and error policy."""

    def __init__(
        self,
        specs: Sequence[RewardSpec],
        task: Any = None,
        on_error: Literal["raise", "zero"] = "raise",
        device: Any = None,
    ) -> None:
        """`device` is where model-based terms (a reward model) are placed."""
        if not specs:
            raise RewardError("at least one reward term is needed")
        labels = [s.label for s in specs]
        if len(set(labels)) != len(labels):
            raise RewardError(f"reward names must be unique, got {labels} (set name: ...)")
        self.specs = list(specs)
        self.terms = [build_term(s, task, device) for s in specs]
        self.on_error = on_error

    def __call__(
        self, prompts: list[str], completions: list[str], rows: list[Row], lengths: list[int]
    ) -> RewardResult:
        n = len(completions)
        total = [0.0] * n
        components: dict[str, list[float]] = {}
        errors = 0
        for spec, term in zip(self.specs, self.terms, strict=True):
            try:
                values = term(prompts, completions, rows, lengths)
                if values is None or len(values) != n:
                    got = "None" if values is None else f"{len(values)} values"
                    raise RewardError(f"returned {got} for {n} completions")
            except Exception as e:  # noqa: BLE001 - any failure of user code is reported
                if self.on_error == "raise":
                    raise RewardError(
                        f"reward {spec.label!r} failed: {e}\n  prompt: {prompts[0]!r}\n"
                        f"  completion: {completions[0]!r}"
                    ) from e
                errors += n
                values = [0.0] * n
            clean: list[float] = []
            for i, raw in enumerate(values):
                v = as_number(raw)
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                if not ok:
                    if self.on_error == "raise":
                        raise RewardError(
                            f"reward {spec.label!r} returned {raw!r} (not a finite number)\n"
                            f"  prompt: {prompts[i]!r}\n  completion: {completions[i]!r}"
                        )
                    errors += 1
                    v = 0.0
                clean.append(float(v))
            components[spec.label] = clean
            for i, v in enumerate(clean):
                total[i] += spec.weight * v
        return RewardResult(total, components, errors)
