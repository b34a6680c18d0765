"""One rollout path: sample `n` completions per prompt, score them, return a `RolloutBatch`.

Used by online RL (and PPO), online DPO and on-policy distillation (and by distillation for
teacher samples). Single-turn: one assistant completion per prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from signalrl.rollout.batch import RolloutBatch, Row
from signalrl.rollout.sampler import SamplingParams, generate

# (prompts, completions, rows, lengths) -> RewardResult-like (total, components, errors)
Scorer = Callable[[list[str], list[str], list[Row], list[int]], Any]


def count_forward_tokens(prompt_ids: Sequence[Sequence[int]], completion_tokens: int) -> int:
    """Student forward tokens of one forward pass (or one generation): the non-padding tokens
    of the distinct prompts it encodes plus `completion_tokens`.

    `student/forward_tokens` is the sum of this over every pass of the student (the policy
    being trained) in a step, with or without gradient: in generation each distinct prompt
    once (its KV cache is shared by the group) plus every sampled token (the last one of a
    completion is counted although it is never fed back, so sampling and scoring count the
    same sequence); in a training forward (and a `mu > 1` old-log-prob pass) the prompts it
    encodes (once per distinct prompt with prefix sharing, once per row otherwise) plus the
    completion tokens. Teacher, reference, critic, reward-model and evaluation passes are not
    counted. Padding is not counted."""
    return sum(len(p) for p in prompt_ids) + int(completion_tokens)


def collect(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Row],
    params: SamplingParams,
    scorer: Scorer,
    *,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    shaping: Callable[[list[int]], list[float]] | None = None,
    keys: torch.Tensor | None = None,
) -> tuple[RolloutBatch, int]:
    """`params.n` samples for each row's `prompt`, scored by `scorer` (e.g. a
    `signalrl.rewards.registry.RewardComposer`), plus `shaping(lengths)` (a per-sample
    reward added to the total, e.g. DAPO's overlong penalty). `keys` (one per row) make the
    sampling noise counter-based (`signalrl.rollout.sampler.generate`).

    Returns the batch and its generation's forward-token count (`count_forward_tokens`:
    the caller adds it to the student's budget when `model` is the student)."""
    g = params.n
    r = generate(
        model,
        tokenizer,
        [x["prompt"] for x in rows],
        params,
        generator=generator,
        autocast_dtype=autocast_dtype,
        keys=keys,
    )
    lengths = [int(x) for x in r.lengths.tolist()]
    tokens = count_forward_tokens(r.prompt_ids[::g], sum(lengths))
    row_of = [rows[i // g] for i in range(len(r))]
    scored = scorer([x["prompt"] for x in row_of], r.texts, row_of, lengths)
    device = r.completion_ids.device
    total = torch.tensor(scored.total, dtype=torch.float32, device=device)
    shaped = torch.zeros_like(total)
    if shaping is not None:
        shaped = torch.tensor(shaping(lengths), dtype=torch.float32, device=device)
    batch = RolloutBatch(
        rows=row_of,
        prompt_ids=[list(p) for p in r.prompt_ids],
        completion_ids=[r.completion_ids[i, : lengths[i]].tolist() for i in range(len(r))],
        sampler_logps=[r.logps[i, : lengths[i]] for i in range(len(r))],
        entropy=[r.entropy[i, : lengths[i]] for i in range(len(r))],
        texts=list(r.texts),
        truncated=[bool(x) for x in r.truncated.tolist()],
        group_size=g,
        rewards=total + shaped,
        components={k: torch.tensor(v) for k, v in scored.components.items()},
        shaping=shaped,
        errors=int(scored.errors),
    )
    return batch, tokens
