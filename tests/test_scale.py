"""Scaling out: data-parallel learner ranks, sweeps through submitit, memory plans, the Qwen3 recipes.

The 2-rank tests run two CPU processes on gloo with tiny random models: the rollouts of a global batch
must not depend on the world size, so the 2-rank loss curve equals the 1-rank one (rtol 1e-4).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "trainer.prompts_per_step=4",
    "eval.size=4",
    "eval.every=0",
    "eval.max_new_tokens=8",
    "rollout.max_new_tokens=16",
    "rollout=hf",
    "logger=none",
    "task.train_size=64",
]
LOSS_RTOL = 1e-4


def opd(*args: str, cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "opd_cli.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from conftest import build_tiny_model_dir

    root = tmp_path_factory.mktemp("models")
    return {
        "student": build_tiny_model_dir(root / "student", seed=0),
        "teacher": build_tiny_model_dir(root / "teacher", seed=1, hidden_size=96, num_layers=3),
    }


def base(models, *extra: str) -> list[str]:
    return [f"model.path={models['student']}", f"teacher.path={models['teacher']}", *TINY, *extra]


# ------------------------------------------------------------------------------------- data parallel
def test_two_ranks_follow_the_one_rank_loss_curve(models, tmp_path):
    args = base(models, "trainer.steps=2", "loss=topk_rkl", "trainer.lr=1e-3")
    one, two = tmp_path / "one", tmp_path / "two"
    res = opd("run", *args, f"hydra.run.dir={one}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    res = opd("run", *args, "trainer.nproc=2", f"hydra.run.dir={two}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = train_rows(one), train_rows(two)
    assert [r["step"] for r in b] == [1, 2]
    for key in ("loss", "grad_norm", "response_length", "rollout_accuracy", "student_mass_in_support"):
        for ra, rb in zip(a, b, strict=True):
            assert math.isclose(ra[key], rb[key], rel_tol=LOSS_RTOL, abs_tol=1e-7), (key, ra[key], rb[key])
    assert a[0]["tokens"] == b[0]["tokens"]  # the same rollouts: same global token count
    # only rank 0 writes: one metrics file, one status, a checkpoint
    assert json.loads((two / "status.json").read_text())["status"] == "ok"
    assert (two / "checkpoints" / "step_000002" / "model.safetensors").exists()
    print("loss 1 rank:", [r["loss"] for r in a], "2 ranks:", [r["loss"] for r in b])
