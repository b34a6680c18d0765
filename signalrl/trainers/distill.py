"""Distillation from a frozen teacher that shares the student's tokenizer.

`distill.mode: on_policy` (Agarwal et al. 2024, "On-Policy Distillation of Language Models:
Learning from Self-Generated Mistakes" (GKD); Thinking Machines 2025, "On-Policy
Distillation"): one step is

1. `B` prompts x `G` completions sampled from the student (as in online RL);
2. the teacher scores the sampled tokens in one forward pass (no generation);
3. the per-token advantage is the negative single-sample reverse KL estimate
   `A_t = -(log pi_student(y_t) - log pi_teacher(y_t))` (detached; the student's log-probs are
   the sampler's, both at `sampling.temperature`), plus, when `distill.reward_weight > 0`,
   `reward_weight` times the group-normalised verifier reward broadcast over the tokens;
4. the policy-gradient loss (`policy_loss` with `(B, T)` advantages; token-mean by default).

No critic and no group are needed for the distillation signal. The verifier rewards are still
computed and logged (`reward/*`).

`distill.mode: off_policy` is the baseline (sequence-level KD / SFT on teacher samples): the
teacher generates `G` completions per prompt and the student is trained with the token-mean
NLL of them.

`distill.mode: gkd` is Generalized Knowledge Distillation (Agarwal et al. 2024, Algorithm 1):
each step draws `u ~ U(0, 1)` from a seeded generator (checkpointed, so a run is deterministic
under `seed` and resumable); when `u < distill.lmbda` the batch is `B` prompts x `G` student
samples (on-policy), otherwise it is the off-policy data `distill.gkd_data`:

- `dataset` (default, as TRL's `GKDTrainer`): `B * G` rows of the task's train split with
  their reference completions (the SFT targets, EOS appended) -- the same number of sequences
  as a sampled batch;
- `teacher`: `B` prompts x `G` teacher samples (the `off_policy` mode's data).

Both models then run one forward over the batch, and the loss is the token-mean
`generalized_jsd(student_logits, teacher_logits, mask, beta=distill.jsd_beta,
temperature=sampling.temperature)` over the full vocabulary on the completion tokens
(`beta=0`: forward KL(teacher || student), `beta=1`: reverse KL(student || teacher)); the
gradient flows through the student's full distribution, with no sampling in the loss. Memory:
the teacher's and the student's completion logits, `micro_batch_size x T x V` each, are held
per micro-batch (set `train.micro_batch_size` to bound them); the divergence is computed in
chunks of tokens (`signalrl.losses.distill`). `distill.reward_weight` is on-policy only.

`distill.teacher_dtype: bfloat16` holds the frozen teacher in bf16 (its log-probs and logits
are cast to float32 before use), the usual choice for a teacher much larger than the student.

Every mode logs the cumulative budget counters `student/forward_tokens` and `time/train_s`
(see `signalrl.rollout.collect.count_forward_tokens`); the teacher's passes are not counted.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from typing import Any

import torch

from signalrl.config import DistillRecipe
from signalrl.data.collate import SequenceBatch, build_batch, tokenize_sft
from signalrl.losses.advantages import group_advantages
from signalrl.losses.distill import generalized_jsd, reverse_kl_per_token
from signalrl.losses.kl import kl_estimate
from signalrl.losses.policy import token_logprobs
from signalrl.models import load_model
from signalrl.models.logprobs import autocast_context
from signalrl.rollout.batch import RolloutBatch, Row
from signalrl.trainers.base import MicroLoss, StepResult
from signalrl.trainers.online_rl import OnlineRLTrainer, RLBatch


def completion_logits(
    model: torch.nn.Module,
    batch: SequenceBatch,
    autocast_dtype: torch.dtype | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """`(N, T, V)` logits predicting each completion token of `batch` (one forward pass; only
    the `T + 1` last positions go through the LM head when the model takes `logits_to_keep`).
    With `vocab_size`, only the first `vocab_size` columns: real checkpoints pad their
    embedding beyond the tokenizer (Qwen2-7B: 152064 rows for 151665 tokens), and the rows past
    it are no token."""
    t = batch.completion_ids.shape[1]
    kwargs = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = t + 1
    with autocast_context(batch.input_ids.device, autocast_dtype):
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
            **kwargs,
        )
    logits = out.logits[:, -(t + 1) : -1, :]
    if vocab_size is not None:
        if logits.shape[-1] < vocab_size:
            raise ValueError(
                f"the model's LM head has {logits.shape[-1]} outputs but the tokenizer has "
                f"{vocab_size} tokens"
            )
        logits = logits[..., :vocab_size]
    return logits


def check_same_vocab(
    student_tok: Any, teacher_tok: Any, student: str = "student", teacher: str = "teacher"
) -> int:
    """Raise ValueError naming both vocabulary sizes and one differing token when the two
    tokenizers do not map the same strings to the same ids. Returns the shared vocabulary
    size, the logit columns GKD compares (the models' embeddings may be padded beyond it, by
    different amounts)."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv == tv:
        return len(student_tok)
    diff = None
    for tok, i in sorted(sv.items(), key=lambda kv: kv[1]):
        if tv.get(tok) != i:
            where = f"id {tv[tok]} in the teacher" if tok in tv else "missing in the teacher"
            diff = f"token {tok!r} has id {i} in the student and is {where}"
            break
    if diff is None:
        tok, i = min(((t, j) for t, j in tv.items() if t not in sv), key=lambda kv: kv[1])
        diff = f"token {tok!r} has id {i} in the teacher and is missing in the student"
    raise ValueError(
        f"teacher {teacher!r} and student {student!r} do not share a tokenizer: vocabulary "
        f"sizes {len(tv)} (teacher) and {len(sv)} (student); {diff}"
    )


