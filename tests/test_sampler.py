from __future__ import annotations

import math

import pytest
import torch

from signalrl.data.collate import build_batch
from signalrl.models.logprobs import completion_logps
from signalrl.rollout.sampler import SamplingParams, generate


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z=3.09: p = 0.001)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2_stat(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    n = counts.sum().item()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = (((obs - exp) ** 2)[keep] / exp[keep]).sum().item()
    return stat, int(keep.sum().item()) - 1


def test_greedy_matches_hf_generate(tiny):
    model, tok = tiny
    prompts = ["12+34=", "7+8=", "99+99=", "1="]
    r = generate(model, tok, prompts, SamplingParams(max_new_tokens=12, greedy=True))
    for i, p in enumerate(prompts):
        ids = torch.tensor([tok(p, add_special_tokens=False).input_ids])
        ref = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )[0, ids.shape[1] :].tolist()
        got = r.completion_ids[i, : int(r.lengths[i])].tolist()
        assert got == ref


def test_greedy_with_early_stops_matches_hf_generate(tiny):
    """Extra EOS ids make rows finish at different steps; dropping finished rows from the
    batch and the KV cache must not change what the remaining rows generate."""
    model, tok = tiny
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("3"), tok.convert_tokens_to_ids("=")]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        prompts = ["3+3=", "45+1=", "3", "88+2=", "33", "x", "12+34="]
        r = generate(model, tok, prompts, SamplingParams(max_new_tokens=10, greedy=True))
        for i, p in enumerate(prompts):
            ids = torch.tensor([tok(p, add_special_tokens=False).input_ids])
            ref = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=10,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=eos,
            )[0, ids.shape[1] :].tolist()
            while len(ref) > 1 and ref[-1] == tok.pad_token_id:  # HF pads finished rows
                ref.pop()
            assert r.completion_ids[i, : int(r.lengths[i])].tolist() == ref
            assert bool(r.truncated[i]) == (ref[-1] not in eos)
        assert len(set(r.lengths.tolist())) > 1, "test needs rows of different lengths"
    finally:
        model.generation_config.eos_token_id = saved


def test_logps_match_a_full_forward(tiny):
    model, tok = tiny
    gen = torch.Generator().manual_seed(1)
    r = generate(
        model, tok, ["12+34=", "5+5="], SamplingParams(max_new_tokens=8, n=4), generator=gen
    )
    batch = build_batch(r.prompt_ids, r.completion_ids, tok.pad_token_id, r.completion_mask)
    with torch.no_grad():
        lp = completion_logps(model, batch)
    torch.testing.assert_close(lp, r.logps, atol=1e-5, rtol=0)
    assert r.completion_ids.shape == r.completion_mask.shape == r.logps.shape
    assert (r.logps[r.completion_mask == 0] == 0).all()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.6)])
def test_sampled_frequencies_match_softmax(tiny, temperature, top_k, top_p):
    model, tok = tiny
    prompt = "12+34="
    n = 6000
    gen = torch.Generator().manual_seed(123)
    r = generate(
        model,
        tok,
        [prompt],
        SamplingParams(max_new_tokens=1, n=n, temperature=temperature, top_k=top_k, top_p=top_p),
        generator=gen,
    )
    ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, -1] / temperature
    probs = torch.softmax(logits, -1)
    if top_k:
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if top_p < 1:
        sp, idx = torch.sort(probs, descending=True)
        drop = sp.cumsum(0) - sp >= top_p
        probs = torch.zeros_like(probs).scatter(0, idx, sp.masked_fill(drop, 0.0))
    probs = probs / probs.sum()
    counts = torch.bincount(r.completion_ids[:, 0], minlength=probs.numel()).float()
    assert counts[probs == 0].sum() == 0, "sampled a token outside top-k/top-p"
    stat, df = chi2_stat(counts, probs)
    assert df >= 2
    assert stat < chi2_critical(df), (stat, df)
    # and the reported log-probs are those of softmax(logits / T)
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(r.logps[:, 0], logp[r.completion_ids[:, 0]], atol=1e-5, rtol=0)


