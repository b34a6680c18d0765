"""Batched generation for any Hugging Face causal LM, with a KV cache and prefix sharing.

`generate(model, prompts, params)` encodes each distinct prompt once (left-padded prefill),
then copies its KV cache to the `n` samples of its group (`DynamicCache.batch_repeat_interleave`)
and decodes all rows together, one token per step. Rows that finish (EOS or a stop string) are
removed from the batch and the cache, so they stop costing compute.

Returned per-token log-probs are those of the sampled tokens under `softmax(logits / T)` with
the sampling temperature `T` (top-k/top-p truncation is not reflected: it is the distribution
an RL loss differentiates). Greedy decoding reports log-probs at `T = 1`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from signalrl.models.logprobs import cache_forward_kwargs


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
    """Tokenise prompt strings without special tokens (templates are the caller's business)."""
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
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
) -> Rollout:
    """Sample `params.n` completions for each prompt (strings or token-id lists).

    Runs under `torch.inference_mode`; the returned tensors are ordinary tensors, usable in
    autograd by the caller.
    """
    r = _generate(model, tokenizer, prompts, params, generator, autocast_dtype)
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
) -> Rollout:
    if len(prompts) == 0:
        raise ValueError("generate: no prompts")
    if isinstance(prompts[0], str):
        prompt_ids = encode_prompts(tokenizer, prompts)  # type: ignore[arg-type]
    else:
        prompt_ids = [list(p) for p in prompts]  # type: ignore[arg-type]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_ids = _eos_ids(model, tokenizer)
    n_prompts, g = len(prompt_ids), params.n
    if not params.share_prefix and g > 1:  # reference path: every row encodes its own prompt
        r = _generate(
            model,
            tokenizer,
            [p for p in prompt_ids for _ in range(g)],
            replace(params, n=1),
            generator,
            autocast_dtype,
        )
        r.group_size = g
        r.prompt_index = torch.arange(n_prompts, device=r.completion_ids.device).repeat_interleave(
            g
        )
        return r
    n_rows = n_prompts * g
    max_new = params.max_new_tokens
    stop_strings = [s for s in params.stop_strings if s]
    stop_window = max((len(s) for s in stop_strings), default=0)

    # Left-padded prefill of the distinct prompts.
    plen = max(len(p) for p in prompt_ids)
    input_ids = torch.full((n_prompts, plen), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((n_prompts, plen), dtype=torch.long, device=device)
    for i, p in enumerate(prompt_ids):
        input_ids[i, plen - len(p) :] = torch.tensor(p, dtype=torch.long)
        attn[i, plen - len(p) :] = 1
    positions = (attn.cumsum(-1) - 1).clamp(min=0)

    was_training = model.training
    model.eval()
    ctx = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else torch.autocast(device_type=device.type, enabled=False)
    )
    out_tokens = torch.full((n_rows, max_new), pad_id, dtype=torch.long, device=device)
    out_logps = torch.zeros((n_rows, max_new), dtype=torch.float32, device=device)
    out_ent = torch.zeros((n_rows, max_new), dtype=torch.float32, device=device)
    lengths = torch.zeros(n_rows, dtype=torch.long, device=device)
    finished_by_stop = torch.zeros(n_rows, dtype=torch.bool, device=device)
    try:
        with ctx:
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
            logits = out.logits[:, -1, :].float()
            if g > 1:  # prefix sharing: the prompt was encoded once, its cache is copied
                cache.batch_repeat_interleave(g)
                logits = logits.repeat_interleave(g, dim=0)
                attn = attn.repeat_interleave(g, dim=0)
                positions = positions.repeat_interleave(g, dim=0)
            next_pos = positions[:, -1] + 1
            active = torch.arange(n_rows, device=device)  # original row index of each batch row
            eos_tensor = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)

            for t in range(max_new):
                if params.greedy:
                    tok = logits.argmax(-1)
                    logp_all = torch.log_softmax(logits, dim=-1)
                else:
                    scaled = logits / params.temperature
                    logp_all = torch.log_softmax(scaled, dim=-1)
                    filtered = _filter_logits(scaled, params.top_k, params.top_p)
                    probs = torch.softmax(filtered, dim=-1)
                    tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                out_tokens[active, t] = tok
                out_logps[active, t] = logp_all.gather(-1, tok[:, None]).squeeze(-1)
                out_ent[active, t] = -(logp_all.exp() * logp_all).sum(-1)
                lengths[active] = t + 1
                done = (
                    torch.isin(tok, eos_tensor)
                    if len(eos_ids)
                    else torch.zeros_like(tok, dtype=torch.bool)
                )
                if stop_strings:
                    for j in (~done).nonzero().flatten().tolist():
                        row = int(active[j])
                        lo = max(0, t + 1 - stop_window)
                        tail = tokenizer.decode(out_tokens[row, lo : t + 1].tolist())
                        if any(
                            tail.endswith(s) or s in tail[-(len(s) + 8) :] for s in stop_strings
                        ):
                            done[j] = True
                            finished_by_stop[row] = True
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
                out = model(
                    input_ids=tok[:, None],
                    attention_mask=attn,
                    position_ids=next_pos[:, None],
                    use_cache=True,
                    **{cache_kw: cache},
                )
                logits = out.logits[:, -1, :].float()
                next_pos = next_pos + 1
    finally:
        if was_training:
            model.train()

    width = int(lengths.max().item()) if n_rows else 0
    completion_ids = out_tokens[:, :width].clone()
    steps = torch.arange(width, device=device)[None, :]
    mask = (steps < lengths[:, None]).float()
    completion_ids[mask == 0] = pad_id
    logps = out_logps[:, :width] * mask
    entropy = out_ent[:, :width] * mask
    last_tok = completion_ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    ended = torch.isin(last_tok, eos_tensor) | finished_by_stop
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
        prompt_index=torch.arange(n_prompts, device=device).repeat_interleave(g),
    )


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (gen_eos, tokenizer.eos_token_id):
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return ids
