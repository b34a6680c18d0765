"""The `signalrl` command line."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    help="signalrl: LLM post-training where every method is a choice of training signal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a recipe key: section.key=value (repeatable)"),
]


def _task_overrides(overrides: list[str] | None, command: str) -> dict[str, object]:
    """`--set task.key=value` options as task constructor arguments; other keys are refused."""
    from signalrl.config import parse_override

    kw: dict[str, object] = {}
    for ov in overrides or []:
        key, value = parse_override(ov)
        if not key.startswith("task."):
            _fail(f"--set {ov!r}: {command} only takes task.* overrides")
        kw[key[5:]] = value
    return kw


def _fail(msg: str) -> None:
    # soft_wrap: a long path is never broken across lines (it stays copy-pasteable)
    # escape: a message's own brackets ("pip install 'signalrl[wandb]'") are not markup
    err.print(f"[red]error:[/red] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


# a run directory that cannot be written: permissions, a read-only or full disk, a path
# through a regular file
WRITE_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.ENOTDIR,
    errno.EISDIR,
}


def _write_error(e: OSError, run_dir: Path | None = None) -> str:
    """The message for an OSError met while writing a run: names the run directory (and the
    path that failed when it is another one); without `run_dir`, the path that failed."""
    what = e.strerror or str(e)
    hint = "check its permissions and free space, or set output_dir to a writable place"
    if run_dir is None:
        return f"cannot write {e.filename or 'the output directory'}: {what}; {hint}"
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(run_dir) else ""
    return f"cannot write the run directory {run_dir}: {what}{where}; {hint}"


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="continue from the latest checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run directory")] = False,
) -> None:
    """Train as RECIPE says; writes runs/<name>/ (config, metrics, checkpoints, final/).
    A comparison file (`trainer: compare`) runs as `signalrl compare`; a pipeline file
    (`trainer: pipeline`) runs its stages that are not up to date (`signalrl.pipeline`)."""
    from signalrl.compare import is_compare_file
    from signalrl.config import RecipeError, load_recipe
    from signalrl.trainers import run_recipe

    if is_compare_file(recipe):
        compare(recipe, set_, overwrite=overwrite, resume=resume, name=None)
        return
    from signalrl.pipeline import is_pipeline_file

    if is_pipeline_file(recipe):
        _pipeline(recipe, set_ or [], overwrite)
        return
    try:
        r = load_recipe(recipe, set_ or [])
    except (RecipeError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
        return
    from signalrl import distributed

    try:
        result = run_recipe(r, resume=resume, overwrite=overwrite)
    except (RecipeError, FileExistsError, FileNotFoundError, ValueError) as e:
        _fail(_ranked(str(e)))
        return
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        _fail(_ranked(_write_error(e, r.run_dir)))
        return
    is_main = distributed.current().is_main
    distributed.shutdown()
    if is_main:
        print(json.dumps(result, indent=2))


def _pipeline(path: Path, overrides: list[str], overwrite: bool) -> None:
    """`trainer: pipeline`: run the stages that are not up to date (`signalrl.pipeline`)."""
    from rich.console import Console

    from signalrl.config import RecipeError
    from signalrl.pipeline import PipelineStageError, run_pipeline

    try:
        entries, out = run_pipeline(path, overrides, overwrite=overwrite, console=Console())
    except (RecipeError, FileExistsError, FileNotFoundError, PipelineStageError) as e:
        _fail(str(e))
        return
    print(json.dumps({"pipeline": str(out), "stages": entries}, indent=2))


def _ranked(msg: str) -> str:
    """Under torchrun, the message with the rank that met it."""
    from signalrl.distributed import world_from_env

    rank, world, _ = world_from_env()
    return f"[rank {rank}/{world}] {msg}" if world > 1 else msg


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Option(help="checkpoint directory or preset")],
    task: Annotated[str, typer.Option(help="built-in task")] = "arithmetic",
    k: Annotated[int, typer.Option(help="pass@k (0: greedy accuracy only)")] = 0,
    samples: Annotated[int | None, typer.Option(help="samples per problem (>= k)")] = None,
    n: Annotated[int | None, typer.Option(help="test problems (default: all)")] = None,
    max_new_tokens: Annotated[int, typer.Option()] = 16,
    temperature: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[int, typer.Option()] = 0,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option(help="write the result as JSON here")] = None,
    reward_model: Annotated[
        str | None, typer.Option(help="also best-of-k: the reward model picks among k samples")
    ] = None,
) -> None:
    """Greedy accuracy and unbiased pass@k of MODEL on TASK's test split; with
    --reward-model, best-of-k by that reward model against the samples' mean accuracy."""
    from signalrl.data.chat import render_rows
    from signalrl.eval import evaluate
    from signalrl.models import load_model
    from signalrl.tasks import make_task

    _check_eval_options(k, samples, n, max_new_tokens, temperature)
    try:
        task_kw = _task_overrides(set_, "eval")
        t = make_task(task, **task_kw)
        m, tok = load_model(model)
        # chat rows are rendered by the chat template exactly as the trainers render them
        rows = render_rows(tok, t.test()[:n] if n else t.test())
        scorer = None
        if reward_model:
            from signalrl.rewards.model import RewardModelScorer

            if k < 1:
                raise ValueError("--reward-model needs --k >= 1 (best-of-k among k samples)")
            scorer = RewardModelScorer(reward_model, device=m.device).score
        res = evaluate(
            m,
            tok,
            rows,
            t.verify,
            max_new_tokens=max_new_tokens,
            k=k,
            samples=samples,
            temperature=temperature,
            seed=seed,
            scorer=scorer,
            extract=getattr(t, "extract", None),
        )
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
        return
    result = {"model": model, "task": task, **res.metrics(prefix=""), "n": res.n}
    text = json.dumps(result, indent=2)
    print(text)  # first: a finished evaluation is never lost to a failed write
    if out:
        try:
            _write_atomic(out, text + "\n")
        except OSError as e:
            _fail(f"cannot write --out {out}: {e.strerror or e}; the result is printed above")


