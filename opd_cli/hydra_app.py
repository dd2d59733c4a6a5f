"""Hydra entry point behind `opd run`: one job = one run directory with its config, metrics and status.

Hydra owns the command line grammar, the output directories and the launchers (basic in-process by
default; submitit for SLURM via `hydra/launcher=submitit_slurm`). Each job writes `status.json`
(running -> ok | failed) so that `opd report` can show a failed job as failed rather than missing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from opd_cli import distributed, rundir
from opd_cli.config import register_configs, validate
from opd_cli.errors import OpdError
from opd_cli.stages import run_stage

log = logging.getLogger("opd")

# (run_dir, status, error) of every job of a launch. Jobs may run in other processes (joblib, submitit
# local), so each job appends one JSON line to the file named by $OPD_OUTCOMES, which `launch` reads back.
OUTCOMES_ENV = "OPD_OUTCOMES"


def _record(run_dir: Path, status: str, error: str | None) -> None:
    path = os.environ.get(OUTCOMES_ENV)
    if path:
        line = json.dumps({"run_dir": str(run_dir), "status": status, "error": error}) + "\n"
        with open(path, "a") as f:  # one short O_APPEND write per job: no interleaving
            f.write(line)


def _read_outcomes(path: Path) -> list[tuple[Path, str, str | None]]:
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            d = json.loads(line)
        except ValueError:
            continue
        out.append((Path(d["run_dir"]), d["status"], d["error"]))
    return out


def _job(cfg: DictConfig) -> dict | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    if not distributed.is_main():  # a torchrun rank > 0: rank 0 owns the run directory
        validate(cfg)
        return run_stage(cfg, run_dir)
    rundir.write_status(run_dir, "running", job=hc.job.name, overrides=list(hc.overrides.task))
    started = time.monotonic()
    try:
        validate(cfg)
        if cfg.overwrite and not cfg.resume:
            rundir.clear(run_dir)
        if cfg.trainer.nproc > 1 and not distributed.launched_by_torchrun():
            summary = run_data_parallel(cfg, run_dir)
        else:
            summary = run_stage(cfg, run_dir)
    except OpdError as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.error("run failed: %s", message)
        rundir.write_status(run_dir, "failed", message, wall_s=round(time.monotonic() - started, 1))
        _record(run_dir, "failed", message)
        if multirun:
            return None
        if not rundir.has_outputs(run_dir):  # failed during setup: leave nothing half-written behind
            logging.shutdown()
            shutil.rmtree(run_dir, ignore_errors=True)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        log.error("run crashed: %s\n%s", message, traceback.format_exc())
        rundir.write_status(run_dir, "failed", message, wall_s=round(time.monotonic() - started, 1))
        _record(run_dir, "failed", message)
        if multirun:
            return None
        raise
    rundir.write_status(run_dir, "ok", None, summary=summary, wall_s=round(time.monotonic() - started, 1))
    _record(run_dir, "ok", None)
    return summary


def launch(args: list[str], conf_dir: Path, multirun: bool) -> int:
    """Run Hydra's app with `args` (overrides and flags); return the process exit code."""
    register_configs()
    argv = sys.argv
    sys.argv = ["opd run", *args]
    fd, outcomes_file = tempfile.mkstemp(prefix="opd-outcomes-", suffix=".jsonl")
    os.close(fd)
    previous = os.environ.get(OUTCOMES_ENV)
    os.environ[OUTCOMES_ENV] = outcomes_file
    try:
        hydra.main(config_path=str(conf_dir), config_name="config", version_base="1.3")(_job)()
        outcomes = _read_outcomes(Path(outcomes_file))
    finally:
        sys.argv = argv
        Path(outcomes_file).unlink(missing_ok=True)
        if previous is None:
            os.environ.pop(OUTCOMES_ENV, None)
        else:
            os.environ[OUTCOMES_ENV] = previous
    failed = [o for o in outcomes if o[1] == "failed"]
    if multirun and outcomes:
        print(
            f"multirun: {len(outcomes) - len(failed)} ok, {len(failed)} failed; "
            f"outputs in {outcomes[0][0].parent}"
        )
        for run_dir, _, error in failed:
            print(f"  failed: {run_dir}: {error}", file=sys.stderr)
    return 1 if failed else 0


def resolved_config(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def run_data_parallel(cfg: DictConfig, run_dir: Path) -> dict:
    """`trainer.nproc=N` without torchrun: start N ranks on this machine (one process group, gloo on CPU,
    nccl on GPUs), each running the stage; rank 0 writes the run directory. Returns rank 0's summary."""
    container = OmegaConf.to_container(cfg, resolve=True)
    try:
        distributed.spawn(cfg.trainer.nproc, _rank_main, container, str(run_dir))
    except ProcessRaisedException as exc:
        last = str(exc).strip().splitlines()[-1]
        kind, _, message = last.partition(": ")
        if kind.rsplit(".", 1)[-1] in ("OpdError", "UsageError", "ConfigError", "DataError", "PlanError"):
            raise OpdError(message) from exc
        raise RuntimeError(f"a data-parallel rank failed: {last}") from exc
    except ProcessExitedException as exc:
        raise OpdError(
            f"a data-parallel rank exited ({exc}); see {run_dir}/{rundir.LOG} (out of memory? lower "
            f"trainer.prompts_per_step or trainer.nproc)"
        ) from exc
    return json.loads((Path(run_dir) / rundir.SUMMARY).read_text())


def _rank_main(container: dict, run_dir: str) -> None:
    """One rank started by run_data_parallel: join the group, run the stage, leave the group."""
    cfg = OmegaConf.create(container)
    if distributed.rank() == 0:  # the parent's Hydra log file receives rank 0's log
        handler = logging.FileHandler(Path(run_dir) / rundir.LOG)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
    wants_cuda = cfg.trainer.device == "cuda" or (cfg.trainer.device == "auto" and torch.cuda.is_available())
    distributed.init_from_env("cuda" if wants_cuda else "cpu")
    try:
        run_stage(cfg, Path(run_dir))
    finally:
        distributed.shutdown()
