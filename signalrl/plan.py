"""`signalrl plan`: the memory per GPU of a recipe, on paper, before any GPU is rented.

Parameter counts come from the real architecture: the model is built from its Hugging Face
config on the `meta` device (no memory, no weights) and its parameters are counted, and the
LoRA adapter is signalrl's own (`models.lora.apply_lora` on that meta model). Everything else
is the arithmetic of what signalrl holds (see docs/scaling.md for each term):

- full fine-tuning keeps the policy in float32 (a bf16/fp16 `model.dtype` is trained as fp32
  master weights under bf16 autocast, `trainers/base.py`): 4 bytes of weights, 4 of
  gradients and 8 of AdamW moments per trainable parameter; `fsdp2` shards these three over
  the ranks, `ddp` replicates them;
- the reference is a deep copy of the fp32 policy, replicated on every rank (none when
  `rl.kl_coef` is 0; nothing extra with LoRA: the adapter-disabled base is the reference);
  the PPO critic (body + value head, fp32, its own AdamW), a distillation teacher
  (`distill.teacher_dtype`) and reward models are replicated too (`distributed.py`);
- activations are those autograd saves for one training micro-batch (measured per layer on
  signalrl's Qwen2 presets, in `tests/test_plan.py`): the prompt once and the completions on
  its gathered KV cache (training-time prefix sharing) or, under gradient checkpointing, each
  decoder layer's input plus one layer recomputed; the LM head by `LOGIT_CHUNK_ELEMENTS`;
- generation holds the KV cache of all the rank's samples at prompt + `max_new_tokens`,
  and under `fsdp2` the all-gathered policy (`distributed.gathered`);
- a lagging sampler (`sampling.policy_lag: k`, `rollout.stale`) holds a frozen copy of the
  policy on the GPU and `k + 1` weight snapshots in host memory (reported apart).

The peak is the largest of three phases: generation, training (with a single micro-batch
the gradients replace the activations as backward frees them) and the optimizer step.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GIB = 2**30
STRATEGIES = ("ddp", "fsdp2", "lora")
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PlanError(ValueError):
    """A recipe or an option the planner cannot plan; the message names the file or flag."""


@dataclass(frozen=True)
class Shape:
    """The sizes of one causal LM, counted on the meta device."""

    source: str
    model_type: str
    params: int  # unique parameters (tied embeddings once)
    body_params: int  # without the LM head: a critic's or reward model's body
    linear_params: int  # weights and biases of the linear layers (autocast casts these)
    layer_params: int  # one decoder layer
    lora_params: int  # the trainable parameters of the recipe's LoRA adapter
    largest: int  # the largest parameter tensor (a per-tensor AdamW's temporaries)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def model_config(name_or_path: str, model: Any, where: str) -> tuple[Any, str]:
    """The HF config of `name_or_path`: a signalrl preset (built as `model.architecture` with
    `model.tokenizer`) or a local directory with a config.json (relative to the working
    directory)."""
    from signalrl.models import PRESETS, is_preset, preset_config

    if is_preset(name_or_path):
        from signalrl.models.tokenizer import build_tokenizer

        tok = build_tokenizer(model.tokenizer)
        return preset_config(name_or_path, tok, model.architecture), f"preset {name_or_path}"
    path = Path(name_or_path)
    if not path.is_dir():
        raise PlanError(
            f"{where}: model {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor "
            "a directory (a checkpoint, or just its config.json)"
        )
    if not (path / "config.json").is_file():
        raise PlanError(f"{where}: {path}: no config.json; the planner reads the model's config")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path), str(path)
    except Exception as e:  # noqa: BLE001 - any config the transformers loader refuses
        raise PlanError(f"{where}: {path / 'config.json'}: {type(e).__name__}: {e}") from e


def _numel(params: Any) -> int:
    seen: dict[int, int] = {}
    for p in params:
        seen[id(p)] = p.numel()
    return sum(seen.values())


def count_shape(config: Any, source: str, lora: Any = None) -> Shape:
    """Build `config`'s causal LM on the meta device and count its parameters (and those of
    signalrl's LoRA adapter with the `lora` section's settings)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from signalrl.distributed import decoder_layers

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore", FutureWarning)  # transformers' own deprecations
        model = AutoModelForCausalLM.from_config(config)
    linear = [t for m in model.modules() if isinstance(m, nn.Linear) for t in m.parameters()]
    if type(model).__name__.startswith("GPT2"):  # GPT-2's Conv1D is a linear layer too
        linear += [
            t for m in model.modules() if type(m).__name__ == "Conv1D" for t in m.parameters()
        ]
    head = model.get_output_embeddings()
    body = getattr(model, "base_model", model)
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    shape = dict(
        source=source,
        model_type=str(config.model_type),
        params=_numel(model.parameters()),
        largest=max(p.numel() for p in model.parameters()),
        body_params=_numel(body.parameters())
        if body is not model
        else _numel(model.parameters()) - (head.weight.numel() if head is not None else 0),
        linear_params=_numel(linear),
        layer_params=_numel(decoder_layers(model)[0].parameters()),
        hidden=hidden,
        intermediate=int(inter or 4 * hidden),
        layers=int(config.num_hidden_layers),
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
        vocab=int(config.vocab_size),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )
    lora_params = 0
    if lora is not None:
        from signalrl.models.lora import apply_lora

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            adapted = apply_lora(model, lora)
        lora_params = _numel(p for p in adapted.parameters() if p.requires_grad)
    return Shape(lora_params=lora_params, **shape)  # type: ignore[arg-type]


