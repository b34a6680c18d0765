"""Run directories: exact resume for every trainer, nothing deleted by mistake, one process
per run, torn logs and stale temporaries, failed starts that do not block the rerun."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from signalrl.config import recipe_from_dict
from signalrl.logging import read_metrics
from signalrl.models import load_model
from signalrl.trainers import run_recipe, trainer_class

sys.path.insert(0, str(Path(__file__).parent))

DATA = Path(__file__).parent / "data"
TASK = {"name": "arithmetic", "digits": 1, "n_train": 64, "n_test": 4}
COMMON = {
    "model": {"name_or_path": "tiny", "attn_implementation": "eager"},
    "task": TASK,
    "sampling": {"max_new_tokens": 3},
    "eval": {"n": 2},
    "logging": {"progress": False, "samples_every": 0, "tensorboard": False},
}
PREF = {"data": {"path": str(DATA / "prefs_sample.jsonl"), "test_fraction": 0.2}}
KTO = {"data": {"path": str(DATA / "kto_sample.jsonl"), "test_fraction": 0.2}}

# trainer, its sections, a train section: every trainer and every reference mode
CASES: dict[str, dict] = {
    "sft": {"trainer": "sft", "train": {"batch_size": 8, "lr": 2e-3}},
    "dpo-copy": {"trainer": "preference", **PREF, "preference": {"reference": "copy"}},
    "dpo-lora": {"trainer": "preference", **PREF, "preference": {"reference": "lora"}},
    "dpo-precomputed": {
        "trainer": "preference",
        **PREF,
        "preference": {"reference": "precomputed"},
    },
    "simpo": {
        "trainer": "preference",
        **PREF,
        "preference": {"loss_type": "simpo", "reference": "none", "beta": 2.0},
    },
    "kto": {"trainer": "preference", **KTO, "preference": {"loss_type": "kto"}},
    "online-dpo": {"trainer": "preference", "preference": {"online": True, "online_samples": 4}},
    "reward-model": {"trainer": "reward_model", **PREF},
    "rloo": {"trainer": "online_rl", "rl": {"algorithm": "rloo", "group_size": 4}},
    "reinforce_pp": {"trainer": "online_rl", "rl": {"algorithm": "reinforce_pp", "group_size": 4}},
    "distill-on-policy": {
        "trainer": "distill",
        "distill": {"teacher": "tiny", "mode": "on_policy"},
        "rl": {"group_size": 2, "kl_coef": 0.1, "kl_placement": "reward"},
        "model": {"name_or_path": "tiny", "seed": 3, "attn_implementation": "eager"},
    },
    "distill-gkd": {
        "trainer": "distill",
        "distill": {"teacher": "tiny", "mode": "gkd", "lmbda": 0.5},
        "rl": {"group_size": 2},
        "model": {"name_or_path": "tiny", "seed": 3, "attn_implementation": "eager"},
    },
}


def _recipe(tmp_path: Path, name: str, case: dict, **over) -> object:
    data = {"name": name, "output_dir": str(tmp_path), **COMMON}
    data["train"] = {"steps": 4, "lr": 5e-3, "batch_size": 2, **case.get("train", {})}
    data.update({k: v for k, v in case.items() if k != "train"})
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return recipe_from_dict(data, "test")


def _final_weights(run: Path, trainer: str) -> dict[str, torch.Tensor]:
    if trainer == "reward_model":
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(run / "final").state_dict()
    return load_model(str(run / "final"))[0].state_dict()


NUMBERS = ("loss", "kl", "grad_norm", "rewards/margins", "reward/mean", "distill/reverse_kl")


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_resume_equals_an_uninterrupted_run(tmp_path, case):
    """Interrupted after a step-1 checkpoint and resumed, a run logs the same numbers and
    ends with the same weights as one that ran through (reference, critic, teacher, RNG,
    data order and budget counters all restored)."""
    spec = CASES[case]
    run_recipe(_recipe(tmp_path, "whole", spec))
    run_recipe(_recipe(tmp_path, "part", spec, train={"steps": 2}, checkpoint={"every": 1}))
    resumed = _recipe(tmp_path, "part", spec, checkpoint={"every": 1})
    t = trainer_class(resumed.trainer)(resumed, resume=True)
    assert t.step == 1
    t.train()
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "part")
    assert [x["step"] for x in b] == [x["step"] for x in a] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert x.get("student/forward_tokens") == y.get("student/forward_tokens"), x["step"]
        for key in NUMBERS:
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)
    wa, wb = (
        _final_weights(tmp_path / "whole", resumed.trainer),
        _final_weights(tmp_path / "part", resumed.trainer),
    )
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)


SFT = CASES["sft"]


def test_resume_refuses_a_changed_recipe_and_says_which_keys(tmp_path):
    run_recipe(_recipe(tmp_path, "r", SFT, train={"steps": 2}, checkpoint={"every": 1}))
    changed = _recipe(tmp_path, "r", SFT, train={"steps": 2, "lr": 1e-2})
    with pytest.raises(ValueError, match=r"(?s)differs.*train\.lr: 0\.002 -> 0\.01"):
        trainer_class("sft")(changed, resume=True)
    other = _recipe(tmp_path, "r", {**CASES["rloo"]}, train={"steps": 2})
    with pytest.raises(ValueError, match=r"(?s)differs.*trainer: 'sft' -> 'online_rl'"):
        trainer_class("online_rl")(other, resume=True)
    # what may change: the length of the run and its logging / eval / checkpoint cadence
    longer = _recipe(tmp_path, "r", SFT, train={"steps": 3}, logging={"every": 2})
    assert trainer_class("sft")(longer, resume=True).step == 1


def test_resume_without_a_checkpoint_refuses_and_duplicates_nothing(tmp_path):
    r = _recipe(tmp_path, "r", SFT, train={"steps": 2})  # checkpoint.every 0: final/ only
    run_recipe(r)
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        run_recipe(r, resume=True)
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


def test_overwrite_validates_before_it_deletes(tmp_path):
    run_recipe(_recipe(tmp_path, "r", SFT, train={"steps": 2}))
    bad = _recipe(tmp_path, "r", SFT, model={"name_or_path": str(tmp_path / "typo")})
    with pytest.raises((FileNotFoundError, ValueError, OSError)):
        run_recipe(bad, overwrite=True)
    assert len(read_metrics(tmp_path / "r")) == 2  # 2 steps (the last with the final eval)
    assert (tmp_path / "r" / "final" / "model.safetensors").is_file()
    # a good overwrite replaces it, and nothing of the old run is left aside
    run_recipe(_recipe(tmp_path, "r", SFT, train={"steps": 1}), overwrite=True)
    assert [x["step"] for x in read_metrics(tmp_path / "r")] == [1]
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name]


def test_overwrite_restores_the_old_run_when_the_new_one_fails_at_once(tmp_path):
    rloo = CASES["rloo"]
    run_recipe(_recipe(tmp_path, "r", rloo, train={"steps": 2}))
    failing = _recipe(
        tmp_path,
        "r",
        rloo,
        rewards=[{"type": "function", "fn": "user_pieces:raising_reward"}],
    )
    with pytest.raises(Exception, match="user reward failed"):
        run_recipe(failing, overwrite=True)
    assert len(read_metrics(tmp_path / "r")) == 2
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name]


def test_a_run_directory_is_locked_by_its_process(tmp_path):
    r = _recipe(tmp_path, "r", SFT, train={"steps": 2})
    ready = tmp_path / "ready"
    holder = textwrap.dedent(
        f"""
        import time, pathlib
        from signalrl.logging.run import RunLock
        lock = RunLock(pathlib.Path({str(tmp_path / "r")!r}))
        lock.acquire()
        pathlib.Path({str(ready)!r}).write_text("1")
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", holder])
    try:
        for _ in range(200):
            if ready.exists():
                break
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match=rf"in use: .*\"pid\": {proc.pid}"):
            run_recipe(r)
    finally:
        proc.kill()
        proc.wait()
    run_recipe(r)  # the lock died with its holder
    assert len(read_metrics(tmp_path / "r")) == 2


