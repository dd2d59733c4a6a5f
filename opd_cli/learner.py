"""The PyTorch learner: model loading, device and precision, AdamW with a warmup schedule, a guarded step.

Used by every stage (pretraining and SFT of the testbed, OPD/OPSD, RLVR): one optimizer step is
`loss.backward()` (once, or once per micro-batch with `backward`) -> non-finite check -> gradient
clipping -> `optimizer.step()` -> scheduler step.
A NaN/inf loss or gradient never reaches the weights: the step raises `NonFiniteError` instead.
On CUDA the forward runs under bf16 autocast with fp32 master weights; on CPU everything is fp32.
Frozen models (the OPD teacher) have no master weights: `weights_dtype` loads them in bf16 on CUDA.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch

from opd_cli.errors import OpdError


class NonFiniteError(RuntimeError):
    """The loss or the gradient was NaN/inf; the optimizer step was not taken."""


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise OpdError("trainer.device=cuda but CUDA is not available; use trainer.device=auto or cpu")
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda":  # a data-parallel rank (torchrun or trainer.nproc) uses GPU LOCAL_RANK
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(preference)


def teacher_device(preference: str, learner: torch.device) -> torch.device:
    """`teacher.device`: same (the learner's device), cpu, cuda (the learner's GPU, else cuda:0) or cuda:N."""
    if preference == "same":
        return learner
    if preference == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise OpdError(
            f"teacher.device={preference} but CUDA is not available; use teacher.device=same or cpu"
        )
    device = torch.device(preference)
    if device.index is None:
        return learner if learner.type == "cuda" else torch.device("cuda", 0)
    count = torch.cuda.device_count()
    if device.index >= count:
        raise OpdError(
            f"teacher.device={preference} but this machine has {count} GPU(s) (cuda:0..cuda:{count - 1}); "
            f"pick one of them or teacher.device=same"
        )
    return device


def autocast_dtype(device: torch.device, preference: str = "auto") -> torch.dtype | None:
    """The autocast dtype for forward passes (None = plain fp32)."""
    if preference == "float32":
        return None
    if preference in ("bfloat16", "float16"):
        return getattr(torch, preference)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_local_path(path: str | Path) -> None:
    """A model path written as a local path (absolute, ./, ../, ~, or more than one '/') must exist: a
    missing directory is said as such, not as the hub's "Repo id must use alphanumeric chars"."""
    text = str(path)
    if Path(text).expanduser().exists():
        return
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text:
        raise OpdError(
            f"no such model directory: {text}; pass a Hugging Face model directory (save_pretrained) or "
            f"testbed:<name>; a hub id (org/name) is read only from the local Hugging Face cache on a "
            f"machine without hub access, so download it first where there is one"
        )


def check_model_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise OpdError(
            f"model directory not found: {path}; pass a Hugging Face model directory or testbed:<name>"
        )
    if not (path / "config.json").is_file():
        raise OpdError(
            f"{path} is not a model directory (no config.json); pass a directory saved by "
            f"save_pretrained or a checkpoint from a run's checkpoints/ folder"
        )
    return path


def weights_dtype(device: torch.device, preference: str = "auto") -> torch.dtype:
    """The dtype of frozen weights (the teacher's): auto = bf16 on CUDA (when supported), else fp32."""
    if preference != "auto":
        return getattr(torch, preference)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(
    path: str | Path, device: torch.device, *, trainable: bool = True, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """A causal LM, by default in fp32 master weights (autocast handles bf16 compute on CUDA); frozen
    models (the teacher) may be loaded in `dtype` directly."""
    from transformers import AutoModelForCausalLM

    check_local_path(path)
    path = check_model_dir(path) if Path(str(path)).expanduser().exists() else path
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except OSError as exc:
        raise OpdError(
            f"could not load model {path}: {str(exc).splitlines()[0]}; check the path or, for a hub "
            f"id, that it is downloaded (offline machines cannot fetch weights)"
        ) from exc
    model.to(device)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    check_local_path(path)
    if Path(str(path)).expanduser().exists():  # a local directory: say what is wrong with it, as load_model
        check_model_dir(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise OpdError(f"could not load a tokenizer from {path}: {str(exc).splitlines()[0]}") from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    warmup = int(round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress  # linear

    return factor


class Learner:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        lr: float,
        total_steps: int,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-8,
        grad_clip: float = 1.0,
        warmup_ratio: float = 0.0,
        schedule: str = "constant",
        amp_dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.device = next(model.parameters()).device
        self.amp_dtype = amp_dtype
        self.grad_clip = grad_clip
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=False
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total_steps, warmup_ratio, schedule)
        )

    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Check the loss and accumulate its gradient (one call per micro-batch, then `step()`)."""
        if not torch.isfinite(loss.detach()).all():
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"non-finite loss ({loss.item()}); the step was skipped")
        loss.backward()

    def step(self, loss: torch.Tensor | None = None) -> dict[str, float]:
        """Backward (unless the gradients were accumulated with `backward`), check, clip, update.
        Returns grad norm (before clipping) and the lr used."""
        if loss is not None:
            self.backward(loss)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
            grad_norm = grad_norm.full_tensor()
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"non-finite gradient norm ({grad_norm.item()}); the step was skipped")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(grad_norm), "lr": float(lr)}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def full_state_dict(self) -> dict:
        """The optimizer state with FSDP-sharded entries gathered (collective: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        return {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "full": True}

    def load_state_dict(self, state: dict) -> None:
        if state.get("full"):  # written by full_state_dict: scatter it onto this rank's shards
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                self.model, self.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
            )
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
