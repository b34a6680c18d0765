"""SFT / pretraining from a user data file: row kinds, loss masks, errors, a learning test."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from signalrl.cli import app
from signalrl.config import recipe_from_dict
from signalrl.data.collate import build_batch
from signalrl.data.sft import SFTDataError, load_sft_data, tokenize_rows
from signalrl.logging import read_metrics
from signalrl.models.tokenizer import build_char_tokenizer
from signalrl.trainers import run_recipe
from signalrl.trainers.sft import SFTTrainer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _write(path, rows, raw_lines=()):
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


def _trained_text(tok, ids, mask):
    """The trained tokens, with '_' for each context token."""
    return "".join(tok.decode([i]) if m else "_" for i, m in zip(ids, mask, strict=True))


def test_text_rows_train_every_token(tok, tmp_path):
    p = _write(tmp_path / "c.jsonl", [{"text": "12+3=15"}, {"text": "ab", "type": "x"}])
    d = load_sft_data(p, tok)
    assert d.kind == "text" and len(d) == 2
    # no BOS in the char tokenizer: the first character is the context, the rest + EOS trained
    assert tok.decode(d.prompt_ids[0]) == "1"
    assert tok.decode(d.completion_ids[0]) == "2+3=15" + tok.eos_token
    assert d.completion_masks[0] == [1.0] * 7
    assert d.loss_tokens == 7 + 2


def test_prompt_completion_rows_train_the_completion(tok, tmp_path):
    p = _write(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    d = load_sft_data(p, tok)
    assert d.kind == "prompt_completion"
    assert tok.decode(d.prompt_ids[0]) == "2+2="
    assert tok.decode(d.completion_ids[0]) == "4" + tok.eos_token
    assert d.completion_masks[0] == [1.0, 1.0]


def test_messages_rows_train_every_assistant_turn(tok, tmp_path):
    msgs = [
        {"role": "system", "content": "brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    d = load_sft_data(_write(tmp_path / "m.jsonl", [{"messages": msgs}]), tok)
    assert d.kind == "messages"
    prompt = tok.decode(d.prompt_ids[0])
    assert prompt.endswith("<|im_start|>assistant\n") and "yo" not in prompt
    trained = _trained_text(tok, d.completion_ids[0], d.completion_masks[0])
    # the user turn between the two assistant turns is context only
    assert trained.startswith("yo<|im_end|>\n")
    assert trained.endswith("4<|im_end|>\n" + tok.eos_token)
    assert "2+2?" not in trained and "_" in trained
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(d.prompt_ids[0] + d.completion_ids[0]) == full + tok.eos_token


def test_explicit_kind_and_errors_name_file_row_and_field(tok, tmp_path):
    good = {"text": "hello"}
    p = _write(tmp_path / "bad.jsonl", [good, {"txt": "oops"}])
    with pytest.raises(SFTDataError, match=r"bad\.jsonl: line 2: missing field 'text'"):
        load_sft_data(p, tok)
    p = _write(tmp_path / "json.jsonl", [good], raw_lines=["{not json"])
    with pytest.raises(SFTDataError, match=r"json\.jsonl: line 2: not valid JSON"):
        load_sft_data(p, tok)
    p = _write(tmp_path / "type.jsonl", [{"prompt": "a", "completion": 3}])
    with pytest.raises(SFTDataError, match=r"line 1: field 'completion' must be a string"):
        load_sft_data(p, tok)
    p = _write(tmp_path / "empty.jsonl", [{"prompt": "a", "completion": "  "}])
    with pytest.raises(SFTDataError, match=r"line 1: field 'completion' is empty"):
        load_sft_data(p, tok)
    p = _write(tmp_path / "kind.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(SFTDataError, match=r"line 1: missing field 'text' \(text rows"):
        load_sft_data(p, tok, kind="text")
    p = _write(tmp_path / "cols.jsonl", [{"question": "a"}])
    with pytest.raises(SFTDataError, match=r"line 1: cannot tell the row kind"):
        load_sft_data(p, tok)
    p = _write(tmp_path / "noasst.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
    with pytest.raises(SFTDataError, match=r"line 1: field 'messages' has no assistant"):
        load_sft_data(p, tok)
    p = _write(tmp_path / "role.jsonl", [{"messages": [{"role": "bot", "content": "a"}]}])
    with pytest.raises(SFTDataError, match=r"line 1: field 'messages': message 0 has role"):
        load_sft_data(p, tok)
    p = _write(tmp_path / "long.jsonl", [good, {"text": "x" * 50}])
    with pytest.raises(SFTDataError, match=r"line 2: the row is 51 tokens, over .*=20"):
        load_sft_data(p, tok, max_length=20)
    with pytest.raises(SFTDataError, match=r"data.format is 'parquet'"):
        load_sft_data(p, tok, file_format="parquet")
    with pytest.raises(SFTDataError, match=r"nope\.jsonl: data file not found"):
        load_sft_data(tmp_path / "nope.jsonl", tok)


def test_parquet_rows_load(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"prompt": ["1+1=", "2+2="], "completion": ["2", "4"]}), p)
    d = load_sft_data(p, tok)
    assert d.kind == "prompt_completion" and len(d) == 2


def test_masked_context_tokens_stay_attended(tok):
    rows = [("r: line 1", {"messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]})]  # fmt: skip
    d = tokenize_rows(tok, rows)
    b = build_batch(d.prompt_ids * 2, d.completion_ids * 2, 0, masks=d.completion_masks * 2)
    n = len(d.completion_ids[0])
    assert int(b.attention_mask[0].sum()) == len(d.prompt_ids[0]) + n  # context included
    assert float(b.completion_mask[0].sum()) < n
    sel = b.select(slice(0, 1))
    assert sel.completion_ids.shape[1] == n  # no trained token cut off by the select
    torch.testing.assert_close(sel.completion_mask[0], torch.tensor(d.completion_masks[0]))


def _recipe(tmp_path, data, **over):
    r = {
        "name": "pt",
        "output_dir": str(tmp_path),
        "trainer": "sft",
        "model": {"name_or_path": "tiny"},
        "data": data,
        "task": {"name": "arithmetic", "digits": 1, "n_train": 50, "n_test": 8},
        "train": {"steps": 40, "lr": 3e-3, "batch_size": 8, "micro_batch_size": 4},
        "sampling": {"max_new_tokens": 4},
        "eval": {"every": 20},
        "logging": {"progress": False, "samples_every": 0},
    }
    r.update(over)
    return recipe_from_dict(r, "test")


def test_pretraining_on_a_text_file_learns_it(tmp_path):
    """Loss on every token of a small text corpus falls, and held-out loss is logged."""
    rows = [{"text": f"{a} {b} {a} {b} {a} {b}."} for a in "abcdef" for b in "uvwxyz"]
    path = _write(tmp_path / "corpus.jsonl", rows)
    out = run_recipe(_recipe(tmp_path, {"path": str(path), "test_fraction": 0.1}))
    metrics = read_metrics(tmp_path / "pt")
    first = metrics[0]["loss"]
    last = sum(m["loss"] for m in metrics[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert "eval/loss" in metrics[19] and "eval/loss" in metrics[-1]
    assert out["eval_loss"] < first
    assert (tmp_path / "pt" / "final" / "model.safetensors").exists()


def test_sft_on_a_data_file_matches_grad_accumulation(tmp_path):
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(20)]
    path = _write(tmp_path / "pc.jsonl", rows)

    def grads(micro):
        r = _recipe(
            tmp_path / f"m{micro}",
            {"path": str(path), "test_fraction": 0.0},
            train={"steps": 1, "batch_size": 8, "micro_batch_size": micro},
        )
        t = SFTTrainer(r)
        got = {}

        def capture(step_scheduler=True):
            got["g"] = torch.cat([p.grad.flatten() for p in t.model.parameters()])
            return {"grad_norm": 0.0, "lr": 0.0}

        t.optimizer_step = capture
        t.train_step()
        return got["g"]

    torch.testing.assert_close(grads(2), grads(8), atol=1e-6, rtol=1e-4)


def test_train_cli_reports_bad_data_rows(tmp_path):
    path = _write(tmp_path / "c.jsonl", [{"text": "ok"}, {"text": 7}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: x\noutput_dir: {tmp_path}\ntrainer: sft\ndata: {{path: {path}}}\n"
        "train: {steps: 1}\nlogging: {progress: false}\n"
    )
    res = CliRunner().invoke(app, ["train", str(recipe)])
    assert res.exit_code == 2
    out = " ".join(res.output.split())
    assert "line 2: field 'text' must be a string" in out and "c.jsonl" in out


def test_non_utf8_sft_file_names_the_file_and_line(tok, tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"text": "1+1=2"}\n{"text": "2+2=4"}\n{"text": "caf\xe9 3+3=6"}\n')
    with pytest.raises(SFTDataError) as e:
        load_sft_data(p, tok)
    msg = str(e.value)
    assert str(p) in msg and "line 3" in msg and "column 14" in msg and "0xe9" in msg, msg
