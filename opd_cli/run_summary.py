"""The few lines an `opd run` ends with: what happened to the student, readable without opening a file.

    opd run                      # ... ends with this summary

Greedy accuracy (the periodic evaluations) start -> final, the accuracy of the student's own T=1
training rollouts (first and last WINDOW steps), the collapse step or none, and the warning signs of the
paper's mechanisms from the first to the last WINDOW steps: the student's mass in the loss's top-K
support (mechanism 2's leak), top-K overlap with the teacher (mechanism 1's mismatch), response length
and truncation (length explosion), and the hedging-token rate ("wait", "maybe" loops). A sign is marked
"moved" past a display threshold (MOVED); the verdicts themselves are `opd report`'s.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from opd_cli import rundir, verdicts

WINDOW = 10  # training steps averaged at the start and at the end
# (metric, label, format, change that counts as moved: absolute, or relative when rel=True)
SIGNS = (
    ("student_mass_in_support", "student top-K mass", "{:.3f}", 0.05, False),
    ("topk_overlap", "top-K overlap", "{:.3f}", 0.10, False),
    ("response_length", "response length", "{:.1f}", 0.25, True),
    ("truncation_ratio", "truncation", "{:.2f}", 0.10, False),
    ("hedging_rate", "hedging rate", "{:.3f}", 0.02, False),
)


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), int | float) and not math.isnan(r[key])]
    return statistics.fmean(vals) if vals else None


def _moved(start: float, end: float, threshold: float, relative: bool) -> bool:
    change = abs(end - start)
    return change > threshold * max(abs(start), 1e-9) if relative else change > threshold


def summary_lines(run_dir: str | Path, summary: dict | None = None) -> list[str]:
    """The summary of the OPD run in `run_dir` as lines (no trailing results line)."""
    run_dir = Path(run_dir)
    if summary is None:
        summary = rundir.read_summary(run_dir)
    rows = rundir.read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/main/accuracy" in r]
    lines = []
    if evals:
        first, last = evals[0], evals[-1]
        best = max(evals, key=lambda r: r["eval/main/accuracy"])
        start, final = first["eval/main/accuracy"], last["eval/main/accuracy"]
        n = last.get("eval/main/n")
        lines.append(
            f"greedy accuracy{f' ({n} problems)' if n else ''}: {start:.3f} -> {final:.3f} "
            f"({final - start:+.3f}; best {best['eval/main/accuracy']:.3f} at step {best['step']})"
        )
        if len(evals) >= 2:
            fig = {
                "start_accuracy": start,
                "final_accuracy": final,
                "best_accuracy": best["eval/main/accuracy"],
                **verdicts.sampled_accuracy(train),
            }
            lines.append(f"verdict by opd report's rules: {verdicts.job_verdict(fig)}")
    if len(train) >= 2:
        w = min(WINDOW, len(train) // 2)
        head, tail = train[:w], train[-w:]
        s, e = _mean(head, "rollout_accuracy"), _mean(tail, "rollout_accuracy")
        if s is not None and e is not None:
            lines.append(
                f"sampled accuracy (T=1 rollouts, first/last {w} steps): {s:.3f} -> {e:.3f} ({e - s:+.3f})"
            )
        collapsed = summary.get("collapsed_at")
        # the online detector watches the training signals only: a run whose accuracy falls while its
        # rollouts stay well shaped (OPSD's shortcut to direct answers) never trips it, so the verdict
        # line below says what the accuracy did
        lines.append(
            f"collapse: at step {collapsed}"
            if collapsed is not None
            else f"collapse detector (truncation, top-K mass, repeats): not triggered in {len(train)} steps"
        )
        signs, moved = [], []
        for key, label, fmt, threshold, relative in SIGNS:
            s, e = _mean(head, key), _mean(tail, key)
            if s is None or e is None:
                continue
            flag = _moved(s, e, threshold, relative)
            signs.append(
                f"  {label:<19} {fmt.format(s):>7} -> {fmt.format(e):<7}{'  moved' if flag else ''}".rstrip()
            )
            if flag:
                moved.append(label)
        if signs:
            lines.append(
                f"warning signs, first -> last {w} steps: "
                + (f"moved: {', '.join(moved)}" if moved else "none moved")
            )
            lines.extend(signs)
    elif not evals:
        lines.append("no training steps logged")
    return lines


def format_summary(run_dir: str | Path, summary: dict | None = None, title: str = "opd run") -> str:
    """The summary block a run prints at its end, closed by the results path."""
    body = summary_lines(run_dir, summary)
    rule = "-" * 72
    return "\n".join([f"{title} summary {rule[: 72 - len(title) - 9]}", *body, f"results: {Path(run_dir)}"])
