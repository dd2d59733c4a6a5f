"""Structured configs for `opd run`, registered in Hydra's ConfigStore, plus the validation that
explains why a value or a combination is illegal before any compute starts.

The YAML tree in `conf/` is composed on top of these dataclasses, so a misspelled key or a value of the
wrong type fails at compose time; `validate()` catches what types cannot (ranges, allowed names, pairs).
The groups mirror the paper's grid axes: task, model (student), teacher, loss, stabilization, rollout.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from opd_cli.errors import OpdError
from opd_cli.teacher_server.checks import teacher_backend_problem


class ConfigError(OpdError):
    """A bad config value or combination: printed as one line, exit code 2."""


@dataclass
class TaskConfig:
    name: str = "arith"  # tasks registry name: arith | math
    digits: int = 3  # arith: operand length
    rule: str | None = None  # arith: "concise" | "lsd" (shared preference) | "profile" (per row) | none
    reference: str = "student"  # arith: a row's reference solution: student scratchpad | any valid one
    profiles: list[str] | None = None  # arith, rule "profile": what users prefer (msd, lsd, restate, concise)
    path: str | None = None  # local jsonl/parquet/save_to_disk dir or hub dataset name; None = generated
    split: str = "train"
    eval_path: str | None = None
    eval_split: str = "test"
    fields: dict[str, str] = field(default_factory=dict)  # our field -> dataset column
    # math: a regex whose group "problem" cuts the problem out of a prompt column that wraps it in a
    # dataset's own instructions (rows that do not match keep the whole text)
    problem_regex: str | None = None
    train_size: int = 4096
    eval_size: int = 200
    data_seed: int = 1234  # the task's data is fixed across training seeds


@dataclass
class ModelConfig:
    path: str = "testbed:student_sft"  # HF directory, hub id, or testbed:<name>
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    enable_thinking: bool = False  # passed to chat templates that know it (Qwen3)


@dataclass
class TeacherConfig:
    kind: str = "external"  # external | rlvr | self_pi
    path: str = "testbed:teacher_large"  # ignored for self_pi (see pi_checkpoint)
    # self_pi: the PI-conditioned teacher's weights; null = the frozen step-0 student (OPSD proper), a
    # checkpoint = a stronger or RLVR-adapted model that sees the PI (the paper's "GRPO-trained PI teacher")
    pi_checkpoint: str | None = None
    pi_field: str | None = None  # self_pi: answer | solution | system_prompt | any dataset field
    # self_pi: the teacher's user message; {problem} and any row field may appear.
    prompt_template: str = "{problem}"
    system_prompt_from_pi: bool = False  # self_pi with a shared rule: the PI is the system prompt
    dtype: str = "auto"  # teacher weights: auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    enable_thinking: bool | None = None  # the teacher's chat template; None = same as model.enable_thinking
    # where the frozen teacher runs: same (the learner's device) | cpu | cuda | cuda:N (its own GPU); its
    # outputs move to the learner's device for the loss
    device: str = "same"
    # Who scores: hf (a local forward, full logits) | vllm (top-K + sampled-token log-probs from vLLM's
    # prompt_logprobs, in this process or from teacher.server; opd_cli/teacher_server/)
    backend: str = "hf"
    server: Any = None  # backend=vllm: null = in process; a URL from `opd teacher serve`, or a list of URLs
    timeout_s: float = 120.0  # per request to a teacher server
    retries: int = 8  # attempts after the first; backoff doubles from retry_backoff_s to 30 s (~150 s)
    retry_backoff_s: float = 2.0
    max_request_tokens: int = 8192  # prompt + response tokens per request (bounds prompt_logprobs memory)
    max_model_len: int | None = None  # the vLLM teacher's context; None = the model's
    gpu_memory_utilization: float = 0.2  # the vLLM teacher's reserve (in process and `opd teacher serve`)
    tensor_parallel_size: int = 1  # `opd teacher serve`: GPUs the served teacher is sharded over


@dataclass
class LossConfig:
    name: str = "topk_rkl_stopgrad"
    k: int = 5
    support: str = "student"  # student | teacher | intersection | union
    tail_bucket: bool = False
    stopgrad: bool = False  # topk_rkl_renorm only
    beta: float = 0.5  # gjsd only
    is_clip: float | None = None  # sampled_rkl: truncated importance ratio cap
    reduction: str = "token_mean"  # token_mean | seq_mean
    # >0: chunked path from hidden states (never all [tokens, vocab] logits at once); stage=rlvr uses it
    # for the policy's sampled-token log-probs
    chunk_size: int = 0


@dataclass
class StabilizationConfig:
    kind: str = "none"  # none | sft
    source: str = "teacher"  # sft traces from: teacher (sampled, verifier-filtered) | reference
    num_traces: int = 2048
    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    schedule: str = "cosine"
    trace_model: str | None = None  # who writes the SFT traces (source=teacher); None = teacher.path
    # stop once the NLL of the held-out traces is at or below this (checked every eval_every steps; `steps`
    # is then a cap): "SFT until the outputs are well formed", measured rather than guessed as a step count
    until_nll: float | None = None
    eval_every: int = 20


@dataclass
class RolloutConfig:
    engine: str = "vllm"  # vllm | hf
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1  # samples per prompt
    max_new_tokens: int = 64
    gpu_memory_utilization: float = 0.2  # on CPU vLLM reads this as the fraction of RAM for the KV cache
    max_model_len: int = 256
    tensor_parallel_size: int = 1


@dataclass
class TrainerConfig:
    steps: int = 100
    prompts_per_step: int = 64
    lr: float = 1e-4
    schedule: str = "constant"  # constant | cosine | linear
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    # AdamW's eps (the OPD and GRPO learners', like betas; the SFT stage keeps AdamW's defaults). Adam's update g / (sqrt(v) + eps) turns a gradient entry
    # that is ~0 up to float round-off into a move of up to lr; a larger eps (1e-6 for bf16, or 1e-2 in the
    # equality tests) bounds that: an entry then moves by at most lr * |g| / eps
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    save_every: int = 25
    device: str = "auto"  # auto | cpu | cuda
    nproc: int = 1  # data-parallel learner ranks started by opd (1 = this process; torchrun sets its own)
    parallel: str = "ddp"  # ddp (full weights per rank) | fsdp (FSDP2 fully_shard: sharded weights/optimizer)
    device_memory_gb: float | None = None  # memory per device for `opd plan`; None = detected
    # Every learner (OPD/OPSD, GRPO, SFT): sequences per forward/backward, teacher scoring included;
    # gradients accumulate into one optimizer step equal to the whole-batch one. 0 = the rank's whole
    # batch (GRPO: minibatch; SFT: stabilization.batch_size) at once.
    micro_batch_size: int = 0
    activation_checkpointing: bool = False  # recompute the student's layer activations in backward
    # rlvr stage (GRPO)
    clip_eps: float = 0.2


@dataclass
class EvalConfig:
    every: int = 25  # 0 = only at the end
    size: int = 200
    max_new_tokens: int = 96  # longer than training rollouts: a short eval length fakes accuracy drops
    samples: int = 0  # k for avg@k / pass@k (0 = greedy only)
    temperature: float = 1.0
    keep_samples: int = 5


@dataclass
class DiagnosticsConfig:
    every: int = 10  # gradient-cosine diagnostic period (steps)
    hedging_tokens: list[str] | None = None  # None = the task's own list
    stop_on_collapse: bool = False
    # Collapse: the run's distribution left the task format. Defaults are justified in diagnostics.py.
    truncation_threshold: float = 0.5
    mass_threshold: float = 0.5
    repeat_threshold: float = 0.6
    patience: int = 3


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb | none (metrics.jsonl is always written)
    mode: str = "auto"  # auto (online with credentials, else offline) | online | offline | disabled
    project: str = "opd"
    entity: str | None = None
    group: str | None = None


VERDICTS = ("improves", "stable", "degrades", "collapses")


@dataclass
class CellConfig:
    """What a grid cell claims: the paper's verdict, written in the experiment preset."""

    name: str = "default"
    paper_verdict: str = ""  # improves | stable | degrades | collapses | ""
    paper_claim: str = ""  # the paper's own words for this cell (../shared/PAPER.md, "The grid")
    axis: str = ""  # which grid question the cell answers: loss | teacher | stabilization | opsd | recipe
    # A comparative claim: this cell ends with higher accuracy than `better_than` (a cell name), e.g.
    # the RLVR-adapted teacher beats the off-the-shelf one under the same loss.
    better_than: str | None = None
    # Which figure decides the verdict: accuracy (greedy eval) or internalization (OPSD with a shared rule)
    metric: str = "accuracy"
    description: str = ""


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    stabilization: StabilizationConfig = field(default_factory=StabilizationConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    cell: CellConfig = field(default_factory=CellConfig)
    stage: str = "opd"  # opd | sft | rlvr
    seed: int = 0
    resume: str | None = None
    overwrite: bool = False
    testbed_dir: str | None = None  # None = $OPD_TESTBED_DIR, else the checkpoints shipped in the package
    # run `opd preflight`'s pair-compatibility checks (part A) before the stage; a fail refuses to start
    preflight: bool = False


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="opd_schema", node=Config)
    for group, node in [
        ("task", TaskConfig),
        ("model", ModelConfig),
        ("teacher", TeacherConfig),
        ("loss", LossConfig),
        ("stabilization", StabilizationConfig),
        ("rollout", RolloutConfig),
        ("eval", EvalConfig),
        ("logger", LoggerConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)


# ---------------------------------------------------------------------------------------------------------
# Validation: ranges and combinations that types cannot express.

# losses.py's LOSSES and SUPPORTS (pinned by tests/test_layout.py): repeated here so that composing a config
# does not import torch
LOSS_NAMES = (
    "full_rkl",
    "full_fkl",
    "gjsd",
    "sampled_rkl",
    "topk_rkl",
    "topk_rkl_stopgrad",
    "topk_rkl_renorm",
)
SUPPORTS = ("student", "teacher", "intersection", "union")
TEACHER_KINDS = ("external", "rlvr", "self_pi")
STAGES = ("opd", "sft", "rlvr")


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}={value!r} must be >= {low}")


