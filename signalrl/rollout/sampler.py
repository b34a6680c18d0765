"""Batched generation for any Hugging Face causal LM, with a KV cache and prefix sharing.

`generate(model, prompts, params)` encodes each distinct prompt once (left-padded prefill),
then copies its KV cache to the `n` samples of its group (`DynamicCache.batch_repeat_interleave`)
and decodes all rows together, one token per step. Rows that finish (EOS or a stop string) are
removed from the batch and the cache, so they stop costing compute.

Returned per-token log-probs are those of the sampled tokens under `softmax(logits / T)` with
the sampling temperature `T` (top-k/top-p truncation is not reflected: it is the distribution
an RL loss differentiates), and per-token entropies are those of the same distribution
(`signalrl.losses.policy.entropy_from_logits`). Greedy decoding reports both at `T = 1`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from signalrl.losses.policy import entropy_from_logits
from signalrl.models.logprobs import cache_forward_kwargs
from signalrl.rollout import noise


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    n: int = 1
    stop_strings: Sequence[str] = ()
    share_prefix: bool = True  # False encodes each of the n copies of a prompt separately

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.n < 1:
            raise ValueError("n (samples per prompt) must be >= 1")
        if not self.greedy and self.temperature <= 0:
            raise ValueError("temperature must be > 0 (use greedy=True for argmax decoding)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")


@dataclass
class Rollout:
    """Completions for `P` prompts x `n` samples, rows grouped contiguously by prompt.

    `prompt_ids[i]` are the token ids of row i's prompt; `completion_ids` is `(N, T)` padded with
    `pad_token_id`; `completion_mask` is 1.0 on generated tokens (EOS included); `logps` are
    float32 log-probs of the sampled tokens (0 on padding); `entropy` the entropy of the
    distribution each token was sampled from (softmax(logits / T), 0 on padding);
    `truncated[i]` is True when row i hit `max_new_tokens` without EOS or a stop string.
    """

    prompt_ids: list[list[int]]
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logps: torch.Tensor
    entropy: torch.Tensor
    truncated: torch.Tensor
    texts: list[str]
    group_size: int
    prompt_index: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """Tokenise prompt strings without special tokens (templates are the caller's business),
    then put the BOS in front once where the tokenizer adds one (Llama, Mistral, Gemma) and
    the text does not already start with it (`signalrl.data.chat.encode_prompt`)."""
    from signalrl.data.chat import encode_prompt

    ids = encode_prompt(tokenizer, prompts)
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompt {i} is empty after tokenisation: {prompts[i]!r}")
    return ids


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    keys: torch.Tensor | None = None,
) -> Rollout:
    """Sample `params.n` completions for each prompt (strings or token-id lists).

    With `keys` (`(P,)` int64, one per prompt: `signalrl.rollout.noise.prompt_keys`) the
    noise is counter-based (Gumbel-max): a prompt's samples depend only on its key, not on
    the rest of the batch, the rank or a resume. Without, tokens are drawn with
    `torch.multinomial` from `generator` (or torch's global generator).

    Runs under `torch.inference_mode`; the returned tensors are ordinary tensors, usable in
    autograd by the caller.
    """
    rows = None
    if keys is not None and not params.greedy:
        if keys.shape != (len(prompts),):
            raise ValueError(f"generate: {len(prompts)} prompts but keys of shape {keys.shape}")
        rows = noise.row_keys(keys.long(), params.n)
    r = _generate(model, tokenizer, prompts, params, generator, autocast_dtype, rows)
    for name in (
        "completion_ids",
        "completion_mask",
        "logps",
        "entropy",
        "truncated",
        "prompt_index",
    ):
        setattr(r, name, getattr(r, name).clone())
    return r


@torch.inference_mode()
def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    params: SamplingParams,
    generator: torch.Generator | None,
    autocast_dtype: torch.dtype | None,
    rows: torch.Tensor | None = None,
) -> Rollout:
    if len(prompts) == 0:
        raise ValueError("generate: no prompts")
    if isinstance(prompts[0], str):
        prompt_ids = encode_prompts(tokenizer, prompts)  # type: ignore[arg-type]
    else:
        prompt_ids = [list(p) for p in prompts]  # type: ignore[arg-type]
    if not params.share_prefix and params.n > 1:
        return _generate_unshared(
            model, tokenizer, prompt_ids, params, generator, autocast_dtype, rows
        )
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stop = _StopCheck.build(model, tokenizer, params, device)
    input_ids, attn, positions = _left_pad(prompt_ids, pad_id, device)
    out = _Outputs.empty(len(prompt_ids) * params.n, params.max_new_tokens, pad_id, device)
    if rows is not None:
        out.keys = rows.to(device)
        out.vocab_hash = noise.hash32(torch.arange(_vocab_size(model), device=device))
    was_training = model.training
    model.eval()
    try:
        with _autocast(device, autocast_dtype):
            _decode(model, params, generator, stop, out, input_ids, attn, positions)
    finally:
        if was_training:
            model.train()
    return _assemble(tokenizer, prompt_ids, params.n, out, stop.eos, pad_id)


def _generate_unshared(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    params: SamplingParams,
    generator: torch.Generator | None,
    autocast_dtype: torch.dtype | None,
    rows: torch.Tensor | None,
) -> Rollout:
    """The reference path without prefix sharing: every row encodes its own prompt (with
    counter-based noise, each row keeps its sample's key: the same tokens as shared)."""
    g = params.n
    r = _generate(
        model,
        tokenizer,
        [p for p in prompt_ids for _ in range(g)],
        replace(params, n=1),
        generator,
        autocast_dtype,
        rows,
    )
    r.group_size = g
    r.prompt_index = torch.arange(len(prompt_ids), device=r.completion_ids.device)
    r.prompt_index = r.prompt_index.repeat_interleave(g)
    return r


def _left_pad(
    prompt_ids: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded `(P, L)` input ids, attention mask and position ids of the prompts."""
    plen = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), plen), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((len(prompt_ids), plen), dtype=torch.long, device=device)
    for i, p in enumerate(prompt_ids):
        input_ids[i, plen - len(p) :] = torch.tensor(p, dtype=torch.long)
        attn[i, plen - len(p) :] = 1
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attn, positions


def _autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to `dtype`, or autocast explicitly disabled when `dtype` is None."""
    if dtype is not None:
        return torch.autocast(device_type=device.type, dtype=dtype)
    return torch.autocast(device_type=device.type, enabled=False)


@dataclass
class _Outputs:
    """Per-row results, `(N, max_new_tokens)` over all `N` rows, filled one step at a time."""

    tokens: torch.Tensor
    logps: torch.Tensor
    entropy: torch.Tensor
    lengths: torch.Tensor
    finished_by_stop: torch.Tensor
    keys: torch.Tensor | None = None  # (N,) counter-based noise keys, one per row
    vocab_hash: torch.Tensor | None = None

    @classmethod
    def empty(cls, n_rows: int, max_new: int, pad_id: int, device: torch.device) -> _Outputs:
        return cls(
            tokens=torch.full((n_rows, max_new), pad_id, dtype=torch.long, device=device),
            logps=torch.zeros((n_rows, max_new), dtype=torch.float32, device=device),
            entropy=torch.zeros((n_rows, max_new), dtype=torch.float32, device=device),
            lengths=torch.zeros(n_rows, dtype=torch.long, device=device),
            finished_by_stop=torch.zeros(n_rows, dtype=torch.bool, device=device),
        )


@dataclass
class _StopCheck:
    """Which rows finish at a step: an EOS id was sampled or the text ends in a stop string."""

    tokenizer: PreTrainedTokenizerBase
    eos: torch.Tensor  # the sorted EOS ids
    stop_strings: list[str]
    window: int  # tokens decoded to look for a stop string: the longest one's length

    @classmethod
    def build(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        params: SamplingParams,
        device: torch.device,
    ) -> _StopCheck:
        eos = torch.tensor(sorted(_eos_ids(model, tokenizer)), dtype=torch.long, device=device)
        stop_strings = [s for s in params.stop_strings if s]
        window = max((len(s) for s in stop_strings), default=0)
        return cls(tokenizer, eos, stop_strings, window)

    def __call__(
        self, tok: torch.Tensor, active: torch.Tensor, t: int, out: _Outputs
    ) -> torch.Tensor:
        """Finished flags of the batch rows that sampled `tok` at step `t`; rows that end in a
        stop string are also marked in `out.finished_by_stop`."""
        if len(self.eos):
            done = torch.isin(tok, self.eos)
        else:
            done = torch.zeros_like(tok, dtype=torch.bool)
        if self.stop_strings:
            for j in (~done).nonzero().flatten().tolist():
                row = int(active[j])
                lo = max(0, t + 1 - self.window)
                tail = self.tokenizer.decode(out.tokens[row, lo : t + 1].tolist())
                if any(tail.endswith(s) or s in tail[-(len(s) + 8) :] for s in self.stop_strings):
                    done[j] = True
                    out.finished_by_stop[row] = True
        return done


def _prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attn: torch.Tensor,
    positions: torch.Tensor,
) -> tuple[DynamicCache, str, torch.Tensor]:
    """Encode the prompts into a fresh KV cache; returns the cache, the name of the model's
    cache argument and the float32 logits `(P, V)` of the last prompt position."""
    cache = DynamicCache(config=model.config)
    cache_kw, keep_kw = cache_forward_kwargs(model)  # the cache is updated in place
    out = model(
        input_ids=input_ids,
        attention_mask=attn,
        position_ids=positions,
        use_cache=True,
        **{cache_kw: cache},
        **keep_kw,
    )
    return cache, cache_kw, out.logits[:, -1, :].float()


def _sample_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    out: _Outputs,
    active: torch.Tensor,
    t: int,
) -> torch.Tensor:
    """Sample (or take the argmax of) one token per batch row from `logits` `(B, V)`, and
    record it with its log-prob and the entropy of its distribution at step `t`."""
    if params.greedy:  # log-probs and entropy at T = 1
        scaled = logits
        tok = logits.argmax(-1)
        logp_all = torch.log_softmax(logits, dim=-1)
    else:
        scaled = logits / params.temperature
        logp_all = torch.log_softmax(scaled, dim=-1)
        filtered = _filter_logits(scaled, params.top_k, params.top_p)
        if out.keys is not None:  # Gumbel-max with counter-based noise
            assert out.vocab_hash is not None
            g = noise.gumbel(out.keys[active], t, filtered.shape[-1], out.vocab_hash)
            tok = (filtered + g).argmax(-1)
        else:
            probs = torch.softmax(filtered, dim=-1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    out.tokens[active, t] = tok
    out.logps[active, t] = logp_all.gather(-1, tok[:, None]).squeeze(-1)
    out.entropy[active, t] = entropy_from_logits(scaled)
    out.lengths[active] = t + 1
    return tok


def _decode(
    model: PreTrainedModel,
    params: SamplingParams,
    generator: torch.Generator | None,
    stop: _StopCheck,
    out: _Outputs,
    input_ids: torch.Tensor,
    attn: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Prefill the distinct prompts, copy their cache to the `n` rows of each group, then
    decode one token per step for all unfinished rows, dropping finished rows from the batch
    and the cache. Fills `out`."""
    g, max_new = params.n, params.max_new_tokens
    cache, cache_kw, logits = _prefill(model, input_ids, attn, positions)
    if g > 1:  # prefix sharing: the prompt was encoded once, its cache is copied
        cache.batch_repeat_interleave(g)
        logits = logits.repeat_interleave(g, dim=0)
        attn = attn.repeat_interleave(g, dim=0)
        positions = positions.repeat_interleave(g, dim=0)
    next_pos = positions[:, -1] + 1
    active = torch.arange(out.tokens.shape[0], device=out.tokens.device)  # row of each batch row
    for t in range(max_new):
        tok = _sample_token(logits, params, generator, out, active, t)
        done = stop(tok, active, t, out)
        if t == max_new - 1:
            break
        keep = ~done
        if not bool(keep.any()):
            break
        if not bool(keep.all()):  # drop finished rows from the batch and the cache
            idx = keep.nonzero().flatten()
            cache.batch_select_indices(idx)
            active, tok, attn, next_pos = active[idx], tok[idx], attn[idx], next_pos[idx]
        attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
        step = model(
            input_ids=tok[:, None],
            attention_mask=attn,
            position_ids=next_pos[:, None],
            use_cache=True,
            **{cache_kw: cache},
        )
        logits = step.logits[:, -1, :].float()
        next_pos = next_pos + 1


def _assemble(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    g: int,
    out: _Outputs,
    eos: torch.Tensor,
    pad_id: int,
) -> Rollout:
    """The `Rollout` of the filled buffers: trimmed to the longest completion, padded and
    masked after each row's last token, decoded to text."""
    lengths = out.lengths
    n_rows = lengths.shape[0]
    device = lengths.device
    width = int(lengths.max().item())
    completion_ids = out.tokens[:, :width].clone()
    steps = torch.arange(width, device=device)[None, :]
    mask = (steps < lengths[:, None]).float()
    completion_ids[mask == 0] = pad_id
    logps = out.logps[:, :width] * mask
    entropy = out.entropy[:, :width] * mask
    last_tok = completion_ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    ended = torch.isin(last_tok, eos) | out.finished_by_stop
    truncated = ~ended
    texts = tokenizer.batch_decode(
        [completion_ids[i, : lengths[i]].tolist() for i in range(n_rows)], skip_special_tokens=True
    )
    return Rollout(
        prompt_ids=[p for p in prompt_ids for _ in range(g)],
        completion_ids=completion_ids,
        completion_mask=mask,
        logps=logps,
        entropy=entropy,
        truncated=truncated,
        texts=texts,
        group_size=g,
        prompt_index=torch.arange(len(prompt_ids), device=device).repeat_interleave(g),
    )


def _vocab_size(model: PreTrainedModel) -> int:
    """Entries of the logits' last dimension (the LM head's rows)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (gen_eos, tokenizer.eos_token_id):
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return ids
