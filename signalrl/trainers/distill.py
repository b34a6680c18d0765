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
`generalized_jsd(student_logits, teacher_logits, mask, beta=distill.beta,
temperature=sampling.temperature)` over the full vocabulary on the completion tokens
(`beta=0`: forward KL(teacher || student), `beta=1`: reverse KL(student || teacher)); the
gradient flows through the student's full distribution, with no sampling in the loss. Memory:
the teacher's and the student's completion logits, `micro_batch_size x T x V` each, are held
per micro-batch (set `train.micro_batch_size` to bound them); the divergence is computed in
chunks of tokens (`signalrl.losses.distill`). `distill.reward_weight` is on-policy only.

`distill.teacher_dtype: bfloat16` holds the frozen teacher in bf16 (its log-probs and logits
are cast to float32 before use), the usual choice for a teacher much larger than the student.

Every mode logs the cumulative budget counters `student/forward_tokens` and `time/train_s`
(see `signalrl.trainers.online_rl.count_forward_tokens`); the teacher's passes are not counted.
"""

from __future__ import annotations

import inspect
import random
import time
from typing import Any

import torch

from signalrl.config import Recipe
from signalrl.data.collate import SequenceBatch, build_batch, tokenize_sft
from signalrl.logging.memory import peak_memory_mb
from signalrl.losses.advantages import group_advantages
from signalrl.losses.distill import generalized_jsd, reverse_kl_per_token
from signalrl.losses.kl import kl_estimate
from signalrl.losses.policy import token_logprobs
from signalrl.models import count_parameters, load_model
from signalrl.models.logprobs import autocast_context, completion_logps
from signalrl.rollout.sampler import generate
from signalrl.trainers.online_rl import OnlineRLTrainer, count_forward_tokens


def completion_logits(
    model: torch.nn.Module, batch: SequenceBatch, autocast_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`(N, T, V)` logits predicting each completion token of `batch` (one forward pass; only
    the `T + 1` last positions go through the LM head when the model takes `logits_to_keep`)."""
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
    return out.logits[:, -(t + 1) : -1, :]


