"""signalrl doctor on real runs, not hand-made logs: each recipes/doctor-*.yaml really produces
the failure it names, and its healthy counterpart (one key changed) does not; a real TRL
GRPOTrainer trainer_state.json is read with TRL's metric names.

The runs that start from recipes/doctor-sft.yaml (an SFT of the tiny preset, about 25 s on 2
cores) use `runs/doctor-sft/final` (or the checkpoint named by SIGNALRL_DOCTOR_SFT) when it
exists, or train it once for the test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from signalrl.diagnostics.doctor import diagnose

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["logging.progress=false", "logging.tensorboard=false"]


def _train(recipe: str, out: Path, *sets: str) -> Path:
    """Train a recipe in this process; returns its run directory."""
    from signalrl.config.recipe import load_recipe
    from signalrl.trainers import run_recipe

    r = load_recipe(ROOT / "recipes" / recipe, [f"output_dir={out}", *QUIET, *sets])
    run_recipe(r)
    return out / r.name


def _ids(run: Path) -> dict[str, dict]:
    return {f.id: f.to_dict() for f in diagnose(run).findings}


# -- runs from the tiny preset (cheap) ------------------------------------------------------------


def test_beta_extreme_real_run_and_healthy_beta(tmp_path: Path) -> None:
    ids = _ids(_train("doctor-beta-extreme.yaml", tmp_path))
    f = ids["dpo.beta_extreme"]
    assert f["step"] == 1 and "higher" in f["suggestion"] and "0.0001" in f["evidence"]
    # the loss sits at ln 2 too, and no_signal names beta (the policy moves), not the lr
    assert "preference.beta" in ids["dpo.no_signal"]["suggestion"]
    healthy = _ids(_train("doctor-beta-extreme.yaml", tmp_path, "preference.beta=0.1", "name=b"))
    assert healthy == {}  # the healthy DPO run: no dpo.* (nor train.*) finding at all


def test_nan_real_run_and_healthy_lr(tmp_path: Path) -> None:
    ids = _ids(_train("doctor-nan.yaml", tmp_path))
    assert "train.nan" in ids, ids
    assert ids["train.nan"]["step"] == 3 and "grad_norm" in ids["train.nan"]["evidence"]
    healthy = _ids(_train("doctor-nan.yaml", tmp_path, "train.lr=1e-3", "name=ok"))
    assert "train.nan" not in healthy


def test_rollout_mismatch_real_run_and_healthy_sampler(tmp_path: Path) -> None:
    """A sampler 4 optimizer steps stale (sampling.policy_lag) samples another policy than
    the trainer scores: the gap passes 0.1 nats from step 2; without the lag it is float
    rounding (about 1e-7) and the rule stays silent."""
    run = _train("doctor-rollout-mismatch.yaml", tmp_path)
    ids = _ids(run)
    assert "rl.rollout_mismatch" in ids, ids
    assert ids["rl.rollout_mismatch"]["step"] <= 4
    gaps = [r["sampling/logp_diff/mean"] for r in _rows(run)]
    assert gaps[0] < 1e-5 and min(gaps[2:]) > 0.1  # step 1: the sampler is still current
    healthy = _train("doctor-rollout-mismatch.yaml", tmp_path, "sampling.policy_lag=0", "name=ok")
    assert "rl.rollout_mismatch" not in _ids(healthy)
    assert max(r["sampling/logp_diff/mean"] for r in _rows(healthy)) < 1e-5


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "sampling/logp_diff/mean" in r]  # not the final eval row


# -- a real TRL GRPOTrainer run -------------------------------------------------------------------

TRL_GRPO = ROOT / "tests" / "data" / "trl_grpo_trainer_state.json"


def test_real_trl_grpo_trainer_state() -> None:
    """16 steps of TRL's GRPOTrainer on a random tiny model (tests/data/make_trl_grpo_state.py):
    every completion ran into max_completion_length and the reward stayed flat; the groups
    did have reward variance and the KL stayed small, and the doctor says exactly that."""
    state = json.loads(TRL_GRPO.read_text())
    assert any("frac_reward_zero_std" in e for e in state["log_history"])  # TRL's own names
    report = diagnose(TRL_GRPO)
    assert report.steps == 16
    for name in ("reward/mean", "reward/vowels", "frac_zero_std_groups", "kl", "entropy",
                 "completion/truncated_frac", "clip_frac/low", "clip_frac/high"):
        assert name in report.metrics, name
    ids = {f.id: f for f in report.findings}
    assert set(ids) == {"rl.truncation", "rl.no_improvement"}
    assert ids["rl.truncation"].evidence.startswith("1 of completions")
    assert "rl.rollout_mismatch" in report.cannot_run()  # no vLLM: TRL logs no sampler gap


# -- runs from the doctor-sft start ---------------------------------------------------------------


@pytest.fixture(scope="session")
def sft_start(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """runs/doctor-sft/final (or SIGNALRL_DOCTOR_SFT) when it exists, else recipes/doctor-sft.yaml
    trained once for the whole session (about 25 s on 2 cores): under pytest-xdist the first
    worker trains it into the run's shared temporary directory and the others wait for it."""
    from filelock import FileLock

    done = Path(os.environ.get("SIGNALRL_DOCTOR_SFT") or ROOT / "runs" / "doctor-sft" / "final")
    if done.is_dir():
        return done
    base = tmp_path_factory.getbasetemp()
    root = base if worker_id == "master" else base.parent  # the parent: this run's, shared
    final = root / "doctor-sft-start" / "doctor-sft" / "final"
    with FileLock(str(root / "doctor-sft-start.lock")):
        if not final.is_dir():
            _train("doctor-sft.yaml", root / "doctor-sft-start")
    return final


