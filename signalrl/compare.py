"""Comparisons: several named runs from one start, test accuracy against the student's budget.

A comparison file is YAML with `trainer: compare`:

```yaml
trainer: compare
name: distill-compare-arithmetic
output_dir: runs
set: [model.name_or_path=runs/sft-arithmetic/final, train.steps=300, eval.every=25]
runs:
  - {name: grpo, recipe: recipes/grpo-arithmetic.yaml, set: [rl.beta=0.0]}
  - {name: on_policy, recipe: recipes/distill-arithmetic.yaml}
```

Every run is a recipe (path relative to the working directory) with the file's `set`
overrides, then the command line's `--set`, then the run's own `set` applied; it trains as
`<output_dir>/<name>/<run>/`. Every run is validated before the first one trains. The runs
must log the budget counters (`student/forward_tokens`, `time/train_s`), which the
`online_rl`, `distill` and `preference` trainers do
(`signalrl.trainers.online_rl.count_forward_tokens`), and should evaluate periodically
(`eval.every`, a multiple of `logging.every`, else the evaluations are not logged) so the
plot has curves.

With `start_eval: true` (default) each distinct start model is evaluated once (greedy, the
run's eval settings) and that point (0 tokens, 0 s) starts its curves.

Results in `<output_dir>/<name>/`:

* `compare.csv`, `compare.md`, `compare.json`: one row per run: final greedy test accuracy
  (and pass@k when the recipe asks), student forward tokens, training seconds
  (`time/train_s`: sampling, scoring, forward, backward, update; no evaluation or loading),
  wall seconds of the whole run (`time/elapsed_s`, evaluations and loading included), steps;
  `compare.json` also holds every run's curve and the start accuracies;
* `curves.csv`: every evaluation of every run (step, forward tokens, train seconds, accuracy);
* `compare.png`: accuracy against student forward tokens and against training seconds;
* `report.html`: the overlay report of the runs (`signalrl.report.overlay`: every run's
  curves, the doctor's findings, links to each run's own report), linked from `compare.md`.

`resume=True` reuses a finished run whose `config.yaml` matches, continues an unfinished one
from its latest checkpoint, and starts over one that has none.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from signalrl.config import Recipe, RecipeError, _format_errors, dump_recipe, load_recipe
from signalrl.config.recipe import DuplicateKeyError, load_yaml
from signalrl.logging.run import read_metrics
from signalrl.sweep import _clean, _last, _num, train_all

# trainers whose runs log task accuracy and the budget counters (a reward model does not
# generate, so it has no task accuracy)
COUNTER_TRAINERS: tuple[str, ...] = ("online_rl", "distill", "preference", "sft")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check_name(v: str) -> str:
    if not _NAME.match(v):
        raise ValueError(f"name {v!r}: use letters, digits, '.', '_' and '-'")
    return v


class CompareRun(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    recipe: str
    overrides: list[str] = Field(default_factory=list, alias="set")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)


class CompareFile(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    trainer: Literal["compare"]
    name: str
    output_dir: str = "runs"
    overrides: list[str] = Field(default_factory=list, alias="set")
    start_eval: bool = True
    runs: list[CompareRun] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)

    @field_validator("runs")
    @classmethod
    def _unique(cls, runs: list[CompareRun]) -> list[CompareRun]:
        names = [r.name for r in runs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"run names must be unique; repeated: {', '.join(dup)}")
        return runs

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _read_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: file not found")
    try:
        return load_yaml(p.read_text(encoding="utf-8"))
    except DuplicateKeyError as e:
        raise RecipeError(f"{p}: {e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError(f"{p}: not valid YAML: {e}") from None


def is_compare_file(path: str | Path) -> bool:
    """Whether `path` is a comparison file (a mapping with `trainer: compare`)."""
    try:
        data = _read_yaml(path)
    except RecipeError:
        return False
    return isinstance(data, dict) and data.get("trainer") == "compare"


def load_compare(
    path: str | Path, overrides: list[str] | None = None, name: str | None = None
) -> tuple[CompareFile, list[tuple[str, Recipe]]]:
    """The comparison file and every run's validated recipe (errors name the file and run);
    `name` replaces the file's (the results go to `<output_dir>/<name>/`)."""
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a comparison file must be a mapping")
    if name is not None:
        data = {**data, "name": name}
    try:
        spec = CompareFile.model_validate(data)
    except ValidationError as e:
        msg = _format_errors(e, str(path)).replace("invalid recipe", "invalid comparison")
        raise RecipeError(msg) from None
    out = spec.out_dir
    recipes: list[tuple[str, Recipe]] = []
    for run in spec.runs:
        where = f"{path}: run {run.name!r}"
        extra = [f"output_dir={json.dumps(str(out))}", f"name={json.dumps(run.name)}"]
        try:
            r = load_recipe(
                run.recipe, [*spec.overrides, *(overrides or []), *run.overrides, *extra]
            )
        except RecipeError as e:
            raise RecipeError(f"{where}: {e}") from None
        if r.trainer not in COUNTER_TRAINERS:
            raise RecipeError(
                f"{where}: trainer {r.trainer!r} does not measure task accuracy against "
                f"student/forward_tokens; a comparison takes {', '.join(COUNTER_TRAINERS)} runs"
            )
        if r.eval.every and r.eval.every % r.logging.every:
            raise RecipeError(
                f"{where}: eval.every ({r.eval.every}) must be a multiple of logging.every "
                f"({r.logging.every}), else the evaluations are not logged"
            )
        recipes.append((run.name, r))
    return spec, recipes


