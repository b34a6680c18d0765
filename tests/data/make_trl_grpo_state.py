"""Rebuild ``trl_grpo_trainer_state.json``: the ``trainer_state.json`` of a real, tiny TRL
``GRPOTrainer`` run, which ``tests/test_doctor_runs.py`` gives to ``signalrl doctor``.

Usage (TRL is an optional bench extra; keep it out of the project's venv)::

    python3 -m venv /tmp/trlvenv
    /tmp/trlvenv/bin/pip install trl datasets      # torch/transformers: see below
    PYTHONPATH=. /tmp/trlvenv/bin/python tests/data/make_trl_grpo_state.py [--steps 16]

(The file in the repository was made with trl 1.16.0, transformers 5.24.0, torch 2.13.0+cpu;
the venv reused the project venv's torch and transformers through a ``.pth`` file, so only
trl and its missing dependencies were installed into it.)

The run: signalrl's ``tiny`` preset model (a Qwen2 config, random weights, seed 0) with the
``bpe`` preset tokenizer, both saved with ``save_pretrained`` and loaded back by TRL from that
directory; prompts from the built-in arithmetic task; one toy reward function ``vowels``, the
share of a completion's letters that are vowels (the random model writes word-like pieces
without digits, so a task reward would be 0 everywhere; this one varies within groups);
4 prompts x 4 generations per step, at most 8 new tokens, lr 1e-3, beta 0.04, logging every
step. ``trainer.state`` is saved as JSON at the end (what a
checkpoint's ``trainer_state.json`` holds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

OUT = Path(__file__).with_name("trl_grpo_trainer_state.json")


def vowels(completions: list[str], **kw: object) -> list[float]:
    """The share of the completion's letters that are vowels (0 without letters)."""
    out = []
    for c in completions:
        letters = [ch for ch in c.lower() if ch.isalpha()]
        out.append(sum(ch in "aeiou" for ch in letters) / len(letters) if letters else 0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from signalrl.models import load_model
    from signalrl.tasks import make_task

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="trl-grpo-"))
    model, tok = load_model("tiny", seed=0, tokenizer="bpe", attn_implementation="eager")
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(work / "model")

    task = make_task("arithmetic", digits=2, ops="+", operands=2, seed=0)
    rows = task.train()[: 4 * args.steps]
    data = Dataset.from_dict({"prompt": [r["prompt"] for r in rows]})
    settings = dict(
        per_device_train_batch_size=16, num_generations=4, gradient_accumulation_steps=1,
        max_steps=args.steps, max_completion_length=8, temperature=1.0, learning_rate=1e-3,
        lr_scheduler_type="constant", beta=0.04, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, use_vllm=False, disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else None
    settings[ckpt or "gradient_checkpointing"] = False
    config = GRPOConfig(output_dir=str(work / "trl"), **settings)
    trainer = GRPOTrainer(model=model, reward_funcs=[vowels], args=config, train_dataset=data,
                          processing_class=tok)
    trainer.train()
    trainer.state.save_to_json(str(args.out))
    state = json.loads(args.out.read_text())
    state["made_by"] = (f"tests/data/make_trl_grpo_state.py --steps {args.steps} (trl "
                        f"{trl.__version__}, transformers {transformers.__version__}, torch "
                        f"{torch.__version__})")
    args.out.write_text(json.dumps(state, indent=1) + "\n")
    print(f"wrote {args.out} ({len(state['log_history'])} log entries)")


if __name__ == "__main__":
    main()
