"""Peak resident memory of GRPO and DPO training steps, signalrl vs TRL, with Qwen2's vocabulary.

Run from the repository root with a Python that has TRL (here: the separate bench venv):

    /work/trlvenv/bin/python benchmarks/memory_vs_trl.py               # 2 steps per run
    /work/trlvenv/bin/python benchmarks/memory_vs_trl.py --quick       # smoke run (small shapes)
    /work/trlvenv/bin/python benchmarks/memory_vs_trl.py --methods dpo --out mem.json

The model is a randomly initialised Qwen2 with `vocab_size=151936` (Qwen's), hidden 256,
intermediate 1024, 2 layers, 4 heads (2 KV heads), tied embeddings: 38.9M embedding
parameters and 2.0M others, so the `(rows, positions, V)` float32 logits (and their
log-softmax and gradient) dwarf the activations of the body, as at long sequence lengths in a
real model. The script saves it once with `save_pretrained` (with a word-level tokenizer of
exactly 151936 tokens, `t3 t4 ...`, so every sampled id decodes) and both frameworks load that
directory with `from_pretrained` (the tokenizer as `TokenizersBackend`, the file's pipeline,
in both: transformers 5's `AutoTokenizer` would rebuild a qwen2 tokenizer from the model type).

Each (method, framework) runs in its own fresh Python process, so one run's peak cannot hide
another's. In that process: imports, then the framework builds its trainer as it usually is
built (signalrl: `trainer_class(recipe.trainer)(recipe)`, as `run_recipe` does; TRL:
`GRPOTrainer` / `DPOTrainer` on the model from `from_pretrained`); both load the checkpoint
and (DPO) hold a frozen reference copy. The baseline is the resident set (VmRSS) then; the
peak (VmHWM, reset just before with `signalrl.logging.memory.reset_peak_memory`) is read
after `--steps` optimizer steps (signalrl: `trainer.train_step()`; TRL: `trainer.train()`
with `max_steps`). The table reports peak - baseline, i.e. what the training steps added:
AdamW's state (2x the parameters, in both), gradients, activations, the logits' chunks; the
ratio signalrl/TRL of it is the result (target <= 0.6). It also reports peak - the RSS
right after the imports (setup included) and its ratio, because the baselines can differ in
what is resident: safetensors weights are memory-mapped, so a model whose pages were not yet
touched (TRL's DPO reference) shows up in its peak instead of its baseline.

Held equal: the checkpoint, float32 weights and fp32 compute (no autocast), sdpa attention,
torch threads (`--threads`, recorded as each process ran), AdamW (`torch.optim.AdamW`, TRL
`optim="adamw_torch"`), lr 1e-6 constant, no gradient checkpointing (TRL's default is on),
no evaluation, logging, saving or progress bars during the steps, one micro-batch per step.

- GRPO: `--prompts` prompts x `--group` samples per step, prompts of exactly `--prompt-len`
  tokens, `--new-tokens` sampled tokens at temperature 1 (a random model practically never
  samples EOS, so every completion has that length in both), beta 0 (no reference model),
  one update per batch (mu / num_iterations 1), group-std advantages, the per-sequence
  token mean (TRL `loss_type="grpo"`), reward: the same deterministic hash of the completion
  text in [0, 1) for both (every group has non-zero advantages, so no row is skipped).
  Generation is short (`--new-tokens`, 24 by default), which is also the training length:
  both frameworks need log-probs of the completion positions only (signalrl: only those go
  through the LM head; TRL: only those are labelled, see below for its CPU head), so the
  logits a GRPO update needs are `rows x completion length x V` whatever the prompt length.
  The completion must be long enough (with 32 rows x 24 tokens the float32 logits are
  445 MiB) for them to dominate; the 64-token prompt adds attention/body work only.
- DPO: `--pairs` pairs per step (2 x pairs rows, chosen then rejected), prompt `--prompt-len`
  tokens, chosen and rejected `--completion-len` tokens each plus the EOS both add, sigmoid
  loss, beta 0.1, a frozen copy of the model as the reference (signalrl `reference: copy`,
  TRL `ref_model=None`, which copies it), no truncation.

What is not equal (it is what is compared): how each computes log-probs. signalrl runs the
body, then the LM head on the completion positions only, about 110 positions at a time under
activation checkpointing (`signalrl.models.logprobs`, 64 MiB float32 logits per chunk). TRL
1.16 patches the model with its own fused LM head (`trl.trainer.utils.add_fused_lm_head`,
`trl/kernels/chunked_logprob.py`): it never materialises the `(B, T, V)` logits either, but
on CPU it scores every position of the sequence (prompt included) in tiles of 4096 positions
x 32768 vocabulary entries (a 512 MiB float32 buffer once there are 4096 positions), and its
backward accumulates an fp32 gradient of the whole LM head weight. Also the samplers, and
each framework's other bookkeeping.

Other load: the share of the machine's CPU time other processes used during the steps is
recorded (`benchmarks/machine.py`); memory is much less sensitive to it than time, but a run
on a busy machine is flagged. This file is a script, never imported by the library.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from machine import cpu_snapshot, load_verdict, other_cpu_fraction, versions, wait_for_idle

VOCAB = 151936
MODEL = {"hidden": 256, "intermediate": 1024, "layers": 2, "heads": 4, "kv_heads": 2}
FULL = {
    "steps": 2,
    "prompts": 4,
    "group": 8,
    "prompt_len": 64,
    "new_tokens": 24,
    "pairs": 4,
    "completion_len": 96,
}
QUICK = {**FULL, "steps": 1, "prompts": 2, "group": 4, "new_tokens": 8, "pairs": 2}
QUICK.update(prompt_len=16, completion_len=32)
TARGET = 0.6
LR = 1e-6


def hash_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """A deterministic pseudo-random reward in [0, 1) of each completion's text (the same
    function for both frameworks; signalrl calls it as a `function` reward term)."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else json.dumps(c)
        out.append(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32)
    return out


