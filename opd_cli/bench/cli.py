"""`opd bench ...`: speed and memory benchmarks that print ratios measured in one run.

opd bench loss                 # chunked vs naive loss path at Qwen3 vocabulary size (V=151,936)
opd bench loss --quick         # a small size, seconds
"""

from __future__ import annotations

import click


@click.group("bench")
def bench_group() -> None:
    """Benchmarks (ratios measured in one run).

    \b
    Examples:
      opd bench loss
      opd bench loss --quick
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
    from opd_cli.bench.loss_bench import format_table, run_loss_bench
    from opd_cli.io import atomic_write_text

    if quick:
        vocab, hidden, tokens = 1000, 64, 256
    kwargs = {"vocab": vocab, "hidden": hidden, "tokens": tokens, "k": k}
    if chunk_size:
        kwargs["chunk_size"] = chunk_size
    table = format_table(run_loss_bench(**kwargs))
    click.echo(table)
    if out:
        atomic_write_text(out, table + "\n")
