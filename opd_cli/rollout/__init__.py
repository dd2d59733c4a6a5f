"""Rollout engines: sample student responses with per-token log-probs (vLLM or transformers).

``make_engine("vllm" | "hf", model_path, ...)`` builds one; see :mod:`opd_cli.rollout.base` for the
contract (log-prob semantics, determinism, weight sync). The engine modules are imported lazily, so
importing this package pulls in neither vLLM nor transformers.
"""

from opd_cli.rollout.base import (
    ENGINE_KINDS,
    RolloutEngine,
    Sample,
    SamplingConfig,
    derive_seed,
    make_engine,
)

__all__ = ["ENGINE_KINDS", "RolloutEngine", "Sample", "SamplingConfig", "derive_seed", "make_engine"]
