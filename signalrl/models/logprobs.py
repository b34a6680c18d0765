"""One forward pass of a causal LM over prompt + completion, returning completion log-probs."""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers import PreTrainedModel

from signalrl.data.collate import SequenceBatch
from signalrl.losses.policy import entropy_from_logits, token_logprobs


def autocast_context(device: torch.device, dtype: torch.dtype | None):  # noqa: ANN201
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _accepts(model: PreTrainedModel, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def completion_logps(
    model: PreTrainedModel,
    batch: SequenceBatch,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs `(N, T)` of the completion tokens (0 where the mask is 0), and
    optionally the per-token entropy of the policy. Only the `T + 1` last positions go through
    the LM head when the model supports `logits_to_keep`."""
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
    logps = logps * batch.completion_mask
    entropy = None
    if with_entropy:
        with torch.no_grad():
            scaled = logits / temperature if temperature != 1.0 else logits
            entropy = entropy_from_logits(scaled) * batch.completion_mask
    return logps, entropy
