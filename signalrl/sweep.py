"""One-parameter sweeps: run a recipe once per value of a dotted key, collect and plot.

`run_sweep("recipes/dpo-arithmetic.yaml", "preference.beta", [0.01, 0.1, 0.5, 1.0])` trains
the recipe once per value (run name `<name>-<key><value>`, e.g. `dpo-arithmetic-beta0.1`, in
the recipe's `output_dir`), then reads each run's `metrics.jsonl`:

* `test_accuracy`: `eval/accuracy` of the last row (the task evaluation at finish; for a
  reward model, the held-out pair accuracy);
* `reward_accuracy`: mean `rewards/accuracies` over the last `tail` training rows, and
  `eval_reward_accuracy`: the last `eval/rewards/accuracies`, if logged;
* `margin`: mean `rewards/margins` over the last `tail` training rows;
* `kl`: the last `eval/kl_ref` (sampled KL to the reference) if logged, else
  `eval/logratio_chosen` (`kl_source` says which).

A metric a run does not log is NaN (blank in the CSV). The results go to
`<output_dir>/<name>-sweep/`: `sweep.csv`, `sweep.json` and `sweep.png` (one panel per metric
against the value, log x-axis when every value is a positive number), and `report.html`, the
overlay report of the runs (`signalrl.report.overlay`: every run's curves, the doctor's
findings, links to each run's own report).

`train_all` (train a list of validated recipes in turn) and the metric readers are shared with
`signalrl.compare` (several named runs plotted against the student's budget).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import yaml

from signalrl.config import Recipe, RecipeError, load_recipe
from signalrl.logging.run import read_metrics

METRICS: tuple[str, ...] = (
    "test_accuracy",
    "reward_accuracy",
    "eval_reward_accuracy",
    "margin",
    "kl",
)


def parse_values(text: str) -> list[Any]:
    """`"0.01,0.1,1"` -> `[0.01, 0.1, 1]`: comma-separated, each parsed as YAML."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise ValueError(f"--values {text!r}: expected comma-separated values, e.g. 0.1,0.5")
    values = [yaml.safe_load(p) for p in parts]
    if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
        raise ValueError(f"--values {text!r}: a value is repeated")
    return values


def value_label(param: str, value: Any) -> str:
    """Run-name suffix for a value: the key's last part + the value (`beta0.1`)."""
    text = value if isinstance(value, str) else json.dumps(value)
    safe = "".join(c if c.isalnum() or c in ".-_" else "_" for c in str(text))
    return f"{param.rsplit('.', 1)[-1]}{safe}"


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _last(rows: list[dict[str, Any]], key: str) -> float:
    for r in reversed(rows):
        if r.get(key) is not None:
            return _num(r[key])
    return math.nan


def _tail_mean(rows: list[dict[str, Any]], key: str, tail: int) -> float:
    vals = [_num(r[key]) for r in rows if r.get(key) is not None]
    vals = [v for v in vals if math.isfinite(v)][-tail:]
    return sum(vals) / len(vals) if vals else math.nan


