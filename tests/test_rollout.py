"""Rollout engines: shapes, finish reasons, log-prob semantics, determinism, weight sync (CPU, fp32).

The vLLM tests share one in-process engine (start-up ~20 s) through a module-scoped fixture.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import threads_for_tests

from opd_cli.rollout import SamplingConfig, make_engine
from opd_cli.rollout.base import torch_threads
from opd_cli.rollout.hf_engine import HFEngine

EOS = 2
# Prompts of different lengths, so batched generation pads (left) some rows.
PROMPTS = [
    [4, 60, 10, 11, 2, 5],
    [4, 61, 30, 31, 32, 33, 34, 35, 2, 5],
    [5],
    [4, 62, 70, 2, 5],
]
LOGPROB_ATOL_HF = 1e-5  # HF generate (KV cache, left padding) vs a teacher-forced forward, fp32
LOGPROB_ATOL_VLLM = 1e-4  # vLLM CPU kernels (packed GEMMs, paged attention) vs the HF learner, fp32


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on the 2 shared cores of a dev box, two threads are ~10x slower here."""
    with torch_threads(threads_for_tests()):
        yield


def load_model(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def teacher_forced_logprobs(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """What the learner computes: log_softmax of the logits at the positions that predict the response."""
    ids = torch.tensor([prompt_ids + response_ids])
    logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(response_ids) - 1)
    return logp[positions, torch.tensor(response_ids)]


def perturb_(model, std: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


def global_rng_states():
    return torch.random.get_rng_state().clone(), random.getstate(), np.random.get_state()[1].copy()


def assert_rng_unchanged(before) -> None:
    after = global_rng_states()
    assert torch.equal(before[0], after[0]), "torch global RNG state changed"
    assert before[1] == after[1], "python RNG state changed"
    assert np.array_equal(before[2], after[2]), "numpy RNG state changed"


def ids_of(groups) -> list[list[list[int]]]:
    return [[s.response_ids for s in group] for group in groups]


def check_sample_invariants(groups, prompts, sampling: SamplingConfig, eos: int = EOS) -> None:
    assert len(groups) == len(prompts)
    for group, prompt in zip(groups, prompts, strict=True):
        assert len(group) == sampling.n
        for s in group:
            assert s.prompt_ids == prompt
            assert 1 <= len(s.response_ids) <= sampling.max_new_tokens
            assert len(s.logprobs) == len(s.response_ids)
            assert all(lp <= 0.0 for lp in s.logprobs)
            assert eos not in s.response_ids[:-1], "tokens after EOS were not trimmed"
            if s.finish_reason == "stop":
                assert s.response_ids[-1] == eos
            else:
                assert s.finish_reason == "length"
                assert len(s.response_ids) == sampling.max_new_tokens and s.response_ids[-1] != eos


# --------------------------------------------------------------------------------------------- factory
def test_make_engine_unknown_kind(tiny_model_dir):
    with pytest.raises(ValueError, match=r"allowed kinds: vllm, hf"):
        make_engine("sglang", str(tiny_model_dir))


def test_sampling_config_validation():
    assert SamplingConfig(temperature=0.0).is_greedy and SamplingConfig(greedy=True).is_greedy
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"max_new_tokens": 0}, {"n": 0}):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


# ------------------------------------------------------------------------------------------ HF engine
@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir, hf_model):
    return make_engine("hf", str(tiny_model_dir), model=hf_model)


def test_hf_shapes_and_length_finish(hf_engine):
    sampling = SamplingConfig(max_new_tokens=3, n=3)
    groups = hf_engine.generate(PROMPTS, sampling, seed=0)
    check_sample_invariants(groups, PROMPTS, sampling)
    # A random tiny model almost never says EOS within 3 tokens.
    assert sum(s.finish_reason == "length" for g in groups for s in g) >= 10