def check_known_keys(cfg: DictConfig, schema: object = None, prefix: str = "") -> None:
    """Hydra lets `+key=value` add keys even to structured nodes: reject any key the schema lacks."""
    schema = schema if schema is not None else Config()
    allowed = {f.name: getattr(schema, f.name) for f in dataclasses.fields(schema)}
    for key in cfg:
        if key == "hydra" and not prefix:
            continue
        if key not in allowed:
            raise ConfigError(f"unknown config key '{prefix}{key}'; allowed keys here: {', '.join(allowed)}")
        if dataclasses.is_dataclass(allowed[key]):
            check_known_keys(cfg[key], allowed[key], f"{prefix}{key}.")


def validate(cfg: DictConfig | Config) -> None:
    """Raise ConfigError naming the key, the bad value and what is allowed."""
    c = cfg
    if isinstance(cfg, DictConfig):
        check_known_keys(cfg)
    _one_of("stage", c.stage, STAGES)
    _one_of("loss.name", c.loss.name, LOSS_NAMES)
    _one_of("loss.support", c.loss.support, SUPPORTS)
    _one_of("loss.reduction", c.loss.reduction, ("token_mean", "seq_mean"))
    _at_least("loss.k", c.loss.k, 1)
    _at_least("loss.chunk_size", c.loss.chunk_size, 0)
    if not 0.0 <= c.loss.beta <= 1.0:
        raise ConfigError(
            f"loss.beta={c.loss.beta!r} must be in [0, 1] (0 = forward KL end, 1 = reverse KL end)"
        )
    if c.loss.is_clip is not None and c.loss.is_clip <= 0:
        raise ConfigError(f"loss.is_clip={c.loss.is_clip!r} must be > 0 (or null to disable)")
    _one_of("teacher.kind", c.teacher.kind, TEACHER_KINDS)
    if c.teacher.kind == "self_pi" and not c.teacher.pi_field:
        raise ConfigError(
            "teacher.kind=self_pi needs teacher.pi_field (answer | solution | system_prompt | a field)"
        )
    problem = teacher_backend_problem(c)
    if problem:
        raise ConfigError(problem)
    _one_of("stabilization.kind", c.stabilization.kind, ("none", "sft"))
    _one_of("stabilization.source", c.stabilization.source, ("teacher", "reference"))
    if c.stabilization.until_nll is not None and c.stabilization.until_nll <= 0:
        raise ConfigError(
            f"stabilization.until_nll={c.stabilization.until_nll!r} must be > 0 (a held-out NLL per token), "
            f"or null to train all stabilization.steps"
        )
    _at_least("stabilization.eval_every", c.stabilization.eval_every, 1)
    _one_of("rollout.engine", c.rollout.engine, ("vllm", "hf"))
    if not 0.0 < c.rollout.top_p <= 1.0:
        raise ConfigError(f"rollout.top_p={c.rollout.top_p!r} must be in (0, 1]")
    _at_least("rollout.temperature", c.rollout.temperature, 0.0)
    _at_least("rollout.n", c.rollout.n, 1)
    _at_least("rollout.max_new_tokens", c.rollout.max_new_tokens, 1)
    if not 0.0 < c.rollout.gpu_memory_utilization <= 1.0:
        raise ConfigError(
            f"rollout.gpu_memory_utilization={c.rollout.gpu_memory_utilization!r} must be in (0, 1]"
        )
    _at_least("trainer.steps", c.trainer.steps, 0)
    _at_least("trainer.prompts_per_step", c.trainer.prompts_per_step, 1)
    if c.trainer.lr <= 0:
        raise ConfigError(f"trainer.lr={c.trainer.lr!r} must be > 0")
    if c.trainer.adam_eps <= 0:
        raise ConfigError(f"trainer.adam_eps={c.trainer.adam_eps!r} must be > 0 (AdamW's default is 1e-8)")
    _one_of("trainer.schedule", c.trainer.schedule, ("constant", "cosine", "linear"))
    _one_of("cell.paper_verdict", c.cell.paper_verdict, ("", *VERDICTS))
    _one_of("cell.metric", c.cell.metric, ("accuracy", "internalization"))
    _one_of("stabilization.schedule", c.stabilization.schedule, ("constant", "cosine", "linear"))
    if not 0.0 <= c.trainer.warmup_ratio < 1.0:
        raise ConfigError(f"trainer.warmup_ratio={c.trainer.warmup_ratio!r} must be in [0, 1)")
    if len(c.trainer.betas) != 2 or not all(0.0 <= b < 1.0 for b in c.trainer.betas):
        raise ConfigError(f"trainer.betas={list(c.trainer.betas)!r} must be two numbers in [0, 1)")
    _at_least("trainer.grad_clip", c.trainer.grad_clip, 0.0)
    _at_least("trainer.save_every", c.trainer.save_every, 1)
    if c.trainer.micro_batch_size < 0:
        raise ConfigError(
            f"trainer.micro_batch_size={c.trainer.micro_batch_size!r} must be >= 0; use 0 (the whole batch "
            f"at once) or the number of sequences per forward/backward"
        )
    _one_of("trainer.device", c.trainer.device, ("auto", "cpu", "cuda"))
    if not re.fullmatch(r"same|cpu|cuda(:\d+)?", str(c.teacher.device)):
        raise ConfigError(
            f"teacher.device={c.teacher.device!r} is not a device; use same (the learner's), cpu, cuda or "
            f"cuda:N"
        )
    _validate_parallel(c)
    for key in ("model.dtype", "teacher.dtype"):
        _one_of(key, eval_attr(c, key), ("auto", "float32", "bfloat16", "float16"))
    _at_least("eval.every", c.eval.every, 0)
    _at_least("eval.size", c.eval.size, 1)
    _at_least("eval.samples", c.eval.samples, 0)
    _one_of("logger.kind", c.logger.kind, ("wandb", "none"))
    _one_of("logger.mode", c.logger.mode, ("auto", "online", "offline", "disabled"))
    _at_least("diagnostics.every", c.diagnostics.every, 1)
    _at_least("diagnostics.patience", c.diagnostics.patience, 1)
    _at_least("task.train_size", c.task.train_size, 1)
    _at_least("task.eval_size", c.task.eval_size, 1)
    if c.task.name == "arith" and not 1 <= c.task.digits <= 8:
        raise ConfigError(f"task.digits={c.task.digits!r} must be in 1..8")


