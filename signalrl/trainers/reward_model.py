"""Reward model training: a Bradley-Terry classifier on preference pairs.

The reward model is a causal LM body with a scalar head: `AutoModelForSequenceClassification`
with `num_labels=1`, loaded from `model.name_or_path` (a local checkpoint, usually the SFT
model; for a preset name the preset is built, saved to a temp dir and loaded from there). The
head is newly initialised. `config.pad_token_id` is set, so the reward is read at the last
non-pad token of each row (rows are right-padded).

Data: `data.path` with rows {prompt, chosen, rejected} (strings or chat messages), loaded and
validated by `signalrl.data.preference` exactly as for the preference trainer; an optional
numeric `margin` column is used as a per-pair margin. `data.test_path`, or a
`data.test_fraction` of the rows (the same rows `split_data` holds out for DPO with the same
seed), is held out. Each row is scored as the text `prompt + completion` tokenised as a whole,
without EOS: exactly what `signalrl.rewards.model.RewardModelScorer` scores at RL time (the
sampler's completion texts carry no special tokens). A row longer than `data.max_length`
tokens (default: the model's `max_position_embeddings`) is truncated as for DPO (the prompt
from the left, the completions from the right) with a warning; the count is logged as
`data/truncated_rows`.

Loss (`signalrl.losses.reward.bradley_terry_loss`): `-log sigmoid(r_c - r_r - margin)` per pair
(Ouyang et al. 2022), plus `reward_model.center_coef * (r_c + r_r)^2`. Chosen and rejected rows
of a micro-batch go through ONE forward (chosen rows stacked over rejected rows); per-pair
losses are summed and divided by the step's pair count, so accumulation gives the mean exactly.

Metrics: `loss`, `accuracy` (fraction of pairs with r_c > r_r; also as `rewards/accuracies`),
`rewards/chosen`, `rewards/rejected`, `rewards/margins`, `grad_norm`, `lr`; at eval (every
`eval.every` steps and at the end) the same on the held-out pairs with an `eval/` prefix. The
recipe's task is not evaluated (a classifier does not generate): `finish()` returns the
held-out pair accuracy as `accuracy`. `final/` loads with
`AutoModelForSequenceClassification.from_pretrained` and holds the tokenizer.
"""

from __future__ import annotations

import copy
import gc
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from signalrl.config import RewardModelRecipe
from signalrl.data.preference import (
    PreferenceDataError,
    heldout_indices,
    parse_rows,
    read_located_rows,
    truncate_row,
    warn_truncated,
)
from signalrl.losses.reward import bradley_terry_loss, reward_pair_metrics
from signalrl.models import (
    check_tokenizer,
    from_pretrained_checked,
    is_preset,
    load_model,
    load_tokenizer_checked,
    resolve_device,
    resolve_dtype,
)
from signalrl.models.logprobs import autocast_context
from signalrl.trainers.base import DataCursor, MicroLoss, StepResult, TrainerBase


