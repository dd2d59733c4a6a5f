"""Tiny Qwen2-family model configs for the testbed (a architecture vLLM and transformers both run).

vLLM's CPU attention needs head_dim >= 32, so heads are sized from the hidden width, not the other way.
"""

from __future__ import annotations

from transformers import Qwen2Config


def tiny_qwen2_config(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    head_dim: int = 32,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    pad_token_id: int = 0,
    eos_token_id: int = 2,
) -> Qwen2Config:
    if hidden_size % head_dim:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of head_dim={head_dim}")
    if head_dim < 32:
        raise ValueError(f"head_dim={head_dim} is too small: vLLM's CPU attention needs head_dim >= 32")
    heads = hidden_size // head_dim
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        torch_dtype="float32",
        use_sliding_window=False,
    )