def classifier_params(config: Any) -> int:
    """Parameters of `config`'s sequence classifier (a reward model), on the meta device."""
    import torch
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        return _numel(AutoModelForSequenceClassification.from_config(config).parameters())


@dataclass(frozen=True)
class Workload:
    """One optimiser step's sequences, from the recipe (and the length flags)."""

    trainer: str
    rows: int  # training sequences per step (global)
    prompts: int  # distinct prompts per step (online; = rows offline)
    group: int  # samples per prompt (1 offline)
    prompt_len: int  # online: prompt tokens; offline: 0
    new_tokens: int  # online: sampling.max_new_tokens; offline: tokens per row
    micro: int | None  # train.micro_batch_size
    generates: bool
    lm_head: bool = True  # False for a reward model (a score head)

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.new_tokens


def workload(recipe: Any, prompt_len: int, seq_len: int | None) -> Workload:
    """The step a recipe runs: online RL and distillation sample `rl.group_size` completions
    of `train.batch_size` prompts (prompt of `prompt_len` tokens + `sampling.max_new_tokens`);
    SFT trains `batch_size` rows, preference and reward-model training `2 * batch_size`
    (chosen and rejected) of `seq_len` tokens (default `data.max_length`, else 1024)."""
    t, kind = recipe.train, recipe.trainer
    length = seq_len or recipe.data.max_length or 1024
    micro = t.micro_batch_size
    new = recipe.sampling.max_new_tokens
    if kind in ("online_rl", "distill"):
        g = recipe.rl.group_size
        return Workload(kind, t.batch_size * g, t.batch_size, g, prompt_len, new, micro, True)
    if kind == "preference" and recipe.preference.online:
        pairs = t.batch_size * recipe.preference.online_pairs_per_prompt
        g = recipe.preference.online_samples
        return Workload(kind, 2 * pairs, t.batch_size, g, prompt_len, new, micro, True)
    rows = t.batch_size if kind == "sft" else 2 * t.batch_size
    return Workload(kind, rows, rows, 1, 0, length, micro, False, kind != "reward_model")


@dataclass
class Plan:
    """The bytes per GPU of one strategy on `gpus` ranks."""

    strategy: str
    gpus: int
    terms: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    note: str = ""
    host: dict[str, float] = field(default_factory=dict)  # bytes in host (CPU) memory

    @property
    def total(self) -> float:
        return max(self.phases.values())

    def fits(self, gpu_mem_gib: float) -> bool:
        return not self.note and self.total <= gpu_mem_gib * GIB


@dataclass(frozen=True)
class Precision:
    """Bytes per element of what a strategy holds and computes."""

    weights: int  # the policy's weights as held (4: fp32 master)
    compute: int  # activations (2 under bf16 autocast or FSDP2 bf16 mixed precision)
    residual: int  # the residual stream and the RMSNorm internals
    casts: bool  # autocast casts fp32 weights and inputs to bf16 (and saves the casts)
    gathered: int  # an FSDP2 all-gathered parameter


