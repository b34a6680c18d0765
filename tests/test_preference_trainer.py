from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from signalrl.config import RecipeError, recipe_from_dict
from signalrl.data.preference import PreferenceDataError, load_preference_data
from signalrl.logging import read_metrics
from signalrl.models import load_model
from signalrl.models.logprobs import completion_logps
from signalrl.trainers import run_recipe
from signalrl.trainers.preference import REF_FILE, PreferenceTrainer

DATA = Path(__file__).parent / "data"


def _pref(tmp_path, **over):
    data = {
        "name": "pref",
        "output_dir": str(tmp_path),
        "trainer": "preference",
        "model": {"name_or_path": "tiny"},
        "task": {"name": "arithmetic", "digits": 1, "n_train": 8, "n_test": 4},
        "data": {"path": str(DATA / "prefs_sample.jsonl"), "test_fraction": 0.2},
        "preference": {"loss_type": "sigmoid", "beta": 0.1},
        "train": {"steps": 3, "lr": 2e-3, "batch_size": 6, "micro_batch_size": 4},
        "sampling": {"max_new_tokens": 3},
        "eval": {"every": 0},
        "logging": {"progress": False, "samples_every": 0},
        "checkpoint": {"every": 0},
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return recipe_from_dict(data, "test")


def test_dpo_learns_preferences(tmp_path):
    r = _pref(tmp_path, train={"steps": 30})
    out = run_recipe(r)
    rows = read_metrics(tmp_path / "pref")
    assert len(rows) == 30
    first = sum(x["rewards/margins"] for x in rows[:3]) / 3
    last = sum(x["rewards/margins"] for x in rows[-5:]) / 5
    assert last > first + 0.5, (first, last)
    assert sum(x["rewards/accuracies"] for x in rows[-5:]) / 5 == pytest.approx(1.0)
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    for k in ("eval/rewards/accuracies", "eval/logratio_chosen", "eval/kl_ref", "grad_norm", "lr"):
        assert k in rows[-1], k
    assert out["eval/kl_ref"] >= 0
    # the final pass over every training pair agrees with the last steps' batches
    assert out["train_eval/rewards/accuracies"] == pytest.approx(1.0)
    assert "train_eval/kl_ref" not in out


def test_lora_reference_is_policy_without_adapter_and_final_is_plain(tmp_path):
    r = _pref(tmp_path, preference={"reference": "lora"}, train={"steps": 2})
    t = PreferenceTrainer(r)
    assert t.ref_model is None
    base, _ = load_model("tiny", seed=0)
    idx = [0, 1, 2]
    batch = t._rows_batch(t.train_data, idx, "pair")
    want = completion_logps(base.eval(), batch)
    torch.testing.assert_close(t._ref_logps(batch), want)
    n_train = sum(p.numel() for p in t.model.parameters() if p.requires_grad)
    assert 0 < n_train < sum(p.numel() for p in base.parameters())
    t.train()
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "pref" / "final")
    assert not any("lora" in n for n, _ in m.named_parameters())
    # after training the merged model differs from the base: the adapter was merged in
    got = completion_logps(m.eval(), batch)
    assert not torch.allclose(got, want)


def test_precomputed_reference_matches_copy(tmp_path):
    losses = {}
    for mode in ("copy", "precomputed"):
        r = _pref(tmp_path / mode, preference={"reference": mode}, train={"steps": 2})
        run_recipe(r)
        losses[mode] = [x["loss"] for x in read_metrics(tmp_path / mode / "pref")]
    assert (tmp_path / "precomputed" / "pref" / REF_FILE).is_file()
    assert not (tmp_path / "copy" / "pref" / REF_FILE).exists()
    assert losses["precomputed"][0] == pytest.approx(losses["copy"][0], rel=1e-5)
    cache = torch.load(tmp_path / "precomputed" / "pref" / REF_FILE, weights_only=False)
    assert cache["train"]["chosen"].shape == (10,) and cache["test"]["rejected"].shape == (2,)


def test_simpo_without_reference_and_kto(tmp_path):
    r = _pref(tmp_path / "s", preference={"loss_type": "simpo", "reference": "none", "beta": 2})
    t = PreferenceTrainer(r)
    assert t.ref_model is None and not t.uses_ref
    t.train()
    rows = read_metrics(tmp_path / "s" / "pref")
    assert "rewards/accuracies" in rows[-1] and "eval/kl_ref" not in rows[-1]
    r = _pref(
        tmp_path / "k",
        preference={"loss_type": "kto"},
        data={"path": str(DATA / "kto_sample.jsonl")},
    )
    run_recipe(r)
    last = read_metrics(tmp_path / "k" / "pref")[-1]
    assert "kl" in last and last["kl"] >= 0 and "rewards/margins" in last


