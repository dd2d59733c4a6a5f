"""Scaling out: data-parallel learner ranks, sweeps through submitit, memory plans, the Qwen3 recipes.

The 2-rank tests run two CPU processes on gloo with tiny random models: the rollouts of a global batch
must not depend on the world size, so the 2-rank loss curve equals the 1-rank one (rtol 1e-4).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import CURVE_RTOL, DP_TINY, STABLE_ADAM, run_opd, train_rows

REPO = Path(__file__).resolve().parent.parent


def opd(*args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None):
    return run_opd(*args, cwd=cwd, timeout=timeout, env=env)


def base(models, *extra: str) -> list[str]:
    return [f"model.path={models['student']}", f"teacher.path={models['teacher']}", *DP_TINY, *extra]


@pytest.mark.numerics
# ------------------------------------------------------------------------------------- data parallel
def test_two_ranks_follow_the_one_rank_loss_curve(models, tmp_path):
    # STABLE_ADAM: step 2 starts from weights that agree to ~1e-8 on both sides (see conftest)
    args = base(models, "trainer.steps=2", "loss=topk_rkl", "trainer.lr=1e-3", STABLE_ADAM)
    one, two = tmp_path / "one", tmp_path / "two"
    res = opd("run", *args, f"hydra.run.dir={one}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    res = opd("run", *args, "trainer.nproc=2", f"hydra.run.dir={two}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = train_rows(one), train_rows(two)
    assert [r["step"] for r in b] == [1, 2]
    for key in ("loss", "grad_norm", "response_length", "rollout_accuracy", "student_mass_in_support"):
        for ra, rb in zip(a, b, strict=True):
            assert math.isclose(ra[key], rb[key], rel_tol=CURVE_RTOL, abs_tol=1e-7), (key, ra[key], rb[key])
    assert a[0]["tokens"] == b[0]["tokens"]  # the same rollouts: same global token count
    # only rank 0 writes: one metrics file, one status, a checkpoint
    assert json.loads((two / "status.json").read_text())["status"] == "ok"
    assert (two / "checkpoints" / "step_000002" / "model.safetensors").exists()
    print("loss 1 rank:", [r["loss"] for r in a], "2 ranks:", [r["loss"] for r in b])


# ------------------------------------------------------------------------------- sweeps via submitit
def test_submitit_local_sweep_runs_both_jobs(models, tmp_path):
    sweep = tmp_path / "sweep"
    res = opd(
        "run",
        "-m",
        *base(models, "trainer.steps=1", "loss=topk_rkl,topk_rkl_stopgrad"),
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    for job in jobs:
        assert json.loads((job / "status.json").read_text())["status"] == "ok"
        rows = train_rows(job)
        assert len(rows) == 1 and math.isfinite(rows[0]["loss"])
        names = (job / ".hydra" / "overrides.yaml").read_text()
        assert "loss=topk_rkl" in names
    assert (sweep / ".submitit").is_dir()  # the jobs ran through submitit's executor


def test_sweep_prevalidation_covers_launcher_and_experiment_grids(tmp_path):
    res = opd("run", "-m", "loss=topk_rkl,nope", "hydra/launcher=submitit_local", cwd=tmp_path)
    assert res.returncode == 2 and "unknown option 'nope'" in res.stderr, res.stderr
    # the grid inside experiment=qwen3_matrix is expanded before anything is launched
    res = opd("run", "-m", "experiment=qwen3_matrix", "--dry-run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("job: ") == 6 and "teacher=qwen3_rlvr" in res.stdout


# ------------------------------------------------------------------------------------- memory plan
QWEN3_RECIPES = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("qwen3_*.yaml"))


def test_every_qwen3_recipe_composes_and_dry_runs_a_plan(tmp_path):
    assert len(QWEN3_RECIPES) >= 12
    from opd_cli.launch import compose
    from opd_cli.plan import format_plan, memory_plan

    for name in QWEN3_RECIPES:
        text = (REPO / "conf" / "experiment" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_") and "opd run " in text and name in text
        cfg = compose([f"experiment={name}"])
        assert cfg.cell.name.startswith("qwen3_") or "${" in str(cfg.cell.name)
        assert cfg.cell.paper_verdict in ("improves", "stable", "degrades", "collapses", "")
        assert cfg.trainer.lr == 2e-6 and cfg.rollout.top_p == 0.95 and cfg.loss.k in (1, 20)
        plan = format_plan(memory_plan(cfg))
        assert "student" in plan and "Adam states" in plan and "total" in plan
    res = opd("run", "experiment=qwen3_opd_8b_topk", "--dry-run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "teacher 8.19B params: Qwen/Qwen3-8B (built-in table)" in res.stdout
    assert "student 1.72B params" in res.stdout
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_plan_numbers_and_the_fit_error(tmp_path):
    from opd_cli.launch import compose
    from opd_cli.plan import GIB, KNOWN_CONFIGS, ModelShape, memory_plan

    # Qwen3-8B: 8.19B parameters (embeddings untied); Qwen3-1.7B: 1.72B (tied)
    assert round(ModelShape.from_config(KNOWN_CONFIGS["Qwen/Qwen3-8B"]).params / 1e9, 2) == 8.19
    assert round(ModelShape.from_config(KNOWN_CONFIGS["Qwen/Qwen3-1.7B"]).params / 1e9, 2) == 1.72
    whole = ["trainer.micro_batch_size=0", "trainer.activation_checkpointing=false", "loss.chunk_size=0"]
    one = memory_plan(compose(["experiment=qwen3_opd_8b_topk", *whole]))
    fsdp = memory_plan(
        compose(["experiment=qwen3_opd_8b_topk", *whole, "trainer.nproc=8", "trainer.parallel=fsdp"])
    )
    rows1, rows8 = dict(one["rows"]), dict(fsdp["rows"])
    assert math.isclose(rows8["Adam states (2 x fp32)"] * 8, rows1["Adam states (2 x fp32)"])
    # the teacher is frozen: bf16 weights on CUDA (teacher.dtype=auto), not sharded
    assert rows8["teacher parameters (bf16, frozen)"] == rows1["teacher parameters (bf16, frozen)"]
    assert math.isclose(rows1["teacher parameters (bf16, frozen)"], 2 * 8190735360 / GIB, rel_tol=1e-3)
    # teacher log-probs of the whole batch: 64 samples x 4096 response tokens x 151936 x 4 bytes
    assert math.isclose(rows1["teacher log-probs [tokens, V] fp32"], 64 * 4096 * 151936 * 4 / GIB)
    res = opd("plan", "experiment=qwen3_opd_8b_topk", *whole, "trainer.device_memory_gb=80", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "needs" in res.stderr and "80.0 GiB" in res.stderr and "trainer.nproc" in res.stderr
    res = opd("plan", "model.path=/no/such/model", cwd=tmp_path)
    assert res.returncode == 2 and "built-in table" in res.stderr


def test_plan_puts_a_teacher_on_its_own_device_there(tmp_path):
    from opd_cli.launch import compose
    from opd_cli.plan import PlanError, check_fit, format_plan, memory_plan

    recipe = ["experiment=qwen3_opd_8b_topk", "trainer.device=cuda", "trainer.device_memory_gb=80"]
    same = memory_plan(compose(recipe))
    apart = memory_plan(compose([*recipe, "teacher.device=cuda:1"]))
    assert same["teacher_device"] is None
    learner_rows, teacher_rows = dict(apart["rows"]), dict(apart["teacher_device"]["rows"])
    params = "teacher parameters (bf16, frozen)"
    assert params in dict(same["rows"]) and params not in learner_rows and params in teacher_rows
    moved = dict(same["rows"])[params] + dict(same["rows"])["teacher forward (transient, one layer)"]
    head = learner_rows["teacher LM head copy (for the chunked loss)"]  # the recipe uses the chunked loss
    assert math.isclose(apart["total_gb"], same["total_gb"] - moved + head, rel_tol=1e-9)
    assert "teacher device (teacher.device=cuda:1)" in format_plan(apart)
    check_fit(apart)
    small = memory_plan(compose([*recipe, "teacher.device=cuda:1", "trainer.device_memory_gb=16"]))
    try:
        check_fit(small)
    except PlanError as exc:
        assert "teacher.device=cuda:1" in str(exc)
    else:
        raise AssertionError("a 16.3 GiB teacher fits on a 16 GiB device")
    # a teacher on CPU is planned in fp32 there
    cpu = memory_plan(compose([*recipe, "teacher.device=cpu"]))
    assert "teacher parameters (fp32, frozen)" in dict(cpu["teacher_device"]["rows"])


def test_teacher_device_config_errors(tmp_path):
    for args, needle in [
        (["teacher.device=gpu1"], "teacher.device='gpu1' is not a device"),
        (["teacher.device=cuda:1", "trainer.nproc=2"], "every rank would put its teacher on that one GPU"),
    ]:
        res = opd("run", *args, "--cfg", "job", cwd=tmp_path)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and needle in res.stderr, res.stderr


def test_teacher_outputs_move_to_the_learners_device(models):
    """Teacher.score runs where the teacher is and hands the loss its outputs on output_device
    ("meta" stands in for a second device on a CPU-only machine)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_cli.tasks import make_task
    from opd_cli.teachers import PromptBuilder, Teacher

    task = make_task("arith")
    tok = AutoTokenizer.from_pretrained(str(models["teacher"]))
    model = AutoModelForCausalLM.from_pretrained(str(models["teacher"]))
    rows = [{"problem": "1+2", "answer": "3", "system_prompt": ""}]
    here = Teacher(model, tok, PromptBuilder(task))
    apart = Teacher(model, tok, PromptBuilder(task), output_device="meta")
    response = [tok("3")["input_ids"]]
    full = here.score(rows, response)
    moved = apart.score(rows, response)
    assert full.full.device.type == "cpu" and moved.full.device.type == "meta"
    assert moved.full.shape == full.full.shape
    hidden = apart.score(rows, response, hidden=True)
    assert hidden.hidden.device.type == "meta" and hidden.lm_head_weight.device.type == "meta"
    assert apart.head_on_output_device()[0] is hidden.lm_head_weight  # the frozen head is copied once
    assert here.score(rows, response, hidden=True).lm_head_weight is model.get_output_embeddings().weight
    assert torch.equal(full.full, here.score(rows, response).full)
