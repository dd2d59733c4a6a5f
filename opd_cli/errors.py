"""User-facing errors: one line that names the problem and the fix, exit code 2.

Anything raised as `OpdError` is bad input (a config value, a path, a dataset), never a bug: the CLI
prints it without a traceback. Bugs stay ordinary exceptions with tracebacks. Configuration errors
(Hydra / OmegaConf) become such a line in `config.explain_config_exception`.
"""

from __future__ import annotations

import os
import sys

import click

EXIT_BAD_INPUT = 2


class OpdError(Exception):
    """Bad input a user can fix."""


class UsageError(OpdError):
    """A malformed command line or a path that is not what it should be."""


def debug_mode() -> bool:
    """`opd --debug` or HYDRA_FULL_ERROR=1: full tracebacks instead of the one-line message."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("OPD_DEBUG") == "1"


def exit_bad_input(message: str) -> None:
    """The one line on stderr, exit code 2."""
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)
