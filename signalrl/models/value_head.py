"""A critic for PPO: the policy's transformer body with a scalar head, one value per token.

Values are read at the positions whose logits predict the completion tokens, so `values[:, t]`
is V(s_t), the value of the state before completion token t is generated.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from signalrl.data.collate import SequenceBatch
from signalrl.models.logprobs import autocast_context


class ValueModel(nn.Module):
    def __init__(self, body: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy: PreTrainedModel) -> ValueModel:
        """A critic initialised from a copy of the policy's body (the usual PPO set-up). For a
        peft (LoRA) policy the body is a full, trainable copy of the frozen base, without
        the adapter; a half-precision body is trained in float32 (AdamW on bf16 weights
        loses most updates)."""
        if hasattr(policy, "get_base_model") and hasattr(policy, "peft_config"):
            lm = copy.deepcopy(policy).unload()  # the base model, adapter layers removed
        else:
            lm = policy
        body = lm.base_model if lm is not policy else copy.deepcopy(policy.base_model)
        body.requires_grad_(True)
        if next(body.parameters()).dtype in (torch.bfloat16, torch.float16):
            body = body.float()
        return cls(body, policy.config.hidden_size).to(next(policy.parameters()).device)

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu") -> ValueModel:
        lm = AutoModelForCausalLM.from_pretrained(path)
        return cls(lm.base_model, lm.config.hidden_size).to(device)

    def forward(
        self, batch: SequenceBatch, autocast_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        t = batch.completion_ids.shape[1]
        with autocast_context(batch.input_ids.device, autocast_dtype):
            out = self.body(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            )
            hidden = out.last_hidden_state[:, -(t + 1) : -1, :]
            values = self.head(hidden).squeeze(-1)
        return values.float() * batch.completion_mask
