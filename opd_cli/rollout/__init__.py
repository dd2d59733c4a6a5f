"""Rollout engines: sample student responses with per-token log-probs (vLLM or transformers).

``make_engine("vllm" | "hf", model_path, ...)`` builds one; see :mod:`opd_cli.rollout.base` for the
contract (log-prob semantics, determinism, weight sync). Importing this package pulls in neither vLLM
nor transformers: the engines import them when one is built.
"""

from __future__ import annotations

import torch

from opd_cli.rollout.base import ENGINE_KINDS, RolloutEngine, Sample, SamplingConfig, derive_seed
from opd_cli.rollout.hf_engine import HFEngine
from opd_cli.rollout.vllm_engine import VLLMEngine

__all__ = ["ENGINE_KINDS", "RolloutEngine", "Sample", "SamplingConfig", "derive_seed", "make_engine"]


def make_engine(
    kind: str,
    model_path: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    model: torch.nn.Module | None = None,
    **engine_opts,
) -> RolloutEngine:
    """Build a rollout engine.

    Args:
        kind: ``"vllm"`` (in-process ``vllm.LLM``) or ``"hf"`` (transformers ``generate``).
        model_path: directory with the model's config, weights and tokenizer (the engine's starting
            weights; later weights come through ``sync_weights``).
        device, dtype: where and in what precision the engine runs (``"cpu"``/``"float32"`` in tests;
            ``"cuda"``/``"bfloat16"`` on a GPU).
        model: the learner's module. The HF engine then generates with it directly (no copy, no sync
            cost); the vLLM engine loads ``model_path`` and then, if ``model`` is given, syncs its weights
            once, so the first rollouts come from the learner's current weights either way.
        engine_opts: engine-specific options (see ``HFEngine`` / ``VLLMEngine``).
    """
    if kind == "hf":
        return HFEngine(model_path, device=device, dtype=dtype, model=model, **engine_opts)
    if kind == "vllm":
        engine = VLLMEngine(model_path, device=device, dtype=dtype, **engine_opts)
        if model is not None:
            engine.sync_weights(model)
        return engine
    raise ValueError(f"unknown rollout engine kind {kind!r}; allowed kinds: {', '.join(ENGINE_KINDS)}")
