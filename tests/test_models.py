from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from signalrl.models import PRESETS, count_parameters, load_model, save_model


@pytest.mark.parametrize(
    "name,lo,hi", [("tiny", 0.5e6, 1.5e6), ("small", 4e6, 8e6), ("base", 20e6, 30e6)]
)
def test_preset_sizes(name, lo, hi):
    model, tok = load_model(name)
    assert lo <= count_parameters(model) <= hi
    assert model.config.model_type == "qwen2"
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template


def test_hf_round_trip(tmp_path):
    model, tok = load_model("tiny", seed=3)
    out = save_model(model, tok, tmp_path / "ck")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    # plain transformers, no signalrl involved
    m2 = AutoModelForCausalLM.from_pretrained(out)
    t2 = AutoTokenizer.from_pretrained(out)
    text = "12+34=46"
    assert (
        t2(text, add_special_tokens=False).input_ids
        == tok(text, add_special_tokens=False).input_ids
    )
    assert t2.decode(t2(text).input_ids) == text
    assert t2.eos_token == tok.eos_token and t2.pad_token == tok.pad_token
    chat = [{"role": "user", "content": "hi"}]
    assert t2.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    ) == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, model(ids).logits)
    # and through load_model's directory path
    m3, _ = load_model(str(out))
    with torch.no_grad():
        torch.testing.assert_close(m3(ids).logits, model(ids).logits)


def test_preset_seed_is_deterministic():
    a, _ = load_model("tiny", seed=1)
    b, _ = load_model("tiny", seed=1)
    c, _ = load_model("tiny", seed=2)
    pa, pb, pc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_unknown_preset_or_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a preset.*tiny"):
        load_model("huge")
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_wrong_tokenizer_is_refused(tmp_path):
    model, tok = load_model("tiny")
    model.resize_token_embeddings(50)
    save_model(model, tok, tmp_path / "ck")
    with pytest.raises(ValueError, match="wrong tokenizer"):
        load_model(str(tmp_path / "ck"))


def test_atomic_save_leaves_nothing_on_failure(tmp_path, monkeypatch):
    model, tok = load_model("tiny")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        save_model(model, tok, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_presets_listed():
    assert set(PRESETS) == {"tiny", "small", "base"}


def test_truncated_safetensors_names_the_file(tmp_path):
    model, tok = load_model("tiny")
    out = save_model(model, tok, tmp_path / "ck")
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated") as e:
        load_model(str(out))
    assert str(weights) in str(e.value)


def test_corrupt_config_json_names_the_file(tmp_path):
    model, tok = load_model("tiny")
    out = save_model(model, tok, tmp_path / "ck")
    (out / "config.json").write_text('{"model_type": "qwen2",')
    with pytest.raises(ValueError, match="config.json") as e:
        load_model(str(out))
    assert "not valid JSON" in str(e.value)


def test_resolve_device_without_cuda(monkeypatch):
    from signalrl.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    for dev in ("cuda", "cuda:1"):
        with pytest.raises(ValueError) as e:
            resolve_device(dev)
        assert str(e.value) == (
            f"model.device '{dev}' but this machine has no CUDA device; use cpu or auto"
        )
    for bad in ("gpu", "cuda:x", "", "cpu:0"):
        with pytest.raises(ValueError, match="is not a device"):
            resolve_device(bad)
    with pytest.raises(ValueError, match="no CUDA device"):
        load_model("tiny", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resolve_device_with_cuda():
    from signalrl.models import resolve_device

    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:0") == "cuda:0"
    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"has {n} CUDA device"):
        resolve_device(f"cuda:{n}")
    model, _ = load_model("tiny", device="cuda")
    assert next(model.parameters()).device.type == "cuda"
