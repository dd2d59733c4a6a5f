"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


def build_tiny_model_dir(directory: str | Path, *, seed: int = 0, **config_overrides) -> Path:
    """Save a tiny random testbed model (Qwen2, char tokenizer) + its tokenizer into ``directory``."""
    import torch
    from transformers import Qwen2ForCausalLM

    from opd_cli.testbed.models import tiny_qwen2_config
    from opd_cli.testbed.tokenizer import save_char_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = save_char_tokenizer(directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(tiny_qwen2_config(len(tok), **config_overrides))
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random testbed model + tokenizer (vocab 102, hidden 64, 2 layers; loads in HF and vLLM).

    Session-scoped and shared: tests must not write into it (load the model and change the copy).
    """
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"), seed=0)
