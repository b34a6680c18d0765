"""The step skeleton every trainer shares (see docs/architecture.md, "The life of a step").

`TrainerBase` owns the run directory, the policy and its tokenizer, the frozen reference
(built from the *starting* weights, also on resume), the budget counters and models-held
metrics, AdamW and the schedule, micro-batching with exact gradient-accumulation weights, the
optimizer step, checkpoints and resume, progress, evaluation and `final/`.

A trainer supplies only what is its own:

- `next_batch()`: this step's training data (sampled, scored, read from a file, ...) and its
  metrics; `None` when there is nothing to learn from (the schedule still advances);
- `micro_batches(batch)`: the micro-batches and the total count of loss units (tokens,
  sequences or pairs) the step's loss is a mean over;
- `micro_loss(batch, chunk, epoch)`: one micro-batch's loss as a mean over its own units
  (`MicroLoss`); the skeleton weights it by `units / total`, so accumulating the micro-batches
  gives exactly the full batch's gradient;
- `step_metrics(batch, result)` and `step_samples(batch)`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers.utils import logging as hf_logging

from signalrl import distributed
from signalrl.config import RecipeBase, dump_recipe
from signalrl.eval import EvalResult, evaluate
from signalrl.logging.memory import peak_memory_mb, reset_peak_memory
from signalrl.logging.run import FollowerRun, RunDir, RunLock
from signalrl.models import count_parameters, load_model, resolve_device
from signalrl.models.logprobs import completion_logps
from signalrl.models.lora import (
    AdapterDisabled,
    apply_lora,
    enable_gradient_checkpointing,
    is_adapter_dir,
    is_peft,
    load_adapter,
)
from signalrl.models.packing import packing_supported, padding_free
from signalrl.rollout.sampler import SamplingParams
from signalrl.tasks import Task, make_task
from signalrl.trainers.checkpoints import CheckpointMixin
from signalrl.trainers.doctoring import DoctorMixin
from signalrl.trainers.ranks import RanksMixin
from signalrl.trainers.state import (
    STATE_FILE,
    Budget,
    DataCursor,
    MicroLoss,
    StepResult,
    latest_checkpoint,
    lr_lambda,
    seed_everything,
)

__all__ = [
    "STATE_FILE",
    "DataCursor",
    "MicroLoss",
    "StepResult",
    "TrainerBase",
    "latest_checkpoint",
    "lr_lambda",
    "seed_everything",
]


class TrainerBase(RanksMixin, DoctorMixin, CheckpointMixin):
    """Run directory, models, optimiser, the step skeleton, checkpoints and evaluation."""

    recipe: Any  # the trainer's own recipe class (see `signalrl.config.RECIPES`)

    def __init__(
        self,
        recipe: RecipeBase,
        *,
        resume: bool = False,
        overwrite: bool = False,
        console: Console | None = None,
        task: Task | None = None,
    ) -> None:
        hf_logging.disable_progress_bar()
        self.recipe = recipe
        self.dist = distributed.init(recipe.train.parallel, resolve_device(recipe.model.device))
        self.check_world()
        # ranks other than 0 show nothing but errors (exceptions reach stderr)
        self.console = console or Console(stderr=True, quiet=not self.dist.is_main)
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        # nothing is written until everything is loaded and validated (`open_run`); rank 0
        # decides and every rank gets its plan (or its error)
        self.plan = distributed.on_main(lambda: self.plan_run(resume, overwrite))
        seed_everything(recipe.seed)
        # a researcher may pass any object with train()/test()/verify(); else the recipe's task
        self.task: Task = task or make_task(recipe.task.name, **recipe.task.kwargs())
        self.resume_from = self.plan.checkpoint
        self.run: RunDir = None  # type: ignore[assignment]  # opened by finish_setup
        self.lock = RunLock(recipe.run_dir)
        source = str(self.resume_from) if self.resume_from else recipe.model.name_or_path
        self.master_autocast: torch.dtype | None = None  # set by load_policy (fp32 master)
        self.model, self.tokenizer = self.load_policy(source)
        self.device = next(self.model.parameters()).device
        bf16 = recipe.train.precision == "bf16"
        self.autocast_dtype = torch.bfloat16 if bf16 else self.master_autocast
        self.padding_free = padding_free(self.model, recipe.train.padding_free, self.console)
        self.ref_model: torch.nn.Module | None = None
        self.budget = Budget()
        self.models_held: dict[str, float] = {}
        self.step = 0
        self.sample_calls = 0  # sampling calls in this step (a part of the noise key)
        self.started = time.time()
        self.elapsed_before = 0.0

    # -- models -------------------------------------------------------------------------------
    def seq_logps(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """`model`'s completion log-probs `(N, T)` of `batch` at the run's precision, packed
        where `train.padding_free` holds (`signalrl.models.packing`)."""
        packed = self.padding_free and (model is self.model or packing_supported(model))
        return completion_logps(
            model, batch, autocast_dtype=self.autocast_dtype, padding_free=packed
        )

    def load_policy(self, source: str, *, reference: bool = False) -> tuple[Any, Any]:
        """The policy from `source` (the start model, or a step checkpoint on resume; a LoRA
        run's checkpoint holds only the adapter: base from `model.name_or_path` + adapter):
        LoRA when `lora.enabled`, HF gradient checkpointing when `train.gradient_checkpointing`,
        and for full fine-tuning of a bfloat16/float16 `model.dtype` fp32 master weights under
        bf16 autocast (AdamW on half-precision weights loses most updates). `reference`: the
        plain start model, loaded as the policy's base is."""
        m, lora = self.recipe.model, self.recipe.lora
        adapter = not reference and is_adapter_dir(source)
        legacy_lora = getattr(getattr(self.recipe, "preference", None), "reference", "") == "lora"
        dtype = m.dtype
        if dtype != "float32" and not (lora.enabled or legacy_lora):
            dtype, self.master_autocast = "float32", torch.bfloat16
            if not reference:
                self.console.print(
                    f"[yellow]warning:[/yellow] model.dtype {m.dtype}: AdamW on {m.dtype} "
                    "weights loses most updates; training fp32 master weights under bf16 "
                    "autocast instead (train.precision: bf16 behaviour)"
                )
        model, tokenizer = load_model(
            m.name_or_path if adapter else source,
            dtype=dtype,
            seed=m.seed,
            device=resolve_device(m.device),
            attn_implementation=m.attn_implementation,
            architecture=m.architecture,
            tokenizer=m.tokenizer,
        )
        if reference:
            return model, tokenizer
        if self.recipe.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if adapter:
            model = load_adapter(model, source)
        elif lora.enabled:
            model = apply_lora(model, lora)
        return model, tokenizer

    def frozen_reference(self) -> torch.nn.Module:
        """A frozen copy of the *starting* policy: a deep copy of the model just loaded on a
        fresh run; on resume (the policy holds checkpoint weights) the start model is loaded
        again from `model.name_or_path`. A LoRA policy's reference is its own base with the
        adapter disabled (`models.lora.AdapterDisabled`, no second copy)."""
        if is_peft(self.model):  # LoRA: the base with the adapter disabled, no second copy
            return AdapterDisabled(self.model)
        if self.resume_from is None:
            ref = copy.deepcopy(self.model)
        else:
            ref, _ = self.load_policy(self.recipe.model.name_or_path, reference=True)
            ref = ref.to(self.device)
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def held_models(self) -> list[tuple[str, torch.nn.Module]]:
        """The models resident during training, by role (subclasses add theirs). A LoRA
        policy's adapter-disabled base is its reference without another copy: not counted."""
        held: list[tuple[str, torch.nn.Module]] = [("policy", self.model)]
        if self.ref_model is not None and not isinstance(self.ref_model, AdapterDisabled):
            held.append(("reference", self.ref_model))
        return held

    def finish_setup(self) -> None:
        """Build the optimiser, resume, open the run directory, measure what set-up holds,
        and reset the memory peak so that `memory/peak_mb` is the training phase's
        (`memory/setup_peak_mb` is set-up's)."""
        self.parallelize()
        if not hasattr(self, "optimizer"):
            self.build_optimizer()
        self.maybe_resume()
        if self.dist.is_main:
            self.open_run()
        else:  # rank 0 writes the run directory; the others only know its paths
            self.run = FollowerRun(self.plan.path)  # type: ignore[assignment]
        held = self.held_models()
        self.console.print(f"models held: {', '.join(name for name, _ in held)}")
        self.models_held = {
            "models/held": float(len(held)),
            "models/params_held": float(sum(count_parameters(m) for _, m in held)),
            "models/params_trainable": float(count_parameters(self.model, trainable_only=True)),
            "memory/setup_peak_mb": peak_memory_mb(self.device),
        }
        reset_peak_memory(self.device)

    def open_run(self) -> None:
        """Everything is loaded and valid: lock the run directory, make it (moving a replaced
        run aside, see `signalrl.logging.run`), write config.yaml, and on resume drop the
        logged steps past the checkpoint."""
        self.lock.acquire()
        try:
            resumed = self.step if self.resume_from is not None else None
            config = self.recipe.model_dump(mode="json")  # also the sinks' run config
            self.run = RunDir.open(
                self.plan, logging=self.recipe.logging, config=config, resume_step=resumed
            )
            self.run.write_config(dump_recipe(self.recipe))
            if resumed is not None:
                self.run.truncate_metrics(resumed)
        except BaseException:
            self.lock.release()
            raise

    # -- optimisation ---------------------------------------------------------------------
    def build_optimizer(self, params: list[torch.nn.Parameter] | None = None) -> None:
        t = self.recipe.train
        params = (
            params
            if params is not None
            else [p for p in self.model.parameters() if p.requires_grad]
        )
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": t.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=t.lr,
            betas=t.betas,
            eps=t.adam_eps,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.recipe))
        self.params = params

    def optimizer_step(self, step_scheduler: bool = True) -> dict[str, float]:
        """Clip, step AdamW (skipped on a non-finite gradient), zero grads, advance the LR
        schedule unless `step_scheduler` is False (several updates in one training step)."""
        t = self.recipe.train
        if self.dist.active and not self.dist.fsdp:
            distributed.sync_gradients(self.params)  # summed: the weights are global
        # the norm of the summed gradient (clipped when grad_clip is set)
        norm = torch.nn.utils.clip_grad_norm_(
            self.params, t.grad_clip if t.grad_clip is not None else float("inf")
        )
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        if torch.isfinite(norm):
            self.optimizer.step()
        else:  # a non-finite gradient: skip the update, keep going, and log it
            self.console.print(f"[yellow]step {self.step}: non-finite grad norm, update skipped")
        self.optimizer.zero_grad(set_to_none=True)
        if step_scheduler:
            self.scheduler.step()
        return {"grad_norm": float(norm), "lr": lr}

    # -- the step skeleton ------------------------------------------------------------------
    def next_batch(self) -> tuple[Any | None, dict[str, float]]:
        """This step's batch (None: nothing to learn from) and its metrics."""
        raise NotImplementedError

    def micro_batches(self, batch: Any) -> tuple[Sequence[Any], float]:
        """The micro-batches of `batch` and the total loss units of the step."""
        raise NotImplementedError

    def micro_loss(self, batch: Any, chunk: Any, epoch: int) -> MicroLoss:
        raise NotImplementedError

    def updates_per_batch(self) -> int:
        """Optimiser updates on one batch (PPO's `mu`)."""
        return 1

    def after_update(self) -> None:
        """Runs after every optimiser update (e.g. the critic's own optimiser)."""

    def step_metrics(self, batch: Any, result: StepResult) -> dict[str, float]:
        return result.metrics()

    def step_samples(self, batch: Any) -> list[dict[str, Any]]:
        return []

    def own_rows(self, n: int) -> slice:
        """The rows of a global batch of `n` that this rank trains (all on one rank)."""
        return self.dist.share(n)

    def micro_slices(self, n: int, share: bool = True) -> list[slice]:
        """This rank's rows of a global batch of `n` (`own_rows`; all `n` with `share=False`),
        `train.micro_batch_size` rows at a time (all of them when unset)."""
        own = self.own_rows(n) if share else slice(0, n)
        lo, hi = own.start, own.stop
        micro = self.recipe.train.micro_batch_size or max(hi - lo, 1)
        return [slice(i, min(hi, i + micro)) for i in range(lo, hi, max(micro, 1))]

    def padding_chunk(self, batch: Any, chunks: Sequence[Any]) -> Any:
        """A micro-batch that FSDP2 runs with weight 0 on a rank with fewer micro-batches
        than another (every rank must run the same forward/backward passes)."""
        if chunks:
            return chunks[0]
        raise RuntimeError(f"{type(self).__name__}: a rank has no micro-batch to pad with")

    def accumulate(
        self, batch: Any, chunks: Sequence[Any], total: float, epoch: int
    ) -> tuple[dict[str, float], list[Any]]:
        """Backward every micro-batch's mean loss times `units / total`: the sum is the
        step's mean over all its units, as one big batch would give. Returns the weighted
        sums of `loss` and of the micro-batches' metrics, and their `aux` values."""
        sums: dict[str, float] = {"loss": 0.0}
        aux: list[Any] = []
        n_real = len(chunks)
        runs = list(chunks)
        if self.dist.fsdp:  # the same number of forward/backward passes on every rank
            n_max = int(distributed.all_reduce_max(n_real))
            runs += [self.padding_chunk(batch, chunks) for _ in range(n_max - n_real)]
        # FSDP2 averages gradients over ranks: scale by the world size to sum them
        scale = float(self.dist.world) if self.dist.fsdp else 1.0
        for i, chunk in enumerate(runs):
            m = self.micro_loss(batch, chunk, epoch)
            w = m.units / total if total and i < n_real else 0.0
            full = m.loss if m.extra_loss is None else m.loss + m.extra_loss
            (full if w * scale == 1.0 else full * (w * scale)).backward()
            if i >= n_real:
                continue
            sums["loss"] += w * float(m.loss.detach())
            for k, v in m.metrics.items():
                sums[k] = sums.get(k, 0.0) + w * v
            aux.append(m.aux)
        if self.dist.active:  # weighted by global units: the sum over ranks is the mean
            parts = distributed.gather_objects(distributed.to_cpu((sums, aux)))  # one collective
            sums = {
                k: sum(p[0].get(k, 0.0) for p in parts) for k in {k for p in parts for k in p[0]}
            }
            aux = [a for p in parts for a in p[1]]
        return sums, aux

    def update(self, batch: Any) -> StepResult:
        """`updates_per_batch()` optimiser updates on `batch` (the schedule advances once)."""
        chunks, total = self.micro_batches(batch)
        n = self.updates_per_batch()
        epochs: list[dict[str, float]] = []
        first_aux: list[Any] = []
        opt: dict[str, float] = {}
        self.model.train()
        for epoch in range(n):
            sums, aux = self.accumulate(batch, chunks, total, epoch)
            epochs.append(sums)
            first_aux = first_aux or aux
            opt = self.optimizer_step(step_scheduler=epoch == n - 1)
            self.after_update()
        return StepResult(epochs, first_aux, opt)

    def skip_update(self) -> dict[str, float]:
        """A step with nothing to learn from: no update, the schedule advances."""
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return {"lr": lr, "skipped": 1.0}

    def train_step(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """One optimiser step; returns its metrics and rows for samples.jsonl."""
        t0 = time.perf_counter()
        self.sample_calls = 0
        tokens_before = self.budget.forward_tokens
        batch, stats = self.next_batch()
        samples: list[dict[str, Any]] = []
        if batch is None:
            metrics = {**stats, **self.skip_update()}
        else:
            t_data = time.perf_counter() - t0
            result = self.update(batch)
            metrics = {**stats, **self.step_metrics(batch, result), "time/rollout_s": t_data}
            samples = self.step_samples(batch)
        metrics.update(self.models_held)
        metrics["memory/peak_mb"] = peak_memory_mb(self.device)
        if self.dist.active:  # every rank's forward tokens; the largest peak
            own = torch.tensor([float(self.budget.forward_tokens - tokens_before)])
            self.budget.forward_tokens = tokens_before + int(distributed.all_reduce_sum(own))
            metrics["memory/peak_mb"] = distributed.all_reduce_max(metrics["memory/peak_mb"])
        metrics["time/step_s"] = time.perf_counter() - t0
        return self.account(metrics), samples

    def account(self, metrics: dict[str, float]) -> dict[str, float]:
        """Add this step's `time/step_s` to the budget and log the cumulative counters."""
        self.budget.train_seconds += metrics.get("time/step_s", 0.0)
        metrics.update(self.budget.metrics())
        return metrics

    @property
    def forward_tokens(self) -> int:
        return self.budget.forward_tokens

    @property
    def train_seconds(self) -> float:
        return self.budget.train_seconds

    # -- progress, evaluation ---------------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_before + (time.time() - self.started)

    def progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not (self.recipe.logging.progress and self.dist.is_main),
            transient=False,
        )

    def sampling_params(self, n: int = 1) -> SamplingParams:
        """The recipe's `sampling` section as sampler parameters, `n` samples per prompt."""
        s = self.recipe.sampling
        return SamplingParams(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            n=n,
            stop_strings=tuple(s.stop_strings),
        )

    def train_rows(self) -> list[dict[str, Any]]:
        """The task's train split, cut to `data.train_subset` rows when set, with prompts
        rendered by the tokenizer's chat template for rows that carry `messages`."""
        rows = self.task.train()
        k = self.recipe.data.train_subset
        if k is not None:
            if k > len(rows):
                raise ValueError(f"data.train_subset={k} but the train split has {len(rows)} rows")
            rows = rows[:k]
        return [self.render(r) for r in rows]

    def render(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row as the model sees it (`signalrl.data.chat.render_row`, which `signalrl
        eval` and `make-preferences` share): `messages` rendered by the chat template."""
        from signalrl.data.chat import render_row

        return render_row(self.tokenizer, row)

    def test_rows(self) -> list[dict[str, Any]]:
        rows = [self.render(r) for r in self.task.test()]
        n = self.recipe.eval.n
        return rows[:n] if n else rows

    def evaluate(self, *, with_pass_k: bool = True) -> EvalResult:
        """The task's test evaluation (rank 0 runs it on all-gathered weights; every rank
        gets its result)."""
        with self.gathered():
            return distributed.on_main(lambda: self._evaluate(with_pass_k))

    def _evaluate(self, with_pass_k: bool) -> EvalResult:
        e = self.recipe.eval
        return evaluate(
            self.model,
            self.tokenizer,
            self.test_rows(),
            self.task.verify,
            max_new_tokens=e.max_new_tokens or self.recipe.sampling.max_new_tokens,
            k=e.k if with_pass_k else 0,
            samples=e.samples,
            temperature=e.temperature,
            batch_size=e.batch_size,
            seed=self.recipe.seed,
            stop_strings=self.recipe.sampling.stop_strings,
            autocast_dtype=self.autocast_dtype,
            extract=getattr(self.task, "extract", None),
        )

    def maybe_evaluate(self, metrics: dict[str, Any]) -> None:
        every = self.recipe.eval.every
        if every and self.step % every == 0 and self.step < self.recipe.train.steps:
            metrics.update(self.evaluate(with_pass_k=False).metrics())

    # -- the loop ---------------------------------------------------------------------------
    def progress_info(self, metrics: dict[str, Any]) -> str:
        return f"loss {metrics.get('loss', float('nan')):.4f}"

    def progress_name(self) -> str:
        return self.recipe.trainer

    def train(self) -> dict[str, Any]:
        """Step until `train.steps`, with logging, samples, evaluation and checkpoints; then
        the final evaluation and `final/`."""
        t, lg = self.recipe.train, self.recipe.logging
        metrics: dict[str, Any] = {}
        stop = False
        self.doctor = self.make_doctor()
        with self.progress() as bar:
            task = bar.add_task(self.progress_name(), total=t.steps, completed=self.step, info="")
            while self.step < t.steps:
                metrics, samples = self.first_step() if self.run.replaced else self.train_step()
                self.step += 1
                self.maybe_evaluate(metrics)
                if samples and lg.samples_every and self.step % lg.samples_every == 0:
                    self.run.log_samples(self.step, samples[: lg.samples_n])
                if self.step % lg.every == 0 and self.step < t.steps:
                    metrics["time/elapsed_s"] = self.elapsed()
                    self.run.log_metrics(self.step, metrics)
                    stop = distributed.on_main(lambda m=metrics: self.consult_doctor(m))
                info = self.progress_info(metrics)
                if "eval/accuracy" in metrics:
                    info += f"  acc {metrics['eval/accuracy']:.3f}"
                bar.update(task, completed=self.step, info=info)
                self.maybe_checkpoint()
                if spent := self.budget.exhausted(t.max_forward_tokens):
                    self.console.print(f"train.max_forward_tokens reached at step {self.step}")
                if stop or spent:
                    self.save_checkpoint()
                    break
        return self.finish(metrics)

    def first_step(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """The first step of a run that replaces another (`--overwrite`): the old run is put
        back if it fails, and deleted once it succeeded."""
        try:
            out = self.train_step()
        except BaseException:
            self.run.restore_replaced()
            self.lock.release()
            raise
        self.run.drop_replaced()
        return out

    def close_run(self) -> None:
        self.run.drop_replaced()
        self.run.close()
        if self.dist.is_main:
            self.lock.release()
        distributed.barrier()  # final/ is complete for every rank

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Final evaluation, `final/` and the last metrics row."""
        result = self.evaluate()
        metrics.update(result.metrics())
        metrics["time/elapsed_s"] = self.elapsed()
        self.run.log_metrics(self.step, metrics)
        self.save_final()
        self.write_report()
        self.close_run()
        return {
            "accuracy": result.accuracy,
            **{f"pass_at_{k}": v for k, v in result.pass_at_k.items()},
            "seconds": self.elapsed(),
            "model": str(self.run.final),
            "steps": self.step,
        }