def test_chat_format_renders_template(tiny):
    _, tok = tiny
    d = load_preference_data(DATA / "prefs_chat_sample.jsonl", tok)
    assert d.prompts is not None and d.prompts[0].endswith("<|im_start|>assistant\n")
    text = tok.decode(d.completion_ids[0])
    assert text.startswith("72<|im_end|>") and text.endswith(tok.eos_token)


def _write(tmp_path, rows, name="bad.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.mark.parametrize(
    ("bad", "field", "kind"),
    [
        ({"prompt": "1+1=", "chosen": "2"}, "rejected", "paired"),
        ({"prompt": "1+1=", "chosen": "", "rejected": "3"}, "chosen", "paired"),
        ({"prompt": "1+1=", "chosen": "2", "rejected": "2"}, "rejected", "paired"),
        (
            {
                "prompt": [{"role": "wizard", "content": "1+1="}],
                "chosen": [{"role": "assistant", "content": "2"}],
                "rejected": [{"role": "assistant", "content": "3"}],
            },
            "prompt",
            "paired",
        ),
        ({"prompt": "1+1=", "completion": "2", "label": "yes"}, "label", "kto"),
    ],
)
def test_malformed_rows_name_file_row_and_field(tmp_path, tiny, bad, field, kind):
    _, tok = tiny
    if kind == "kto":
        good = {"prompt": "2+2=", "completion": "4", "label": True}
    else:
        good = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
        if isinstance(bad["prompt"], list):
            good = {
                k: [{"role": "user" if k == "prompt" else "assistant", "content": v}]
                for k, v in good.items()
            }
    p = _write(tmp_path, [good, good, bad])
    with pytest.raises(PreferenceDataError) as e:
        load_preference_data(p, tok, kind=kind)
    msg = str(e.value)
    assert str(p) in msg and "row 3" in msg and f"'{field}'" in msg, msg


def test_reference_none_needs_reference_free_loss(tmp_path):
    with pytest.raises(RecipeError, match="reference 'none'"):
        _pref(tmp_path, preference={"reference": "none", "loss_type": "sigmoid"})
    with pytest.raises(RecipeError, match="valid: sigmoid.*simpo"):
        _pref(tmp_path, preference={"loss_type": "dpo2"})
    with pytest.raises(RecipeError, match="data.path"):
        _pref(tmp_path, data={"path": None})


class _SevenTask:
    """Correct when the completion contains a '7': a random tiny model samples one sometimes."""

    name = "seven"

    def train(self):
        return [{"prompt": f"{i}+{i}=", "answer": "7"} for i in range(16)]

    def test(self):
        return self.train()[:4]

    def verify(self, row, completion):
        return 1.0 if "7" in completion else 0.0


def _online(tmp_path, **over):
    base = {
        "data": {"path": None, "test_fraction": 0.0},
        "preference": {"online": True, "online_samples": 8, "online_pairs_per_prompt": 2},
        "train": {"steps": 25, "lr": 3e-3, "batch_size": 8},
        "logging": {"progress": False, "samples_every": 5},
    }
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return _pref(tmp_path, **base)


def test_online_dpo_samples_pairs_from_the_policy_and_learns(tmp_path):
    t = PreferenceTrainer(_online(tmp_path))
    t.task = _SevenTask()
    t.rows = t.task.train()
    t.train()
    rows = read_metrics(tmp_path / "pref")
    assert len(rows) == 25
    assert all(r["online/samples_seen"] == 64 * (i + 1) for i, r in enumerate(rows))
    acc = [r["online/sample_accuracy"] for r in rows]
    assert sum(acc[-5:]) / 5 > sum(acc[:5]) / 5 + 0.3, acc
    with_pairs = [r for r in rows if r["online/pairs"] > 0]
    assert with_pairs and all("rewards/accuracies" in r for r in with_pairs)
    lines = (tmp_path / "pref" / "samples.jsonl").read_text().splitlines()
    samples = [json.loads(x) for x in lines]
    assert samples and {"prompt", "completion", "reward"} <= set(samples[0])


