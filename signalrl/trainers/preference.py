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
included). The loss is the `preference.loss_type` entry of the preference-loss registry
(`signalrl.registry.PREFERENCE_LOSSES`, defined in `signalrl.losses.preference`, or a user
`module:function`), called with a `PreferenceInput` holding the sequence log-probs, the
completion lengths and the knobs; SimPO and ORPO use the average (sum / length), RPO is
`dpo + rpo_alpha * NLL(chosen) per token`, ORPO `NLL(chosen) per token + orpo term`.

Reference (`preference.reference`):

* `copy`: a frozen copy of the starting policy (`TrainerBase.frozen_reference`: on resume,
  reloaded from `model.name_or_path`);
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
sampling tokens, counted as in `signalrl.rollout.collect.count_forward_tokens`, plus the
non-padding tokens of its training forwards; reference passes are not counted; offline DPO's
pairs were sampled before the run and are not counted) and `time/train_s`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from signalrl import distributed
from signalrl.config import PreferenceRecipe
from signalrl.data.collate import SequenceBatch, build_batch
from signalrl.data.make_preferences import pick_pair_indices
from signalrl.data.preference import PreferenceData, load_preference_data, split_data
from signalrl.losses.preference import PreferenceInput, preference_loss, preference_metrics
from signalrl.models import save_model
from signalrl.rewards.registry import RewardComposer, RewardSpec
from signalrl.trainers.base import DataCursor, MicroLoss, StepResult
from signalrl.trainers.preference_eval import PreferenceEvalMixin

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


@dataclass
class PreferenceBatch:
    """One step's rows `idx` of `data` (the KTO reference point `kl` computed up front)."""

    data: PreferenceData
    idx: list[int]
    kl: torch.Tensor | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)


