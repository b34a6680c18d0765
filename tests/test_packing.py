"""Padding-free (packed) forwards give the padded forward's log-probs, entropies and
gradients, and the trainers that use them train the same numbers (issue 17)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from signalrl.config import recipe_from_dict
from signalrl.data.collate import build_batch
from signalrl.logging import read_metrics
from signalrl.models import build_preset_model
from signalrl.models import packing as packing_mod
from signalrl.models.logprobs import completion_logps, completion_logps_entropy
from signalrl.models.packing import first_fit_decreasing, pack_batch, packing_supported
from signalrl.trainers import run_recipe


def _ragged(vocab: int, n: int = 7, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))] for _ in range(n)]
    comps = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))] for _ in range(n)]
    return prompts, comps


def test_first_fit_decreasing_bins_every_item_once_within_capacity():
    lengths = [9, 2, 7, 3, 3, 5, 1, 8]
    bins = first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 38 tokens in bins of 10: the fewest possible
    with pytest.raises(ValueError, match="over the bin"):
        first_fit_decreasing([11], 10)


def test_pack_batch_layout(tiny):
    model, tok = tiny
    prompts, comps = _ragged(model.config.vocab_size)
    batch = build_batch(prompts, comps, tok.pad_token_id)
    packed = pack_batch(batch)
    assert packed is not None and packed.input_ids.shape[0] < len(prompts)
    assert packed.input_ids.shape[1] == batch.input_ids.shape[1]
    # every sequence's tokens appear once, in order, with positions 0..L-1
    flat_ids, flat_pos = packed.input_ids.reshape(-1), packed.position_ids.reshape(-1)
    starts = (flat_pos == 0).nonzero().flatten().tolist()
    found = 0
    for p, c in zip(prompts, comps, strict=True):
        seq = torch.tensor(p + c)
        hits = [
            s
            for s in starts
            if torch.equal(flat_ids[s : s + len(seq)], seq)
            and torch.equal(flat_pos[s : s + len(seq)], torch.arange(len(seq)))
        ]
        found += bool(hits)
    assert found == len(prompts)
    # the predicting state of each completion token is the token before it
    assert packed.targets.numel() == sum(len(c) for c in comps)
    before = flat_ids[packed.predict_at + 1]
    assert torch.equal(before, packed.targets)


def test_pack_batch_declines_when_it_saves_nothing_or_rows_have_holes(tiny):
    model, tok = tiny
    same = build_batch([[5, 6, 7]] * 4, [[8, 9]] * 4, tok.pad_token_id)
    assert pack_batch(same) is None  # no padding to remove
    prompts, comps = _ragged(model.config.vocab_size)
    batch = build_batch(prompts, comps, tok.pad_token_id)
    row = int(batch.attention_mask.sum(-1).argmax())
    cols = batch.attention_mask[row].nonzero().flatten()
    batch.attention_mask[row, cols[len(cols) // 2]] = 0  # a hole inside a row
    assert pack_batch(batch) is None


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_logps_entropy_and_gradients_equal_padded(tiny, arch, attn):
    _, tok = tiny
    model = build_preset_model("tiny", tok, architecture=arch, attn_implementation=attn)
    prompts, comps = _ragged(model.config.vocab_size, n=9, seed=1)
    rng = random.Random(2)  # weights 0 inside completions (multi-turn context tokens)
    masks = [[float(rng.random() > 0.3) for _ in c] for c in comps]
    batch = build_batch(prompts, comps, tok.pad_token_id, masks=masks)
    assert pack_batch(batch) is not None
    assert packing_supported(model)

    def run(padding_free: bool):
        model.zero_grad()
        lp, ent = completion_logps_entropy(model, batch, padding_free=padding_free)
        ((lp * batch.completion_mask).sum() + 0.1 * ent.sum()).backward()
        return lp.detach(), ent.detach(), [p.grad.clone() for p in model.parameters()]

    lp0, ent0, g0 = run(False)
    lp1, ent1, g1 = run(True)
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent1, ent0, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert float(lp0.abs().sum()) > 0


def test_bf16_autocast_packed_close_to_padded(tiny):
    model, tok = tiny
    prompts, comps = _ragged(model.config.vocab_size, seed=3)
    batch = build_batch(prompts, comps, tok.pad_token_id)
    with torch.no_grad():
        a = completion_logps(model, batch, autocast_dtype=torch.bfloat16)
        b = completion_logps(model, batch, autocast_dtype=torch.bfloat16, padding_free=True)
    assert float((a - b).abs().max()) < 0.05  # bf16 rounding, not another sequence's tokens


def test_packing_check_fails_when_attention_ignores_restarts(tiny, monkeypatch):
    """An architecture that does not read position-id restarts as sequence boundaries would
    let packed sequences attend to each other: the check catches it (here transformers'
    detection is switched off) and the trainer falls back to padded forwards."""
    import transformers.masking_utils as mu

    _, tok = tiny
    model = build_preset_model("tiny", tok, attn_implementation="sdpa")
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    assert not packing_supported(model)
    prompts, comps = _ragged(model.config.vocab_size)
    batch = build_batch(prompts, comps, tok.pad_token_id)
    with torch.no_grad():  # what packing without the check would have computed: wrong
        wrong = completion_logps(model, batch, padding_free=True)
        right = completion_logps(model, batch)
    assert float((wrong - right).abs().max()) > 1e-3
    assert not packing_mod.padding_free(model, True)
    assert not packing_mod.padding_free(model, False)


def _ragged_file(path, n: int = 48, pairs: bool = False):
    rng = random.Random(0)
    alphabet = "0123456789+="
    with open(path, "w") as f:
        for _ in range(n):
            prompt = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 10))) + "="
            a = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14)))
            if pairs:
                b = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14)))
                f.write(json.dumps({"prompt": prompt, "chosen": a, "rejected": b}) + "\n")
            else:
                f.write(json.dumps({"prompt": prompt, "completion": a}) + "\n")


def _run(tmp_path, name: str, trainer: str, data: str, padding_free: bool, spy: list[int]):
    extra = {"preference": {"loss_type": "sigmoid", "beta": 0.1}} if trainer == "preference" else {}
    recipe = recipe_from_dict(
        {
            "name": name,
            "output_dir": str(tmp_path),
            "trainer": trainer,
            "model": {"name_or_path": "tiny"},
            "task": {"name": "arithmetic", "digits": 1, "n_train": 8, "n_test": 4},
            "data": {"path": data, "test_fraction": 0.25},
            "train": {
                "steps": 4,
                "lr": 2e-3,
                "batch_size": 12,
                "micro_batch_size": 6,
                "padding_free": padding_free,
            },
            "sampling": {"max_new_tokens": 3},
            "eval": {"every": 0, "n": 4},
            "logging": {"progress": False, "samples_every": 0},
            "checkpoint": {"every": 0},
            **extra,
        },
        "test",
    )
    before = len(spy)
    out = run_recipe(recipe)
    return read_metrics(tmp_path / name), out, len(spy) - before


@pytest.mark.parametrize("trainer", ["sft", "preference"])
def test_trainer_padding_free_trains_the_same_numbers(tmp_path, monkeypatch, trainer):
    data = tmp_path / "data.jsonl"
    _ragged_file(data, pairs=trainer == "preference")
    packs: list[int] = []
    real = packing_mod.pack_batch

    def spy(batch, *a, **kw):
        out = real(batch, *a, **kw)
        if out is not None:
            packs.append(out.input_ids.shape[0])
        return out

    import signalrl.models.logprobs as lp_mod

    monkeypatch.setattr(lp_mod, "pack_batch", spy)
    plain, out0, n0 = _run(tmp_path, "plain", trainer, str(data), False, packs)
    packed, out1, n1 = _run(tmp_path, "packed", trainer, str(data), True, packs)
    assert n0 == 0 and n1 > 0  # the packed run really packed its forwards
    assert len(plain) == len(packed) == 4
    for a, b in zip(plain, packed, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * max(1.0, a["grad_norm"])
    key = "eval_loss" if trainer == "sft" else "eval/loss"  # held-out, also packed
    assert abs(out0[key] - out1[key]) < 1e-4
    # the same tokens counted (real ones, not the packed rows' slots)
    assert plain[-1]["student/forward_tokens"] == packed[-1]["student/forward_tokens"]


def test_trainer_optimizer_is_not_fused(tmp_path):
    """Regression: torch's fused CPU AdamW (tried for issue 17) changed a 300-step bf16-autocast
    SFT run (recipes/doctor-sft.yaml: loss 0.61 -> 0.89, greedy accuracy 0.26 -> 0.08) though
    it matched the per-tensor loop over 3 fp32 steps; the trainers use the plain AdamW."""
    from signalrl.trainers.sft import SFTTrainer

    data = tmp_path / "data.jsonl"
    _ragged_file(data)
    recipe = recipe_from_dict(
        {
            "name": "f",
            "output_dir": str(tmp_path),
            "trainer": "sft",
            "model": {"name_or_path": "tiny"},
            "task": {"name": "arithmetic", "digits": 1, "n_train": 8, "n_test": 4},
            "data": {"path": str(data)},
            "train": {"steps": 1},
            "logging": {"progress": False},
            "checkpoint": {"every": 0},
        },
        "test",
    )
    trainer = SFTTrainer(recipe)
    assert not any(g.get("fused") for g in trainer.optimizer.param_groups)


def test_build_batch_vectorized_equals_the_row_loop():
    """`build_batch` builds its tensors from padded lists in one call each (it runs every
    step); the layout is the per-row loop's: prompts left-padded, completions right-padded."""
    rng = random.Random(0)
    for trial in range(40):
        n = rng.randint(1, 9)
        prompts = [[rng.randrange(5, 50) for _ in range(rng.randint(1, 12))] for _ in range(n)]
        comps = [[rng.randrange(5, 50) for _ in range(rng.randint(0, 6))] for _ in range(n)]
        masks = [[rng.random() for _ in c] for c in comps] if trial % 2 else None
        b = build_batch(prompts, comps, 3, masks=masks)
        p, t = max(map(len, prompts)), max(max(map(len, comps)), 1)
        assert b.input_ids.shape == (n, p + t) and b.prompt_width == p
        for i, (x, c) in enumerate(zip(prompts, comps, strict=True)):
            row = [3] * (p - len(x)) + x + c + [3] * (t - len(c))
            attn = [0] * (p - len(x)) + [1] * (len(x) + len(c)) + [0] * (t - len(c))
            w = masks[i] if masks else [1.0] * len(c)
            assert b.input_ids[i].tolist() == row
            assert b.attention_mask[i].tolist() == attn
            assert b.position_ids[i].tolist() == [
                max(k, 0) for k in (torch.tensor(attn).cumsum(0) - 1).tolist()
            ]
            assert b.completion_mask[i].tolist() == pytest.approx(w + [0.0] * (t - len(c)))
        assert b.input_ids.dtype == torch.long and b.attention_mask.dtype == torch.long
        assert b.completion_mask.dtype == torch.float32


