"""Tasks: dataset rows, chat messages, verifiers and rule checkers.

Usage: ``task = make_task("arith", digits=3, rule="concise")``, ``rows = task.generate(1000, seed=0)``,
``task.verify(rows[0], "=12;=13;=06;A:632")`` -> ``Verdict(correct, well_formed, follows_rule, answer)``.
"""

from __future__ import annotations

from typing import Any

from opd_cli.tasks.arith import ArithTask
from opd_cli.tasks.base import Row, RuleChecker, Task, Verdict
from opd_cli.tasks.math import MathTask

TASKS: dict[str, type[Task]] = {"arith": ArithTask, "math": MathTask}


def make_task(name: str, **options: Any) -> Task:
    """Instantiate a registered task; unknown names and bad options raise ValueError."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(sorted(TASKS))}")
    try:
        return TASKS[name](**options)
    except TypeError as e:  # unexpected keyword
        raise ValueError(f"bad options for task {name!r}: {e}") from e


__all__ = ["TASKS", "ArithTask", "MathTask", "Row", "RuleChecker", "Task", "Verdict", "make_task"]
