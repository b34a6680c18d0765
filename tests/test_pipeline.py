"""`trainer: pipeline`: stages chained (each starts from the model before it, or a named
one; `${stage.data}` references), resume at the first unfinished stage, a changed stage
re-run with the stages after it and only those, a failing stage stopping the pipeline with
its message, and bad pipeline files refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from signalrl.config import RecipeError, load_recipe
from signalrl.pipeline import PipelineStageError, load_pipeline, read_state, run_pipeline

TASK = {"name": "arithmetic", "digits": 1, "ops": "+", "operands": 2, "n_test": 8, "seed": 0}
COMMON = {
    "task": TASK,
    "model": {"attn_implementation": "eager"},
    "sampling": {"max_new_tokens": 4},
    "eval": {"n": 8, "k": 0},
    "logging": {"progress": False, "tensorboard": False, "samples_every": 0},
    "doctor": {"enabled": False},
    "checkpoint": {"every": 1},
}
SHORT = {"train.steps": 2, "train.batch_size": 4}


def _stages() -> list[dict[str, Any]]:
    sft = {**COMMON, "trainer": "sft", "model": {**COMMON["model"], "name_or_path": "tiny"},
           "train": {"steps": 60, "lr": 0.003, "batch_size": 32, "warmup_steps": 5}}  # fmt: skip
    dpo = {**COMMON, "trainer": "preference", "preference": {"loss_type": "sigmoid"},
           "eval": {**COMMON["eval"], "train_pairs": 0}}  # fmt: skip
    grpo = {**COMMON, "trainer": "online_rl", "rl": {"algorithm": "grpo", "group_size": 4}}
    return [
        {"name": "sft", "inline": sft},
        {"name": "prefs", "make_preferences": {"samples": 4, "n_prompts": 24, "max_new_tokens": 4}},
        {"name": "rs", "rejection_sampling": {"samples": 4, "n_prompts": 24, "max_new_tokens": 4}},
        {"name": "sft2", "inline": {**sft, "data": {"path": "${rs.data}"}}, "set": SHORT},
        {"name": "dpo", "inline": dpo, "model": "sft",
         "set": {**SHORT, "data.path": "${prefs.data}", "data.test_fraction": 0.0}},  # fmt: skip
        {"name": "grpo", "inline": grpo, "set": SHORT},
    ]


def _write(tmp: Path, stages: list[dict[str, Any]], name: str = "pipe") -> Path:
    path = tmp / f"{name}.yaml"
    spec = {"trainer": "pipeline", "name": name, "output_dir": str(tmp / "runs")}
    path.write_text(yaml.safe_dump({**spec, "stages": stages}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("pipeline")
    path = _write(tmp, _stages())
    run_pipeline(path)
    return path


def test_stages_chain_models_and_data(done: Path) -> None:
    spec, planned = load_pipeline(done)
    out = spec.out_dir
    state = read_state(spec)
    assert [s["status"] for s in state.values()] == ["done"] * 6
    cfg = {p.stage.name: load_recipe(p.dir / "config.yaml") for p in planned if p.recipe}
    assert cfg["sft"].model.name_or_path == "tiny"
    # a data stage makes no model: sft2 starts from sft; dpo names sft; grpo follows dpo
    assert cfg["sft2"].model.name_or_path == str(out / "sft" / "final")
    assert cfg["dpo"].model.name_or_path == str(out / "sft" / "final")
    assert cfg["grpo"].model.name_or_path == str(out / "dpo" / "final")
    assert cfg["dpo"].data.path == str(out / "prefs" / "data.jsonl")
    pairs = [json.loads(x) for x in (out / "prefs" / "data.jsonl").read_text().splitlines()]
    assert state["prefs"]["metrics"]["pairs"] == len(pairs) > 0
    assert {"prompt", "chosen", "rejected"} <= set(pairs[0])
    kept = [json.loads(x) for x in (out / "rs" / "data.jsonl").read_text().splitlines()]
    assert state["rs"]["metrics"]["rows"] == len(kept) > 0
    from signalrl.tasks import make_task

    task = make_task("arithmetic", digits=1, ops="+", operands=2, n_test=8, seed=0)
    answers = {r["prompt"]: r for r in task.train()}
    assert all(task.verify(answers[k["prompt"]], k["completion"]) > 0 for k in kept)
    assert state["grpo"]["metrics"]["steps"] == 2
    assert 0.0 <= state["sft"]["metrics"]["accuracy"] <= 1.0
    md = (out / "pipeline.md").read_text()
    assert "| sft | train |" in md and "| prefs | make_preferences |" in md
    assert (out / "pipeline.png").stat().st_size > 0 and (out / "report.html").is_file()


class Calls:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: str | None = None) -> None:
        import signalrl.trainers as trainers

        self.trained: list[tuple[str, bool]] = []
        real = trainers.run_recipe

        def spy(recipe: Any, resume: bool = False, overwrite: bool = False, **kw: Any) -> Any:
            self.trained.append((recipe.name, resume))
            if recipe.name == fail:
                raise ValueError(f"reward server down in {recipe.name}")
            return real(recipe, resume=resume, overwrite=overwrite, **kw)

        monkeypatch.setattr(trainers, "run_recipe", spy)
        self.data: list[str] = []
        import signalrl.data.make_preferences as mp
        import signalrl.data.rejection as rj

        for mod, fn in ((mp, "make_preferences"), (rj, "rejection_sample")):
            orig = getattr(mod, fn)
            monkeypatch.setattr(mod, fn, self._wrap(orig, fn))

    def _wrap(self, orig: Any, fn: str) -> Any:
        def inner(*a: Any, **k: Any) -> Any:
            self.data.append(fn)
            return orig(*a, **k)

        return inner


def test_a_rerun_keeps_finished_stages(done: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    entries, _ = run_pipeline(done)
    assert calls.trained == [] and calls.data == []
    assert [e["status"] for e in entries] == ["done"] * 6


def test_a_changed_stage_reruns_with_the_stages_after_it(
    done: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stages = _stages()
    stages[4]["set"] = {**stages[4]["set"], "preference.beta": 0.2}  # dpo changed
    changed = _write(done.parent, stages)
    calls = Calls(monkeypatch)
    run_pipeline(changed)
    assert [n for n, _ in calls.trained] == ["dpo", "grpo"]  # not sft, sft2
    assert calls.data == []  # prefs and rs kept
    spec, _ = load_pipeline(changed)
    assert load_recipe(spec.out_dir / "dpo" / "config.yaml").preference.beta == 0.2


def test_a_failing_stage_stops_and_the_next_run_resumes_there(
    tmp_path: Path, done: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a pipeline on a copy of the finished one's sft model: sft -> dpo-like -> grpo
    sft_final = load_pipeline(done)[0].out_dir / "sft" / "final"
    grpo = {**COMMON, "trainer": "online_rl", "rl": {"algorithm": "grpo", "group_size": 4}}
    stages = [
        {"name": "a", "inline": grpo, "set": {**SHORT, "model.name_or_path": str(sft_final)}},
        {"name": "b", "inline": grpo, "set": SHORT},
        {"name": "c", "inline": grpo, "set": SHORT},
    ]
    path = _write(tmp_path, stages, "fail")
    calls = Calls(monkeypatch, fail="b")
    with pytest.raises(PipelineStageError, match="stage 'b' failed: ValueError: reward server"):
        run_pipeline(path)
    spec, _ = load_pipeline(path)
    state = read_state(spec)
    assert [state[n]["status"] for n in "abc"] == ["done", "failed", "pending"]
    assert "reward server down" in state["b"]["error"]
    assert (spec.out_dir / "a" / "final" / "model.safetensors").is_file()  # intact
    monkeypatch.undo()
    calls = Calls(monkeypatch)
    run_pipeline(path)
    # b resumes (its run never started here, so it starts over), then c; a is kept
    assert [n for n, _ in calls.trained] == ["b", "c"]
    # an unfinished stage with a checkpoint continues from it
    entries = json.loads((spec.out_dir / "pipeline.json").read_text())
    entries["stages"][2]["status"] = "running"
    (spec.out_dir / "pipeline.json").write_text(json.dumps(entries))
    calls.trained.clear()
    run_pipeline(path)
    assert calls.trained == [("c", True)]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s[3]["inline"]["data"].update(path="${nope.data}"), "names no earlier stage"),
        (lambda s: s[4]["set"].update({"data.path": "${grpo.data}"}), "names no earlier stage"),
        (lambda s: s[4].update(model="dpo"), "model: 'dpo' names no earlier stage"),
        (lambda s: s[5].update(name="sft"), "two stages are named 'sft'"),
        (lambda s: s[1].update(recipe="x.yaml"), "exactly one of recipe, inline"),
        (lambda s: s.insert(0, {"name": "p0", "make_preferences": {}}), "needs a model and a task"),
        (lambda s: s[4].update(match_budget="grpo"), "match_budget: 'grpo' names no earlier"),
        (lambda s: s[1].update(match_budget="sft"), "match_budget is for a training stage"),
        (lambda s: s[4]["set"].update({"data.path": "${sft.data}"}), "stage 'sft' makes no data"),
    ],
)
def test_bad_pipelines_are_refused_before_anything_runs(
    tmp_path: Path, mutate: Any, message: str
) -> None:
    stages = _stages()
    mutate(stages)
    path = _write(tmp_path, stages)
    with pytest.raises(RecipeError, match=message.replace("$", r"\$")):
        run_pipeline(path)
    assert not (tmp_path / "runs").exists()


def test_the_cli_runs_a_pipeline_file(done: Path) -> None:
    from signalrl.cli import app

    res = CliRunner().invoke(app, ["train", str(done)])
    assert res.exit_code == 0, res.output
    assert "up to date" in res.output
    assert '"status": "done"' in res.output


def test_routes_count_the_data_stages_sampling(done: Path) -> None:
    """Each stage's route: its own student forward tokens and those of every stage it builds
    on, a data stage's sampling included (prefs and rs sampled from sft)."""
    from signalrl.pipeline import route_tokens

    spec, planned = load_pipeline(done)
    state = read_state(spec)
    own = {n: e["metrics"]["forward_tokens"] for n, e in state.items()}
    # each of 24 prompts (4 to 6 tokens) once, then 4 samples of 1 to 4 sampled tokens
    assert 24 * (4 + 4) <= own["prefs"] <= 24 * (6 + 4 * 4) and own["rs"] > 0
    routes = route_tokens(planned, list(state.values()))
    assert routes["sft"] == own["sft"]
    assert routes["sft2"] == own["sft2"] + own["rs"] + own["sft"]
    assert routes["dpo"] == own["dpo"] + own["prefs"] + own["sft"]
    assert routes["grpo"] == own["grpo"] + routes["dpo"]
    md = (spec.out_dir / "pipeline.md").read_text()
    assert "route forward tokens" in md and f"{routes['grpo']:,.0f}" in md


