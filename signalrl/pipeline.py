"""Pipelines: the stages labs chain (SFT, preference optimisation, RLVR, distillation,
rejection sampling), run in order from one file with `trainer: pipeline`:

```yaml
trainer: pipeline
name: pipeline-arithmetic
output_dir: runs
set: {train.precision: bf16}          # applied to every training stage
stages:
  - {name: sft, recipe: recipes/sft-arithmetic.yaml, set: {train.steps: 250}}
  - {name: prefs, make_preferences: {n_prompts: 2000, samples: 8}}
  - {name: dpo, recipe: recipes/dpo-arithmetic.yaml, set: {data.path: "${prefs.data}"}}
  - {name: grpo, recipe: recipes/grpo-arithmetic.yaml}
```

* A training stage is a recipe file (`recipe:`) or an inline recipe (`inline:`), with `set`
  overrides (a mapping or a list of `key=value`; the file's `set`, then the command line's
  `--set`, then the stage's own). It trains as `<output_dir>/<name>/<stage>/`.
* Its `model.name_or_path` defaults to the model of the stage before (the last stage that
  made one); `model: <stage>` names another. `${stage.model}`, `${stage.data}` and
  `${stage.dir}` in a `set` value refer to an earlier stage's `final/`, data file or
  directory: a distillation teacher, a reward model for PPO, an SFT model as the reference.
* Data stages make a data file from the current model on the pipeline's `task` (default:
  the task of the training stage before): `make_preferences` (on-policy verifier pairs for
  DPO, `signalrl.data.make_preferences`) and `rejection_sampling` (the verifier-correct
  samples as SFT rows, `signalrl.data.rejection`).
* `sweep: {param, values}` on a training stage trains it once per value (`signalrl sweep`);
  such a stage makes no model for the stages after it.

Every stage is validated (and every reference checked: unknown, later or own stages are
errors) before the first one runs. `<output_dir>/<name>/pipeline.json` holds each stage's
status, fingerprint (a hash of what it was run with), model, data and final metrics. A
re-run skips the finished stages whose fingerprint is unchanged, resumes an unfinished stage
from its checkpoint, and re-runs a stage whose recipe changed together with every stage
after it (and only those). A stage that fails stops the pipeline with its message; the
stages before it keep their results. `pipeline.md`, `pipeline.csv` and `pipeline.png` are
the table and plot across stages; `report.html` overlays the training stages' reports.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from signalrl.config import Recipe, RecipeError, _format_errors, dump_recipe, load_recipe
from signalrl.config.recipe import DuplicateKeyError, load_yaml, recipe_from_dict

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_REF = re.compile(r"\$\{([A-Za-z][A-Za-z0-9_-]*)\.(model|data|dir)\}")
Overrides = dict[str, Any] | list[str]


class _SamplingSpec(BaseModel):
    """What a data stage samples: prompts, temperature, length, seed."""

    model_config = ConfigDict(extra="forbid")
    n_prompts: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(16, ge=1)
    seed: int = 0


class MakePreferencesSpec(_SamplingSpec):
    """`signalrl data make-preferences` from the current model: (correct, wrong) pairs."""

    samples: int = Field(8, ge=2)
    pairs_per_prompt: int = Field(1, ge=1)


class RejectionSpec(_SamplingSpec):
    """Rejection sampling: the current model's verifier-correct samples as SFT rows."""

    samples: int = Field(8, ge=1)
    keep_per_prompt: int = Field(1, ge=1)


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    param: str
    values: list[Any] = Field(min_length=1)


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    recipe: str | None = None
    inline: dict[str, Any] | None = None
    overrides: Overrides = Field(default_factory=dict, alias="set")
    model: str | None = Field(None, description="the stage whose model this one starts from")
    make_preferences: MakePreferencesSpec | None = None
    rejection_sampling: RejectionSpec | None = None
    sweep: SweepSpec | None = None
    match_budget: str | None = Field(
        None,
        description="an earlier stage: train until this stage's route (the stages it builds "
        "on, data sampling included) has spent as many student forward tokens as that one's",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"stage name {v!r}: use a letter, then letters, digits, _ and -")
        return v

    @property
    def kind(self) -> str:
        kinds = [
            k
            for k in ("recipe", "inline", "make_preferences", "rejection_sampling")
            if getattr(self, k) is not None
        ]
        if len(kinds) != 1:
            raise ValueError(
                f"stage {self.name!r}: give exactly one of recipe, inline, make_preferences "
                f"or rejection_sampling (got {', '.join(kinds) or 'none'})"
            )
        return "train" if kinds[0] in ("recipe", "inline") else kinds[0]


