"""One forward pass of a causal LM over prompt + completion, returning completion log-probs.

The log-probs are computed from the final hidden states: the transformer body runs once and
the LM head is applied a chunk of positions at a time (`losses.policy.hidden_token_logprobs`,
recomputed in backward), so neither the `(B, T, V)` logits nor a float32 copy of them is
ever materialised (with a 150k vocabulary they dominate the memory of a step). Models whose
logits are not `lm_head(last_hidden_state)` (logit soft-capping or scaling, prompt-learning
peft adapters, a DDP/FSDP wrapper whose own forward must run) go through the whole model
instead, with the same values. An `AdapterDisabled` reference is computed inside its
`logprob_context` (adapter disabled, no grad).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from signalrl.data.collate import SequenceBatch, build_batch
from signalrl.losses.entropy import hidden_token_logprobs_entropy, token_logprobs_entropy
from signalrl.losses.policy import hidden_token_logprobs, token_logprobs
from signalrl.models.lora import logprob_context
from signalrl.models.packing import PackedBatch, pack_batch

#: Elements of one chunk's logits in the chunked LM head (64 MiB of float32 logits; at a
#: 151936-token vocabulary: 110 positions at a time; a backward pass holds about 5 such tensors).
LOGIT_CHUNK_ELEMENTS = 2**24

# config keys of architectures whose logits are a function of `lm_head(h)`, not `lm_head(h)`
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def autocast_context(device: torch.device, dtype: torch.dtype | None):  # noqa: ANN201
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _accepts(model: nn.Module, name: str) -> bool:
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


def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """`(transformer body, LM head)` of a causal LM (peft-wrapped or not) whose logits are
    `head(body(...).last_hidden_state)`; None where the whole model must run."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    peft_cfg = getattr(model, "active_peft_config", None)
    if peft_cfg is not None and getattr(peft_cfg, "is_prompt_learning", False):
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(inner).__name__.startswith("FSDP") or not hasattr(inner, "get_output_embeddings"):
        return None
    config = getattr(inner, "config", None)
    if config is None or any(getattr(config, k, None) is not None for k in _LOGIT_TRANSFORMS):
        return None
    body, head = getattr(inner, "base_model", inner), inner.get_output_embeddings()
    if body is inner or head is None:
        return None
    return body, head


def chunked_head(model: nn.Module, rows: int) -> tuple[nn.Module, nn.Module] | None:
    """`body_and_head(model)` when the logits of `rows` positions would exceed
    `LOGIT_CHUNK_ELEMENTS` entries, else None: small logits go through the whole model at
    once (no head recomputation in backward, and the same numerics as a plain forward)."""
    parts = body_and_head(model)
    if parts is None:
        return None
    weight = getattr(parts[1], "weight", None)
    vocab = weight.shape[0] if isinstance(weight, torch.Tensor) else 1
    return parts if rows * vocab > LOGIT_CHUNK_ELEMENTS else None


def gradient_checkpointing_active(model: nn.Module) -> bool:
    """Whether a forward of `model` now runs under HF gradient checkpointing (which then
    drops the KV cache): checkpointing enabled, training mode and gradients on."""
    if not (torch.is_grad_enabled() and model.training):
        return False
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _run(model: nn.Module, parts: Any, keep: int | None, **kwargs: Any) -> torch.Tensor:
    """The final hidden states (`parts` given: the body only) or the logits (the whole model,
    `logits_to_keep=keep` where it is accepted)."""
    if parts is not None:
        return parts[0](**kwargs).last_hidden_state
    if keep is not None and _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep
    return model(**kwargs).logits


