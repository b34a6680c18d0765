"""The run report: one self-contained `report.html` per run (or a comparison of several).

`write_report(run_dirs, out, findings)` reads each run directory (`metrics.jsonl`,
`samples.jsonl`, `config.yaml`) and writes one HTML file that needs nothing else: no scripts,
no fonts, no network. Plots are inline SVG drawn here (small, crisp, text stays text), with
the curves that matter for the run's trainer (only those it logged), the doctor's findings as
vertical lines at their first step on the plots of the metric they concern, a findings table,
the best and worst samples at a few steps, the final numbers, the wall time and the resolved
config. With several runs, the same curves of every run overlaid come first. Everything that
comes from data is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from signalrl.logging import read_metrics


class ReportError(Exception):
    """A run directory that cannot be reported on (no metrics, unreadable files)."""


# the plots of each trainer: (title, metrics drawn on it); a plot is drawn with the metrics
# of it that the run logged, and left out when it logged none
CURVES: dict[str, list[tuple[str, list[str]]]] = {
    "online_rl": [
        ("reward", ["reward/mean"]),
        ("eval accuracy", ["eval/accuracy", "eval/sample_accuracy"]),
        ("KL to the reference", ["kl"]),
        ("entropy", ["entropy"]),
        ("completion length", ["completion/mean_length"]),
        ("truncated fraction", ["completion/truncated_frac"]),
        ("clip fraction", ["clip_frac/low", "clip_frac/high"]),
    ],
    "preference": [
        ("reward margin", ["rewards/margins", "eval/rewards/margins"]),
        ("reward accuracy", ["rewards/accuracies", "eval/rewards/accuracies"]),
        ("log-probs", ["logps/chosen", "logps/rejected"]),
        ("eval log-probs", ["eval/logps/chosen", "eval/logps/rejected"]),
        ("loss", ["loss", "eval/loss"]),
        ("eval accuracy", ["eval/accuracy"]),
    ],
    "sft": [
        ("loss", ["loss", "eval/loss"]),
        ("eval accuracy", ["eval/accuracy"]),
    ],
    "distill": [
        ("reverse KL", ["distill/reverse_kl"]),
        ("JSD", ["distill/jsd"]),
        ("NLL", ["distill/nll"]),
        ("reward", ["reward/mean"]),
        ("eval accuracy", ["eval/accuracy"]),
    ],
    "reward_model": [
        ("loss", ["loss", "eval/loss"]),
        ("accuracy", ["accuracy", "eval/accuracy"]),
        ("reward margin", ["rewards/margins", "eval/rewards/margins"]),
    ],
}
GENERIC = [("loss", ["loss", "eval/loss"]), ("eval accuracy", ["eval/accuracy"])]
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
SEVERITY_COLORS = {"error": "#c62828", "critical": "#c62828", "warning": "#ef6c00"}
MAX_POINTS = 300  # per curve: longer curves are downsampled (keeping the first and last point)
MAX_TEXT = 400  # characters of a sample's prompt or completion shown
W, H = 420, 230  # the plot's SVG view box
L, R, T, B = 56, 12, 26, 40  # margins inside it


Curve = tuple[str, list[tuple[float, float]], str]  # label, (step, value) points, colour
Curves = list[Curve]
Mark = tuple[float, str, str]  # step, tooltip, colour


@dataclass
class Run:
    """One run directory, read."""

    path: Path
    label: str
    trainer: str
    rows: list[dict[str, Any]]
    samples: list[dict[str, Any]] = field(default_factory=list)
    config: str = ""
    findings: list[dict[str, Any]] = field(default_factory=list)
    link: str = ""  # in a comparison: the run's own report.html, relative to the comparison


# -- reading a run ------------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    """A plottable number (the run logger writes NaN as null and inf as +-1e308)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) and abs(v) < 1e300 else None


def _trainer(config: str, rows: list[dict[str, Any]]) -> str:
    """The recipe's `trainer`, or a guess from the metric names when config.yaml is absent."""
    for line in config.splitlines():
        if line.startswith("trainer:"):
            return line.split(":", 1)[1].strip().strip("'\"")
    keys = set().union(*(r.keys() for r in rows)) if rows else set()
    if "rewards/margins" in keys:
        return "preference"
    if any(k.startswith("distill/") for k in keys):
        return "distill"
    return "online_rl" if "reward/mean" in keys else "sft"


