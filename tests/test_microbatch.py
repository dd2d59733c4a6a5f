"""Micro-batched OPD steps (`trainer.micro_batch_size`): the same loss, metrics, gradients and weights as the
whole-batch step; activation checkpointing; the bf16 teacher default; the memory plan per micro-batch.

In-process steps replay one set of rollouts through two fresh runs (micro_batch_size 0 and 2), so any
difference comes from the learner, never from sampling. Tiny random models, CPU, fp32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import STABLE_ADAM, GradientRecorder, assert_gradients_match, run_opd

# Metrics of one step (loss, grad norm, diagnostics) are sums over the same tokens in another order:
# fp32 round-off, ~1e-7 relative (see conftest's GRAD_RTOL for the argument); 1e-5 leaves room.
RTOL = 1e-5
TINY = [
    "trainer.prompts_per_step=5",  # micro-batches of 2, 2, 1: unequal sizes and token counts
    "eval.size=4",
    "eval.every=0",
    "eval.max_new_tokens=8",
    "rollout.max_new_tokens=16",
    "rollout=hf",
    "logger=none",
    "task.train_size=64",
    "diagnostics.every=1",  # the gradient-cosine diagnostic on every step
    "trainer.lr=1e-3",
]


def base(models, *extra: str) -> list[str]:
    return [f"model.path={models['student']}", f"teacher.path={models['teacher']}", *TINY, *extra]


def one_step(models, tmp_path: Path, overrides: list[str], rollouts: dict | None = None):
    """(metrics, gradients before the update, parameters before and after it, rollouts, the run) of one
    OPD step; `rollouts` from an earlier call are replayed instead of sampled."""
    from omegaconf import open_dict

    from opd_cli.launch import compose
    from opd_cli.stages.opd import OPDRun

    cfg = compose(base(models, *overrides))
    with open_dict(cfg):
        del cfg["hydra"]  # the Compose API's hydra node has no run-time values
    run = OPDRun(cfg, tmp_path / f"run{len(list(tmp_path.iterdir()))}")
    try:
        if rollouts is None:
            rollouts, generate = {}, run.rollout
            run.rollout = lambda rows, indices: rollouts.setdefault("groups", generate(rows, indices))
        else:
            run.rollout = lambda rows, indices: rollouts["groups"]
        grads, update = {}, run.learner.step

        def step(loss=None):
            grads.update({n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None})
            return update(loss)

        run.learner.step = step
        before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
        metrics = run.train_step()
        after = {n: p.detach().clone() for n, p in run.model.named_parameters()}
        return metrics, grads, (before, after), rollouts, run
    finally:
        run.close()


def max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of max|a - b| / max|a| (0 when equal)."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) / max(float(a[k].abs().max()), 1e-30) for k in a)


def assert_metrics_equal(a: dict, b: dict, rtol: float = RTOL) -> float:
    keys = {k for k in a if not k.startswith("time/")}
    assert keys == {k for k in b if not k.startswith("time/")}
    worst = 0.0
    for k in sorted(keys):
        if not isinstance(a[k], int | float):  # texts, lists: exactly equal
            assert a[k] == b[k], k
            continue
        if isinstance(a[k], float) and math.isnan(a[k]):
            assert math.isnan(b[k]), k
            continue
        assert math.isclose(a[k], b[k], rel_tol=rtol, abs_tol=1e-7), (k, a[k], b[k])
        worst = max(worst, abs(a[k] - b[k]) / max(abs(a[k]), 1e-30))
    return worst


@pytest.mark.numerics
@pytest.mark.parametrize(
    "extra",
    [
        ["loss=full_rkl"],
        ["loss=topk_rkl_stopgrad", "loss.reduction=seq_mean"],
        ["loss=sampled_rkl", "loss.is_clip=2.0"],
        ["loss=full_rkl", "loss.chunk_size=7"],
        ["teacher=self_answer", "loss=topk_rkl_stopgrad", "loss.chunk_size=16"],
    ],
    ids=["full_rkl", "topk_stopgrad-seq_mean", "sampled_is", "full_rkl-chunked", "opsd-chunked"],
)
def test_micro_batched_step_equals_the_whole_batch_step(models, tmp_path, extra):
    whole, g_whole, p_whole, rollouts, run = one_step(models, tmp_path, extra)
    assert run.teacher.model.dtype == torch.float32  # teacher.dtype=auto on CPU
    assert sorted(len(g) for g in rollouts["groups"]) == [1] * 5
    assert len(run.micro_batches(5)) == 1
    micro, g_micro, p_micro, _, run = one_step(
        models, tmp_path, [*extra, "trainer.micro_batch_size=2"], rollouts
    )
    assert [(s.start, s.stop) for s, _ in run.micro_batches(5)] == [(0, 2), (2, 4), (4, 5)]
    assert sum(len(s.response_ids) for g in rollouts["groups"] for s in g) > 5  # not all empty
    worst_metric = assert_metrics_equal(whole, micro)
    for key in ("loss", "grad_norm", "student_entropy", "student_mass_in_support", "sampled_logratio"):
        assert key in whole, key
    assert ("grad_cosine_to_full_rkl" in whole) == (not any("chunk_size" in e for e in extra))
    assert max_rel(p_whole[0], p_micro[0]) == 0.0 and max_rel(p_whole[0], p_whole[1]) > 1e-4  # it trained
    # the claim is about the accumulated gradient: compared before AdamW (which would amplify round-off in
    # ~0 entries into lr-sized moves, see STABLE_ADAM)
    grad_diff = assert_gradients_match(g_whole, g_micro)
    print(f"{extra}: metrics {worst_metric:.1e}, gradients {grad_diff:.1e}")


@pytest.mark.numerics
def test_activation_checkpointing_gives_the_same_step(models, tmp_path):
    extra = ["loss=topk_rkl", "loss.chunk_size=5"]
    whole, g_whole, _, rollouts, run = one_step(models, tmp_path, extra)
    assert not run.model.is_gradient_checkpointing
    # decoder-layer calls, student and teacher: under checkpointing the student's run again in backward (a
    # pre-hook: the recompute stops early, before a forward hook would fire)
    calls, layer = [], type(run.model.get_decoder().layers[0])
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: calls.append(1) if isinstance(module, layer) else None
    )
    try:
        one_step(models, tmp_path, [*extra, "trainer.micro_batch_size=2"], rollouts)
        plain, calls[:] = len(calls), []
        ckpt, g_ckpt, _, _, run = one_step(
            models,
            tmp_path,
            [*extra, "trainer.micro_batch_size=2", "trainer.activation_checkpointing=true"],
            rollouts,
        )
    finally:
        hook.remove()
    assert run.model.is_gradient_checkpointing and len(calls) > plain > 0, (plain, len(calls))
    assert_metrics_equal(whole, ckpt)
    assert_gradients_match(g_whole, g_ckpt)


def test_teacher_dtype(models, tmp_path):
    from opd_cli.learner import weights_dtype

    assert weights_dtype(torch.device("cpu")) == torch.float32  # auto: fp32 on CPU, bf16 on CUDA
    assert weights_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16
    metrics, _, _, _, run = one_step(
        models, tmp_path, ["teacher.dtype=bfloat16", "trainer.micro_batch_size=2"]
    )
    assert run.teacher.model.dtype == torch.bfloat16 and run.model.dtype == torch.float32
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0


def test_micro_batch_size_validation():
    from opd_cli.config import ConfigError
    from opd_cli.launch import compose

    with pytest.raises(ConfigError) as err:
        compose(["trainer.micro_batch_size=-1"])
    message = str(err.value)
    assert (
        "\n" not in message and "trainer.micro_batch_size=-1 must be >= 0" in message and "use 0" in message
    )
    assert compose(["trainer.micro_batch_size=3"]).trainer.micro_batch_size == 3


def test_plan_shrinks_per_micro_batch(tmp_path):
    from opd_cli.launch import compose
    from opd_cli.plan import GIB, memory_plan

    def plan(*extra):
        cfg = compose(["experiment=qwen3_opd_8b_topk", "trainer.device_memory_gb=80", *extra])
        p = memory_plan(cfg)
        return p, dict(p["rows"])

    whole, w = plan("trainer.micro_batch_size=0", "trainer.activation_checkpointing=false")
    micro, m = plan("trainer.micro_batch_size=2", "trainer.activation_checkpointing=false")
    ckpt, c = plan("trainer.micro_batch_size=2", "trainer.activation_checkpointing=true")
    assert whole["micro_batch"] == 64 and micro["micro_batch"] == 2
    # activations and the teacher's outputs scale with the micro-batch: 2 of 64 sequences
    assert math.isclose(m["activations (no checkpointing)"] * 32, w["activations (no checkpointing)"])
    key = "teacher hidden states [tokens, H_t]"
    assert math.isclose(m[key] * 32, w[key]) and math.isclose(m[key], 2 * 4096 * 4096 * 2 / GIB)
    assert c["activations (checkpointed)"] < m["activations (no checkpointing)"] / 2
    assert whole["total_gb"] > 500 > 80 > ckpt["total_gb"] and micro["total_gb"] < whole["total_gb"]
    # the recipe's own settings fit an 80 GiB GPU
    recipe = memory_plan(compose(["experiment=qwen3_opd_8b_topk", "trainer.device_memory_gb=80"]))
    assert recipe["micro_batch"] == 2 and recipe["total_gb"] < 80
    # the SFT stage of the base-student recipe: 64 traces per step, 2 at a time, no teacher, no vLLM
    sft = memory_plan(compose(["experiment=qwen3_opd_base_sft", "stage=sft", "trainer.device_memory_gb=80"]))
    assert sft["samples_per_rank"] == 64 and sft["micro_batch"] == 2 and sft["total_gb"] < 40
    assert not [n for n, _ in sft["rows"] if "teacher" in n or "vLLM" in n]
    res = opd("plan", "experiment=qwen3_opd_base_sft", "trainer.device_memory_gb=80", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.count("memory plan per device") == 2, res.stderr
    assert "stabilization=sft, before OPD" in res.stdout


def opd(*args: str, cwd: Path, timeout: int = 600):
    return run_opd(*args, cwd=cwd, timeout=timeout)


@pytest.mark.numerics
@pytest.mark.slow
def test_micro_batched_run_writes_the_same_metrics(models, tmp_path):
    args = base(
        models, "trainer.steps=2", "loss=full_rkl", "loss.chunk_size=16", "teacher=self_answer", STABLE_ADAM
    )
    runs = {}
    for size in (0, 2):
        run_dir = tmp_path / f"mb{size}"
        res = opd("run", *args, f"trainer.micro_batch_size={size}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[size] = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in runs[0]] == [r["step"] for r in runs[2]]
    assert len([r for r in runs[2] if "loss" in r]) == 2
    worst = max(assert_metrics_equal(a, b, rtol=1e-4) for a, b in zip(runs[0], runs[2], strict=True))
    print(f"metrics.jsonl: worst relative difference {worst:.1e}")


@pytest.mark.numerics
@pytest.mark.slow
def test_two_ranks_with_uneven_micro_batch_counts_follow_one_rank(models, tmp_path):
    """5 prompts on 2 ranks: rank 0 runs 3 micro-batches of 1, rank 1 runs 2 and a zero-weight third
    (DDP's forwards and backwards are collectives); the loss curve is the whole-batch 1-rank one."""
    args = base(models, "trainer.steps=2", "loss=topk_rkl", "loss.chunk_size=8", STABLE_ADAM)
    one, two = tmp_path / "one", tmp_path / "two"
    res = opd("run", *args, f"hydra.run.dir={one}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    res = opd(
        "run", *args, "trainer.nproc=2", "trainer.micro_batch_size=1", f"hydra.run.dir={two}", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = (
        [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        for d in (one, two)
    )
    assert [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "student_mass_in_support", "topk_overlap", "tokens"):
            assert math.isclose(ra[key], rb[key], rel_tol=1e-4, abs_tol=1e-7), (key, ra[key], rb[key])


@pytest.mark.numerics
# ------------------------------------------------------------------------------------ GRPO (stage=rlvr)
def test_chunked_token_logprobs_equal_the_full_log_softmax():
    from opd_cli.batching import token_logprobs

    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=True)
    hidden = torch.randn(3, 7, 8, generator=gen, requires_grad=True)
    tokens = torch.randint(50, (3, 7), generator=gen)
    weights = torch.randn(3, 7, generator=gen)
    results = []
    for chunk in (0, 4, 21, 100):  # 21 rows in all: uneven chunks, one chunk, more than the rows
        hidden.grad = None
        head.zero_grad()
        logp = token_logprobs(hidden, head, tokens, chunk)
        (logp * weights).sum().backward()
        results.append((logp.detach(), hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(b, a, rtol=RTOL, atol=1e-7)


def _grpo(micro: int, chunk: int, checkpointing: bool) -> dict:
    """Two GRPO steps on the shipped SFT student (it solves some prompts, so groups carry signal), at
    lr=0: both steps see the same weights, so every step's gradient is compared on equal inputs (with
    lr > 0, AdamW would turn round-off in ~0 gradient entries into lr-sized weight differences and the
    step-2 rollouts could differ)."""
    from opd_cli.learner import load_model, load_tokenizer
    from opd_cli.rollout import make_engine
    from opd_cli.stages.rlvr import GRPOOptions, grpo_train
    from opd_cli.tasks import make_task
    from opd_cli.testbed.paths import resolve_model_path

    path = resolve_model_path("testbed:student_sft")
    task = make_task("arith")
    rows = task.generate(48, seed=0)
    model = load_model(path, torch.device("cpu"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    metrics = grpo_train(
        model,
        load_tokenizer(path),
        task,
        rows,
        GRPOOptions(
            steps=2,
            prompts_per_step=5,  # 5 prompts x 4 samples: micro-batches of 3 leave a short last one
            samples_per_prompt=4,
            lr=0.0,
            max_new_tokens=48,
            seed=3,
            micro_batch_size=micro,
            chunk_size=chunk,
        ),
        engine=make_engine("hf", path, model=model),
        progress=False,
    )
    return metrics


@pytest.mark.numerics
def test_micro_batched_chunked_grpo_equals_the_whole_batch_grpo(monkeypatch):
    """stage=rlvr's memory options change no number: micro-batches of 3 sequences with gradient
    accumulation, chunked log-probs and activation checkpointing give the whole-batch GRPO steps' metrics
    and accumulated gradients (compared before the optimizer step, see conftest)."""
    grads = GradientRecorder(monkeypatch)
    whole_metrics = _grpo(micro=0, chunk=0, checkpointing=False)
    whole = grads.take()
    assert whole_metrics["loss"] != 0.0 and len(whole) >= 1, "no update: a vacuous check"
    for micro, chunk, checkpointing in [(3, 0, False), (3, 16, True), (0, 7, False)]:
        metrics = _grpo(micro, chunk, checkpointing)
        for key in ("reward", "loss", "clip_frac", "ratio_mean", "grad_norm", "skipped_steps"):
            assert math.isclose(metrics[key], whole_metrics[key], rel_tol=RTOL, abs_tol=1e-7), (
                micro,
                chunk,
                key,
            )
        steps = grads.take()
        assert len(steps) == len(whole)
        for reference, other in zip(whole, steps, strict=True):
            assert_gradients_match(reference, other)


def test_plan_of_the_grpo_teacher_recipe_has_no_teacher_and_fits():
    from opd_cli.launch import compose
    from opd_cli.plan import check_fit, format_plan, memory_plan

    plan = memory_plan(compose(["experiment=qwen3_rlvr_teacher", "trainer.device_memory_gb=80"]))
    names = [name for name, _ in plan["rows"]]
    assert not [n for n in names if "teacher" in n] and plan["micro_batch"] == 2
    assert "activations (checkpointed)" in names and "student logits + grad (chunks of 2048)" in names
    check_fit(plan)  # 3.6 TB of activations before GRPO had micro-batching
    # 256 x 8k-token sequences do not fit vLLM's 24 GiB at once: said, not an error
    assert "it will decode fewer sequences at a time" in format_plan(plan)
    small = memory_plan(
        compose(["experiment=qwen3_rlvr_teacher", "trainer.device_memory_gb=80", "rollout.max_new_tokens=64"])
    )
    assert "fewer sequences" not in format_plan(small)


# ------------------------------------------------------------------------------------ SFT (stabilization)
def _sft(models, micro: int, chunk: int) -> dict:
    """Three SFT steps at lr=0 (every step's gradient on the same weights: see _grpo), three batches of 7."""
    from opd_cli.learner import load_model, load_tokenizer
    from opd_cli.stages.sft import SFTOptions, sft_train
    from opd_cli.tasks import make_task

    task = make_task("arith")
    examples = [(task.messages(r), r["solution"]) for r in task.generate(40, seed=1)]
    model = load_model(models["student"], torch.device("cpu"))
    metrics = sft_train(
        model,
        load_tokenizer(models["student"]),
        examples,
        # micro-batches of 3 of the batch of 7: 3, 3, 1
        SFTOptions(steps=3, batch_size=7, lr=0.0, seed=0, micro_batch_size=micro, chunk_size=chunk),
        progress=False,
    )
    return metrics


@pytest.mark.numerics
def test_micro_batched_chunked_sft_equals_the_whole_batch_sft(models, monkeypatch):
    """Micro-batches (3, 3, 1) and chunked logits: the same losses, grad norms and accumulated gradients
    at every step as the whole batch. Before: weights after two AdamW steps were compared with atol 5e-6,
    which an AVX-512 machine exceeded (5.7e-6): round-off in ~0 gradient entries, amplified by Adam."""
    grads = GradientRecorder(monkeypatch)
    whole_metrics = _sft(models, 0, 0)
    whole = grads.take()
    assert len(whole) == 3
    for micro, chunk in [(3, 0), (3, 5), (0, 11)]:
        metrics = _sft(models, micro, chunk)
        for key in ("batch_loss", "loss", "grad_norm", "tokens"):
            assert math.isclose(metrics[key], whole_metrics[key], rel_tol=RTOL), (micro, chunk, key)
        for reference, other in zip(whole, grads.take(), strict=True):
            assert_gradients_match(reference, other)