def test_prefix_sharing_gives_the_same_samples_and_distribution(tiny):
    model, tok = tiny
    prompts = ["12+34=", "7*8="]
    params = SamplingParams(max_new_tokens=6, n=300, temperature=1.0)
    shared = generate(model, tok, prompts, params, generator=torch.Generator().manual_seed(5))
    unshared = generate(
        model,
        tok,
        prompts,
        SamplingParams(**{**params.__dict__, "share_prefix": False}),
        generator=torch.Generator().manual_seed(5),
    )
    # same RNG stream and (numerically) the same logits: the very same samples
    same = (shared.completion_ids == unshared.completion_ids).all(-1).float().mean().item()
    assert same > 0.99
    torch.testing.assert_close(shared.logps, unshared.logps, atol=1e-4, rtol=0)
    # and a distributional check with independent seeds on the first token of prompt 0
    a = generate(
        model,
        tok,
        prompts[:1],
        SamplingParams(max_new_tokens=1, n=4000),
        generator=torch.Generator().manual_seed(7),
    )
    b = generate(
        model,
        tok,
        prompts[:1],
        SamplingParams(max_new_tokens=1, n=4000, share_prefix=False),
        generator=torch.Generator().manual_seed(8),
    )
    v = len(tok)
    ca = torch.bincount(a.completion_ids[:, 0], minlength=v).float()
    cb = torch.bincount(b.completion_ids[:, 0], minlength=v).float()
    pooled = (ca + cb) / (ca.sum() + cb.sum())
    stat, df = chi2_stat(ca, pooled)
    assert stat < chi2_critical(df)


def test_stop_strings_and_truncation(tiny):
    model, tok = tiny
    gen = torch.Generator().manual_seed(0)
    free = generate(model, tok, ["ab"], SamplingParams(max_new_tokens=20, n=16), generator=gen)
    # pick a 2-character string that the free run produced, and stop on it
    text = free.texts[0]
    stop = text[3:5] if len(text) >= 5 else text[:1]
    gen = torch.Generator().manual_seed(0)
    r = generate(
        model,
        tok,
        ["ab"],
        SamplingParams(max_new_tokens=20, n=16, stop_strings=[stop]),
        generator=gen,
    )
    assert stop in r.texts[0]
    assert r.texts[0].endswith(stop) or r.texts[0].index(stop) + len(stop) >= len(r.texts[0]) - 1
    assert not bool(r.truncated[0])
    assert int(r.lengths[0]) <= int(free.lengths[0])
    long = generate(model, tok, ["ab"], SamplingParams(max_new_tokens=3, greedy=True))
    assert int(long.lengths[0]) <= 3


def test_bad_params():
    with pytest.raises(ValueError):
        SamplingParams(temperature=0.0)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingParams(n=0)


def test_shared_prefix_logps_match_values_and_gradients(tiny):
    from signalrl.models.logprobs import shared_prefix_logps

    model, tok = tiny
    prompts = ["12+34=", "7+8=", "99+99="]
    r = generate(
        model,
        tok,
        prompts,
        SamplingParams(max_new_tokens=5, n=3),
        generator=torch.Generator().manual_seed(2),
    )
    batch = build_batch(r.prompt_ids, r.completion_ids, tok.pad_token_id, r.completion_mask)
    rows = torch.tensor([0, 1, 2, 4, 7, 8])  # a subset, as when zero-advantage rows are skipped
    sub = batch.select(rows)
    weights = torch.randn(sub.completion_ids.shape, generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    ref = completion_logps(model, sub)
    (ref * weights).sum().backward()
    g_ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    distinct = [r.prompt_ids[0], r.prompt_ids[3], r.prompt_ids[6]]
    got = shared_prefix_logps(
        model, distinct, rows // 3, sub.completion_ids, sub.completion_mask, tok.pad_token_id
    )
    (got * weights).sum().backward()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    for a, b in zip(g_ref, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    model.zero_grad()


@pytest.mark.parametrize("temperature,greedy", [(1.0, False), (0.7, False), (1.0, True)])
def test_entropy_is_that_of_the_sampling_distribution(tiny, temperature, greedy):
    """`Rollout.entropy` is the entropy of softmax(logits / T) at every generated token (T = 1
    when greedy), as `entropy_from_logits` gives it on a full forward pass; 0 on padding."""
    from signalrl.losses.policy import entropy_from_logits

    model, tok = tiny
    params = SamplingParams(max_new_tokens=6, n=3, temperature=temperature, greedy=greedy)
    r = generate(model, tok, ["12+34=", "5+5="], params, generator=torch.Generator().manual_seed(4))
    for i in range(len(r)):
        n = int(r.lengths[i])
        ids = torch.tensor([r.prompt_ids[i] + r.completion_ids[i, :n].tolist()])
        start = len(r.prompt_ids[i]) - 1
        with torch.no_grad():
            logits = model(ids).logits[0, start : start + n].float()
        want = entropy_from_logits(logits / (1.0 if greedy else temperature))
        torch.testing.assert_close(r.entropy[i, :n], want, atol=1e-5, rtol=0)
    assert (r.entropy[r.completion_mask == 0] == 0).all()
