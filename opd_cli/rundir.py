"""The run directory's layout, in one place: what every file is called, whether a directory already holds
a run, clearing it for `overwrite=true`, and reading a finished (or killed) run back.

    <run dir>/
      .hydra/config.yaml, overrides.yaml   Hydra's record of the job (overrides.yaml: what resume= replays)
      .opd.lock                            flock held by the live process that claimed the directory
      config.yaml                          the resolved config the stage ran with
      status.json                          running -> ok | failed (with the error line and wall time)
      metrics.jsonl                        one JSON row per logged step
      eval/step_000020.json                one evaluation per eval step
      checkpoints/step_000040/             model, tokenizer and trainer_state.pt (checkpoint.py)
      summary.json                         the stage's results
      sft_student/                         stabilization=sft: the SFT'd student (DONE marker when finished)
      model/                               stage=sft / stage=rlvr: the trained model
      wandb/, wandb_id                     the wandb run (logger=wandb)
      opd.log                              the run log
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from opd_cli.io import atomic_write_text

HYDRA = ".hydra"
OVERRIDES = f"{HYDRA}/overrides.yaml"
LOCK = ".opd.lock"
CONFIG = "config.yaml"
STATUS = "status.json"
METRICS = "metrics.jsonl"
EVAL = "eval"
CHECKPOINTS = "checkpoints"
SUMMARY = "summary.json"
SFT_STUDENT = "sft_student"
MODEL = "model"
WANDB = "wandb"
WANDB_ID = "wandb_id"
LOG = "opd.log"
# inside an SFT output directory (sft_student/ or model/)
DONE = "DONE"
TRACES = "traces.json"
SFT_STATS = "sft_stats.json"

# What a previous run left in its directory; `overwrite=true` removes it so that nothing of the old run
# (its checkpoints above all: `latest` and pruning would mix steps of both runs) survives into the new one.
PREVIOUS_RUN_OUTPUTS = (METRICS, SUMMARY, CONFIG, CHECKPOINTS, EVAL, SFT_STUDENT, MODEL, WANDB, WANDB_ID)


def eval_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / EVAL / f"step_{step:06d}.json"


def holds_run(run_dir: Path, *, own_status: bool = False) -> bool:
    """Whether `run_dir` already holds a run (metrics, a summary, or a job status). `own_status`: the
    caller is the job itself, whose launcher has already written this run's `status.json`."""
    names = (METRICS, SUMMARY) if own_status else (METRICS, SUMMARY, STATUS)
    return any((Path(run_dir) / name).exists() for name in names)


def has_outputs(run_dir: Path) -> bool:
    """Whether the run produced anything beyond Hydra's config, the log and its status (metrics,
    checkpoints, evaluations, an SFT student); a run that failed without outputs is removable."""
    return any((Path(run_dir) / name).exists() for name in (METRICS, CHECKPOINTS, EVAL, SFT_STUDENT))


def clear(run_dir: Path) -> None:
    """Remove a previous run's outputs (`overwrite=true`)."""
    for name in PREVIOUS_RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_status(run_dir: Path, status: str, error: str | None = None, **extra) -> None:
    payload = {"status": status, "error": error, **extra}
    atomic_write_text(Path(run_dir) / STATUS, json.dumps(payload, indent=2) + "\n")


def is_job_dir(path: Path) -> bool:
    """A directory that one `opd run` job wrote (its status, or at least Hydra's record)."""
    return (path / STATUS).is_file() or (path / HYDRA).is_dir()


# ------------------------------------------------------------------------------------------- readers
def read_json(path: Path) -> dict:
    """A JSON file's object; {} when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut by a kill: the rest is still usable
                continue
    return rows


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / METRICS)


def read_status(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / STATUS)


def read_summary(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / SUMMARY)


def read_evals(run_dir: Path) -> list[dict]:
    """Every readable evaluation, in step order."""
    found = [read_json(p) for p in sorted((Path(run_dir) / EVAL).glob("step_*.json"))]
    return [e for e in found if e]
