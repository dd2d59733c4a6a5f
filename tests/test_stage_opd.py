"""The OPD stage (opd_cli/stages/opd.py) as a user runs it: `opd run` subprocesses with tiny budgets on
tiny random models, and the teacher/student alignment it relies on.

Each run is a few steps of 4-8 prompts, so these check wiring, files and exactness (resume, alignment,
weight sync), not learning; learning is the testbed's and the matrix's business.
Kill-and-resume, bad inputs and run-directory safety are in test_reliability.py; the micro-batched step
in test_microbatch.py; data-parallel ranks in test_scale.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_args, metrics, opd

from opd_cli.batching import pack, response_hidden_and_logits


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["teacher=large", "loss=topk_rkl"],
        ["teacher=rlvr", "loss=full_rkl", "loss.chunk_size=16"],
        ["teacher=self_answer", "loss=topk_rkl_stopgrad"],
        ["teacher=self_system", "task=arith_concise", "loss=topk_rkl_renorm"],
        ["loss=sampled_rkl", "loss.is_clip=2.0"],
    ],
    ids=["external", "rlvr-chunked", "opsd-answer", "opsd-system", "sampled"],
)
def test_opd_run_writes_a_complete_run_dir(models, tmp_path, extra):
    run_dir = tmp_path / "run"
    res = opd(
        "run",
        *base_args(
            models, *extra, "trainer.steps=2", "rollout=hf", "eval.every=1", f"hydra.run.dir={run_dir}"
        ),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for key in (
        "loss",
        "grad_norm",
        "lr",
        "response_length",
        "truncation_ratio",
        "repeat_ratio",
        "hedging_rate",
        "student_mass_in_support",
        "topk_overlap",
        "sampled_logratio",
        "student_entropy",
        "rollout_accuracy",
        "time/rollout",
        "time/teacher",
        "time/learner",
        "time/sync",
    ):
        assert key in train_rows[0], key
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and "final_accuracy" in summary
    assert json.loads((run_dir / "status.json").read_text())["status"] == "ok"
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "eval" / "step_000000.json").exists()
    assert (run_dir / "checkpoints" / "step_000002" / "model.safetensors").exists()
    if "task=arith_concise" in extra:
        final = json.loads((run_dir / "eval" / "step_000002.json").read_text())
        assert {"with_system", "without_system", "internalization"} <= set(final)


@pytest.mark.slow
@pytest.mark.vllm
def test_opd_run_with_vllm_rollouts_and_offline_wandb(models, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        a for a in base_args(models, "trainer.steps=2", "rollout=vllm", "eval.every=0") if a != "logger=none"
    ]
    res = opd("run", *args, "logger=wandb", "logger.mode=offline", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    train_rows = [r for r in metrics(run_dir) if "loss" in r]
    assert len(train_rows) == 2 and train_rows[-1]["time/sync"] > 0
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline run directory missing"
    # the run ends with the summary a newcomer reads, and vLLM's known-harmless noise is filtered
    tail = res.stdout.strip().splitlines()
    summary = tail[[i for i, x in enumerate(tail) if x.startswith("opd run summary")][-1] :]
    assert summary[-1] == f"results: {run_dir}", summary
    assert any(x.startswith("greedy accuracy") for x in summary) and (
        "collapse detector (truncation, top-K mass, repeats): not triggered in 2 steps" in summary
    )
    output = res.stdout + res.stderr
    assert "Triton" not in output and "reduce_op" not in output and "checkpoint shards" not in output


@pytest.mark.slow
def test_multirun_2x2_smoke(models, tmp_path):
    res = opd(
        "run",
        "-m",
        *base_args(
            models,
            "trainer.steps=1",
            "rollout=hf",
            "eval.every=0",
            "loss=topk_rkl,topk_rkl_stopgrad",
            "seed=0,1",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 4
    for job in jobs:
        assert (job / ".hydra" / "config.yaml").exists() and (job / "metrics.jsonl").exists()
        assert json.loads((job / "status.json").read_text())["status"] == "ok"


@pytest.mark.numerics
def test_opsd_alignment_with_a_pi_longer_than_the_student_prompt(tiny_model_dir):
    """Teacher position t scores exactly the student's response token t, whatever the prompt lengths."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_cli.tasks import make_task
    from opd_cli.teachers import PromptBuilder, Teacher, chat_prompt_ids

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    task = make_task("arith", digits=3)
    rows = task.generate(3, seed=0)
    builder = PromptBuilder(task, user_template="{problem}\nR:{solution_student}\nH:{answer}")
    teacher = Teacher(model, tok, builder)
    responses = [tok(r["solution"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in rows]
    scored = teacher.score(rows, responses).full
    student_prompt = chat_prompt_ids(tok, task.messages(rows[0]))
    assert len(teacher.prompt_ids(rows[0])) > 2 * len(student_prompt)
    for i, row in enumerate(rows):
        ids = teacher.prompt_ids(row) + responses[i]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        p = len(teacher.prompt_ids(row))
        # fp32 log-probs of a tiny random model (|log p| ~ 5, ulp ~5e-7) from a padded batch vs a single
        # sequence: other GEMM shapes, a few ulps apart. 1e-4 leaves room for any kernel; the claim is the
        # alignment, and a position shifted by one moves these log-probs by O(1)
        for t, token in enumerate(responses[i]):
            assert torch.allclose(scored[i, t], logp[p - 1 + t], atol=1e-4)
            assert scored[i, t, token] == pytest.approx(float(logp[p - 1 + t, token]), abs=1e-4)


@pytest.mark.numerics
def test_pack_gathers_the_positions_that_predict_each_response_token(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    prompts, responses = [[4, 10, 11], [4, 12]], [[20, 21, 2], [22]]
    batch = pack(prompts, responses, pad_id=0)
    _, logits = response_hidden_and_logits(model, batch)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        full = model(torch.tensor([p + r])).logits[0]
        for t in range(len(r)):  # padded batch vs one sequence: fp32 round-off only (see the test above)
            assert torch.allclose(logits[i, t], full[len(p) - 1 + t], atol=1e-4)
    assert batch.response_mask.tolist() == [[True, True, True], [True, False, False]]


def test_teacher_checkpoint_self_pi_defaults_to_the_student_and_pi_checkpoint_overrides():
    from omegaconf import OmegaConf

    from opd_cli.stages.common import teacher_checkpoint

    cfg = OmegaConf.create({"teacher": {"kind": "self_pi", "path": "/t", "pi_checkpoint": None}})
    assert teacher_checkpoint(cfg, "/student") == "/student"
    cfg.teacher.pi_checkpoint = "/rlvr_pi_teacher"
    assert teacher_checkpoint(cfg, "/student") == "/rlvr_pi_teacher"
    cfg.teacher.kind = "external"
    assert teacher_checkpoint(cfg, "/student") == "/t"
