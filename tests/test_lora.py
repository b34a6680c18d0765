"""LoRA on the policy (`lora:` section): target modules, the adapter-disabled reference, only
the adapter trains, no second copy, exact resume, final/ (adapter) and final/merged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from signalrl.config import LoraConfig, recipe_from_dict
from signalrl.data.collate import build_batch
from signalrl.logging import read_metrics
from signalrl.models import count_parameters, load_model
from signalrl.models.logprobs import completion_logps, shared_prefix_logps
from signalrl.models.lora import AdapterDisabled, apply_lora, lora_target_modules
from signalrl.trainers import run_recipe, trainer_class

TASK = {"name": "arithmetic", "digits": 1, "n_train": 64, "n_test": 4}
COMMON = {
    "model": {"name_or_path": "tiny", "attn_implementation": "eager"},
    "task": TASK,
    "sampling": {"max_new_tokens": 3},
    "eval": {"n": 2},
    "logging": {"progress": False, "samples_every": 0, "tensorboard": False},
}
GRPO_LORA = {
    "trainer": "online_rl",
    "rl": {"algorithm": "grpo", "group_size": 4, "kl_coef": 0.1},
    "rewards": [{"type": "function", "fn": "test_lora:parity"}],
    "lora": {"enabled": True, "r": 4, "alpha": 8, "merge": True},
}


def parity(prompts: list[str], completions: list[str], **cols: object) -> list[float]:
    """A reward with variance in every group of a random model's samples."""
    return [float(sum(map(ord, c)) % 2) for c in completions]


def _recipe(tmp_path: Path, name: str, spec: dict, **over: dict) -> object:
    data = {"name": name, "output_dir": str(tmp_path), **COMMON, **spec}
    data["train"] = {"steps": 3, "lr": 5e-3, "batch_size": 2, **spec.get("train", {})}
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v}
    return recipe_from_dict(data, "test")


def _gpt2_dir(tmp_path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from signalrl.models.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    out = tmp_path / "gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_default_targets_follow_the_architecture_and_a_bad_name_says_what_exists(tmp_path):
    qwen, _ = load_model("tiny")
    assert lora_target_modules(qwen, None) == ["q_proj", "v_proj"]
    gpt2, _ = load_model(str(_gpt2_dir(tmp_path)))
    assert lora_target_modules(gpt2, None) == ["c_attn"]
    with pytest.raises(ValueError, match=r"lora\.target_modules: 'q_proj'.*c_attn"):
        lora_target_modules(gpt2, ["q_proj"])
    peft_model = apply_lora(gpt2, LoraConfig(enabled=True, r=2))
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("c_attn" in n and "lora_" in n for n in names)


def test_a_bad_target_fails_before_training_starts(tmp_path):
    spec = {**GRPO_LORA, "model": {"name_or_path": str(_gpt2_dir(tmp_path))}}
    recipe = _recipe(tmp_path, "bad", spec, lora={"target_modules": ["q_proj", "nope"]})
    with pytest.raises(ValueError, match=r"lora\.target_modules: 'q_proj', 'nope'"):
        run_recipe(recipe)
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_adapter_disabled_reference_is_the_base_model(tiny):
    base, tok = tiny
    policy, _ = load_model("tiny")
    policy = apply_lora(policy, LoraConfig(enabled=True, r=4))
    with torch.no_grad():  # a trained adapter: the policy now differs from its base
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    policy.train()
    ref = AdapterDisabled(policy)
    assert list(ref.parameters()) == []
    batch = build_batch([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], tok.pad_token_id)
    want = completion_logps(base, batch)
    torch.testing.assert_close(completion_logps(ref, batch), want, atol=1e-5, rtol=0)
    assert not torch.allclose(completion_logps(policy, batch), want, atol=1e-3)
    got = shared_prefix_logps(
        ref,
        [[5, 6, 7], [8, 9]],
        torch.tensor([0, 1]),
        batch.completion_ids,
        batch.completion_mask,
        tok.pad_token_id,
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    out = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    full = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(out, full, atol=1e-5, rtol=0)
    assert policy.training  # the policy's mode is restored; its adapter is enabled again
    assert not torch.allclose(completion_logps(policy, batch), want, atol=1e-3)


def test_grpo_lora_with_kl_trains_the_adapter_only_and_holds_one_copy(tmp_path):
    recipe = _recipe(tmp_path, "grpo-lora", GRPO_LORA)
    t = trainer_class(recipe.trainer)(recipe)
    full = count_parameters(load_model("tiny")[0])
    assert isinstance(t.ref_model, AdapterDisabled)
    assert t.models_held["models/params_held"] == count_parameters(t.model)
    assert t.models_held["models/held"] == 1.0  # the reference is the policy's own base
    assert t.models_held["models/params_held"] < 1.05 * full  # no second full copy
    assert 0 < t.models_held["models/params_trainable"] < 0.05 * full
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train()
    rows = read_metrics(tmp_path / "grpo-lora")
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the reference is the start policy (kl 0 at step 1), then the trained adapter moves away
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] > 1e-5
    changed = {n for n, p in t.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    # final/: the adapter on the base; final/merged: a plain HF model; the same logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = tmp_path / "grpo-lora" / "final"
    assert (final / "adapter_config.json").is_file()
    adapted = PeftModel.from_pretrained(load_model("tiny")[0], str(final)).eval()
    merged = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        a, b = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        c = t.model.eval()(input_ids=ids).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)


def test_ppo_critic_is_a_full_trainable_copy_of_the_lora_base(tmp_path):
    spec = {**GRPO_LORA, "rl": {"algorithm": "ppo", "group_size": 1}}
    recipe = _recipe(tmp_path, "ppo-lora", spec, train={"steps": 1})
    t = trainer_class(recipe.trainer)(recipe)
    assert t.critic is not None
    assert not any("lora_" in n for n, _ in t.critic.named_parameters())
    assert all(p.requires_grad for p in t.critic.parameters())
    t.train()
    assert read_metrics(tmp_path / "ppo-lora")[-1]["step"] == 1


NUMBERS = ("loss", "kl", "grad_norm", "reward/mean")


def test_resume_from_a_lora_checkpoint_equals_an_uninterrupted_run(tmp_path):
    spec = {**GRPO_LORA, "train": {"steps": 4}}
    run_recipe(_recipe(tmp_path, "whole", spec))
    run_recipe(_recipe(tmp_path, "part", spec, train={"steps": 2}, checkpoint={"every": 1}))
    step1 = tmp_path / "part" / "checkpoints" / "step-1"
    assert (step1 / "adapter_config.json").is_file()
    assert not (step1 / "model.safetensors").exists()  # the adapter, not a full copy
    resumed = _recipe(tmp_path, "part", spec, checkpoint={"every": 1})
    t = trainer_class(resumed.trainer)(resumed, resume=True)
    assert t.step == 1 and isinstance(t.ref_model, AdapterDisabled)
    t.train()
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "part")
    assert [x["step"] for x in b] == [x["step"] for x in a] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        for key in NUMBERS:
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)
    from peft import PeftModel

    wa, wb = (
        PeftModel.from_pretrained(load_model("tiny")[0], str(tmp_path / r / "final")).state_dict()
        for r in ("whole", "part")
    )
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)


