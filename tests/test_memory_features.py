"""Memory features: the chunked LM head (no float32 (B, T, V) logits), gradient checkpointing
(same numbers, less activation memory, prefix sharing still exact) and fp32 master weights
for a half-precision `model.dtype`."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

import signalrl.models.logprobs as logprobs_mod
from signalrl.config import LoraConfig, recipe_from_dict
from signalrl.data.collate import SequenceBatch, build_batch
from signalrl.logging import read_metrics
from signalrl.logging.memory import current_memory_mb, peak_memory_mb, reset_peak_memory
from signalrl.losses.policy import hidden_token_logprobs, token_logprobs
from signalrl.models import load_model
from signalrl.models.logprobs import completion_logps, shared_prefix_logps
from signalrl.models.lora import apply_lora, enable_gradient_checkpointing
from signalrl.trainers import trainer_class

sys.path.insert(0, str(Path(__file__).parent))

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
ROWS = torch.tensor([0, 0, 1, 2, 2])
COMPS = [[20, 21, 22], [23, 24], [25, 26, 27, 28], [29], [30, 31, 32, 33, 34]]


def _batch(pad: int) -> SequenceBatch:
    return build_batch([PROMPTS[i] for i in ROWS.tolist()], COMPS, pad)


def full_logits_logps(model: nn.Module, batch: SequenceBatch, temperature: float = 1.0):
    """The log-probs from the whole model's logits (what `completion_logps` computed before
    the chunked head)."""
    t = batch.completion_ids.shape[1]
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).logits[:, -(t + 1) : -1]
    return token_logprobs(logits, batch.completion_ids, temperature=temperature) * (
        batch.completion_mask
    )


def _values_and_grads(model: nn.Module, fn) -> tuple[torch.Tensor, list[torch.Tensor]]:  # noqa: ANN001
    model.zero_grad(set_to_none=True)
    out = fn()
    weights = torch.linspace(-1.0, 1.0, out.numel()).view_as(out)
    (out * weights).sum().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _assert_same(a, b) -> None:  # noqa: ANN001
    torch.testing.assert_close(b[0], a[0], atol=1e-5, rtol=0)
    for x, y in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-4)


def test_hidden_token_logprobs_is_token_logprobs_of_the_head():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    head = nn.Linear(8, 11)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    want = token_logprobs(head(hidden), ids, temperature=0.7)
    got = hidden_token_logprobs(hidden, head, ids, chunk_size=3, tau=0.7)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    (gw,) = torch.autograd.grad(want.sum(), hidden)
    (gg,) = torch.autograd.grad(got.sum(), hidden)
    torch.testing.assert_close(gg, gw, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="chunk_size"):
        hidden_token_logprobs(hidden, head, ids, chunk_size=0)


@pytest.mark.parametrize("wrap", ["plain", "lora", "no_logits_to_keep"])
def test_chunked_head_equals_full_logits_values_and_gradients(monkeypatch, wrap):
    """Chunks of 3 positions: the same log-probs and gradients as the whole-model logits, for
    a plain model, a peft-wrapped one and a model without `logits_to_keep` (whole model)."""
    model, tok = load_model("tiny", seed=1)
    monkeypatch.setattr(logprobs_mod, "LOGIT_CHUNK_ELEMENTS", 3 * len(tok))
    if wrap == "lora":
        model = apply_lora(model, LoraConfig(enabled=True, r=4))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)

    class NoKeep(nn.Module):  # a forward without logits_to_keep, no get_output_embeddings
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, **kw):  # noqa: ANN001, ANN003, ANN201
            return self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                **kw,
            )

    if wrap == "no_logits_to_keep":
        model = NoKeep(model)
    assert (logprobs_mod.body_and_head(model) is None) == (wrap == "no_logits_to_keep")
    model.train()
    batch = _batch(tok.pad_token_id)
    want = _values_and_grads(model, lambda: full_logits_logps(model, batch, 0.7))
    got = _values_and_grads(model, lambda: completion_logps(model, batch, temperature=0.7))
    _assert_same(want, got)
    shared = _values_and_grads(
        model,
        lambda: shared_prefix_logps(
            model,
            PROMPTS,
            ROWS,
            batch.completion_ids,
            batch.completion_mask,
            tok.pad_token_id,
            temperature=0.7,
        ),
    )
    _assert_same(want, shared)


def _peak_above_now(fn) -> float:  # noqa: ANN001
    gc.collect()
    reset_peak_memory("cpu")
    start = current_memory_mb("cpu")
    fn()
    return peak_memory_mb("cpu") - start


def test_a_150k_vocabulary_never_materialises_float32_logits():
    """B=16, T=128 at V=151936: float32 logits would be 1196 MiB, the earlier path held them
    and their gradient (> 2.3 GiB); the chunked head's forward + backward peak (about 5
    chunks of 64 MiB) stays under half of one such tensor."""
    cfg = Qwen2Config(
        vocab_size=151936,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).train()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (16, 16), generator=g).tolist()
    comps = torch.randint(0, cfg.vocab_size, (16, 128), generator=g).tolist()
    batch = build_batch(prompts, comps, 0)
    logits_mb = 16 * 129 * cfg.vocab_size * 4 / 2**20
    if not reset_peak_memory("cpu"):
        pytest.skip("peak memory cannot be reset on this platform")
    peak = _peak_above_now(lambda: completion_logps(model, batch).sum().backward())
    assert peak < 0.5 * logits_mb, (peak, logits_mb)


def test_gradient_checkpointing_gives_the_same_values_and_gradients_with_less_memory(tiny):
    """Also `shared_prefix_logps`, whose KV cache HF drops under checkpointing (it falls back
    to the unshared batch: without the fallback its completions ran without their prompt)."""
    base, tok = tiny
    plain, ckpt = load_model("tiny", seed=0)[0].train(), load_model("tiny", seed=0)[0].train()
    enable_gradient_checkpointing(ckpt)
    batch = _batch(tok.pad_token_id)
    for fn in (
        lambda m: completion_logps(m, batch),
        lambda m: shared_prefix_logps(
            m, PROMPTS, ROWS, batch.completion_ids, batch.completion_mask, tok.pad_token_id
        ),
    ):
        want = _values_and_grads(plain, lambda fn=fn: fn(plain))
        _assert_same(want, _values_and_grads(ckpt, lambda fn=fn: fn(ckpt)))
    g = torch.Generator().manual_seed(0)
    long = build_batch(
        torch.randint(3, 60, (8, 32), generator=g).tolist(),
        torch.randint(3, 60, (8, 224), generator=g).tolist(),
        tok.pad_token_id,
    )
    # activation memory: the bytes autograd saves for backward (distinct storages); an RSS
    # peak cannot see it here, the allocator reuses the warm-up's freed blocks
    saved = {}
    for name, m in (("plain", plain), ("ckpt", ckpt)):
        m.zero_grad(set_to_none=True)
        saved[name] = _saved_mb(lambda m=m: completion_logps(m, long).sum())
    assert saved["ckpt"] < 0.7 * saved["plain"], saved


def _saved_mb(fn) -> float:  # noqa: ANN001
    """MiB of the distinct storages autograd saves for the backward of `fn()` (run after)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.backward()
    return sum(storages.values()) / 2**20


