"""One forward pass of a causal LM over prompt + completion, returning completion log-probs."""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers import PreTrainedModel

from signalrl.data.collate import SequenceBatch
from signalrl.losses.policy import token_logprobs


def autocast_context(device: torch.device, dtype: torch.dtype | None):  # noqa: ANN201
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _accepts(model: PreTrainedModel, name: str) -> bool:
    """Whether the model's forward takes `name` (a peft wrapper forwards its kwargs to the
    base model, so the base model's signature decides)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(inner.forward).parameters


def cache_forward_kwargs(model: PreTrainedModel) -> tuple[str, dict[str, int]]:
    """The name of the KV-cache argument (`cache` in transformers 5, else `past_key_values`)
    and `logits_to_keep=1` where the model accepts it: the keyword arguments of a cached
    forward pass that needs only the last position's logits."""
    cache_kw = "cache" if _accepts(model, "cache") else "past_key_values"
    return cache_kw, ({"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {})


def completion_logps(
    model: PreTrainedModel,
    batch: SequenceBatch,
    *,
    temperature: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-token log-probs `(N, T)` of the completion tokens (0 where the mask is 0). Only the
    `T + 1` last positions go through the LM head when the model supports `logits_to_keep`.
    (The policy's entropy comes from the sampler, which has the full distributions anyway.)"""
    t = batch.completion_ids.shape[1]
    kwargs = {}
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = t + 1
    device = batch.input_ids.device
    with autocast_context(device, autocast_dtype):
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
            **kwargs,
        )
    logits = out.logits[:, -(t + 1) : -1, :]
    logps = token_logprobs(logits, batch.completion_ids, temperature=temperature)
    return logps * batch.completion_mask


def shared_prefix_logps(
    model: PreTrainedModel,
    prompts: list[list[int]],
    row_prompt: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    pad_id: int,
    *,
    temperature: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Completion log-probs `(N, T)` where many rows share a prompt, with each distinct prompt
    run through the model once (training-time prefix sharing, differentiable).

    `prompts` are the P distinct prompts; `row_prompt` `(N,)` maps each row to its prompt.
    The prompts' KV cache is computed with gradients, gathered to the N rows (an index, so the
    backward pass sums each prompt's gradient over its rows), and the completions run on top
    of it. Same values as `completion_logps` on the unshared batch, at a fraction of the
    compute when prompts are long compared with completions and groups are large.
    """
    from transformers import DynamicCache

    device = completion_ids.device
    n, t = completion_ids.shape
    lp = max(len(p) for p in prompts)
    p_ids = torch.full((len(prompts), lp), pad_id, dtype=torch.long, device=device)
    p_attn = torch.zeros((len(prompts), lp), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        p_ids[i, lp - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
        p_attn[i, lp - len(p) :] = 1
    p_pos = (p_attn.cumsum(-1) - 1).clamp(min=0)
    cache_kw, keep = cache_forward_kwargs(model)
    cache = DynamicCache(config=model.config)
    with autocast_context(device, autocast_dtype):
        out = model(
            input_ids=p_ids,
            attention_mask=p_attn,
            position_ids=p_pos,
            use_cache=True,
            **{cache_kw: cache},
            **keep,
        )
        first = out.logits[:, -1:, :][row_prompt]  # predicts each row's first completion token
        if t == 1:
            logits = first
        else:
            cache.batch_select_indices(row_prompt)
            c_mask = completion_mask[:, :-1].long()
            attn = torch.cat([p_attn[row_prompt], c_mask], dim=1)
            start = p_pos[row_prompt, -1:] + 1
            pos = start + torch.arange(t - 1, device=device)[None, :]
            rest = model(
                input_ids=completion_ids[:, :-1],
                attention_mask=attn,
                position_ids=pos,
                use_cache=True,
                **{cache_kw: cache},
            ).logits
            logits = torch.cat([first, rest], dim=1)
    return token_logprobs(logits, completion_ids, temperature=temperature) * completion_mask
