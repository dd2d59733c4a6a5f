"""One `opd run` job: pick the stage, run the stabilization first when configured, write the summary.

    opd run                                        # stage=opd (stabilization=none): OPD from the SFT'd student
    opd run model=student_base stabilization=sft   # SFT on verified teacher traces, then OPD
    opd run stage=rlvr trainer.steps=100           # GRPO: builds an RLVR-adapted teacher (run_dir/model)
    opd run stage=sft                              # only the SFT stage (run_dir/model)
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from opd_cli.errors import OpdError
from opd_cli.io import atomic_write_json, atomic_write_text

log = logging.getLogger("opd")
DONE_MARKER = "DONE"


def check_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """A directory that already holds a run is never overwritten silently."""
    used = (run_dir / "metrics.jsonl").exists() or (run_dir / "summary.json").exists()
    if used and not cfg.resume and not cfg.overwrite:
        raise OpdError(f"{run_dir} already holds a run; pass resume={run_dir} to continue it, overwrite=true to "
                       f"replace it, or choose another hydra.run.dir")


def run_stage(cfg: DictConfig, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    check_run_dir(cfg, run_dir)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.stage == "opd":
        from opd_cli.stages import opd

        start = sft_stabilization(cfg, run_dir) if cfg.stabilization.kind == "sft" else None
        summary = opd.run(cfg, run_dir, start)
    elif cfg.stage == "sft":
        summary = {"model": sft_stabilization(cfg, run_dir, out_name="model")}
    elif cfg.stage == "rlvr":
        from opd_cli.stages.rlvr import run_rlvr_stage

        summary = run_rlvr_stage(cfg, run_dir)
    else:  # validate() already rejects it; kept for a clear message if called directly
        raise OpdError(f"stage={cfg.stage!r} is not allowed; choose one of: opd, sft, rlvr")
    atomic_write_json(run_dir / "summary.json", summary)
    log.info("results: %s", run_dir)
    print(f"results: {run_dir}")
    return summary


def sft_stabilization(cfg: DictConfig, run_dir: Path, out_name: str = "sft_student") -> str:
    """SFT the student on verifier-filtered teacher traces (or reference solutions); returns the new
    model directory. A finished stage (DONE marker) is reused when a killed run resumes."""
    from opd_cli.stages.sft import run_sft_stage

    out = run_dir / out_name
    if (out / DONE_MARKER).exists():
        log.info("stabilization: reusing %s", out)
        return str(out)
    run_sft_stage(cfg, out)
    atomic_write_text(out / DONE_MARKER, "ok\n")
    return str(out)
