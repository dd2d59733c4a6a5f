"""`opd bench matrix`: wall time of the testbed matrix on this machine, per cell and in total.

    opd bench matrix                                  # one seed of the whole grid, 2 jobs at a time
    opd bench matrix --seeds 0,1,2 --jobs 2           # what `make matrix` runs
    opd bench matrix --from multirun/matrix-...       # time an existing sweep instead of running one

The elapsed time of a sweep comes from its jobs: each job's status.json holds its own wall time
(`wall_s`) and was last written when the job ended, so start = mtime - wall_s.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from opd_cli import rundir
from opd_cli.verdicts import load_jobs

TARGET_MIN_PER_SEED = 20.0  # the target: one seed of the full matrix in under 20 minutes


@dataclass
class JobTime:
    cell: str
    seed: int | None
    status: str
    wall_s: float
    ended: float


def job_times(sweep: Path) -> list[JobTime]:
    out = []
    for job in load_jobs([sweep]):
        status = job.path / rundir.STATUS
        if job.wall_s is None or not status.is_file():
            continue
        out.append(JobTime(job.cell, job.seed, job.status, float(job.wall_s), status.stat().st_mtime))
    return out


def machine() -> str:
    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"torch {torch.__version__}, load average at report time {load}"
    )


def run_sweep(sweep: Path, seeds: str, jobs: int, extra: list[str]) -> float:
    cmd = [
        sys.executable,
        "-m",
        "opd_cli.cli",
        "run",
        "-m",
        "experiment=matrix",
        f"seed={seeds}",
        "hydra/launcher=joblib",
        f"hydra.launcher.n_jobs={jobs}",
        f"hydra.sweep.dir={sweep}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    subprocess.run(cmd, env=env, check=False)
    return time.monotonic() - start


def format_report(times: list[JobTime], measured_s: float | None, seeds: int, where: str) -> str:
    if not times:
        return f"no finished jobs with a wall time under {where}"
    elapsed = max(t.ended for t in times) - min(t.ended - t.wall_s for t in times)
    elapsed = measured_s if measured_s is not None else elapsed
    cells: dict[str, list[JobTime]] = {}
    for t in times:
        cells.setdefault(t.cell, []).append(t)
    lines = [
        f"Matrix wall time ({where}; {machine()})",
        "",
        "| cell | jobs | mean job wall (s) | min-max (s) | status |",
        "|---|---|---|---|---|",
    ]
    for cell, ts in cells.items():
        walls = [t.wall_s for t in ts]
        statuses = ", ".join(sorted({t.status for t in ts}))
        lines.append(
            f"| {cell} | {len(ts)} | {statistics.fmean(walls):.0f} | {min(walls):.0f}-{max(walls):.0f} | {statuses} |"
        )
    total_job = sum(t.wall_s for t in times)
    per_seed = elapsed / max(seeds, 1) / 60
    lines += [
        "",
        f"- jobs: {len(times)} over {seeds} seed(s); sum of job wall times {total_job / 60:.1f} min",
        f"- elapsed: {elapsed / 60:.1f} min ({'measured' if measured_s is not None else 'from job files'}); "
        f"per seed {per_seed:.1f} min = {per_seed / TARGET_MIN_PER_SEED:.2f}x the {TARGET_MIN_PER_SEED:.0f}-minute "
        f"target ({'met' if per_seed <= TARGET_MIN_PER_SEED else 'missed'})",
        f"- parallelism: sum of job walls / elapsed = {total_job / elapsed:.2f}",
    ]
    return "\n".join(lines)