# --------------------------------------------------------------------------- the checkpoint


def build_checkpoint(path: Path, seed: int = 0) -> dict[str, int]:
    """Save a random Qwen2 with Qwen's vocabulary and a word-level tokenizer of as many
    tokens (`<|pad|>`, `<|endoftext|>`, `<|unk|>`, then `t3` ... `t151935`)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|pad|>", "<|endoftext|>", "<|unk|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|pad|>",
        eos_token="<|endoftext|>",
        unk_token="<|unk|>",
        model_max_length=4096,
    )
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=MODEL["hidden"],
        intermediate_size=MODEL["intermediate"],
        num_hidden_layers=MODEL["layers"],
        num_attention_heads=MODEL["heads"],
        num_key_value_heads=MODEL["kv_heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    embed = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return {"parameters": total, "embedding_parameters": embed, "other_parameters": total - embed}


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"t{rng.randrange(3, VOCAB)}" for _ in range(n))


def write_data(work: Path, s: dict[str, Any]) -> dict[str, Path]:
    """Prompts (GRPO) and pairs (DPO) of random tokens, exactly the configured lengths."""
    rng = random.Random(0)
    n_prompts = s["prompts"] * (s["steps"] + 2) * 2
    grpo = [{"prompt": words(rng, s["prompt_len"]), "answer": "0"} for _ in range(n_prompts)]
    n_pairs = s["pairs"] * (s["steps"] + 2) * 2
    dpo = [
        {
            "prompt": words(rng, s["prompt_len"]),
            "chosen": " " + words(rng, s["completion_len"]),
            "rejected": " " + words(rng, s["completion_len"]),
        }
        for _ in range(n_pairs)
    ]
    out = {"grpo": work / "grpo_prompts.jsonl", "dpo": work / "dpo_pairs.jsonl"}
    for key, rows in (("grpo", grpo), ("dpo", dpo)):
        out[key].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


# --------------------------------------------------------------------------- signalrl


def signalrl_recipe(spec: dict[str, Any]) -> Any:
    from signalrl.config import recipe_from_dict

    s, method = spec["settings"], spec["method"]
    base: dict[str, Any] = {
        "name": f"mem-{method}-signalrl",
        "seed": 0,
        "output_dir": str(Path(spec["work"]) / "signalrl"),
        "model": {"name_or_path": spec["checkpoint"], "device": "cpu", "dtype": "float32"},
        "train": {
            "steps": s["steps"],
            "lr": LR,
            "schedule": "constant",
            "precision": "fp32",
            "threads": spec["threads"],
            "grad_clip": 1.0,
        },
        "eval": {"n": 1, "train_pairs": 0},
        "logging": {"progress": False, "tensorboard": False, "samples_every": 0},
        "checkpoint": {"every": 0},
        "doctor": {"enabled": False},
    }
    data, prompts = spec["data"][method], spec["data"]["grpo"]
    if method == "grpo":
        base["train"]["batch_size"] = s["prompts"]
        base.update(
            trainer="online_rl",
            task={"name": "dataset", "path": data, "format": "generic", "test_path": data},
            rl={"algorithm": "grpo", "group_size": s["group"], "kl_coef": 0.0, "mu": 1},
            sampling={"max_new_tokens": s["new_tokens"], "temperature": 1.0},
            rewards=[{"type": "function", "fn": "memory_vs_trl:hash_reward"}],
        )
    else:
        base["train"]["batch_size"] = s["pairs"]
        base.update(
            trainer="preference",
            # the task only provides (unused) evaluation prompts
            task={"name": "dataset", "path": prompts, "format": "generic", "test_path": prompts},
            data={"path": data, "test_fraction": 0.0},
            preference={"loss_type": "sigmoid", "beta": 0.1, "reference": "copy"},
        )
    return recipe_from_dict(base, "<memory_vs_trl>")


def run_signalrl(spec: dict[str, Any]) -> dict[str, Any]:
    from rich.console import Console

    from signalrl.trainers import trainer_class

    recipe = signalrl_recipe(spec)
    trainer = trainer_class(recipe.trainer)(recipe, overwrite=True, console=Console(quiet=True))

    def steps() -> dict[str, Any]:
        last: dict[str, Any] = {}
        for _ in range(spec["settings"]["steps"]):
            trainer.step += 1
            last, _samples = trainer.train_step()
        return {"steps_done": trainer.step, "loss": last.get("loss")}

    return measure_steps(steps)


# --------------------------------------------------------------------------- TRL


def trl_common(spec: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments both TRL trainers get (fp32 on CPU, no logging/saving/eval)."""
    from trl import GRPOConfig

    names = set(GRPOConfig.__dataclass_fields__)
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else None
    return {
        "output_dir": str(Path(spec["work"]) / "trl"),
        "max_steps": spec["settings"]["steps"],
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "optim": "adamw_torch",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "gradient_accumulation_steps": 1,
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "report_to": "none",
        "logging_strategy": "no",
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        ckpt or "gradient_checkpointing": False,
    }


