"""Everything between the `opd run` command line and a stage: composing and validating the config,
claiming the run directory, resume overrides, the data-parallel launch (torchrun or trainer.nproc) and
the Hydra job that runs the stage.

    opd run experiment=recipe                             # compose -> prevalidate -> claim -> Hydra job
    opd run resume=outputs/2026-11-29/10-00-00-000000     # the original overrides, its directory
    opd run trainer.nproc=2 rollout=hf                    # spawns 2 ranks here (run_data_parallel)
    torchrun --nproc_per_node=8 -m opd_cli.cli run trainer.device=cuda   # joins torchrun's group

Hydra owns the command line grammar, the output directories and the launchers (basic in-process by
default; submitit for SLURM via `hydra/launcher=submitit_slurm`). Each job writes `status.json`
(running -> ok | failed) so that `opd report` can show a failed job as failed rather than missing.

Imports: the functions that run a job (`_job`, the data-parallel launch, joining torchrun's group) import
the stages, torch and the testbed builder when they run, so that composing and checking a command line
(`opd --help`, `opd run --cfg job`, `opd plan`) never loads torch or transformers (tests/test_layout.py).

The config tree (`conf_dir`): $OPD_CONF_DIR, else the copy installed with the package
(`opd_cli/conf`, what a wheel ships), else the repository's `conf/` next to the package (a checkout).
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import hydra
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from opd_cli import rundir
from opd_cli.config import explain_config_exception, register_configs, validate
from opd_cli.errors import OpdError, UsageError, debug_mode

MAX_PREVALIDATED_JOBS = 2000


CONF_ENV = "OPD_CONF_DIR"
INSTALLED_CONF = Path(__file__).resolve().parent / "conf"  # package data of a wheel / `pip install .`
REPOSITORY_CONF = Path(__file__).resolve().parent.parent / "conf"  # a checkout (editable install)


def conf_dir() -> Path:
    """The `conf/` tree: $OPD_CONF_DIR, else the copy installed with the package (`opd_cli/conf`), else
    the repository's `conf/` next to the package."""
    env = os.environ.get(CONF_ENV)
    candidates = [Path(env)] if env else [INSTALLED_CONF, REPOSITORY_CONF]
    for path in candidates:
        if (path / "config.yaml").is_file():
            return path
    raise UsageError(
        f"config tree not found at {' or '.join(map(str, candidates))}; set {CONF_ENV} to the directory "
        f"holding config.yaml"
    )


# ------------------------------------------------------------------------------------ the command line
_HYDRA_FLAGS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--info",
    "--experimental-rerun",
}


def split_hydra_args(args: list[str]) -> tuple[list[str], bool]:
    """Return (overrides, multirun) from a Hydra command line."""
    overrides, multirun, skip = [], False, False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in _HYDRA_FLAGS_WITH_VALUE:
            skip = i + 1 < len(args) and not args[i + 1].startswith("-") and "=" not in args[i + 1]
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides, multirun


def check_hydra_flags(args: list[str]) -> None:
    """Hydra's own argparse prints a multi-line usage on a bad flag (`-x`, `--cfg nope`): one line instead."""

    def error(message: str) -> None:
        raise UsageError(
            f"opd run: {message}; overrides are key=value (e.g. trainer.lr=1e-4), flags: opd run --hydra-help"
        )

    parser = get_args_parser()
    parser.error = error
    parser.parse_args(args)


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """The cartesian product of sweep overrides (a,b / range() / glob()), as Hydra's basic sweeper runs it."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    axes = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    combos = list(itertools.islice(itertools.product(*axes), MAX_PREVALIDATED_JOBS))
    return [list(c) for c in combos]


def job_overrides(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Every job of a command line: the sweep of the command line and of `hydra.sweeper.params` set in
    the config (an experiment file's grid); the command line wins for a key set in both."""
    if not multirun:
        return [overrides]
    params = compose(expand_sweeps(overrides)[0]).hydra.sweeper.get("params") or {}
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    extra = [f"{key}={value}" for key, value in params.items() if key not in given]
    return expand_sweeps([*overrides, *extra])


def compose(overrides: list[str]):
    """Compose and validate one job's config with the Compose API (no output directory is created)."""
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    validate(cfg)
    return cfg


