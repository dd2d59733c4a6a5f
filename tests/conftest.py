"""Shared pytest fixtures and the `opd` subprocess runner of the end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_opd(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """`opd <args>` as a user runs it, in a subprocess: offline wandb, one torch thread, in-process vLLM
    engine, no debug tracebacks. Returns the CompletedProcess (text stdout/stderr)."""
    full_env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        **(env or {}),
    }
    full_env.pop("HYDRA_FULL_ERROR", None)
    full_env.pop("OPD_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "opd_cli.cli", *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Tiny budgets for `opd run` on tiny random models: these runs check wiring, files and exactness (resume,
# alignment, weight sync), not learning; learning is the testbed's and the matrix's business.
TINY = [
    "trainer.prompts_per_step=4",
    "eval.size=4",
    "eval.max_new_tokens=24",
    "rollout.max_new_tokens=24",
    "logger=none",
    "task.train_size=64",
]


def opd(*args: str, cwd: Path | None = None, timeout: int = 600):
    return run_opd(*args, cwd=cwd, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def base_args(models, *extra: str) -> list[str]:
    return [f"model.path={models['student']}", f"teacher.path={models['teacher']}", *TINY, *extra]


def build_tiny_model_dir(directory: str | Path, *, seed: int = 0, **config_overrides) -> Path:
    """Save a tiny random testbed model (Qwen2, char tokenizer) + its tokenizer into ``directory``."""
    import torch
    from transformers import Qwen2ForCausalLM

    from opd_cli.testbed.models import tiny_qwen2_config
    from opd_cli.testbed.tokenizer import save_char_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = save_char_tokenizer(directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(tiny_qwen2_config(len(tok), **config_overrides))
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random testbed model + tokenizer (vocab 102, hidden 64, 2 layers; loads in HF and vLLM).

    Session-scoped and shared: tests must not write into it (load the model and change the copy).
    """
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny random student and a larger tiny random teacher with the same tokenizer (shared, read-only)."""
    root = tmp_path_factory.mktemp("models")
    return {
        "student": build_tiny_model_dir(root / "student", seed=0),
        "teacher": build_tiny_model_dir(root / "teacher", seed=1, hidden_size=96, num_layers=3),
    }