def load_run(path: Path, label: str | None = None) -> Run:
    """Read a run directory; a missing or empty metrics.jsonl is a `ReportError`."""
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not path.is_dir():
        raise ReportError(f"{path} is not a run directory (it does not exist)")
    if not metrics.is_file():
        raise ReportError(
            f"{path} has no metrics.jsonl: not a run directory, or the run has not logged a "
            "step yet"
        )
    try:
        rows = [r for r in read_metrics(metrics) if isinstance(r, dict)]
    except (OSError, ValueError) as e:
        raise ReportError(f"cannot read {metrics}: {e}") from None
    if not rows:
        raise ReportError(f"{metrics} is empty: the run has not logged a step yet")
    samples: list[dict[str, Any]] = []
    if (path / "samples.jsonl").is_file():
        try:
            samples = [r for r in read_metrics(path / "samples.jsonl") if isinstance(r, dict)]
        except (OSError, ValueError):
            samples = []  # the report still has the curves
    cfg = path / "config.yaml"
    config = cfg.read_text(errors="replace") if cfg.is_file() else ""
    return Run(path, label or path.name, _trainer(config, rows), rows, samples, config)


def _labels(paths: list[Path]) -> list[str]:
    """Short distinct labels: the directory names, with parents added where they clash."""
    labels = [p.resolve().name or str(p) for p in paths]
    for depth in (2, 3):
        if len(set(labels)) == len(labels):
            break
        labels = ["/".join(p.resolve().parts[-depth:]) for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} ({i + 1})" for i, lab in enumerate(labels)]
    return labels


# -- series and findings ------------------------------------------------------------------------