# -- results --------------------------------------------------------------------------------


def method_label(recipe: Recipe) -> str:
    """`grpo`, `distill/on_policy`, `distill/gkd(lmbda=0.5,beta=0.5,dataset)`, `dpo/sigmoid`,
    `online_dpo/sigmoid`, ..."""
    if recipe.trainer == "online_rl":
        return recipe.rl.algorithm
    if recipe.trainer == "sft":
        return "sft"
    if recipe.trainer == "preference":
        p = recipe.preference
        return f"{'online_dpo' if p.online else 'dpo'}/{p.loss_type}"
    d = recipe.distill
    if d.mode == "gkd":
        return f"distill/gkd(lmbda={d.lmbda:g},beta={d.jsd_beta:g},{d.gkd_data})"
    return f"distill/{d.mode}"


def collect_run(run_dir: str | Path) -> dict[str, Any]:
    """Final numbers and the accuracy curve of one finished run directory."""
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}: metrics.jsonl is empty")
    last = rows[-1]
    curve = [
        {
            "step": int(r.get("step", 0)),
            "forward_tokens": _num(r.get("student/forward_tokens")),
            "train_s": _num(r.get("time/train_s")),
            "accuracy": _num(r["eval/accuracy"]),
        }
        for r in rows
        if r.get("eval/accuracy") is not None
    ]
    out: dict[str, Any] = {
        "accuracy": _num(last.get("eval/accuracy")),
        "forward_tokens": _last(rows, "student/forward_tokens"),
        "train_s": _last(rows, "time/train_s"),
        "elapsed_s": _last(rows, "time/elapsed_s"),
        "steps": int(last.get("step", 0)),
        "curve": curve,
    }
    for k, v in last.items():
        if k.startswith("eval/pass@"):
            out[k.split("/", 1)[1]] = _num(v)
    return out


def start_accuracy(recipe: Recipe) -> float:
    """Greedy test accuracy of the run's start model, with the run's eval settings."""
    import torch

    from signalrl.data.chat import render_rows
    from signalrl.eval import evaluate
    from signalrl.models import load_model
    from signalrl.tasks import make_task

    m, e = recipe.model, recipe.eval
    device = m.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(
        m.name_or_path,
        dtype=m.dtype,
        seed=m.seed,
        device=device,
        attn_implementation=m.attn_implementation,
        architecture=m.architecture,
        tokenizer=m.tokenizer,
    )
    task = make_task(recipe.task.name, **recipe.task.kwargs())
    rows = task.test()
    rows = rows[: e.n] if e.n else rows
    rows = render_rows(tok, rows)  # chat rows as the trainers render them
    res = evaluate(
        model,
        tok,
        rows,
        task.verify,
        max_new_tokens=e.max_new_tokens or recipe.sampling.max_new_tokens,
        k=0,
        batch_size=e.batch_size,
        seed=recipe.seed,
        stop_strings=recipe.sampling.stop_strings,
        autocast_dtype=torch.bfloat16 if recipe.train.precision == "bf16" else None,
    )
    return res.accuracy


def _start_key(r: Recipe) -> str:
    e = r.eval
    return json.dumps(
        [
            r.model.model_dump(),
            r.task.model_dump(),
            e.n,
            e.max_new_tokens,
            e.batch_size,
            r.sampling.max_new_tokens,
            r.sampling.stop_strings,
            r.seed,
            r.train.precision,
        ],
        sort_keys=True,
    )


TABLE_FIELDS: tuple[str, ...] = (
    "run",
    "method",
    "accuracy",
    "forward_tokens",
    "train_s",
    "elapsed_s",
    "steps",
)


def _fmt(v: Any) -> str:
    v = _clean(v)
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.4g}"
    return str(v)


