from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from signalrl.cli import app
from signalrl.config import RecipeError, recipe_from_dict
from signalrl.data.preference import PreferenceDataError
from signalrl.logging import read_metrics
from signalrl.losses.reward import bradley_terry_loss, reward_pair_metrics
from signalrl.rewards.model import RewardModelScorer
from signalrl.trainers import run_recipe
from signalrl.trainers.reward_model import RewardModelTrainer, load_reward_pairs

DATA = Path(__file__).parent / "data"
ARITH1 = {"name": "arithmetic", "digits": 1, "n_train": 400, "n_test": 8}
# the same task on the command line
TASK_SETS = [a for k, v in ARITH1.items() if k != "name" for a in ("--set", f"task.{k}={v}")]
QUIET = {"progress": False, "samples_every": 0, "tensorboard": False}


def _rm(tmp_path, **over):
    data = {
        "name": "rm",
        "output_dir": str(tmp_path),
        "trainer": "reward_model",
        "model": {"name_or_path": "tiny"},
        "task": {"name": "arithmetic", "digits": 1, "n_train": 8, "n_test": 4},
        "data": {"path": str(DATA / "prefs_sample.jsonl"), "test_fraction": 0.25},
        "train": {"steps": 3, "lr": 1e-3, "batch_size": 6, "micro_batch_size": 4},
        "eval": {"every": 2},
        "logging": QUIET,
        "checkpoint": {"every": 0},
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return recipe_from_dict(data, "test")


# -- the loss -------------------------------------------------------------------------------
def test_bradley_terry_loss_closed_form():
    rc = torch.tensor([1.0, 0.0, -2.0])
    rr = torch.tensor([0.0, 0.0, 1.0])
    want = torch.tensor([math.log1p(math.exp(-1.0)), math.log(2.0), math.log1p(math.exp(3.0))])
    torch.testing.assert_close(bradley_terry_loss(rc, rr), want)
    # a margin m asks for r_c - r_r > m: -log sigmoid(r_c - r_r - m)
    m = torch.tensor([1.0, -1.0, 0.0])
    want_m = torch.tensor([math.log(2.0), math.log1p(math.exp(-1.0)), math.log1p(math.exp(3.0))])
    torch.testing.assert_close(bradley_terry_loss(rc, rr, m), want_m)
    # centring adds c * (r_c + r_r)^2 per pair
    torch.testing.assert_close(
        bradley_terry_loss(rc, rr, center_coef=0.5), want + 0.5 * torch.tensor([1.0, 0.0, 1.0])
    )
    # only the difference matters without centring
    torch.testing.assert_close(bradley_terry_loss(rc + 7.0, rr + 7.0), want)
    with pytest.raises(ValueError, match="differ in shape"):
        bradley_terry_loss(rc, rr[:2])


def test_bradley_terry_gradient_is_sigmoid_of_minus_margin():
    rc = torch.tensor([0.3, -1.2], requires_grad=True)
    rr = torch.tensor([0.1, 0.4], requires_grad=True)
    bradley_terry_loss(rc, rr).sum().backward()
    s = torch.sigmoid(-(rc - rr)).detach()
    torch.testing.assert_close(rc.grad, -s)
    torch.testing.assert_close(rr.grad, s)


def test_reward_pair_metrics():
    m = reward_pair_metrics(torch.tensor([2.0, 0.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert m["accuracy"] == pytest.approx(0.5)  # the tie counts as wrong
    assert m["rewards/accuracies"] == m["accuracy"]
    assert m["rewards/chosen"] == pytest.approx(1.0)
    assert m["rewards/rejected"] == pytest.approx(0.75)
    assert m["rewards/margins"] == pytest.approx(0.25)


# -- the trainer ----------------------------------------------------------------------------
def test_reward_model_trainer_run_and_final_loads_as_classifier(tmp_path):
    out = run_recipe(_rm(tmp_path))
    run = tmp_path / "rm"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert key in rows[0], key
    assert "eval/accuracy" in rows[1]  # eval.every = 2
    assert "eval/accuracy" in rows[-1] and "eval/pass@1" not in rows[-1]  # no task sampling
    assert set(out) >= {"accuracy", "seconds", "model", "steps"}
    assert out["accuracy"] == rows[-1]["eval/accuracy"] and out["steps"] == 3
    m = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert m.config.num_labels == 1 and m.config.pad_token_id is not None
    AutoTokenizer.from_pretrained(run / "final")
    # the reward scorer used by online RL reads final/ and agrees with the trainer
    t = RewardModelTrainer(_rm(tmp_path / "again", model={"name_or_path": str(run / "final")}))
    rc, rr = t.rewards(t.train_data, [0, 1])
    row = [json.loads(x) for x in (DATA / "prefs_sample.jsonl").read_text().splitlines()]
    scorer = RewardModelScorer(str(run / "final"))
    # the first two train rows: find them by their tokens
    texts = {
        tuple(t.tokenizer(r["prompt"] + r["chosen"], add_special_tokens=False)["input_ids"]): r
        for r in row
    }
    r0 = texts[tuple(t.train_data.chosen_ids[0])]
    r1 = texts[tuple(t.train_data.chosen_ids[1])]
    got = scorer.score(
        [r0["prompt"], r1["prompt"], r0["prompt"]], [r0["chosen"], r1["chosen"], r0["rejected"]]
    )
    torch.testing.assert_close(torch.tensor(got[:2]), rc.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(got[2]), rr[0].detach(), atol=1e-5, rtol=1e-4)


def test_reward_is_read_at_the_last_real_token_whatever_the_padding(tmp_path):
    t = RewardModelTrainer(_rm(tmp_path))
    t.model.eval()
    with torch.no_grad():
        together_c, together_r = t.rewards(t.train_data, [0, 1, 2])
        for j in range(3):
            alone_c, alone_r = t.rewards(t.train_data, [j])
            torch.testing.assert_close(alone_c[0], together_c[j], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(alone_r[0], together_r[j], atol=1e-5, rtol=1e-4)


def test_grad_accumulation_matches_one_batch(tmp_path):
    def grads(micro):
        t = RewardModelTrainer(_rm(tmp_path / f"m{micro}", train={"micro_batch_size": micro}))
        captured = {}

        def capture(step_scheduler=True):
            captured["g"] = torch.cat([p.grad.flatten() for p in t.model.parameters()])
            return {"grad_norm": 0.0, "lr": 0.0}

        t.optimizer_step = capture
        t.train_step()
        return captured["g"]

    full, acc = grads(6), grads(2)
    assert full.abs().max() > 1e-4
    torch.testing.assert_close(acc, full, atol=1e-6, rtol=1e-4)


def test_resume_reloads_the_classifier(tmp_path):
    run_recipe(_rm(tmp_path, train={"steps": 3}, checkpoint={"every": 2}))
    t = RewardModelTrainer(_rm(tmp_path, train={"steps": 4}), resume=True)
    assert t.step == 2
    assert type(t.model).__name__.endswith("ForSequenceClassification")
    t.train()
    assert [r["step"] for r in read_metrics(tmp_path / "rm")] == [1, 2, 3, 4]


def test_margin_column_and_bad_rows(tmp_path, tiny):
    _, tok = tiny
    p = tmp_path / "m.jsonl"
    rows = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": 1.5},
        {"prompt": "1+2=", "chosen": "3", "rejected": "4", "margin": 0},
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_reward_pairs(p, tok)
    assert pairs.margins == [1.5, 0.0]
    assert pairs.chosen_ids[0] == tok("1+1=2", add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in pairs.chosen_ids[0]  # scored as the RL scorer sees it
    rows[1]["margin"] = "big"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PreferenceDataError, match=r"row 2: field 'margin'"):
        load_reward_pairs(p, tok)
    p.write_text(json.dumps({"prompt": "1+1=", "chosen": "2"}) + "\n")
    with pytest.raises(PreferenceDataError, match=r"row 1: missing field 'rejected'"):
        load_reward_pairs(p, tok)


def test_reward_model_recipe_needs_data_path(tmp_path):
    with pytest.raises(RecipeError, match="needs data.path"):
        recipe_from_dict({"trainer": "reward_model", "output_dir": str(tmp_path)}, "t")
    with pytest.raises(RecipeError, match="reward_model.center_coef"):
        _rm(tmp_path, reward_model={"center_coef": -1.0})


# -- the pipeline: SFT -> verifier pairs -> reward model -> PPO against the reward model ----
def test_sft_prefs_reward_model_then_ppo_with_the_reward_model(tmp_path):
    torch.manual_seed(0)
    sft = recipe_from_dict(
        {
            "name": "sft",
            "output_dir": str(tmp_path),
            "trainer": "sft",
            "model": {"name_or_path": "tiny"},
            "task": ARITH1,
            "train": {"steps": 60, "lr": 3e-3, "batch_size": 32},
            "sampling": {"max_new_tokens": 3},
            "eval": {"k": 0},
            "logging": QUIET,
        },
        "sft",
    )
    run_recipe(sft)
    prefs = tmp_path / "prefs.jsonl"
    args = ["data", "make-preferences", "--model", str(tmp_path / "sft" / "final")]
    args += ["--samples", "16", "--pairs-per-prompt", "4", "--temperature", "1.5"]
    args += ["--max-new-tokens", "3", "--seed", "0", "--out", str(prefs)]
    args += TASK_SETS
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    stats = json.loads(res.stdout[res.stdout.index("{") :])
    assert stats["pairs"] > 150, stats
    rows = [json.loads(x) for x in prefs.read_text().splitlines()]
    assert len(rows) == stats["pairs"]

    rm = recipe_from_dict(
        {
            "name": "rm",
            "output_dir": str(tmp_path),
            "trainer": "reward_model",
            "model": {"name_or_path": str(tmp_path / "sft" / "final")},
            "task": ARITH1,
            "data": {"path": str(prefs), "test_fraction": 0.3},
            "train": {"steps": 100, "lr": 1e-3, "batch_size": 32, "warmup_steps": 10},
            "logging": QUIET,
        },
        "rm",
    )
    out = run_recipe(rm)
    # The pairs are learnt (chance is 0.5). Held-out pairs have prompts never seen in training
    # (whole prompts are held out); there this tiny model is near chance (0.51 observed), so
    # only its presence is checked: generalising needs far more prompts (see the closing note).
    fitted = read_metrics(tmp_path / "rm")
    assert sum(r["accuracy"] for r in fitted[-3:]) / 3 > 0.75, fitted[-3:]
    assert 0.0 <= out["accuracy"] <= 1.0

    ppo = recipe_from_dict(
        {
            "name": "ppo",
            "output_dir": str(tmp_path),
            "trainer": "online_rl",
            "model": {"name_or_path": str(tmp_path / "sft" / "final")},
            "task": ARITH1,
            "rewards": [{"type": "model", "path": str(tmp_path / "rm" / "final")}],
            "rl": {"algorithm": "ppo", "group_size": 4},
            "train": {"steps": 3, "lr": 1e-4, "batch_size": 4},
            "sampling": {"max_new_tokens": 3},
            "eval": {"k": 0},
            "logging": QUIET,
        },
        "ppo",
    )
    summary = run_recipe(ppo)
    logged = read_metrics(tmp_path / "ppo")
    assert len(logged) == 3
    assert logged[0]["models/held"] == 4.0  # policy, reference, critic, reward model
    assert all(math.isfinite(r["reward/model"]) for r in logged)
    assert 0.0 <= summary["accuracy"] <= 1.0

    # the reward model as a best-of-k judge, from the command line
    args = ["eval", "--model", str(tmp_path / "sft" / "final"), "--k", "4", "--n", "8"]
    args += ["--max-new-tokens", "3", "--reward-model", str(tmp_path / "rm" / "final")]
    args += TASK_SETS
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    judged = json.loads(res.stdout[res.stdout.index("{") :])
    assert 0.0 <= judged["best_of@4"] <= judged["pass@4"]
    assert 0.0 <= judged["sample_accuracy"] <= 1.0


def test_long_rows_are_truncated_to_max_length_and_logged(tmp_path):
    rows = [json.loads(x) for x in (DATA / "prefs_sample.jsonl").read_text().splitlines()]
    rows[0] = {**rows[0], "chosen": rows[0]["chosen"] + "9" * 3000}
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = _rm(tmp_path, data={"path": str(path), "max_length": 32}, train={"steps": 1})
    with pytest.warns(UserWarning, match="1 of 12 rows are longer than data.max_length=32"):
        t = RewardModelTrainer(r)
    pairs = [t.train_data] + ([t.test_data] if t.test_data is not None else [])
    assert max(len(s) for p in pairs for s in p.chosen_ids + p.rejected_ids) <= 32
    t.train()
    assert read_metrics(tmp_path / "rm")[-1]["data/truncated_rows"] == 1