def test_hf_stop_trims_at_eos(tiny_model_dir, hf_model, hf_engine):
    """A token the model samples mid-response, declared EOS: the response ends there with "stop",
    rows that are already done are padded inside the batch and trimmed."""
    sampling = SamplingConfig(max_new_tokens=12, n=2)
    base = hf_engine.generate(PROMPTS, sampling, seed=3)
    fake_eos = base[1][0].response_ids[4]
    engine = HFEngine(str(tiny_model_dir), model=hf_model, eos_token_id=fake_eos)
    groups = engine.generate(PROMPTS, sampling, seed=3)
    check_sample_invariants(groups, PROMPTS, sampling, eos=fake_eos)
    first = groups[1][0]
    assert first.finish_reason == "stop"
    assert first.response_ids == base[1][0].response_ids[: base[1][0].response_ids.index(fake_eos) + 1]
    assert any(s.finish_reason == "length" for g in groups for s in g)


def test_hf_stops_at_every_eos_the_model_declares(tiny_model_dir, hf_model, hf_engine, tmp_path):
    """generation_config.json may list several EOS ids (Qwen3: <|im_end|> and <|endoftext|>): a response
    ending with the second one stops there too, as "stop"; an explicit eos_token_id is the only stop."""
    import json
    import shutil

    from opd_cli.rollout.base import extra_stop_ids

    sampling = SamplingConfig(max_new_tokens=12, n=2)
    base = hf_engine.generate(PROMPTS, sampling, seed=3)
    second = base[1][0].response_ids[4]
    model_dir = tmp_path / "two_eos"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [EOS, second]}))
    assert extra_stop_ids(model_dir, EOS) == [second] and extra_stop_ids(tiny_model_dir, EOS) == []
    assert extra_stop_ids(tmp_path / "nowhere", EOS) == []
    engine = HFEngine(str(model_dir), model=hf_model)
    assert engine.eos_token_id == EOS and engine.stop_token_ids == [EOS, second]
    groups = engine.generate(PROMPTS, sampling, seed=3)
    first = groups[1][0]
    assert first.finish_reason == "stop" and first.response_ids[-1] == second
    assert first.response_ids == base[1][0].response_ids[: base[1][0].response_ids.index(second) + 1]
    assert HFEngine(str(model_dir), model=hf_model, eos_token_id=EOS).stop_token_ids == [EOS]


@pytest.mark.numerics
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (1.5, 0.8)])
def test_hf_logprobs_equal_teacher_forced(hf_model, hf_engine, temperature, top_p):
    """Raw log-probs (temperature 1, no top-p) whatever the sampling transform."""
    sampling = SamplingConfig(max_new_tokens=16, n=2, temperature=temperature, top_p=top_p)
    groups = hf_engine.generate(PROMPTS, sampling, seed=1)
    for group in groups:
        for s in group:
            expected = teacher_forced_logprobs(hf_model, s.prompt_ids, s.response_ids)
            torch.testing.assert_close(torch.tensor(s.logprobs), expected, atol=LOGPROB_ATOL_HF, rtol=0)


def test_hf_determinism_seeds_and_rng(hf_model, hf_engine):
    sampling = SamplingConfig(max_new_tokens=16, n=2, temperature=1.3, top_p=0.9)
    rng_before = global_rng_states()
    hf_model.train()
    a = hf_engine.generate(PROMPTS, sampling, seed=11)
    assert hf_model.training, "train/eval mode not restored"
    hf_model.eval()
    b = hf_engine.generate(PROMPTS, sampling, seed=11)
    c = hf_engine.generate(PROMPTS, sampling, seed=12)
    assert_rng_unchanged(rng_before)
    assert ids_of(a) == ids_of(b)
    assert [[s.logprobs for s in g] for g in a] == [[s.logprobs for s in g] for g in b]
    assert ids_of(a) != ids_of(c)
    assert a[0][0].response_ids != a[0][1].response_ids, "the n samples of a prompt should differ"
    # Per-(prompt, sample) seeds: the batch split does not change the samples.
    hf_engine.max_batch_size = 3
    try:
        assert ids_of(hf_engine.generate(PROMPTS, sampling, seed=11)) == ids_of(a)
    finally:
        hf_engine.max_batch_size = 256


def test_hf_greedy_and_tiny_top_p_agree(hf_engine):
    greedy = hf_engine.generate(PROMPTS, SamplingConfig(max_new_tokens=10, n=2, greedy=True), seed=0)
    assert all(g[0].response_ids == g[1].response_ids for g in greedy)
    nucleus = hf_engine.generate(PROMPTS, SamplingConfig(max_new_tokens=10, top_p=1e-6), seed=5)
    assert [g[0].response_ids for g in greedy] == [g[0].response_ids for g in nucleus]