def _check_eval_options(
    k: int, samples: int | None, n: int | None, max_new_tokens: int, temperature: float
) -> None:
    """`signalrl eval`'s numbers, checked before any model is loaded."""
    if k < 0:
        _fail(f"--k must be >= 0 (0: greedy accuracy only; k: pass@k), got {k}")
    if samples is not None and samples < 1:
        _fail(f"--samples must be >= 1 (samples per problem for pass@k), got {samples}")
    if samples is not None and samples < k:
        _fail(f"--samples ({samples}) must be >= --k ({k})")
    if samples is not None and k == 0:
        _fail("--samples needs --k >= 1 (samples are drawn for pass@k)")
    if n is not None and n < 1:
        _fail(f"--n must be >= 1 (test problems; leave it out for all of them), got {n}")
    if max_new_tokens < 1:
        _fail(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature <= 0:
        _fail(f"--temperature must be > 0, got {temperature}")


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it and a rename (the parent
    directory is created): a reader never sees half a file, a failure leaves none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@app.command()
def quickstart(
    out: Annotated[Path, typer.Option(help="output directory")] = Path("runs/quickstart"),
    recipe: Annotated[Path | None, typer.Option(help="a quickstart recipe (sft + grpo)")] = None,
    set_: SetOpt = None,
) -> None:
    """SFT a tiny model on arithmetic, improve it with GRPO, print a before/after table."""
    from signalrl.config import RecipeError
    from signalrl.quickstart import run_quickstart

    try:
        run_quickstart(out, str(recipe) if recipe else None, set_ or [])
    except (RecipeError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        _fail(_write_error(e))


data_app = typer.Typer(
    help="Data tools: make preference pairs, make a pretraining corpus.", no_args_is_help=True
)
app.add_typer(data_app, name="data")


@data_app.command("make-corpus")
def make_corpus_(
    out: Annotated[Path, typer.Option(help="output JSONL of {text, type} documents")],
    task: Annotated[str, typer.Option(help="built-in task (arithmetic)")] = "arithmetic",
    docs: Annotated[int, typer.Option(help="number of documents")] = 20000,
    seed: Annotated[int, typer.Option()] = 0,
    mix: Annotated[
        str | None,
        typer.Option(help="document shares, e.g. equations=0.3,worded=0.2,r1_tagged=0.2"),
    ] = None,
    set_: SetOpt = None,
) -> None:
    """A synthetic pretraining corpus for TASK: arithmetic knowledge in plain text and the R1
    <think>/<answer> format on other tasks, never the R1-Zero template on the task itself and
    never a test problem (signalrl/data/corpus.py). Train on it with `trainer: sft` and
    `data.path` (loss on every token)."""
    from signalrl.data.corpus import parse_mix, write_corpus
    from signalrl.tasks import ArithmeticTask, make_task

    try:
        task_kw = _task_overrides(set_, "make-corpus")
        t = make_task(task, **task_kw)
        if not isinstance(t, ArithmeticTask):
            _fail(f"make-corpus: task {task!r} has no corpus generator; available: arithmetic")
            return
        st = write_corpus(out, t, docs, seed=seed, mix=parse_mix(mix) if mix else None)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
        return
    parts = ", ".join(f"{k} {v}" for k, v in sorted(st.by_type.items()))
    err.print(f"{st.docs} documents, {st.chars} characters -> {st.out} ({parts})", highlight=False)
    print(json.dumps(st.__dict__, indent=2))


@data_app.command("make-preferences")
def make_preferences_(
    out: Annotated[Path, typer.Option(help="output JSONL: {prompt, chosen, rejected, answer}")],
    model: Annotated[str, typer.Option(help="checkpoint directory (or preset) to sample")],
    task: Annotated[str, typer.Option(help="built-in task whose train prompts are used")] = (
        "arithmetic"
    ),
    samples: Annotated[int, typer.Option(help="completions sampled per prompt")] = 4,
    pairs_per_prompt: Annotated[int, typer.Option(help="at most this many pairs a prompt")] = 1,
    n_prompts: Annotated[int | None, typer.Option(help="distinct prompts (default all)")] = None,
    temperature: Annotated[float, typer.Option()] = 1.0,
    max_new_tokens: Annotated[int, typer.Option()] = 16,
    seed: Annotated[int, typer.Option()] = 0,
    set_: SetOpt = None,
) -> None:
    """On-policy preference pairs: the task verifier picks a correct sample as chosen and a
    wrong one as rejected (no human labels); prompts with no correct or no wrong sample are
    skipped."""
    from signalrl.data.make_preferences import make_preferences

    try:
        task_kw = _task_overrides(set_, "make-preferences")
        st = make_preferences(
            model,
            out,
            task_name=task,
            task_kwargs=task_kw,
            samples=samples,
            pairs_per_prompt=pairs_per_prompt,
            n_prompts=n_prompts,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed,
        )
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
        return
    err.print(
        f"{st.pairs} pairs from {st.prompts} prompts -> {st.out}; skipped {st.skipped} prompts "
        f"({st.skipped_no_correct} with no correct sample, {st.skipped_no_wrong} with no wrong "
        f"one); sample accuracy {st.sample_accuracy:.3f}",
        highlight=False,
    )
    print(json.dumps({**st.__dict__, "skipped": st.skipped}, indent=2))


@app.command()
def sweep(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
    param: Annotated[str, typer.Option(help="dotted recipe key to sweep, e.g. preference.beta")],
    values: Annotated[str, typer.Option(help="comma-separated values (YAML), e.g. 0.1,0.5")],
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="replace existing run directories")] = False,
) -> None:
    """Train RECIPE once per value of PARAM; writes <output_dir>/<name>-sweep/ (sweep.csv,
    sweep.json, sweep.png) and prints a table of accuracy, reward accuracy, margin and KL."""
    from signalrl.config import RecipeError
    from signalrl.sweep import parse_values, print_table, run_sweep

    try:
        vals = parse_values(values)
        rows, out = run_sweep(recipe, param, vals, set_ or [], overwrite=overwrite, console=err)
    except (RecipeError, FileExistsError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
        return
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        _fail(_write_error(e))
        return
    print_table(rows, param, Console())
    err.print(f"results: {out}", highlight=False)


@app.command()
def compare(
    file: Annotated[Path, typer.Argument(help="comparison YAML (trainer: compare)")],
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="replace existing run directories")] = False,
    resume: Annotated[
        bool, typer.Option(help="reuse finished runs, continue the others from checkpoints")
    ] = False,
    name: Annotated[str | None, typer.Option(help="replace the comparison's name")] = None,
) -> None:
    """Train every run of FILE from the same start (--set applies to all of them); writes
    <output_dir>/<name>/ (compare.csv/.md/.json, curves.csv, compare.png: test accuracy
    against student forward tokens and training time) and prints the table."""
    from signalrl.compare import print_table, run_compare
    from signalrl.config import RecipeError

    try:
        rows, out = run_compare(
            file, set_ or [], overwrite=overwrite, resume=resume, name=name, console=err
        )
    except (RecipeError, FileExistsError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
        return
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        _fail(_write_error(e))
        return
    print_table(rows, out.name, Console())
    err.print(f"results: {out}", highlight=False)


@app.command()
def doctor(
    paths: Annotated[
        list[Path], typer.Argument(help="run directories, metrics.jsonl or trainer_state.json")
    ],
    json_out: Annotated[bool, typer.Option("--json", help="print the findings as JSON")] = False,
    rules: Annotated[
        str | None, typer.Option(help="a module of your own rules (its RULES, or every Rule)")
    ] = None,
) -> None:
    """Name what is going wrong in a DPO, RL or distillation run: evidence and the knob to
    turn. Exit code 0: healthy, 1: a finding, 2: a run could not be read."""
    from rich.console import Console

    from signalrl.diagnostics.cli import doctor_command

    raise typer.Exit(doctor_command(paths, json_out, rules, Console()))


@app.command()
def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(metavar="RUN_DIR...", help="run directories (runs/<name>)")
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="the HTML file (default: RUN_DIR/report.html; required for several)"),
    ] = None,
) -> None:
    """Write a self-contained HTML report of RUN_DIR (curves, findings, samples, config);
    with several run directories, their curves overlaid plus each run's section."""
    from signalrl.report.cli import report_command

    rc = report_command(run_dirs, out, err)
    if rc:
        raise typer.Exit(rc)