def collect(run_dir: str | Path, tail: int = 5) -> dict[str, Any]:
    """The sweep metrics of one finished run directory (see the module docstring)."""
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}: metrics.jsonl is empty")
    kl, source = _last(rows, "eval/kl_ref"), "eval/kl_ref"
    if math.isnan(kl):
        kl, source = _last(rows, "eval/logratio_chosen"), "eval/logratio_chosen"
    if math.isnan(kl):
        source = ""
    last = rows[-1]
    return {
        "test_accuracy": _num(last.get("eval/accuracy")),
        "reward_accuracy": _tail_mean(rows, "rewards/accuracies", tail),
        "eval_reward_accuracy": _last(rows, "eval/rewards/accuracies"),
        "margin": _tail_mean(rows, "rewards/margins", tail),
        "kl": kl,
        "kl_source": source,
        "steps": int(last.get("step", 0)),
    }


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_results(rows: list[dict[str, Any]], param: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = ["value", "run", *METRICS, "kl_source", "steps"]
    with (out / "sweep.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if _clean(r.get(k)) is None else r.get(k)) for k in fields})
    doc = {"param": param, "runs": [{k: _clean(v) for k, v in r.items()} for r in rows]}
    (out / "sweep.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(rows, param, out / "sweep.png")


def plot(rows: list[dict[str, Any]], param: str, path: Path) -> None:
    """One panel per metric against the swept value (categorical x for non-numbers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [r["value"] for r in rows]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = values if numeric else list(range(len(values)))
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.0), squeeze=False)
    for ax, name in zip(axes[0], METRICS, strict=True):
        ys = [r[name] for r in rows]
        ax.plot(xs, ys, marker="o")
        if numeric and all(v > 0 for v in values):
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(xs, [str(v) for v in values])  # the swept values, not a tick grid
        title = name
        if name == "kl":
            sources = sorted({r["kl_source"] for r in rows if r.get("kl_source")})
            title = f"kl ({', '.join(sources) or 'not logged'})"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(param, fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(rows: list[dict[str, Any]], param: str, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    short = {
        "test_accuracy": "test acc",
        "reward_accuracy": "reward acc",
        "eval_reward_accuracy": "eval reward acc",
        "margin": "margin",
        "kl": "kl",
    }
    table = Table(title=f"sweep over {param}")
    table.add_column(param.rsplit(".", 1)[-1])
    for name in METRICS:
        table.add_column(short[name], justify="right")
    for r in rows:
        cells = [("-" if math.isnan(r[n]) else f"{r[n]:.4g}") for n in METRICS]
        table.add_row(str(r["value"]), *cells)
    (console or Console()).print(table)


def train_all(
    recipes: list[tuple[str, Recipe]],
    *,
    overwrite: bool = False,
    resume: bool = False,
    console: Any = None,
) -> None:
    """Train each `(label, recipe)` in turn (validate them all first). With `resume`, a run
    with a checkpoint continues from it and one without starts over; with neither `resume`
    nor `overwrite`, an occupied run directory is an error before anything trains."""
    from signalrl.trainers import run_recipe
    from signalrl.trainers.base import latest_checkpoint

    if not (overwrite or resume):
        taken = [
            str(r.run_dir) for _, r in recipes if r.run_dir.is_dir() and any(r.run_dir.iterdir())
        ]
        if taken:
            raise FileExistsError(
                f"run directories already hold runs: {', '.join(taken)}; pass --resume to "
                "continue them or --overwrite to start over"
            )
    for label, recipe in recipes:
        if console is not None:
            console.print(f"[bold]{label}[/bold]: {recipe.run_dir}")
        cont = resume and latest_checkpoint(recipe.run_dir) is not None
        run_recipe(recipe, overwrite=overwrite or (resume and not cont), resume=cont)


def run_sweep(
    recipe_path: str | Path,
    param: str,
    values: list[Any],
    overrides: list[str] | None = None,
    *,
    overwrite: bool = False,
    tail: int = 5,
    console: Any = None,
) -> tuple[list[dict[str, Any]], Path]:
    """Train the recipe once per value of `param`; returns (rows, sweep directory)."""
    if not values:
        raise ValueError("sweep: no values")
    overrides = list(overrides or [])
    if any(o.split("=", 1)[0].strip() == param for o in overrides):
        raise RecipeError(f"sweep: --set also sets the swept key {param!r}")
    base = load_recipe(recipe_path, overrides)
    # every value must validate before anything trains
    recipes = []
    for v in values:
        name = f"{base.name}-{value_label(param, v)}"
        extra = [f"{param}={json.dumps(v)}", f"name={json.dumps(name)}"]
        recipes.append((v, load_recipe(recipe_path, [*overrides, *extra])))
    train_all([(f"{param} = {v}", r) for v, r in recipes], overwrite=overwrite, console=console)
    rows: list[dict[str, Any]] = []
    for v, recipe in recipes:
        rows.append({"value": v, "run": str(recipe.run_dir), **collect(recipe.run_dir, tail)})
    out = Path(base.output_dir) / f"{base.name}-sweep"
    write_results(rows, param, out)
    from signalrl.report.overlay import overlay_report

    report = overlay_report([r.run_dir for _, r in recipes], out / "report.html", console)
    if report is not None and console is not None:
        console.print(f"report: {report} (every run's curves and findings)", highlight=False)
    return rows, out
