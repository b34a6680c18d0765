"""On-policy preference pairs from a verifier, with no human labels.

For each (distinct) train prompt of a task, `samples` completions are drawn from the model
with the sampler; the task's verifier marks each correct or wrong. A pair is (chosen = a
correct completion, rejected = a wrong, non-blank one): by default one pair per prompt, the
first of each kind in sampling order; `pairs_per_prompt` > 1 pairs further distinct ones.
Prompts without a correct sample, or without a wrong one, give no pair and are counted.

Rows with `messages` (a chat task, e.g. `template: chat`) are sampled from the chat template's
render of them, as the trainers do (`signalrl.data.chat.render_row`), and their pairs hold the
messages as `prompt` (the replies are strings, rendered as assistant turns on loading).

The output is JSONL with fields `prompt`, `chosen`, `rejected` and `answer` (when the task row
has one): the `{prompt, chosen, rejected}` format `signalrl.data.preference` reads, for the
`reward_model` and `preference` trainers. It is written to a temp file beside the target and
renamed, so a reader never sees half a file. The same model, task, seed and options give the
same file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from signalrl.data.chat import has_chat_template, render_rows
from signalrl.logging.run import user_mode
from signalrl.models import load_model
from signalrl.rewards.registry import RewardComposer, RewardSpec
from signalrl.rollout.collect import collect
from signalrl.rollout.sampler import SamplingParams
from signalrl.tasks import Task, make_task


@dataclass
class PreferenceStats:
    prompts: int
    pairs: int
    skipped_no_wrong: int
    skipped_no_correct: int
    sample_accuracy: float
    out: str
    forward_tokens: int = 0  # the sampling's student forward tokens (count_forward_tokens)

    @property
    def skipped(self) -> int:
        return self.skipped_no_wrong + self.skipped_no_correct


def pick_pair_indices(
    completions: list[str], scores: list[float], k: int = 1
) -> list[tuple[int, int]]:
    """Up to `k` (chosen, rejected) index pairs: chosen from the distinct non-blank correct
    completions (score > 0), rejected from the distinct non-blank wrong ones, both in sampling
    order (first occurrence of each text), pair i = (correct[i mod C], wrong[i mod W]) for
    i < min(k, max(C, W)). Empty when either kind is missing."""
    correct: dict[str, int] = {}
    wrong: dict[str, int] = {}
    for i, (c, s) in enumerate(zip(completions, scores, strict=True)):
        bucket = correct if s > 0 else wrong
        if c.strip() and c not in bucket:
            bucket[c] = i
    if not correct or not wrong:
        return []
    ci, wi = list(correct.values()), list(wrong.values())
    n = min(k, max(len(ci), len(wi)))
    return [(ci[i % len(ci)], wi[i % len(wi)]) for i in range(n)]


def pick_pairs(completions: list[str], scores: list[float], k: int = 1) -> list[tuple[str, str]]:
    """The texts of `pick_pair_indices`: up to `k` distinct (chosen, rejected) pairs."""
    return [(completions[a], completions[b]) for a, b in pick_pair_indices(completions, scores, k)]


def write_jsonl_atomic(rows: list[dict[str, Any]], out: str | os.PathLike[str]) -> Path:
    """Write rows as JSONL into a temp file beside `out`, then rename it to `out`."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        user_mode(tmp, directory=False)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _distinct_prompts(t: Task, n_prompts: int | None) -> list[dict[str, Any]]:
    """The task's train rows with distinct prompts, in order, at most `n_prompts`."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for r in t.train():
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            rows.append(r)
            if n_prompts is not None and len(rows) >= n_prompts:
                break
    if not rows:
        raise ValueError(f"make-preferences: task {t.name!r} has no train prompts")
    return rows


def _prompt_field(row: dict[str, Any], tokenizer: Any) -> str | list[dict[str, Any]]:
    """What a pair's `prompt` holds: a chat row's messages (the preference loader renders them
    with the chat template and the replies as assistant turns), else the prompt text."""
    if row.get("messages") and has_chat_template(tokenizer):
        return [dict(m) for m in row["messages"]]
    return row["prompt"]


@dataclass
class SampleCount:
    """What `sample_verified` spent: student forward tokens of its generation calls."""

    forward_tokens: int = 0


def sample_verified(
    model: str,
    task: Task,
    rows: list[dict[str, Any]],
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
    device: str = "auto",
    count: SampleCount | None = None,
) -> Iterator[tuple[dict[str, Any], Any, list[str], list[float]]]:
    """Sample `samples` completions per row from `model` (chat rows rendered as the trainers
    render them), `batch_size` prompts per generation call, scored by the task's verifier:
    yields `(rendered row, tokenizer, completions, scores)` per row (make-preferences and
    rejection sampling). `count.forward_tokens` adds up the generation's student forward
    tokens as the trainers count them (`signalrl.rollout.collect.count_forward_tokens`), so a
    pipeline can charge a data stage's sampling to the routes built on it."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    lm, tok = load_model(model, device=device)
    lm.eval()
    rendered = render_rows(tok, rows)  # chat rows: the prompt the trainers sample from
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=samples)
    gen = torch.Generator(device=lm.device).manual_seed(seed)
    verifier = RewardComposer([RewardSpec(type="task")], task)
    for s in range(0, len(rendered), batch_size):
        chunk = rendered[s : s + batch_size]
        roll, tokens = collect(lm, tok, chunk, params, verifier, generator=gen)
        if count is not None:
            count.forward_tokens += tokens
        scores = roll.rewards.tolist()
        for i, row in enumerate(chunk):
            k = slice(i * samples, (i + 1) * samples)
            yield row, tok, roll.texts[k], scores[k]