def check_same_vocab(
    student_tok: Any, teacher_tok: Any, student: str = "student", teacher: str = "teacher"
) -> None:
    """Raise ValueError naming both vocabulary sizes and one differing token when the two
    tokenizers do not map the same strings to the same ids."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv == tv:
        return
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


class DistillTrainer(OnlineRLTrainer):
    def __init__(self, recipe: Recipe, **kw: Any) -> None:
        self.teacher = None
        # GKD's on-/off-policy coin: its own stream, so sampling does not shift it (created
        # before the base class resumes, which restores its state)
        self.gkd_rng = random.Random(recipe.seed * 1_000_003 + 6)
        super().__init__(recipe, **kw)
        d = recipe.distill
        assert d.teacher, "trainer 'distill' needs distill.teacher"
        m = recipe.model
        self.teacher, teacher_tok = load_model(
            d.teacher,
            dtype=d.teacher_dtype or m.dtype,
            seed=m.seed,
            device=self.device,
            attn_implementation=m.attn_implementation,
        )
        check_same_vocab(self.tokenizer, teacher_tok, m.name_or_path, d.teacher)
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.models_held = self._models_held()
        self._distill_metrics: dict[str, float] = {}
        self.ref_prompts: list[list[int]] = []
        self.ref_completions: list[list[int]] = []
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
        )

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "gkd_rng": self.gkd_rng.getstate()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        if "gkd_rng" in state:
            self.gkd_rng.setstate(state["gkd_rng"])

    def _models_held(self) -> dict[str, float]:
        if self.teacher is None:  # OnlineRLTrainer.__init__, before the teacher is loaded
            return {}
        held = super()._models_held()
        self.console.print(f"distillation teacher: {self.recipe.distill.teacher}")
        return {
            "models/held": held["models/held"] + 1,
            "models/params_held": held["models/params_held"] + count_parameters(self.teacher),
        }

    # -- on-policy ------------------------------------------------------------------------------
    def advantages(
        self,
        rewards: torch.Tensor,
        batch: SequenceBatch,
        behaviour: torch.Tensor,
        ref_logps: torch.Tensor | None,
        slices: list[slice],
        prompt_ids: list[list[int]],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(N, T) advantages `-(logp_student - logp_teacher)` on the sampled tokens."""
        rl, d = self.recipe.rl, self.recipe.distill
        mask = batch.completion_mask
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
            adv = adv - rl.beta * kl
        n_tok = float(mask.sum()) or 1.0
        self._distill_metrics = {
            "distill/reverse_kl": float(rkl.sum()) / n_tok,
            "distill/teacher_logp": float((teacher * mask).sum()) / n_tok,
            "distill/student_logp": float((behaviour * mask).sum()) / n_tok,
        }
        return adv, extras

    def train_step(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        mode = self.recipe.distill.mode
        if mode == "off_policy":
            return self._off_policy_step()
        if mode == "gkd":
            return self._gkd_step()
        self._distill_metrics = {}
        metrics, samples = super().train_step()
        metrics.update(self._distill_metrics)
        return metrics, samples

    # -- generated batches (teacher samples; GKD's student samples) -----------------------------
    def _sampled(self, model: torch.nn.Module) -> dict[str, Any]:
        """`B` prompts x `G` completions sampled from `model` (the student's generation tokens
        are counted), scored by the verifier."""
        b, g = self.recipe.train.batch_size, self.sampling.n
        rows = [self.rows[i] for i in self.data.take(b)]
        r = generate(
            model,
            self.tokenizer,
            [x["prompt"] for x in rows],
            self.sampling,
            generator=self.generator,
            autocast_dtype=self.autocast_dtype,
        )
        lengths = [int(x) for x in r.lengths.tolist()]
        if model is self.model:
            self.forward_tokens += count_forward_tokens(r.prompt_ids[::g], sum(lengths))
        row_of = [rows[i // g] for i in range(len(r))]
        scored = self.rewards([x["prompt"] for x in row_of], r.texts, row_of, lengths)
        return {
            "rows": row_of,
            "prompt_ids": r.prompt_ids,
            "completions": [r.completion_ids[i, : lengths[i]].tolist() for i in range(len(r))],
            "sampler_logps": r.logps,
            "texts": r.texts,
            "rewards": torch.tensor(scored.total, dtype=torch.float32),
            "components": scored.components,
        }

    def _reference_batch(self) -> dict[str, Any]:
        """`B * G` train rows with their reference completions (GKD's `dataset` data)."""
        n = self.recipe.train.batch_size * self.sampling.n
        idx = self.data.take(n)
        return {
            "rows": [self.rows[i] for i in idx],
            "prompt_ids": [self.ref_prompts[i] for i in idx],
            "completions": [self.ref_completions[i] for i in idx],
            "texts": [self.rows[i]["completion"] for i in idx],
        }

    def _common_metrics(
        self, data: dict[str, Any], batch: SequenceBatch, t0: float, t_data: float
    ) -> dict[str, float]:
        metrics: dict[str, float] = {
            "completion/mean_length": float(batch.completion_mask.sum(-1).mean()),
            "time/rollout_s": t_data,
            "time/step_s": time.time() - t0,
            "memory/peak_mb": peak_memory_mb(self.device),
            **self.models_held,
        }
        if "rewards" in data:
            rewards = data["rewards"]
            metrics["reward/mean"] = float(rewards.mean())
            metrics["reward/std"] = float(rewards.std()) if len(rewards) > 1 else 0.0
            for name, values in data["components"].items():
                metrics[f"reward/{name}"] = float(torch.tensor(values).mean())
        return self.account(metrics)

    @staticmethod
    def _samples(data: dict[str, Any]) -> list[dict[str, Any]]:
        rewards = data.get("rewards")
        return [
            {
                "prompt": row["prompt"],
                "completion": data["texts"][i],
                "answer": row.get("answer"),
                **({"reward": float(rewards[i])} if rewards is not None else {}),
            }
            for i, row in enumerate(data["rows"])
        ]

    # -- off-policy (SFT on teacher samples) ---------------------------------------------------
    def _off_policy_step(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        t0 = time.time()
        data = self._sampled(self.teacher)
        t_data = time.time() - t0
        batch = build_batch(
            data["prompt_ids"], data["completions"], self.tokenizer.pad_token_id, device=self.device
        )
        n_tok = batch.completion_mask.sum()
        width = batch.completion_mask.shape[1]
        teacher_logp = float(data["sampler_logps"][:, :width].sum()) / max(float(n_tok), 1.0)
        self.model.train()
        total = 0.0
        for s in self._micro_slices(len(batch)):
            mb = batch.select(s)
            self.forward_tokens += int(mb.attention_mask.sum())
            logps = completion_logps(self.model, mb, autocast_dtype=self.autocast_dtype)
            loss = -(logps * mb.completion_mask).sum() / n_tok
            loss.backward()
            total += float(loss.detach())
        opt = self.optimizer_step()
        metrics = {
            "loss": total,
            "distill/nll": total,
            "distill/teacher_logp": teacher_logp,
            "grad_norm": opt["grad_norm"],
            "lr": opt["lr"],
        }
        metrics.update(self._common_metrics(data, batch, t0, t_data))
        return metrics, self._samples(data)

    # -- GKD (generalised JSD on a lambda-mixture of student samples and off-policy data) ------
    def _gkd_step(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        d = self.recipe.distill
        temperature = self.recipe.sampling.temperature
        t0 = time.time()
        on_policy = self.gkd_rng.random() < d.lmbda
        if on_policy:
            data = self._sampled(self.model)
        elif d.gkd_data == "teacher":
            data = self._sampled(self.teacher)
        else:
            data = self._reference_batch()
        t_data = time.time() - t0
        batch = build_batch(
            data["prompt_ids"], data["completions"], self.tokenizer.pad_token_id, device=self.device
        )
        n_tok = float(batch.completion_mask.sum()) or 1.0
        self.model.train()
        jsd_sum = teacher_sum = student_sum = 0.0
        for s in self._micro_slices(len(batch)):
            mb = batch.select(s)
            mask = mb.completion_mask
            with torch.no_grad():
                t_logits = completion_logits(self.teacher, mb, self.autocast_dtype)
            self.forward_tokens += int(mb.attention_mask.sum())
            s_logits = completion_logits(self.model, mb, self.autocast_dtype)
            jsd = generalized_jsd(s_logits, t_logits, mask, beta=d.beta, temperature=temperature)
            share = float(mask.sum()) / n_tok
            (jsd * share).backward()
            jsd_sum += share * float(jsd.detach())
            with torch.no_grad():
                ids = mb.completion_ids
                teacher_sum += float(
                    (token_logprobs(t_logits, ids, temperature=temperature) * mask).sum()
                )
                student_sum += float(
                    (token_logprobs(s_logits.detach(), ids, temperature=temperature) * mask).sum()
                )
        opt = self.optimizer_step()
        metrics = {
            "loss": jsd_sum,
            "distill/jsd": jsd_sum,
            "distill/on_policy": float(on_policy),
            "distill/teacher_logp": teacher_sum / n_tok,
            "distill/student_logp": student_sum / n_tok,
            "grad_norm": opt["grad_norm"],
            "lr": opt["lr"],
        }
        if on_policy:  # tokens sampled from the student: a single-sample reverse-KL estimate
            metrics["distill/reverse_kl"] = (student_sum - teacher_sum) / n_tok
        metrics.update(self._common_metrics(data, batch, t0, t_data))
        return metrics, self._samples(data)

    def progress_info(self, metrics: dict[str, Any]) -> str:
        names = {"distill/jsd": "jsd", "distill/reverse_kl": "rkl", "distill/nll": "nll"}
        key = next((k for k in names if k in metrics), "distill/nll")
        value = metrics.get(key, float("nan"))
        return f"{names[key]} {value:.3f}  reward {metrics.get('reward/mean', float('nan')):.3f}"
