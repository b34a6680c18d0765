"""signalrl doctor: every rule on synthetic series (fires on a failing one, silent on a healthy
one), real short runs from recipes/doctor-*.yaml, TRL trainer_state.json, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from signalrl.diagnostics.doctor import (
    DoctorError,
    LiveDoctor,
    diagnose,
    rows_to_series,
    trl_rows,
)
from signalrl.diagnostics.rules import BUILTIN_RULES, LN2, Rule

ROOT = Path(__file__).resolve().parents[1]
RULES = {r.id: r for r in BUILTIN_RULES}


def rows(n: int, **cols: Any) -> list[dict[str, Any]]:
    """n rows (steps 1..n); a column is a list of n values or a function of the step."""
    out = []
    for i in range(n):
        row: dict[str, Any] = {"step": i + 1}
        for name, col in cols.items():
            row[name.replace("__", "/")] = col(i + 1) if callable(col) else col[i]
        out.append(row)
    return out


def fired(rule_id: str, data: list[dict[str, Any]], config: dict | None = None) -> Any:
    return RULES[rule_id].evaluate(rows_to_series(data, config))


N = 30
HEALTHY_RL = rows(
    N,
    reward__mean=lambda s: 0.3 + 0.01 * s,
    reward__std=[0.4] * N,
    reward__task=lambda s: 0.3 + 0.01 * s,
    frac_zero_std_groups=lambda s: 0.3,
    entropy=lambda s: 0.8 - 0.005 * s,
    kl=lambda s: 0.002 * s,
    clip_frac__low=[0.01] * N,
    clip_frac__high=[0.01] * N,
    completion__truncated_frac=[0.05] * N,
    completion__mean_length=[4.0] * N,
    grad_norm=lambda s: 1.0 + 0.1 * (s % 3),
    eval__accuracy=lambda s: 0.3 + 0.01 * s,
    explained_variance=lambda s: 0.1 + 0.01 * s,
    sampling__logp_diff__mean=[0.01] * N,
    loss=[0.1] * N,
)
HEALTHY_DPO = rows(
    N,
    loss=lambda s: LN2 - 0.01 * s,
    rewards__accuracies=lambda s: min(0.9, 0.5 + 0.02 * s),
    rewards__margins=lambda s: 0.05 * s,
    rewards__chosen=lambda s: 0.02 * s,
    rewards__rejected=lambda s: -0.03 * s,
    logps__chosen=lambda s: -12.0 - 0.01 * s,
    eval__rewards__accuracies=lambda s: min(0.85, 0.5 + 0.02 * s),
    eval__loss=lambda s: LN2 - 0.008 * s,
    grad_norm=[1.0] * N,
)
HEALTHY_DISTILL = rows(N, distill__reverse_kl=lambda s: 1.0 - 0.02 * s, grad_norm=[1.0] * N)


def with_(base: list[dict[str, Any]], **cols: Any) -> list[dict[str, Any]]:
    new = rows(len(base), **cols)
    return [{**a, **b} for a, b in zip(base, new, strict=True)]


FAILING: dict[str, list[dict[str, Any]]] = {
    "dpo.no_signal": with_(
        HEALTHY_DPO, loss=[LN2] * N, rewards__margins=[1e-4] * N, rewards__accuracies=[0.5] * N
    ),
    "dpo.likelihood_displacement": with_(HEALTHY_DPO, logps__chosen=lambda s: -12.0 - 0.5 * s),
    "dpo.overfit": with_(
        HEALTHY_DPO,
        rewards__accuracies=[1.0] * N,
        eval__rewards__accuracies=lambda s: 0.6 - 0.005 * s,
    ),
    "dpo.beta_extreme": with_(HEALTHY_DPO, rewards__margins=lambda s: 6.0 + s),
    "rl.zero_variance": with_(HEALTHY_RL, frac_zero_std_groups=[0.95] * N),
    "rl.entropy_collapse": with_(HEALTHY_RL, entropy=lambda s: 0.8 if s < 10 else 0.01),
    "rl.entropy_explosion": with_(HEALTHY_RL, entropy=lambda s: 0.8 if s < 10 else 3.0),
    "rl.kl_blowup": with_(HEALTHY_RL, kl=lambda s: 0.01 if s < 15 else 2.0),
    "rl.clip_saturation": with_(HEALTHY_RL, clip_frac__high=[0.3] * N),
    "rl.truncation": with_(HEALTHY_RL, completion__truncated_frac=[0.9] * N),
    "rl.length_exploitation": with_(
        HEALTHY_RL, completion__mean_length=lambda s: 4.0 + s, eval__accuracy=[0.3] * N
    ),
    "rl.reward_hacking": with_(
        HEALTHY_RL, eval__accuracy=lambda s: 0.4 - 0.005 * s, reward__mean=lambda s: 0.2 + 0.02 * s
    ),
    "rl.no_improvement": with_(HEALTHY_RL, reward__mean=[0.3] * N, eval__accuracy=[0.3] * N),
    "rl.rollout_mismatch": with_(HEALTHY_RL, sampling__logp_diff__mean=[0.5] * N),
    "ppo.critic_not_learning": with_(HEALTHY_RL, explained_variance=[-0.2] * N),
    "distill.no_progress": with_(HEALTHY_DISTILL, distill__reverse_kl=[1.0] * N),
    "train.nan": with_(HEALTHY_RL, loss=lambda s: None if s == 7 else 0.1),
    "train.grad_spikes": with_(HEALTHY_RL, grad_norm=lambda s: 50.0 if s == 20 else 1.0),
}


def healthy_for(rule_id: str) -> list[dict[str, Any]]:
    if rule_id.startswith("dpo."):
        return HEALTHY_DPO
    if rule_id.startswith("distill."):
        return HEALTHY_DISTILL
    return HEALTHY_RL


def test_every_builtin_rule_is_tested_and_documented() -> None:
    assert set(FAILING) == set(RULES)
    for r in BUILTIN_RULES:
        assert r.doc, r.id
        assert r.severity in ("info", "warning", "critical")


@pytest.mark.parametrize("rule_id", sorted(FAILING))
def test_rule_fires_on_failing_series(rule_id: str) -> None:
    f = fired(rule_id, FAILING[rule_id], {"preference": {"beta": 0.1}})
    assert f is not None and f.id == rule_id
    assert any(c.isdigit() for c in f.evidence) and f.suggestion


@pytest.mark.parametrize("rule_id", sorted(FAILING))
def test_rule_silent_on_healthy_series(rule_id: str) -> None:
    assert fired(rule_id, healthy_for(rule_id), {"preference": {"beta": 0.1}}) is None


def test_inf_written_as_1e308_is_caught_and_healthy_runs_are_silent(tmp_path: Path) -> None:
    data = with_(HEALTHY_RL, kl=lambda s: 1e308 if s == 5 else 0.01)
    f = fired("train.nan", data)
    assert f is not None and f.step == 5 and "kl" in f.evidence
    for healthy in (HEALTHY_RL, HEALTHY_DPO, HEALTHY_DISTILL):
        p = tmp_path / "metrics.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in healthy))
        assert diagnose(p).findings == []


def test_live_doctor_reports_each_finding_once() -> None:
    doc = LiveDoctor()
    data = FAILING["rl.truncation"]
    assert doc.update(data[:1]) == []
    new = doc.update(data[1:5])
    assert [f.id for f in new] == ["rl.truncation"] and new[0].step == 3
    assert doc.update(data[5:]) == []
    assert [f.id for f in doc.findings] == ["rl.truncation"]


def test_user_rules_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_doctor_rules.py").write_text(
        "from signalrl.diagnostics.rules import Hit, Rule\n"
        "def _check(s, r):\n"
        "    pts = s.finite('loss')\n"
        "    return Hit(pts[0][0], {'v': pts[0][1]}) if pts and pts[0][1] > 0 else None\n"
        "mine = Rule('my.loss_positive', 'info', ('loss',), _check, 'loss {v}', 'nothing')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in HEALTHY_RL))
    report = diagnose(p, extra_modules=["my_doctor_rules"])
    assert [f.id for f in report.findings] == ["my.loss_positive"]
    with pytest.raises(DoctorError, match="no_such_rules_module"):
        diagnose(p, extra_modules=["no_such_rules_module"])
    assert isinstance(BUILTIN_RULES[0], Rule)


# -- bad input --------------------------------------------------------------------------------


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(DoctorError, match="no such file"):
        diagnose(tmp_path / "missing")
    with pytest.raises(DoctorError, match="not a run"):
        diagnose(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(DoctorError, match="no logged step"):
        diagnose(run)
    (run / "metrics.jsonl").write_text('{"step": 1, "lo')
    with pytest.raises(DoctorError, match="torn"):
        diagnose(run)
    (run / "metrics.jsonl").write_text('{"step": 1, "tokens": 3}\n{"step": 2, "tokens": 4}\n')
    with pytest.raises(DoctorError, match="no rule applies.*tokens"):
        diagnose(run)
    (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(DoctorError, match="line 2"):
        diagnose(run)
    bad = tmp_path / "trainer_state.json"
    bad.write_text("{}")
    with pytest.raises(DoctorError, match="log_history"):
        diagnose(bad)


def test_truncated_last_line_is_a_note_not_an_error(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in FAILING["rl.truncation"]) + '{"step": 3')
    report = diagnose(p)
    assert [f.id for f in report.findings] == ["rl.truncation"] and report.notes


def test_doctor_command_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from rich.console import Console

    from signalrl.diagnostics.cli import HEALTHY, doctor_command

    bad, good = tmp_path / "bad", tmp_path / "good"
    for d, data in ((bad, FAILING["rl.kl_blowup"]), (good, HEALTHY_RL)):
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    console = Console(width=200)
    assert doctor_command([good], False, None, console) == 0
    assert HEALTHY in capsys.readouterr().out
    assert doctor_command([bad], True, None, console) == 1
    out = json.loads(capsys.readouterr().out)
    assert [f["id"] for f in out] == ["rl.kl_blowup"] and out[0]["step"] == 15
    assert set(out[0]) == {"id", "severity", "step", "evidence", "suggestion"}
    assert doctor_command([bad, tmp_path / "nope"], False, None, console) == 2
    text = capsys.readouterr().out
    assert "rl.kl_blowup" in text and "no such file" in text


# -- TRL ----------------------------------------------------------------------------------------


def test_trl_names_are_mapped() -> None:
    hist = [
        {
            "step": 1,
            "reward": 0.1,
            "reward_std": 0.2,
            "frac_reward_zero_std": 0.9,
            "completions/clipped_ratio": 0.7,
            "rewards/acc/mean": 0.1,
            "rewards/acc/std": 0.3,
            "clip_ratio/low_mean": 0.0,
            "learning_rate": 1e-4,
            "epoch": 0.1,
        },
        {"step": 1, "eval_rewards/accuracies": 0.5, "eval_loss": 0.69},
        {"step": 1, "train_runtime": 3.0, "train_loss": 0.5},
    ]
    (row,) = trl_rows(hist)
    assert row == {
        "step": 1,
        "reward/mean": 0.1,
        "reward/std": 0.2,
        "frac_zero_std_groups": 0.9,
        "completion/truncated_frac": 0.7,
        "reward/acc": 0.1,
        "clip_frac/low": 0.0,
        "lr": 1e-4,
        "eval/rewards/accuracies": 0.5,
        "eval/loss": 0.69,
    }


def test_trl_grpo_trainer_state(tmp_path: Path) -> None:
    hist = [
        {
            "step": s,
            "reward": 0.0,
            "reward_std": 0.0,
            "frac_reward_zero_std": 1.0,
            "completions/clipped_ratio": 1.0,
            "completions/mean_length": 8.0,
            "entropy": 2.0,
            "kl": 0.0,
            "loss": 0.0,
            "grad_norm": 0.0,
        }
        for s in range(1, 9)
    ]
    p = tmp_path / "trainer_state.json"
    p.write_text(json.dumps({"log_history": hist, "global_step": 8}))
    ids = {f.id for f in diagnose(tmp_path).findings}
    assert {"rl.zero_variance", "rl.truncation"} <= ids


TRL_DPO = ROOT / "tests" / "data" / "trl_dpo_trainer_state.json"


@pytest.mark.skipif(not TRL_DPO.is_file(), reason="no saved TRL DPOTrainer state")
def test_real_trl_dpo_trainer_state() -> None:
    report = diagnose(TRL_DPO)
    assert "rewards/accuracies" in report.metrics and "eval/rewards/accuracies" in report.metrics
    assert report.findings == []  # a sane 12-step TRL DPO run (tiny model, lr 1e-3, beta 0.1)
    assert math.isfinite(report.steps)


@pytest.mark.skipif(not TRL_DPO.is_file(), reason="no saved TRL DPOTrainer state")
def test_trl_dpo_state_with_no_signal(tmp_path: Path) -> None:
    state = json.loads(TRL_DPO.read_text())
    for e in state["log_history"]:
        if "rewards/margins" in e:
            e.update({"loss": LN2, "rewards/margins": 1e-5, "rewards/accuracies": 0.5})
    p = tmp_path / "trainer_state.json"
    p.write_text(json.dumps(state))
    assert [f.id for f in diagnose(p).findings] == ["dpo.no_signal"]


# -- real runs ------------------------------------------------------------------------------


def _train(recipe: str, out: Path, *sets: str) -> Path:
    """Train a recipe in this process (no interpreter start-up); returns its run directory."""
    from signalrl.config.recipe import load_recipe
    from signalrl.trainers import run_recipe

    r = load_recipe(ROOT / "recipes" / recipe, [f"output_dir={out}", *sets])
    run_recipe(r)
    return out / r.name


def test_real_runs_truncation_and_dpo_no_signal(tmp_path: Path) -> None:
    trunc = _train("doctor-truncation.yaml", tmp_path)
    ids = {f.id: f for f in diagnose(trunc).findings}
    assert "rl.truncation" in ids and "dpo.no_signal" not in ids
    nosig = _train("doctor-dpo-no-signal.yaml", tmp_path)
    ids2 = {f.id for f in diagnose(nosig).findings}
    assert ids2 == {"dpo.no_signal"}  # and nothing else: no RL rule runs on a DPO run


# the healthy GRPO run (from the doctor-sft start) is in tests/test_doctor_runs.py


def test_beta_too_small_and_cannot_run(tmp_path: Path) -> None:
    data = with_(
        HEALTHY_DPO,
        rewards__chosen=[1e-5] * N,
        rewards__rejected=[-1e-5] * N,
        rewards__margins=[2e-5] * N,
        logps__chosen=lambda s: -12.0 + 0.1 * s,
    )
    f = fired("dpo.beta_extreme", data, {"preference": {"beta": 1e-6}})
    assert f is not None and "higher" in f.suggestion and "1e-06" in f.evidence
    p = tmp_path / "metrics.jsonl"
    no_kl = [{k: v for k, v in r.items() if k != "kl"} for r in HEALTHY_RL]
    p.write_text("".join(json.dumps(r) + "\n" for r in no_kl))
    report = diagnose(p)
    assert report.cannot_run() == {"rl.kl_blowup": ["kl"]}


def test_the_live_doctor_prints_once_stops_on_a_severity_and_marks_the_report(tmp_path):
    from signalrl.config import load_recipe
    from signalrl.logging import read_metrics
    from signalrl.trainers import trainer_class

    root = Path(__file__).parent.parent
    r = load_recipe(
        root / "recipes" / "doctor-truncation.yaml",
        [
            f"output_dir={tmp_path}",
            "train.steps=8",
            "doctor.stop_on=[warning]",
            "logging.progress=false",
            "logging.tensorboard=false",
        ],
    )
    t = trainer_class(r.trainer)(r)
    t.train()
    found = {f["id"]: f for f in t.findings()}
    assert "rl.truncation" in found and found["rl.truncation"]["metrics"]
    steps = [x["step"] for x in read_metrics(tmp_path / "doctor-truncation")]
    assert steps[-1] < 8  # stopped early, cleanly: a checkpoint, the final row and final/
    run = tmp_path / "doctor-truncation"
    assert (run / "final" / "model.safetensors").is_file() and list((run / "checkpoints").iterdir())
    assert "rl.truncation" in (run / "report.html").read_text()


def test_the_live_doctor_does_not_redo_the_whole_run_at_every_step(monkeypatch):
    """Its work per logged step must not grow with the run: the series are extended, not
    rebuilt from every row, and the rules run on a schedule (at most 1% of the run late)."""
    import signalrl.diagnostics.doctor as doctor_mod

    calls = {"rules": 0, "largest_rebuild": 0}
    run_rules, rows_to_series = doctor_mod.run_rules, doctor_mod.rows_to_series

    def counting_rules(rules, series):  # noqa: ANN001, ANN202
        calls["rules"] += 1
        return run_rules(rules, series)

    def counting_series(rows, config=None):  # noqa: ANN001, ANN202
        rows = list(rows)
        calls["largest_rebuild"] = max(calls["largest_rebuild"], len(rows))
        return rows_to_series(rows, config)

    monkeypatch.setattr(doctor_mod, "run_rules", counting_rules)
    monkeypatch.setattr(doctor_mod, "rows_to_series", counting_series)
    live = doctor_mod.LiveDoctor()
    for step in range(1, 1001):
        live.update([{"step": step, "loss": 1.0, "reward/mean": 0.5, "entropy": 0.7}])
    assert calls["largest_rebuild"] == 1
    assert calls["rules"] < 400, calls
    # a failure that starts late is still found, with the step it started
    for step in range(1001, 1021):
        live.update([{"step": step, "loss": float("nan"), "reward/mean": 0.5, "entropy": 0.7}])
    assert [f.step for f in live.findings if f.id == "train.nan"] == [1001]