class PipelineFile(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    trainer: Literal["pipeline"]
    name: str
    output_dir: str = "runs"
    overrides: Overrides = Field(default_factory=dict, alias="set")
    task: dict[str, Any] | None = Field(None, description="the data stages' task section")
    stages: list[Stage] = Field(min_length=1)

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _as_list(ov: Overrides) -> list[str]:
    if isinstance(ov, list):
        return [str(x) for x in ov]
    return [f"{k}={json.dumps(v)}" for k, v in ov.items()]


def is_pipeline_file(path: str | Path) -> bool:
    try:
        data = load_yaml(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("trainer") == "pipeline"


class Planned(BaseModel):
    """A stage resolved: its recipe (training) or its task and model (data)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    stage: Stage
    dir: Path
    recipe: Recipe | None = None
    source: str | None = None  # the model a data stage samples from
    task: dict[str, Any] | None = None
    model_out: str | None = None
    data_out: str | None = None
    parents: list[str] = Field(default_factory=list)  # the stages it builds on directly

    def fingerprint(self) -> str:
        if self.recipe is not None:
            sweep = self.stage.sweep.model_dump() if self.stage.sweep else None
            text = dump_recipe(self.recipe) + json.dumps([sweep, self.stage.match_budget])
        else:
            spec = self.stage.make_preferences or self.stage.rejection_sampling
            assert spec is not None
            text = json.dumps(
                [self.stage.kind, spec.model_dump(), self.source, self.task], sort_keys=True
            )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _substitute(
    values: list[str], outputs: dict[str, dict[str, str | None]], where: str
) -> list[str]:
    def one(m: re.Match[str]) -> str:
        name, field = m.group(1), m.group(2)
        if name not in outputs:
            raise RecipeError(
                f"{where}: ${{{name}.{field}}} names no earlier stage (stages run in order; "
                "a stage can only use the stages before it)"
            )
        value = outputs[name][field]
        if value is None:
            raise RecipeError(f"{where}: stage {name!r} makes no {field}")
        return value

    return [_REF.sub(one, v) for v in values]


def _stage_recipe(
    spec: PipelineFile, st: Stage, model: str | None, extra: list[str], where: str, outs: Any
) -> Recipe:
    base = _as_list(spec.overrides) + list(extra)
    own = _substitute(_as_list(st.overrides), outs, where)
    names = [f"output_dir={json.dumps(str(spec.out_dir))}", f"name={json.dumps(st.name)}"]
    start = [] if model is None else [f"model.name_or_path={json.dumps(model)}"]
    ovs = start + _substitute(base, outs, where) + own + names
    if st.recipe is not None:
        return load_recipe(st.recipe, ovs)
    assert st.inline is not None
    return recipe_from_dict(_substitute_tree(st.inline, outs, where), where, ovs)


def _substitute_tree(obj: Any, outs: dict[str, dict[str, str | None]], where: str) -> Any:
    """`obj` (an inline recipe) with the `${stage.field}` references in its strings resolved."""
    if isinstance(obj, str):
        return _substitute([obj], outs, where)[0]
    if isinstance(obj, dict):
        return {k: _substitute_tree(v, outs, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute_tree(v, outs, where) for v in obj]
    return obj


def plan(spec: PipelineFile, extra: list[str] | None = None) -> list[Planned]:
    """Resolve every stage (models, references, recipes) before anything runs."""
    outs: dict[str, dict[str, str | None]] = {}
    model: str | None = None
    model_stage: str | None = None  # the stage that made `model`
    task: dict[str, Any] | None = spec.task
    planned: list[Planned] = []
    for i, st in enumerate(spec.stages):
        where = f"pipeline {spec.name!r}, stage {i} ({st.name!r})"
        if st.name in outs:
            raise RecipeError(f"{where}: two stages are named {st.name!r}")
        try:
            kind = st.kind
        except ValueError as e:
            raise RecipeError(str(e)) from None
        src, src_stage = model, model_stage
        if st.model is not None:
            if st.model == st.name or st.model not in outs:
                raise RecipeError(f"{where}: model: {st.model!r} names no earlier stage")
            src, src_stage = outs[st.model]["model"], st.model
            if src is None:
                raise RecipeError(f"{where}: stage {st.model!r} makes no model")
        _check_match_budget(st, kind, outs, where)
        d = spec.out_dir / st.name
        if kind == "train":
            r = _stage_recipe(spec, st, src, list(extra or []), where, outs)
            if src is not None and r.model.name_or_path != src:
                src_stage = None  # its recipe names its own start: not built on that stage
            task = r.task.model_dump(mode="json", exclude_none=True)
            made = None if st.sweep else str(d / "final")
            p = Planned(stage=st, dir=d, recipe=r, model_out=made)
            if made is not None:
                model, model_stage = made, st.name
        else:
            if src is None or task is None:
                raise RecipeError(f"{where}: a {kind} stage needs a model and a task before it")
            p = Planned(stage=st, dir=d, source=src, task=task, data_out=str(d / "data.jsonl"))
        refs = _REF.findall(json.dumps([spec.overrides, extra, st.overrides, st.inline]))
        first = [] if src_stage is None else [src_stage]
        p.parents = list(dict.fromkeys(first + [n for n, _ in refs]))
        outs[st.name] = {"model": p.model_out, "data": p.data_out, "dir": str(d)}
        planned.append(p)
    return planned


def _check_match_budget(st: Stage, kind: str, outs: dict[str, Any], where: str) -> None:
    if st.match_budget is None:
        return
    if kind != "train" or st.sweep is not None:
        raise RecipeError(f"{where}: match_budget is for a training stage (not a sweep)")
    if st.match_budget not in outs:
        raise RecipeError(f"{where}: match_budget: {st.match_budget!r} names no earlier stage")


def ancestors(planned: list[Planned], name: str) -> list[str]:
    """Every stage `name` builds on (its model's stage, the stages its values name, and
    theirs), nearest first, each once."""
    by = {p.stage.name: p for p in planned}
    out: list[str] = []
    todo = list(by[name].parents)
    while todo:
        n = todo.pop(0)
        if n not in out:
            out.append(n)
            todo += by[n].parents
    return out


def route_tokens(planned: list[Planned], entries: list[dict[str, Any]]) -> dict[str, float]:
    """Each finished stage's route: its student forward tokens plus those of every stage it
    builds on (a data stage's sampling included), the budget a route spent in all."""
    own = {e["name"]: (e.get("metrics") or {}).get("forward_tokens") for e in entries}
    names = {p.stage.name for p in planned}
    return {
        n: float(t) + sum(float(own.get(a) or 0.0) for a in ancestors(planned, n))
        for n, t in own.items()
        if t is not None and n in names
    }


def _set_budget(p: Planned, planned: list[Planned], entries: list[dict[str, Any]]) -> None:
    """`match_budget`: this stage may spend what the named route spent, less its own route's
    stages before it."""
    assert p.recipe is not None and p.stage.match_budget is not None
    routes = route_tokens(planned, entries)
    target = routes.get(p.stage.match_budget)
    if target is None:
        raise RecipeError(f"stage {p.stage.name!r}: match_budget stage "
                          f"{p.stage.match_budget!r} has no forward-token count")  # fmt: skip
    own = {e["name"]: (e.get("metrics") or {}).get("forward_tokens") for e in entries}
    left = target - sum(float(own.get(a) or 0.0) for a in ancestors(planned, p.stage.name))
    if left < 1:
        raise RecipeError(
            f"stage {p.stage.name!r}: its route has already spent {target - left:,.0f} "
            f"forward tokens, {p.stage.match_budget!r}'s whole route {target:,.0f}"
        )
    p.recipe.train.max_forward_tokens = int(left)


def load_pipeline(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[PipelineFile, list[Planned]]:
    p = Path(path)
    try:
        data = load_yaml(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{p}: pipeline file not found") from None
    except (DuplicateKeyError, yaml.YAMLError) as e:
        raise RecipeError(f"{p}: {e}") from None
    try:
        spec = PipelineFile.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, str(p))) from None
    return spec, plan(spec, overrides)


# -- running --------------------------------------------------------------------------------


def _state_path(spec: PipelineFile) -> Path:
    return spec.out_dir / "pipeline.json"


def read_state(spec: PipelineFile) -> dict[str, dict[str, Any]]:
    """Each stage's entry in `pipeline.json` by name ({} before the first run)."""
    path = _state_path(spec)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path}: not valid JSON ({e}); delete it to start over") from None
    return {s["name"]: s for s in data.get("stages", [])}


def _write_state(spec: PipelineFile, entries: list[dict[str, Any]]) -> None:
    path = _state_path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"name": spec.name, "stages": entries}, indent=2) + "\n")
    tmp.replace(path)


