"""The code paths a real Hugging Face checkpoint takes: every test starts from a directory
written with `save_pretrained` (tiny models of real architectures, built from config with the
byte-level BPE presets and their chat templates) and loaded back with `from_pretrained`
through `signalrl.models.load_model(path)`, as a user with a downloaded checkpoint would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from signalrl.config import recipe_from_dict
from signalrl.data.chat import adds_bos, end_of_turn_token, render_row
from signalrl.data.collate import build_batch, tokenize_sft
from signalrl.data.preference import load_preference_data
from signalrl.data.sft import load_sft_data
from signalrl.logging import read_metrics
from signalrl.models import Preset, build_preset_model, load_model
from signalrl.models.logprobs import completion_logps
from signalrl.models.tokenizer import BEGIN_OF_TEXT, EOT, IM_END, build_bpe_tokenizer
from signalrl.rollout.sampler import SamplingParams, encode_prompts, generate
from signalrl.tasks import ArithmeticTask
from signalrl.trainers import run_recipe
from signalrl.trainers.distill import completion_logits
from signalrl.trainers.sft import SFTTrainer

MICRO = Preset(64, 128, 2, 4, 2)  # hidden 64, 2 layers
# (architecture, tokenizer preset): Qwen-style ChatML and Llama-3-style (a BOS the tokenizer
# adds, a template that writes it itself)
CHECKPOINTS = [
    ("qwen2", "bpe"),
    ("qwen3", "bpe"),
    ("llama", "bpe-llama3"),
    ("mistral", "bpe-llama3"),
    ("gemma", "bpe-llama3"),
    ("gpt2", "bpe"),
]
IDS = [f"{a}-{t}" for a, t in CHECKPOINTS]
CHAT = [{"role": "user", "content": "What is 3+4?"}]


def _save(out: Path, arch: str, kind: str, *, pad_vocab: int = 0, eos: str | None = None) -> str:
    """A tiny `arch` checkpoint with the `kind` BPE tokenizer, saved like a real one."""
    tok = build_bpe_tokenizer(kind)
    if eos is not None:  # instruct checkpoints: the end of turn is the EOS
        tok.eos_token = eos
    model = build_preset_model(MICRO, tok, architecture=arch, seed=0, attn_implementation="eager")
    if pad_vocab:  # an embedding padded beyond the tokenizer (Qwen2-7B: 152064 vs 151665)
        model.resize_token_embeddings(len(tok) + pad_vocab)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ckpt")
    return {f"{a}-{t}": _save(root / f"{a}-{t}", a, t) for a, t in CHECKPOINTS}


def _trained(tok: Any, ids: list[int], mask: list[float]) -> str:
    return tok.decode([i for i, w in zip(ids, mask, strict=True) if w > 0])


# -- loading, templates, special tokens ----------------------------------------------------


@pytest.mark.parametrize("name", IDS)
def test_checkpoint_loads_with_its_chat_template_and_eos_list(checkpoints, name):
    model, tok = load_model(checkpoints[name])
    arch, kind = name.split("-", 1)
    assert type(model).__name__.lower().startswith(arch.replace("gpt2", "gpt2lmhead"))
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    eot = IM_END if kind == "bpe" else EOT
    assert end_of_turn_token(tok) == eot
    eos = model.generation_config.eos_token_id
    assert isinstance(eos, list) and tok.convert_tokens_to_ids(eot) in eos
    assert tok.eos_token_id in eos
    built = build_bpe_tokenizer(kind)  # the saved tokenizer encodes as the one built
    for text in ("What is 37+48? ünï\n\n x", prompt):
        for special in (True, False):
            got = tok(text, add_special_tokens=special)["input_ids"]
            assert got == built(text, add_special_tokens=special)["input_ids"]
    if kind == "bpe":
        assert prompt.startswith("<|im_start|>user\nWhat is 3+4?<|im_end|>\n")
        assert not adds_bos(tok)
    else:
        assert prompt.startswith(BEGIN_OF_TEXT) and prompt.count(BEGIN_OF_TEXT) == 1
        assert adds_bos(tok) and tok("x")["input_ids"][0] == tok.bos_token_id


def test_bpe_training_is_deterministic_and_the_cache_gives_the_same_tokenizer(tmp_path):
    from signalrl.models.tokenizer import base_bpe

    fresh = base_bpe(use_cache=False)
    assert fresh.get_vocab_size() == 4096
    # the cache (written by whichever process trained first, or now) holds the same merges
    assert base_bpe().to_str() == fresh.to_str()
    tok = build_bpe_tokenizer("bpe")
    assert tok.decode(tok("What is 37+48? ünï")["input_ids"]) == "What is 37+48? ünï"


# -- the BOS of BOS-adding tokenizers ------------------------------------------------------


def test_bos_once_on_prompts_sft_rows_and_dpo_prompts(checkpoints, tmp_path):
    """Llama-style tokenizers add a BOS: plain prompts get it, chat renders that write it
    themselves do not get a second one (sampler, SFT rows, DPO prompts alike)."""
    _, tok = load_model(checkpoints["llama-bpe-llama3"])
    bos = tok.bos_token_id
    chat = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    plain, templated = encode_prompts(tok, ["What is 3+4?", chat])
    assert plain[0] == bos and plain[1] != bos
    assert templated[0] == bos and templated.count(bos) == 1
    p_ids, _ = tokenize_sft(tok, ["3+4=", chat], ["7", "7"])
    assert [p[0] for p in p_ids] == [bos, bos] and p_ids[1].count(bos) == 1
    rows = tmp_path / "sft.jsonl"
    rows.write_text(json.dumps({"prompt": "3+4=", "completion": "7"}) + "\n")
    pc = load_sft_data(rows, tok)
    assert pc.prompt_ids[0][0] == bos and pc.prompt_ids[0].count(bos) == 1
    assert _trained(tok, pc.completion_ids[0], pc.completion_masks[0]) == "7" + tok.eos_token
    msgs = tmp_path / "msgs.jsonl"
    msgs.write_text(json.dumps({"messages": [*CHAT, {"role": "assistant", "content": "7"}]}) + "\n")
    m = load_sft_data(msgs, tok)
    assert m.prompt_ids[0][0] == bos and (m.prompt_ids[0] + m.completion_ids[0]).count(bos) == 1
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(
        json.dumps({"prompt": "3+4=", "chosen": "7", "rejected": "8"})
        + "\n"
        + json.dumps({"prompt": CHAT, "chosen": "7", "rejected": "8"})
        + "\n"
    )
    d = load_preference_data(prefs, tok)
    assert [p[0] for p in d.prompt_ids] == [bos, bos]
    assert [p.count(bos) for p in d.prompt_ids] == [1, 1]


def test_no_bos_is_added_for_qwen_style_tokenizers(checkpoints):
    _, tok = load_model(checkpoints["qwen2-bpe"])
    ids = encode_prompts(tok, ["What is 3+4?"])[0]
    assert ids == tok("What is 3+4?", add_special_tokens=False)["input_ids"]


# -- chat rows: loss masks, end of turn ----------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2-bpe", "llama-bpe-llama3"])
def test_sft_messages_rows_train_the_assistant_turns_only(checkpoints, tmp_path, name):
    _, tok = load_model(checkpoints[name])
    eot = end_of_turn_token(tok)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 3+4?"},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "And 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    d = load_sft_data(path, tok)
    trained = _trained(tok, d.completion_ids[0], d.completion_masks[0])
    assert "Be brief" not in trained and "And 2+2" not in trained and "What is" not in trained
    assert trained.startswith(f"7{eot}") and f"4{eot}" in trained
    whole = tok.decode(d.prompt_ids[0] + d.completion_ids[0])
    assert whole.startswith(tok.apply_chat_template(msgs, tokenize=False)[:20])


def _chat_task_file(tmp_path: Path) -> Path:
    path = tmp_path / "qa.jsonl"
    rows = [
        {"prompt": f"What is {i}+{j}?", "answer": str(i + j)} for i in range(6) for j in range(4)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft_recipe(tmp_path: Path, model: str, task: dict[str, Any], **over: Any) -> Any:
    data: dict[str, Any] = {
        "name": "sft",
        "output_dir": str(tmp_path),
        "trainer": "sft",
        "model": {"name_or_path": model, "attn_implementation": "eager"},
        "task": task,
        "train": {"steps": 2, "lr": 1e-3, "batch_size": 4},
        "sampling": {"max_new_tokens": 4},
        "eval": {"every": 0, "k": 0, "n": 4, "batch_size": 4},
        "logging": {"progress": False, "samples_every": 0, "tensorboard": False},
        "checkpoint": {"every": 0},
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return recipe_from_dict(data, "test")


@pytest.mark.parametrize("name", ["qwen2-bpe", "llama-bpe-llama3"])
def test_sft_from_a_chat_task_ends_completions_with_the_end_of_turn(checkpoints, tmp_path, name):
    """The task branch of SFT (no data file) trains the same tokens as a `{messages}` row:
    the reply, the template's end of turn, and an EOS only where that is not the EOS."""
    task = {"name": "dataset", "path": str(_chat_task_file(tmp_path)), "template": "chat"}
    t = SFTTrainer(_sft_recipe(tmp_path, checkpoints[name], task))
    row = t.task.train()[0]
    rendered = render_row(t.tokenizer, row)
    assert t.train_data.prompt_ids[0] == encode_prompts(t.tokenizer, [rendered["prompt"]])[0]
    text = t.tokenizer.decode(t.train_data.completion_ids[0])
    assert text.startswith(row["completion"] + end_of_turn_token(t.tokenizer)), text
    as_messages = tmp_path / "m.jsonl"
    conv = [*row["messages"], {"role": "assistant", "content": row["completion"]}]
    as_messages.write_text(json.dumps({"messages": conv}) + "\n")
    d = load_sft_data(as_messages, t.tokenizer)
    assert d.completion_ids[0] == t.train_data.completion_ids[0]
    assert d.prompt_ids[0] == t.train_data.prompt_ids[0]


