"""`opd doctor`: what this machine can run (versions, devices, vLLM, the testbed)."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os

from rich.console import Console
from rich.table import Table

from opd_cli.testbed.paths import testbed_status

PACKAGES = (
    "torch",
    "transformers",
    "vllm",
    "hydra-core",
    "omegaconf",
    "datasets",
    "wandb",
    "click",
    "math-verify",
    "hydra-submitit-launcher",
)


def _version(dist: str) -> str:
    for name in (dist, f"{dist}-cpu"):
        try:
            return md.version(name) + ("" if name == dist else " (cpu build)")
        except md.PackageNotFoundError:
            continue
    return "not installed"


def doctor() -> int:
    console = Console()
    table = Table(title="opd doctor", show_header=True)
    table.add_column("check")
    table.add_column("value")
    problems = []
    for dist in PACKAGES:
        v = _version(dist)
        table.add_row(dist, v)
        if v == "not installed" and dist != "hydra-submitit-launcher":
            problems.append(f"{dist} is missing: run `make install`")
    import torch

    table.add_row("torch build", torch.__version__)
    table.add_row("CUDA available", str(torch.cuda.is_available()))
    for i in range(torch.cuda.device_count()):
        table.add_row(f"cuda:{i}", torch.cuda.get_device_name(i))
    table.add_row("CPU threads", str(torch.get_num_threads()))
    try:
        importlib.import_module("torchvision")
        problems.append(
            "torchvision is installed beside torch; if `import transformers` fails with "
            "'torchvision::nms does not exist', run `pip uninstall torchvision torchaudio torchcodec`"
        )
    except Exception:  # noqa: BLE001 - absent or broken are both fine to report below
        pass
    try:
        import transformers  # noqa: F401

        table.add_row("import transformers", "ok")
    except Exception as exc:  # noqa: BLE001
        table.add_row("import transformers", f"FAILED: {exc}")
        problems.append("transformers does not import; see the message above")
    table.add_row(
        "VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "(unset)")
    )
    table.add_row("WANDB_MODE", os.environ.get("WANDB_MODE", "(unset: logger.mode=auto decides)"))
    table.add_row("testbed", testbed_status())
    console.print(table)
    for p in problems:
        console.print(f"[red]problem:[/red] {p}")
    return 1 if problems else 0