@app.command()
def plan(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
    gpus: Annotated[str, typer.Option(help="GPU count, or a list: 1,8,64")] = "1",
    gpu_mem: Annotated[float, typer.Option(help="memory of one GPU, GiB")] = 80.0,
    strategy: Annotated[str, typer.Option(help="ddp, fsdp2, lora (a list) or all")] = "all",
    prompt_len: Annotated[int, typer.Option(help="online: tokens of a prompt")] = 256,
    seq_len: Annotated[
        int | None, typer.Option(help="offline: tokens of a row (default: data.max_length)")
    ] = None,
    set_: SetOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON instead")] = False,
) -> None:
    """The memory per GPU of RECIPE (weights, gradients, optimizer, reference, activations,
    KV cache) under ddp / fsdp2 / lora, from the model's config; nothing is loaded."""
    from signalrl.config import RecipeError
    from signalrl.plan import PlanError, parse_gpus, parse_strategies, plan_recipe, render

    try:
        result = plan_recipe(
            recipe,
            gpus=parse_gpus(gpus),
            gpu_mem_gib=gpu_mem,
            strategies=parse_strategies(strategy),
            prompt_len=prompt_len,
            seq_len=seq_len,
            overrides=set_ or [],
        )
    except (PlanError, RecipeError, ValueError) as e:
        _fail(str(e))
        return
    if json_out:
        print(json.dumps(result.to_json(), indent=2))
    else:
        Console(width=200).print(render(result))


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