def test_online_dpo_pairs_are_the_sampled_tokens(tmp_path):
    t = PreferenceTrainer(_online(tmp_path))
    t.task = _SevenTask()
    t.rows = t.task.train()
    stats, _ = t._online_pairs()
    d = t.train_data
    assert stats["online/pairs"] == len(d) > 0
    eos = t.tokenizer.eos_token_id
    for p, c, r in zip(d.prompt_ids, d.completion_ids, d.rejected_ids, strict=True):
        ctext = t.tokenizer.decode([x for x in c if x != eos])
        rtext = t.tokenizer.decode([x for x in r if x != eos])
        assert "7" in ctext and "7" not in rtext and rtext.strip()
        assert t.tokenizer.decode(p).endswith("=")


def test_online_dpo_rejects_precomputed_reference_and_kto(tmp_path):
    with pytest.raises(RecipeError, match="precomputed"):
        _online(tmp_path, preference={"reference": "precomputed"})
    with pytest.raises(RecipeError, match="kto"):
        _online(tmp_path, preference={"loss_type": "kto"})


def test_held_out_pairs_never_share_a_prompt_with_training_pairs():
    from signalrl.data.preference import PreferenceData, split_data
    from signalrl.trainers.reward_model import RewardPairs, split_pairs

    prompts = [f"{i % 7}+1=" for i in range(40)]  # 7 prompts, several pairs each
    data = PreferenceData([[i] for i in range(40)], [[i] for i in range(40)], prompts=prompts)
    train, test = split_data(data, 0.25, seed=3)
    assert test is not None and len(train) + len(test) == 40
    assert set(train.prompts).isdisjoint(test.prompts)
    assert len(test) >= 10  # whole prompts until a quarter of the rows is held out
    pairs = RewardPairs([[i] for i in range(40)], [[i] for i in range(40)], prompts=prompts)
    rm_train, rm_test = split_pairs(pairs, 0.25, seed=3)
    assert rm_test is not None and rm_test.chosen_ids == test.prompt_ids  # the same rows
    one = PreferenceData([[1], [2]], [[1], [2]], prompts=["a", "a"])
    assert split_data(one, 0.5, seed=0)[1] is None  # one prompt: nothing can be held out


@pytest.mark.parametrize(
    ("mode", "held", "extra"),
    [("copy", 2.0, 1.0), ("precomputed", 1.0, 0.0), ("lora", 1.0, 0.0)],
)
def test_models_held_per_reference_mode(tmp_path, mode, held, extra):
    out = run_recipe(_pref(tmp_path, preference={"reference": mode}, train={"steps": 2}))
    assert out["accuracy"] >= 0.0
    row = read_metrics(tmp_path / "pref")[-1]
    policy = sum(p.numel() for p in load_model("tiny", seed=0)[0].parameters())
    assert row["models/held"] == held
    trainable = row["models/params_trainable"]
    if mode == "lora":  # the adapter only: a small fraction of the policy
        assert 0 < trainable < 0.2 * policy
        assert row["models/params_held"] == policy + trainable
    else:
        assert trainable == policy
        assert row["models/params_held"] == policy * (1 + extra)
    assert row["memory/peak_mb"] > 0 and row["memory/setup_peak_mb"] > 0


