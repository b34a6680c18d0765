"""Evaluation on a task's test split: greedy accuracy, unbiased pass@k, maj@k, and best-of-k
by a scorer (e.g. a reward model: does it pick correct samples better than chance?)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import comb

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from signalrl.rollout.sampler import SamplingParams, generate
from signalrl.tasks.base import Row

Verifier = Callable[[Row, str], float]
Scorer = Callable[[list[str], list[str]], list[float]]  # (prompts, completions) -> scores
Extractor = Callable[[str], str | None]  # completion -> its final answer, or None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples with `c` correct (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code"): `1 - C(n - c, k) / C(n, k)`."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass
class EvalResult:
    n: int
    accuracy: float
    pass_at_k: dict[int, float] = field(default_factory=dict)
    maj_at_k: dict[int, float] = field(default_factory=dict)
    best_of_k: dict[int, float] = field(default_factory=dict)
    sample_accuracy: float | None = None
    mean_length: float = 0.0
    completions: list[str] = field(default_factory=list)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        out = {f"{prefix}accuracy": self.accuracy, f"{prefix}mean_length": self.mean_length}
        for k, v in self.pass_at_k.items():
            out[f"{prefix}pass@{k}"] = v
        for k, v in self.maj_at_k.items():
            out[f"{prefix}maj@{k}"] = v
        for k, v in self.best_of_k.items():
            out[f"{prefix}best_of@{k}"] = v
        if self.sample_accuracy is not None:
            out[f"{prefix}sample_accuracy"] = self.sample_accuracy
            for k in self.pass_at_k:  # mean@k: the mean accuracy of the k samples
                out[f"{prefix}mean@{k}"] = self.sample_accuracy
        return out


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Row],
    verify: Verifier,
    *,
    max_new_tokens: int,
    k: int = 0,
    samples: int | None = None,
    temperature: float = 1.0,
    batch_size: int = 256,
    seed: int = 0,
    stop_strings: Sequence[str] = (),
    autocast_dtype: torch.dtype | None = None,
    extract: Extractor | None = None,
    scorer: Scorer | None = None,
) -> EvalResult:
    """Greedy accuracy on `rows`; with `k > 0` also pass@k from `samples` (>= k) samples per
    problem at `temperature` (fixed `seed`, so reruns give the same numbers), and the mean
    accuracy of those samples (`sample_accuracy`). With an `extract` (completion text -> final
    answer or None, e.g. a task's `extract` method) also maj@k: the accuracy of the most common
    extracted answer among the first k samples (see `majority_vote`). With a `scorer` also
    best-of-k: the accuracy of the highest-scored of the first k samples (ties: the first), to
    be read against `sample_accuracy` (a scorer that ranks at chance) and pass@k (a perfect
    one)."""
    if not rows:
        raise ValueError("evaluate: no rows")
    greedy = SamplingParams(max_new_tokens=max_new_tokens, greedy=True, stop_strings=stop_strings)
    result = _greedy_accuracy(
        model, tokenizer, rows, verify, greedy, batch_size=batch_size, autocast_dtype=autocast_dtype
    )
    if k > 0:
        n_s = samples or k
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, n=n_s, stop_strings=stop_strings
        )
        _sampled_metrics(
            model,
            tokenizer,
            rows,
            verify,
            params,
            k,
            result,
            batch_size=batch_size,
            seed=seed,
            autocast_dtype=autocast_dtype,
            extract=extract,
            scorer=scorer,
        )
    return result


def _greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Row],
    verify: Verifier,
    params: SamplingParams,
    *,
    batch_size: int,
    autocast_dtype: torch.dtype | None,
) -> EvalResult:
    """Greedy decoding of every row in batches of `batch_size`: accuracy, mean completion
    length (tokens) and the completions."""
    correct = 0.0
    lengths = 0.0
    texts: list[str] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        r = generate(
            model, tokenizer, [x["prompt"] for x in chunk], params, autocast_dtype=autocast_dtype
        )
        texts.extend(r.texts)
        lengths += float(r.lengths.sum())
        correct += sum(verify(row, t) for row, t in zip(chunk, r.texts, strict=True))
    return EvalResult(
        n=len(rows),
        accuracy=correct / len(rows),
        mean_length=lengths / len(rows),
        completions=texts,
    )


def _sampled_metrics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Row],
    verify: Verifier,
    params: SamplingParams,
    k: int,
    result: EvalResult,
    *,
    batch_size: int,
    seed: int,
    autocast_dtype: torch.dtype | None,
    extract: Extractor | None,
    scorer: Scorer | None,
) -> None:
    """`params.n` samples per row (one seeded generator for the whole pass, rows in batches of
    `batch_size // n`); adds pass@k, sample accuracy, and best-of-k / maj@k to `result`."""
    n_s = params.n
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    per_batch = max(1, batch_size // n_s)
    pk, mk, bk, sk = 0.0, 0.0, 0.0, 0.0
    for i in range(0, len(rows), per_batch):
        chunk = rows[i : i + per_batch]
        r = generate(
            model,
            tokenizer,
            [x["prompt"] for x in chunk],
            params,
            generator=gen,
            autocast_dtype=autocast_dtype,
        )
        for j, row in enumerate(chunk):
            outs = r.texts[j * n_s : (j + 1) * n_s]
            scores = [verify(row, t) for t in outs]
            c = sum(1 for s in scores if s >= 1.0)
            pk += pass_at_k(n_s, c, k)
            sk += c / n_s
            if scorer is not None:
                ranked = scorer([row["prompt"]] * k, outs[:k])
                bk += scores[max(range(k), key=lambda j: ranked[j])]
            if extract is not None:
                mk += majority_vote(outs[:k], scores[:k], extract)
    result.pass_at_k[k] = pk / len(rows)
    result.sample_accuracy = sk / len(rows)
    if scorer is not None:
        result.best_of_k[k] = bk / len(rows)
    if extract is not None:
        result.maj_at_k[k] = mk / len(rows)


def majority_vote(completions: Sequence[str], scores: Sequence[float], extract: Extractor) -> float:
    """The score of the majority answer: each completion votes for its extracted final answer
    (`extract(text)`; None is no vote), so completions that differ in text but give the same
    answer ("The answer is 4." and "4") share one answer's votes. The most voted answer wins
    (ties: the answer seen first) and scores as the first completion that gave it; 0.0 when no
    completion has an answer."""
    answers = [extract(t) for t in completions]
    voted = [a for a in answers if a is not None]
    if not voted:
        return 0.0
    top = Counter(voted).most_common(1)[0][0]
    return scores[answers.index(top)]
