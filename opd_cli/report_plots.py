"""PNG curves for `opd report`: one figure per signal, one panel per grid axis, one line per cell.

Each line is the mean over the cell's finished seeds at the steps all of them logged; the band is min-max.
"""

from __future__ import annotations

import math
from pathlib import Path

# (file, title, source, key): source "eval" reads eval/step_*.json (main or without_system), "train"
# reads metrics.jsonl.
FIGURES = [
    ("accuracy.png", "greedy eval accuracy", "eval", "accuracy"),
    ("sampled_accuracy.png", "accuracy of the student's T=1 samples", "train", "rollout_accuracy"),
    ("response_length.png", "training response length (tokens)", "train", "response_length"),
    ("topk_overlap.png", "teacher-student top-K overlap", "train", "topk_overlap"),
    ("student_mass.png", "student mass inside the top-K set", "train", "student_mass_in_support"),
    ("hedging_rate.png", "hedging-token rate", "train", "hedging_rate"),
]
SMOOTH = 5  # training curves: moving average over this many steps


def _series(job, source: str, key: str) -> dict[int, float]:
    if source == "eval":
        out = {}
        for e in job.evals:
            main = e.get("main") or e.get("without_system") or {}
            if isinstance(main.get(key), (int, float)):
                out[int(e.get("step", 0))] = float(main[key])
        return out
    pts = [(m["step"], m[key]) for m in job.metrics if isinstance(m.get(key), (int, float)) and "step" in m]
    out = {}
    for i in range(len(pts)):
        window = [v for _, v in pts[max(0, i - SMOOTH + 1) : i + 1] if not math.isnan(v)]
        if window:
            out[int(pts[i][0])] = sum(window) / len(window)
    return out


def write_plots(cells, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = []
    for c in cells:
        if c.axis not in axes_names:
            axes_names.append(c.axis)
    written = []
    for filename, title, source, key in FIGURES:
        fig, axs = plt.subplots(1, len(axes_names), figsize=(5.2 * len(axes_names), 3.6), squeeze=False)
        drew = False
        for ax, axis in zip(axs[0], axes_names, strict=True):
            for c in (c for c in cells if c.axis == axis):
                runs = [_series(j, source, key) for j in c.jobs if j.finished]
                runs = [r for r in runs if r]
                if not runs:
                    continue
                steps = sorted(set.intersection(*(set(r) for r in runs)))
                if not steps:
                    continue
                mean = [sum(r[s] for r in runs) / len(runs) for s in steps]
                (line,) = ax.plot(steps, mean, label=c.name, linewidth=1.4)
                if len(runs) > 1:
                    lo = [min(r[s] for r in runs) for s in steps]
                    hi = [max(r[s] for r in runs) for s in steps]
                    ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
                drew = True
            ax.set_title(f"{axis or 'runs'}: {title}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        if drew:
            fig.tight_layout()
            tmp = out_dir / f".{filename}.tmp.png"
            fig.savefig(tmp, dpi=90)
            tmp.replace(out_dir / filename)
            written.append(filename)
        plt.close(fig)
    return written
