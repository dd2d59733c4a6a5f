"""The verdicts of `opd report`: what one job did (its figures), what a cell did over its seeds, and
whether that matches the paper's verdict and comparative claims (`cell.better_than`).

    from opd_cli.verdicts import RULES, build_cells, comparisons, load_jobs
    cells = build_cells(load_jobs([Path("multirun/2026-11-29/10-00-00-000000")]))
    print(RULES)                                   # the rules, as every report states them

Every job directory (one with `status.json` or `.hydra/`, see rundir.py) is read: its config, status,
summary, metrics and evaluations. Jobs are grouped into cells by `cell.name` (or, for runs without a
preset, by their overrides minus `seed`); a cell's verdict uses its finished seeds. The rules are stated
once, in `RULES` below, from the thresholds they use (DELTA, INTERNALIZED, TAIL); report.py renders them.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from opd_cli import rundir
from opd_cli.errors import OpdError

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