def test_a_torn_last_metrics_line_is_dropped_and_resume_works(tmp_path):
    run_recipe(_recipe(tmp_path, "r", SFT, train={"steps": 2}, checkpoint={"every": 1}))
    metrics = tmp_path / "r" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "loss": 0.')  # power loss mid-write
    with pytest.warns(UserWarning, match="line 3 is torn"):
        rows = read_metrics(tmp_path / "r")
    assert len(rows) == 2
    with pytest.warns(UserWarning, match="torn"):
        t = trainer_class("sft")(_recipe(tmp_path, "r", SFT, train={"steps": 3}), resume=True)
    t.train()
    assert [x["step"] for x in read_metrics(tmp_path / "r")] == [1, 2, 3]
    metrics.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not valid JSON"):
        read_metrics(tmp_path / "r")


def test_stale_temporaries_are_cleaned_and_files_follow_the_umask(tmp_path):
    run_recipe(_recipe(tmp_path, "r", SFT, train={"steps": 2}, checkpoint={"every": 1}))
    run = tmp_path / "r"
    stale = [run / "checkpoints" / ".step-3.tmp-abc", run / ".final.tmp-xyz"]
    for p in stale:
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"half")
    t = trainer_class("sft")(_recipe(tmp_path, "r", SFT, train={"steps": 3}), resume=True)
    assert not any(p.exists() for p in stale)
    t.train()
    mask = os.umask(0)
    os.umask(mask)
    for p in (run / "final", run / "checkpoints" / "step-1"):
        assert p.stat().st_mode & 0o777 == 0o777 & ~mask, p
    from signalrl.data.make_preferences import write_jsonl_atomic

    out = write_jsonl_atomic([{"prompt": "1+1=", "chosen": "2", "rejected": "3"}], run / "p.jsonl")
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_failed_start_does_not_block_the_rerun(tmp_path):
    rloo = CASES["rloo"]
    failing = _recipe(
        tmp_path, "r", rloo, rewards=[{"type": "function", "fn": "user_pieces:raising_reward"}]
    )
    with pytest.raises(Exception, match="user reward failed"):
        run_recipe(failing)
    assert (tmp_path / "r" / "config.yaml").is_file()  # what the failed start left
    run_recipe(_recipe(tmp_path, "r", rloo, train={"steps": 1}))  # no --overwrite needed
    assert [x["step"] for x in read_metrics(tmp_path / "r")] == [1]
    # a directory with files that are not a run's is never taken over
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a run's"):
        run_recipe(_recipe(tmp_path, "mine", SFT, train={"steps": 1}))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
