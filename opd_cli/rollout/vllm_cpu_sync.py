"""In-place weight sync into an in-process vLLM engine on the CPU backend.

Why this exists
---------------
``reload_weights`` (the generic path, used on GPUs) re-runs the model's whole loading machinery on every
sync: every layer goes to the meta device, is re-materialised, receives its tensors through its weight
loaders, and is processed again. On the CPU backend that costs a fixed ~17-30 ms for the 138k-parameter
testbed model (~75% of it the reload machinery, ~25% re-packing the GEMM weights), i.e. 3% of a
64-prompt step, more than the 2% budget.

What a sync really has to do on CPU is small: copy the new values into the parameters vLLM keeps
(embeddings, norms, biases) and rebuild the packed GEMM weight of each linear layer. vLLM-CPU packs
each linear's weight into a kernel-specific handle (``dispatch_cpu_unquantized_gemm``: oneDNN, sgl or
zentorch) and then drops the plain weight, so the handle is rebuilt with vLLM's own dispatch function
from the fused weight (q/k/v and gate/up concatenated in the shard order of the model's
``hf_to_vllm_mapper``, which is how its weight loaders lay them out with one tensor-parallel rank).
The kernel choice stays vLLM's.

The plan is built once, from the vLLM model and the learner's tensor names and shapes, and is used only
when every check passes: CPU, one rank, unquantized layers, every vLLM parameter fed by learner tensors
of matching shape and every learner tensor used. Otherwise :func:`build_plan` says why and the engine
keeps using ``reload_weights``. Equality with ``reload_weights`` (bit-identical log-probs) is tested in
tests/test_rollout.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_UNQUANTIZED = {"UnquantizedLinearMethod", "UnquantizedEmbeddingMethod"}


class NotApplicable(Exception):
    """The in-place path cannot serve this model; the message says why."""


@dataclass
class _Target:
    module: torch.nn.Module
    name: str  # parameter name in the module: "weight" or "bias"
    sources: list[str]  # learner tensor names, concatenated along dim 0
    rows: int  # rows the sources fill (the rest is vocabulary padding)
    repack: bool  # a linear whose plain weight vLLM dropped after packing


@dataclass
class CpuSyncPlan:
    targets: list[_Target]
    repack: list[torch.nn.Module] = field(default_factory=list)  # modules whose GEMM handle is rebuilt

    def apply(self, weights: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        for t in self.targets:
            parts = [weights[s] for s in t.sources]
            value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            if t.repack:
                t.module.weight = torch.nn.Parameter(value.clone(), requires_grad=False)
            else:
                getattr(t.module, t.name).data[: t.rows].copy_(value)
        for module in self.repack:
            # Dropped weights were restored above; vLLM packs them again and drops them again.
            dispatch_cpu_unquantized_gemm(module, remove_weight=_drops(module))


def _drops(module: torch.nn.Module) -> bool:
    """Whether vLLM drops this module's plain weight after packing (linear layers do, embeddings not)."""
    return type(getattr(module, "quant_method", None)).__name__ == "UnquantizedLinearMethod"


def _shard_order(shard) -> int:
    if isinstance(shard, str):
        if shard not in ("q", "k", "v"):
            raise NotApplicable(f"unknown shard id {shard!r}")
        return "qkv".index(shard)
    return int(shard)


def _vllm_names(model: torch.nn.Module, names) -> dict[str, list[str]]:
    """vLLM parameter name -> the learner tensors (HF names) that fill it, in row order.

    Uses the model's own ``hf_to_vllm_mapper`` (q/k/v -> qkv_proj shards "q","k","v"; gate/up ->
    gate_up_proj shards 0, 1), the table its weight loaders follow.
    """
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    if mapper is None or not hasattr(mapper, "_map_name_with_shard"):
        raise NotApplicable(f"{type(model).__name__} has no weights mapper")
    groups: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        mapped = mapper._map_name_with_shard(name)
        if mapped is None:
            continue  # the model's loader ignores this tensor too
        target, shard = mapped
        if isinstance(shard, list):
            raise NotApplicable(f"{name} is loaded into several shards")
        groups.setdefault(target, []).append((0 if shard is None else _shard_order(shard), name))
    out = {}
    for target, parts in groups.items():
        orders = [o for o, _ in parts]
        if len(set(orders)) != len(orders):
            raise NotApplicable(f"{target} receives two tensors for one shard")
        out[target] = [name for _, name in sorted(parts)]
    return out


def build_plan(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> CpuSyncPlan:
    """Map the learner's tensors (HF names -> shapes) onto ``model``'s parameters, or raise NotApplicable."""
    from vllm.distributed import get_tensor_model_parallel_world_size

    if get_tensor_model_parallel_world_size() != 1:
        raise NotApplicable("tensor parallel")
    feeds = _vllm_names(model, shapes)
    targets: list[_Target] = []
    repack: list[torch.nn.Module] = []
    fed: set[str] = set()
    for mod_name, module in model.named_modules(remove_duplicate=False):
        method = getattr(module, "quant_method", None)
        if method is not None and type(method).__name__ not in _UNQUANTIZED:
            raise NotApplicable(f"{mod_name} uses {type(method).__name__}")
        if getattr(module, "_cpu_skip_gemm_dispatch", False):
            raise NotApplicable(f"{mod_name} skips the CPU GEMM dispatch")
        has_gemm = hasattr(module, "cpu_linear")
        if has_gemm and all(m is not module for m in repack):
            repack.append(module)
        for pname, param in module.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            sources = feeds.get(full)
            if not sources:
                raise NotApplicable(f"no learner tensor feeds {full}")
            cols = {shapes[s][1:] for s in sources}
            if len(cols) != 1:
                raise NotApplicable(f"{full}: learner tensors of different widths")
            width = cols.pop()
            rows = sum(shapes[s][0] for s in sources)
            dropped = has_gemm and pname == "weight" and param.numel() == 0 and _drops(module)
            if dropped:
                want = (
                    getattr(module, "output_size_per_partition", None),
                    getattr(module, "input_size_per_partition", None),
                )
                if (rows, *width) != want:
                    raise NotApplicable(f"{full}: learner gives {(rows, *width)}, layer expects {want}")
            else:
                padded = isinstance(module, _vocab_types())  # vocabulary rows padded to a multiple of 64
                fits = rows == param.shape[0] or (padded and rows < param.shape[0])
                if tuple(param.shape[1:]) != width or not fits:
                    raise NotApplicable(
                        f"{full}: shape {tuple(param.shape)} vs {(rows, *width)} from learner"
                    )
            targets.append(_Target(module, pname, sources, rows, dropped))
            fed.add(full)
    unused = sorted(set(feeds) - fed)
    if unused:
        raise NotApplicable(f"learner tensors for {unused[0]}, which the vLLM model does not have")
    return CpuSyncPlan(targets, repack)


def _vocab_types() -> tuple[type, ...]:
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    return (VocabParallelEmbedding,)  # ParallelLMHead is a subclass