def series(rows: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(step, value) of every row that logged `key` as a finite number, downsampled to at most
    `MAX_POINTS` points."""
    pts = []
    for r in rows:
        y, x = _num(r.get(key)), _num(r.get("step"))
        if y is not None and x is not None:
            pts.append((x, y))
    if len(pts) <= MAX_POINTS:
        return pts
    n = len(pts) - 1
    idx = sorted({round(i * n / (MAX_POINTS - 1)) for i in range(MAX_POINTS)})
    return [pts[i] for i in idx]


def finding_metrics(f: dict[str, Any]) -> list[str]:
    """The metrics a finding concerns (`metric`: a name, or `metrics`: a list of names)."""
    out: list[str] = []
    for k in ("metric", "metrics"):
        v = f.get(k)
        out += [v] if isinstance(v, str) else [m for m in v or [] if isinstance(m, str)]
    return out


def finding_step(f: dict[str, Any]) -> float | None:
    """The first step of a finding (`step`, or `first_step`)."""
    for k in ("step", "first_step"):
        v = _num(f.get(k))
        if v is not None:
            return v
    return None


def plots_for(run: Run) -> list[tuple[str, list[str]]]:
    """The run's plots: its trainer's curves that it logged, plus one per metric that a finding
    concerns and no plot shows."""
    present = {k for r in run.rows for k in r if k != "step"}
    plots = []
    for title, keys in CURVES.get(run.trainer, GENERIC):
        have = [k for k in keys if k in present and series(run.rows, k)]
        if have:
            plots.append((title, have))
    shown = {k for _, keys in plots for k in keys}
    for f in run.findings:
        for m in finding_metrics(f):
            if m in present and m not in shown and series(run.rows, m):
                plots.append((m, [m]))
                shown.add(m)
    return plots


# -- SVG plots ------------------------------------------------------------------------------------


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values covering [lo, hi]."""
    span = hi - lo
    raw = span / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    out = []
    v = first
    while v <= hi + step * 1e-9:
        out.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return out


def _fmt(v: float) -> str:
    """A short tick label."""
    a = abs(v)
    if a != 0 and (a >= 1e5 or a < 1e-3):
        return f"{v:.1e}"
    return f"{v:.4g}"


def _bounds(curves: Curves, marks: list[float]) -> tuple[float, float, float, float]:
    xs = [x for _, pts, _ in curves for x, _ in pts] + marks
    ys = [y for _, pts, _ in curves for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0 == 0:  # e.g. a clip fraction that stayed 0: an axis from 0 up
        y0, y1 = -0.05, 1.0
    elif y1 == y0:
        pad = abs(y0) * 0.1
        y0, y1 = y0 - pad, y1 + pad
    else:
        pad = (y1 - y0) * 0.05
        y0, y1 = y0 - pad, y1 + pad
    return x0, x1, y0, y1


def svg_plot(
    title: str,
    curves: Curves,
    marks: list[Mark] | None = None,
) -> str:
    """An inline SVG line plot: `curves` are (label, points, colour); `marks` are vertical
    lines (step, tooltip, colour), e.g. the doctor's findings."""
    marks = marks or []
    x0, x1, y0, y1 = _bounds(curves, [m[0] for m in marks])
    pw, ph = W - L - R, H - T - B

    def sx(x: float) -> float:
        return L + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return T + ph - (y - y0) / (y1 - y0) * ph

    e = html.escape
    out = [
        f'<svg viewBox="0 0 {W} {H}" xmlns="http://www.w3.org/2000/svg" role="img" '
        f'aria-label="{e(title)}">',
        f'<text x="{L}" y="16" class="t">{e(title)}</text>',
        f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" class="frame"/>',
    ]
    for v in _ticks(y0, y1):
        y = sy(v)
        out.append(f'<line x1="{L}" x2="{L + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{L - 4}" y="{y + 3.5:.1f}" class="yl">{_fmt(v)}</text>')
    for v in _ticks(x0, x1, 6):
        x = sx(v)
        out.append(f'<text x="{x:.1f}" y="{T + ph + 14}" class="xl">{_fmt(v)}</text>')
    out.append(f'<text x="{L + pw / 2}" y="{H - 6}" class="xl">step</text>')
    for step, tip, color in marks:
        x = sx(step)
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{T}" y2="{T + ph}" stroke="{color}" '
            f'class="mark"><title>{e(tip)}</title></line>'
        )
    for label, pts, color in curves:
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        dash = " d" if label.startswith("eval/") else ""  # held-out curves are dashed
        if len(pts) > 1:
            out.append(f'<polyline points="{path}" stroke="{color}" class="c{dash}"/>')
        if len(pts) <= 30:
            out += [
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>'
                for x, y in pts
            ]
    out.append("</svg>")
    return "".join(out)


def _legend(curves: Curves, marks: list[Mark]) -> str:
    """The legend, as HTML under the plot (it wraps, and never covers a curve): the curves,
    then the findings marked."""
    items = "".join(
        f'<span><i class="{"d" if label.startswith("eval/") else ""}" '
        f'style="border-color:{color}"></i>{html.escape(label)}</span>'
        for label, _pts, color in curves
    )
    items += "".join(
        f'<span class="fm"><i class="m" style="border-color:{color}"></i>{html.escape(tip)}</span>'
        for _step, tip, color in marks
    )
    return f"<figcaption>{items}</figcaption>"


def _marks(findings: list[dict[str, Any]], keys: list[str], color: str | None = None) -> list[Mark]:
    """Vertical lines for the findings that concern one of `keys`."""
    out = []
    for f in findings:
        step = finding_step(f)
        if step is None or not set(finding_metrics(f)) & set(keys):
            continue
        sev = str(f.get("severity", ""))
        c = color or SEVERITY_COLORS.get(sev.lower(), "#757575")
        out.append((step, f"{f.get('id', 'finding')} ({sev}) at step {step:g}", c))
    return out


def _figure(keys: list[str], title: str, curves: Curves, marks: list[Mark]) -> str:
    data = html.escape(" ".join(keys))
    return (
        f'<figure class="plot" data-metrics="{data}" data-marks="{len(marks)}">'
        f"{svg_plot(title, curves, marks)}{_legend(curves, marks)}</figure>"
    )


def run_plots(run: Run) -> str:
    figs = []
    for title, keys in plots_for(run):
        curves = [(k, series(run.rows, k), COLORS[i % len(COLORS)]) for i, k in enumerate(keys)]
        marks = _marks(run.findings, keys)
        figs.append(_figure(keys, title, curves, marks))
    return f'<div class="plots">{"".join(figs)}</div>'


def comparison_plots(runs: list[Run]) -> str:
    """One plot per metric that any run's trainer draws, every run that logged it overlaid."""
    keys: list[str] = []
    for run in runs:
        keys += [k for _, ks in plots_for(run) for k in ks if k not in keys]
    figs = []
    for k in keys:
        curves: Curves = []
        marks: list[Mark] = []
        for i, run in enumerate(runs):
            pts = series(run.rows, k)
            if pts:
                curves.append((run.label, pts, COLORS[i % len(COLORS)]))
                marks += _marks(run.findings, [k], COLORS[i % len(COLORS)])
        if curves:
            figs.append(_figure([k], k, curves, marks))
    return f'<div class="plots">{"".join(figs)}</div>'


# -- tables ---------------------------------------------------------------------------------------


def _cell(v: Any, limit: int = MAX_TEXT) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return html.escape(f"{v:.4g}")
    s = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    more = len(s) - limit
    if more > 0:
        s = s[:limit] + f" … (+{more} chars)"
    return html.escape(s)


def final_numbers(run: Run) -> dict[str, Any]:
    """The wall time (`time/elapsed_s` of the last row), the last step, and the last logged
    evaluation numbers (accuracy, pass@k, maj@k, reward accuracy on held-out pairs)."""
    last = run.rows[-1]
    out: dict[str, Any] = {"steps": last.get("step")}
    wall = _num(last.get("time/elapsed_s"))
    out["wall time"] = f"{wall:.1f} s" if wall is not None else None
    for r in reversed(run.rows):
        if any(k.startswith("eval/") for k in r):
            last_eval = r
            break
    else:
        last_eval = last
    wanted = ("eval/accuracy", "eval/pass@", "eval/maj@", "eval/rewards/accuracies")
    for k, v in last_eval.items():
        if k.startswith(wanted) and _num(v) is not None:
            out[k] = v
    for k, v in last.items():
        if k.startswith("train_eval/rewards/accuracies") and _num(v) is not None:
            out[k] = v
    return out


def _kv_table(d: dict[str, Any]) -> str:
    cells = "".join(
        f'<div class="kv"><span>{html.escape(str(k))}</span><b>{_cell(v)}</b></div>'
        for k, v in d.items()
        if v is not None
    )
    return f'<div class="kvs">{cells}</div>'


def findings_table(findings: list[dict[str, Any]]) -> str:
    if not findings:
        return '<p class="muted">No findings.</p>'
    head = "".join(f"<th>{h}</th>" for h in ("id", "severity", "step", "evidence", "suggestion"))
    body = []
    for f in findings:
        sev = str(f.get("severity", ""))
        step = finding_step(f)
        body.append(
            f'<tr class="sev-{html.escape(sev.lower())}"><td><code>{_cell(f.get("id"))}</code>'
            f"</td><td>{_cell(sev)}</td><td>{'' if step is None else f'{step:g}'}</td>"
            f"<td>{_cell(f.get('evidence'), 2000)}</td><td>{_cell(f.get('suggestion'), 2000)}"
            "</td></tr>"
        )
    return f'<table class="findings"><tr>{head}</tr>{"".join(body)}</table>'


def pick_samples(
    samples: list[dict[str, Any]], n_steps: int = 4, per: int = 2
) -> list[tuple[Any, str, dict[str, Any]]]:
    """(step, kind, row): the `per` best and worst rows by reward at up to `n_steps` logged
    steps spread over the run (the first rows of a step when they have no reward or all the
    same)."""
    by_step: dict[Any, list[dict[str, Any]]] = {}
    for r in samples:
        by_step.setdefault(r.get("step"), []).append(r)
    steps = list(by_step)
    if len(steps) > n_steps:
        steps = [steps[round(i * (len(steps) - 1) / (n_steps - 1))] for i in range(n_steps)]
    out: list[tuple[Any, str, dict[str, Any]]] = []
    for s in steps:
        rows = by_step[s]
        scored = [r for r in rows if _num(r.get("reward")) is not None]
        if not scored:
            out += [(s, "sample", r) for r in rows[:per]]
            continue
        scored.sort(key=lambda r: -float(r["reward"]))
        if scored[0]["reward"] == scored[-1]["reward"]:  # no best or worst: show a few
            out += [(s, "tied", r) for r in scored[:per]]
            continue
        top, low = scored[0]["reward"], scored[-1]["reward"]  # a best beats a worst
        best = [r for r in scored if r["reward"] > low][:per]
        worst = [r for r in scored[::-1] if r["reward"] < top][:per][::-1]
        out += [(s, "best", r) for r in best] + [(s, "worst", r) for r in worst]
    return out


SAMPLE_COLUMNS = ("prompt", "completion", "chosen", "rejected", "answer", "reward")


def samples_table(samples: list[dict[str, Any]]) -> str:
    picked = pick_samples(samples)
    if not picked:
        return '<p class="muted">No samples logged (samples.jsonl is absent or empty).</p>'
    cols = [c for c in SAMPLE_COLUMNS if any(c in r for _, _, r in picked)]
    head = "".join(f"<th>{c}</th>" for c in ("step", "", *cols))
    body = []
    for step, kind, r in picked:
        cells = "".join(f"<td><pre>{_cell(r.get(c))}</pre></td>" for c in cols)
        body.append(f'<tr class="{kind}"><td>{_cell(step)}</td><td>{kind}</td>{cells}</tr>')
    return f'<table class="samples"><tr>{head}</tr>{"".join(body)}</table>'


def run_section(run: Run, index: int) -> str:
    e = html.escape
    config = (
        f"<details><summary>Resolved config (config.yaml)</summary><pre>{e(run.config)}</pre>"
        "</details>"
        if run.config
        else '<p class="muted">No config.yaml.</p>'
    )
    return (
        f'<section class="run" id="run-{index}"><h2>{e(run.label)} '
        f"<small>{e(run.trainer)} · {e(str(run.path))}</small></h2>"
        f"{_kv_table(final_numbers(run))}"
        f"<h3>Curves</h3>{run_plots(run)}"
        f"<h3>Findings</h3>{findings_table(run.findings)}"
        f"<h3>Samples (best and worst by reward)</h3>{samples_table(run.samples)}"
        f"{config}</section>"
    )


def comparison_section(runs: list[Run]) -> str:
    finals = [final_numbers(r) for r in runs]
    keys: list[str] = []
    for f in finals:
        keys += [k for k in f if k not in keys]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ("run", "trainer", *keys, "report"))
    body = "".join(
        f"<tr><td>{_cell(r.label)}</td><td>{_cell(r.trainer)}</td>"
        + "".join(f"<td>{_cell(f.get(k))}</td>" for k in keys)
        + (f'<td><a href="{html.escape(r.link)}">report.html</a>' if r.link else "<td>-")
        + "</td></tr>"
        for r, f in zip(runs, finals, strict=True)
    )
    return (
        f'<section class="compare"><h2>Comparison of {len(runs)} runs</h2>'
        f'<table class="final"><tr>{head}</tr>{body}</table>{comparison_plots(runs)}</section>'
    )


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1400px;padding:16px 24px;color:#222;background:#fff;font-size:14px}h1{font-size:22px;
margin:4px 0 12px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;
margin-top:28px}h2 small{font-weight:normal;color:#777;font-size:13px}h3{font-size:15px;
margin:18px 0 6px}.muted{color:#777}.plots{display:grid;
grid-template-columns:repeat(auto-fill,minmax(380px,1fr));gap:10px}figure.plot{margin:0;
border:1px solid #e4e4e4;border-radius:4px;padding:4px}svg{width:100%;height:auto;display:block;
font-size:11px}svg .t{font-size:13px;font-weight:600;fill:#222}svg .frame{fill:none;stroke:#bbb}
svg .grid{stroke:#eee}svg .yl{text-anchor:end;fill:#555}svg .xl{text-anchor:middle;fill:#555}
svg .c{fill:none;stroke-width:1.6;stroke-linejoin:round}svg .mark{stroke-width:1.5;
stroke-dasharray:4 3}.kvs{display:flex;flex-wrap:wrap;gap:8px;margin:8px 0}
.kv{border:1px solid #e4e4e4;border-radius:4px;padding:4px 10px;background:#fafafa}
.kv span{color:#666;margin-right:6px}table{border-collapse:collapse;width:100%;margin:4px 0}
th,td{border:1px solid #e4e4e4;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td pre{margin:0;white-space:pre-wrap;word-break:break-word;font-size:12px;
max-height:10em;overflow:auto}tr.best td:nth-child(2){color:#2e7d32;font-weight:600}
tr.worst td:nth-child(2){color:#c62828;font-weight:600}tr.tied td:nth-child(2){color:#777}
tr.sev-error td:nth-child(2),tr.sev-critical td:nth-child(2){color:#c62828;font-weight:600}
tr.sev-warning td:nth-child(2){color:#ef6c00;font-weight:600}details{margin:14px 0}
summary{cursor:pointer;font-weight:600}details pre{background:#f7f7f7;padding:8px;
border:1px solid #e4e4e4;font-size:12px;overflow:auto}nav a{margin-right:12px}
figcaption{font-size:11.5px;color:#333;padding:0 4px 2px 56px;display:flex;flex-wrap:wrap;
gap:2px 12px}figcaption i{display:inline-block;width:16px;height:0;margin-right:4px;
vertical-align:middle;border-top:2px solid}figcaption i.d{border-top-style:dashed}
figcaption i.m{width:0;height:11px;border-top:0;border-left:2px dashed}
svg .c.d{stroke-dasharray:5 3}table.samples td:first-child{width:3em}
table.samples td:nth-child(2){width:3.5em}table.findings td:nth-child(3){width:3em}
"""


def render(runs: list[Run]) -> str:
    """The whole HTML document."""
    e = html.escape
    title = runs[0].label if len(runs) == 1 else f"{len(runs)} runs"
    nav = (
        "<nav>"
        + "".join(f'<a href="#run-{i}">{e(r.label)}</a>' for i, r in enumerate(runs))
        + "</nav>"
        if len(runs) > 1
        else ""
    )
    body = (comparison_section(runs) if len(runs) > 1 else "") + "".join(
        run_section(r, i) for i, r in enumerate(runs)
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>signalrl report: {e(title)}</title><style>{CSS}</style></head>"
        f"<body><h1>signalrl report: {e(title)}</h1>{nav}{body}</body></html>\n"
    )


def write_report(
    run_dirs: list[Path], out: Path, findings: dict[str, list[dict[str, Any]]] | None = None
) -> Path:
    """Write one self-contained HTML report of `run_dirs` to `out` (returned).
    `findings[str(run_dir)]` are the doctor's findings of a run: dicts with `id`, `severity`,
    `step` (or `first_step`), `evidence`, `suggestion` and the `metric` (or `metrics`) they
    concern (dataclasses with those fields are taken too). A run directory without metrics is
    a `ReportError`."""
    if not run_dirs:
        raise ReportError("no run directory given")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, lab) for p, lab in zip(paths, _labels(paths), strict=True)]
    for run, p in zip(runs, run_dirs, strict=True):
        fs = (findings or {}).get(str(p)) or (findings or {}).get(str(run.path.resolve()))
        fs = [asdict(f) if is_dataclass(f) and not isinstance(f, type) else f for f in fs or []]
        run.findings = [f for f in fs if isinstance(f, dict)]
    out = Path(out)
    for run in runs if len(runs) > 1 else []:  # link each run's own report from the comparison
        own = run.path / "report.html"
        if own.is_file() and own.resolve() != out.resolve():
            run.link = Path(os.path.relpath(own.resolve(), out.parent.resolve())).as_posix()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render(runs), encoding="utf-8")
    tmp.replace(out)
    return out
