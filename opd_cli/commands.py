"""Subcommands besides `run` and `doctor`, each defined next to the code it drives."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from opd_cli import rundir
from opd_cli.errors import OpdError


@click.command("eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
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
    from opd_cli.cli import compose, fail, prevalidate
    from opd_cli.io import atomic_write_json
    from opd_cli.stages.evaluate import evaluate_checkpoint, format_table

    rest = [o for o in overrides if not o.startswith("checkpoint=")]
    ckpt = [o.split("=", 1)[1] for o in overrides if o.startswith("checkpoint=")]
    try:
        if not ckpt:
            raise OpdError(
                "missing checkpoint=<model dir or testbed:name>, e.g. opd eval checkpoint=testbed:student_sft"
            )
        prevalidate(rest, multirun=False, writes=False)
        cfg = compose(rest)
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


@click.command("probe", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
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
    from opd_cli.cli import compose, fail, prevalidate
    from opd_cli.io import atomic_write_json
    from opd_cli.stages.probe import format_probe, run_probe

    try:
        prevalidate(list(overrides), multirun=False, writes=False)
        result = run_probe(compose(list(overrides)), n, seed)
    except OpdError as exc:
        fail(str(exc))
    atomic_write_json(out, result)
    click.echo(format_probe(result))
    click.echo(f"results: {out}")


@click.command("report")
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
    from opd_cli.cli import fail
    from opd_cli.report import build_report, markdown_table, matrix_rows

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
    click.echo(f"report: {(out or dirs[0]) / 'report.md'}")


@click.command("plan", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
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
    from opd_cli.cli import fail

    try:
        print_plans(list(overrides), multirun=False, prompt_tokens=prompt_tokens)
    except OpdError as exc:
        fail(str(exc))


def print_plans(overrides: list[str], multirun: bool, prompt_tokens: int = 512) -> None:
    """Compose every job of the command line, print its plan, raise PlanError if one does not fit."""
    from opd_cli.cli import compose, job_overrides, prevalidate
    from opd_cli.plan import check_fit, format_plan, memory_plan

    prevalidate(overrides, multirun, writes=False)
    plans = []
    for combo in job_overrides(overrides, multirun):
        cfg = compose(combo)
        if multirun:
            click.echo(f"job: {' '.join(combo)}")
        if cfg.stage == "opd" and cfg.stabilization.kind == "sft":  # the SFT stage runs first, on its own
            sft = memory_plan(compose([*combo, "stage=sft"]), prompt_tokens)
            click.echo("stabilization=sft, before OPD: " + format_plan(sft))
            plans.append(sft)
        plan = memory_plan(cfg, prompt_tokens)
        click.echo(format_plan(plan))
        plans.append(plan)
    for plan in plans:
        check_fit(plan)


def all_commands() -> list[click.Command]:
    from opd_cli.bench.cli import bench_group
    from opd_cli.testbed.cli import testbed_group

    return [bench_group, eval_cmd, plan_cmd, probe_cmd, report_cmd, testbed_group]