def precision(recipe: Any, strategy: str) -> Precision:
    """`trainers/base.py`: full fine-tuning loads a bf16/fp16 `model.dtype` in fp32 under bf16
    autocast; LoRA keeps the base in `model.dtype`. `distributed.shard`: on CUDA with
    `train.precision: bf16` FSDP2 all-gathers bf16 parameters (no autocast casts)."""
    half = recipe.model.dtype != "float32"
    autocast = recipe.train.precision == "bf16" or (half and strategy != "lora")
    weights = _BYTES[recipe.model.dtype] if strategy == "lora" else 4
    if strategy == "fsdp2" and recipe.train.precision == "bf16":
        return Precision(4, 2, 2, False, 2)
    compute = 2 if autocast else 4
    return Precision(weights, compute, weights, autocast and weights == 4, weights)


def _layer(s: Shape, p: Precision, rows: int, q: int, keys: int) -> float:
    """Bytes autograd saves in one decoder layer for `rows` rows of `q` query tokens that
    attend over `keys` positions (padded rows: SDPA takes a mask, so K and V are repeated to
    all heads and the float mask is saved). Fitted on the Qwen2 presets (test_plan.py)."""
    h, a = s.hidden, p.compute
    per_query = (
        4 * h * p.residual  # two RMSNorms: input and normalised output
        + (6 if p.casts else 3) * h * a  # the linear layers' (cast) inputs, attention out
        + h * a  # the rotated queries
        + 4 * s.intermediate * a  # gate, up, SiLU(gate), SiLU(gate) * up
        + 2 * 4
        + s.heads * 4  # the norms' rsqrt, the attention log-sum-exp (fp32)
        + keys * a  # the attention mask
    )
    return rows * (q * per_query + keys * 2 * h * a)


def activations(s: Shape, p: Precision, w: Workload, rows: int, ckpt: bool) -> float:
    """Bytes saved for backward by one micro-batch of `rows` training rows (without the LM
    head): `ckpt` keeps each layer's input and recomputes one layer at a time; otherwise
    online rows share their prompt (`shared_prefix_logps`): the distinct prompts run once and
    the completions attend over the prompt's gathered KV cache."""
    final_norm = (2 * s.hidden + 1) * p.residual
    if ckpt or not w.generates or w.group == 1:
        tokens = rows * w.seq_len
        one = _layer(s, p, rows, w.seq_len, w.seq_len)
        if ckpt:
            return tokens * (s.layers * s.hidden * p.residual + final_norm) + one
        return s.layers * one + tokens * final_norm
    prompts = min(math.ceil(rows / w.group) + (1 if rows % w.group else 0), rows)
    prompt = _layer(s, p, prompts, w.prompt_len, w.prompt_len)
    completion = _layer(s, p, rows, w.new_tokens, w.seq_len)
    tokens = prompts * w.prompt_len + rows * w.new_tokens
    return s.layers * (prompt + completion) + tokens * final_norm


def logits_bytes(s: Shape, p: Precision, rows: int, positions: int) -> float:
    """The LM head of one micro-batch: above `LOGIT_CHUNK_ELEMENTS` logits the head runs a
    chunk at a time under checkpointing (about 5 float32 chunk-sized tensors in backward,
    plus the gathered hidden states); below, the whole logits are saved and their gradient
    and float32 chunk copies of 1024 rows (`token_logprobs`) exist in backward."""
    from signalrl.models.logprobs import LOGIT_CHUNK_ELEMENTS

    n = rows * positions * s.vocab
    if n > LOGIT_CHUNK_ELEMENTS:
        return 5 * LOGIT_CHUNK_ELEMENTS * 4 + rows * positions * s.hidden * p.compute
    return 2 * n * p.compute + min(1024, rows * positions) * s.vocab * 4 * 3