def test_hf_sync_weights_into_owned_copy(tiny_model_dir):
    engine = make_engine("hf", str(tiny_model_dir))
    learner = load_model(tiny_model_dir)
    perturb_(learner, std=0.3, seed=0)
    seconds = engine.sync_weights(learner)
    assert seconds >= 0.0
    greedy = SamplingConfig(max_new_tokens=10, greedy=True)
    reference = HFEngine(None, model=learner, eos_token_id=EOS, pad_token_id=0)
    assert ids_of(engine.generate(PROMPTS, greedy, 0)) == ids_of(reference.generate(PROMPTS, greedy, 0))
    engine.close()


# ---------------------------------------------------------------------------------------- vLLM engine
@pytest.fixture(scope="module")
def vllm_run(tiny_model_dir):
    """One vLLM engine; greedy outputs before and after a sync of perturbed learner weights."""
    pytest.importorskip("vllm")
    learner = load_model(tiny_model_dir)
    engine = make_engine("vllm", str(tiny_model_dir), model=learner, seed=0)
    greedy = SamplingConfig(max_new_tokens=24, greedy=True)
    before = engine.generate(PROMPTS, greedy, seed=0)
    perturb_(learner, std=0.3, seed=1)  # in place, as an optimizer step would
    sync_seconds = engine.sync_weights(learner)
    after = engine.generate(PROMPTS, greedy, seed=0)
    yield {
        "engine": engine,
        "learner": learner,
        "greedy": greedy,
        "before": before,
        "after": after,
        "sync_seconds": sync_seconds,
    }
    engine.close()


@pytest.mark.numerics
@pytest.mark.vllm
def test_vllm_greedy_matches_hf_after_sync(vllm_run):
    learner, greedy = vllm_run["learner"], vllm_run["greedy"]
    hf = make_engine("hf", None, model=learner, eos_token_id=EOS, pad_token_id=0)
    expected = hf.generate(PROMPTS, greedy, seed=0)
    assert ids_of(vllm_run["after"]) == ids_of(expected)
    assert ids_of(vllm_run["after"]) != ids_of(vllm_run["before"]), "the sync did not change the outputs"
    assert 0.0 < vllm_run["sync_seconds"] < 30.0
    check_sample_invariants(vllm_run["after"], PROMPTS, greedy)
    for group in vllm_run["after"]:
        s = group[0]
        expected_lp = teacher_forced_logprobs(learner, s.prompt_ids, s.response_ids)
        torch.testing.assert_close(torch.tensor(s.logprobs), expected_lp, atol=LOGPROB_ATOL_VLLM, rtol=0)


@pytest.mark.numerics
@pytest.mark.vllm
def test_vllm_sampled_logprobs_and_determinism(vllm_run):
    engine, learner = vllm_run["engine"], vllm_run["learner"]
    sampling = SamplingConfig(max_new_tokens=16, n=2, temperature=1.0)
    rng_before = global_rng_states()
    a = engine.generate(PROMPTS, sampling, seed=21)
    b = engine.generate(PROMPTS, sampling, seed=21)
    c = engine.generate(PROMPTS, sampling, seed=22)
    assert_rng_unchanged(rng_before)
    assert ids_of(a) == ids_of(b)
    assert ids_of(a) != ids_of(c)
    check_sample_invariants(a, PROMPTS, sampling)
    for group in a:
        for s in group:
            # Raw log-probs at temperature 1, i.e. the learner's log_softmax of its logits.
            expected = teacher_forced_logprobs(learner, s.prompt_ids, s.response_ids)
            torch.testing.assert_close(torch.tensor(s.logprobs), expected, atol=LOGPROB_ATOL_VLLM, rtol=0)
    # Sampling at another temperature / with top-p: the log-probs are still the raw distribution's.
    hot_config = SamplingConfig(max_new_tokens=8, temperature=1.7, top_p=0.8)
    hot = engine.generate(PROMPTS[:1], hot_config, seed=3)[0][0]
    expected = teacher_forced_logprobs(learner, hot.prompt_ids, hot.response_ids)
    torch.testing.assert_close(torch.tensor(hot.logprobs), expected, atol=LOGPROB_ATOL_VLLM, rtol=0)