def trl_trainer(spec: dict[str, Any]) -> Any:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TokenizersBackend

    s, method = spec["settings"], spec["method"]
    path = spec["checkpoint"]
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    )
    # transformers 5's AutoTokenizer rebuilds a qwen2 config's tokenizer as Qwen2Tokenizer
    # (its own pre-tokeniser) instead of reading tokenizer.json; load the file's pipeline,
    # as signalrl's loader does (`signalrl.models.load_tokenizer_checked`)
    tok = TokenizersBackend.from_pretrained(path)
    rows = [json.loads(line) for line in Path(spec["data"][method]).read_text().splitlines()]
    data = Dataset.from_list(rows)
    if method == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        config = GRPOConfig(
            **trl_common(spec),
            per_device_train_batch_size=s["prompts"] * s["group"],
            num_generations=s["group"],
            steps_per_generation=1,
            max_completion_length=s["new_tokens"],
            temperature=1.0,
            top_p=1.0,
            beta=0.0,
            num_iterations=1,
            loss_type="grpo",
            scale_rewards="group",
            use_vllm=False,
            log_completions=False,
        )
        return GRPOTrainer(
            model=model,
            reward_funcs=[hash_reward],
            args=config,
            train_dataset=data.remove_columns(["answer"]),
            processing_class=tok,
        )
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        **trl_common(spec),
        per_device_train_batch_size=s["pairs"],
        loss_type=["sigmoid"],
        beta=0.1,
        max_length=None,
        precompute_ref_log_probs=False,
    )
    return DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok)


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    trainer = trl_trainer(spec)

    def steps() -> dict[str, Any]:
        out = trainer.train()
        return {"steps_done": trainer.state.global_step, "loss": out.training_loss}

    return measure_steps(steps)


# --------------------------------------------------------------------------- one process