def test_preference_lora_reference_uses_the_lora_section_when_enabled(tmp_path):
    data = Path(__file__).parent / "data" / "prefs_sample.jsonl"
    spec = {
        "trainer": "preference",
        "data": {"path": str(data), "test_fraction": 0.2},
        "preference": {"reference": "lora"},
        "lora": {"enabled": True, "r": 2, "alpha": 4, "target_modules": ["q_proj"]},
    }
    recipe = _recipe(tmp_path, "dpo-lora", spec, train={"steps": 1})
    t = trainer_class(recipe.trainer)(recipe)
    cfg = t.model.peft_config["default"]
    assert cfg.r == 2 and cfg.lora_alpha == 4 and set(cfg.target_modules) == {"q_proj"}
    t.train()
    assert (tmp_path / "dpo-lora" / "final" / "adapter_config.json").is_file()
    # without lora.enabled: preference.lora_r on the attention and MLP projections, merged final/
    legacy = _recipe(tmp_path, "dpo-legacy", {**spec, "lora": {}}, train={"steps": 1})
    legacy.preference.lora_r = 3
    t = trainer_class(legacy.trainer)(legacy)
    cfg = t.model.peft_config["default"]
    assert cfg.r == 3 and "gate_proj" in cfg.target_modules
    t.train()
    load_model(str(tmp_path / "dpo-legacy" / "final"))  # a plain HF model


def test_load_model_reads_an_adapter_only_final_dir(tmp_path):
    """A LoRA run's `final/` without `lora.merge` holds only the adapter: `load_model` (and
    so `signalrl eval --model`) loads its base checkpoint with the adapter merged in; with a
    preset base it says why it cannot."""
    from peft import PeftModel

    from signalrl.models import save_model

    base_dir = save_model(*load_model("tiny", seed=1), tmp_path / "base")
    spec = {"trainer": "sft", "lora": {"enabled": True, "r": 4, "alpha": 8}}
    run_recipe(_recipe(tmp_path, "sft-lora", spec, model={"name_or_path": str(base_dir)}))
    final = tmp_path / "sft-lora" / "final"
    assert not (final / "config.json").exists()
    got, tok = load_model(str(final))
    want = PeftModel.from_pretrained(load_model(str(base_dir))[0], str(final)).merge_and_unload()
    ids = torch.tensor([tok("1+2=")["input_ids"]])
    torch.testing.assert_close(got(ids).logits, want(ids).logits, atol=1e-5, rtol=0)
    assert not torch.allclose(got(ids).logits, load_model(str(base_dir))[0](ids).logits)
    run_recipe(_recipe(tmp_path, "preset-lora", spec))
    with pytest.raises(FileNotFoundError, match="not a local checkpoint directory"):
        load_model(str(tmp_path / "preset-lora" / "final"))