@pytest.mark.vllm
def test_vllm_finish_reasons(vllm_run):
    engine = vllm_run["engine"]
    short = SamplingConfig(max_new_tokens=2, n=2)
    groups = engine.generate(PROMPTS, short, seed=4)
    check_sample_invariants(groups, PROMPTS, short)
    # Declare a token the (greedy) model emits mid-response as EOS: the response ends with it, "stop".
    row = next(i for i, g in enumerate(vllm_run["after"]) if len(g[0].response_ids) >= 6)
    full = vllm_run["after"][row][0].response_ids
    fake_eos = full[3]
    engine.eos_token_id, real_eos = fake_eos, engine.eos_token_id
    try:
        cut = engine.generate([PROMPTS[row]], vllm_run["greedy"], seed=0)[0][0]
    finally:
        engine.eos_token_id = real_eos
    assert cut.finish_reason == "stop"
    assert cut.response_ids == full[: full.index(fake_eos) + 1]


@pytest.mark.numerics
@pytest.mark.vllm
def test_vllm_inplace_cpu_sync_equals_reload_weights(vllm_run):
    """The CPU in-place sync (vllm_cpu_sync) gives bit-identical samples and log-probs to reload_weights."""
    import copy

    engine, learner = vllm_run["engine"], vllm_run["learner"]
    assert engine.sync_method == "inplace", engine.sync_fallback_reason
    other = copy.deepcopy(learner)
    sampling = SamplingConfig(max_new_tokens=16, n=2, temperature=1.0)
    try:
        for seed in (5, 6):
            perturb_(other, std=0.2, seed=seed)
            engine.inplace_sync = True
            engine.sync_weights(other)
            inplace = engine.generate(PROMPTS, sampling, seed=seed)
            engine.inplace_sync = False
            assert engine.sync_method == "reload_weights"
            engine.sync_weights(other)
            reloaded = engine.generate(PROMPTS, sampling, seed=seed)
            assert ids_of(inplace) == ids_of(reloaded)
            assert [s.logprobs for g in inplace for s in g] == [s.logprobs for g in reloaded for s in g]
            s = inplace[0][0]
            expected = teacher_forced_logprobs(other, s.prompt_ids, s.response_ids)
            torch.testing.assert_close(torch.tensor(s.logprobs), expected, atol=LOGPROB_ATOL_VLLM, rtol=0)
    finally:
        engine.inplace_sync = True
        engine.sync_weights(learner)  # the other tests' engine state
    assert ids_of(engine.generate(PROMPTS, vllm_run["greedy"], seed=0)) == ids_of(vllm_run["after"])


@pytest.mark.vllm
def test_vllm_inplace_cpu_sync_refuses_what_it_cannot_map(vllm_run):
    from opd_cli.rollout.vllm_cpu_sync import NotApplicable, build_plan

    engine, learner = vllm_run["engine"], vllm_run["learner"]
    shapes = {n: tuple(t.shape) for n, t in engine._weights(learner)}

    def plan_for(shapes):
        return engine.llm.apply_model(lambda model: build_plan(model, shapes))[0]

    assert len(plan_for(shapes).targets) > 0
    with pytest.raises(NotApplicable, match="does not have"):
        plan_for({**shapes, "model.layers.9.mlp.down_proj.weight": (64, 128)})
    with pytest.raises(NotApplicable, match="no learner tensor feeds model.norm.weight"):
        plan_for({n: s for n, s in shapes.items() if n != "model.norm.weight"})
    with pytest.raises(NotApplicable, match="layer expects"):  # a missing shard shows in the fused shape
        plan_for({n: s for n, s in shapes.items() if "k_proj" not in n})
    wrong = dict(shapes)
    name = next(n for n in shapes if n.endswith("q_proj.weight"))
    wrong[name] = (shapes[name][0] + 1, shapes[name][1])
    with pytest.raises(NotApplicable, match="layer expects"):
        plan_for(wrong)