def _validate_parallel(c) -> None:
    """Data-parallel learner and rollout placement (see opd_cli/distributed.py)."""
    tc, tp = c.trainer, c.rollout.tensor_parallel_size
    _at_least("trainer.nproc", tc.nproc, 1)
    _at_least("rollout.tensor_parallel_size", tp, 1)
    _one_of("trainer.parallel", tc.parallel, ("ddp", "fsdp"))
    if tc.device_memory_gb is not None and tc.device_memory_gb <= 0:
        raise ConfigError(f"trainer.device_memory_gb={tc.device_memory_gb!r} must be > 0 (or null: detected)")
    if tc.nproc > 1 and c.stage != "opd":
        raise ConfigError(
            f"trainer.nproc={tc.nproc} runs the OPD learner data-parallel; stage={c.stage} runs in one "
            f"process: use trainer.nproc=1"
        )
    if tp > 1 and c.rollout.engine != "vllm":
        raise ConfigError(
            f"rollout.tensor_parallel_size={tp} shards the vLLM engine; rollout={c.rollout.engine} has no "
            f"tensor parallelism: use rollout=vllm or rollout.tensor_parallel_size=1"
        )
    if tc.nproc > 1 and tc.nproc % tp:
        raise ConfigError(
            f"trainer.nproc={tc.nproc} is not a multiple of rollout.tensor_parallel_size={tp}: every group "
            f"of {tp} ranks shares one vLLM engine"
        )
    if tc.nproc > 1 and re.fullmatch(r"cuda:\d+", str(c.teacher.device)):
        raise ConfigError(
            f"teacher.device={c.teacher.device} with trainer.nproc={tc.nproc}: every rank would put its "
            f"teacher on that one GPU; use teacher.device=same (each rank's own GPU) or cpu"
        )
    if tc.parallel == "fsdp" and c.rollout.engine == "hf":
        raise ConfigError(
            "trainer.parallel=fsdp with rollout=hf: generate() on a sharded model would need every rank "
            "to decode in lockstep; use rollout=vllm or trainer.parallel=ddp"
        )
    if tc.parallel == "fsdp" and c.loss.chunk_size > 0:
        raise ConfigError(
            "trainer.parallel=fsdp with loss.chunk_size>0: the chunked loss reads the LM head outside the "
            "sharded forward; use loss.chunk_size=0 or trainer.parallel=ddp"
        )


