"""`opd report <multirun dir>...`: the matrix table, a verdict per cell next to the paper's, and plots.

    opd report multirun/2026-11-29/10-00-00-000000                  # report.md + report.html + PNGs there
    opd report multirun/a multirun/b --out experiments/matrix        # several sweeps into one report

Every job directory (one with `status.json` or `.hydra/`) is read: its config (`config.yaml`), status,
`summary.json`, `metrics.jsonl` and `eval/step_*.json`. Jobs are grouped into cells by `cell.name`
(or, for runs without a preset, by their overrides minus `seed`), and seeds are aggregated as mean and
standard deviation. Failed and unfinished jobs are listed as such; a cell's verdict uses its finished seeds.

The verdict rules (stated in the report too, and applied per seed, then by majority):
  collapses  final accuracy <= half of max(start, best during the run), greedy or sampled (the student's
             own T=1 training rollouts, TAIL-step windows)
  degrades   final - start <= -DELTA (and not collapsed)
  improves   final - start >= +DELTA
  stable     otherwise
For cells whose metric is `internalization` (OPSD with a shared rule): improves when the internalization
score reaches INTERNALIZED and the accuracy without the rule is within DELTA of the rule-teacher's own
(the step-0 model with the system prompt); degrades/collapses by the accuracy rules otherwise.
"""

from __future__ import annotations

import html
import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from opd_cli import rundir
from opd_cli.errors import OpdError
from opd_cli.io import atomic_write_text
from opd_cli.report_plots import write_plots

DELTA = 0.05  # 5 accuracy points: ~1.5 binomial standard errors on 200 problems at p = 0.7
INTERNALIZED = 0.5  # internalization score: half of the with/without-rule gap closed
TAIL = 10  # training metrics (overlap, mass, repeat, hedging) are averaged over the last TAIL steps

# Verdicts that satisfy a paper claim: "stable" means "neither degrades nor collapses".
SATISFIES = {
    "improves": {"improves"},
    "stable": {"stable", "improves"},
    "degrades": {"degrades", "collapses"},
    "collapses": {"collapses"},
}


class ReportError(OpdError):
    """Nothing to report on: printed as one line, exit code 2."""


@dataclass
class Job:
    path: Path
    status: str  # ok | failed | running (unfinished or killed)
    error: str | None
    cell: str
    axis: str
    seed: int | None
    cfg: dict
    summary: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    wall_s: float | None = None  # the job's own wall time (status.json)
    figures: dict = field(default_factory=dict)  # job_figures(), set by build_cells for finished jobs

    @property
    def finished(self) -> bool:
        return self.status == "ok" and bool(self.summary)


# ------------------------------------------------------------------------------------------- loading
def _job_dirs(root: Path) -> list[Path]:
    if rundir.is_job_dir(root):
        return [root]
    return [
        c
        for c in sorted(root.iterdir(), key=lambda p: (len(p.name), p.name))
        if c.is_dir() and rundir.is_job_dir(c)
    ]


def _cell_name(cfg: dict, overrides: list[str]) -> str:
    name = (cfg.get("cell") or {}).get("name", "default")
    if name and name != "default":
        return name
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("seed", "hydra.run.dir")]
    return " ".join(rest) or "default"


def load_job(path: Path) -> Job:
    status = rundir.read_status(path)
    cfg_path = path / rundir.CONFIG
    if not cfg_path.is_file():
        cfg_path = path / rundir.HYDRA / rundir.CONFIG
    cfg = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=False) if cfg_path.is_file() else {}
    overrides_path = path / rundir.OVERRIDES
    overrides = status.get("overrides") or (
        OmegaConf.to_container(OmegaConf.load(overrides_path)) if overrides_path.is_file() else []
    )
    summary = rundir.read_summary(path) or (status.get("summary") or {})
    return Job(
        path=path,
        status=status.get("status", "running" if cfg else "missing"),
        error=status.get("error"),
        cell=_cell_name(cfg, overrides),
        axis=(cfg.get("cell") or {}).get("axis", ""),
        seed=cfg.get("seed"),
        cfg=cfg,
        summary=summary,
        metrics=rundir.read_metrics(path),
        evals=rundir.read_evals(path),
        wall_s=status.get("wall_s"),
    )


def load_jobs(roots: list[Path]) -> list[Job]:
    jobs = []
    for root in roots:
        if not root.is_dir():
            raise ReportError(f"{root} is not a directory; pass a multirun directory printed by `opd run -m`")
        jobs += [load_job(d) for d in _job_dirs(root)]
    if not jobs:
        raise ReportError(
            f"no job directories under {', '.join(map(str, roots))} (expected <dir>/<n>/status.json from "
            f"`opd run -m ...`)"
        )
    return jobs