COMMON = {
    "task": {"name": "arithmetic", "digits": 1, "n_train": 64, "n_test": 4},
    "sampling": {"max_new_tokens": 3},
    "eval": {"n": 2},
    "logging": {"progress": False, "samples_every": 0, "tensorboard": False},
}


def _recipe(tmp_path: Path, name: str, spec: dict) -> object:
    data = {"name": name, "output_dir": str(tmp_path), **COMMON, **spec}
    return recipe_from_dict(data, "test")


@pytest.mark.parametrize("trainer", ["sft", "online_rl"])
def test_trainers_log_the_same_numbers_with_gradient_checkpointing(tmp_path, trainer):
    spec: dict = {
        "trainer": trainer,
        "model": {"name_or_path": "tiny", "attn_implementation": "eager"},
        "train": {"steps": 2, "lr": 5e-3, "batch_size": 2},
    }
    if trainer == "online_rl":
        spec["rl"] = {"algorithm": "grpo", "group_size": 4, "kl_coef": 0.1}
        spec["rewards"] = [{"type": "function", "fn": "test_lora:parity"}]
    rows = {}
    for gc_on in (False, True):
        spec["train"]["gradient_checkpointing"] = gc_on
        r = _recipe(tmp_path, f"run-{gc_on}", spec)
        t = trainer_class(r.trainer)(r)
        assert logprobs_mod.gradient_checkpointing_active(t.model.train()) is gc_on
        t.train()
        rows[gc_on] = read_metrics(tmp_path / f"run-{gc_on}")
    for a, b in zip(rows[False], rows[True], strict=True):
        for key in ("loss", "grad_norm", "kl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), key


def test_half_precision_weights_train_fp32_master_weights(tmp_path, capsys):
    """AdamW on bfloat16 weights at lr 1e-4 loses most updates (about 40% of the weights
    changed after 2 steps); `model.dtype: bfloat16` now trains fp32 weights under bf16
    autocast, says so, and every weight that gets a gradient changes."""
    from rich.console import Console

    spec = {
        "trainer": "sft",
        "model": {"name_or_path": "tiny", "dtype": "bfloat16"},
        "train": {"steps": 2, "lr": 1e-4, "batch_size": 8, "weight_decay": 0.0},
    }
    recipe = _recipe(tmp_path, "bf16", spec)
    console = Console(stderr=True, width=400)
    t = trainer_class(recipe.trainer)(recipe, console=console)
    assert "fp32 master weights" in capsys.readouterr().err
    assert next(t.model.parameters()).dtype == torch.float32
    assert t.autocast_dtype == torch.bfloat16
    layers = {n: p.detach().clone() for n, p in t.model.named_parameters() if ".layers." in n}
    t.train()
    now = dict(t.model.named_parameters())
    changed = sum(int((now[n].detach() != p).sum()) for n, p in layers.items())
    total = sum(p.numel() for p in layers.values())
    assert changed / total > 0.99, changed / total  # the old bf16 weights: 0.87


def test_small_logits_take_the_plain_forward(tiny):
    """The chunked head (recomputed in backward) only where the logits would be large: a
    small batch runs the whole model, with the numerics of a plain forward."""
    model, tok = tiny
    limit = logprobs_mod.LOGIT_CHUNK_ELEMENTS
    assert logprobs_mod.chunked_head(model, limit // len(tok)) is None
    assert logprobs_mod.chunked_head(model, limit // len(tok) + 1) is not None
    batch = _batch(tok.pad_token_id)
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    ).logits
    t = batch.completion_ids.shape[1]
    want = (
        torch.log_softmax(out[:, -(t + 1) : -1].float(), -1)
        .gather(-1, batch.completion_ids[..., None])
        .squeeze(-1)
        * batch.completion_mask
    )
    got = completion_logps(model, batch)
    assert torch.allclose(got, want, atol=1e-6)
