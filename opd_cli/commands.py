"""Subcommands besides `run` and `doctor`, each defined next to the code it drives."""

from __future__ import annotations

import click


def all_commands() -> list[click.Command]:
    from opd_cli.bench.cli import bench_group

    return [bench_group]
