"""The `opd` command line: click for the subcommands, Hydra for composing and sweeping run configs.

    opd run                                                  # OPD on the testbed (built on first use)
    opd run loss=topk_rkl_stopgrad teacher=rlvr seed=3 trainer.lr=1e-4
    opd run -m loss=topk_rkl,topk_rkl_stopgrad seed=0,1,2    # Hydra multirun sweep
    opd run --cfg job                                        # print the composed config
    opd doctor                                               # versions, devices, testbed state
    opd eval checkpoint=testbed:student_sft                  # evaluate a checkpoint
    opd probe teacher=large                                  # the prefix probe (mechanism 1)
    opd probe-pi experiment=opsd_answer_pi                   # the PI-dependence probe (mechanism 3)
    opd report multirun/2026-11-29/10-00-00-000000           # the matrix table, verdicts and plots
    opd plan experiment=qwen3_opd_8b_topk                    # the memory plan per device
    opd preflight experiment=matrix                          # pair checks, mechanisms, prediction per cell
    opd teacher serve                                        # vLLM's server for the recipe's teacher
    opd gpu-check --out experiments/gpu_check                # the CUDA acceptance run (tiny on a CPU)

This file holds the click commands only; what happens between a command line and a stage (composing,
prevalidation, run-directory claiming, resume, the data-parallel launch, the Hydra job) is launch.py.

Bad input (unknown group option, misspelled key, wrong type, invalid value) ends with one line on stderr
naming the key, the value and what is allowed, exit code 2, before any output directory is created.
`--debug` (or HYDRA_FULL_ERROR=1) shows full tracebacks instead.
"""

from __future__ import annotations

import os
import sys
import time

# Defaults that must be in place before vllm/wandb/tokenizers are imported anywhere.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
# Per-file progress bars of transformers/datasets/hub would drown opd's own progress and tables.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# The defaults above come before anything can import transformers / vLLM / wandb. The commands that run a
# model (eval, probe, run's job, bench, testbed build) import torch and the stages when they run, so that
# `opd --help`, `opd run --cfg job`, `opd report` and `opd plan` start without them (tests/test_layout.py).
from pathlib import Path  # noqa: E402

import click  # noqa: E402

from opd_cli import launch, rundir  # noqa: E402
from opd_cli.bench.cli import bench_group  # noqa: E402
from opd_cli.doctor import doctor  # noqa: E402
from opd_cli.errors import OpdError, debug_mode, exit_bad_input  # noqa: E402
from opd_cli.gpu_check import gpu_check_cmd  # noqa: E402
from opd_cli.grid import expand_grid  # noqa: E402
from opd_cli.io import atomic_write_json  # noqa: E402
from opd_cli.plan import check_fit, format_plan, memory_plan  # noqa: E402
from opd_cli.quiet import quiet_third_party  # noqa: E402
from opd_cli.report import build_report, markdown_table, matrix_rows  # noqa: E402
from opd_cli.teacher_server.serve import teacher_group  # noqa: E402
from opd_cli.testbed.cli import testbed_group  # noqa: E402

fail = exit_bad_input


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
    quiet_third_party()


# --------------------------------------------------------------------------------------------- opd run
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
        overrides, multirun = launch.split_hydra_args([a for a in args if a != "--dry-run"])
        try:
            print_plans(overrides, multirun)
        except OpdError as exc:
            if debug_mode():
                raise
            fail(str(exc))
        return
    try:
        overrides, multirun = launch.split_hydra_args(args)
        full = launch.with_resume_overrides(overrides)
        if full != overrides:
            args = [a for a in args if a not in overrides] + full
            overrides = full
        expansion = expand_grid(overrides, multirun, launch.conf_dir(), launch.cell_choices)
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
            launch.check_hydra_flags(args)
            writes = not ({"--cfg", "-c", "--info"} & set(args))
            # under torchrun only rank 0 claims the run directory; the others get it from rank 0
            pinned = launch.prevalidate(overrides, multirun, writes=writes and not launch.torchrun_follower())
            args = [a for a in args if a not in overrides] + pinned
            overrides = pinned
            if writes:
                args = launch.join_torchrun_group(args, overrides, multirun)
    except OpdError as exc:
        launch.release_claims()
        if debug_mode():
            raise
        fail(str(exc))
    try:
        code = launch.launch(args, launch.conf_dir(), multirun)
    finally:
        launch.release_claims()
    sys.exit(code)


