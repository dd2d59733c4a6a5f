"""`opd preflight --pilot-steps N` (part C): the first N steps of the recipe's own OPD loop, read for the
trends of the warning signs the collapse detector uses.

    opd preflight experiment=opd_naive_topk_k5 --pilot-steps 30
    opd preflight experiment=matrix --pilot-steps 30          # every cell, each in its own temp dir

The steps are `stages.opd.OPDRun.train_step`, unchanged: the recipe's rollouts, teacher, loss, optimizer
and learning-rate schedule (over trainer.steps, so step i is the run's step i). They run in a temporary
run directory that is removed afterwards (no evaluation, no checkpoint, no tracker; nothing is left
behind, also on an error). For each sign, over the N steps: the first and last value, the least-squares
slope per step and its standard error, over all N steps and over the last N/2 (a collapse accelerates:
on the testbed the naive TopK student's top-K mass holds at 0.998 for 15 steps, then falls to 0.90 by
step 30); `stages.predict.rule_pilot` extrapolates the late slope to trainer.steps against the
detector's thresholds (diagnostics.*_threshold). N >= 6 for a slope. A recipe with an SFT stage
first (stabilization=sft) is skipped: its OPD stage starts from a checkpoint that does not exist yet.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig, open_dict

from opd_cli.stages.opd import OPDRun
from opd_cli.stages.predict import slope

# sign -> metric of the step (stages/opd.py); the first three are the collapse detector's inputs
SIGNS = {
    "student top-K mass": "student_mass_in_support",
    "truncation": "truncation_ratio",
    "repeats": "repeat_ratio",
    "top-K overlap": "topk_overlap",
    "hedging": "hedging_rate",
    "length": "response_length",
}


def skip_reason(cfg: DictConfig) -> str | None:
    if cfg.stage != "opd":
        return f"stage={cfg.stage}: the pilot runs OPD / OPSD steps"
    if cfg.stabilization.kind == "sft":
        return "stabilization=sft: the OPD stage starts from the SFT checkpoint, which does not exist yet"
    return None


def pilot(cfg: DictConfig, steps: int) -> dict:
    """The recipe's first `steps` training steps in a temporary directory; the signs' trends."""
    why = skip_reason(cfg)
    if why is not None:
        return {"status": f"skipped: {why}", "steps": 0}
    started = time.monotonic()
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.pop("hydra", None)  # composed with Hydra's own config; a job's config has none
        cfg.logger.kind = "none"  # metrics.jsonl only, in the temporary directory
        cfg.resume = None
    history: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="opd-pilot-") as tmp:
        run = OPDRun(cfg, Path(tmp))
        try:
            for _ in range(steps):
                history.append(run.train_step())
                run.step += 1
        finally:
            run.close()
    signs = {}
    for name, key in SIGNS.items():
        values = [float(m[key]) for m in history if isinstance(m.get(key), (int, float)) and m[key] == m[key]]
        if len(values) >= 6:
            b, se = slope(values)
            recent, recent_se = slope(values[len(values) // 2 :])  # a collapse accelerates: the late trend
            signs[name] = {
                "first": values[0],
                "last": values[-1],
                "slope": b,
                "slope_se": se,
                "recent_slope": recent,
                "recent_slope_se": recent_se,
                "values": values,
            }
    d = cfg.diagnostics
    return {
        "status": f"{steps} steps",
        "steps": steps,
        "run_steps": int(cfg.trainer.steps),
        "signs": signs,
        "thresholds": {
            "mass_threshold": float(d.mass_threshold),
            "truncation_threshold": float(d.truncation_threshold),
            "repeat_threshold": float(d.repeat_threshold),
        },
        "wall_s": round(time.monotonic() - started, 1),
    }
