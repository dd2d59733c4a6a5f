"""`opd testbed ...`: build the testbed and show what it holds.

opd testbed build                  # into the package's assets (what `testbed:<name>` resolves to)
opd testbed build --out /tmp/tb --force
opd testbed status                 # the manifest as a table; exit 1 if anything is missing
"""

from __future__ import annotations

import sys

import click

from opd_cli.testbed.paths import load_manifest, missing_models, testbed_dir

COLUMNS = (
    "accuracy",
    "well_formed",
    "mean_length",
    "truncation_ratio",
    "concise_with_system",
    "concise_without_system",
)


@click.group("testbed")
def testbed_group() -> None:
    """The testbed: tiny models trained from scratch on synthetic tasks (CPU minutes).

    \b
    Examples:
      opd testbed status
      opd testbed build --force
    """


@testbed_group.command("build")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Target directory (default: $OPD_TESTBED_DIR, else the package's assets).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Rebuild even what is up to date.")
def build_cmd(out: str | None, seed: int, force: bool) -> None:
    """Build every testbed model with opd's own stages (pretrain -> SFT -> RLVR), then measure them.

    \b
    Example:
      opd testbed build --seed 0
    """
    import logging

    from opd_cli.testbed.build import build_testbed  # torch, transformers: when it runs

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = build_testbed(testbed_dir(out), seed=seed, force=force, progress=True)
    click.echo(format_manifest(manifest))


@testbed_group.command("status")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    default=None,
    help="Testbed directory (default: $OPD_TESTBED_DIR, else the package's assets).",
)
def status_cmd(directory: str | None) -> None:
    """Print the manifest as a table; exit 1 if the testbed or one of its models is missing.

    \b
    Example:
      opd testbed status
    """
    root = testbed_dir(directory)
    manifest = load_manifest(root)
    if manifest is None:
        click.echo(f"testbed not built at {root}; run `opd testbed build`", err=True)
        sys.exit(1)
    click.echo(f"testbed at {root}")
    click.echo(format_manifest(manifest))
    missing = missing_models(root)
    if missing:
        click.echo(f"missing: {', '.join(missing)}; run `opd testbed build`", err=True)
        sys.exit(1)


def format_manifest(manifest: dict) -> str:
    """A Markdown table: one row per model with its measured figures."""
    overlap_keys = sorted({k for m in manifest["models"].values() for k in m["eval"] if "overlap" in k})[:2]
    cols = [c for c in COLUMNS] + overlap_keys
    lines = ["| model | params | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for name, m in manifest["models"].items():
        ev = m["eval"]
        cells = [f"{ev[c]:.3f}" if isinstance(ev.get(c), float) else str(ev.get(c, "-")) for c in cols]
        lines.append(f"| {name} | {m['architecture'].get('params', '?')} | " + " | ".join(cells) + " |")
    timing = manifest.get("timing", {})
    lines.append(
        f"\nseed {manifest.get('seed')}, config {str(manifest.get('config_hash'))[:12]}, "
        f"build {timing.get('total_seconds', '?')} s, torch {manifest['versions'].get('torch')}"
    )
    lines.append(built_on_line(manifest))
    return "\n".join(lines)


def built_on_line(manifest: dict, here: str | None = None) -> str:
    """Where the testbed was built, against this CPU: a `--force` rebuild reproduces the weights within a
    CPU vendor, not across vendors (experiments/testbed.md, "Thirteenth session")."""
    from opd_cli.testbed.build import cpu_description

    here = here or cpu_description()
    built = manifest.get("kernels", {}).get("cpu")
    if not built:
        return f"built on: not recorded (manifests before the thirteenth session); this CPU: {here}"
    line = f"built on: {built}; this CPU: {here}"
    if built.split(" ", 1)[0] != here.split(" ", 1)[0]:
        line += " (another CPU vendor: `opd testbed build --force` here gives other weights)"
    return line