def kv_cache_bytes(s: Shape, p: Precision, rows: int, tokens: int) -> float:
    """The generation KV cache of `rows` samples at `tokens` positions: K after RoPE is in the
    residual stream's dtype, V in the compute dtype; `DynamicCache` grows by concatenation, so
    one layer exists twice while it is extended."""
    per_layer = rows * tokens * s.kv_dim * (p.residual + p.compute)
    return (s.layers + 1) * per_layer


@dataclass(frozen=True)
class Extra:
    """The models held beside the policy: (name, bytes) each, and the critic's body."""

    models: list[tuple[str, float]]
    critic_body: int = 0


def extra_models(recipe: Any, s: Shape, where: str) -> Extra:
    """The PPO critic (fp32 body + value head with its AdamW: 16 bytes a parameter), a
    distillation teacher (`distill.teacher_dtype`, default `model.dtype`) and reward models
    (`rewards` of type model, fp32): all replicated on every rank."""
    models: list[tuple[str, float]] = []
    critic = 0
    rl = getattr(recipe, "rl", None)
    if rl is not None:
        from signalrl.config.methods import registry_meta
        from signalrl.registry import ADVANTAGES

        if registry_meta(ADVANTAGES, rl.advantage, "needs_values", False):
            critic = s.body_params + s.hidden + 1
            models.append(("critic (fp32 + AdamW)", 16.0 * critic))
    if recipe.trainer == "distill":
        d = recipe.distill
        cfg, src = model_config(d.teacher, recipe.model, f"{where}: distill.teacher")
        teacher = count_shape(cfg, src)
        models.append(
            ("teacher", float(teacher.params * _BYTES[d.teacher_dtype or recipe.model.dtype]))
        )
    for spec in getattr(recipe, "rewards", []):
        if spec.type == "model" and spec.path:
            cfg, _ = model_config(spec.path, recipe.model, f"{where}: rewards.path")
            models.append((f"reward model {spec.name or spec.path}", 4.0 * classifier_params(cfg)))
    return Extra(models, critic)


def uses_reference(recipe: Any) -> bool:
    if recipe.trainer in ("online_rl", "distill"):
        return bool(recipe.rl.uses_reference)
    if recipe.trainer == "preference":
        return recipe.preference.uses_reference and recipe.preference.reference == "copy"
    return False


def _own(n_items: int, gpus: int) -> int:
    return max(1, math.ceil(n_items / gpus))


def _checks(recipe: Any, strategy: str, gpus: int) -> str:
    """Why signalrl would refuse this run (empty: it runs)."""
    if strategy == "fsdp2" and gpus == 1:
        return "refused: fsdp2 on 1 rank"
    if gpus > 1 and recipe.train.batch_size % gpus:
        return f"refused: batch_size {recipe.train.batch_size} % {gpus} != 0"
    return ""


def _stale_sampler(recipe: Any, t: dict[str, float], shard: int) -> dict[str, float]:
    """`sampling.policy_lag: k` (`rollout.stale`): a frozen copy of the policy samples (a GPU
    term added to `t`); its k + 1 weight snapshots are on the CPU (returned, host memory)."""
    lag = recipe.sampling.policy_lag if recipe.trainer == "online_rl" else 0
    if not lag:
        return {}
    copy = t["stale sampler (sampling.policy_lag)"] = t["policy weights"] * shard
    return {f"policy snapshots ({lag + 1}, sampling.policy_lag)": (lag + 1) * copy}


