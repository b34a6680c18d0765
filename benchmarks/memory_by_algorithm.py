"""Train each online RL algorithm from the same SFT checkpoint and compare what it holds.

Each algorithm runs its recipe (`recipes/<algorithm>-arithmetic.yaml`) in its own process, so
the peak resident memory of one run does not leak into the next, and the script prints one
table: models held (policy, reference, critic, reward model), parameters held, peak memory
of the process, mean training reward over the first and last 5 steps, greedy test accuracy
after training, and seconds. It answers the chapter's "how much memory does GRPO save over
PPO?" with measured runs instead of arithmetic.

    python benchmarks/memory_by_algorithm.py --steps 10          # memory only, quick
    python benchmarks/memory_by_algorithm.py --steps 100 --out runs/algorithms.json

Run `signalrl train recipes/sft-small-arithmetic.yaml` first (or pass --model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ALGORITHMS = ["grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "ppo"]


def run_one(alg: str, args: argparse.Namespace, work: Path) -> dict:
    recipe = Path(args.recipes) / f"{alg}-arithmetic.yaml"
    sets = [
        f"train.steps={args.steps}",
        f"output_dir={work}",
        f"name={alg}",
        "logging.progress=false",
        "logging.every=1",
        "checkpoint.every=0",
        f"eval.k={args.k}",
    ]
    if args.model:
        sets.append(f"model.name_or_path={args.model}")
    cmd = [sys.executable, "-m", "signalrl.cli", "train", str(recipe), "--overwrite"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{alg} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (work / alg / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward/mean"] for r in rows if r.get("reward/mean") is not None]
    last = rows[-1]
    return {
        "algorithm": alg,
        "models_held": int(rows[0]["models/held"]),
        "params_held_M": rows[0]["models/params_held"] / 1e6,
        "peak_memory_mb": max(r.get("memory/peak_mb", 0.0) for r in rows),
        "reward_start": sum(rewards[:5]) / min(5, len(rewards)),
        "reward_end": sum(rewards[-5:]) / min(5, len(rewards)),
        "test_accuracy": last.get("eval/accuracy"),
        f"pass@{args.k}": last.get(f"eval/pass@{args.k}"),
        "seconds": seconds,
        "train_seconds": last.get("time/elapsed_s"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS))
    ap.add_argument("--recipes", default=str(Path(__file__).parent.parent / "recipes"))
    ap.add_argument("--model", default=None, help="SFT checkpoint (default: the recipes')")
    ap.add_argument("--work", default="runs/algorithms")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    args = ap.parse_args()
    work = Path(args.work)
    results = []
    console = Console(width=200)
    for alg in args.algorithms.split(","):
        console.print(f"running {alg} for {args.steps} steps ...")
        results.append(run_one(alg.strip(), args, work))
    table = Table(title=f"online RL algorithms, {args.steps} steps each, same SFT checkpoint")
    cols = list(results[0])
    for c in cols:
        table.add_column(c, justify="left" if c == "algorithm" else "right")
    for r in results:
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()])
    console.print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
