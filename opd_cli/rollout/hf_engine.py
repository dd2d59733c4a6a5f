"""Rollouts with Hugging Face transformers ``generate`` (the fallback engine, and the reference in tests).

How it samples. ``generate`` runs in greedy mode (``do_sample=False``) with one custom logits processor,
:class:`_SeededSampler`, at the end of the chain: it applies temperature and top-p itself and draws the
next token of each row with a Gumbel-max draw from that row's own ``torch.Generator``, seeded from
``(seed, prompt index, sample index)``, then masks every other token so the greedy argmax returns the
draw. Consequences:

* the caller's global RNG state is never touched (no ``torch.multinomial`` on the global generator);
* sample j of prompt i depends only on (weights, prompt, sampling config, seed, i, j), not on how rows
  are split into batches (``max_batch_size``) or how much padding a batch needs (up to float
  round-off, ~1e-6 in fp32): the same per-request seeding as the vLLM engine;
* the reported log-probs come from ``output_logits`` (the model's raw logits, before any processor):
  ``log_softmax(logits)[token]``, what the learner computes in a teacher-forced forward pass.

Speed: see the table in :mod:`opd_cli.rollout.vllm_engine` (tiny testbed model, 2 shared CPU cores:
~0.1 s to start, ~7-10k tokens/s with ``num_threads=1`` on a busy box, ~25k greedy / ~15k sampled on an
idle one). The per-row Gumbel draws cost ~25% over greedy on the tiny model, negligible next to a real model's forward pass.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from opd_cli.rollout.base import (
    RolloutEngine,
    Sample,
    SamplingConfig,
    derive_seed,
    extra_stop_ids,
    torch_threads,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(_DTYPES)}") from None


class _SeededSampler:
    """A transformers logits processor that samples each row with its own generator (see module doc).

    Must be the last processor and used with ``do_sample=False``: it returns scores that are ``-inf``
    everywhere except at the sampled token, so the greedy argmax picks the sample.
    """

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators = generators
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            logits = _top_p_mask(logits, self.top_p)
        # Gumbel-max: argmax(logits + G), G = -log(-log U), is an exact sample from softmax(logits).
        uniforms = torch.stack(
            [
                torch.rand(logits.shape[-1], generator=g, device=logits.device, dtype=torch.float64)
                for g in self.generators
            ]
        )
        uniforms = uniforms.clamp_(min=torch.finfo(torch.float64).tiny, max=1.0 - 1e-16)
        gumbel = -torch.log(-torch.log(uniforms))
        choice = (logits.double() + gumbel).argmax(dim=-1)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, choice[:, None], 0.0)
        return out


def _top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches ``top_p``."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p  # the top-1 token always has mass_before == 0 and is kept
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


class HFEngine(RolloutEngine):
    """Rollouts with ``model.generate``.

    Args:
        model_path: a saved causal LM + tokenizer directory. Loaded unless ``model`` is given; its
            tokenizer (if present) supplies the EOS and pad ids.
        device, dtype: for a model loaded from ``model_path``; a given ``model`` is used as it is.
        model: the learner's own module. Generation then uses it directly: ``sync_weights`` has
            nothing to copy. Its train/eval mode is restored after each ``generate``.
        max_batch_size: rows (prompt x sample) per ``generate`` call.
        eos_token_id, pad_token_id: override the tokenizer's / config's ids.
        num_threads: torch intra-op threads during ``generate`` (None: the process setting).
    """

    kind = "hf"

    def __init__(
        self,
        model_path: str | Path | None,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        model: torch.nn.Module | None = None,
        max_batch_size: int = 256,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        num_threads: int | None = None,
    ):
        t0 = time.perf_counter()
        if model is None:
            if model_path is None:
                raise ValueError("HFEngine needs a model_path or a model")
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=resolve_dtype(dtype))
            model.to(device)
            model.eval()
            self._owns_model = True
        else:
            self._owns_model = False
        self.model = model
        self.max_batch_size = int(max_batch_size)
        self.num_threads = num_threads
        eos, pad = self._special_ids(model_path, model)
        self.eos_token_id = eos if eos_token_id is None else int(eos_token_id)
        self.pad_token_id = pad if pad_token_id is None else int(pad_token_id)
        if self.eos_token_id is None:
            raise ValueError("HFEngine: no EOS token id (no tokenizer in model_path, none in the config)")
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id
        if eos_token_id is None:  # an explicit EOS id is the only stop id
            self.extra_stop_token_ids = tuple(extra_stop_ids(model_path, self.eos_token_id))
        self.start_seconds = time.perf_counter() - t0

    @staticmethod
    def _special_ids(model_path, model) -> tuple[int | None, int | None]:
        eos = pad = None
        if model_path is not None and (Path(model_path) / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(model_path))
            eos, pad = tok.eos_token_id, tok.pad_token_id
        config = getattr(model, "config", None)
        if eos is None and config is not None:
            eos = config.eos_token_id
            if isinstance(eos, (list, tuple)):
                eos = eos[0] if eos else None
        if pad is None and config is not None:
            pad = getattr(config, "pad_token_id", None)
        return eos, pad

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(
        self, prompts: list[list[int]], sampling: SamplingConfig, seed: int, keys: list[int] | None = None
    ) -> list[list[Sample]]:
        if not prompts:
            return []
        keys = list(range(len(prompts))) if keys is None else [int(k) for k in keys]
        if len(keys) != len(prompts):
            raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        greedy = sampling.is_greedy
        # Rows: (prompt index, sample index). Greedy samples are identical: generate one per prompt.
        n_rows = 1 if greedy else sampling.n
        rows = [(i, j) for i in range(len(prompts)) for j in range(n_rows)]
        results: dict[tuple[int, int], Sample] = {}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), torch_threads(self.num_threads):
                for start in range(0, len(rows), self.max_batch_size):
                    chunk = rows[start : start + self.max_batch_size]
                    seeds = [(keys[i], j) for i, j in chunk]
                    samples = self._generate_rows([prompts[i] for i, _ in chunk], seeds, sampling, seed)
                    results.update(zip(chunk, samples, strict=True))
        finally:
            self.model.train(was_training)
        out = []
        for i in range(len(prompts)):
            if greedy:
                s = results[(i, 0)]
                out.append([s] + [_copy_sample(s) for _ in range(sampling.n - 1)])
            else:
                out.append([results[(i, j)] for j in range(sampling.n)])
        return out

    def _generate_rows(self, prompts, keys, sampling: SamplingConfig, seed: int) -> list[Sample]:
        from transformers import GenerationConfig, LogitsProcessorList

        device = self.device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding
            input_ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[r, width - len(p) :] = 1
        processors = LogitsProcessorList()
        if not sampling.is_greedy:
            generators = []
            for i, j in keys:
                g = torch.Generator(device=device)
                g.manual_seed(derive_seed(seed, i, j))
                generators.append(g)
            processors.append(_SeededSampler(generators, sampling.temperature, sampling.top_p))
        # Every value that a model's generation_config.json could otherwise fill in is set explicitly.
        gen_config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=0,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
        out = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=gen_config,
            logits_processor=processors,
        )
        new_tokens = out.sequences[:, width:].cpu()
        steps = len(out.logits)
        logits = torch.stack(out.logits, dim=1)  # [rows, steps, vocab], raw fp32 logits
        token_logprobs = (
            torch.log_softmax(logits.float(), dim=-1)
            .gather(-1, new_tokens[:, :steps, None].to(logits.device))
            .squeeze(-1)
            .cpu()
        )
        samples = []
        stops = set(self.stop_token_ids)
        for r, prompt in enumerate(prompts):
            ids = new_tokens[r, :steps].tolist()
            end = next((k for k, t in enumerate(ids) if t in stops), None)
            if end is not None:
                length, finish = end + 1, "stop"
            else:
                length, finish = len(ids), "length"
            samples.append(
                Sample(
                    prompt_ids=list(prompt),
                    response_ids=ids[:length],
                    logprobs=token_logprobs[r, :length].tolist(),
                    finish_reason=finish,
                )
            )
        return samples

    def sync_weights(self, model: torch.nn.Module) -> float:
        """Generate with ``model``'s current weights.

        If the engine wraps ``model`` itself (the usual case for rollout=hf), there is nothing to do. A
        borrowed module is swapped for ``model`` by reference; an engine-owned copy (loaded from
        ``model_path``) receives ``model.state_dict()`` in place.
        """
        t0 = time.perf_counter()
        if model is not self.model:
            if self._owns_model:
                with torch.no_grad():
                    self.model.load_state_dict(model.state_dict())
            else:
                self.model = model
        return time.perf_counter() - t0

    def close(self) -> None:
        if self._owns_model:
            self.model = None  # type: ignore[assignment]


def _copy_sample(s: Sample) -> Sample:
    return Sample(list(s.prompt_ids), list(s.response_ids), list(s.logprobs), s.finish_reason)