def _run_data_stage(p: Planned) -> dict[str, Any]:
    from signalrl.config.sections import TaskConfig
    from signalrl.tasks import make_task

    assert p.task is not None and p.source is not None and p.data_out is not None
    tc = TaskConfig.model_validate(p.task)
    task = make_task(tc.name, **tc.kwargs())
    p.dir.mkdir(parents=True, exist_ok=True)
    if p.stage.make_preferences is not None:
        from signalrl.data.make_preferences import make_preferences

        mp = p.stage.make_preferences
        stats = make_preferences(p.source, p.data_out, task=task, **mp.model_dump())
        return {"prompts": stats.prompts, "pairs": stats.pairs,
                "sample_accuracy": stats.sample_accuracy,
                "forward_tokens": stats.forward_tokens}  # fmt: skip
    from signalrl.data.rejection import rejection_sample

    rs = p.stage.rejection_sampling
    assert rs is not None
    res = rejection_sample(p.source, p.data_out, task, **rs.model_dump())
    return {"prompts": res.prompts, "rows": res.rows, "prompts_kept": res.prompts_kept,
            "sample_accuracy": res.sample_accuracy,
            "forward_tokens": res.forward_tokens}  # fmt: skip


def _run_train_stage(p: Planned, cont: bool, console: Any) -> dict[str, Any]:
    from signalrl.compare import collect_run
    from signalrl.trainers import run_recipe
    from signalrl.trainers.base import latest_checkpoint

    assert p.recipe is not None
    if p.stage.sweep is not None:
        return _run_sweep_stage(p, console)
    resume = cont and latest_checkpoint(p.recipe.run_dir) is not None
    run_recipe(p.recipe, resume=resume, overwrite=not resume)
    res = collect_run(p.recipe.run_dir)
    res.pop("curve", None)
    from signalrl.logging.run import read_metrics

    last = read_metrics(p.recipe.run_dir)[-1]
    for k in ("eval/reward_accuracy", "eval/pref_accuracy", "rewards/accuracies"):
        if k in last:
            res[k.split("/", 1)[1]] = last[k]
    return res


