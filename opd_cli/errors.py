"""User-facing errors: one line that names the problem and the fix, exit code 2.

Anything raised as `OpdError` is bad input (a config value, a path, a dataset), never a bug: the CLI
prints it without a traceback. Bugs stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations

import dataclasses
import re


class OpdError(Exception):
    """Bad input a user can fix."""


class UsageError(OpdError):
    """A malformed command line or a path that is not what it should be."""


def _schema_keys(full_key: str) -> list[str] | None:
    """Allowed keys at the parent of `full_key` in the structured config, if it is a known node."""
    from opd_cli.config import Config

    node = Config()
    for part in full_key.split(".")[:-1]:
        node = getattr(node, part, None)
        if not dataclasses.is_dataclass(node):
            return None
    return [f.name for f in dataclasses.fields(node)]


def explain_config_exception(exc: BaseException, overrides: list[str]) -> str:
    """Turn a Hydra/OmegaConf composition error into one line: key, bad value, what is allowed."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    if isinstance(exc, OpdError):
        return str(exc)
    if isinstance(exc, MissingConfigException) and exc.options is not None:
        m = re.search(r"Could not find '([^']+)'", str(exc))
        missing = m.group(1) if m else str(exc.missing_cfg_file)
        group, _, option = missing.rpartition("/")
        allowed = ", ".join(o for o in exc.options if not o.endswith("_schema"))
        return f"unknown option '{option}' for config group '{group}'; allowed: {allowed}"
    if isinstance(exc, OverrideParseException):
        return (
            f"cannot parse override: {str(exc).splitlines()[0]} (use key=value, e.g. trainer.lr=1e-4; quote "
            f"values with special characters: key='{{problem}};H:{{answer}}')"
        )
    cause = exc
    while cause is not None and not isinstance(
        cause, (ConfigKeyError, ConfigAttributeError, ValidationError)
    ):
        cause = cause.__cause__ or cause.__context__
    if (
        isinstance(cause, (ConfigKeyError, ConfigAttributeError))
        or "not in struct" in str(exc)
        or "not in '" in str(exc)
    ):
        key = getattr(cause, "full_key", None) or _key_from_message(str(exc))
        allowed = _schema_keys(key) if key else None
        hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
        return f"unknown config key '{key}'{hint}"
    if isinstance(cause, ValidationError):
        key = cause.full_key
        value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), None)
        expected = re.search(r"converted to (\w+)", str(cause))
        what = f"expected {expected.group(1).lower()}" if expected else str(cause).splitlines()[0]
        return f"{key}={value!r} has the wrong type: {what}"
    return str(exc).strip().splitlines()[0]


def _key_from_message(message: str) -> str | None:
    m = re.search(r"Could not override '([^']+)'", message) or re.search(r"Key '([^']+)'", message)
    return m.group(1) if m else None
