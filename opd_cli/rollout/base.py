"""The rollout interface shared by the vLLM and Hugging Face engines.

A rollout engine samples responses from the *student* for a batch of tokenized prompts and reports,
for every sampled token, its log-probability under the engine's copy of the model. Both engines follow
the same contract, so the trainer can swap them (``rollout=vllm`` / ``rollout=hf``):

* ``Sample.logprobs[t]`` is ``log_softmax(logits_t)[response_ids[t]]`` of the engine's model, i.e. the
  **raw** model distribution at temperature 1, before temperature scaling, top-p truncation or any other
  sampling transform. It is exactly what the learner computes in a teacher-forced forward pass over
  ``prompt_ids + response_ids`` (up to float round-off and kernel differences), so the trainer can use
  it as the behaviour policy's log-prob (e.g. for a train/inference mismatch check or an importance
  ratio). Responses sampled at ``temperature != 1`` or ``top_p < 1`` therefore come from a *different*
  distribution than the one the log-probs describe; that is deliberate: the learner's loss is defined
  on the raw distribution.
* Determinism: the same (weights, prompts, sampling config, seed) gives the same samples, in the same
  process or in another one (a resumed run regenerates the same rollouts). Engines never touch the
  caller's global RNG state.
* ``sync_weights(model)`` pushes the learner's current parameters into the engine and returns the
  wall-clock seconds it took.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

ENGINE_KINDS = ("vllm", "hf")


@dataclass
class Sample:
    """One sampled response to one prompt."""

    prompt_ids: list[int]
    # The sampled response without padding; ends with the EOS token iff the model emitted it.
    response_ids: list[int]
    # Per response token: log-prob of the sampled token under the engine's model, raw distribution at
    # temperature 1 (log_softmax of the logits, no temperature / top-p applied). len == len(response_ids).
    logprobs: list[float]
    # "stop": the model emitted EOS (the last response id is EOS); "length": hit max_new_tokens (or, for
    # vLLM, its max_model_len context limit).
    finish_reason: str

    @property
    def num_tokens(self) -> int:
        return len(self.response_ids)


@dataclass
class SamplingConfig:
    """How to sample. ``greedy=True`` or ``temperature == 0`` means argmax decoding (``n`` copies)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    n: int = 1
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


def derive_seed(seed: int, *parts: int) -> int:
    """A stable 63-bit seed from ``seed`` and integer parts (e.g. prompt index, sample index).

    Uses a hash, not Python's ``hash()`` (salted per process), so it is the same in every process.
    """
    payload = ",".join(str(int(p)) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") >> 1


def extra_stop_ids(model_path, eos_token_id: int | None) -> list[int]:
    """End-of-sequence ids a model declares besides the tokenizer's (``generation_config.json``).

    Qwen3 instruct models end a turn with ``<|im_end|>`` (the tokenizer's EOS) but list ``<|endoftext|>``
    too; both engines stop at any of them, so a response that ends with the other one is "stop", not a
    run to ``max_new_tokens``.
    """
    if model_path is None:
        return []
    path = Path(str(model_path)) / "generation_config.json"
    if not path.is_file():
        return []
    try:
        declared = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return []
    declared = declared if isinstance(declared, list) else [declared]
    return [int(x) for x in declared if x is not None and int(x) != eos_token_id]


@contextlib.contextmanager
def torch_threads(num_threads: int | None):
    """Run a block with ``torch.set_num_threads(num_threads)`` (None: leave as is), then restore.

    On a small shared CPU box, tiny-model generation is dominated by OpenMP barrier spin-waits when
    other processes compete for the cores: one thread is then ~10x faster than two.
    """
    if num_threads is None or num_threads == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class RolloutEngine(ABC):
    """Samples student responses. See the module docstring for the contract."""

    kind: str = "?"
    eos_token_id: int
    extra_stop_token_ids: tuple[int, ...] = ()  # other end-of-sequence ids of the model (extra_stop_ids)

    @property
    def stop_token_ids(self) -> list[int]:
        """Every id that ends a response: the EOS id first, then the model's other declared ones."""
        return [self.eos_token_id, *(t for t in self.extra_stop_token_ids if t != self.eos_token_id)]

    @abstractmethod
    def generate(
        self, prompts: list[list[int]], sampling: SamplingConfig, seed: int, keys: list[int] | None = None
    ) -> list[list[Sample]]:
        """Sample ``sampling.n`` responses per prompt; returns ``[prompt][n]``. Sample j of prompt i is
        drawn with ``derive_seed(seed, keys[i], j)`` (``keys`` default: 0..len-1); a data-parallel rank
        passes the prompts' global batch positions, so a sample does not depend on the world size."""

    @abstractmethod
    def sync_weights(self, model: torch.nn.Module) -> float:
        """Push ``model``'s current weights into the engine; returns the seconds spent."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the engine's resources (idempotent)."""

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
