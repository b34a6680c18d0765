"""Preference optimisation: the DPO family, IPO, robust DPO, SimPO, ORPO, RPO and KTO.

Data: `data.path` (see `signalrl.data.preference`); `data.test_path` or a `data.test_fraction`
of the rows is held out for eval metrics. Per optimiser step `train.batch_size` pairs are
taken from the shuffled data (a resumable `DataCursor`, as in SFT), and split
into micro-batches of `train.micro_batch_size` pairs. Chosen and rejected completions go
through ONE forward pass (chosen rows stacked over rejected rows in one `SequenceBatch`).
Per-pair losses are summed and divided by the step's pair count, so gradient accumulation
gives the step's mean loss exactly (the batch-sorting `aot` losses excepted: they sort within
a micro-batch).

Log-probs are completion-only: a sequence log-prob is the sum over completion tokens (EOS
included); SimPO and ORPO use the average (sum / completion length) and IPO / sigmoid_norm get
the lengths. RPO is `dpo + rpo_alpha * NLL(chosen) per token`; ORPO is
`NLL(chosen) per token + orpo term` (both per pair, then averaged).

Reference (`preference.reference`):

* `copy`: a frozen copy of the starting policy (on resume: reloaded from `model.name_or_path`);
* `lora`: the policy is wrapped with a peft LoRA adapter on the attention and MLP projections,
  only the adapter trains, and the reference is the same model under `disable_adapter()` (no
  second copy). Checkpoints hold the base model plus `adapter/`; `final/` is a merged plain HF
  model (`merge_and_unload()` on a copy);
* `precomputed`: reference log-probs of every train and held-out row are computed once before
  training (no grad) and cached as `ref_logps.pt` in the run directory (reused on resume); the
  reference model is then freed. No sampled KL at eval in this mode;
* `none`: only for the reference-free simpo and orpo.

KTO (`loss_type: kto`, rows {prompt, completion, label}): the reference point z0 is a
detached estimate of KL(policy || ref) from mismatched pairs: completion i is scored after the
prompt of row (i + 1) mod N of the training set, and
`kl_ref = max(0, mean over the step's rows of (policy - ref) sequence log-probs)`.

Metrics: `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`,
`logps/chosen`, `logps/rejected`, `loss`, `grad_norm`, `lr`, `models/held`,
`models/params_held`, `models/params_trainable`, `memory/peak_mb` (peak of the training phase:
the peak is reset after set-up, whose own peak is `memory/setup_peak_mb`) (KTO: `rewards/*`
over desirable / undesirable rows and `kl`). At eval (every `eval.every` steps and at the end)
the same with an `eval/` prefix on the held-out rows, plus `eval/logratio_chosen` (mean over
held-out chosen tokens of policy - ref log-prob) and `eval/kl_ref` (k3 estimate of the per-
token KL(policy || ref) on completions sampled from the policy for the held-out prompts; live
reference only). At the end the same metrics over every training row are logged with a
`train_eval/` prefix (e.g. `train_eval/rewards/accuracies`: the fraction of training pairs the
final policy ranks correctly). `finish()` then evaluates the recipe's task like the other
trainers.

Online (iterative) DPO (`preference.online: true`, no data file): every step samples
`preference.online_samples` completions for each of `train.batch_size` task train prompts from
the current policy (`sampling.*`), the task verifier marks them, and
`signalrl.data.make_preferences.pick_pair_indices` makes up to `online_pairs_per_prompt`
(correct, wrong) pairs per prompt from the sampled token ids; one optimiser step is taken on
that step's pairs (a step with no pair only advances the schedule). Logged: `online/pairs`,
`online/sample_accuracy`, `online/prompts_without_pair`, `online/samples_seen`.

Budget counters (for `signalrl compare`), cumulative: `student/forward_tokens` (the policy's
sampling tokens, counted as in `signalrl.trainers.online_rl.count_forward_tokens`, plus the
non-padding tokens of its training forwards; reference passes are not counted; offline DPO's
pairs were sampled before the run and are not counted) and `time/train_s`.
"""