def plan_one(
    recipe: Any,
    s: Shape,
    w: Workload,
    extra: Extra,
    strategy: str,
    gpus: int,
    foreach: bool = True,
) -> Plan:
    """The bytes per GPU of `recipe` under `strategy` on `gpus` ranks (see the module doc).
    `foreach`: AdamW's multi-tensor step (torch's default on CUDA: one temporary as large as
    the moments); False for its per-tensor step (the CPU default: two temporaries of the
    largest parameter)."""
    if strategy not in STRATEGIES:
        raise PlanError(f"--strategy {strategy!r}: use one of {', '.join(STRATEGIES)} or all")
    if gpus < 1:
        raise PlanError(f"--gpus {gpus}: the number of GPUs must be >= 1")
    p = precision(recipe, strategy)
    lora = strategy == "lora"
    shard = gpus if strategy == "fsdp2" else 1
    trainable = s.lora_params if lora else s.params
    t: dict[str, float] = {}
    t["policy weights"] = (s.params * p.weights + (4 * s.lora_params if lora else 0)) / shard
    t["gradients (fp32)"] = 4.0 * trainable / shard
    t["optimizer (AdamW m, v)"] = 8.0 * trainable / shard
    t["reference"] = 4.0 * s.params if uses_reference(recipe) and not lora else 0.0
    for name, size in extra.models:
        t[name] = size
    host = _stale_sampler(recipe, t, shard)
    persistent = sum(t.values()) - t["gradients (fp32)"]
    # this rank's share of the step (online: whole groups of prompts)
    gen_rows = _own(w.prompts, gpus) * w.group if w.generates else 0
    rows = gen_rows if w.trainer in ("online_rl", "distill") else _own(w.rows, gpus)
    micro = min(w.micro or rows, rows)
    ckpt = bool(recipe.train.gradient_checkpointing)
    act = activations(s, p, w, micro, ckpt)
    if extra.critic_body:  # the critic's forward on the same rows (no prefix sharing)
        act += activations(
            s,
            p,
            Workload(w.trainer, micro, micro, 1, w.prompt_len, w.new_tokens, None, False),
            micro,
            ckpt,
        )
    t["activations (micro-batch)"] = act
    t["LM head logits"] = logits_bytes(s, p, micro, w.new_tokens) if w.lm_head else 0.0
    head = s.linear_params - s.layers * s.layer_params
    t["autocast bf16 weight copies"] = (
        2.0 * (s.layer_params + head if ckpt else s.linear_params) if p.casts else 0.0
    )
    # FSDP2: the root group (embeddings, head, final norm) stays gathered through the step,
    # two decoder layers are gathered at a time (prefetch), one layer's full gradient waits
    # for its reduce-scatter
    root = s.params - s.layers * s.layer_params
    t["fsdp2 gathered (training)"] = (
        (root + 2 * s.layer_params) * p.gathered + 4.0 * s.layer_params if shard > 1 else 0.0
    )
    t["KV cache (generation)"] = kv_cache_bytes(s, p, gen_rows, w.seq_len) if gen_rows else 0.0
    t["sampling logits (generation)"] = 4.0 * gen_rows * s.vocab * 4
    t["fsdp2 gathered (generation)"] = (
        float(s.params * p.gathered) if shard > 1 and w.generates else 0.0
    )
    largest = trainable if lora else s.largest
    t["optimizer step temporaries"] = 4.0 * trainable / shard if foreach else 8.0 * largest
    gen = ("KV cache (generation)", "sampling logits (generation)", "fsdp2 gathered (generation)")
    saved = sum(t[k] for k in ("activations (micro-batch)", "LM head logits"))
    saved += t["autocast bf16 weight copies"]
    grads = t["gradients (fp32)"]
    if math.ceil(rows / micro) > 1:  # later micro-batches run with every gradient allocated
        step = grads + saved
    else:  # gradients appear in backward as the saved tensors are freed, layer by layer
        head_grads = 4.0 * (trainable - s.layers * s.layer_params) / shard if not lora else 0
        step = max(grads, saved + max(head_grads, 0.0))
    phases = {"training": persistent + t["fsdp2 gathered (training)"] + step}
    if w.generates:
        phases["generation"] = persistent + sum(t[k] for k in gen)
    phases["optimizer step"] = persistent + t["gradients (fp32)"] + t["optimizer step temporaries"]
    return Plan(strategy, gpus, t, phases, _checks(recipe, strategy, gpus), host)


@dataclass
class Report:
    """Everything `signalrl plan` prints."""

    recipe: str
    shape: Shape
    workload: Workload
    gpu_mem_gib: float
    plans: list[Plan]

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "model": asdict(self.shape),
            "workload": asdict(self.workload),
            "gpu_mem_gib": self.gpu_mem_gib,
            "plans": [
                {
                    "strategy": p.strategy,
                    "gpus": p.gpus,
                    "terms_bytes": p.terms,
                    "phases_bytes": p.phases,
                    "total_bytes": p.total,
                    "total_gib": p.total / GIB,
                    "fits": p.fits(self.gpu_mem_gib),
                    "note": p.note,
                    "host_bytes": p.host,
                }
                for p in self.plans
            ],
        }


