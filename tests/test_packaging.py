"""The package installs: a wheel of this checkout gives a working `opd run --cfg job` outside the repo.

Why the venv is built this way: a truly fresh venv would download GBs of torch / vLLM for every run of
the test. So the wheel is built with `pip wheel --no-deps --no-build-isolation` (no downloads), the venv
is created without dependencies, and its only extra is a `.pth` file listing the running interpreter's
site-packages: the dependencies resolve from there, but the `.pth` files *inside* that directory (among
them the editable install's finder, which maps `opd_cli` to a checkout) are not processed for a directory
added this way, so `opd_cli` can only come from the wheel installed with `--no-deps`. The test asserts
that it does, and runs the console script from a directory outside the repository, with no PYTHONPATH
and no OPD_CONF_DIR: the config tree must come from the wheel's package data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_packaged():
    """pyproject.toml lists the packages (conf/ is mapped in, which a find directive cannot do): a new
    subpackage must be listed, or the wheel silently lacks it."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "opd_cli").rglob("__init__.py")}
    assert listed == found | {"opd_cli.conf"}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OPD_CONF_DIR", "PYTHONHOME")}
    return {**env, "PYTHONNOUSERSITE": "1"}


def _run(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_wheel_installs_and_composes_outside_the_repo(tmp_path):
    src = tmp_path / "src"  # build from a copy: nothing (build/, *.egg-info) is written into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("conf", "opd_cli"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    dist = tmp_path / "dist"
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", src, "-w", dist],
        tmp_path,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = dist.glob("opd-*.whl")

    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = Path(
        _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path
        ).stdout.strip()
    )
    (site / "shared_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel], tmp_path
    )
    assert installed.returncode == 0, installed.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(
        [python, "-c", "import opd_cli.launch as l; print(l.__file__); print(l.conf_dir())"], elsewhere
    )
    assert where.returncode == 0, where.stderr
    module_file, conf = where.stdout.split()
    assert Path(module_file).is_relative_to(site), f"opd_cli came from {module_file}, not the wheel"
    assert Path(conf) == site / "opd_cli" / "conf"

    job = _run([venv / "bin" / "opd", "run", "--cfg", "job"], elsewhere)
    assert job.returncode == 0, job.stderr
    assert "stage: opd" in job.stdout and "name: arith" in job.stdout
    cell = _run([venv / "bin" / "opd", "run", "experiment=opd_naive_topk_k5", "--cfg", "job"], elsewhere)
    assert cell.returncode == 0, cell.stderr
    assert "name: opd_naive_topk_k5" in cell.stdout
    assert not list(elsewhere.iterdir()), "`--cfg job` wrote into the working directory"
