"""Where the testbed lives and how `testbed:<name>` model specs resolve.

    resolve_model_path("testbed:student_sft")          # -> .../opd_cli/testbed/assets/student_sft
    resolve_model_path("Qwen/Qwen3-1.7B")              # -> unchanged

The testbed directory is the `testbed_dir` argument, else $OPD_TESTBED_DIR, else the checkpoints shipped
inside the package (`opd_cli/testbed/assets`, built by `opd testbed build`). This module only names
paths: a missing testbed is built on first use by the commands that need one (`build.ensure_for_config`,
called by `opd run` / `opd eval` / `opd probe` / `opd bench step` before a stage starts).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from opd_cli.errors import OpdError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
MANIFEST = "manifest.json"
MODEL_NAMES = ("student_base", "student_sft", "teacher_large", "teacher_rlvr", "opsd_base", "opsd_rlvr")
PREFIX = "testbed:"


def testbed_dir(testbed_dir: str | os.PathLike | None = None) -> Path:
    """The testbed directory: the argument, else $OPD_TESTBED_DIR, else ASSETS_DIR."""
    chosen = testbed_dir or os.environ.get("OPD_TESTBED_DIR") or ASSETS_DIR
    return Path(chosen).expanduser()


def load_manifest(directory: str | os.PathLike | None = None) -> dict | None:
    path = testbed_dir(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise OpdError(
            f"testbed manifest {path} is unreadable ({exc}); rebuild it with `opd testbed build --force`"
        ) from exc


def missing_models(directory: str | os.PathLike | None = None) -> list[str]:
    """Names of the testbed models whose directory (config.json) is missing; all of them without a manifest."""
    root = testbed_dir(directory)
    if load_manifest(root) is None:
        return list(MODEL_NAMES)
    return [n for n in MODEL_NAMES if not (root / n / "config.json").is_file()]


def model_dir(spec: str, directory: str | os.PathLike | None = None) -> str:
    """`testbed:<name>` -> `<testbed dir>/<name>`, built or not; other specs unchanged."""
    spec = str(spec)
    if not spec.startswith(PREFIX):
        return spec
    name = spec[len(PREFIX) :]
    if name not in MODEL_NAMES:
        raise OpdError(
            f"unknown testbed model {name!r} in {spec!r}; allowed: "
            + ", ".join(PREFIX + n for n in MODEL_NAMES)
        )
    return str(testbed_dir(directory) / name)


def resolve_model_path(spec: str, directory: str | os.PathLike | None = None) -> str:
    """`model_dir` of a model that must be there: a testbed model that is not built is an error naming
    `opd testbed build`."""
    path = model_dir(spec, directory)
    if str(spec).startswith(PREFIX) and Path(path).name in missing_models(directory):
        raise OpdError(
            f"testbed model {Path(path).name} is not built in {testbed_dir(directory)}; run `opd testbed "
            f"build` (opd run, eval, probe and bench step build it on first use)"
        )
    return path


def testbed_status(directory: str | os.PathLike | None = None) -> str:
    """One line for `opd doctor`: where the testbed is and whether it is complete."""
    root = testbed_dir(directory)
    manifest = load_manifest(root)
    if manifest is None:
        return f"not built at {root} (built on first use, or run `opd testbed build`)"
    missing = missing_models(root)
    if missing:
        return f"incomplete at {root}: missing {', '.join(missing)} (run `opd testbed build`)"
    return f"ok at {root} (seed {manifest.get('seed')}, config {str(manifest.get('config_hash', '?'))[:12]})"