# ------------------------------------------------------------------------------------------ per job
def _main(result: dict) -> dict:
    return result.get("main") or result.get("without_system") or {}


def _tail_mean(metrics: list[dict], key: str) -> float:
    vals = [m[key] for m in metrics if isinstance(m.get(key), (int, float)) and not _nan(m[key])]
    return statistics.fmean(vals[-TAIL:]) if vals else math.nan


def _nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


def job_figures(job: Job) -> dict[str, float]:
    """The matrix columns of one finished job."""
    evals = sorted(job.evals, key=lambda e: e.get("step", 0))
    accs = [_main(e).get("accuracy", math.nan) for e in evals]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    start = job.summary.get("start_accuracy", _main(first).get("accuracy", math.nan))
    final = job.summary.get("final_accuracy", _main(last).get("accuracy", math.nan))
    out = {
        "start_accuracy": start,
        "final_accuracy": final,
        "best_accuracy": max([a for a in accs if not _nan(a)], default=final),
        "accuracy_change": final - start,
        "well_formed": _main(last).get("well_formed", math.nan),
        "mean_length": _main(last).get("mean_length", math.nan),
        "truncation_ratio": _main(last).get("truncation_ratio", math.nan),
        "rollout_length": _tail_mean(job.metrics, "response_length"),
        "repeat_ratio": _tail_mean(job.metrics, "repeat_ratio"),
        "hedging_rate": _tail_mean(job.metrics, "hedging_rate"),
        "topk_overlap": _tail_mean(job.metrics, "topk_overlap"),
        "student_mass": _tail_mean(job.metrics, "student_mass_in_support"),
        "collapsed_at": job.summary.get("collapsed_at"),
        **sampled_accuracy(job.metrics),
    }
    if "internalization" in last:
        out["internalization"] = last["internalization"].get("score", math.nan)
        out["follow_without"] = last["internalization"].get("follow_without", math.nan)
        out["teacher_accuracy"] = first.get("with_system", {}).get("accuracy", math.nan)
    return out


def sampled_accuracy(metrics: list[dict]) -> dict[str, float]:
    """Accuracy of the student's own T=1 training rollouts: start (first TAIL steps), final (last TAIL),
    best (best TAIL-step window). Greedy decoding can hide a drained distribution: the argmax path
    survives while the samples the student actually produces fall apart."""
    vals = [m["rollout_accuracy"] for m in metrics if isinstance(m.get("rollout_accuracy"), (int, float))]
    if len(vals) < TAIL:
        return {}
    windows = [statistics.fmean(vals[i : i + TAIL]) for i in range(len(vals) - TAIL + 1)]
    return {"sampled_start": windows[0], "sampled_final": windows[-1], "sampled_best": max(windows)}


def _lost_half(start: float, best: float, final: float) -> bool:
    peak = max(start, best)
    return peak > 0.05 and final <= 0.5 * peak


def job_verdict(fig: dict[str, float], metric: str = "accuracy") -> str:
    start, final, best = fig["start_accuracy"], fig["final_accuracy"], fig["best_accuracy"]
    if _lost_half(start, best, final):
        return "collapses"
    if "sampled_final" in fig and _lost_half(fig["sampled_start"], fig["sampled_best"], fig["sampled_final"]):
        return "collapses"
    change = final - start
    if metric == "internalization" and "internalization" in fig:
        if fig["internalization"] >= INTERNALIZED and final >= fig["teacher_accuracy"] - DELTA:
            return "improves"
        return "degrades" if change <= -DELTA else "stable"
    if change <= -DELTA:
        return "degrades"
    if change >= DELTA:
        return "improves"
    return "stable"


# ----------------------------------------------------------------------------------------- per cell
@dataclass
class Cell:
    name: str
    axis: str
    paper_verdict: str
    paper_claim: str
    better_than: str | None
    metric: str
    jobs: list[Job]
    figures: list[dict] = field(default_factory=list)  # one per finished job
    verdicts: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if not self.verdicts:
            return "failed" if any(j.status == "failed" for j in self.jobs) else "unfinished"
        counts = Counter(self.verdicts).most_common()
        if len(counts) > 1 and counts[0][1] == counts[1][1]:
            return "mixed"
        return counts[0][0]

    @property
    def match(self) -> bool | None:
        if not self.paper_verdict or self.verdict in ("failed", "unfinished"):
            return None
        return self.verdict in SATISFIES[self.paper_verdict]

    def stat(self, key: str) -> tuple[float, float, int]:
        vals = [f[key] for f in self.figures if isinstance(f.get(key), (int, float)) and not _nan(f[key])]
        if not vals:
            return math.nan, math.nan, 0
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return statistics.fmean(vals), sd, len(vals)