@dataclass
class ReferenceBatch:
    """GKD's `dataset` data: train rows with their reference completions (no sampling)."""

    rows: list[Row]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]


@dataclass
class DistillBatch:
    """An off-policy or GKD step's data, collated."""

    data: RolloutBatch | ReferenceBatch
    seq: SequenceBatch
    on_policy: bool


class DistillTrainer(OnlineRLTrainer):
    recipe: DistillRecipe

    def __init__(self, recipe: DistillRecipe, **kw: Any) -> None:
        self.teacher: torch.nn.Module | None = None
        # GKD's on-/off-policy coin: its own stream, so sampling does not shift it (created
        # before the base class resumes, which restores its state)
        self.gkd_rng = random.Random(recipe.seed * 1_000_003 + 6)
        self._distill_metrics: dict[str, float] = {}
        self.ref_prompts: list[list[int]] = []
        self.ref_completions: list[list[int]] = []
        super().__init__(recipe, **kw)

    def setup_extra(self) -> None:
        """Load and freeze the teacher; tokenise the reference completions GKD may use."""
        d, m = self.recipe.distill, self.recipe.model
        assert d.teacher, "trainer 'distill' needs distill.teacher"
        self.teacher, teacher_tok = load_model(
            d.teacher,
            dtype=d.teacher_dtype or m.dtype,
            seed=m.seed,
            device=self.device,
            attn_implementation=m.attn_implementation,
            # a preset teacher is built like a preset student (same tokenizer, same family)
            architecture=m.architecture,
            tokenizer=m.tokenizer,
        )
        check_same_vocab(self.tokenizer, teacher_tok, m.name_or_path, d.teacher)
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.console.print(f"distillation teacher: {d.teacher}")
        if d.mode == "gkd" and d.gkd_data == "dataset" and d.lmbda < 1:
            self._tokenize_references()

    def _tokenize_references(self) -> None:
        missing = [i for i, r in enumerate(self.rows) if not r.get("completion")]
        if missing:
            raise ValueError(
                f"distill.gkd_data 'dataset' needs reference completions, but train row "
                f"{missing[0]} of task {self.task.name!r} has no 'completion' field "
                f"({len(missing)} of {len(self.rows)} rows lack one); use distill.gkd_data: "
                "teacher"
            )
        self.ref_prompts, self.ref_completions = tokenize_sft(
            self.tokenizer,
            [r["prompt"] for r in self.rows],
            [r["completion"] for r in self.rows],
            source=f"task {self.task.name} (train)",
            messages=[r.get("messages") for r in self.rows],  # chat rows end with the turn end
        )

    def held_models(self) -> list[tuple[str, torch.nn.Module]]:
        held = super().held_models()
        if self.teacher is not None:
            held.append(("teacher", self.teacher))
        return held

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "gkd_rng": self.gkd_rng.getstate()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        if "gkd_rng" in state:
            self.gkd_rng.setstate(state["gkd_rng"])

    # -- on-policy ------------------------------------------------------------------------------
    def advantages(
        self,
        rewards: torch.Tensor,
        batch: SequenceBatch,
        behaviour: torch.Tensor,
        ref_logps: torch.Tensor | None,
        slices: list[slice],
        prompt_ids: list[list[int]],
        roll: RolloutBatch | None = None,
        baseline: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(N, T) advantages `-(logp_student - logp_teacher)` on the sampled tokens. In a
        multi-turn episode the teacher scores the whole trajectory (its context holds the
        environment's tokens), and only the student's sampled tokens count (policy mask)."""
        rl, d = self.recipe.rl, self.recipe.distill
        assert self.teacher is not None
        mask = batch.completion_mask
        if roll is not None:  # multi-turn: the environment's tokens are context only
            mask, _ = roll.estimator_mask_and_rewards(mask)
        teacher = self._logps_no_grad(self.teacher, batch, prompt_ids, slices)
        rkl = reverse_kl_per_token(behaviour, teacher).detach() * mask
        adv = -rkl
        extras: dict[str, torch.Tensor] = {}
        if d.reward_weight > 0:
            r_adv = group_advantages(rewards, rl.group_size, scale=rl.adv_scale)
            adv = adv + d.reward_weight * r_adv[:, None] * mask
        if ref_logps is not None and rl.kl_placement == "reward":
            kl = kl_estimate(behaviour, ref_logps, kind=rl.kl_estimator) * mask
            extras["kl"] = kl
            adv = adv - rl.kl_coef * kl
        n_tok = float(mask.sum()) or 1.0
        self._distill_metrics = {
            "distill/reverse_kl": float(rkl.sum()) / n_tok,
            "distill/teacher_logp": float((teacher * mask).sum()) / n_tok,
            "distill/student_logp": float((behaviour * mask).sum()) / n_tok,
        }
        return adv, extras

    # -- the data of a step ----------------------------------------------------------------------
    def _sampled(self, model: torch.nn.Module) -> RolloutBatch:
        """`B` prompts x `G` completions sampled from `model` (the student's generation tokens
        are counted), scored by the verifier."""
        rows = [self.rows[i] for i in self.data.take(self.recipe.train.batch_size)]
        return self.rollout(rows, model=model)

    def _reference_batch(self) -> ReferenceBatch:
        """`B * G` train rows with their reference completions (GKD's `dataset` data)."""
        idx = self.data.take(self.recipe.train.batch_size * self.sampling.n)
        return ReferenceBatch(
            rows=[self.rows[i] for i in idx],
            prompt_ids=[self.ref_prompts[i] for i in idx],
            completion_ids=[self.ref_completions[i] for i in idx],
            texts=[self.rows[i]["completion"] for i in idx],
        )

    def next_batch(self) -> tuple[Any, dict[str, float]]:
        d = self.recipe.distill
        if d.mode == "on_policy":
            self._distill_metrics = {}
            return super().next_batch()
        on_policy = d.mode == "gkd" and self.gkd_rng.random() < d.lmbda
        data: RolloutBatch | ReferenceBatch
        if on_policy:
            data = self._sampled(self.model)
        elif d.mode == "off_policy" or d.gkd_data == "teacher":
            data = self._sampled(self.teacher)  # type: ignore[arg-type]
        else:
            data = self._reference_batch()
        seq = build_batch(
            data.prompt_ids, data.completion_ids, self.tokenizer.pad_token_id, device=self.device
        )
        return DistillBatch(data, seq, on_policy), {}

    # -- the loss ---------------------------------------------------------------------------------
    def micro_batches(self, batch: Any) -> tuple[list[Any], float]:
        if isinstance(batch, RLBatch):
            return super().micro_batches(batch)
        return self.micro_slices(len(batch.seq)), float(batch.seq.completion_mask.sum())

    def updates_per_batch(self) -> int:
        return self.recipe.rl.mu if self.recipe.distill.mode == "on_policy" else 1

    def micro_loss(self, batch: Any, chunk: Any, epoch: int) -> MicroLoss:
        if isinstance(batch, RLBatch):
            return super().micro_loss(batch, chunk, epoch)
        mb = batch.seq.select(chunk)
        mask = mb.completion_mask
        n = float(mask.sum())
        self.budget.forward_tokens += int(mb.attention_mask.sum())
        if self.recipe.distill.mode == "off_policy":  # SFT on the teacher's samples
            logps = self.seq_logps(self.model, mb)
            return MicroLoss(-(logps * mask).sum() / max(n, 1e-12), n)
        return self._jsd_loss(mb, n)

    def _jsd_loss(self, mb: SequenceBatch, n: float) -> MicroLoss:
        """GKD: the generalised JSD to the teacher over the full vocabulary, token-mean."""
        assert self.teacher is not None
        temperature, mask = self.recipe.sampling.temperature, mb.completion_mask
        # both over the tokenizer's vocabulary: embeddings padded past it (by different
        # amounts in the teacher and the student) are no token
        vocab = len(self.tokenizer)
        with torch.no_grad():
            t_logits = completion_logits(self.teacher, mb, self.autocast_dtype, vocab)
        s_logits = completion_logits(self.model, mb, self.autocast_dtype, vocab)
        jsd = generalized_jsd(
            s_logits, t_logits, mask, beta=self.recipe.distill.jsd_beta, temperature=temperature
        )
        with torch.no_grad():
            ids = mb.completion_ids
            t_lp = token_logprobs(t_logits, ids, temperature=temperature)
            s_lp = token_logprobs(s_logits.detach(), ids, temperature=temperature)
        per = max(n, 1e-12)
        metrics = {
            "distill/teacher_logp": float((t_lp * mask).sum()) / per,
            "distill/student_logp": float((s_lp * mask).sum()) / per,
        }
        return MicroLoss(jsd, n, metrics)

    # -- metrics -----------------------------------------------------------------------------------
    def step_metrics(self, batch: Any, result: StepResult) -> dict[str, float]:
        if isinstance(batch, RLBatch):
            return {**super().step_metrics(batch, result), **self._distill_metrics}
        data, seq = batch.data, batch.seq
        metrics = {
            **result.metrics(),
            "completion/mean_length": float(seq.completion_mask.sum(-1).mean()),
        }
        if self.recipe.distill.mode == "off_policy":
            n_tok = max(float(seq.completion_mask.sum()), 1.0)
            metrics["distill/nll"] = metrics["loss"]
            metrics["distill/teacher_logp"] = (
                float(sum(float(x.sum()) for x in data.sampler_logps)) / n_tok
            )
        else:
            metrics["distill/jsd"] = metrics["loss"]
            metrics["distill/on_policy"] = float(batch.on_policy)
            if batch.on_policy:  # tokens sampled from the student: a one-sample reverse KL
                metrics["distill/reverse_kl"] = (
                    metrics["distill/student_logp"] - metrics["distill/teacher_logp"]
                )
        if isinstance(data, RolloutBatch):
            rewards = data.rewards
            metrics["reward/mean"] = float(rewards.mean())
            metrics["reward/std"] = float(rewards.std()) if len(rewards) > 1 else 0.0
            for name, values in data.components.items():
                metrics[f"reward/{name}"] = float(values.mean())
        return metrics

    def step_samples(self, batch: Any) -> list[dict[str, Any]]:
        if isinstance(batch, RLBatch):
            return super().step_samples(batch)
        data = batch.data
        if isinstance(data, RolloutBatch):
            return data.samples()
        return [
            {"prompt": r["prompt"], "completion": data.texts[i], "answer": r.get("answer")}
            for i, r in enumerate(data.rows)
        ]

    def progress_info(self, metrics: dict[str, Any]) -> str:
        names = {"distill/jsd": "jsd", "distill/reverse_kl": "rkl", "distill/nll": "nll"}
        key = next((k for k in names if k in metrics), "distill/nll")
        value = metrics.get(key, float("nan"))
        return f"{names[key]} {value:.3f}  reward {metrics.get('reward/mean', float('nan')):.3f}"