def test_peak_memory_window_resets():
    from signalrl.logging.memory import current_memory_mb, peak_memory_mb, reset_peak_memory

    big = torch.ones(64 * 2**20 // 4)  # 64 MiB touched
    high = peak_memory_mb()
    del big
    if not reset_peak_memory():
        pytest.skip("this platform cannot reset the peak")
    assert peak_memory_mb() < high - 32
    assert peak_memory_mb() >= current_memory_mb() - 1


def test_budget_counters_count_the_policy_forward_tokens(tmp_path):
    t = PreferenceTrainer(_pref(tmp_path, train={"steps": 2, "batch_size": 4}))
    out, _ = t.train_step()
    d, idx = t.train_data, t.data.order[:4]
    want = sum(
        2 * len(d.prompt_ids[i]) + len(d.completion_ids[i]) + len(d.rejected_ids[i]) for i in idx
    )
    assert out["student/forward_tokens"] == want  # chosen + rejected rows, no padding
    assert out["time/train_s"] > 0
    out2, _ = t.train_step()
    assert out2["student/forward_tokens"] > out["student/forward_tokens"]
    assert out2["time/train_s"] > out["time/train_s"]

    o = PreferenceTrainer(_online(tmp_path / "o", train={"steps": 1}))
    o.task = _SevenTask()
    o.rows = o.task.train()
    out, _ = o.train_step()
    # 8 prompts (>= 4 tokens) encoded once each for their 8 samples, plus >= 1 token per sample
    assert out["student/forward_tokens"] >= 8 * 4 + 64


def test_budget_counters_survive_resume(tmp_path):
    r = _pref(tmp_path, train={"steps": 3, "batch_size": 4}, checkpoint={"every": 2})
    run_recipe(r)  # checkpoint at step 2
    logged = next(x for x in read_metrics(tmp_path / "pref") if x["step"] == 2)
    t = PreferenceTrainer(r, resume=True)
    assert t.step == 2
    assert t.forward_tokens == logged["student/forward_tokens"] > 0
    assert t.train_seconds == pytest.approx(logged["time/train_s"])
    out, _ = t.train_step()
    assert out["student/forward_tokens"] > logged["student/forward_tokens"]


def test_f_divergence_type_is_a_recipe_key_that_changes_the_loss(tmp_path):
    """`preference.f_divergence_type` (f-DPO, Wang et al. 2023) reaches the loss: at step 1
    (policy == reference, log-ratios 0) every divergence gives ln 2, and after a step the
    js_divergence run's loss differs from plain DPO's."""
    losses = {}
    for f in ("reverse_kl", "js_divergence", "alpha_divergence"):
        r = _pref(tmp_path / f, preference={"f_divergence_type": f}, train={"steps": 2})
        t = PreferenceTrainer(r)
        first, _ = t.train_step()
        second, _ = t.train_step()
        assert first["loss"] == pytest.approx(0.6931, abs=1e-3), f
        losses[f] = second["loss"]
    assert losses["js_divergence"] != pytest.approx(losses["reverse_kl"], abs=1e-6)
    assert losses["alpha_divergence"] != pytest.approx(losses["reverse_kl"], abs=1e-6)
    with pytest.raises(RecipeError, match="no f-divergence generalisation"):
        _pref(tmp_path, preference={"loss_type": "nca_pair", "f_divergence_type": "forward_kl"})


def test_train_eval_scores_a_bounded_seeded_sample(tmp_path):
    import math

    r = _pref(
        tmp_path,
        eval={"train_pairs": 4},
        preference={"reference": "precomputed"},
        train={"steps": 1},
    )
    t = PreferenceTrainer(r)
    rows = t.train_eval_rows()
    assert len(rows) == 4 and rows == sorted(set(rows)) and rows == t.train_eval_rows()
    assert max(rows) < len(t.train_data) and len(t.train_data) > 4
    out = t.train()
    last = read_metrics(tmp_path / "pref")[-1]
    assert out["train_eval/pairs"] == last["train_eval/pairs"] == 4
    # exactly those rows were scored (the precomputed reference is indexed by row)
    again = t.preference_eval("train", rows)
    assert again["train_eval/loss"] == pytest.approx(out["train_eval/loss"])
    # every row when there are fewer, none with 0 (and it says so)
    r = _pref(tmp_path / "all", eval={"train_pairs": 100}, train={"steps": 1})
    assert run_recipe(r)["train_eval/pairs"] == 10
    r = _pref(tmp_path / "kto", eval={"train_pairs": 0}, train={"steps": 1})
    out = run_recipe(r)
    assert out["train_eval/pairs"] == 0 and "train_eval/loss" not in out
    r = _pref(
        tmp_path / "kto3",
        eval={"train_pairs": 3},
        train={"steps": 1},
        preference={"loss_type": "kto"},
        data={"path": str(DATA / "kto_sample.jsonl")},
    )
    out = run_recipe(r)
    assert out["train_eval/pairs"] == 3 and math.isfinite(out["train_eval/loss"])


def test_long_rows_are_truncated_before_training_and_logged(tmp_path):
    rows = [json.loads(x) for x in (DATA / "prefs_sample.jsonl").read_text().splitlines()]
    rows[0] = {**rows[0], "chosen": rows[0]["chosen"] + "9" * 5000}  # a runaway completion
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = _pref(tmp_path, data={"path": str(path), "max_length": 32}, train={"steps": 1})
    with pytest.warns(UserWarning, match="truncated"):
        t = PreferenceTrainer(r)
    out, _ = t.train_step()
    assert out["data/truncated_rows"] == 1.0
    assert (
        max(
            len(p) + len(c)
            for p, c in zip(t.train_data.prompt_ids, t.train_data.completion_ids, strict=True)
        )
        <= 32
    )