def load_reward_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device = "cpu",
    seed: int = 0,
    architecture: str = "qwen2",
    tokenizer: str = "char",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`(model, tokenizer)`: a one-label `AutoModelForSequenceClassification` from a local
    checkpoint directory (a causal LM gets a new score head; a reward model keeps its own) or a
    preset name (built with `load_model`, its body copied into the classifier in memory)."""
    torch_dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new score head is initialised from the model seed
        if is_preset(name_or_path):
            lm, tok = load_model(
                name_or_path, seed=seed, architecture=architecture, tokenizer=tokenizer
            )
            model = _classifier_from(lm, torch_dtype)
            del lm
        else:
            path = Path(name_or_path)
            if not (path / "config.json").is_file():
                raise FileNotFoundError(
                    f"model {name_or_path!r}: not a preset nor a checkpoint directory"
                )
            model = from_pretrained_checked(
                AutoModelForSequenceClassification,
                path,
                num_labels=1,
                dtype=torch_dtype,
                attn_implementation="sdpa",
            )
            tok = load_tokenizer_checked(path)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"{name_or_path}: tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id  # the reward is read at the last non-pad token
    check_tokenizer(model, tok, name_or_path)
    return model.to(device), tok


def _classifier_from(lm: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """A one-label sequence classifier with `lm`'s body and a new score head, built in memory:
    under torchrun a temporary `save_pretrained` directory would be written by rank 0 only
    (transformers writes on rank 0 when a process group is up)."""
    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(lm.state_dict(), strict=False)
    head = {n for n, _ in lm.get_output_embeddings().named_parameters(prefix="lm_head")}
    if any(not k.startswith("score.") for k in missing) or set(unexpected) - head:
        raise RuntimeError(  # pragma: no cover - a preset whose body does not map
            f"preset body does not map onto {type(model).__name__}: missing {missing}, "
            f"unexpected {unexpected}"
        )
    return model.to(dtype)


@dataclass
class RewardPairs:
    """Token ids of `prompt + chosen` and `prompt + rejected` (no EOS), optional margins."""

    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    margins: list[float] | None = None
    prompts: list[str] | None = None
    truncated: int = 0  # rows of the loaded file cut to max_length (a subset keeps 0)

    def __len__(self) -> int:
        return len(self.chosen_ids)

    def subset(self, idx: list[int]) -> RewardPairs:
        return RewardPairs(
            [self.chosen_ids[i] for i in idx],
            [self.rejected_ids[i] for i in idx],
            None if self.margins is None else [self.margins[i] for i in idx],
            None if self.prompts is None else [self.prompts[i] for i in idx],
        )


def load_reward_pairs(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    fmt: str = "auto",
    max_length: int | None = None,
) -> RewardPairs:
    """Load and validate {prompt, chosen, rejected} rows (see `signalrl.data.preference`) and
    tokenise each `prompt + completion` text as a whole, as the reward scorer does. With
    `max_length`, a row whose longer text is over `max_length` tokens is truncated by the
    preference data's rule (`signalrl.data.preference.truncate_row`: the prompt from the
    left, the completions from the right; prompt and completions are then tokenised apart)
    and counted in `RewardPairs.truncated`; a pair identical once truncated is an error."""
    source = str(path)
    located = read_located_rows(path, fmt)
    where = [w for w, _ in located]
    rows = [r for _, r in located]
    prompts, chosen, rejected, _ = parse_rows(
        rows, tokenizer, kind="paired", source=source, where=where
    )
    assert rejected is not None
    margins = _margins(rows, where)

    def encode(texts: list[str]) -> list[list[int]]:
        return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    c_ids = encode([p + c for p, c in zip(prompts, chosen, strict=True)])
    r_ids = encode([p + r for p, r in zip(prompts, rejected, strict=True)])
    truncated, first = 0, ""
    for i in range(len(c_ids)):
        if max_length is None or max(len(c_ids[i]), len(r_ids[i])) <= max_length:
            continue
        (p_ids, comp, rej) = encode([prompts[i], chosen[i], rejected[i]])
        p_ids, (comp, rej), _ = truncate_row(p_ids, [comp, rej], max_length)
        c_ids[i], r_ids[i] = p_ids + comp, p_ids + rej
        truncated, first = truncated + 1, first or where[i]
        if c_ids[i] == r_ids[i]:
            raise PreferenceDataError(
                f"{where[i]}: 'chosen' and 'rejected' are identical once truncated to "
                f"data.max_length={max_length} tokens; raise data.max_length"
            )
    warn_truncated(source, truncated, len(c_ids), first, max_length or 0)
    return RewardPairs(c_ids, r_ids, margins, prompts, truncated)


def _margins(rows: list[Any], where: list[str]) -> list[float] | None:
    """The optional numeric `margin` column: in every row or in none."""
    if not any(r.get("margin") is not None for r in rows):
        return None
    margins = []
    for r, at in zip(rows, where, strict=True):
        m = r.get("margin")
        ok = isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m)
        if not ok:
            raise PreferenceDataError(
                f"{at}: field 'margin' must be a finite number (or absent from every row), "
                f"got {m!r}"
            )
        margins.append(float(m))
    return margins


def split_pairs(
    pairs: RewardPairs, fraction: float, seed: int
) -> tuple[RewardPairs, RewardPairs | None]:
    """The same held-out rows as `signalrl.data.preference.split_data` (whole prompts, same
    size rule and shuffle), so a reward model and a DPO run with one seed hold out the same
    pairs and no held-out prompt is seen in training."""
    n = len(pairs)
    test = heldout_indices(n, fraction, seed, pairs.prompts)
    if not test:
        return pairs, None
    held = set(test)
    return pairs.subset([i for i in range(n) if i not in held]), pairs.subset(test)


class RewardModelTrainer(TrainerBase):
    recipe: RewardModelRecipe

    def __init__(self, recipe: RewardModelRecipe, **kw: Any) -> None:
        super().__init__(recipe, **kw)
        # TrainerBase loaded a causal LM; a reward model is a sequence classifier. Free the LM
        # first, then load the classifier from the same source (the checkpoint on resume).
        m = recipe.model
        source = str(self.resume_from) if self.resume_from else m.name_or_path
        del self.model
        gc.collect()
        self.model, self.tokenizer = load_reward_model(
            source,
            dtype=m.dtype,
            device=self.device,
            seed=m.seed,
            architecture=m.architecture,
            tokenizer=m.tokenizer,
        )
        d = recipe.data
        assert d.path is not None
        max_length = d.max_length or getattr(self.model.config, "max_position_embeddings", None)
        pairs = load_reward_pairs(d.path, self.tokenizer, d.format, max_length)
        self.truncated_rows = pairs.truncated
        if d.test_path:
            self.train_data: RewardPairs = pairs
            self.test_data: RewardPairs | None = load_reward_pairs(
                d.test_path, self.tokenizer, d.format, max_length
            )
            self.truncated_rows += self.test_data.truncated
        else:
            self.train_data, self.test_data = split_pairs(pairs, d.test_fraction, recipe.seed)
        self.data = DataCursor(len(self.train_data), recipe.seed)
        self.finish_setup()
        # logged with every step (beside models/held): rows cut to data.max_length
        self.models_held["data/truncated_rows"] = float(self.truncated_rows)

    # -- forward --------------------------------------------------------------------------
    def rewards(self, pairs: RewardPairs, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards (B,) of the chosen and the rejected rows of pairs `idx`, in one forward."""
        seqs = [pairs.chosen_ids[i] for i in idx] + [pairs.rejected_ids[i] for i in idx]
        pad = self.tokenizer.pad_token_id
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            attn[i, : len(s)] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        with autocast_context(self.device, self.autocast_dtype):
            out = self.model(input_ids=ids, attention_mask=attn, use_cache=False)
        r = out.logits[:, 0].float()
        b = len(idx)
        return r[:b], r[b:]

    def _losses(
        self, pairs: RewardPairs, idx: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rc, rr = self.rewards(pairs, idx)
        margin = None
        if pairs.margins is not None:
            margin = torch.tensor([pairs.margins[i] for i in idx], device=rc.device)
        losses = bradley_terry_loss(
            rc, rr, margin, center_coef=self.recipe.reward_model.center_coef
        )
        return losses, rc, rr

    def held_models(self) -> list[tuple[str, torch.nn.Module]]:
        return [("reward_model", self.model)]

    # -- the step ---------------------------------------------------------------------------
    def next_batch(self) -> tuple[list[int], dict[str, float]]:
        return self.data.take(self.recipe.train.batch_size), {"epoch": float(self.data.epoch)}

    def micro_batches(self, batch: list[int]) -> tuple[list[list[int]], float]:
        return [batch[s] for s in self.micro_slices(len(batch))], float(len(batch))

    def micro_loss(self, batch: list[int], chunk: list[int], epoch: int) -> MicroLoss:
        losses, rc, rr = self._losses(self.train_data, chunk)
        self.budget.forward_tokens += sum(
            len(self.train_data.chosen_ids[i]) + len(self.train_data.rejected_ids[i]) for i in chunk
        )
        return MicroLoss(losses.sum() / len(chunk), len(chunk), aux=(rc.detach(), rr.detach()))

    def step_metrics(self, batch: list[int], result: StepResult) -> dict[str, float]:
        rc = torch.cat([a[0] for a in result.aux])
        rr = torch.cat([a[1] for a in result.aux])
        return {**result.metrics(), **reward_pair_metrics(rc, rr)}

    @torch.no_grad()
    def pair_eval(self, pairs: RewardPairs | None = None) -> dict[str, float]:
        """`eval/` metrics on the held-out pairs (empty without held-out data)."""
        pairs = self.test_data if pairs is None else pairs
        if pairs is None or len(pairs) == 0:
            return {}
        was_training = self.model.training
        self.model.eval()
        size = self.recipe.train.micro_batch_size or self.recipe.train.batch_size
        losses, chosen, rejected = [], [], []
        for s in range(0, len(pairs), size):
            lo, rc, rr = self._losses(pairs, list(range(s, min(len(pairs), s + size))))
            losses.append(lo)
            chosen.append(rc)
            rejected.append(rr)
        self.model.train(was_training)
        metrics = reward_pair_metrics(torch.cat(chosen), torch.cat(rejected))
        metrics["loss"] = float(torch.cat(losses).mean())
        return {f"eval/{k}": v for k, v in metrics.items()}

    def maybe_evaluate(self, metrics: dict[str, Any]) -> None:
        every = self.recipe.eval.every
        if every and self.step % every == 0 and self.step < self.recipe.train.steps:
            metrics.update(self.pair_eval())

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Held-out pair accuracy (no task sampling: a classifier does not generate),
        `final/` and the last metrics row."""
        ev = self.pair_eval()
        if not ev:
            self.console.print(
                "[yellow]no held-out pairs (data.test_fraction 0, no data.test_path): "
                "accuracy is nan"
            )
        metrics.update(ev)
        metrics["time/elapsed_s"] = self.elapsed()
        self.run.log_metrics(self.step, metrics)
        self.save_final()
        self.write_report()
        self.close_run()
        return {
            "accuracy": ev.get("eval/accuracy", float("nan")),
            "seconds": self.elapsed(),
            "model": str(self.run.final),
            "steps": self.step,
            **{k: v for k, v in ev.items() if k != "eval/accuracy"},
        }

    def progress_info(self, metrics: dict[str, Any]) -> str:
        info = super().progress_info(metrics)
        if "accuracy" in metrics:
            info += f"  pair-acc {metrics['accuracy']:.2f}"
        return info
