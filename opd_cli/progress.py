"""A rich progress bar for long loops, showing the key metrics of the latest step."""

from __future__ import annotations

import logging
import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

KEY_METRICS = (
    "loss",
    "rollout_accuracy",
    "response_length",
    "student_mass_in_support",
    "topk_overlap",
    "eval/main/accuracy",
)


log = logging.getLogger("opd")


class StepProgress:
    def __init__(self, total: int, *, start: int = 0, description: str = "train"):
        self.total, self.start, self.description = total, start, description
        # stderr so that stdout stays clean for results; plain lines when not a terminal (CI logs).
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(file=sys.stderr),
            disable=not sys.stderr.isatty() or os.environ.get("RANK", "0") != "0",  # rank 0 only
            transient=False,
        )
        self.task_id = None

    def __enter__(self) -> StepProgress:
        self.progress.__enter__()
        self.task_id = self.progress.add_task(
            self.description, total=self.total, completed=self.start, info=""
        )
        return self

    def update(self, step: int, metrics: dict) -> None:
        info = " ".join(
            f"{k.split('/')[-1]}={metrics[k]:.3g}"
            for k in KEY_METRICS
            if isinstance(metrics.get(k), (int, float))
        )
        self.progress.update(self.task_id, completed=step, info=info)
        if self.progress.disable and (step % max(1, self.total // 10) == 0 or step == self.total):
            log.info("%s step %d/%d %s", self.description, step, self.total, info)

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)