def build_cells(jobs: list[Job]) -> list[Cell]:
    cells: dict[str, Cell] = {}
    for job in jobs:
        c = job.cfg.get("cell") or {}
        cell = cells.setdefault(
            job.cell,
            Cell(
                name=job.cell,
                axis=c.get("axis", ""),
                paper_verdict=c.get("paper_verdict", ""),
                paper_claim=c.get("paper_claim", ""),
                better_than=c.get("better_than"),
                metric=c.get("metric", "accuracy"),
                jobs=[],
            ),
        )
        cell.jobs.append(job)
        if job.finished:
            fig = job.figures = job_figures(job)
            cell.figures.append(fig)
            cell.verdicts.append(job_verdict(fig, cell.metric))
    return list(cells.values())


def comparisons(cells: list[Cell]) -> list[dict]:
    """The paper's comparative claims (`cell.better_than`): mean final accuracy, higher by > DELTA."""
    by_name = {c.name: c for c in cells}
    out = []
    for c in cells:
        other = by_name.get(c.better_than or "")
        if other is None:
            continue
        a, sa, _ = c.stat("final_accuracy")
        b, sb, _ = other.stat("final_accuracy")
        holds = None if math.isnan(a) or math.isnan(b) else a - b > DELTA
        out.append({"cell": c.name, "other": other.name, "a": a, "b": b, "sa": sa, "sb": sb, "holds": holds})
    return out


# --------------------------------------------------------------------------------------- rendering
COLUMNS = [
    ("start_accuracy", "start acc"),
    ("final_accuracy", "final acc"),
    ("best_accuracy", "best acc"),
    ("accuracy_change", "change"),
    ("sampled_start", "sampled acc start"),
    ("sampled_final", "sampled acc final"),
    ("internalization", "internalization"),
    ("mean_length", "eval length"),
    ("truncation_ratio", "truncation"),
    ("repeat_ratio", "repeat"),
    ("hedging_rate", "hedging"),
    ("topk_overlap", "top-K overlap"),
    ("student_mass", "student top-K mass"),
]


def _fmt(mean: float, sd: float, n: int, digits: int = 3) -> str:
    if n == 0 or math.isnan(mean):
        return "-"
    if digits == 1:
        return f"{mean:.1f}" + (f" ± {sd:.1f}" if n > 1 else "")
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if n > 1 else "")


def _collapsed(cell: Cell) -> str:
    steps = [f.get("collapsed_at") for f in cell.figures]
    fired = [s for s in steps if s is not None]
    if not steps:
        return "-"
    return f"{len(fired)}/{len(steps)}" + (f" (step {min(fired)}-{max(fired)})" if fired else "")


def _mark(match: bool | None) -> str:
    return {True: "✓", False: "✗", None: "?"}[match]


def _seeds(cell: Cell) -> str:
    ok = len(cell.figures)
    bad = [j for j in cell.jobs if not j.finished]
    return f"{ok}" + (f" (+{len(bad)} {'/'.join(sorted({j.status for j in bad}))})" if bad else "")


def matrix_rows(cells: list[Cell]) -> tuple[list[str], list[list[str]]]:
    header = ["cell", "axis", "seeds"] + [title for _, title in COLUMNS]
    header += ["collapse detector", "verdict (per seed)", "paper", "match"]
    rows = []
    for c in cells:
        row = [c.name, c.axis, _seeds(c)]
        for key, _ in COLUMNS:
            digits = 1 if key in ("mean_length",) else 3
            row.append(_fmt(*c.stat(key), digits=digits))
        per_seed = ", ".join(f"{v} {n}" for v, n in Counter(c.verdicts).most_common())
        row += [
            _collapsed(c),
            f"**{c.verdict}**" + (f" ({per_seed})" if per_seed else ""),
            c.paper_verdict or "-",
        ]
        row.append(_mark(c.match))
        rows.append(row)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


RULES = f"""Verdict rules (per seed, then the majority over seeds; `mixed` on a tie):
- **collapses**: final accuracy <= 1/2 of max(start, best during the run), for greedy eval accuracy or for
  the accuracy of the student's own T=1 training samples (mean over {TAIL}-step windows: first, best, last);
- **degrades**: final - start <= -{DELTA} (not collapsed);
- **improves**: final - start >= +{DELTA};
- **stable**: otherwise (|change| < {DELTA});
- cells with metric `internalization` (OPSD, shared rule): **improves** when the internalization score is
  >= {INTERNALIZED} and accuracy without the rule is within {DELTA} of the rule-teacher's own (step-0 model
  with the system prompt); otherwise the accuracy rules.
A paper verdict `stable` is matched by `stable` or `improves` (no degradation); `degrades` by `degrades` or
`collapses`. Accuracy is greedy, on the task's held-out eval set. Training-side columns (repeat, hedging,
top-K overlap, student top-K mass) average the last {TAIL} steps of each run's rollouts. `± x` is the
standard deviation over seeds."""