def eval_attr(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# ------------------------------------------------------------------------------ errors as one line
def _schema_keys(full_key: str) -> list[str] | None:
    """Allowed keys at the parent of `full_key` in the structured config, if it is a known node."""
    node = Config()
    for part in full_key.split(".")[:-1]:
        node = getattr(node, part, None)
        if not dataclasses.is_dataclass(node):
            return None
    return [f.name for f in dataclasses.fields(node)]


def explain_config_exception(exc: BaseException, overrides: list[str]) -> str:
    """Turn a Hydra/OmegaConf composition error into one line: key, bad value, what is allowed."""
    if isinstance(exc, OpdError):
        return str(exc)
    if isinstance(exc, MissingConfigException) and exc.options is not None:
        m = re.search(r"Could not find '([^']+)'", str(exc))
        missing = m.group(1) if m else str(exc.missing_cfg_file)
        group, _, option = missing.rpartition("/")
        allowed = ", ".join(o for o in exc.options if not o.endswith("_schema"))
        return f"unknown option '{option}' for config group '{group}'; allowed: {allowed}"
    if isinstance(exc, OverrideParseException):
        return (
            f"cannot parse override: {str(exc).splitlines()[0]} (use key=value, e.g. trainer.lr=1e-4; quote "
            f"values with special characters: key='{{problem}};H:{{answer}}')"
        )
    cause = exc
    while cause is not None and not isinstance(
        cause, (ConfigKeyError, ConfigAttributeError, ValidationError)
    ):
        cause = cause.__cause__ or cause.__context__
    if (
        isinstance(cause, (ConfigKeyError, ConfigAttributeError))
        or "not in struct" in str(exc)
        or "not in '" in str(exc)
    ):
        key = getattr(cause, "full_key", None) or _key_from_message(str(exc))
        allowed = _schema_keys(key) if key else None
        hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
        return f"unknown config key '{key}'{hint}"
    if isinstance(cause, ValidationError):
        key = cause.full_key
        value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), None)
        expected = re.search(r"converted to (\w+)", str(cause))
        what = f"expected {expected.group(1).lower()}" if expected else str(cause).splitlines()[0]
        return f"{key}={value!r} has the wrong type: {what}"
    return str(exc).strip().splitlines()[0]


def _key_from_message(message: str) -> str | None:
    m = re.search(r"Could not override '([^']+)'", message) or re.search(r"Key '([^']+)'", message)
    return m.group(1) if m else None
