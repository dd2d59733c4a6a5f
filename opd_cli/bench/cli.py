"""`opd bench ...`: speed and memory benchmarks that print ratios measured in one run.

opd bench loss                 # chunked vs naive loss path at Qwen3 vocabulary size (V=151,936)
opd bench loss --quick         # a small size, seconds
opd bench matrix               # wall time of one seed of the testbed matrix
opd bench step                 # one OPD step: opd (vLLM, HF rollouts) vs TRL's GKDTrainer, same work

Each command imports its bench module when it runs (they load torch, the stages, TRL), so `opd --help`
does not.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from opd_cli.errors import OpdError
from opd_cli.errors import exit_bad_input as fail
from opd_cli.io import atomic_write_text


@click.group("bench")
def bench_group() -> None:
    """Benchmarks (ratios measured in one run).

    \b
    Examples:
      opd bench loss
      opd bench loss --quick
      opd bench step --quick
      opd bench matrix --from multirun/matrix-20261129-055407
    """


@bench_group.command("loss")
@click.option("--vocab", type=int, default=151936, show_default=True)
@click.option("--hidden", type=int, default=2048, show_default=True)
@click.option("--tokens", type=int, default=4096, show_default=True)
@click.option("--k", type=int, default=20, show_default=True)
@click.option("--chunk-size", type=int, default=None, help="Tokens per chunk (default: the bench's own).")
@click.option("--quick", is_flag=True, help="Tiny sizes (V=1000, H=64, 256 tokens): a smoke run.")
@click.option(
    "--out", type=click.Path(dir_okay=False), default=None, help="Also write the Markdown table here."
)
def bench_loss(
    vocab: int, hidden: int, tokens: int, k: int, chunk_size: int | None, quick: bool, out: str | None
) -> None:
    """Peak memory and time of forward+backward: naive full-logits path vs chunked path.

    \b
    Example:
      opd bench loss --out experiments/loss_bench_table.md
    """
    from opd_cli.bench import loss_bench

    if quick:
        vocab, hidden, tokens = 1000, 64, 256
    kwargs = {"vocab": vocab, "hidden": hidden, "tokens": tokens, "k": k}
    if chunk_size:
        kwargs["chunk_size"] = chunk_size
    table = loss_bench.format_table(loss_bench.run_loss_bench(**kwargs))
    _emit(table, out)


@bench_group.command("step")
@click.option("--engines", default="vllm,hf,trl", show_default=True, help="Contenders: vllm, hf (opd), trl.")
@click.option("--batch", type=int, default=64, show_default=True, help="Prompts per step (1 sample each).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--rounds", type=int, default=3, show_default=True, help="Alternating turns per contender.")
@click.option("--steps", type=int, default=3, show_default=True, help="Timed steps per turn.")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads, the same for all.")
@click.option("--quick", is_flag=True, help="8 prompts x 16 tokens, 1 round of 1 step: a smoke run.")
@click.option(
    "--out", type=click.Path(dir_okay=False), default=None, help="Also write the Markdown table here."
)
def bench_step(
    engines: str,
    batch: int,
    max_new_tokens: int,
    rounds: int,
    steps: int,
    threads: int,
    quick: bool,
    out: str | None,
) -> None:
    """Steps/s and tokens/s of one OPD step (testbed student_sft <- teacher_large, reverse KL on full
    logits, one AdamW step): opd with vLLM and HF rollouts vs TRL's GKDTrainer, alternating in one
    process, with opd's rollout / teacher / learner / weight-sync split.

    \b
    Example:
      opd bench step --out experiments/bench_step_table.md
    """
    from opd_cli.bench import step_bench

    chosen = tuple(e.strip() for e in engines.split(",") if e.strip())
    if not chosen or set(chosen) - set(step_bench.ENGINES):
        fail(f"--engines={engines!r}: choose from {', '.join(step_bench.ENGINES)} (comma-separated)")
    if min(batch, max_new_tokens, rounds, steps, threads) < 1:
        fail("--batch, --max-new-tokens, --rounds, --steps and --threads must be >= 1")
    sizes = {"batch": batch, "max_new_tokens": max_new_tokens, "rounds": rounds, "steps": steps}
    if quick:
        sizes = dict(step_bench.QUICK)
    try:
        result = step_bench.run_step_bench(chosen, threads=threads, **sizes)
    except OpdError as exc:
        fail(str(exc))
    table = step_bench.format_table(result)
    _emit(table, out)


@bench_group.command("matrix")
@click.option("--seeds", default="0", show_default=True, help="Hydra sweep value for seed, e.g. 0,1,2.")
@click.option("--jobs", type=int, default=2, show_default=True, help="Jobs at a time (joblib launcher).")
@click.option(
    "--from",
    "from_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Time an existing matrix sweep instead of running one.",
)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the table here.")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def bench_matrix(
    seeds: str, jobs: int, from_dir: Path | None, out: str | None, overrides: tuple[str, ...]
) -> None:
    """Wall time of the testbed matrix (target: one seed in under 20 minutes on 2 cores).

    \b
    Examples:
      opd bench matrix
      opd bench matrix --from multirun/matrix-20261129-055407 --out experiments/bench_matrix.md
    """
    from opd_cli.bench import matrix_bench

    measured = None
    if from_dir is None:
        from_dir = Path("multirun") / time.strftime("bench-matrix-%Y%m%d-%H%M%S")
        measured = matrix_bench.run_sweep(from_dir, seeds, jobs, list(overrides))
    try:
        times = matrix_bench.job_times(from_dir)
    except OpdError as exc:
        fail(str(exc))
    n_seeds = len({t.seed for t in times}) or 1
    table = matrix_bench.format_report(times, measured, n_seeds, str(from_dir))
    _emit(table, out)


def _emit(table: str, out: str | Path | None) -> None:
    """Print a benchmark's Markdown table, and write it (atomically) to `out` when given."""
    click.echo(table)
    if out:
        atomic_write_text(out, table + "\n")