def test_a_stage_that_names_its_own_start_is_not_on_the_previous_route(tmp_path: Path) -> None:
    """A training stage whose `set` names its own model (a fresh preset after the teacher's
    stages) does not build on the stage before it, so that stage's tokens are not on its
    route; one that refers to an earlier model through ${stage.model} does."""
    sft = _stages()[0]
    own = {**SHORT, "model.name_or_path": "tiny"}
    fresh = {"name": "fresh", "inline": sft["inline"], "set": own}
    ref = {"model.name_or_path": "${sft.model}"}
    again = {"name": "again", "inline": sft["inline"], "set": ref}
    _, planned = load_pipeline(_write(tmp_path, [sft, fresh, again]))
    assert {p.stage.name: p.parents for p in planned} == {
        "sft": [], "fresh": [], "again": ["sft"]
    }


def test_match_budget_trains_until_the_routes_spent_the_same(done: Path, tmp_path: Path) -> None:
    """Route a (GRPO alone) gets the budget of route c (rejection sampling, SFT on it, then
    GRPO): it stops at the first step at which its route has spent as much; a stage whose
    route already spent more than its match is refused with the numbers."""
    from signalrl.pipeline import route_tokens

    sft_final = load_pipeline(done)[0].out_dir / "sft" / "final"
    sft = {**COMMON, "trainer": "sft", "train": {"lr": 0.003, "batch_size": 8}}
    grpo = {**COMMON, "trainer": "online_rl", "rl": {"algorithm": "grpo", "group_size": 4}}
    stages = [
        {"name": "start", "inline": sft, "set": {**SHORT, "model.name_or_path": str(sft_final)}},
        {"name": "rs", "rejection_sampling": {"samples": 4, "n_prompts": 24, "max_new_tokens": 4}},
        {"name": "b", "inline": {**sft, "data": {"path": "${rs.data}"}}, "set": SHORT},
        {"name": "c", "inline": grpo, "set": SHORT},
        {"name": "a", "inline": grpo, "model": "start", "match_budget": "c",
         "set": {"train.steps": 60, "train.batch_size": 4}},  # fmt: skip
        {"name": "d", "inline": grpo, "match_budget": "b", "set": SHORT},
    ]
    path = _write(tmp_path, stages, "budget")
    with pytest.raises(PipelineStageError, match="stage 'd'.*already spent"):
        run_pipeline(path)
    spec, planned = load_pipeline(path)
    state = read_state(spec)
    routes = route_tokens(planned, [e for e in state.values() if e["status"] == "done"])
    cfg = load_recipe(spec.out_dir / "a" / "config.yaml")
    assert cfg.train.max_forward_tokens == routes["c"] - routes["start"]
    rows = [json.loads(x) for x in (spec.out_dir / "a" / "metrics.jsonl").read_text().splitlines()]
    spent = sorted({r["student/forward_tokens"] for r in rows if "loss" in r})  # per step
    assert state["a"]["metrics"]["steps"] < 60
    assert routes["a"] >= routes["c"] > routes["a"] - (spent[-1] - spent[-2])