@pytest.mark.parametrize(
    ("name", "eos"),
    [("qwen2-bpe", None), ("qwen2-bpe", IM_END), ("llama-bpe-llama3", EOT)],
)
def test_preference_chat_rows_end_with_one_end_of_turn(tmp_path, name, eos):
    """A chat reply ends as the template ends a turn, once; with an instruct tokenizer
    (EOS = the end of turn) no EOS follows it. The same tokens as an SFT messages row."""
    arch, kind = name.split("-", 1)
    _, tok = load_model(_save(tmp_path / "ck", arch, kind, eos=eos))
    eot = end_of_turn_token(tok)
    eot_id = tok.convert_tokens_to_ids(eot)
    path = tmp_path / "p.jsonl"
    chosen = [{"role": "assistant", "content": "7"}]
    rows = [
        {"prompt": CHAT, "chosen": chosen, "rejected": [{"role": "assistant", "content": "8"}]},
        {"prompt": CHAT, "chosen": "7", "rejected": "8"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = load_preference_data(path, tok)
    for ids in d.completion_ids + (d.rejected_ids or []):
        assert ids.count(eot_id) == 1, tok.decode(ids)
    assert d.completion_ids[0] == d.completion_ids[1]  # a string reply is an assistant turn
    sft = tmp_path / "s.jsonl"
    sft.write_text(json.dumps({"messages": CHAT + chosen}) + "\n")
    s = load_sft_data(sft, tok)
    assert s.completion_ids[0] == d.completion_ids[0]
    assert s.prompt_ids[0] == d.prompt_ids[0]


# -- sampling ------------------------------------------------------------------------------


class _ForceAt:
    """A forward hook on the LM head that makes `token` all but certain at its `at`-th call
    (the prefill's logits give the first completion token, call k the k-th)."""

    def __init__(self, token: int, at: int) -> None:
        self.token, self.at, self.calls = token, at, 0

    def __call__(self, module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            out = out.clone()
            out[..., self.token] = out.abs().max() * 10 + 100
        return out


@pytest.mark.parametrize("name", ["qwen2-bpe", "llama-bpe-llama3", "gpt2-bpe"])
def test_sampling_stops_at_the_end_of_turn(checkpoints, name):
    model, tok = load_model(checkpoints[name])
    eot = tok.convert_tokens_to_ids(end_of_turn_token(tok))
    assert eot != tok.eos_token_id
    prompt = render_row(tok, {"prompt": "x", "messages": CHAT})["prompt"]
    hook = model.get_output_embeddings().register_forward_hook(_ForceAt(eot, 3))  # 3rd token
    try:
        r = generate(model, tok, [prompt], SamplingParams(max_new_tokens=8, temperature=1.0))
    finally:
        hook.remove()
    assert int(r.lengths[0]) == 3 and int(r.completion_ids[0, 2]) == eot
    assert not bool(r.truncated[0]) and end_of_turn_token(tok) not in r.texts[0]


@pytest.mark.parametrize("name", IDS)
def test_batched_greedy_equals_one_by_one_and_logps_match_the_trainer(checkpoints, name):
    model, tok = load_model(checkpoints[name])
    prompts = [
        render_row(tok, {"prompt": "", "messages": CHAT})["prompt"],
        "What is 12+30? The answer",
        "Hi",
    ]
    params = SamplingParams(max_new_tokens=6, greedy=True)
    batched = generate(model, tok, prompts, params)
    for i, p in enumerate(prompts):
        one = generate(model, tok, [p], params)
        n = int(one.lengths[0])
        assert int(batched.lengths[i]) == n
        assert batched.completion_ids[i, :n].tolist() == one.completion_ids[0, :n].tolist()
        torch.testing.assert_close(batched.logps[i, :n], one.logps[0, :n], atol=1e-4, rtol=0)
    gen = torch.Generator().manual_seed(0)
    roll = generate(model, tok, prompts, SamplingParams(max_new_tokens=6, n=2), generator=gen)
    batch = build_batch(
        roll.prompt_ids, roll.completion_ids, tok.pad_token_id, completion_mask=roll.completion_mask
    )
    with torch.no_grad():
        trainer = completion_logps(model, batch)
    diff = ((trainer - roll.logps) * roll.completion_mask).abs().max()
    assert float(diff) < 1e-4, float(diff)


# -- the CLI paths render chat rows like the trainers --------------------------------------


def test_eval_renders_chat_rows_like_the_trainers(checkpoints, tmp_path, monkeypatch):
    """`signalrl eval` on a `template: chat` task scores the prompts the trainer's own
    evaluation scores: the chat template's render, not the raw question."""
    import signalrl.eval as ev
    from signalrl.cli import app

    path = checkpoints["qwen2-bpe"]
    task_file = _chat_task_file(tmp_path)
    seen: list[dict[str, Any]] = []
    real_evaluate = ev.evaluate

    def evaluate(model: Any, tokenizer: Any, rows: Any, *a: Any, **kw: Any) -> Any:
        seen.extend(rows)
        return real_evaluate(model, tokenizer, rows, *a, **kw)

    monkeypatch.setattr(ev, "evaluate", evaluate)
    sets = ["--set", f"task.path={task_file}", "--set", "task.template=chat"]
    res = CliRunner().invoke(app, ["eval", "--model", path, "--task", "dataset", "--n", "3", *sets])
    assert res.exit_code == 0, res.output
    task = {"name": "dataset", "path": str(task_file), "template": "chat"}
    t = SFTTrainer(_sft_recipe(tmp_path, path, task))
    want = [r["prompt"] for r in t.test_rows()[:3]]
    assert [r["prompt"] for r in seen] == want
    assert all(p.startswith("<|im_start|>user\n") for p in want)


class _Alternating:
    """A chat task whose verifier calls every other sample correct (so every prompt of two
    samples gives a pair)."""

    name = "alternating"

    def __init__(self) -> None:
        self.calls = 0
        self.rows = ArithmeticTask(digits=1, n_train=8, n_test=2, template="chat").train()

    def train(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.rows]

    def test(self) -> list[dict[str, Any]]:
        return self.train()[:2]

    def verify(self, row: dict[str, Any], completion: str) -> float:
        self.calls += 1
        return float(self.calls % 2)


def test_make_preferences_samples_chat_rows_like_the_trainers(checkpoints, tmp_path, monkeypatch):
    import signalrl.data.make_preferences as mp

    path = checkpoints["llama-bpe-llama3"]
    _, tok = load_model(path)
    seen: list[dict[str, Any]] = []
    real_collect = mp.collect

    def collect(model: Any, tokenizer: Any, rows: Any, *a: Any, **kw: Any) -> Any:
        seen.extend(rows)
        return real_collect(model, tokenizer, rows, *a, **kw)

    monkeypatch.setattr(mp, "collect", collect)
    out = tmp_path / "pairs.jsonl"
    task = _Alternating()
    stats = mp.make_preferences(path, out, task=task, samples=2, max_new_tokens=4, device="cpu")
    assert stats.pairs >= 1
    rendered = [render_row(tok, r)["prompt"] for r in task.train()]
    assert [r["prompt"] for r in seen] == rendered[: len(seen)]
    assert all(p.startswith(BEGIN_OF_TEXT + "<|start_header_id|>user") for p in rendered)
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    assert pairs[0]["prompt"] == task.rows[0]["messages"]  # the messages, rendered on loading
    d = load_preference_data(out, tok)
    assert d.prompt_ids[0] == encode_prompts(tok, [rendered[0]])[0]  # the prompt it sampled


# -- training runs from a checkpoint directory ----------------------------------------------


RUN_COMMON: dict[str, Any] = {
    "task": {"name": "arithmetic", "digits": 1, "n_train": 32, "n_test": 4, "template": "chat"},
    "train": {"steps": 2, "lr": 1e-3, "batch_size": 4},
    "sampling": {"max_new_tokens": 4},
    "eval": {"every": 0, "k": 0, "n": 4, "batch_size": 4},
    "logging": {"progress": False, "samples_every": 0, "tensorboard": False},
    "checkpoint": {"every": 0},
}


def _run(tmp_path: Path, name: str, model: str, **extra: Any) -> list[dict[str, Any]]:
    data = {
        **RUN_COMMON,
        "name": name,
        "output_dir": str(tmp_path),
        "model": {"name_or_path": model, "attn_implementation": "eager"},
        **extra,
    }
    out = run_recipe(recipe_from_dict(data, "test"))
    assert Path(out["model"]).is_dir()
    load_model(out["model"])  # final/ loads back like the checkpoint it started from
    return read_metrics(tmp_path / name)


@pytest.mark.parametrize("name", ["qwen2-bpe", "llama-bpe-llama3"])
def test_sft_dpo_grpo_run_from_a_checkpoint_directory(checkpoints, tmp_path, name):
    path = checkpoints[name]
    rows = _run(tmp_path, "sft", path, trainer="sft")
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    prefs = tmp_path / "prefs.jsonl"
    task = ArithmeticTask(digits=1, n_train=16, n_test=4, template="chat")
    prefs.write_text(
        "".join(
            json.dumps(
                {"prompt": r["messages"], "chosen": r["completion"], "rejected": r["answer"] + "0"}
            )
            + "\n"
            for r in task.train()
        )
    )
    rows = _run(
        tmp_path,
        "dpo",
        path,
        trainer="preference",
        data={"path": str(prefs), "test_fraction": 0.0},
        preference={"loss_type": "sigmoid", "beta": 0.1},
    )
    assert len(rows) == 2 and "rewards/accuracies" in rows[0]
    rows = _run(
        tmp_path, "grpo", path, trainer="online_rl", rl={"algorithm": "grpo", "group_size": 4}
    )
    assert len(rows) == 2 and "reward/mean" in rows[0]


def test_gkd_with_a_teacher_whose_embedding_is_padded(checkpoints, tmp_path):
    """Real families pad the embedding beyond the tokenizer (152064 vs 151936 rows): GKD
    compares the two distributions over the shared vocabulary."""
    teacher = _save(tmp_path / "teacher", "qwen2", "bpe", pad_vocab=64)
    data = {
        **RUN_COMMON,
        "name": "gkd",
        "output_dir": str(tmp_path),
        "trainer": "distill",
        "model": {"name_or_path": checkpoints["qwen2-bpe"], "attn_implementation": "eager"},
        "rl": {"group_size": 2},
        "distill": {"teacher": teacher, "mode": "gkd", "lmbda": 0.5},
        "train": {"steps": 3, "lr": 1e-3, "batch_size": 2},
    }
    run_recipe(recipe_from_dict(data, "test"))
    rows = read_metrics(tmp_path / "gkd")
    assert len(rows) == 3 and all("distill/jsd" in r for r in rows)
    assert all(torch.isfinite(torch.tensor(r["distill/jsd"])) for r in rows)
    t_model, tok = load_model(teacher)
    assert t_model.get_output_embeddings().weight.shape[0] == len(tok) + 64
    batch = build_batch(encode_prompts(tok, ["Hi"]), [[5, 6]], tok.pad_token_id)
    assert completion_logits(t_model, batch, vocab_size=len(tok)).shape == (1, 2, len(tok))
