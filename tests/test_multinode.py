"""Learners across nodes: `torchrun --nnodes=2` with c10d rendezvous, as a SLURM `srun torchrun` job runs it.

One machine plays two nodes (1 rank each, gloo, 127.0.0.1): the two torchrun agents meet at one c10d
rendezvous endpoint, get node ranks from it and form one process group; the run directory is shared (as
on a cluster's shared filesystem). The global batch of a step does not depend on how ranks are placed,
so the 2-node loss curve equals the 1-rank one (rtol 1e-4, as tests/test_scale.py does for 2 ranks).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import CURVE_RTOL, DP_TINY, REPO, STABLE_ADAM, run_opd, threads_for_tests, train_rows

from opd_cli.distributed import free_port


@pytest.mark.slow
@pytest.mark.numerics
def test_two_nodes_follow_the_one_rank_loss_curve(models, tmp_path):
    args = [
        f"model.path={models['student']}",
        f"teacher.path={models['teacher']}",
        *DP_TINY,
        "trainer.steps=2",
        "loss=topk_rkl",
        "trainer.lr=1e-3",
        STABLE_ADAM,  # step 2 from equal weights on both sides (see conftest)
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    res = run_opd("run", *args, f"hydra.run.dir={one}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    port = free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads_for_tests()),
        "WANDB_MODE": "offline",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    env.pop("HYDRA_FULL_ERROR", None)
    node = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        "--rdzv_id=opd-two-nodes",
        "--local_addr=127.0.0.1",
        "-m",
        "opd_cli.cli",
        "run",
        *args,
        f"hydra.run.dir={two}",
    ]
    agents = [
        subprocess.Popen(node, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [a.communicate(timeout=600) for a in agents]
    for agent, (_, err) in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, err[-3000:]
    a, b = train_rows(one), train_rows(two)
    assert [r["step"] for r in b] == [1, 2]
    for key in ("loss", "grad_norm", "response_length", "student_mass_in_support"):
        for ra, rb in zip(a, b, strict=True):
            assert math.isclose(ra[key], rb[key], rel_tol=CURVE_RTOL, abs_tol=1e-7), (key, ra[key], rb[key])
    assert a[0]["tokens"] == b[0]["tokens"]  # the same rollouts: same global token count
    assert json.loads((two / "status.json").read_text())["status"] == "ok"
    print("loss 1 rank:", [r["loss"] for r in a], "2 nodes:", [r["loss"] for r in b])


def test_the_slurm_multinode_script_is_valid_and_its_recipe_composes(tmp_path):
    """The sbatch script parses, and the `opd run` it launches on the learner nodes composes for the
    documented example (a served teacher with a loss it supports)."""
    script = REPO / "slurm" / "opd_multinode.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "srun" in text and "torchrun --nnodes=" in text and "--rdzv_backend=c10d" in text
    assert "opd teacher serve" in text and "teacher.server=" in text
    example = next(line for line in text.splitlines() if line.startswith("#   sbatch --nodes=3"))
    overrides = example.split("opd_multinode.sbatch", 1)[1].split()
    res = run_opd(
        "run",
        *overrides,
        "trainer.device=cuda",
        "teacher.backend=vllm",
        "teacher.server=http://node1:8000",
        "--cfg",
        "job",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