from __future__ import annotations

import copy
import hashlib
import time
from pathlib import Path
from typing import Any

import torch

from signalrl.config import REFERENCE_FREE_LOSSES, Recipe
from signalrl.data.collate import SequenceBatch, build_batch
from signalrl.data.make_preferences import pick_pair_indices
from signalrl.data.preference import PreferenceData, load_preference_data, split_data
from signalrl.logging.memory import peak_memory_mb, reset_peak_memory
from signalrl.losses.kl import kl_estimate
from signalrl.losses.preference import (
    dpo_loss,
    kto_loss,
    orpo_loss,
    preference_metrics,
    rpo_loss,
    simpo_loss,
)
from signalrl.models import count_parameters, load_model, save_model
from signalrl.models.logprobs import completion_logps
from signalrl.rollout.sampler import SamplingParams, generate
from signalrl.trainers.base import STATE_FILE, DataCursor, TrainerBase
from signalrl.trainers.online_rl import count_forward_tokens

REF_FILE = "ref_logps.pt"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _fingerprint(data: PreferenceData | None) -> str:
    if data is None:
        return ""
    h = hashlib.sha256()
    for rows in (data.prompt_ids, data.completion_ids, data.rejected_ids or []):
        for r in rows:
            h.update(repr(r).encode())
    return h.hexdigest()


