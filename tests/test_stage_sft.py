"""The SFT stage (opd_cli/stages/sft.py): the `sft_train` loop on tiny models (it also builds the testbed),
and the stage as `opd run` runs it (stabilization=sft before OPD, stage=sft with vLLM traces)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_args, opd

from opd_cli.stages.sft import SFTOptions, prompt_ids, sft_train

pytestmark = pytest.mark.usefixtures("torch_threads_for_tests")


@pytest.fixture(scope="module")
def tok(char_tokenizer):
    return char_tokenizer


def _tiny_model(tok, seed: int = 0):
    from transformers import Qwen2ForCausalLM

    from opd_cli.testbed.models import tiny_qwen2_config

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(tiny_qwen2_config(len(tok), hidden_size=32, num_layers=1))


def test_prompt_ids_of_empty_conversation_is_the_generation_prompt(tok):
    assert prompt_ids(tok, []) == [tok.convert_tokens_to_ids("<|assistant|>")]


def test_sft_train_reduces_loss(tok):
    from opd_cli.batching import pack
    from opd_cli.stages.sft import response_nll, tokenize_examples

    examples = [([{"role": "user", "content": f"Q:{i}"}], f"{i}+{i}={2 * i}") for i in range(8)]
    examples += [([], "abc;abc;")]  # a bare response (pretraining strings)
    model = _tiny_model(tok)
    data = tokenize_examples(tok, examples)
    batch = pack([d[0] for d in data], [d[1] for d in data], tok.pad_token_id)
    with torch.no_grad():
        before = float(response_nll(model, batch)[0])
    metrics = sft_train(
        model, tok, examples, SFTOptions(steps=40, batch_size=4, lr=3e-3, seed=0), progress=False
    )
    with torch.no_grad():
        after = float(response_nll(model, batch)[0])
    assert metrics["step"] == 40 and after < 0.5 * before


def test_prefill_is_prompt_not_response(tok):
    """A prefill (third element) extends the prompt ids, so no loss falls on it; the response is the rest."""
    from opd_cli.stages.sft import tokenize_examples

    msgs = [{"role": "user", "content": "Q:12+34"}]
    ((p0, r0),) = tokenize_examples(tok, [(msgs, "2+4+0=06;A:46")])
    ((p1, r1),) = tokenize_examples(tok, [(msgs, "A:46", "2+4+0=06;")])
    assert p1 == p0 + tok("2+4+0=06;", add_special_tokens=False)["input_ids"]
    assert r1 == tok("A:46", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert p1 + r1 == p0 + r0
    assert tokenize_examples(tok, [(msgs, "A:46", "")]) == tokenize_examples(tok, [(msgs, "A:46")])


def test_sft_train_is_deterministic(tok):
    examples = [([{"role": "user", "content": f"Q:{i}"}], f"A:{i}") for i in range(6)]
    runs = []
    for _ in range(2):
        model = _tiny_model(tok, seed=3)
        sft_train(model, tok, examples, SFTOptions(steps=5, batch_size=3, lr=1e-3, seed=7), progress=False)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])


def test_held_out_traces_are_not_trained_on():
    """The NLL before/after is measured on traces SFT never trains on: the last eighth (at most 256, at
    least one once there are two), disjoint from the training examples."""
    from opd_cli.stages.sft import split_held_out

    examples = [([{"role": "user", "content": f"Q:{i}"}], f"A:{i}") for i in range(64)]
    train, held = split_held_out(examples)
    assert (len(train), len(held)) == (56, 8) and train + held == examples
    assert not {r for _, r in train} & {r for _, r in held}
    assert [len(p) for p in split_held_out(examples * 40)] == [2560 - 256, 256]
    assert [len(p) for p in split_held_out(examples[:5])] == [4, 1]
    assert split_held_out(examples[:1]) == (examples[:1], [])


@pytest.mark.slow
def test_sft_then_opd(models, tmp_path):
    run_dir = tmp_path / "run"
    res = opd(
        "run",
        *base_args(
            models,
            "stabilization=sft",
            "stabilization.source=reference",
            "stabilization.steps=3",
            "stabilization.num_traces=64",
            "trainer.steps=1",
            "rollout=hf",
            f"hydra.run.dir={run_dir}",
        ),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    stats = json.loads((run_dir / "sft_student" / "sft_stats.json").read_text())
    assert stats["kept"] == 64 and stats["nll_after"] < stats["nll_before"]
    assert (stats["train_traces"], stats["held_out_traces"]) == (56, 8)
    assert (run_dir / "sft_student" / "DONE").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("until_nll", "steps", "evaluated"),
    [(1e-9, 10, [5, 10]), (100.0, 10, [5])],
    ids=["never-low-enough", "low-enough-at-once"],
)
def test_sft_stops_once_held_out_nll_is_low_enough(models, tmp_path, until_nll, steps, evaluated):
    """stabilization.until_nll: the held-out NLL is measured every eval_every steps and SFT stops at the
    first evaluation at or below it; `steps` is the cap. The history and the step it stopped at are in
    sft_stats, and the final NLL is the last one measured."""
    run_dir = tmp_path / "run"
    res = opd(
        "run",
        *base_args(
            models,
            "stage=sft",
            "stabilization=sft",
            "stabilization.source=reference",
            f"stabilization.steps={steps}",
            "stabilization.num_traces=32",
            "stabilization.eval_every=5",
            f"stabilization.until_nll={until_nll}",
            "rollout=hf",
            f"hydra.run.dir={run_dir}",
        ),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    stats = json.loads((run_dir / "model" / "sft_stats.json").read_text())
    assert [s for s, _ in stats["nll_history"]] == evaluated and stats["steps"] == evaluated[-1]
    assert stats["nll_after"] == pytest.approx(stats["nll_history"][-1][1], abs=1e-4)


def test_until_nll_must_be_positive(models, tmp_path):
    res = opd("run", *base_args(models, "stabilization=sft", "stabilization.until_nll=0"), cwd=tmp_path)
    assert res.returncode == 2 and "stabilization.until_nll=0" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.slow
@pytest.mark.vllm
def test_sft_stage_writes_its_teacher_traces_with_vllm(tmp_path):
    """stage=sft with rollout=vllm: the trace writer (the testbed's RLVR teacher, mostly right) runs in
    vLLM, is closed, and the base student is fine-tuned micro-batched and chunked on the kept traces."""
    run_dir = tmp_path / "run"
    res = opd(
        "run",
        "stage=sft",
        "model=student_base",
        "rollout=vllm",
        "logger=none",
        "stabilization=sft",
        "stabilization.source=teacher",
        "stabilization.trace_model=testbed:teacher_rlvr",
        "stabilization.num_traces=24",
        "stabilization.steps=2",
        "stabilization.batch_size=8",
        "trainer.micro_batch_size=3",
        "loss.chunk_size=64",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    stats = json.loads((run_dir / "model" / "sft_stats.json").read_text())
    assert stats["traces"] == 24 and 4 <= stats["kept"] <= 24, stats  # T=1 samples: 8 kept when written
    assert stats["nll_after"] < stats["nll_before"]