def test_packed_forward_chunks_the_head_by_slots_not_targets(tiny, monkeypatch):
    """Regression: the packed path chose the whole-model forward (every packed slot through the
    LM head) from the number of *targets*; with a real vocabulary a few targets in long rows
    then materialised the full `(rows, width, V)` logits. The slots decide now, so the head
    only sees the states that predict completion tokens."""
    import signalrl.models.logprobs as lp_mod

    model, tok = tiny
    rng = random.Random(4)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 20))] for _ in range(10)]
    comps = [[rng.randrange(3, vocab)] for _ in range(10)]  # one target per row
    batch = build_batch(prompts, comps, tok.pad_token_id)
    packed = pack_batch(batch)
    assert packed is not None
    # between the targets' logits and the slots' logits
    limit = (packed.targets.numel() * vocab + packed.slots * vocab) // 2
    monkeypatch.setattr(lp_mod, "LOGIT_CHUNK_ELEMENTS", limit)
    seen: list[int] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[:-1].numel()))
    try:
        with torch.no_grad():
            got = completion_logps(model, batch, padding_free=True)
    finally:
        handle.remove()
    with torch.no_grad():
        want = completion_logps(model, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the head ran on the target states only (in chunks), never on every slot
    assert seen and sum(seen) == packed.targets.numel() < packed.slots