def _run_sweep_stage(p: Planned, console: Any) -> dict[str, Any]:
    import tempfile

    from signalrl.sweep import run_sweep

    assert p.recipe is not None and p.stage.sweep is not None
    with tempfile.TemporaryDirectory(prefix="signalrl-pipeline-") as tmp:
        path = Path(tmp) / f"{p.stage.name}.yaml"
        path.write_text(dump_recipe(p.recipe))
        rows, out = run_sweep(
            path, p.stage.sweep.param, p.stage.sweep.values, overwrite=True, console=console
        )
    return {"sweep": str(out), "runs": len(rows)}


def run_pipeline(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    overwrite: bool = False,
    console: Any = None,
) -> tuple[list[dict[str, Any]], Path]:
    """Run the stages that are not up to date, in order; returns (pipeline.json's stages,
    the pipeline directory). `overwrite` re-runs every stage."""
    spec, planned = load_pipeline(path, overrides)
    state = {} if overwrite else read_state(spec)
    entries: list[dict[str, Any]] = []
    upstream_changed = False
    for i, p in enumerate(planned):
        st, fp = p.stage, p.fingerprint()
        prev = state.get(st.name)
        same = prev is not None and prev.get("fingerprint") == fp and not upstream_changed
        entry = {"name": st.name, "kind": st.kind, "fingerprint": fp, "dir": str(p.dir),
                 "model": p.model_out, "data": p.data_out}  # fmt: skip
        if same and prev is not None and prev.get("status") == "done":
            entries.append({**prev, **entry})
            _say(console, f"[bold]{st.name}[/bold]: up to date, kept ({p.dir})")
            continue
        upstream_changed = True  # this stage runs: every stage after it runs too
        entries.append({**entry, "status": "running"})
        rest = [{"name": q.stage.name, "status": "pending"} for q in planned[i + 1 :]]
        _write_state(spec, entries + rest)
        _say(console, f"[bold]{st.name}[/bold] ({st.kind}): {p.dir}")
        try:
            if st.match_budget is not None:
                _set_budget(p, planned, entries[:-1])
            metrics = (
                _run_train_stage(p, same, console) if st.kind == "train" else _run_data_stage(p)
            )
        except BaseException as e:  # an interrupt too: the stage is marked, then it stops
            entries[-1].update(status="failed", error=f"{type(e).__name__}: {e}")
            _write_state(spec, entries + rest)
            if not isinstance(e, Exception):
                raise
            raise PipelineStageError(st.name, e) from e
        entries[-1].update(status="done", metrics=metrics)
        _write_state(spec, entries + rest)
    write_report(spec, entries, planned, console)
    return entries, spec.out_dir