class PreferenceTrainer(TrainerBase):
    def __init__(self, recipe: Recipe, **kw: Any) -> None:
        super().__init__(recipe, **kw)
        pc, d = recipe.preference, recipe.data
        self.kto = pc.loss_type == "kto"
        kind = "kto" if self.kto else "paired"
        self.online = pc.online
        self.test_data: PreferenceData | None = None
        if self.online:
            # pairs are sampled every step (see `_online_pairs`); held-out pairs only from a file
            self.rows = self.train_rows()
            self.train_data = PreferenceData([], [], [], None, [])
            if d.test_path:
                self.test_data = load_preference_data(
                    d.test_path, self.tokenizer, kind=kind, fmt=d.format
                )
            self.data = DataCursor(len(self.rows), recipe.seed)
            self.generator = torch.Generator(device=self.device).manual_seed(recipe.seed)
            self.online_sampling = self.sampling_params(pc.online_samples)
            self.samples_seen = 0
        else:
            assert d.path is not None
            data = load_preference_data(d.path, self.tokenizer, kind=kind, fmt=d.format)
            if d.test_path:
                self.train_data = data
                self.test_data = load_preference_data(
                    d.test_path, self.tokenizer, kind=kind, fmt=d.format
                )
            else:
                self.train_data, self.test_data = split_data(data, d.test_fraction, recipe.seed)
            self.data = DataCursor(len(self.train_data), recipe.seed)
        self.uses_ref = pc.loss_type not in REFERENCE_FREE_LOSSES and pc.reference != "none"
        self.ref_model: torch.nn.Module | None = None
        self.ref_cache: dict[str, Any] | None = None
        if pc.reference == "lora":
            self._wrap_lora()
        if self.uses_ref and pc.reference == "copy":
            self.ref_model = self._initial_reference()
        if self.uses_ref and pc.reference == "precomputed":
            self._precompute_reference()
        self.forward_tokens = 0  # cumulative student tokens (see `count_forward_tokens`)
        self.train_seconds = 0.0  # cumulative seconds in train_step
        self.build_optimizer()
        self.maybe_resume()  # restores the counters too (`load_extra_state`)
        self.held = self._models_held()
        self.held["memory/setup_peak_mb"] = peak_memory_mb(self.device)
        reset_peak_memory(self.device)  # `memory/peak_mb` is the training phase's peak

    def _models_held(self) -> dict[str, float]:
        """Models resident during training: the policy, plus a reference copy (`copy`) or the
        LoRA adapter's parameters (`lora`, counted in `models/params_held` but not as a
        model); `precomputed` has freed its reference by now."""
        held = [self.model] + ([self.ref_model] if self.ref_model is not None else [])
        return {
            "models/held": float(len(held)),
            "models/params_held": float(sum(count_parameters(m) for m in held)),
            "models/params_trainable": float(count_parameters(self.model, trainable_only=True)),
        }

    # -- reference ----------------------------------------------------------------------
    def _initial_reference(self) -> torch.nn.Module:
        if self.resume_from is None:
            ref = copy.deepcopy(self.model)
        else:  # the policy was loaded from a checkpoint: rebuild the starting model
            m = self.recipe.model
            ref, _ = load_model(m.name_or_path, dtype=m.dtype, seed=m.seed)
            ref = ref.to(self.device)
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def _wrap_lora(self) -> None:
        from peft import LoraConfig, PeftModel, get_peft_model

        pc = self.recipe.preference
        names = {n.rsplit(".", 1)[-1] for n, _ in self.model.named_modules()}
        targets = [t for t in LORA_TARGETS if t in names]
        if not targets:
            raise ValueError(
                f"preference.reference 'lora': the model has none of {', '.join(LORA_TARGETS)}"
            )
        adapter = self.resume_from / "adapter" if self.resume_from else None
        if adapter is not None and adapter.is_dir():
            self.model = PeftModel.from_pretrained(self.model, str(adapter), is_trainable=True)
        else:
            cfg = LoraConfig(
                r=pc.lora_r,
                lora_alpha=pc.lora_alpha,
                lora_dropout=0.0,
                target_modules=targets,
                task_type="CAUSAL_LM",
            )
            self.model = get_peft_model(self.model, cfg)

    def _ref_logps(self, batch: SequenceBatch) -> torch.Tensor:
        """Per-token reference log-probs (N, T), no grad."""
        with torch.no_grad():
            if self.recipe.preference.reference == "lora":
                was_training = self.model.training
                self.model.eval()
                with self.model.disable_adapter():
                    out = completion_logps(self.model, batch, autocast_dtype=self.autocast_dtype)
                self.model.train(was_training)
                return out
            assert self.ref_model is not None
            out = completion_logps(self.ref_model, batch, autocast_dtype=self.autocast_dtype)
            return out

    def _seq_logps_nograd(self, model_fn, data: PreferenceData, which: str) -> torch.Tensor:
        """Sequence log-probs (sum) of every row's `which` completion, in chunks."""
        n = len(data)
        size = self.recipe.train.micro_batch_size or self.recipe.train.batch_size
        out = []
        for s in range(0, n, size):
            idx = list(range(s, min(n, s + size)))
            batch = self._rows_batch(data, idx, which)
            out.append(model_fn(batch).sum(-1).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def _precompute_reference(self) -> None:
        path = self.run.path / REF_FILE
        key = {"train": _fingerprint(self.train_data), "test": _fingerprint(self.test_data)}
        if path.is_file():
            cached = torch.load(path, weights_only=False)
            if cached.get("fingerprint") == key:
                self.ref_cache = cached
                return
        ref = self._initial_reference()
        self.ref_model = ref
        cache: dict[str, Any] = {"fingerprint": key}
        for split, data in (("train", self.train_data), ("test", self.test_data)):
            if data is None:
                continue
            parts = {"chosen": self._seq_logps_nograd(self._ref_logps, data, "chosen")}
            if self.kto:
                parts["kl"] = self._seq_logps_nograd(self._ref_logps, data, "kl")
            else:
                parts["rejected"] = self._seq_logps_nograd(self._ref_logps, data, "rejected")
            cache[split] = parts
        torch.save(cache, path)
        self.ref_cache = cache
        self.ref_model = None  # freed: training reads the cache
        del ref

    # -- batches ------------------------------------------------------------------------
    def _rows_batch(self, data: PreferenceData, idx: list[int], which: str) -> SequenceBatch:
        """One batch of rows `idx`: which = chosen | rejected | pair (chosen rows then
        rejected rows) | kl (completion i after the prompt of row (i + 1) mod N)."""
        n = len(data)
        if which == "pair":
            assert data.rejected_ids is not None
            prompts = [data.prompt_ids[i] for i in idx] * 2
            comps = [data.completion_ids[i] for i in idx] + [data.rejected_ids[i] for i in idx]
        elif which == "kl":
            prompts = [data.prompt_ids[(i + 1) % n] for i in idx]
            comps = [data.completion_ids[i] for i in idx]
        else:
            src = data.completion_ids if which == "chosen" else data.rejected_ids
            assert src is not None
            prompts = [data.prompt_ids[i] for i in idx]
            comps = [src[i] for i in idx]
        return build_batch(prompts, comps, self.tokenizer.pad_token_id, device=self.device)

    def _cached(self, split: str, name: str, idx: list[int]) -> torch.Tensor:
        assert self.ref_cache is not None
        return self.ref_cache[split][name][idx].to(self.device)

    # -- losses ---------------------------------------------------------------------------
    def _pair_losses(
        self, pol: torch.Tensor, ref: torch.Tensor | None, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pair losses from per-token policy log-probs `pol` (2B, T) and reference
        sequence log-probs `ref` (2B,) (chosen rows first). Returns (losses, chosen rewards,
        rejected rewards, chosen logps, rejected logps)."""
        pc = self.recipe.preference
        b = pol.shape[0] // 2
        seq = pol.sum(-1)
        lengths = mask.sum(-1).clamp(min=1.0)
        avg = seq / lengths
        c, r, lc, lr = seq[:b], seq[b:], lengths[:b], lengths[b:]
        if pc.loss_type == "simpo":
            losses, cr, rr = simpo_loss(
                avg[:b],
                avg[b:],
                beta=pc.beta,
                gamma=pc.simpo_gamma,
                label_smoothing=pc.label_smoothing,
            )
            return losses, cr, rr, c.detach(), r.detach()
        if pc.loss_type == "orpo":
            odds, _ = orpo_loss(avg[:b], avg[b:], beta=pc.beta)
            losses = -avg[:b] + odds
            cr, rr = (pc.beta * avg[:b]).detach(), (pc.beta * avg[b:]).detach()
            return losses, cr, rr, c.detach(), r.detach()
        assert ref is not None
        kw: dict[str, Any] = {
            "beta": pc.beta,
            "label_smoothing": pc.label_smoothing,
            "chosen_lengths": lc,
            "rejected_lengths": lr,
        }
        if pc.loss_type == "rpo":
            losses, cr, rr = rpo_loss(
                c, r, ref[:b], ref[b:], -avg[:b], alpha=pc.rpo_alpha, loss_type="sigmoid", **kw
            )
        else:
            losses, cr, rr = dpo_loss(c, r, ref[:b], ref[b:], loss_type=pc.loss_type, **kw)
        return losses, cr, rr, c.detach(), r.detach()

    def _pair_ref(self, split: str, data: PreferenceData, idx: list[int]) -> torch.Tensor | None:
        """Reference sequence log-probs (2B,) of pairs `idx` (chosen then rejected)."""
        if not self.uses_ref:
            return None
        if self.ref_cache is not None:
            return torch.cat(
                [self._cached(split, "chosen", idx), self._cached(split, "rejected", idx)]
            )
        return self._ref_logps(self._rows_batch(data, idx, "pair")).sum(-1)

    def _train_step_paired(self, idx: list[int]) -> dict[str, float]:
        t = self.recipe.train
        n = len(idx)
        micro = t.micro_batch_size or n
        total = 0.0
        parts: list[tuple[torch.Tensor, ...]] = []
        self.model.train()
        for s in range(0, n, micro):
            mb = idx[s : s + micro]
            batch = self._rows_batch(self.train_data, mb, "pair")
            ref = self._pair_ref("train", self.train_data, mb)
            pol = completion_logps(self.model, batch, autocast_dtype=self.autocast_dtype)
            self.forward_tokens += int(batch.attention_mask.sum())
            losses, cr, rr, lc, lr = self._pair_losses(pol, ref, batch.completion_mask)
            loss = losses.sum() / n
            loss.backward()
            total += float(loss.detach())
            parts.append((cr, rr, lc, lr))
        out = self.optimizer_step()
        out.update(self.held)
        out["memory/peak_mb"] = peak_memory_mb(self.device)
        cat = [torch.cat([p[i] for p in parts]) for i in range(4)]
        out.update(preference_metrics(*cat))
        out.update({"loss": total, "epoch": float(self.data.epoch)})
        return out

    def _kl_ref(self, split: str, data: PreferenceData, idx: list[int]) -> torch.Tensor:
        """Detached KTO reference point: mean (policy - ref) over mismatched pairs."""
        micro = self.recipe.train.micro_batch_size or len(idx)
        diffs = []
        with torch.no_grad():
            for s in range(0, len(idx), micro):
                mb = idx[s : s + micro]
                batch = self._rows_batch(data, mb, "kl")
                pol = completion_logps(self.model, batch, autocast_dtype=self.autocast_dtype)
                if self.model.training:  # a training step's pass, not an evaluation
                    self.forward_tokens += int(batch.attention_mask.sum())
                if self.ref_cache is not None:
                    ref = self._cached(split, "kl", mb)
                else:
                    ref = self._ref_logps(batch).sum(-1)
                diffs.append(pol.sum(-1) - ref)
        return torch.cat(diffs).mean().clamp(min=0.0)

    def _kto_losses(
        self, split: str, data: PreferenceData, mb: list[int], kl: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        pc = self.recipe.preference
        batch = self._rows_batch(data, mb, "chosen")
        pol = completion_logps(self.model, batch, autocast_dtype=self.autocast_dtype)
        if self.ref_cache is not None:
            ref = self._cached(split, "chosen", mb)
        else:
            ref = self._ref_logps(batch).sum(-1)
        assert data.labels is not None
        desirable = torch.tensor([data.labels[i] for i in mb], device=self.device)
        seq = pol.sum(-1)
        losses, rewards = kto_loss(
            seq,
            ref,
            desirable,
            kl,
            beta=pc.beta,
            desirable_weight=pc.kto_desirable_weight,
            undesirable_weight=pc.kto_undesirable_weight,
        )
        return losses, rewards, seq.detach(), desirable

    @staticmethod
    def _kto_metrics(
        rewards: torch.Tensor, logps: torch.Tensor, desirable: torch.Tensor
    ) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, sel in (("chosen", desirable), ("rejected", ~desirable)):
            if sel.any():
                out[f"rewards/{name}"] = rewards[sel].mean().item()
                out[f"logps/{name}"] = logps[sel].mean().item()
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out

    def _train_step_kto(self, idx: list[int]) -> dict[str, float]:
        t = self.recipe.train
        n = len(idx)
        micro = t.micro_batch_size or n
        self.model.train()
        kl = self._kl_ref("train", self.train_data, idx)
        total = 0.0
        parts = []
        for s in range(0, n, micro):
            mb = idx[s : s + micro]
            losses, rewards, logps, desirable = self._kto_losses("train", self.train_data, mb, kl)
            self.forward_tokens += sum(
                len(self.train_data.prompt_ids[i]) + len(self.train_data.completion_ids[i])
                for i in mb
            )  # the KL-estimate pass (mismatched pairs, no grad) is counted in _kl_ref
            loss = losses.sum() / n
            loss.backward()
            total += float(loss.detach())
            parts.append((rewards, logps, desirable))
        out = self.optimizer_step()
        out.update(self.held)
        out["memory/peak_mb"] = peak_memory_mb(self.device)
        cat = [torch.cat([p[i] for p in parts]) for i in range(3)]
        out.update(self._kto_metrics(*cat))
        out.update({"loss": total, "kl": float(kl), "epoch": float(self.data.epoch)})
        return out

    def train_step(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        t0 = time.perf_counter()
        if self.online:
            out, samples = self._train_step_online()
        else:
            idx = self.data.take(self.recipe.train.batch_size)
            step = self._train_step_kto if self.kto else self._train_step_paired
            out, samples = step(idx), []
        self.train_seconds += time.perf_counter() - t0
        out["student/forward_tokens"] = float(self.forward_tokens)
        out["time/train_s"] = self.train_seconds
        return out, samples

    # -- online (iterative) DPO -------------------------------------------------------------
    @torch.no_grad()
    def _online_pairs(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Sample `online_samples` completions for each of `train.batch_size` task prompts
        from the current policy, score them with the task verifier, and make this step's
        pairs (`pick_pair_indices`) from the sampled token ids themselves."""
        pc = self.recipe.preference
        g = pc.online_samples
        rows = [self.rows[i] for i in self.data.take(self.recipe.train.batch_size)]
        self.model.eval()
        roll = generate(
            self.model,
            self.tokenizer,
            [r["prompt"] for r in rows],
            self.online_sampling,
            generator=self.generator,
            autocast_dtype=self.autocast_dtype,
        )
        self.model.train()
        self.samples_seen += len(roll)
        lengths = roll.lengths.tolist()
        self.forward_tokens += count_forward_tokens(roll.prompt_ids[::g], int(sum(lengths)))
        p_ids: list[list[int]] = []
        c_ids: list[list[int]] = []
        r_ids: list[list[int]] = []
        prompts: list[str] = []
        samples: list[dict[str, Any]] = []
        correct = no_pair = 0
        for i, row in enumerate(rows):
            texts = roll.texts[i * g : (i + 1) * g]
            scores = [float(self.task.verify(row, t)) for t in texts]
            correct += sum(1 for x in scores if x > 0)
            found = pick_pair_indices(texts, scores, pc.online_pairs_per_prompt)
            no_pair += not found
            for a, b in found:
                ia, ib = i * g + a, i * g + b
                p_ids.append(roll.prompt_ids[ia])
                c_ids.append(roll.completion_ids[ia, : int(lengths[ia])].tolist())
                r_ids.append(roll.completion_ids[ib, : int(lengths[ib])].tolist())
                prompts.append(row["prompt"])
            samples.append({"prompt": row["prompt"], "completion": texts[0], "reward": scores[0]})
        self.train_data = PreferenceData(p_ids, c_ids, r_ids, None, prompts)
        stats = {
            "online/sample_accuracy": correct / max(len(roll), 1),
            "online/pairs": float(len(p_ids)),
            "online/prompts_without_pair": float(no_pair),
            "online/samples_seen": float(self.samples_seen),
        }
        return stats, samples

    def _train_step_online(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        stats, samples = self._online_pairs()
        n = len(self.train_data)
        if n == 0:  # every prompt's samples were all right or all wrong: no pair to learn from
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return {**stats, "lr": self.scheduler.get_last_lr()[0]}, samples
        out = self._train_step_paired(list(range(n)))
        out.pop("epoch", None)
        out.update(stats)
        out["epoch"] = float(self.data.epoch)
        return out, samples

    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        state["forward_tokens"] = self.forward_tokens
        state["train_seconds"] = self.train_seconds
        if self.online:
            state["generator"] = self.generator.get_state()
            state["samples_seen"] = self.samples_seen
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.forward_tokens = int(state.get("forward_tokens", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if self.online and "generator" in state:
            self.generator.set_state(state["generator"])
            self.samples_seen = int(state.get("samples_seen", 0))

    # -- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def preference_eval(self, split: str = "test") -> dict[str, float]:
        """Preference metrics over every row of `split` ("test": the held-out rows, prefix
        `eval/`; "train": all training rows, prefix `train_eval/`, no sampled KL)."""
        data = self.test_data if split == "test" else self.train_data
        if data is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        n = len(data)
        size = self.recipe.train.micro_batch_size or self.recipe.train.batch_size
        chunks = [list(range(s, min(n, s + size))) for s in range(0, n, size)]
        out: dict[str, float] = {}
        if self.kto:
            kl = self._kl_ref(split, data, list(range(n)))
            parts = [self._kto_losses(split, data, mb, kl) for mb in chunks]
            losses = torch.cat([p[0] for p in parts])
            metrics = self._kto_metrics(*[torch.cat([p[i] for p in parts]) for i in (1, 2, 3)])
            metrics["loss"] = losses.mean().item()
            metrics["kl"] = float(kl)
        else:
            parts, ratio_sum, ratio_tokens = [], 0.0, 0.0
            for mb in chunks:
                batch = self._rows_batch(data, mb, "pair")
                pol = completion_logps(self.model, batch, autocast_dtype=self.autocast_dtype)
                ref = self._pair_ref(split, data, mb)
                parts.append(self._pair_losses(pol, ref, batch.completion_mask))
                if ref is not None:
                    b = len(mb)
                    ratio_sum += float(pol[:b].sum() - ref[:b].sum())
                    ratio_tokens += float(batch.completion_mask[:b].sum())
            losses = torch.cat([p[0] for p in parts])
            metrics = preference_metrics(*[torch.cat([p[i] for p in parts]) for i in (1, 2, 3, 4)])
            metrics["loss"] = losses.mean().item()
            if ratio_tokens:
                metrics["logratio_chosen"] = ratio_sum / ratio_tokens
            if split == "test" and self.uses_ref and self.ref_cache is None:
                metrics["kl_ref"] = self._sampled_kl(data)
        prefix = "eval/" if split == "test" else "train_eval/"
        out = {f"{prefix}{k}": v for k, v in metrics.items()}
        self.model.train(was_training)
        return out

    def _sampled_kl(self, data: PreferenceData) -> float:
        """k3 estimate of per-token KL(policy || ref) on completions sampled from the policy
        (temperature 1) for the held-out prompts."""
        from signalrl.rollout.sampler import generate

        params = SamplingParams(max_new_tokens=self.recipe.sampling.max_new_tokens)
        gen = torch.Generator(device=self.device).manual_seed(self.recipe.seed)
        roll = generate(
            self.model,
            self.tokenizer,
            data.prompt_ids,
            params,
            generator=gen,
            autocast_dtype=self.autocast_dtype,
        )
        batch = build_batch(
            roll.prompt_ids,
            roll.completion_ids,
            self.tokenizer.pad_token_id,
            completion_mask=roll.completion_mask,
            device=self.device,
        )
        pol = completion_logps(self.model, batch, autocast_dtype=self.autocast_dtype)
        ref = self._ref_logps(batch)
        mask = batch.completion_mask
        k3 = kl_estimate(pol, ref, "k3") * mask
        return float(k3.sum() / mask.sum().clamp(min=1.0))

    def maybe_evaluate(self, metrics: dict[str, Any]) -> None:
        every = self.recipe.eval.every
        if every and self.step % every == 0 and self.step < self.recipe.train.steps:
            metrics.update(self.preference_eval())
        super().maybe_evaluate(metrics)

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        metrics.update(self.preference_eval())
        if not self.online:
            metrics.update(self.preference_eval("train"))
        summary = super().finish(metrics)
        summary.update({k: v for k, v in metrics.items() if k.startswith(("eval/", "train_eval/"))})
        return summary

    # -- saving ---------------------------------------------------------------------------
    def _is_lora(self) -> bool:
        return self.recipe.preference.reference == "lora"

    def save_checkpoint(self) -> Path:
        if not self._is_lora():
            return super().save_checkpoint()
        import io

        buf = io.BytesIO()
        torch.save(self.trainer_state(), buf)
        base = copy.deepcopy(self.model).unload()  # the frozen base weights, plain HF
        out = save_model(
            base,
            self.tokenizer,
            self.run.checkpoints / f"step-{self.step}",
            extra_files={STATE_FILE: buf.getvalue()},
        )
        self.model.save_pretrained(out / "adapter")
        self._prune_checkpoints()
        return out

    def save_final(self) -> Path:
        if not self._is_lora():
            return super().save_final()
        merged = copy.deepcopy(self.model).merge_and_unload()
        return save_model(merged, self.tokenizer, self.run.final)

    def progress_info(self, metrics: dict[str, Any]) -> str:
        info = super().progress_info(metrics)
        if "rewards/accuracies" in metrics:
            info += f"  pref-acc {metrics['rewards/accuracies']:.2f}"
        return info
