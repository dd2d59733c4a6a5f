"""Setup shared by every stage: seeding, model paths, the task and its data, the rollout engine."""

from __future__ import annotations

import random

import numpy as np
import torch
from omegaconf import DictConfig

from opd_cli import distributed
from opd_cli.data import DataError
from opd_cli.errors import OpdError
from opd_cli.rollout import RolloutEngine, make_engine
from opd_cli.tasks import Task, make_task
from opd_cli.testbed.paths import resolve_model_path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_path(spec: str, cfg: DictConfig) -> str:
    """`testbed:<name>` -> the testbed's model directory (launch builds a missing testbed before the stage
    starts); anything else unchanged."""
    return resolve_model_path(spec, cfg.get("testbed_dir"))


def task_options(task_cfg) -> dict:
    if task_cfg.name == "arith":
        return {
            "digits": task_cfg.digits,
            "rule": task_cfg.rule,
            "reference": task_cfg.get("reference", "student"),
            "profiles": task_cfg.get("profiles"),
        }
    if task_cfg.name == "math":
        return {
            "path": task_cfg.path,
            "split": task_cfg.split,
            "fields": dict(task_cfg.fields) or None,
            "rule": task_cfg.rule,
            "problem_regex": task_cfg.get("problem_regex"),
        }
    return {}


def teacher_checkpoint(cfg: DictConfig, student_path: str) -> str:
    """The teacher's weights: a self_pi teacher is the frozen step-0 student (`student_path`) unless
    `teacher.pi_checkpoint` names other weights; every other kind is `teacher.path`."""
    if cfg.teacher.kind != "self_pi":
        return resolve_path(cfg.teacher.path, cfg)
    pi = cfg.teacher.get("pi_checkpoint")
    return resolve_path(pi, cfg) if pi else student_path


def load_task_and_data(task_cfg) -> tuple[Task, list[dict], list[dict]]:
    """(task, train rows, eval rows). Synthetic tasks generate both from `task.data_seed` (eval from a
    different stream, so the sets are independent); dataset tasks read `task.path` / `task.eval_path`."""
    try:
        task = make_task(task_cfg.name, **task_options(task_cfg))
        if task_cfg.name == "math":
            train = task.generate(task_cfg.train_size, task_cfg.data_seed)
            eval_task = make_task(
                "math",
                **{
                    **task_options(task_cfg),
                    "path": task_cfg.eval_path or task_cfg.path,
                    "split": task_cfg.eval_split,
                },
            )
            evals = eval_task.generate(task_cfg.eval_size, task_cfg.data_seed + 1)
        else:
            train = task.generate(task_cfg.train_size, task_cfg.data_seed)
            evals = task.generate(task_cfg.eval_size, task_cfg.data_seed + 10_007)
    except (DataError, ValueError) as exc:
        raise OpdError(f"task={task_cfg.name}: {exc}") from exc
    if not train:
        raise OpdError(
            f"task={task_cfg.name}: the training set is empty; point task.path at a dataset with rows"
        )
    if not evals:
        raise OpdError(
            f"task={task_cfg.name}: the evaluation set is empty; set task.eval_path or task.eval_size"
        )
    return task, train, evals


def teacher_enable_thinking(cfg: DictConfig) -> bool:
    """The teacher's chat-template setting: `teacher.enable_thinking`, else the student's."""
    thinking = cfg.teacher.get("enable_thinking")
    return cfg.model.enable_thinking if thinking is None else thinking


def rollout_engine(
    cfg: DictConfig,
    model_path: str,
    device: torch.device,
    *,
    dtype: str,
    kind: str | None = None,
    model: torch.nn.Module | None = None,
    data_parallel: bool = False,
) -> RolloutEngine:
    """The rollout engine for `model_path`: `kind`, else `rollout.engine`. vLLM gets the config's
    `rollout.gpu_memory_utilization`, `rollout.max_model_len` and `seed`; with `data_parallel` (the OPD
    learner) also `rollout.tensor_parallel_size`, and, with several ranks, vLLM joins their process group
    (each group of tensor_parallel_size ranks forms one engine: TRL's colocate mode). `model`: the
    learner's module, which the HF engine generates with and the vLLM engine syncs once."""
    kind = kind or cfg.rollout.engine
    options = {}
    if kind == "vllm":
        r = cfg.rollout
        options = {"gpu_memory_utilization": r.gpu_memory_utilization, "max_model_len": r.max_model_len}
        if data_parallel:
            options["tensor_parallel_size"] = r.tensor_parallel_size
        options["seed"] = cfg.seed
        if data_parallel and distributed.world_size() > 1:
            options["distributed_executor_backend"] = "external_launcher"
    return make_engine(kind, model_path, device=device.type, dtype=dtype, model=model, **options)
