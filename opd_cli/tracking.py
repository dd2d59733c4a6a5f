"""Experiment tracking: always a local `metrics.jsonl`, plus Weights & Biases when `logger=wandb`.

wandb's mode `auto` means online when credentials exist (WANDB_API_KEY or a netrc entry) and offline
otherwise, so a laptop without an account never blocks on a login prompt. A resumed run truncates
`metrics.jsonl` back to its checkpoint step, so the file always reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import secrets
from pathlib import Path
from typing import Any

from opd_cli import rundir
from opd_cli.io import atomic_write_json, atomic_write_text


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _clean(value: Any) -> Any:
    """JSON-safe scalars: NaN/inf become null-like strings rather than invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Tracker:
    def __init__(
        self,
        run_dir: Path,
        config: dict,
        logger_cfg,
        *,
        name: str | None = None,
        resume_step: int | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / rundir.METRICS
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()
        self._file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in finish()
        self._wandb = None
        if logger_cfg.kind == "wandb":
            self._wandb = self._init_wandb(config, logger_cfg, name)

    def _truncate_after(self, step: int) -> None:
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", -1) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                break  # a torn last line from a kill: drop it and everything after
        atomic_write_text(self.metrics_path, "".join(f"{x}\n" for x in kept))

    def _init_wandb(self, config: dict, logger_cfg, name: str | None):
        import wandb

        mode = logger_cfg.mode
        if mode == "auto":
            mode = "online" if _has_wandb_credentials() else "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        id_file = self.run_dir / rundir.WANDB_ID
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
        atomic_write_text(id_file, run_id)
        return wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            group=logger_cfg.group,
            name=name,
            id=run_id,
            resume="allow",
            dir=str(self.run_dir),
            mode=mode,
            config=config,
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        atomic_write_json(self.run_dir / rundir.SUMMARY, values)
        if self._wandb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float, str)):
                    self._wandb.summary[k] = v

    def finish(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


class NullTracker:
    """What data-parallel ranks > 0 log to: nothing (rank 0 writes metrics.jsonl and wandb)."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass
