"""Tokenisation with completion masks and collation of prompt + completion sequences.

Layout of a batch: prompts left-padded to a common width `P`, completions right-padded to `T`,
so every row's completion starts at column `P`. Logits at columns `P-1 .. P+T-2` predict the
completion tokens; `completion_mask` (N, T) is 1.0 on completion tokens that count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from signalrl.data.chat import assistant_continuation, encode_prompt, has_chat_template, needs_eos


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # (N, P + T)
    attention_mask: torch.Tensor  # (N, P + T)
    position_ids: torch.Tensor  # (N, P + T)
    completion_ids: torch.Tensor  # (N, T)
    completion_mask: torch.Tensor  # (N, T) float
    prompt_width: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor | slice) -> SequenceBatch:
        """Rows `idx`, with the shared padding trimmed where every selected row allows."""
        ids, attn = self.input_ids[idx], self.attention_mask[idx]
        cmask = self.completion_mask[idx]
        p = self.prompt_width
        # trim left prompt padding that all selected rows share
        prompt_cols = attn[:, :p].sum(0)
        lead = int((prompt_cols == 0).long().cumprod(0).sum().item())
        # completion tokens present (attention), not their loss weights: a row may hold
        # context tokens with weight 0 between trained ones (multi-turn chat)
        width = int(attn[:, p:].sum(-1).max().item()) if cmask.numel() else 0
        width = max(width, 1)
        cols = slice(lead, p + width)
        return SequenceBatch(
            input_ids=ids[:, cols],
            attention_mask=attn[:, cols],
            position_ids=self.position_ids[idx][:, cols],
            completion_ids=self.completion_ids[idx][:, :width],
            completion_mask=cmask[:, :width],
            prompt_width=p - lead,
        )


def build_batch(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]] | torch.Tensor,
    pad_id: int,
    completion_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    masks: Sequence[Sequence[float]] | None = None,
) -> SequenceBatch:
    """Collate prompts (token lists) with completions (token lists or an (N, T) tensor).
    With token lists, `masks` (one weight per completion token) sets `completion_mask`
    (default: 1.0 on every completion token)."""
    n = len(prompt_ids)
    if isinstance(completion_ids, torch.Tensor):
        comp = completion_ids.to(device=device, dtype=torch.long)
        if completion_mask is None:
            raise ValueError("build_batch: a completion tensor needs its completion_mask")
        cmask = completion_mask.to(device=device, dtype=torch.float32)
        present = (cmask > 0).long()
    else:
        t = max(max((len(c) for c in completion_ids), default=0), 1)
        if masks is not None and len(masks) != n:
            raise ValueError(f"build_batch: {n} completions but {len(masks)} masks")
        for i, c in enumerate(completion_ids):
            if masks is not None and len(masks[i]) != len(c):
                raise ValueError(f"build_batch: completion {i} and its mask differ in length")
        # one tensor from padded lists (not a slice assignment per row: this runs every step)
        comp = torch.tensor([[*c, *[pad_id] * (t - len(c))] for c in completion_ids])
        present = torch.tensor([[1] * len(c) + [0] * (t - len(c)) for c in completion_ids])
        if masks is None:
            cmask = present.to(torch.float32)
        else:
            cmask = torch.tensor([[*m, *[0.0] * (t - len(m))] for m in masks], dtype=torch.float32)
        comp = comp.to(device=device, dtype=torch.long).reshape(n, t)
        present = present.to(device=device, dtype=torch.long).reshape(n, t)
        cmask = cmask.to(device).reshape(n, t)
    if comp.shape[0] != n:
        raise ValueError(f"build_batch: {n} prompts but {comp.shape[0]} completions")
    p = max(len(x) for x in prompt_ids)
    for i, x in enumerate(prompt_ids):
        if len(x) == 0:
            raise ValueError(f"build_batch: prompt {i} is empty")
    prompts = torch.tensor([[*[pad_id] * (p - len(x)), *x] for x in prompt_ids], dtype=torch.long)
    pmask = torch.tensor([[0] * (p - len(x)) + [1] * len(x) for x in prompt_ids])
    prompts, pmask = prompts.to(device), pmask.to(device=device, dtype=torch.long)
    input_ids = torch.cat([prompts, comp], dim=1)
    attn = torch.cat([pmask, present], dim=1)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    return SequenceBatch(input_ids, attn, positions, comp, cmask, p)


def tokenize_sft(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    add_eos: bool = True,
    max_length: int | None = None,
    source: str = "data",
    messages: Sequence[Sequence[dict[str, Any]] | None] | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of prompts and completions (+ EOS). Empty completions are an error naming the
    row; rows longer than `max_length` are an error too (never silently cut).

    Prompts get the BOS once where the tokenizer adds one (`signalrl.data.chat.with_bos`).
    `messages[i]` (a chat row's conversation, whose prompt the chat template rendered) makes
    row i's completion the assistant turn as the template writes it, ending with the
    template's end of turn (`<|im_end|>`, `<|eot_id|>`), as a `{messages}` data row's final
    turn does (`signalrl.data.sft`); the EOS follows unless the text already ends with it
    (`signalrl.data.chat.needs_eos`)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{source}: {len(prompts)} prompts but {len(completions)} completions")
    if messages is not None and len(messages) != len(prompts):
        raise ValueError(f"{source}: {len(prompts)} prompts but {len(messages)} message lists")
    texts = list(completions)
    if messages is not None and has_chat_template(tokenizer):
        for i, msgs in enumerate(messages):
            if msgs and texts[i]:
                turn = assistant_continuation(tokenizer, msgs, texts[i])
                texts[i] = turn if turn is not None else texts[i]
    p_ids = encode_prompt(tokenizer, prompts)
    c_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError(f"{source}: the tokenizer has no eos token to end completions with")
    out_c: list[list[int]] = []
    for i, (p, c) in enumerate(zip(p_ids, c_ids, strict=True)):
        if not p:
            raise ValueError(f"{source}: row {i}: field 'prompt' is empty")
        if not c:
            raise ValueError(f"{source}: row {i}: field 'completion' is empty")
        c = list(c) + ([eos] if add_eos and needs_eos(tokenizer, texts[i]) else [])
        if max_length is not None and len(p) + len(c) > max_length:
            raise ValueError(
                f"{source}: row {i}: prompt + completion is {len(p) + len(c)} tokens, over "
                f"max_length={max_length}"
            )
        out_c.append(c)
    return [list(p) for p in p_ids], out_c
