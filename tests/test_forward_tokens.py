"""`student/forward_tokens` and `time/train_s`: the budget counters the comparison plots use."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from signalrl.config import recipe_from_dict
from signalrl.trainers.online_rl import OnlineRLTrainer, count_forward_tokens

sys.path.insert(0, str(Path(__file__).parent))
from test_trainers import SevenTask  # noqa: E402


def _recipe(tmp_path, **rl):
    return recipe_from_dict(
        {
            "name": "count",
            "output_dir": str(tmp_path),
            "trainer": "online_rl",
            "model": {"name_or_path": "tiny", "attn_implementation": "eager"},
            "train": {"steps": 2, "lr": 1e-3, "batch_size": 3, "micro_batch_size": 4},
            "rl": {"group_size": 4, **rl},
            "sampling": {"max_new_tokens": 4},
            "eval": {"n": 2},
            "logging": {"progress": False, "samples_every": 0, "tensorboard": False},
        },
        "test",
    )


def _capture_rollouts(t: OnlineRLTrainer) -> list:
    seen: list = []
    orig = t._sample_round

    def wrapped(n):
        roll = orig(n)
        seen.append(roll)
        return roll

    t._sample_round = wrapped  # type: ignore[method-assign]
    return seen


def _sequence_tokens(roll, g: int, rows: list[int] | None = None) -> int:
    """Distinct prompts (once per group that has a row in `rows`) + completion tokens."""
    rows = list(range(len(roll.completion_ids))) if rows is None else rows
    groups = sorted({i // g for i in rows})
    return sum(len(roll.prompt_ids[k * g]) for k in groups) + sum(
        len(roll.completion_ids[i]) for i in rows
    )


def test_count_forward_tokens():
    assert count_forward_tokens([[1, 2, 3], [4]], 10) == 14
    assert count_forward_tokens([], 0) == 0


def test_every_student_pass_is_counted_once(tmp_path):
    # REINFORCE++ advantages are per token (no zero-advantage skipping); mu=2 adds the
    # old-log-prob pass: sampling + old pass + 2 updates = 4 passes over the same sequences
    # (micro-batches of 4 rows split the 3 groups of 4 exactly, so prompts count once each).
    t = OnlineRLTrainer(_recipe(tmp_path, algorithm="reinforce_pp", mu=2), task=SevenTask())
    seen = _capture_rollouts(t)
    m1, _ = t.train_step()
    assert m1["student/forward_tokens"] == 4 * _sequence_tokens(seen[0], 4)
    m2, _ = t.train_step()
    assert m2["student/forward_tokens"] == 4 * (
        _sequence_tokens(seen[0], 4) + _sequence_tokens(seen[1], 4)
    )
    assert 0 < m1["time/train_s"] < m2["time/train_s"]
    assert m2["time/train_s"] == m1["time/step_s"] + m2["time/step_s"]
    # resumable: the counters are in the checkpoint
    state = t.extra_state()
    assert state["forward_tokens"] == m2["student/forward_tokens"]


def test_skipped_rows_are_not_counted(tmp_path):
    # GRPO skips rows whose advantage is exactly 0: their training forward never runs
    torch.manual_seed(0)
    t = OnlineRLTrainer(_recipe(tmp_path, algorithm="grpo", kl_coef=0.0), task=SevenTask())
    seen = _capture_rollouts(t)
    m, _ = t.train_step()
    roll = seen[0]
    std = roll.rewards.view(-1, 4).std(-1)
    kept = [i for i in range(len(roll.completion_ids)) if std[i // 4] > 0]
    expected = _sequence_tokens(roll, 4) + (_sequence_tokens(roll, 4, kept) if kept else 0)
    assert m["batch/trained_rows"] == len(kept)
    assert m["student/forward_tokens"] == expected
