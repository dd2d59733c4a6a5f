"""The RLVR stage (opd_cli/stages/rlvr.py): GRPO's advantages and clipped loss against hand-computed values,
`grpo_train` on the shipped student, and `opd run stage=rlvr` producing a teacher that OPD can use."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, base_args, metrics, opd

from opd_cli.stages.rlvr import GRPOOptions, clipped_pg_loss, group_advantages, grpo_train
from opd_cli.tasks import make_task
from opd_cli.testbed import paths

ASSETS = paths.ASSETS_DIR


pytestmark = pytest.mark.usefixtures("torch_threads_for_tests")


@pytest.fixture(scope="module")
def tok(char_tokenizer):
    return char_tokenizer


def test_group_advantages():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    adv = group_advantages(rewards)
    assert torch.equal(adv[0], torch.zeros(4)) and torch.equal(adv[1], torch.zeros(4))
    expected = (torch.tensor([1.0, 0.0, 0.0, 0.0]) - 0.25) / torch.tensor(0.1875).sqrt()
    torch.testing.assert_close(adv[2], expected, atol=1e-5, rtol=0)
    assert abs(float(adv[2].sum())) < 1e-5


def test_clipped_pg_loss():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.0]]).clamp_min(1e-9)).requires_grad_(True)
    old = torch.log(torch.tensor([[0.5, 0.25, 0.5]]))
    mask = torch.tensor([[True, True, False]])
    loss, info = clipped_pg_loss(logp, old, torch.tensor([1.0]), mask, clip_eps=0.2)
    # token 0: ratio 1 -> 1; token 1: ratio 2, clipped to 1.2 (positive advantage); token 2 is padding
    assert float(loss.detach()) == pytest.approx(-(1.0 + 1.2) / 2)
    assert info["clip_frac"] == pytest.approx(0.5)
    loss.backward()
    assert logp.grad[0, 1] == 0 and logp.grad[0, 2] == 0 and logp.grad[0, 0] < 0


def test_grpo_train_one_step(tok):
    """Two GRPO steps on the shipped student: rollouts, rewards, informative groups, an update."""
    from opd_cli.rollout.hf_engine import HFEngine
    from opd_cli.testbed.builders import load

    if not (ASSETS / "student_sft" / "model.safetensors").is_file():
        pytest.fail("no shipped student_sft")
    model = load(ASSETS / "student_sft")
    before = [p.detach().clone() for p in model.parameters()]
    task = make_task("arith", digits=3)
    rows = task.generate(16, seed=5)
    engine = HFEngine(None, model=model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    logged = []
    metrics = grpo_train(
        model,
        tok,
        task,
        rows,
        GRPOOptions(steps=2, prompts_per_step=8, samples_per_prompt=4, lr=1e-4, max_new_tokens=40, seed=0),
        engine=engine,
        progress=False,
        log_fn=lambda s, m: logged.append(m),
        log_every=1,
    )
    assert [m["step"] for m in logged] == [1, 2]
    assert 0.0 < metrics["reward"] < 1.0 and metrics["informative_groups"] > 0
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-3)  # on-policy: the ratio starts at 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.slow
def test_rlvr_stage_produces_a_teacher_checkpoint_that_opd_can_use(models, tmp_path):
    rl = tmp_path / "rl"
    res = opd(
        "run",
        "stage=rlvr",
        f"model.path={models['student']}",
        *TINY,
        "rollout=hf",
        "rollout.n=4",
        "trainer.steps=2",
        f"hydra.run.dir={rl}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (rl / "model" / "config.json").exists()
    rows = [r for r in metrics(rl) if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2] and "informative_groups" in rows[0]
    res = opd(
        "run",
        *base_args(
            models,
            "teacher=rlvr",
            f"teacher.path={rl / 'model'}",
            "trainer.steps=1",
            "rollout=hf",
            f"hydra.run.dir={tmp_path / 'opd'}",
        ),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.vllm
def test_rlvr_stage_builds_its_vllm_engine_from_the_config(models, tmp_path, monkeypatch):
    """stage=rlvr's engine gets rollout.max_model_len (the Qwen3 GRPO recipe sets 10,240), the KV-cache
    fraction and the seed from the config; it was built with the engine's defaults."""
    pytest.importorskip("vllm")
    from omegaconf import open_dict

    import opd_cli.stages.rlvr as rlvr
    from opd_cli.launch import compose

    class Built(Exception):
        pass

    seen = {}

    def spy(*args, **kwargs):
        seen["engine"] = rlvr_engine(*args, **kwargs)
        raise Built  # the engine is what this test is about: stop before training

    rlvr_engine = rlvr.rollout_engine
    monkeypatch.setattr(rlvr, "rollout_engine", spy)
    cfg = compose(
        ["stage=rlvr", f"model.path={models['student']}", *TINY, "rollout=vllm", "rollout.n=2"]
        + ["rollout.max_model_len=200", "trainer.steps=1"]
    )
    with open_dict(cfg):
        del cfg["hydra"]
    with pytest.raises(Built):
        rlvr.run(cfg, tmp_path / "rl")
    try:
        assert seen["engine"].llm.llm_engine.model_config.max_model_len == 200
    finally:
        seen["engine"].close()
