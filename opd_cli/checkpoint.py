"""Atomic checkpoints and exact resume.

A checkpoint is a directory `checkpoints/step_000050/` holding the model in Hugging Face format
(loadable by transformers and vLLM), its tokenizer, and `trainer_state.pt` (optimizer, scheduler, RNG
states, step, stage-specific extras). It is written under a temporary name and renamed into place, and
`checkpoints/latest` is replaced atomically after that, so a kill at any moment leaves the previous
checkpoint intact and `latest` pointing at a complete one. What a kill leaves behind is a hidden
`.*.tmp` entry, which the next save or a resume removes (`discard_partial_writes`).
"""

from __future__ import annotations

import errno
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from opd_cli.errors import OpdError
from opd_cli.io import atomic_write_text

KEEP_LAST = 2


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    ckpt_root: Path, step: int, model, tokenizer, trainer_state: dict, state_dict: dict | None = None
) -> Path:
    """Write `model` (or the gathered full `state_dict` of a sharded one) + tokenizer + trainer state."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f".step_{step:06d}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / "trainer_state.pt")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write_text(ckpt_root / "latest", final.name + "\n")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        why = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise OpdError(
            f"could not write checkpoint {final} ({why}); the previous checkpoint is intact, "
            f"free space or fix permissions and resume with resume=<run dir>"
        ) from exc
    _prune(ckpt_root, keep=KEEP_LAST)
    return final


def discard_partial_writes(ckpt_root: Path) -> None:
    """Remove the `.*.tmp` files and directories a killed writer left in `ckpt_root`.

    A run directory has one writer (run directories are claimed), so any such entry outside a save
    in progress is debris of an interrupted one.
    """
    for debris in Path(ckpt_root).glob(".*.tmp"):
        if debris.is_dir() and not debris.is_symlink():
            shutil.rmtree(debris, ignore_errors=True)
        else:
            debris.unlink(missing_ok=True)


def _prune(ckpt_root: Path, keep: int) -> None:
    discard_partial_writes(ckpt_root)
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = Path(ckpt_root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(ckpt_root) / pointer.read_text().strip()
    return path if (path / "trainer_state.pt").is_file() else None


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(Path(ckpt) / "trainer_state.pt", map_location="cpu", weights_only=False)


def resume_point(ckpt_root: Path, stage: str, *, required: bool = True) -> tuple[Path | None, dict | None]:
    """(latest complete checkpoint, its trainer state) to continue a killed `stage` from, after removing
    a killed writer's debris; (None, None) when there is none and `required` is False."""
    ckpt = latest_checkpoint(ckpt_root)
    discard_partial_writes(ckpt_root)
    if ckpt is None:
        if required:
            raise OpdError(f"resume: no complete checkpoint in {ckpt_root}; start a new run")
        return None, None
    state = load_trainer_state(ckpt)
    if state.get("stage", stage) != stage:
        raise OpdError(
            f"resume: {ckpt} is a stage={state['stage']} checkpoint, not {stage}; resume with the run's config"
        )
    return ckpt, state
