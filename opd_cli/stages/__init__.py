"""The stages of `opd run`, one file each, and `run_stage`, which picks the one `stage=` names.

    opd run                                        # stage=opd (stabilization=none): OPD from the SFT'd student
    opd run model=student_base stabilization=sft   # SFT on verified teacher traces, then OPD
    opd run stage=rlvr trainer.steps=100           # GRPO: builds an RLVR-adapted teacher (run_dir/model)
    opd run stage=sft                              # only the SFT stage (run_dir/model)

sft.py (supervised fine-tuning, also the testbed's pretraining), rlvr.py (GRPO with a verifiable
reward), opd.py (on-policy distillation and self-distillation), evaluate.py (`opd eval` and every
stage's evaluations), probe.py (`opd probe`, the prefix probe), pi_probe.py (`opd probe-pi`, the
PI-dependence probe), preflight.py (`opd preflight`, the checks before a run) with pilot.py (its
--pilot-steps) and predict.py (its prediction and calibration); common.py holds their shared setup.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from opd_cli import distributed, rundir
from opd_cli.errors import OpdError
from opd_cli.io import atomic_write_json, atomic_write_text
from opd_cli.quiet import quiet_third_party
from opd_cli.run_summary import format_summary
from opd_cli.stages import opd, rlvr, sft

log = logging.getLogger("opd")


def check_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """A directory that already holds a run is never overwritten silently."""
    if rundir.holds_run(run_dir, own_status=True) and not cfg.resume and not cfg.overwrite:
        raise OpdError(
            f"{run_dir} already holds a run; pass resume={run_dir} to continue it, overwrite=true to "
            f"replace it, or choose another hydra.run.dir"
        )


def run_stage(cfg: DictConfig, run_dir: Path) -> dict:
    quiet_third_party()  # after Hydra's job logging replaced the handlers vLLM configured
    run_dir = Path(run_dir)
    if distributed.is_main():  # data-parallel ranks > 0 write nothing
        check_run_dir(cfg, run_dir)
        atomic_write_text(run_dir / rundir.CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.stage == "opd":
        start = None
        if cfg.stabilization.kind == "sft":  # rank 0 trains the SFT student once; the others wait for it
            start = sft.stabilize(cfg, run_dir) if distributed.is_main() else None
            start = distributed.broadcast_object(start)
        summary = opd.run(cfg, run_dir, start)
        if not distributed.is_main():
            return summary
    elif cfg.stage == "sft":
        summary = {"model": sft.stabilize(cfg, run_dir, out_name=rundir.MODEL)}
    elif cfg.stage == "rlvr":
        summary = rlvr.run(cfg, run_dir)
    else:  # validate() already rejects it; kept for a clear message if called directly
        raise OpdError(f"stage={cfg.stage!r} is not allowed; choose one of: opd, sft, rlvr")
    atomic_write_json(run_dir / rundir.SUMMARY, summary)
    log.info("results: %s", run_dir)
    if cfg.stage == "opd":  # what happened to the student, readable without opening a file
        print(format_summary(run_dir, summary))
    else:
        print(f"results: {run_dir}")
    return summary