def job_rows(jobs: list[Job]) -> tuple[list[str], list[list[str]]]:
    header = ["job", "cell", "seed", "status", "final acc", "collapsed at", "wall (s)", "error"]
    rows = []
    for j in jobs:
        fig = j.figures
        final = fig.get("final_accuracy")
        rows.append(
            [
                str(j.path),
                j.cell,
                str(j.seed),
                j.status if j.status != "running" else "unfinished",
                f"{final:.3f}" if isinstance(final, float) else "-",
                str(fig.get("collapsed_at")) if fig else "-",
                f"{j.wall_s:.0f}" if j.wall_s is not None else "-",
                (j.error or "").replace("|", "/")[:160],
            ]
        )
    return header, rows


@dataclass
class Report:
    cells: list[Cell]
    jobs: list[Job]
    comparisons: list[dict]
    plots: list[str]

    def markdown(self, title: str, roots: list[Path]) -> str:
        header, rows = matrix_rows(self.cells)
        matched = [c for c in self.cells if c.match is not None]
        n_ok = sum(1 for c in matched if c.match)
        parts = [
            f"# {title}",
            "",
            f"Sources: {', '.join(f'`{r}`' for r in roots)}. Jobs: {len(self.jobs)} "
            f"({sum(j.finished for j in self.jobs)} finished, "
            f"{sum(j.status == 'failed' for j in self.jobs)} failed, "
            f"{sum(not j.finished and j.status != 'failed' for j in self.jobs)} unfinished). "
            f"Paper verdict reproduced in **{n_ok} of {len(matched)}** cells with a verdict. "
            f"Job wall time: {sum(j.wall_s or 0 for j in self.jobs) / 60:.1f} min in total.",
            "",
            "## Matrix",
            "",
            markdown_table(header, rows),
            "",
            RULES,
        ]
        if self.comparisons:
            parts += ["", "## Comparative claims", ""]
            parts.append(
                markdown_table(
                    ["claim", "final acc", "vs", f"holds (> +{DELTA:.2f})"],
                    [
                        [
                            f"{c['cell']} better than {c['other']}",
                            _fmt(c["a"], c["sa"], 2),
                            _fmt(c["b"], c["sb"], 2),
                            _mark(c["holds"]),
                        ]
                        for c in self.comparisons
                    ],
                )
            )
        claims = [c for c in self.cells if c.paper_claim]
        if claims:
            parts += ["", "## What the paper says per cell", ""]
            parts += [f"- **{c.name}** ({c.paper_verdict}): {c.paper_claim}" for c in claims]
        if self.plots:
            parts += ["", "## Curves (mean over seeds)", ""]
            parts += [f"![{p}]({p})" for p in self.plots]
        header, rows = job_rows(self.jobs)
        parts += ["", "## Jobs", "", markdown_table(header, rows), ""]
        return "\n".join(parts)

    def html(self, title: str) -> str:
        header, rows = matrix_rows(self.cells)
        jh, jr = job_rows(self.jobs)

        def table(h, rs):
            head = "".join(f"<th>{html.escape(x)}</th>" for x in h)
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(x.replace('**', ''))}</td>" for x in r) + "</tr>"
                for r in rs
            )
            return f"<table><tr>{head}</tr>{body}</table>"

        imgs = "".join(f'<p><img src="{html.escape(p)}" style="max-width:100%"></p>' for p in self.plots)
        rules = html.escape(RULES).replace("\n", "<br>")
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><h2>Matrix</h2>{table(header, rows)}<p>{rules}</p>"
            f"<h2>Curves</h2>{imgs}<h2>Jobs</h2>{table(jh, jr)}</body></html>"
        )


def build_report(roots: list[Path], out_dir: Path, plots: bool = True) -> tuple[Report, str]:
    jobs = load_jobs(roots)
    cells = build_cells(jobs)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_files = []
    if plots:
        plot_files = write_plots(cells, out_dir)
    report = Report(cells=cells, jobs=jobs, comparisons=comparisons(cells), plots=plot_files)
    title = "opd matrix report"
    text = report.markdown(title, roots)
    atomic_write_text(out_dir / "report.md", text)
    atomic_write_text(out_dir / "report.html", report.html(title))
    summary = {
        c.name: {
            "verdict": c.verdict,
            "paper_verdict": c.paper_verdict,
            "match": c.match,
            "seeds": len(c.figures),
            "final_accuracy": c.stat("final_accuracy")[:2],
        }
        for c in cells
    }
    atomic_write_text(out_dir / "report.json", json.dumps(summary, indent=2) + "\n")
    return report, text