def measure_steps(run: Any) -> dict[str, Any]:
    """Baseline RSS now (trainer built), then the peak RSS while `run()` takes the steps."""
    import torch

    from signalrl.logging.memory import current_memory_mb, peak_memory_mb, reset_peak_memory

    gc.collect()
    base = current_memory_mb()
    reset_ok = reset_peak_memory()
    c0, t0 = cpu_snapshot(), time.perf_counter()
    info = run()
    seconds = time.perf_counter() - t0
    other = other_cpu_fraction(c0, cpu_snapshot())
    peak = peak_memory_mb()
    return {
        "baseline_mb": base,
        "peak_mb": peak,
        "peak_above_baseline_mb": peak - base,
        "peak_reset": reset_ok,
        "seconds": seconds,
        "other_processes_cpu_fraction": other,
        "torch_threads": torch.get_num_threads(),
        **info,
    }


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """The body of one measuring process: `spec` names the method and the framework."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(spec["threads"])
    from signalrl.logging.memory import current_memory_mb

    imports_mb = current_memory_mb()
    if spec["framework"] == "trl":
        import trl  # noqa: F401

        imports_mb = current_memory_mb()
        out = run_trl(spec)
    else:
        out = run_signalrl(spec)
    out["peak_above_imports_mb"] = out["peak_mb"] - imports_mb
    return {"rss_after_imports_mb": imports_mb, **out}


def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    here = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['method']}/{spec['framework']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 step, small shapes")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every run")
    p.add_argument("--out", default=None, help="JSON results (default: WORK/memory_vs_trl.json)")
    p.add_argument("--work", default="runs/bench_memory_vs_trl")
    p.add_argument("--methods", default="grpo,dpo", help="comma-separated: grpo, dpo")
    p.add_argument("--wait-idle", type=float, default=0, help="wait up to S s for idle CPUs")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    for key in FULL:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    return p.parse_args(argv)


def logits_mib(method: str, s: dict[str, Any]) -> float:
    """Size of the float32 logits of one update's scored positions (what a plain
    log-softmax would materialise, before its copy and its gradient)."""
    if method == "grpo":
        positions = s["prompts"] * s["group"] * s["new_tokens"]
    else:
        positions = 2 * s["pairs"] * (s["completion_len"] + 1)
    return positions * VOCAB * 4 / 2**20


def print_table(out: dict[str, Any]) -> None:
    print(f"\nmodel: {out['model']}; threads {out['threads']}; {out['settings']}")
    head = f"{'method':6s} {'framework':9s} {'baseline MiB':>13s} {'peak MiB':>9s} "
    head += f"{'peak-baseline':>14s} {'peak-imports':>13s}"
    print(head + f" {'steps':>6s} {'s':>7s} {'other CPU':>10s}")
    for m, r in out["results"].items():
        for fw in ("signalrl", "trl"):
            x = r[fw]
            other = x["other_processes_cpu_fraction"]
            print(
                f"{m:6s} {fw:9s} {x['baseline_mb']:13.0f} {x['peak_mb']:9.0f} "
                f"{x['peak_above_baseline_mb']:14.0f} {x['peak_above_imports_mb']:13.0f} "
                f"{x['steps_done']:6d} {x['seconds']:7.1f} "
                f"{'n/a' if other is None else f'{other:.0%}':>10s}"
            )
        ok = "meets" if r["ratio"] <= TARGET else "misses"
        print(
            f"{m}: float32 logits of the scored positions {r['logits_fp32_mib']:.0f} MiB; "
            f"signalrl/TRL peak above baseline = {r['ratio']:.2f} ({ok} the {TARGET} target); "
            f"above the RSS after imports (setup included) = {r['ratio_above_imports']:.2f}"
        )
    v = out["load"]
    if not v["idle"]:
        print(
            f"NOTE: busy machine (other processes up to {v['max_other_cpu_fraction']:.0%} of the "
            "CPUs): seconds are skewed; memory is not load-sensitive, but rerun on a quiet one."
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        print("memory_vs_trl.py needs TRL (e.g. /work/trlvenv/bin/python)", file=sys.stderr)
        return 2
    from rich.console import Console

    settings = dict(QUICK if args.quick else FULL)
    settings.update({k: getattr(args, k) for k in FULL if getattr(args, k) is not None})
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ckpt = work / "checkpoint"
    model_info = {**MODEL, "vocab_size": VOCAB, **build_checkpoint(ckpt)}
    data = {k: str(v) for k, v in write_data(work, settings).items()}
    results: dict[str, Any] = {}
    others: list[float | None] = []
    for method in args.methods.split(","):
        results[method] = {"logits_fp32_mib": logits_mib(method, settings)}
        for fw in ("signalrl", "trl"):
            if args.wait_idle:
                wait_for_idle(args.wait_idle, Console(stderr=True))
            spec = {"method": method, "framework": fw, "threads": args.threads}
            spec.update(settings=settings, checkpoint=str(ckpt), data=data, work=str(work))
            print(f"measuring {method} / {fw} ...", file=sys.stderr, flush=True)
            results[method][fw] = spawn(spec)
            others.append(results[method][fw]["other_processes_cpu_fraction"])
        r = results[method]
        r["ratio"] = r["signalrl"]["peak_above_baseline_mb"] / r["trl"]["peak_above_baseline_mb"]
        r["ratio_above_imports"] = (
            r["signalrl"]["peak_above_imports_mb"] / r["trl"]["peak_above_imports_mb"]
        )
    out = {
        "model": model_info,
        "settings": settings,
        "threads": args.threads,
        "quick": args.quick,
        "results": results,
        "target_ratio": TARGET,
        "load": load_verdict(*others),
        "versions": versions(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "total_seconds": time.perf_counter() - started,
    }
    out_path = Path(args.out) if args.out else work / "memory_vs_trl.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    print_table(out)
    print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