class PreferenceTrainer(PreferenceEvalMixin):
    recipe: PreferenceRecipe

    def __init__(self, recipe: PreferenceRecipe, **kw: Any) -> None:
        super().__init__(recipe, **kw)
        pc = recipe.preference
        self.kto = pc.unpaired
        self.online = pc.online
        self.test_data: PreferenceData | None = None
        self._load_data()
        self.uses_ref = pc.uses_reference
        self.ref_cache: dict[str, Any] | None = None
        if pc.reference == "lora":
            self._wrap_lora()
        if self.uses_ref and pc.reference == "copy":
            self.ref_model = self.frozen_reference()
        if self.uses_ref and pc.reference == "precomputed":
            self._precompute_reference()
        self.finish_setup()
        self.models_held["data/truncated_rows"] = float(self.truncated_rows)

    def _load_data(self) -> None:
        pc, d = self.recipe.preference, self.recipe.data
        kind = "kto" if self.kto else "paired"
        # rows longer than this are truncated as TRL does (signalrl.data.preference)
        max_length = d.max_length or getattr(self.model.config, "max_position_embeddings", None)

        def load(path: str) -> PreferenceData:
            return load_preference_data(
                path, self.tokenizer, kind=kind, fmt=d.format, max_length=max_length
            )

        if d.test_path:
            self.test_data = load(d.test_path)
        self.truncated_rows = self.test_data.truncated if self.test_data is not None else 0
        if self.online:
            # pairs are sampled every step (see `_online_pairs`); held-out pairs only from a file
            self.rows = self.train_rows()
            self.train_data = PreferenceData([], [], [], None, [])
            self.data = DataCursor(len(self.rows), self.recipe.seed)
            self.online_sampling = self.sampling_params(pc.online_samples)
            self.samples_seen = 0
        else:
            assert d.path is not None
            data = load(d.path)
            self.truncated_rows += data.truncated
            if d.test_path:
                self.train_data = data
            else:
                self.train_data, self.test_data = split_data(
                    data, d.test_fraction, self.recipe.seed
                )
            self.data = DataCursor(len(self.train_data), self.recipe.seed)

    # -- reference ----------------------------------------------------------------------
    def _wrap_lora(self) -> None:
        """`preference.reference: lora`: the policy gets a LoRA adapter (`models.lora`) unless
        `TrainerBase.load_policy` already gave it one (`lora.enabled`, or a resumed adapter
        checkpoint). Without `lora.enabled` the adapter is `preference.lora_r` /
        `lora_alpha` on the attention and MLP projections the model has; a checkpoint of the
        older layout (base model + `adapter/`) is resumed from its `adapter/`."""
        from signalrl.config import LoraConfig
        from signalrl.models.lora import apply_lora, is_peft, load_adapter

        if is_peft(self.model):
            return
        adapter = self.resume_from / "adapter" if self.resume_from else None
        if adapter is not None and adapter.is_dir():
            self.model = load_adapter(self.model, adapter)
            return
        pc = self.recipe.preference
        names = {n.rsplit(".", 1)[-1] for n, _ in self.model.named_modules()}
        targets = [t for t in LORA_TARGETS if t in names]
        if not targets:
            raise ValueError(
                f"preference.reference 'lora': the model has none of {', '.join(LORA_TARGETS)}"
                "; set lora.enabled: true with lora.target_modules (or peft's default)"
            )
        cfg = LoraConfig(enabled=True, r=pc.lora_r, alpha=pc.lora_alpha, target_modules=targets)
        self.model = apply_lora(self.model, cfg)

    def _ref_logps(self, batch: SequenceBatch) -> torch.Tensor:
        """Per-token reference log-probs (N, T), no grad."""
        with torch.no_grad():
            if self.recipe.preference.reference == "lora":
                was_training = self.model.training
                self.model.eval()
                with self.model.disable_adapter():
                    out = self.seq_logps(self.model, batch)
                self.model.train(was_training)
                return out
            assert self.ref_model is not None
            return self.seq_logps(self.ref_model, batch)

    def _seq_logps_nograd(self, model_fn, data: PreferenceData, which: str) -> torch.Tensor:  # noqa: ANN001
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
        """Reference log-probs of every row, computed once (or read back from the run's
        `ref_logps.pt` on resume when the data's fingerprint matches); written to the run
        directory once it is opened (`open_run`)."""
        path = self.recipe.run_dir / REF_FILE
        key = {"train": _fingerprint(self.train_data), "test": _fingerprint(self.test_data)}
        if self.plan.mode == "resume" and path.is_file():
            cached = torch.load(path, weights_only=False)
            if cached.get("fingerprint") == key:
                self.ref_cache = cached
                return
        self.ref_model = self.frozen_reference()
        cache: dict[str, Any] = {"fingerprint": key}
        for split, data in (("train", self.train_data), ("test", self.test_data)):
            if data is None:
                continue
            parts = {"chosen": self._seq_logps_nograd(self._ref_logps, data, "chosen")}
            other = "kl" if self.kto else "rejected"
            parts[other] = self._seq_logps_nograd(self._ref_logps, data, other)
            cache[split] = parts
        self.ref_cache = cache
        self._ref_cache_unsaved = True
        self.ref_model = None  # freed: training reads the cache

    def open_run(self) -> None:
        super().open_run()
        if getattr(self, "_ref_cache_unsaved", False):
            tmp = self.run.path / (REF_FILE + ".tmp")
            torch.save(self.ref_cache, tmp)
            tmp.replace(self.run.path / REF_FILE)
            self._ref_cache_unsaved = False

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

    def _seq_ref(self, split: str, name: str, idx: list[int], batch: SequenceBatch) -> torch.Tensor:
        """Reference sequence log-probs of rows `idx` (`name`: chosen | kl), cached or live."""
        if self.ref_cache is not None:
            return self._cached(split, name, idx)
        return self._ref_logps(batch).sum(-1)

    def _pair_ref(self, split: str, data: PreferenceData, idx: list[int]) -> torch.Tensor | None:
        """Reference sequence log-probs (2B,) of pairs `idx` (chosen then rejected)."""
        if not self.uses_ref:
            return None
        if self.ref_cache is not None:
            return torch.cat(
                [self._cached(split, "chosen", idx), self._cached(split, "rejected", idx)]
            )
        return self._ref_logps(self._rows_batch(data, idx, "pair")).sum(-1)

    # -- losses ---------------------------------------------------------------------------
    def loss_input(
        self, seq: torch.Tensor, ref: torch.Tensor | None, lengths: torch.Tensor
    ) -> PreferenceInput:
        """The registry's input from policy and reference sequence log-probs and completion
        lengths (paired: chosen rows first, then rejected rows)."""
        pc = self.recipe.preference
        b = seq.shape[0] // 2
        return PreferenceInput(
            policy_chosen_logps=seq[:b],
            policy_rejected_logps=seq[b:],
            ref_chosen_logps=None if ref is None else ref[:b],
            ref_rejected_logps=None if ref is None else ref[b:],
            chosen_lengths=lengths[:b],
            rejected_lengths=lengths[b:],
            beta=pc.beta,
            label_smoothing=pc.label_smoothing,
            f_divergence_type=pc.f_divergence_type,
            f_alpha_divergence_coef=pc.f_alpha_divergence_coef,
            simpo_gamma=pc.simpo_gamma,
            rpo_alpha=pc.rpo_alpha,
        )

    def _pair_losses(
        self, pol: torch.Tensor, ref: torch.Tensor | None, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pair losses from per-token policy log-probs `pol` (2B, T) and reference
        sequence log-probs `ref` (2B,) (chosen rows first). Returns (losses, chosen rewards,
        rejected rewards, chosen logps, rejected logps)."""
        b = pol.shape[0] // 2
        seq = pol.sum(-1)
        x = self.loss_input(seq, ref, mask.sum(-1).clamp(min=1.0))
        losses, cr, rr = preference_loss(x, self.recipe.preference.loss_type)
        return losses, cr, rr, seq[:b].detach(), seq[b:].detach()

    def _kl_ref(
        self, split: str, data: PreferenceData, idx: list[int], count: bool = False
    ) -> torch.Tensor:
        """Detached KTO reference point: mean (policy - ref) over mismatched pairs; `count`:
        a training step's pass (its student tokens are counted)."""
        # each rank scores its share of the rows; the mean is over all of them
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad(), self.gathered():
            for s in self.micro_slices(len(idx)):
                mb = idx[s]
                batch = self._rows_batch(data, mb, "kl")
                pol = self.seq_logps(self.model, batch)
                if count:
                    self.budget.forward_tokens += int(batch.attention_mask.sum())
                diff = pol.sum(-1) - self._seq_ref(split, "kl", mb, batch)
                total += torch.stack([diff.sum().double(), diff.new_tensor(len(mb)).double()])
        total = distributed.all_reduce_sum(total)
        return (total[0] / total[1].clamp(min=1)).float().clamp(min=0.0)

    def _kto_losses(
        self, split: str, data: PreferenceData, mb: list[int], kl: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        pc = self.recipe.preference
        batch = self._rows_batch(data, mb, "chosen")
        pol = self.seq_logps(self.model, batch)
        ref = self._seq_ref(split, "chosen", mb, batch)
        assert data.labels is not None
        desirable = torch.tensor([data.labels[i] for i in mb], device=self.device)
        seq = pol.sum(-1)
        x = PreferenceInput(
            policy_chosen_logps=seq,
            ref_chosen_logps=ref,
            beta=pc.beta,
            desirable=desirable,
            kl_ref=kl,
            kto_desirable_weight=pc.kto_desirable_weight,
            kto_undesirable_weight=pc.kto_undesirable_weight,
        )
        losses, rewards, _ = preference_loss(x, pc.loss_type)
        return losses, rewards, seq.detach(), desirable

    # -- the step ---------------------------------------------------------------------------
    def next_batch(self) -> tuple[PreferenceBatch | None, dict[str, float]]:
        if self.online:
            stats, samples = self._online_pairs()
            if not len(self.train_data):  # all samples right or all wrong: no pair
                return None, stats
            idx = list(range(len(self.train_data)))
            return PreferenceBatch(self.train_data, idx, samples=samples), stats
        idx = self.data.take(self.recipe.train.batch_size)
        kl = self._kl_ref("train", self.train_data, idx, count=True) if self.kto else None
        return PreferenceBatch(self.train_data, idx, kl), {}

    def micro_batches(self, batch: PreferenceBatch) -> tuple[list[list[int]], float]:
        return [batch.idx[s] for s in self.micro_slices(len(batch.idx))], float(len(batch.idx))

    def micro_loss(self, batch: PreferenceBatch, chunk: list[int], epoch: int) -> MicroLoss:
        data = batch.data
        if batch.kl is not None:
            losses, rewards, logps, desirable = self._kto_losses("train", data, chunk, batch.kl)
            # the KL-estimate pass (mismatched pairs, no grad) is counted in _kl_ref
            self.budget.forward_tokens += sum(
                len(data.prompt_ids[i]) + len(data.completion_ids[i]) for i in chunk
            )
            return MicroLoss(losses.sum() / len(chunk), len(chunk), aux=(rewards, logps, desirable))
        seq = self._rows_batch(data, chunk, "pair")
        ref = self._pair_ref("train", data, chunk)
        pol = self.seq_logps(self.model, seq)
        self.budget.forward_tokens += int(seq.attention_mask.sum())
        losses, cr, rr, lc, lr = self._pair_losses(pol, ref, seq.completion_mask)
        return MicroLoss(losses.sum() / len(chunk), len(chunk), aux=(cr, rr, lc, lr))

    def step_metrics(self, batch: PreferenceBatch, result: StepResult) -> dict[str, float]:
        out = result.metrics()
        parts = result.aux
        if batch.kl is not None:
            cat = [torch.cat([p[i] for p in parts]) for i in range(3)]
            out.update(self._kto_metrics(*cat), kl=float(batch.kl))
        else:
            out.update(preference_metrics(*[torch.cat([p[i] for p in parts]) for i in range(4)]))
        out["epoch"] = float(self.data.epoch)
        return out

    def step_samples(self, batch: PreferenceBatch) -> list[dict[str, Any]]:
        return batch.samples

    # -- online (iterative) DPO -------------------------------------------------------------
    @torch.no_grad()
    def _online_pairs(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Sample `online_samples` completions for each of `train.batch_size` task prompts
        from the current policy, score them with the task verifier, and make this step's
        pairs (`pick_pair_indices`) from the sampled token ids themselves."""
        pc = self.recipe.preference
        g = pc.online_samples
        rows = [self.rows[i] for i in self.data.take(self.recipe.train.batch_size)]
        verifier = RewardComposer([RewardSpec(type="task")], self.task)
        self.model.eval()
        roll = self.collect_global(self.model, rows, self.online_sampling, verifier)
        self.model.train()
        self.samples_seen += len(roll)
        scores = roll.rewards.tolist()
        pairs: list[tuple[int, int]] = []
        no_pair = 0
        for i in range(len(rows)):
            found = pick_pair_indices(
                roll.texts[i * g : (i + 1) * g],
                scores[i * g : (i + 1) * g],
                pc.online_pairs_per_prompt,
            )
            no_pair += not found
            pairs += [(i * g + a, i * g + b) for a, b in found]
        self.train_data = PreferenceData(
            [roll.prompt_ids[a] for a, _ in pairs],
            [roll.completion_ids[a] for a, _ in pairs],
            [roll.completion_ids[b] for _, b in pairs],
            None,
            [roll.rows[a]["prompt"] for a, _ in pairs],
        )
        stats = {
            "online/sample_accuracy": sum(1 for x in scores if x > 0) / max(len(roll), 1),
            "online/pairs": float(len(pairs)),
            "online/prompts_without_pair": float(no_pair),
            "online/samples_seen": float(self.samples_seen),
        }
        samples = [
            {"prompt": row["prompt"], "completion": roll.texts[i * g], "reward": scores[i * g]}
            for i, row in enumerate(rows)
        ]
        return stats, samples

    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        if self.online:
            state["samples_seen"] = self.samples_seen
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        if self.online:
            self.samples_seen = int(state.get("samples_seen", 0))

    # -- saving ---------------------------------------------------------------------------
    def _is_lora(self) -> bool:
        """The older `preference.reference: lora` layout without `lora.enabled`: `final/` is
        the merged plain HF model (with `lora.enabled`, `final/` is the adapter as for every
        trainer, see `CheckpointMixin.save_final`)."""
        return self.recipe.preference.reference == "lora" and not self.recipe.lora.enabled

    def save_final(self) -> Path:
        # step checkpoints hold the adapter alone (`CheckpointMixin`); `load_policy` resumes them
        if not self._is_lora():
            return super().save_final()
        from signalrl.models.lora import merged_copy

        if distributed.current().is_main:
            save_model(merged_copy(self.model), self.tokenizer, self.run.final)
        distributed.barrier()
        return self.run.final

    def progress_info(self, metrics: dict[str, Any]) -> str:
        info = super().progress_info(metrics)
        if "rewards/accuracies" in metrics:
            info += f"  pref-acc {metrics['rewards/accuracies']:.2f}"
        return info