def make_preferences(
    model: str,
    out: str | os.PathLike[str],
    *,
    task: Task | None = None,
    task_name: str = "arithmetic",
    task_kwargs: dict[str, Any] | None = None,
    samples: int = 4,
    pairs_per_prompt: int = 1,
    n_prompts: int | None = None,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
) -> PreferenceStats:
    """Sample `samples` completions per train prompt, keep (correct, wrong) pairs, write JSONL.

    `n_prompts` caps the number of distinct train prompts used (default: all);
    `pairs_per_prompt` caps the pairs one prompt gives (see `pick_pairs`). `batch_size` is
    prompts per generation call.
    """
    if samples < 2:
        raise ValueError("make-preferences: samples must be >= 2 (a pair needs two)")
    if pairs_per_prompt < 1:
        raise ValueError("make-preferences: pairs_per_prompt must be >= 1")
    t = task or make_task(task_name, **(task_kwargs or {}))
    rows = _distinct_prompts(t, n_prompts)
    pairs: list[dict[str, Any]] = []
    no_wrong = no_correct = 0
    n_correct = n_total = 0
    count = SampleCount()
    sampled = sample_verified(
        model, t, rows, samples=samples, temperature=temperature,
        max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, device=device,
        count=count,
    )  # fmt: skip
    for row, tok, texts, scores in sampled:
        n_correct += sum(1 for x in scores if x > 0)
        n_total += len(scores)
        found = pick_pairs(texts, scores, pairs_per_prompt)
        if not found:
            if any(x > 0 for x in scores):
                no_wrong += 1
            else:
                no_correct += 1
        for chosen, rejected in found:
            item = {"prompt": _prompt_field(row, tok), "chosen": chosen, "rejected": rejected}
            if "answer" in row:
                item["answer"] = row["answer"]
            pairs.append(item)
    if not pairs:
        raise ValueError(
            f"make-preferences: no pairs from {len(rows)} prompts ({no_wrong} with no wrong "
            f"sample, {no_correct} with no correct one); change the model, --samples or "
            "--temperature"
        )
    path = write_jsonl_atomic(pairs, out)
    return PreferenceStats(
        prompts=len(rows),
        pairs=len(pairs),
        skipped_no_wrong=no_wrong,
        skipped_no_correct=no_correct,
        sample_accuracy=n_correct / max(n_total, 1),
        out=str(path),
        forward_tokens=count.forward_tokens,
    )
