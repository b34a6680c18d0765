"""Rejection sampling into SFT data (DeepSeek-R1's stage 3, Guo et al. 2025; also "RFT",
Yuan et al. 2023): sample `samples` completions per train prompt from the current model,
keep the ones the task's verifier accepts (at most `keep_per_prompt` distinct ones per
prompt), and write `{prompt, completion}` rows (chat tasks: `{messages}` rows whose last turn
is the kept reply) that `trainer: sft` reads with `data.path`."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from signalrl.data.chat import has_chat_template, render_rows
from signalrl.data.make_preferences import _distinct_prompts, write_jsonl_atomic
from signalrl.models import load_model
from signalrl.rewards.registry import RewardComposer, RewardSpec
from signalrl.rollout.collect import collect
from signalrl.rollout.sampler import SamplingParams
from signalrl.tasks import Task


@dataclass
class RejectionStats:
    prompts: int
    rows: int
    prompts_kept: int
    sample_accuracy: float
    out: str

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
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    lm, tok = load_model(model, device=device)
    lm.eval()
    rendered, chat = render_rows(tok, rows), has_chat_template(tok)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=samples)
    gen = torch.Generator(device=lm.device).manual_seed(seed)
    verifier = RewardComposer([RewardSpec(type="task")], task)
    kept: list[dict[str, Any]] = []
    n_correct = n_total = prompts_kept = 0
    for s in range(0, len(rows), batch_size):
        chunk = rendered[s : s + batch_size]
        roll, _ = collect(lm, tok, chunk, params, verifier, generator=gen)
        scores = roll.rewards.tolist()
        for i, row in enumerate(rows[s : s + batch_size]):
            texts = roll.texts[i * samples : (i + 1) * samples]
            row_scores = scores[i * samples : (i + 1) * samples]
            good = [t for t, x in zip(texts, row_scores, strict=True) if x > 0]
            n_correct += len(good)
            n_total += len(texts)
            distinct = [t for j, t in enumerate(good) if t.strip() and t not in good[:j]]
            prompts_kept += bool(distinct)
            kept.extend(_row(row, t, chat) for t in distinct[:keep_per_prompt])
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
    )