# ------------------------------------------------------------------------------------------ opd doctor
@main.command("doctor")
def doctor_cmd() -> None:
    """Report versions, devices and whether the testbed is built.

    \b
    Example:
      opd doctor
    """
    sys.exit(doctor())


# ------------------------------------------------------------------------------- eval, probe, report, plan
@main.command("eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option("--engine", type=click.Choice(["vllm", "hf"]), default="vllm", show_default=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="JSON output (default: <run dir>/eval/<checkpoint>.json, or ./eval/<checkpoint>.json).",
)
def eval_cmd(overrides: tuple[str, ...], engine: str, out: str | None) -> None:
    """Evaluate a checkpoint (Hugging Face format) on the configured task: greedy and sampled accuracy,
    length, truncation, and system-prompt internalization for rule tasks.

    \b
    Examples:
      opd eval checkpoint=testbed:student_sft
      opd eval checkpoint=outputs/2026-11-29/10-00-00-000000/checkpoints/step_000100 eval.samples=8
      opd eval checkpoint=testbed:opsd_base task=arith_concise --engine hf
    """
    from opd_cli.stages.evaluate import evaluate_checkpoint, format_table
    from opd_cli.testbed.build import ensure_for_config

    rest = [o for o in overrides if not o.startswith("checkpoint=")]
    ckpt = [o.split("=", 1)[1] for o in overrides if o.startswith("checkpoint=")]
    try:
        if not ckpt:
            raise OpdError(
                "missing checkpoint=<model dir or testbed:name>, e.g. opd eval checkpoint=testbed:student_sft"
            )
        launch.prevalidate(rest, multirun=False, writes=False)
        cfg = launch.compose(rest)
        ensure_for_config(cfg, ckpt[-1])
        result = evaluate_checkpoint(cfg, ckpt[-1], engine)
    except OpdError as exc:
        fail(str(exc))
    path = Path(ckpt[-1])
    default_dir = (
        path.parent.parent / rundir.EVAL if path.parent.name == rundir.CHECKPOINTS else Path(rundir.EVAL)
    )
    target = Path(out) if out else default_dir / f"{path.name.replace(':', '_')}.json"
    atomic_write_json(target, result)
    click.echo(format_table(result))
    click.echo(f"results: {target}")
    sys.exit(0)


