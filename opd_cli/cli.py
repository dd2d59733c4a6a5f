"""The `opd` command line: click for the subcommands, Hydra for composing and sweeping run configs.

    opd run                                                  # OPD on the testbed (built on first use)
    opd run loss=topk_rkl_stopgrad teacher=rlvr seed=3 trainer.lr=1e-4
    opd run -m loss=topk_rkl,topk_rkl_stopgrad seed=0,1,2    # Hydra multirun sweep
    opd run --cfg job                                        # print the composed config
    opd doctor                                               # versions, devices, testbed state

Bad input (unknown group option, misspelled key, wrong type, invalid value) ends with one line on stderr
naming the key, the value and what is allowed, exit code 2, before any output directory is created.
`--debug` (or HYDRA_FULL_ERROR=1) shows full tracebacks instead.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import sys
from pathlib import Path

import click

from opd_cli import rundir
from opd_cli.errors import OpdError, UsageError
from opd_cli.grid import expand_grid

# Defaults that must be in place before vllm/wandb/tokenizers are imported anywhere.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
# Per-file progress bars of transformers/datasets/hub would drown opd's own progress and tables.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

EXIT_BAD_INPUT = 2
MAX_PREVALIDATED_JOBS = 2000


def conf_dir() -> Path:
    """The `conf/` tree: $OPD_CONF_DIR, else the repository's `conf/` next to the package."""
    env = os.environ.get("OPD_CONF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "conf"
    if not (path / "config.yaml").is_file():
        raise UsageError(
            f"config tree not found at {path}; set OPD_CONF_DIR to the directory holding config.yaml"
        )
    return path


def _debug() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("OPD_DEBUG") == "1"


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks (same as HYDRA_FULL_ERROR=1).")
def main(debug: bool) -> None:
    """opd: reproduce, diagnose and fix the failure modes of on-policy (self-)distillation.

    \b
    Examples:
      opd run                                    # OPD on the testbed, the embedded default
      opd run -m loss=topk_rkl,topk_rkl_stopgrad seed=0,1,2
      opd doctor
    """
    if debug:
        os.environ["HYDRA_FULL_ERROR"] = "1"
        os.environ["OPD_DEBUG"] = "1"
    quiet_loaded_libraries()


def quiet_loaded_libraries() -> None:
    """transformers reads HF_HUB_DISABLE_PROGRESS_BARS once, at import: when it was imported before this
    module (an embedding program, the test suite), its per-tensor "Loading weights" bars would still print."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1" and "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


# --------------------------------------------------------------------------------------------- opd run
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
    from hydra._internal.utils import get_args_parser

    def error(message: str) -> None:
        raise UsageError(
            f"opd run: {message}; overrides are key=value (e.g. trainer.lr=1e-4), flags: opd run --hydra-help"
        )

    parser = get_args_parser()
    parser.error = error
    parser.parse_args(args)


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """The cartesian product of sweep overrides (a,b / range() / glob()), as Hydra's basic sweeper runs it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

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
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from opd_cli.config import register_configs, validate

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
    import fcntl

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
    from omegaconf import OmegaConf

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
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(override).is_sweep_override()


def _with_run_dir(cfg, run_dir: Path):
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.hydra.run.dir = str(run_dir)
    return cfg


def prevalidate(overrides: list[str], multirun: bool, writes: bool = True) -> list[str]:
    """Fail fast, with one line, on anything Hydra or our validation would reject. With `writes`, also
    claim the output directory; returns the overrides to launch with (the claimed directory pinned)."""
    from opd_cli.errors import explain_config_exception

    try:
        for combo in job_overrides(overrides, multirun):
            compose(combo)
        return claim_output_dir(overrides, multirun) if writes else overrides
    except OpdError:
        raise
    except Exception as exc:  # noqa: BLE001 - every compose error becomes one line
        if _debug():
            raise
        raise UsageError(explain_config_exception(exc, overrides)) from exc


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
    from omegaconf import OmegaConf

    original = [o for o in OmegaConf.to_container(OmegaConf.load(saved)) if not o.startswith("resume=")]
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    kept = [o for o in original if o.split("=", 1)[0].lstrip("+~") not in keys]
    return (
        kept
        + [o for o in overrides if not o.startswith("resume=")]
        + [f"resume={run_dir.resolve()}", f"hydra.run.dir={run_dir.resolve()}"]
    )


def join_torchrun_group(args: list[str], overrides: list[str], multirun: bool) -> list[str]:
    """Under torchrun (WORLD_SIZE > 1): join the process group and give every rank rank 0's run
    directory; ranks > 0 write no Hydra files or logs. Unchanged args outside torchrun."""
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
    import torch

    cuda = cfg.trainer.device == "cuda" or (cfg.trainer.device == "auto" and torch.cuda.is_available())
    distributed.init_from_env("cuda" if cuda else "cpu")
    run_dir = distributed.broadcast_object(str(Path(cfg.hydra.run.dir).resolve()))
    extra = [f"hydra.run.dir={run_dir}"]
    if not distributed.is_main():
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return [*args, *extra]


@main.command(
    "run",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.pass_context
def run_cmd(ctx: click.Context) -> None:
    """Run one recipe (or a sweep with -m) composed from conf/ with Hydra overrides.

    \b
    Examples:
      opd run                                              # testbed OPD, the embedded default
      opd run loss=topk_rkl_stopgrad teacher=rlvr seed=3 trainer.lr=1e-4
      opd run -m loss=topk_rkl,topk_rkl_stopgrad seed=0,1,2
      opd run -m experiment=matrix seed=0,1,2 hydra/launcher=submitit_slurm
      opd run --cfg job                                    # print the composed config
      opd run experiment=qwen3_opd_8b_topk --dry-run       # the memory plan per device, no run
      opd run resume=outputs/2026-11-29/10-00-00-000000    # continue a killed run
    \b
    Groups: task, model, teacher, loss, stabilization, rollout, eval, logger, experiment.
    Outputs: outputs/<date>/<time>/ (multirun: multirun/<date>/<time>/<job>/) with .hydra/ (config),
    metrics.jsonl, checkpoints/, eval/, summary.json and the run log. Hydra's own help: opd run --hydra-help
    """
    args = list(ctx.args)
    if any(a in ("-h", "--help") for a in args):
        click.echo(ctx.get_help())
        return
    if "--hydra-help" in args:
        args = ["--help" if a == "--hydra-help" else a for a in args]
    if "--dry-run" in args:  # the memory plan only: compose, print, check the fit
        from opd_cli.commands import print_plans

        overrides, multirun = split_hydra_args([a for a in args if a != "--dry-run"])
        try:
            print_plans(overrides, multirun)
        except OpdError as exc:
            if _debug():
                raise
            fail(str(exc))
        return
    try:
        overrides, multirun = split_hydra_args(args)
        full = with_resume_overrides(overrides)
        if full != overrides:
            args = [a for a in args if a not in overrides] + full
            overrides = full
        expansion = expand_grid(overrides, multirun, conf_dir(), cell_choices)
        if expansion is not None:
            args = [a for a in args if a not in overrides] + expansion.overrides
            overrides = expansion.overrides
            picked = f" selected by {' '.join(expansion.filters)}" if expansion.filters else ""
            click.echo(
                f"grid {','.join(expansion.grids)}: {len(expansion.cells)} of {expansion.total} cells{picked}: "
                + ", ".join(expansion.cells),
                err=True,
            )
        if "--help" not in args and "--version" not in args:
            check_hydra_flags(args)
            writes = not ({"--cfg", "-c", "--info"} & set(args))
            # under torchrun only rank 0 claims the run directory; the others get it from rank 0
            from opd_cli import distributed

            follower = distributed.launched_by_torchrun() and os.environ.get("RANK", "0") != "0"
            pinned = prevalidate(overrides, multirun, writes=writes and not follower)
            args = [a for a in args if a not in overrides] + pinned
            overrides = pinned
            if writes:
                args = join_torchrun_group(args, overrides, multirun)
    except OpdError as exc:
        release_claims()
        if _debug():
            raise
        fail(str(exc))
    from opd_cli.hydra_app import launch

    try:
        code = launch(args, conf_dir(), multirun)
    finally:
        release_claims()
    sys.exit(code)


# ------------------------------------------------------------------------------------------ opd doctor
@main.command("doctor")
def doctor_cmd() -> None:
    """Report versions, devices and whether the testbed is built.

    \b
    Example:
      opd doctor
    """
    from opd_cli.doctor import doctor

    sys.exit(doctor())


def _register_optional_commands() -> None:
    """Subcommands that live in their own modules (each one's module docstring holds its examples)."""
    from opd_cli import commands

    for command in commands.all_commands():
        main.add_command(command)


_register_optional_commands()


if __name__ == "__main__":
    main()
