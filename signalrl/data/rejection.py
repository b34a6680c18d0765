"""Rejection sampling into SFT data (DeepSeek-R1's stage 3, Guo et al. 2025; also "RFT",
Yuan et al. 2023): sample `samples` completions per train prompt from the current model,
keep the ones the task's verifier accepts (at most `keep_per_prompt` distinct ones per
prompt), and write `{prompt, completion}` rows (chat tasks: `{messages}` rows whose last turn
is the kept reply) that `trainer: sft` reads with `data.path`."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from signalrl.data.chat import has_chat_template
from signalrl.data.make_preferences import (
    SampleCount,
    _distinct_prompts,
    sample_verified,
    write_jsonl_atomic,
)
from signalrl.tasks import Task


@dataclass
class RejectionStats:
    prompts: int
    rows: int
    prompts_kept: int
    sample_accuracy: float
    out: str
    forward_tokens: int = 0  # the sampling's student forward tokens

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _row(prompt_row: dict[str, Any], completion: str, chat: bool) -> dict[str, Any]:
    msgs = prompt_row.get("messages")
    if msgs and chat:  # a chat model: the kept reply is the assistant turn
        return {"messages": [*msgs, {"role": "assistant", "content": completion}]}
    return {"prompt": prompt_row["prompt"], "completion": completion}


def rejection_sample(
    model: str,
    out: str | os.PathLike[str],
    task: Task,
    *,
    samples: int = 8,
    keep_per_prompt: int = 1,
    n_prompts: int | None = None,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
) -> RejectionStats:
    """Write the verifier-correct samples of `model` on `task`'s train prompts to `out`."""
    if samples < 1 or keep_per_prompt < 1:
        raise ValueError("rejection sampling: samples and keep_per_prompt must be >= 1")
    rows = _distinct_prompts(task, n_prompts)
    kept: list[dict[str, Any]] = []
    n_correct = n_total = prompts_kept = 0
    count = SampleCount()
    sampled = sample_verified(
        model, task, rows, samples=samples, temperature=temperature,
        max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, device=device,
        count=count,
    )  # fmt: skip
    for row, tok, texts, scores in sampled:
        good = [t for t, x in zip(texts, scores, strict=True) if x > 0]
        n_correct += len(good)
        n_total += len(texts)
        distinct = [t for j, t in enumerate(good) if t.strip() and t not in good[:j]]
        prompts_kept += bool(distinct)
        kept.extend(_row(row, t, has_chat_template(tok)) for t in distinct[:keep_per_prompt])
    if not kept:
        raise ValueError(
            f"rejection sampling: no verifier-correct sample in {len(rows)} prompts x "
            f"{samples} samples; start from a better model or raise samples"
        )
    path = write_jsonl_atomic(kept, out)
    return RejectionStats(
        prompts=len(rows),
        rows=len(kept),
        prompts_kept=prompts_kept,
        sample_accuracy=n_correct / max(n_total, 1),
        out=str(path),
        forward_tokens=count.forward_tokens,
    )
