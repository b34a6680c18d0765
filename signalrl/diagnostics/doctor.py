"""`signalrl doctor`: read a run's logs and name what is going wrong, with the evidence and the
recipe knob to turn.

Input: a signalrl run directory (`metrics.jsonl` + `config.yaml`), a `metrics.jsonl` file,
or a Hugging Face Trainer `trainer_state.json` (a file, or a checkpoint / output directory
holding one), whose `log_history` uses TRL's metric names; `TRL_NAMES` maps them to ours;
or a Weights & Biases run directory (`wandb/offline-run-*`, `wandb/run-*`: its
`run-<id>.wandb` history, `wandb_log`), e.g. what signalrl's wandb sink wrote.

`diagnose(path)` runs every rule once over the whole run; `LiveDoctor(rules).update(rows)` is
the incremental form for a trainer's loop: it returns only the findings not reported before
(each rule id is reported once, at the first step it held).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signalrl.diagnostics.rules import (
    BUILTIN_RULES,
    Finding,
    Rule,
    RunSeries,
    load_rules,
    merge_rules,
)

# TRL (1.16: trl/trainer/dpo_trainer.py, grpo_trainer.py) -> signalrl. Names not listed here
# are kept as they are (DPO's rewards/chosen, rewards/accuracies, logps/chosen ... and
# entropy, kl, loss, grad_norm are already the same). Eval rows prefix `eval_`; it becomes
# `eval/` (eval_rewards/accuracies -> eval/rewards/accuracies, eval_loss -> eval/loss).
TRL_NAMES: dict[str, str] = {
    "reward": "reward/mean",
    "reward_std": "reward/std",
    "frac_reward_zero_std": "frac_zero_std_groups",
    "completions/clipped_ratio": "completion/truncated_frac",
    "completions/mean_length": "completion/mean_length",
    "clip_ratio/low_mean": "clip_frac/low",
    "clip_ratio/high_mean": "clip_frac/high",
    "sampling/sampling_logp_difference/mean": "sampling/logp_diff/mean",
    "sampling/sampling_logp_difference/max": "sampling/logp_diff/max",
    "learning_rate": "lr",
}
_TRL_TERM = re.compile(r"^rewards/(.+)/(mean|std)$")  # GRPO's per-function reward columns
_TRL_SKIP = {"epoch", "total_flos", "train_runtime", "train_samples_per_second",
             "train_steps_per_second", "train_loss", "num_tokens"}


# rules on metrics more than one kind of trainer logs (TRL's DPO logs entropy too): they say
# nothing about which kind of run this is
_SHARED_RULES = {"rl.entropy_collapse", "rl.entropy_explosion", "train.grad_spikes"}


class DoctorError(Exception):
    """A run the doctor cannot read; the message says what is wrong."""


@dataclass
class Report:
    """The doctor's answer for one run."""

    path: Path
    findings: list[Finding]
    metrics: list[str]
    skipped: dict[str, list[str]] = field(default_factory=dict)  # rule id -> missing metrics
    notes: list[str] = field(default_factory=list)
    steps: int = 0
    ran: list[str] = field(default_factory=list)  # ids of the rules that could run

    @property
    def healthy(self) -> bool:
        return not self.findings

    def cannot_run(self) -> dict[str, list[str]]:
        """Skipped rules of the families that did run (an RL run's missing RL metrics, not
        the DPO rules): what the trainer should log for the doctor to check them."""
        ran = {r.split(".")[0] for r in self.ran if r not in _SHARED_RULES}
        return {k: v for k, v in self.skipped.items() if k.split(".")[0] in ran}


# -- reading ---------------------------------------------------------------------------------


def _value(v: Any) -> float | None:
    if v is None:
        return math.nan  # read_metrics writes NaN as null
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    v = float(v)
    if abs(v) >= 1e308:
        return math.copysign(math.inf, v)  # and +-inf as +-1e308
    return v