def footnote(rows: list[dict[str, Any]]) -> str:
    """What the columns of `compare.md` count, naming only the exclusions that apply to these
    runs (a teacher's passes for distillation, the up-front sampling of offline preference
    pairs)."""
    left_out = []
    if any(r.get("trainer") == "distill" for r in rows):
        left_out.append("the teacher's forward passes are not counted")
    if any(r.get("trainer") == "preference" and not r.get("online") for r in rows):
        left_out.append("offline preference runs: sampling the pairs beforehand is not counted")
    text = (
        "accuracy: greedy test accuracy at the end; forward_tokens: student forward tokens "
        "(sampling + training passes of the student"
    )
    text += "; " + "; ".join(left_out) + ")" if left_out else ")"
    return text + (
        "; train_s: seconds in training steps; elapsed_s: the whole run, evaluations and "
        "loading included."
    )


def write_results(
    rows: list[dict[str, Any]], out: Path, title: str, starts: dict[str, float]
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    extra = sorted({k for r in rows for k in r if k.startswith("pass@")})
    fields = [*TABLE_FIELDS[:3], *extra, *TABLE_FIELDS[3:]]
    with (out / "compare.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if _clean(r.get(k)) is None else r.get(k)) for k in fields})
    with (out / "curves.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "step", "forward_tokens", "train_s", "accuracy"])
        for r in rows:
            for p in r["curve"]:
                w.writerow([r["run"], p["step"], p["forward_tokens"], p["train_s"], p["accuracy"]])
    md = [f"# {title}", "", "| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    md += ["| " + " | ".join(_fmt(r.get(k)) for k in fields) + " |" for r in rows]
    md += ["", footnote(rows)]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    doc = {
        "name": title,
        "start_accuracy": starts,
        "runs": [
            {
                k: (
                    _clean(v) if k != "curve" else [{a: _clean(b) for a, b in p.items()} for p in v]
                )
                for k, v in r.items()
            }
            for r in rows
        ],
    }
    (out / "compare.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(rows, out / "compare.png", title)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy against student forward tokens (left) and training seconds (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for x_key, ax, label in (
        ("forward_tokens", axes[0], "student forward tokens"),
        ("train_s", axes[1], "training wall time (s)"),
    ):
        for r in rows:
            pts = [
                p for p in r["curve"] if math.isfinite(p[x_key]) and math.isfinite(p["accuracy"])
            ]
            ax.plot(
                [p[x_key] for p in pts],
                [p["accuracy"] for p in pts],
                marker="o",
                markersize=3,
                label=f"{r['run']} ({r['method']})",
            )
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (greedy)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(rows: list[dict[str, Any]], title: str, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in TABLE_FIELDS:
        table.add_column(name, justify="left" if name in ("run", "method") else "right")
    for r in rows:
        table.add_row(*(_fmt(r.get(k)) for k in TABLE_FIELDS))
    (console or Console()).print(table)


def _finished(recipe: Recipe) -> bool:
    d = recipe.run_dir
    if not (d / "final").is_dir() or not (d / "metrics.jsonl").is_file():
        return False
    if (d / "config.yaml").read_text() != dump_recipe(recipe):
        raise RecipeError(
            f"{d} holds a finished run with another configuration; pass --overwrite to retrain it"
        )
    rows = read_metrics(d)
    return (
        bool(rows) and rows[-1].get("step") == recipe.train.steps and ("eval/accuracy" in rows[-1])
    )


def run_compare(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    name: str | None = None,
    console: Any = None,
) -> tuple[list[dict[str, Any]], Path]:
    """Train every run of the comparison file, then write the results; (rows, directory)."""
    spec, recipes = load_compare(path, overrides, name)
    todo = [(n, r) for n, r in recipes if not (resume and not overwrite and _finished(r))]
    if console is not None:
        for n, r in recipes:
            if (n, r) not in todo:
                console.print(f"[bold]{n}[/bold]: finished, reused ({r.run_dir})")
    train_all(todo, overwrite=overwrite, resume=resume, console=console)
    starts: dict[str, float] = {}
    if spec.start_eval:
        cache: dict[str, float] = {}
        for n, r in recipes:
            key = _start_key(r)
            if key not in cache:
                cache[key] = start_accuracy(r)
            starts[n] = cache[key]
    rows: list[dict[str, Any]] = []
    for n, r in recipes:
        res = collect_run(r.run_dir)
        if n in starts:
            res["curve"].insert(
                0, {"step": 0, "forward_tokens": 0.0, "train_s": 0.0, "accuracy": starts[n]}
            )
        online = r.trainer == "preference" and r.preference.online
        rows.append(
            {
                "run": n,
                "method": method_label(r),
                "trainer": r.trainer,
                "online": online,
                "path": str(r.run_dir),
                **res,
            }
        )
    out = spec.out_dir
    write_results(rows, out, spec.name, starts)
    from signalrl.report.overlay import overlay_report

    report = overlay_report([r.run_dir for _, r in recipes], out / "report.html", console)
    if report is not None:
        with (out / "compare.md").open("a") as f:
            f.write(f"\nEvery run's curves and doctor findings: [{report.name}]({report.name})\n")
        if console is not None:
            console.print(f"report: {report} (every run's curves and findings)", highlight=False)
    return rows, out