def parse_gpus(text: str) -> list[int]:
    """`--gpus 8` or `--gpus 1,8,64`."""
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise PlanError(f"--gpus {text!r}: expected a number or a list like 1,8,64") from None
    if not out or any(g < 1 for g in out):
        raise PlanError(f"--gpus {text!r}: every GPU count must be >= 1")
    return out


def parse_strategies(text: str) -> list[str]:
    names = list(STRATEGIES) if text == "all" else [x.strip() for x in text.split(",")]
    bad = [n for n in names if n not in STRATEGIES]
    if bad or not names:
        raise PlanError(f"--strategy {text!r}: use {', '.join(STRATEGIES)}, a list of them or all")
    return names


def plan_recipe(
    path: str | Path,
    *,
    gpus: list[int],
    gpu_mem_gib: float = 80.0,
    strategies: list[str] | None = None,
    prompt_len: int = 256,
    seq_len: int | None = None,
    overrides: list[str] | None = None,
) -> Report:
    """Plan recipe `path` for each strategy and GPU count."""
    from signalrl.config import LoraConfig, load_recipe

    if gpu_mem_gib <= 0:
        raise PlanError(f"--gpu-mem {gpu_mem_gib}: GPU memory must be > 0 GiB")
    if prompt_len < 1 or (seq_len is not None and seq_len < 1):
        raise PlanError("--prompt-len and --seq-len must be >= 1")
    recipe = load_recipe(path, overrides or [])
    where = str(path)
    config, source = model_config(recipe.model.name_or_path, recipe.model, where)
    lora = recipe.lora if recipe.lora.enabled else LoraConfig(enabled=True)
    shape = count_shape(config, source, lora)
    w = workload(recipe, prompt_len, seq_len)
    extra = extra_models(recipe, shape, where)
    plans = [
        plan_one(recipe, shape, w, extra, st, g)
        for st in (strategies or list(STRATEGIES))
        for g in gpus
    ]
    return Report(where, shape, w, gpu_mem_gib, plans)


def render(report: Report) -> Any:
    """A rich Table: the terms, the phases, the peak and whether it fits, per column."""
    from rich.table import Table

    plans = report.plans
    big = max(p.total for p in plans) >= GIB
    unit, div = ("GiB", GIB) if big else ("MiB", 2**20)
    s, w = report.shape, report.workload
    title = (
        f"{report.recipe}: {s.source} ({s.model_type}, {s.params:,} parameters, LoRA "
        f"{s.lora_params:,}); {w.trainer}, {w.prompts} prompts x {w.group}, "
        f"{w.prompt_len} + {w.new_tokens} tokens — {unit} per GPU"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("term")
    for p in plans:
        table.add_column(f"{p.strategy} x{p.gpus}", justify="right")
    names = [k for k in plans[0].terms if any(p.terms.get(k) for p in plans)]
    for k in names:
        table.add_row(k, *[f"{p.terms.get(k, 0.0) / div:.2f}" for p in plans])
    for ph in ("generation", "training", "optimizer step"):
        if ph in plans[0].phases:
            table.add_row(f"[dim]phase: {ph}", *[f"[dim]{p.phases[ph] / div:.2f}" for p in plans])
    table.add_row("[bold]total (peak)", *[f"[bold]{p.total / div:.2f}" for p in plans])
    notes = sorted({p.note for p in plans if p.note})
    fits = [
        f"[yellow]({notes.index(p.note) + 1})"
        if p.note
        else ("[green]yes" if p.fits(report.gpu_mem_gib) else "[red]no")
        for p in plans
    ]
    table.add_row(f"fits in {report.gpu_mem_gib:g} GiB?", *fits)
    lines = ["; ".join(f"({i + 1}) {n}" for i, n in enumerate(notes))] if notes else []
    for k in {k: 0 for p in plans for k in p.host}:
        sizes = ", ".join(f"{p.host.get(k, 0.0) / div:.2f}" for p in plans)
        lines.append(f"host memory per process, {k}: {sizes} {unit}")
    if lines:
        table.caption = "\n".join(lines)
        table.caption_justify = "left"
    return table
