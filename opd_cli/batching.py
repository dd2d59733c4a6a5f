"""Packing (prompt, response) token lists into padded tensors, and reading response logits back out.

Right padding: a sequence is `prompt + response + pad`. The logits that predict response token t sit at
position `len(prompt) + t - 1`, so `response_positions` gathers exactly those rows for every sequence, and
student and teacher (whose prompts differ) are aligned on the same response tokens by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_cli.losses import lm_head_logits


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    response_index: torch.Tensor  # [B, T] positions whose logits predict response token t (0 where padded)
    response_ids: torch.Tensor  # [B, T] response tokens (pad_id where padded)
    response_mask: torch.Tensor  # [B, T] bool

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(
            *(
                t.to(device)
                for t in (
                    self.input_ids,
                    self.attention_mask,
                    self.response_index,
                    self.response_ids,
                    self.response_mask,
                )
            )
        )


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> PackedBatch:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if any(len(p) == 0 for p in prompts):
        raise ValueError(
            "empty prompt: every sequence needs at least one prompt token to predict the response"
        )
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    B, L, T = len(prompts), max(lengths), max((len(r) for r in responses), default=0)
    T = max(T, 1)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    response_index = torch.zeros((B, T), dtype=torch.long)
    response_ids = torch.full((B, T), pad_id, dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        seq = list(p) + list(r)
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
        if r:
            response_index[i, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
            response_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            response_mask[i, : len(r)] = True
    return PackedBatch(input_ids, attention_mask, response_index, response_ids, response_mask)


def gather_positions(per_position: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, L, ...] -> [B, T, ...]: the rows at `index` ([B, T]) of every sequence."""
    expand = index.view(*index.shape, *([1] * (per_position.dim() - 2))).expand(
        *index.shape, *per_position.shape[2:]
    )
    return per_position.gather(1, expand)


def response_hidden_and_logits(model: torch.nn.Module, batch: PackedBatch, *, logits: bool = True):
    """Run the causal LM once; return (hidden [B,T,H], logits [B,T,V] or None) at the response positions.

    With `logits=False` only the final hidden states are gathered (the chunked loss path computes logits
    from them chunk by chunk, so the full [B, L, V] tensor never exists).
    """
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    out = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    hidden = gather_positions(out.last_hidden_state, batch.response_index)
    if not logits:
        return hidden, None
    return hidden, model.get_output_embeddings()(hidden)


class ResponseForward(torch.nn.Module):
    """The learner's forward as a module, so DDP / FSDP wrap exactly what the loss differentiates:
    `forward(input_ids, attention_mask, response_index, logits)` -> (hidden [B,T,H], logits [B,T,V] | None)."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, response_index, logits: bool = True):
        batch = PackedBatch(input_ids, attention_mask, response_index, response_index, attention_mask)
        return response_hidden_and_logits(self.lm, batch, logits=logits)


def micro_batches(items: list, size: int) -> list[list]:
    """Consecutive micro-batches of `size` items (0: all at once), for gradient accumulation."""
    size = size if size > 0 else len(items)
    return [items[i : i + size] for i in range(0, len(items), size)]


def token_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    tokens: torch.Tensor,
    chunk_size: int = 0,
) -> torch.Tensor:
    """log p(token) [B, T] from the final hidden states [B, T, H] and the LM head.

    `chunk_size` > 0 computes the [rows, V] logits that many rows at a time and recomputes them in
    backward (activation checkpointing per chunk), so the batch's [B*T, V] logits, log-softmax and their
    gradient never exist: with V = 151,936 and 8k-token responses that is the difference between ~15 GiB
    per sequence and ~3.5 GiB per chunk of 2048 rows. Equal to the unchunked path in value and gradient.
    """
    if chunk_size <= 0:
        logits = head(hidden)
        return torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    from torch.utils.checkpoint import checkpoint

    b, t, h = hidden.shape
    flat_h, flat_t = hidden.reshape(b * t, h), tokens.reshape(b * t)
    parts = [
        checkpoint(
            _chunk_logprobs,
            flat_h[i : i + chunk_size],
            head.weight,
            head.bias,
            flat_t[i : i + chunk_size],
            use_reentrant=False,
        )
        for i in range(0, b * t, chunk_size)
    ]
    return torch.cat(parts).reshape(b, t)


def _chunk_logprobs(hidden, weight, bias, tokens):
    logits = lm_head_logits(hidden, weight, bias)
    return logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
