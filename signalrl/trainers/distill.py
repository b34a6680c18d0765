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
"""

from __future__ import annotations

import time
from typing import Any

import torch

from signalrl.config import Recipe
from signalrl.data.collate import SequenceBatch, build_batch
from signalrl.losses.advantages import group_advantages
from signalrl.losses.distill import reverse_kl_per_token
from signalrl.losses.kl import kl_estimate
from signalrl.models import count_parameters, load_model
from signalrl.models.logprobs import completion_logps
from signalrl.rollout.sampler import generate
from signalrl.trainers.online_rl import OnlineRLTrainer, peak_memory_mb


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
        super().__init__(recipe, **kw)
        d = recipe.distill
        assert d.teacher, "trainer 'distill' needs distill.teacher"
        m = recipe.model
        self.teacher, teacher_tok = load_model(
            d.teacher,
            dtype=m.dtype,
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
        if self.recipe.distill.mode == "off_policy":
            return self._off_policy_step()
        self._distill_metrics = {}
        metrics, samples = super().train_step()
        metrics.update(self._distill_metrics)
        return metrics, samples

    # -- off-policy (SFT on teacher samples) ---------------------------------------------------
    def _off_policy_step(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        t0 = time.time()
        b, g = self.recipe.train.batch_size, self.sampling.n
        rows = [self.rows[i] for i in self.data.take(b)]
        r = generate(
            self.teacher,
            self.tokenizer,
            [x["prompt"] for x in rows],
            self.sampling,
            generator=self.generator,
            autocast_dtype=self.autocast_dtype,
        )
        t_rollout = time.time() - t0
        lengths = [int(x) for x in r.lengths.tolist()]
        row_of = [rows[i // g] for i in range(len(r))]
        scored = self.rewards([x["prompt"] for x in row_of], r.texts, row_of, lengths)
        completions = [r.completion_ids[i, : lengths[i]].tolist() for i in range(len(r))]
        batch = build_batch(
            r.prompt_ids, completions, self.tokenizer.pad_token_id, device=self.device
        )
        n_tok = batch.completion_mask.sum()
        teacher_logp = float(r.logps[:, : batch.completion_mask.shape[1]].sum()) / max(
            float(n_tok), 1.0
        )
        self.model.train()
        total = 0.0
        for s in self._micro_slices(len(batch)):
            mb = batch.select(s)
            logps = completion_logps(self.model, mb, autocast_dtype=self.autocast_dtype)
            loss = -(logps * mb.completion_mask).sum() / n_tok
            loss.backward()
            total += float(loss.detach())
        opt = self.optimizer_step()
        rewards = torch.tensor(scored.total, dtype=torch.float32)
        t_total = time.time() - t0
        metrics: dict[str, float] = {
            "loss": total,
            "distill/nll": total,
            "distill/teacher_logp": teacher_logp,
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "completion/mean_length": float(batch.completion_mask.sum(-1).mean()),
            "grad_norm": opt["grad_norm"],
            "lr": opt["lr"],
            "time/rollout_s": t_rollout,
            "time/step_s": t_total,
            "memory/peak_mb": peak_memory_mb(self.device),
            **self.models_held,
        }
        for name, values in scored.components.items():
            metrics[f"reward/{name}"] = float(torch.tensor(values).mean())
        samples = [
            {
                "prompt": row_of[i]["prompt"],
                "completion": r.texts[i],
                "answer": row_of[i].get("answer"),
                "reward": float(rewards[i]),
            }
            for i in range(len(r))
        ]
        return metrics, samples

    def progress_info(self, metrics: dict[str, Any]) -> str:
        kl = metrics.get("distill/reverse_kl", metrics.get("distill/nll", float("nan")))
        name = "rkl" if "distill/reverse_kl" in metrics else "nll"
        return f"{name} {kl:.3f}  reward {metrics.get('reward/mean', float('nan')):.3f}"
