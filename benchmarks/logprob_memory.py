"""Peak memory of completion log-probs with a 151936-token vocabulary (Qwen2's), before and
after the chunked LM head (`signalrl.models.logprobs`).

"before" is what `completion_logps` did until the chunked head: one forward pass of the whole
model, which materialises the `(B, T + 1, V)` logits (float32 here), then `token_logprobs`
over them; with a gradient the logits' gradient is another tensor of that size. "after" runs
the transformer body and applies the LM head to a chunk of positions at a time under
activation checkpointing (`losses.policy.hidden_token_logprobs`). A third row adds HF
gradient checkpointing (`train.gradient_checkpointing: true`).

The model is a tiny Qwen2 (hidden 128, 2 layers) with the full vocabulary, so the logits
dominate as they do for a real model at long sequence lengths. Each row: the peak resident
memory above the memory before the call (`signalrl.logging.memory`, VmHWM reset before each
call; CUDA: peak allocated), for a no-grad pass (a reference / old-log-prob pass) and a
forward + backward pass (a training micro-batch), and the seconds of the latter.

    python benchmarks/logprob_memory.py                        # B=8, prompt 64, completion 256
    python benchmarks/logprob_memory.py --batch 4 --completion 1024 --device cuda
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from signalrl.data.collate import SequenceBatch, build_batch
from signalrl.logging.memory import current_memory_mb, peak_memory_mb, reset_peak_memory
from signalrl.losses.policy import token_logprobs
from signalrl.models.logprobs import completion_logps
from signalrl.models.lora import enable_gradient_checkpointing


def before(model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """The earlier `completion_logps`: whole-model logits, then `token_logprobs`."""
    t = batch.completion_ids.shape[1]
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=t + 1,
    )
    logits = out.logits[:, -(t + 1) : -1, :]
    return token_logprobs(logits, batch.completion_ids) * batch.completion_mask


def measure(
    fn: Callable[[], torch.Tensor], device: torch.device, backward: bool
) -> tuple[float, float, torch.Tensor]:
    """(peak MiB above the start, seconds, the log-probs) of one call of `fn`."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
    reset_peak_memory(device)
    start_mb = current_memory_mb(device)
    t0 = time.perf_counter()
    with torch.set_grad_enabled(backward):
        out = fn()
        if backward:
            out.sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return peak_memory_mb(device) - start_mb, seconds, out.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.prompt + args.completion + 8,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(device).train()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=g).tolist()
    comps = torch.randint(0, args.vocab, (args.batch, args.completion), generator=g).tolist()
    batch = build_batch(prompts, comps, 0, device=device)

    rows = []
    results: dict[str, torch.Tensor] = {}
    for name in ("before: full logits", "after: chunked head", "after + grad checkpointing"):
        if name.endswith("checkpointing"):
            enable_gradient_checkpointing(model)

        def fn(name: str = name) -> torch.Tensor:
            if name.startswith("before"):
                return before(model, batch)
            return completion_logps(model, batch)

        nograd_mb, _, _ = measure(fn, device, backward=False)
        model.zero_grad(set_to_none=True)
        grad_mb, seconds, out = measure(fn, device, backward=True)
        model.zero_grad(set_to_none=True)
        results[name] = out
        rows.append((name, nograd_mb, grad_mb, seconds))
    base = results["before: full logits"]
    diff = max(float((v - base).abs().max()) for v in results.values())
    logits_mb = args.batch * (args.completion + 1) * args.vocab * 4 / 2**20
    print(
        f"vocab {args.vocab}, B={args.batch}, prompt {args.prompt}, completion "
        f"{args.completion}, {device}: float32 logits would be {logits_mb:.0f} MiB"
    )
    print(f"{'':30s} {'no-grad peak MiB':>17s} {'fwd+bwd peak MiB':>17s} {'fwd+bwd s':>10s}")
    for name, a, b, s in rows:
        print(f"{name:30s} {a:17.0f} {b:17.0f} {s:10.2f}")
    print(f"max |log-prob difference| vs before: {diff:.2e}")


if __name__ == "__main__":
    main()