@main.command("probe", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option("-n", "--num", "n", type=int, default=200, show_default=True, help="Problems to probe.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default="probe.json", show_default=True)
def probe_cmd(overrides: tuple[str, ...], n: int, seed: int, out: str) -> None:
    """Mechanism 1: the teacher continues the student's prefixes; accuracy and format vs its own answers.

    \b
    Examples:
      opd probe teacher=large                # teacher_large on student_sft prefixes (testbed)
      opd probe teacher=rlvr -n 100 --out experiments/probe_rlvr.json
    """
    from opd_cli.stages.probe import format_probe, run_probe
    from opd_cli.testbed.build import ensure_for_config

    try:
        launch.prevalidate(list(overrides), multirun=False, writes=False)
        cfg = launch.compose(list(overrides))
        ensure_for_config(cfg)
        result = run_probe(cfg, n, seed)
    except OpdError as exc:
        fail(str(exc))
    atomic_write_json(out, result)
    click.echo(format_probe(result))
    click.echo(f"results: {out}")


@main.command("probe-pi", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option("-n", "--num", "n", type=int, default=200, show_default=True, help="Student rollouts to score.")
@click.option("--samples", type=int, default=4, show_default=True, help="I' samples per rollout and source.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default="pi_probe.json", show_default=True)
def probe_pi_cmd(overrides: tuple[str, ...], n: int, samples: int, seed: int, out: str) -> None:
    """Mechanism 3: how much an OPSD teacher depends on PI the student cannot supply (KL to I' and q_bar).

    \b
    Examples:
      opd probe-pi experiment=opsd_answer_pi -n 200
      opd probe-pi experiment=opsd_system_rule -n 200 --out experiments/pi_system.json
    """
    from opd_cli.stages.pi_probe import format_pi_dependence, pi_dependence
    from opd_cli.testbed.build import ensure_for_config

    try:
        launch.prevalidate(list(overrides), multirun=False, writes=False)
        cfg = launch.compose(list(overrides))
        ensure_for_config(cfg)
        result = pi_dependence(cfg, n, seed, samples)
    except OpdError as exc:
        fail(str(exc))
    atomic_write_json(out, result)
    click.echo(format_pi_dependence(result))
    click.echo(f"results: {out}")


@main.command("report")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where report.md/.html/.json and the PNGs go (default: the first directory).",
)
@click.option("--no-plots", is_flag=True, help="Skip the PNG curves.")
def report_cmd(dirs: tuple[Path, ...], out: Path | None, no_plots: bool) -> None:
    """Summarize a sweep: matrix table (mean ± sd over seeds), verdict per cell vs the paper's, plots.

    \b
    Examples:
      opd report multirun/2026-11-29/10-00-00-000000
      opd report multirun/seed0 multirun/seed1 --out experiments/matrix
    """
    try:
        report, _ = build_report(list(dirs), out or dirs[0], plots=not no_plots)
    except OpdError as exc:
        fail(str(exc))
    header, rows = matrix_rows(report.cells)
    keep = [
        header.index(h)
        for h in ("cell", "seeds", "final acc", "change", "verdict (per seed)", "paper", "match")
    ]
    click.echo(markdown_table([header[i] for i in keep], [[r[i] for i in keep] for r in rows]))
    failed = [j for j in report.jobs if j.status == "failed"]
    for j in failed:
        click.echo(f"failed: {j.path}: {j.error}", err=True)
    judged = [c for c in report.cells if c.match is not None]
    missed = [c.name for c in judged if not c.match]
    click.echo(
        f"paper verdict reproduced in {sum(1 for c in judged if c.match)} of {len(judged)} cells with a "
        f"verdict"
        + (f"; not reproduced: {', '.join(missed)}" if missed else "")
        + f" ({len(report.jobs)} jobs, {len(failed)} failed)"
    )
    click.echo(f"report: {(out or dirs[0]) / 'report.md'} (also report.html, report.json and the PNG curves)")


@main.command("plan", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option("--prompt-tokens", type=int, default=512, show_default=True, help="Assumed prompt length.")
def plan_cmd(overrides: tuple[str, ...], prompt_tokens: int) -> None:
    """Print the memory plan of a recipe per device (weights, gradients, Adam, activations, logits,
    vLLM KV cache) from the models' config.json; exit 2 when it does not fit the device memory.

    \b
    Examples:
      opd plan experiment=qwen3_opd_8b_topk
      opd plan experiment=qwen3_opd_8b_topk trainer.device_memory_gb=96 trainer.nproc=8
    """
    try:
        print_plans(list(overrides), multirun=False, prompt_tokens=prompt_tokens)
    except OpdError as exc:
        fail(str(exc))


def print_plans(overrides: list[str], multirun: bool, prompt_tokens: int = 512) -> None:
    """Compose every job of the command line, print its plan, raise PlanError if one does not fit."""
    launch.prevalidate(overrides, multirun, writes=False)
    plans = []
    for combo in launch.job_overrides(overrides, multirun):
        cfg = launch.compose(combo)
        if multirun:
            click.echo(f"job: {' '.join(combo)}")
        if cfg.stage == "opd" and cfg.stabilization.kind == "sft":  # the SFT stage runs first, on its own
            sft = memory_plan(launch.compose([*combo, "stage=sft"]), prompt_tokens)
            click.echo("stabilization=sft, before OPD: " + format_plan(sft))
            plans.append(sft)
        plan = memory_plan(cfg, prompt_tokens)
        click.echo(format_plan(plan))
        plans.append(plan)
    for plan in plans:
        check_fit(plan)


# --------------------------------------------------------------------------------------- opd preflight
@main.command("preflight", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--rollouts",
    type=click.IntRange(min=0),
    default=32,
    show_default=True,
    help="Part B: student rollouts per recipe (0: part A).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("preflight"),
    show_default=True,
    help="Where preflight.json and preflight.md go (each written atomically).",
)
@click.option(
    "--pilot-steps",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Part C: run the recipe's first N training steps (temp dir) and read the warning signs' trends.",
)
@click.option(
    "--against",
    type=click.Path(path_type=Path),
    default=None,
    help="Calibration: compare the predictions with a matrix report.json (opd report); writes calibration.md.",
)
def preflight_cmd(
    overrides: tuple[str, ...], rollouts: int, out: Path, pilot_steps: int, against: Path | None
) -> None:
    """Before training: pair compatibility (part A, exit 2 on any fail), the mechanism measurements on
    the student's own rollouts (part B), an optional pilot (part C) and the prediction (part D:
    improves / stable / degrades / collapses, the mechanism, a confidence, the fix), per recipe; a grid
    preset gives one row per cell, ranked.

    \b
    Examples:
      opd preflight                                  # the default recipe on the testbed
      opd preflight teacher=self_answer              # an OPSD recipe (its PI fields are checked)
      opd preflight experiment=matrix                # one row per cell of the grid
      opd preflight experiment=qwen3_opd_8b_topk --rollouts 0   # part A only
      opd preflight experiment=opd_naive_topk_k5 --pilot-steps 30
      opd preflight experiment=matrix seed=0 --against experiments/matrix/report.json   # calibration
    """
    from opd_cli.stages import preflight
    from opd_cli.stages.predict import calibrate, check_against, read_report
    from opd_cli.testbed.build import ensure_for_config

    started = time.monotonic()
    try:
        report = read_report(against) if against is not None else None
        jobs = launch.preflight_jobs(list(overrides))
        cfgs = [launch.compose(combo) for combo in jobs]
        names = [
            c.cell.name if c.cell.name != "default" else (" ".join(j) or "default")
            for j, c in zip(jobs, cfgs, strict=True)
        ]
        if report is not None:
            check_against(names, report)
        for cfg in cfgs:
            ensure_for_config(cfg)
        click.echo(
            f"preflight budget: {len(cfgs)} recipe(s) x (part A + {rollouts} student rollouts of <= "
            f"{cfgs[0].rollout.max_new_tokens} tokens, scored by the teacher"
            + (f"; {pilot_steps} training steps of the recipe" if pilot_steps else "")
            + f"); {preflight.budget(cfgs[0], rollouts)['fraction_of_run_rollouts']:.1%} of one run's rollouts",
            err=True,
        )
        results = []
        for combo, cfg, name in zip(jobs, cfgs, names, strict=True):
            result = preflight.preflight_recipe(cfg, name, combo, rollouts, pilot_steps)
            click.echo(preflight.check_table(result))
            results.append(result)
        command = "opd preflight " + " ".join([*overrides, f"--rollouts {rollouts}"])
        command += f" --pilot-steps {pilot_steps}" if pilot_steps else ""
        calibration = None
        if report is not None:
            command += f" --against {against}"
            records = [r.to_json() for r in results]
            calibration = calibrate(records, report, against, command_s=time.monotonic() - started)
    except OpdError as exc:
        fail(str(exc))
    click.echo(preflight.markdown(*preflight.summary_rows(results)))
    click.echo("\nprediction (ranked):")
    click.echo(preflight.markdown(*preflight.prediction_rows(results)))
    preflight.write_outputs(out, results, command, calibration)
    if calibration is not None:
        for seed, c in calibration["seeds"].items():
            click.echo(
                f"calibration seed {seed}: {c['hits']} of {c['cells']} cells right; compute "
                + (
                    f"{100 * c['fraction']:.1f}% of one matrix seed"
                    if c["fraction"] is not None
                    else "unknown"
                )
            )
        click.echo(f"calibration: {out / 'calibration.md'}")
    click.echo(f"results: {out / 'preflight.json'} and {out / 'preflight.md'}")
    failed = [(r.recipe, c) for r in results for c in r.failed]
    if failed:
        recipe, check = failed[0]
        fail(f"preflight: {len(failed)} check(s) failed; first: {recipe}: {check.line()}")


main.add_command(bench_group)
main.add_command(gpu_check_cmd)
main.add_command(teacher_group)
main.add_command(testbed_group)


if __name__ == "__main__":
    main()