def _logps(
    parts: Any,
    x: torch.Tensor,
    ids: torch.Tensor,
    temperature: float,
    autocast_dtype: torch.dtype | None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of `ids` (and with `with_entropy` the full-vocabulary entropies,
    from the same chunks of logits) from hidden states `x` through the chunked LM head
    (`parts` given) or from logits `x`."""
    if parts is None:
        if with_entropy:
            return token_logprobs_entropy(x, ids, temperature=temperature)
        return token_logprobs(x, ids, temperature=temperature), None
    head = parts[1]
    weight = getattr(head, "weight", None)
    vocab = weight.shape[0] if isinstance(weight, torch.Tensor) else 1
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // max(vocab, 1))

    def head_fn(h: torch.Tensor) -> torch.Tensor:
        with autocast_context(h.device, autocast_dtype):
            return head(h)

    if with_entropy:
        return hidden_token_logprobs_entropy(x, head_fn, ids, chunk, temperature)
    return hidden_token_logprobs(x, head_fn, ids, chunk, temperature), None


def _masked(
    out: tuple[torch.Tensor, torch.Tensor | None], mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return out[0] * mask, (out[1] * mask if out[1] is not None else None)


def completion_logps(
    model: PreTrainedModel | nn.Module,
    batch: SequenceBatch,
    *,
    temperature: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
    padding_free: bool = False,
) -> torch.Tensor:
    """Per-token log-probs `(N, T)` of the completion tokens (0 where the mask is 0), from
    one forward pass; only the `T` positions that predict completion tokens go through the
    LM head, a chunk at a time. (`completion_logps_entropy` also returns the entropies.)

    `padding_free`: run the batch's sequences packed into fewer rows where that saves
    padding (`signalrl.models.packing`; check `packing_supported(model)` first); the same
    values up to float rounding."""
    return _completion(model, batch, temperature, autocast_dtype, False, padding_free)[0]


def completion_logps_entropy(
    model: PreTrainedModel | nn.Module,
    batch: SequenceBatch,
    *,
    temperature: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
    padding_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`completion_logps` and the policy's full-vocabulary entropy `(N, T)` at each completion
    position (of `softmax(logits / temperature)`, differentiable, 0 where the mask is 0),
    both from the same chunks of logits (`signalrl.losses.entropy`)."""
    logps, ent = _completion(model, batch, temperature, autocast_dtype, True, padding_free)
    assert ent is not None
    return logps, ent


def _completion(
    model: PreTrainedModel | nn.Module,
    batch: SequenceBatch,
    temperature: float,
    autocast_dtype: torch.dtype | None,
    with_entropy: bool,
    padding_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    packed = pack_batch(batch) if padding_free else None
    if packed is not None:
        return _packed(model, batch, packed, temperature, autocast_dtype, with_entropy)
    t = batch.completion_ids.shape[1]
    parts = chunked_head(model, batch.input_ids.shape[0] * (t + 1))
    with logprob_context(model):
        with autocast_context(batch.input_ids.device, autocast_dtype):
            x = _run(
                model,
                parts,
                t + 1,
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            )
        x = x[:, -(t + 1) : -1, :]
        out = _logps(parts, x, batch.completion_ids, temperature, autocast_dtype, with_entropy)
    return _masked(out, batch.completion_mask)


def _packed(
    model: PreTrainedModel | nn.Module,
    batch: SequenceBatch,
    packed: PackedBatch,
    temperature: float,
    autocast_dtype: torch.dtype | None,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_completion` through one forward of the packed rows (`signalrl.models.packing`):
    the states that predict completion tokens are gathered, their log-probs (and entropies)
    computed and scattered back to the batch's `(N, T)` layout. The whole model would put
    every packed slot through the LM head (no `logits_to_keep` for scattered positions), so
    the slots, not the targets, decide whether the head runs in chunks."""
    parts = chunked_head(model, packed.slots)
    with logprob_context(model):
        with autocast_context(batch.input_ids.device, autocast_dtype):
            x = _run(
                model,
                parts,
                None,
                input_ids=packed.input_ids,
                position_ids=packed.position_ids,
                attention_mask=None,
                use_cache=False,
            )
        x = x.reshape(-1, x.shape[-1])[packed.predict_at][None]
        lp, ent = _logps(parts, x, packed.targets[None], temperature, autocast_dtype, with_entropy)
    shape = batch.completion_ids.shape
    out = lp.new_zeros(shape).index_put((packed.rows, packed.cols), lp[0])
    ent_out = (
        ent.new_zeros(shape).index_put((packed.rows, packed.cols), ent[0])
        if ent is not None
        else None
    )
    return _masked((out, ent_out), batch.completion_mask)


def shared_prefix_logps(
    model: PreTrainedModel | nn.Module,
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

    Under gradient checkpointing (training mode, gradients on) HF drops the KV cache, so the
    unshared batch goes through `completion_logps` instead (the same values).
    `shared_prefix_logps_entropy` also returns the entropies.
    """
    return _shared_prefix(
        model,
        prompts,
        row_prompt,
        completion_ids,
        completion_mask,
        pad_id,
        temperature,
        autocast_dtype,
        False,
    )[0]


def shared_prefix_logps_entropy(
    model: PreTrainedModel | nn.Module,
    prompts: list[list[int]],
    row_prompt: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    pad_id: int,
    *,
    temperature: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`shared_prefix_logps` and the policy's full-vocabulary entropy `(N, T)` at each
    completion position (differentiable, 0 where the mask is 0), from the same logits."""
    logps, ent = _shared_prefix(
        model,
        prompts,
        row_prompt,
        completion_ids,
        completion_mask,
        pad_id,
        temperature,
        autocast_dtype,
        True,
    )
    assert ent is not None
    return logps, ent


def _shared_prefix(
    model: PreTrainedModel | nn.Module,
    prompts: list[list[int]],
    row_prompt: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    pad_id: int,
    temperature: float,
    autocast_dtype: torch.dtype | None,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if gradient_checkpointing_active(model):
        rows = [prompts[int(k)] for k in row_prompt.tolist()]
        batch = build_batch(rows, completion_ids, pad_id, completion_mask, completion_ids.device)
        return _completion(model, batch, temperature, autocast_dtype, with_entropy)
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
    parts = chunked_head(model, n * t)
    cache_kw, _ = cache_forward_kwargs(parts[0] if parts is not None else model)
    cache = DynamicCache(config=model.config)
    with logprob_context(model):
        with autocast_context(device, autocast_dtype):
            out = _run(
                model,
                parts,
                1,
                input_ids=p_ids,
                attention_mask=p_attn,
                position_ids=p_pos,
                use_cache=True,
                **{cache_kw: cache},
            )
            x = out[:, -1:, :][row_prompt]  # predicts each row's first completion token
            if t > 1:
                cache.batch_select_indices(row_prompt)
                attn = torch.cat([p_attn[row_prompt], completion_mask[:, :-1].long()], dim=1)
                pos = p_pos[row_prompt, -1:] + 1 + torch.arange(t - 1, device=device)[None, :]
                rest = _run(
                    model,
                    parts,
                    None,
                    input_ids=completion_ids[:, :-1],
                    attention_mask=attn,
                    position_ids=pos,
                    use_cache=True,
                    **{cache_kw: cache},
                )
                x = torch.cat([x, rest], dim=1)
        out = _logps(parts, x, completion_ids, temperature, autocast_dtype, with_entropy)
    return _masked(out, completion_mask)
