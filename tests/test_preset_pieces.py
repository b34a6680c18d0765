"""Every model a recipe names as a preset is built like the policy: the distillation teacher,
the reward model and `signalrl compare`'s start model take `model.architecture` and
`model.tokenizer`; GKD's reference completions are tokenised as SFT tokenises the same rows;
LoRA is refused where it cannot apply."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from signalrl.config import RecipeError, recipe_from_dict
from signalrl.models.tokenizer import build_tokenizer
from signalrl.trainers import trainer_class
from signalrl.trainers.sft import SFTTrainer

COMMON: dict[str, Any] = {
    "task": {"name": "arithmetic", "digits": 1, "n_train": 16, "n_test": 4},
    "train": {"steps": 1, "lr": 1e-3, "batch_size": 2},
    "sampling": {"max_new_tokens": 3},
    "eval": {"every": 0, "k": 0, "n": 2, "batch_size": 2},
    "logging": {"progress": False, "samples_every": 0, "tensorboard": False},
    "checkpoint": {"every": 0},
}
BPE_TINY = {"name_or_path": "tiny", "tokenizer": "bpe", "architecture": "llama"}


def _recipe(tmp_path: Path, name: str, **over: Any) -> Any:
    return recipe_from_dict(
        {**COMMON, "name": name, "output_dir": str(tmp_path), **over}, f"{name}.yaml"
    )


def test_a_preset_teacher_is_built_with_the_students_tokenizer_preset(tmp_path):
    """A BPE student distilled from a preset teacher: the teacher was built with the char
    tokenizer, so the vocabulary check refused the pair."""
    recipe = _recipe(
        tmp_path,
        "distill",
        trainer="distill",
        model=BPE_TINY,
        rl={"group_size": 2},
        distill={"teacher": "small", "mode": "on_policy"},
    )
    t = trainer_class("distill")(recipe)
    assert t.teacher is not None
    assert t.teacher.config.model_type == "llama"
    assert t.teacher.get_input_embeddings().weight.shape[0] == len(build_tokenizer("bpe"))


def test_gkd_reference_completions_are_the_sft_completions_of_chat_rows(tmp_path):
    """GKD's dataset batches train on the task's reference answers; for a chat task they end
    as the chat template ends an assistant turn (`<|im_end|>`), as SFT's do."""
    task = {**COMMON["task"], "template": "chat"}
    gkd = _recipe(
        tmp_path,
        "gkd",
        trainer="distill",
        model=BPE_TINY,
        task=task,
        rl={"group_size": 2},
        distill={"teacher": "tiny", "mode": "gkd", "lmbda": 0.0, "gkd_data": "dataset"},
    )
    t = trainer_class("distill")(gkd)
    sft = SFTTrainer(_recipe(tmp_path, "sft", trainer="sft", model=BPE_TINY, task=task))
    assert t.ref_completions == sft.train_data.completion_ids
    assert t.ref_prompts == sft.train_data.prompt_ids
    end = t.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(end in c for c in t.ref_completions)


def test_a_preset_reward_model_is_built_with_the_recipes_tokenizer_preset(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text(
        "".join(
            f'{{"prompt": "{a}+{b}=", "chosen": "{a + b}", "rejected": "{a + b + 1}"}}\n'
            for a in range(3)
            for b in range(3)
        )
    )
    recipe = _recipe(
        tmp_path,
        "rm",
        trainer="reward_model",
        model=BPE_TINY,
        data={"path": str(data), "test_fraction": 0.0},
    )
    t = trainer_class("reward_model")(recipe)
    assert len(t.tokenizer) == len(build_tokenizer("bpe"))
    assert t.model.config.model_type == "llama"


def test_lora_with_the_reward_model_trainer_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="lora.enabled: trainer 'reward_model'"):
        _recipe(
            tmp_path,
            "rm",
            trainer="reward_model",
            data={"path": "prefs.jsonl"},
            lora={"enabled": True},
        )


def test_compare_start_accuracy_uses_the_recipes_presets(tmp_path, monkeypatch):
    from signalrl import compare
    from signalrl.eval import EvalResult

    seen: dict[str, Any] = {}

    def fake_evaluate(model: Any, tok: Any, rows: Any, *a: Any, **k: Any) -> EvalResult:
        seen.update(model=model, tok=tok, rows=rows)
        return EvalResult(n=len(rows), accuracy=0.25)

    monkeypatch.setattr("signalrl.eval.evaluate", fake_evaluate)
    task = {**COMMON["task"], "template": "chat"}
    recipe = _recipe(tmp_path, "sft", trainer="sft", model=BPE_TINY, task=task)
    assert compare.start_accuracy(recipe) == 0.25
    assert len(seen["tok"]) == len(build_tokenizer("bpe"))
    assert seen["model"].config.model_type == "llama"
    assert all("<|im_start|>assistant" in r["prompt"] for r in seen["rows"])


@pytest.mark.parametrize(
    ("architecture", "tokenizer"), [("qwen2", "char"), ("qwen2", "bpe"), ("llama", "bpe-llama3")]
)
def test_a_saved_checkpoint_tokenizes_as_it_was_trained(tmp_path, architecture, tokenizer):
    """transformers 5 gives a `qwen2` config its own Qwen2Tokenizer pipeline whatever
    tokenizer.json says: the character preset lost every space and newline on reload (a
    countdown prompt went from 47 to 40 ids), so every stage after the first saw other
    prompts than SFT trained on."""
    from signalrl.models import load_model, save_model

    model, tok = load_model("tiny", architecture=architecture, tokenizer=tokenizer)
    out = save_model(model, tok, tmp_path / "ckpt")
    _, back = load_model(str(out))
    text = "Using 3, 7 and 12, make 33.\nAnswer:  (3 + 7) * 12 - 87 = 33 <|im_end|>"
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert back.decode(back(text)["input_ids"]) == tok.decode(tok(text)["input_ids"])