@functools.cache
def cell_choices(cell: str) -> dict[str, str]:
    """The config-group choices of one experiment preset (for grid slicing); composed once per process."""
    cfg = compose([f"experiment={cell}"])
    return {k: str(v) for k, v in cfg.hydra.runtime.choices.items()}


def check_run_dir_free(cfg) -> None:
    """An explicit hydra.run.dir that already holds a run is refused before Hydra rewrites its config."""
    run_dir = Path(cfg.hydra.run.dir)
    if rundir.holds_run(run_dir) and not cfg.resume and not cfg.overwrite:
        raise UsageError(
            f"{run_dir} already holds a run; pass resume={run_dir} to continue it, overwrite=true "
            f"to replace it, or choose another hydra.run.dir"
        )


_held_locks: list[int] = []  # descriptors of claimed directories, held (locked) until the process exits


def claim_dir(directory: Path, *, explicit: bool, key: str = "hydra.run.dir") -> Path:
    """Claim an output directory for this process: an exclusive, non-blocking `flock` on
    `<dir>/.opd.lock`, held until the process exits (the kernel drops it on any exit, SIGKILL included,
    so a killed run's directory can be resumed). A directory claimed by a live process is never shared:
    an explicit one is refused; a default (timestamped) one that collides gets a `-1`, `-2`... suffix."""
    for attempt in range(100):
        candidate = directory if attempt == 0 else directory.with_name(f"{directory.name}-{attempt}")
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            fd = os.open(candidate / rundir.LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise UsageError(
                f"cannot create the output directory {candidate} ({exc.strerror or exc}); set {key} "
                f"to a writable location"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if explicit:
                raise UsageError(
                    f"{candidate} is in use by another running opd process; wait for it to finish or "
                    f"choose another {key}"
                ) from None
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held_locks.append(fd)
        return candidate
    raise UsageError(f"could not claim a free output directory next to {directory}; set {key} explicitly")


def _overrides_key(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in overrides)


def claim_output_dir(overrides: list[str], multirun: bool) -> list[str]:
    """Resolve the run (or sweep) directory once, claim it, and pin it in the overrides, so that Hydra
    writes exactly the directory that was checked and claimed (`${now:}` would otherwise resolve again)."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    cfg = compose([o for o in overrides if not _is_sweep(o)] if multirun else overrides)
    directory = Path(OmegaConf.select(cfg, key)).expanduser().absolute()
    claimed = claim_dir(directory, explicit=_overrides_key(overrides, key), key=key)
    if not multirun:
        check_run_dir_free(cfg if claimed == directory else _with_run_dir(cfg, claimed))
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key] + [f"{key}={_quote(claimed)}"]


def _quote(path: Path) -> str:
    """A path as a Hydra override value: bare when plain, else single-quoted with escapes."""
    text = str(path)
    if re.fullmatch(r"[\w./:@+-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _is_sweep(override: str) -> bool:
    return OverridesParser.create().parse_override(override).is_sweep_override()


def _with_run_dir(cfg, run_dir: Path):
    with open_dict(cfg):
        cfg.hydra.run.dir = str(run_dir)
    return cfg


def prevalidate(overrides: list[str], multirun: bool, writes: bool = True) -> list[str]:
    """Fail fast, with one line, on anything Hydra or our validation would reject. With `writes`, also
    run the preflight checks of jobs with preflight=true and claim the output directory; returns the
    overrides to launch with (the claimed directory pinned)."""
    try:
        cfgs = [compose(combo) for combo in job_overrides(overrides, multirun)]
        if not writes:
            return overrides
        preflight_gate(cfgs)  # preflight=true: the pair checks, before the directory is claimed
        return claim_output_dir(overrides, multirun)
    except OpdError:
        raise
    except Exception as exc:  # noqa: BLE001 - every compose error becomes one line
        if debug_mode():
            raise
        raise UsageError(explain_config_exception(exc, overrides)) from exc


def preflight_jobs(overrides: list[str]) -> list[list[str]]:
    """`opd preflight`'s jobs: every job `opd run -m` would run (a grid preset expanded into its cells)."""
    from opd_cli.grid import expand_grid

    expansion = expand_grid(overrides, True, conf_dir(), cell_choices)
    prevalidate(expansion.overrides if expansion else overrides, multirun=True, writes=False)
    return job_overrides(expansion.overrides if expansion else overrides, multirun=True)


def preflight_gate(cfgs: list) -> None:
    """`opd run preflight=true`: part A of `opd preflight` for every such job, before anything is
    written; a fail raises OpdError (one line)."""
    wanted = [c for c in cfgs if c.preflight]
    if wanted:
        from opd_cli.stages.preflight import gate
        from opd_cli.testbed.build import ensure_for_config

        for cfg in wanted:
            ensure_for_config(cfg)
        gate(wanted)


def release_claims() -> None:
    """Unlock the directories this process claimed (the run is over; in-process callers run again)."""
    while _held_locks:
        os.close(_held_locks.pop())


def with_resume_overrides(overrides: list[str]) -> list[str]:
    """`resume=<run dir>` re-composes the original run's overrides and continues in its directory."""
    resume = [o.split("=", 1)[1] for o in overrides if o.startswith("resume=")]
    if not resume:
        return overrides
    run_dir = Path(resume[-1]).expanduser()
    saved = run_dir / rundir.OVERRIDES
    if not saved.is_file():
        raise UsageError(
            f"resume={run_dir}: not an opd run directory (no .hydra/overrides.yaml); pass the "
            f"directory printed by the run you want to continue"
        )
    original = [o for o in OmegaConf.to_container(OmegaConf.load(saved)) if not o.startswith("resume=")]
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    kept = [o for o in original if o.split("=", 1)[0].lstrip("+~") not in keys]
    return (
        kept
        + [o for o in overrides if not o.startswith("resume=")]
        + [f"resume={run_dir.resolve()}", f"hydra.run.dir={run_dir.resolve()}"]
    )


def torchrun_follower() -> bool:
    """A rank > 0 started by torchrun (WORLD_SIZE > 1, RANK > 0), known from its environment before the
    process group exists (and without importing torch, as distributed.py does)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0"


def join_torchrun_group(args: list[str], overrides: list[str], multirun: bool) -> list[str]:
    """Under torchrun (WORLD_SIZE > 1): join the process group and give every rank rank 0's run
    directory; ranks > 0 write no Hydra files or logs. Unchanged args outside torchrun."""
    import torch

    from opd_cli import distributed

    if not distributed.launched_by_torchrun():
        return args
    if multirun:
        raise UsageError(
            "torchrun runs one job on all its ranks; for a sweep of data-parallel jobs use "
            "opd run -m ... trainer.nproc=N (each job starts its own ranks)"
        )
    cfg = compose(overrides)
    if cfg.trainer.nproc not in (1, distributed.int_env("WORLD_SIZE")):
        raise UsageError(
            f"trainer.nproc={cfg.trainer.nproc} but torchrun started {distributed.int_env('WORLD_SIZE')} "
            f"ranks; drop trainer.nproc (torchrun sets the world size)"
        )
    cuda = cfg.trainer.device == "cuda" or (cfg.trainer.device == "auto" and torch.cuda.is_available())
    distributed.init_from_env("cuda" if cuda else "cpu")
    run_dir = distributed.broadcast_object(str(Path(cfg.hydra.run.dir).resolve()))
    extra = [f"hydra.run.dir={run_dir}"]
    if not distributed.is_main():
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return [*args, *extra]


# --------------------------------------------------------------------------------------- the Hydra job
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
    from opd_cli import distributed
    from opd_cli.stages import run_stage
    from opd_cli.testbed.build import ensure_for_config

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    if not distributed.is_main():  # a torchrun rank > 0: rank 0 owns the run directory
        validate(cfg)
        ensure_for_config(cfg)
        return run_stage(cfg, run_dir)
    rundir.write_status(run_dir, "running", job=hc.job.name, overrides=list(hc.overrides.task))
    started = time.monotonic()
    try:
        validate(cfg)
        if cfg.overwrite and not cfg.resume:
            rundir.clear(run_dir)
        ensure_for_config(cfg)  # a missing testbed is built here, before any rank starts
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
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    from opd_cli import distributed

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
    import torch

    from opd_cli import distributed
    from opd_cli.stages import run_stage

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
