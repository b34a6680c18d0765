"""`signalrl quickstart`: SFT a tiny preset on arithmetic, then GRPO from that checkpoint.

The stages are two ordinary recipes (`sft` and `grpo` sections of `recipes/quickstart.yaml`,
whose content is also built in here so an installed package needs no repository checkout).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from signalrl.config import Recipe, RecipeError, recipe_from_dict
from signalrl.trainers import run_recipe

_TASK = {"name": "arithmetic", "digits": 2, "ops": "+", "operands": 2, "n_test": 300, "seed": 0}

DEFAULT: dict[str, Any] = {
    "sft": {
        "name": "sft",
        "trainer": "sft",
        "seed": 0,
        "model": {"name_or_path": "tiny", "seed": 0},
        "task": dict(_TASK),
        "train": {
            "steps": 250,
            "lr": 2.0e-3,
            "batch_size": 64,
            "schedule": "constant",
            "warmup_steps": 20,
            "precision": "bf16",
        },
        "sampling": {"max_new_tokens": 6},
        "eval": {"k": 8},
        "logging": {"every": 10},
        "checkpoint": {"every": 0},
    },
    "grpo": {
        "name": "grpo",
        "trainer": "online_rl",
        "seed": 0,
        "model": {"attn_implementation": "eager"},
        "task": dict(_TASK),
        "train": {
            "steps": 300,
            "lr": 1.0e-4,
            "batch_size": 16,
            "schedule": "cosine",
            "precision": "fp32",
        },
        "rl": {"algorithm": "grpo", "group_size": 8, "kl_coef": 0.0},
        "sampling": {"max_new_tokens": 6, "temperature": 1.0},
        "eval": {"k": 8},
        "logging": {"every": 5, "samples_every": 20},
        "checkpoint": {"every": 100},
    },
}


def load_quickstart(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """The two stage dicts, from `path` (same shape as DEFAULT) or the built-in default.
    Overrides are `sft.train.steps=10` or `grpo.rl.kl_coef=0.1`."""
    where = str(path) if path else "<built-in quickstart>"
    data = yaml.safe_load(Path(path).read_text()) if path else json.loads(json.dumps(DEFAULT))
    if not isinstance(data, dict) or set(data) != {"sft", "grpo"}:
        raise RecipeError(f"{where}: a quickstart recipe has exactly two sections, sft and grpo")
    for ov in overrides or []:
        stage, _, rest = ov.partition(".")
        if stage not in data or not rest:
            raise RecipeError(f"--set {ov!r}: must start with 'sft.' or 'grpo.'")
        data[stage].setdefault("_overrides", []).append(rest)
    return {"where": where, **data}


def run_quickstart(
    out: str | os.PathLike[str],
    recipe_path: str | None = None,
    overrides: list[str] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    console = console or Console(stderr=True)
    cfg = load_quickstart(recipe_path, overrides)
    out_dir = Path(out)
    stages: dict[str, Recipe] = {}
    for name in ("sft", "grpo"):
        raw = dict(cfg[name])
        ovs = raw.pop("_overrides", [])
        raw["output_dir"] = str(out_dir)
        if name == "grpo":
            raw.setdefault("model", {})["name_or_path"] = str(out_dir / "sft" / "final")
        stages[name] = recipe_from_dict(raw, f"{cfg['where']} [{name}]", ovs)
    summary: dict[str, Any] = {}
    for name, recipe in stages.items():
        console.rule(f"[bold]{name}")
        result = run_recipe(recipe, overwrite=True, console=console)
        k = recipe.eval.k
        summary[name] = {
            "accuracy": result["accuracy"],
            f"pass_at_{k}": result.get(f"pass_at_{k}"),
            "seconds": result["seconds"],
            "model": result["model"],
        }
    test_n = stages["sft"].eval.n
    from signalrl.tasks import make_task

    n_test = len(make_task(stages["sft"].task.name, **stages["sft"].task.kwargs()).test())
    summary = {"test_problems": min(n_test, test_n) if test_n else n_test, **summary}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out_dir / "summary.json")
    print_summary(summary, Console())
    return summary


def print_summary(summary: dict[str, Any], console: Console) -> None:
    keys = [k for k in summary["sft"] if k.startswith("pass_at_")]
    table = Table(title=f"quickstart: {summary['test_problems']} test problems")
    table.add_column("stage")
    table.add_column("greedy accuracy", justify="right")
    for k in keys:
        table.add_column(k.replace("pass_at_", "pass@"), justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("model")
    for stage in ("sft", "grpo"):
        s = summary[stage]
        table.add_row(
            stage,
            f"{s['accuracy']:.3f}",
            *[f"{s[k]:.3f}" for k in keys],
            f"{s['seconds']:.1f}",
            s["model"],
        )
    console.print(table)
    delta = summary["grpo"]["accuracy"] - summary["sft"]["accuracy"]
    console.print(f"GRPO changed greedy test accuracy by {delta * 100:+.1f} points.")