def rows_to_series(rows: Iterable[Mapping[str, Any]], config: Mapping[str, Any] | None = None
                   ) -> RunSeries:
    """Metric rows (each with a `step`) as a `RunSeries`; non-numeric fields are ignored."""
    metrics: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        step = row.get("step")
        if not isinstance(step, int | float) or isinstance(step, bool):
            continue
        for name, raw in row.items():
            if name == "step":
                continue
            v = _value(raw)
            if v is not None:
                metrics.setdefault(name, []).append((int(step), v))
    return RunSeries(metrics, dict(config or {}))


def trl_rows(log_history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """TRL / HF Trainer `log_history` rows with signalrl's metric names, merged by step."""
    by_step: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if "step" not in entry or "train_runtime" in entry:
            continue
        row = by_step.setdefault(int(entry["step"]), {"step": int(entry["step"])})
        for key, v in entry.items():
            if key == "step" or key in _TRL_SKIP:
                continue
            prefix, name = ("eval/", key[5:]) if key.startswith("eval_") else ("", key)
            m = _TRL_TERM.match(name)
            if m:
                if m.group(2) == "std":
                    continue
                name = f"reward/{m.group(1)}"
            row[prefix + TRL_NAMES.get(name, name)] = v
    return [by_step[s] for s in sorted(by_step)]


def _read_trainer_state(path: Path) -> list[dict[str, Any]]:
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DoctorError(f"{path}: not a readable trainer_state.json ({e})") from None
    hist = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(hist, list):
        raise DoctorError(f"{path}: has no `log_history` list (not a Trainer state file)")
    rows = trl_rows(hist)
    if not rows:
        raise DoctorError(f"{path}: `log_history` holds no logged step")
    return rows


def _read_config(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "config.yaml"
    if not p.is_file():
        return {}
    import yaml

    try:
        cfg = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _read_signalrl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    from signalrl.logging.run import read_metrics

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rows = read_metrics(path)
        except (OSError, ValueError) as e:
            raise DoctorError(str(e)) from None
    notes.extend(str(w.message) for w in caught)
    if not rows:
        torn = " (its only line was torn)" if notes else ""
        raise DoctorError(f"{path}: holds no logged step{torn}")
    return rows


def _hf_wandb_entry(row: Mapping[str, Any]) -> dict[str, Any]:
    """A HF Trainer's W&B history row as its `log_history` entry (`train/loss` -> `loss`,
    `eval/loss` -> `eval_loss`, `train/global_step` -> `step`)."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k == "train/global_step":
            out["step"] = v
        elif k.startswith(("train/", "eval/")):
            head, rest = k.split("/", 1)
            out[rest if head == "train" else f"eval_{rest}"] = v
    return out


def _read_wandb(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A W&B run's history and config (`wandb_log`): signalrl's names as they are; a Hugging
    Face Trainer's (`report_to="wandb"`: `train/<TRL name>`, step `train/global_step`)
    mapped like its trainer_state.json."""
    try:
        from signalrl.diagnostics.wandb_log import read_wandb_run

        rows, config, _ = read_wandb_run(path)
    except ImportError:
        raise DoctorError(f"{path}: reading a W&B run needs wandb: pip install "
                          "'signalrl[wandb]'") from None
    except (OSError, ValueError) as e:
        raise DoctorError(str(e)) from None
    if any(k.startswith("train/") for r in rows for k in r):  # HF Trainer -> log_history
        rows = trl_rows([h for h in map(_hf_wandb_entry, rows) if "step" in h])
    if not rows:
        raise DoctorError(f"{path}: the W&B run holds no logged step")
    return rows, config if "trainer" in config else {}


def load_run(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """(metric rows in signalrl's names, the resolved config or {}, notes) of a run."""
    from signalrl.diagnostics.wandb_log import find_wandb_file

    p = Path(path)
    notes: list[str] = []
    if not p.exists():
        raise DoctorError(f"{p}: no such file or directory")
    if find_wandb_file(p) is not None:  # a W&B run directory (wandb/offline-run-*, run-*)
        return (*_read_wandb(p), notes)
    if p.is_dir():
        if (p / "metrics.jsonl").is_file():
            return _read_signalrl(p / "metrics.jsonl", notes), _read_config(p), notes
        if (p / "trainer_state.json").is_file():
            return _read_trainer_state(p / "trainer_state.json"), {}, notes
        raise DoctorError(
            f"{p}: not a run (no metrics.jsonl, as signalrl writes, and no trainer_state.json, "
            "as a Hugging Face Trainer checkpoint holds)"
        )
    if p.suffix == ".json":
        return _read_trainer_state(p), {}, notes
    return _read_signalrl(p, notes), _read_config(p.parent), notes


# -- diagnosing ------------------------------------------------------------------------------


def resolve_rules(rules: Sequence[Rule] | None = None, extra_modules: Iterable[str] = ()
                  ) -> list[Rule]:
    """`rules` (default: the built-in catalogue) plus the rules of each user module."""
    out = list(BUILTIN_RULES if rules is None else rules)
    for mod in extra_modules:
        try:
            user = load_rules(mod)
        except (ImportError, TypeError) as e:
            raise DoctorError(f"rules module {mod!r}: {e}") from None
        out = merge_rules(out, user)
    return out


def run_rules(
    rules: Sequence[Rule], series: RunSeries
) -> tuple[list[Finding], dict[str, list[str]]]:
    """The findings (sorted by step) and, per rule that could not run, its missing metrics."""
    names = series.names()
    findings: list[Finding] = []
    skipped: dict[str, list[str]] = {}
    for rule in rules:
        lack = rule.missing(names)
        if lack:
            skipped[rule.id] = lack
            continue
        f = rule.evaluate(series)
        if f is not None:
            findings.append(f)
    findings.sort(key=lambda f: (f.step, f.id))
    return findings, skipped


def diagnose(run_dir_or_file: str | Path, rules: Sequence[Rule] | None = None,
             extra_modules: Iterable[str] = ()) -> Report:
    """Diagnose one run (a signalrl run directory or metrics.jsonl, or a Trainer
    trainer_state.json). Raises `DoctorError` on input it cannot read or judge."""
    rows, config, notes = load_run(run_dir_or_file)
    series = rows_to_series(rows, config)
    active = resolve_rules(rules, extra_modules)
    found = sorted(series.names())
    if not any(r.needs or r.needs_any for r in active if not r.missing(series.names())):
        raise DoctorError(
            f"{run_dir_or_file}: no rule applies to the metrics found ({', '.join(found)}); "
            "the doctor reads DPO, RL and distillation runs"
        )
    findings, skipped = run_rules(active, series)
    ran = [r.id for r in active if r.id not in skipped and r.needs]
    return Report(Path(run_dir_or_file), findings, found, skipped, notes, len(rows), ran)


class LiveDoctor:
    """Incremental diagnosis for a trainer's loop: `update(rows)` adds the newly logged rows
    and returns the findings not reported before (each rule id once).

    The cost of a call does not grow with the run: the series are extended in place (not
    rebuilt from every row), reported rules are not evaluated again, and the others run
    when the rows logged since their last evaluation reach 1% of the run (at every row for
    the first hundred), so a finding is reported at most 1% of the run after its rule would
    first fire, with the step where it started."""

    def __init__(self, rules: Sequence[Rule] | None = None,
                 config: Mapping[str, Any] | None = None) -> None:
        self.rules = list(BUILTIN_RULES if rules is None else rules)
        self.config = dict(config or {})
        self.rows: list[dict[str, Any]] = []
        self.reported: dict[str, Finding] = {}
        self._series = RunSeries({}, self.config)
        self._evaluated = 0  # rows at the last evaluation

    def update(self, rows: Iterable[Mapping[str, Any]]) -> list[Finding]:
        new_rows = [dict(r) for r in rows]
        self.rows.extend(new_rows)
        for name, points in rows_to_series(new_rows).metrics.items():
            self._series.metrics.setdefault(name, []).extend(points)
        n = len(self.rows)
        if n - self._evaluated < max(1, n // 100):
            return []
        self._evaluated = n
        pending = [r for r in self.rules if r.id not in self.reported]
        findings, _ = run_rules(pending, self._series)
        for f in findings:
            self.reported[f.id] = f
        return findings

    @property
    def findings(self) -> list[Finding]:
        return list(self.reported.values())
