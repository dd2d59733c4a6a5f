"""Data-parallel learner ranks: process group, the global batch split, gradient sync and weight gathering.

    opd run trainer.nproc=2 rollout=hf                         # opd starts the 2 ranks itself (CPU: gloo)
    torchrun --nproc_per_node=8 -m opd_cli.cli run trainer.device=cuda   # or torchrun starts them
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=node1:29500 --rdzv_id=opd1 \
        -m opd_cli.cli run experiment=qwen3_opd_8b_topk loss.support=intersection trainer.device=cuda \
        teacher.backend=vllm teacher.server=http://node0:8000 hydra.run.dir=/shared/outputs/opd1

Every rank holds the student, the teacher and its own rollout engine (a served teacher, `teacher.server`,
lives outside: each rank sends it its share of the step's responses). A step's global batch of
`trainer.prompts_per_step` prompts is a fixed function of (seed, step); rank r takes prompts r, r+W,
r+2W, ... and samples prompt i with the seed derive_seed(step seed, i, j) of its *global* index i, so
the rollouts of a global batch are the same for any world size W. The loss of each rank is rescaled by
(local count x W / global count), so DDP's gradient average equals the gradient of the global
token (or sequence) mean: a 2-rank run follows the 1-rank loss curve up to float round-off. With
`trainer.micro_batch_size` each micro-batch's loss is rescaled by its own count x W / global count, and
every rank runs as many micro-batches as the busiest one (forwards and backwards are collectives).

Learner wrapping (`trainer.parallel`): `ddp` (DistributedDataParallel; every rank keeps the full
weights, gradients are all-reduced in backward) or `fsdp` (FSDP2 `fully_shard` per decoder layer:
parameters, gradients and Adam states are sharded; each rank gathers the full state dict to push into
its vLLM engine). Only rank 0 writes metrics, evaluations, checkpoints and the summary.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from opd_cli.errors import OpdError


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def int_env(name: str, default: int = 1) -> int:
    return int(os.environ.get(name, str(default)))


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun (or by `spawn` below) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "cpu") -> None:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).
    nccl on CUDA (each rank on GPU LOCAL_RANK), gloo on CPU. Idempotent; a no-op for one process."""
    if not launched_by_torchrun() or dist.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def local_indices(total: int) -> list[int]:
    """The global batch positions this rank owns: r, r + W, r + 2W, ... (deterministic in (r, W))."""
    return list(range(rank(), total, world_size()))


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list without a process group)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def interleave(per_rank: list[list[Any]]) -> list[Any]:
    """Undo `local_indices`: rank r's k-th item is global item r + k * W."""
    total = sum(len(x) for x in per_rank)
    out: list[Any] = [None] * total
    for r, items in enumerate(per_rank):
        for k, item in enumerate(items):
            out[r + k * len(per_rank)] = item
    return out


def global_batch(per_prompt: list[Any]) -> list[Any]:
    """This rank's per-prompt items (prompts r, r+W, ...) gathered from every rank into global prompt order."""
    return interleave(all_gather_objects(per_prompt))


def micro_batch_slices(n: int, size: int) -> list[tuple[slice, bool]]:
    """(slice of this rank's n samples, real) per micro-batch of `size` sequences (0 = one micro-batch).
    Every rank runs as many micro-batches as the busiest rank, because DDP and FSDP forwards and backwards
    are collectives: a rank with fewer repeats its last one at weight 0 (real=False: no gradient, no
    metrics)."""
    if size <= 0:
        return [(slice(0, n), True)]
    parts = [(slice(start, min(start + size, n)), True) for start in range(0, n, size)]
    busiest = max(math.ceil(c / size) for c in all_gather_objects(n))
    return parts + [(parts[-1][0], False)] * (busiest - len(parts))


def gather_padded(
    per_token: dict[str, torch.Tensor], mask: torch.Tensor, items: list[Any]
) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[Any]]:
    """Every rank's [b_r, T_r] tensors, mask and per-row items as one batch in rank order, zero-padded
    to the widest T_r (the global batch's per-token diagnostics)."""
    parts = all_gather_objects(({k: v.detach().cpu() for k, v in per_token.items()}, mask.cpu(), list(items)))
    width = max(m.shape[1] for _, m, _ in parts)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))

    merged = {k: torch.cat([pad(d[k]) for d, _, _ in parts]) for k in parts[0][0]}
    return merged, torch.cat([pad(m) for _, m, _ in parts]), [c for _, _, cs in parts for c in cs]


def all_reduce_sum(value: float, device: torch.device) -> float:
    if world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def broadcast_object(obj: Any) -> Any:
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def wrap(module: torch.nn.Module, parallel: str, device: torch.device) -> torch.nn.Module:
    """Wrap the learner's forward module for data parallelism (a no-op for one process)."""
    if world_size() == 1:
        return module
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    if parallel == "fsdp":
        if not fsdp_available():
            raise OpdError(
                f"trainer.parallel=fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6, found "
                f"{torch.__version__}); use trainer.parallel=ddp"
            )
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world_size(),))
        for layer in decoder_layers(module):
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    raise OpdError(f"trainer.parallel={parallel!r} is not allowed; choose one of: ddp, fsdp")


def no_sync(module: torch.nn.Module, last: bool):
    """Gradient accumulation over micro-batches: DDP skips its gradient all-reduce in every backward but
    the last one (which reduces the accumulated gradients). FSDP2 reduce-scatters every micro-batch into
    the sharded gradients (skipping it would keep unsharded gradients on every rank); with one process
    there is nothing to sync. Every rank must run the same number of micro-batches."""
    if last or world_size() == 1 or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks (the FSDP sharding unit): every ModuleList's children under `module`."""
    layers = []
    for child in module.modules():
        if isinstance(child, torch.nn.ModuleList):
            layers.extend(child)
    return layers


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with sharded (DTensor) entries gathered to full tensors on every rank.
    Collective under FSDP: every rank must call it."""
    out = {}
    for name, tensor in model.state_dict().items():
        full = getattr(tensor, "full_tensor", None)
        out[name] = full() if callable(full) else tensor
    return out


def load_full_state_dict(model: torch.nn.Module, weights: dict[str, torch.Tensor]):
    """Load full tensors into `model` (scattered onto the shards of an FSDP2 model); returns
    (missing keys, unexpected keys). Not strict: a tied `lm_head.weight` may be absent."""
    sharded = any(hasattr(t, "full_tensor") for t in model.state_dict().values())
    if not sharded:
        return model.load_state_dict(weights, strict=False)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    return set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, nproc: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(
        {
            "RANK": str(local_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    fn(*args)


def spawn(nproc: int, fn: Callable, *args: Any) -> None:
    """Run fn(*args) in `nproc` fresh processes that form one process group on this machine (what
    torchrun --nproc_per_node=nproc does); raises if any rank fails."""
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(nproc, free_port(), fn, args), nprocs=nproc, start_method="spawn")
