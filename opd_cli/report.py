"""`opd report <multirun dir>...`: the matrix table, a verdict per cell next to the paper's, and plots.

    opd report multirun/2026-11-29/10-00-00-000000                  # report.md + report.html + PNGs there
    opd report multirun/a multirun/b --out experiments/matrix        # several sweeps into one report

Seeds are aggregated as mean and standard deviation; failed and unfinished jobs are listed as such. The
verdicts and the rules they follow (stated in the report too): opd_cli/verdicts.py. This module renders.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from opd_cli.io import atomic_write_text
from opd_cli.report_plots import write_plots
from opd_cli.verdicts import DELTA, RULES, Cell, Job, build_cells, comparisons, load_jobs

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
            # per seed, for `opd preflight --against` (its calibration per seed and its compute fraction)
            "seed_verdicts": {
                str(j.seed): v for j, v in zip([j for j in c.jobs if j.finished], c.verdicts, strict=True)
            },
            "wall_s": {str(j.seed): j.wall_s for j in c.jobs if j.wall_s is not None},
        }
        for c in cells
    }
    atomic_write_text(out_dir / "report.json", json.dumps(summary, indent=2) + "\n")
    return report, text