class PipelineStageError(RuntimeError):
    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"pipeline stage {stage!r} failed: {type(cause).__name__}: {cause}")
        self.stage = stage


def _say(console: Any, text: str) -> None:
    if console is not None:
        console.print(text, highlight=False)


# -- the report -----------------------------------------------------------------------------

COLUMNS = [
    ("stage", "stage"),
    ("kind", "kind"),
    ("accuracy", "test accuracy"),
    ("pass@k", "pass@k"),
    ("reward_accuracy", "preference accuracy"),
    ("data", "data rows"),
    ("forward_tokens", "student forward tokens"),
    ("route_tokens", "route forward tokens"),
    ("train_s", "train s"),
]


def table_rows(
    entries: list[dict[str, Any]], planned: list[Planned] | None = None
) -> list[dict[str, Any]]:
    """One row per stage: the columns of `COLUMNS` (None where a stage has no such number);
    `route_tokens` (with `planned`) counts the stages a stage builds on too (`route_tokens`)."""
    routes = route_tokens(planned, entries) if planned else {}
    out = []
    for e in entries:
        m = e.get("metrics") or {}
        passk = next((v for k, v in m.items() if k.startswith("pass@")), None)
        out.append(
            {
                "stage": e["name"],
                "kind": e["kind"] + (" (sweep)" if "sweep" in m else ""),
                "accuracy": m.get("accuracy"),
                "pass@k": passk,
                "reward_accuracy": m.get("reward_accuracy", m.get("accuracies")),
                "data": m.get("pairs", m.get("rows")),
                "forward_tokens": m.get("forward_tokens"),
                "route_tokens": routes.get(e["name"]),
                "train_s": m.get("train_s"),
            }
        )
    return out


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def write_report(
    spec: PipelineFile, entries: list[dict[str, Any]], planned: list[Planned], console: Any
) -> None:
    import csv

    rows = table_rows(entries, planned)
    out = spec.out_dir
    with (out / "pipeline.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k, _ in COLUMNS])
        w.writeheader()
        w.writerows(rows)
    head = "| " + " | ".join(t for _, t in COLUMNS) + " |"
    lines = [f"# Pipeline {spec.name}", "", head, "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[k]) for k, _ in COLUMNS) + " |" for r in rows]
    _plot(rows, out / "pipeline.png", spec.name)
    runs = [p.recipe.run_dir for p in planned if p.recipe is not None and p.stage.sweep is None]
    from signalrl.report.overlay import overlay_report

    report = overlay_report(runs, out / "report.html", console) if runs else None
    if report is not None:
        lines += ["", f"Every training stage's curves and findings: [{report.name}]({report.name})"]
    (out / "pipeline.md").write_text("\n".join(lines) + "\n")
    if console is not None:
        from rich.table import Table

        t = Table(title=f"pipeline {spec.name}")
        for _, title in COLUMNS:
            t.add_column(title)
        for r in rows:
            t.add_row(*(_cell(r[k]) for k, _ in COLUMNS))
        console.print(t)
        console.print(f"results: {out / 'pipeline.md'}", highlight=False)


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Every stage in order: test accuracy after each training stage (bars), each data stage
    as a hatched bar with its rows, and the forward tokens of each stage's whole route."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 3.5))
    if rows:
        names = [r["stage"] for r in rows]
        trained = [r["accuracy"] is not None for r in rows]
        ax.bar(names, [r["accuracy"] if t else 0.0 for r, t in zip(rows, trained, strict=True)],
               color="tab:blue", label="test accuracy")  # fmt: skip
        for i, (r, t) in enumerate(zip(rows, trained, strict=True)):
            if not t:  # a data stage (or a stage without an accuracy): what it made
                ax.bar(i, 1.0, color="none", edgecolor="tab:gray", hatch="//", linewidth=0.5)
                text = f"{r['kind']}\n{r['data']} rows" if r.get("data") else str(r["kind"])
                ax.text(i, 0.03, text, ha="center", va="bottom", rotation=90, fontsize=7,
                        color="dimgray", backgroundcolor="white")  # fmt: skip
        ax.set_ylabel("test accuracy (greedy)")
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", labelrotation=30)
        ax2 = ax.twinx()
        ax2.plot(names, [r["route_tokens"] or 0.0 for r in rows], "o", color="tab:orange")
        ax2.set_ylabel("route forward tokens (o)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