def test_real_healthy_grpo_is_silent(sft_start: Path, tmp_path: Path) -> None:
    run = _train("doctor-healthy.yaml", tmp_path, f"model.name_or_path={sft_start}",
                 "train.steps=10", "eval.every=5")
    assert diagnose(run).findings == []


def test_clip_saturation_real_run(sft_start: Path, tmp_path: Path) -> None:
    start = f"model.name_or_path={sft_start}"
    ids = _ids(_train("doctor-clip-saturation.yaml", tmp_path, start, "train.steps=4"))
    assert ids["rl.clip_saturation"]["step"] == 3
    healthy = _ids(_train("doctor-clip-saturation.yaml", tmp_path, start, "train.steps=4",
                          "train.lr=1e-4", "name=ok"))
    assert "rl.clip_saturation" not in healthy


def test_critic_not_learning_real_run_and_healthy_critic(sft_start: Path, tmp_path: Path) -> None:
    """A frozen critic predicts a constant: explained variance 0 +- 1e-9. With rl.critic_lr
    1e-3 the critic learns which prompts (`+` or `*`) the policy solves: explained variance
    0.046 over steps 8-12 here, and the rule is silent."""
    start = f"model.name_or_path={sft_start}"
    run = _train("doctor-critic.yaml", tmp_path, start, "train.steps=6")
    f = _ids(run)["ppo.critic_not_learning"]
    assert f["step"] == 1 and abs(float(f["evidence"].split()[2])) < 1e-6
    healthy = _train("doctor-critic.yaml", tmp_path, start, "train.steps=12",
                     "rl.critic_lr=1e-3", "name=ok")
    assert "ppo.critic_not_learning" not in _ids(healthy)
    ev = [json.loads(line).get("explained_variance")
          for line in (healthy / "metrics.jsonl").read_text().splitlines()]
    assert max(e for e in ev if e is not None) > 0.1


def test_distill_no_progress_real_run(sft_start: Path, tmp_path: Path) -> None:
    teacher = f"distill.teacher={sft_start}"
    ids = _ids(_train("doctor-distill-no-progress.yaml", tmp_path, teacher))
    assert "distill.no_progress" in ids
    assert "rl.zero_variance" not in ids  # the reward is only watched (reward_weight 0)
    healthy = _ids(_train("doctor-distill-no-progress.yaml", tmp_path, teacher,
                          "train.lr=1e-3", "name=ok"))
    assert "distill.no_progress" not in healthy
