"""Memory plan: what one learner device holds for a recipe, estimated from the models' config.json.

    opd plan experiment=qwen3_opd_8b_topk                    # the plan, no run, no download
    opd plan experiment=qwen3_opd_8b_topk trainer.device_memory_gb=96 trainer.nproc=8
    opd run experiment=qwen3_opd_8b_topk --dry-run           # the same, from `opd run`

Per device (one data-parallel rank), in GiB, as the code allocates it:
- student parameters fp32 (master weights; bf16 only under autocast), gradients fp32, Adam's two fp32
  states: 4 + 4 + 8 bytes per parameter, divided by the ranks under trainer.parallel=fsdp;
- teacher parameters in teacher.dtype (auto: bf16 on CUDA, fp32 on CPU; frozen); OPSD's frozen copy of
  the student is a second model of the student's shape;
- everything below scales with one micro-batch (trainer.micro_batch_size sequences; 0 = the rank's whole
  batch), because the step scores, differentiates and frees one micro-batch at a time:
- student activations kept for backward: per token and layer ~ (4 H + (heads + 2 kv_heads) head_dim + 3 I)
  values in the compute dtype (SDPA keeps no [T, T] scores); with trainer.activation_checkpointing only
  each layer's fp32 input (H values) is kept, plus one layer's activations recomputed in backward;
- the teacher's output kept for the loss: its hidden states [tokens, H_t] on the chunked path (the loss
  makes its log-probs chunk by chunk), else its full-vocabulary log-probs [tokens, V] fp32; plus its
  forward's transient (one layer's activations, no gradient);
- student logits, log-softmax and their gradient: 3 x [tokens, V] fp32, or 3 x [loss.chunk_size, V] with
  the chunked path;
- vLLM: bf16 weights / tensor_parallel_size and the KV cache of this rank's sequences
  (2 x layers x kv_heads x head_dim x 2 bytes per token); when the device memory is known, vLLM reserves
  rollout.gpu_memory_utilization of it instead, and that reservation is what the plan counts.
The rows add up to an upper bound: the teacher's forward transient is freed before the student's forward.
With teacher.device on another device (e.g. cuda:1), the teacher's parameters and forward are planned
and checked there; its outputs (hidden states or log-probs) are counted on both devices. A served teacher
(teacher.backend=vllm teacher.server=URL) takes no learner memory: only its top-K ids and log-probs of
each response token ([tokens, K] int64 + fp32) land there; in process (teacher.server=null) vLLM holds
its weights in teacher.dtype.

Tokens per rank = ceil(prompts_per_step x rollout.n / ranks) x (prompt tokens + rollout.max_new_tokens);
the prompt length is an assumption (--prompt-tokens, default 512). Hub ids that are not on disk resolve
through the built-in table of Qwen3 configs below (no download).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from opd_cli.errors import OpdError
from opd_cli.teacher_server.checks import logprobs_k, servers
from opd_cli.testbed.paths import model_dir

GIB = 2**30


class PlanError(OpdError):
    """The plan does not fit the device, or a model's shape is unknown."""


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, c: dict) -> ModelShape:
        c = c.get("text_config", c)
        heads = c["num_attention_heads"]
        return cls(
            hidden=c["hidden_size"],
            layers=c["num_hidden_layers"],
            heads=heads,
            kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            intermediate=c["intermediate_size"],
            vocab=c["vocab_size"],
            tied=bool(c.get("tie_word_embeddings", False)),
        )

    @property
    def params(self) -> int:
        h, d = self.hidden, self.head_dim
        attn = h * self.heads * d * 2 + h * self.kv_heads * d * 2 + 2 * d  # q, o, k, v, q/k norms
        layer = attn + 3 * h * self.intermediate + 2 * h
        head = 0 if self.tied else self.vocab * h
        return self.vocab * h + self.layers * layer + h + head

    @property
    def kv_bytes_per_token(self) -> int:  # bf16 K and V in every layer
        return 2 * self.layers * self.kv_heads * self.head_dim * 2

    def activation_values_per_token(self) -> int:
        return self.layers * self.layer_activation_values_per_token()

    def layer_activation_values_per_token(self) -> int:
        qkv = (self.heads + 2 * self.kv_heads) * self.head_dim
        return 4 * self.hidden + qkv + 3 * self.intermediate


def _qwen3(hidden, layers, heads, intermediate, tied) -> dict:
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": intermediate,
        "vocab_size": 151936,
        "tie_word_embeddings": tied,
    }


# The config.json values of the Qwen3 checkpoints (huggingface.co/Qwen/<name>/blob/main/config.json;
# 8B and 4B read from copies of those files, 1.7B from a Qwen3-1.7B-architecture config, 14B from the
# Qwen3 technical report's table: 40 layers, 40 query / 8 KV heads). The Base models share the shapes.
KNOWN_CONFIGS = {
    "Qwen/Qwen3-1.7B": _qwen3(2048, 28, 16, 6144, True),
    "Qwen/Qwen3-4B": _qwen3(2560, 36, 32, 9728, True),
    "Qwen/Qwen3-8B": _qwen3(4096, 36, 32, 12288, False),
    "Qwen/Qwen3-14B": _qwen3(5120, 40, 40, 17408, False),
}
KNOWN_CONFIGS.update({f"{k}-Base": v for k, v in list(KNOWN_CONFIGS.items())})


def model_shape(spec: str, cfg: DictConfig, fallback: ModelShape | None = None) -> tuple[ModelShape, str]:
    """(shape, where it came from) for a model path, testbed:<name> or hub id."""
    path = (
        Path(model_dir(str(spec), cfg.get("testbed_dir"))).expanduser()
        if str(spec).startswith("testbed:")
        else None
    )
    path = path or Path(str(spec)).expanduser()
    if (path / "config.json").is_file():
        return ModelShape.from_config(json.loads((path / "config.json").read_text())), str(path)
    if str(spec) in KNOWN_CONFIGS:
        return ModelShape.from_config(KNOWN_CONFIGS[str(spec)]), f"{spec} (built-in table)"
    if fallback is not None:
        return fallback, f"{spec} (not built yet: the student's shape)"
    raise PlanError(
        f"no config.json for model {spec!r} and it is not in the built-in table "
        f"({', '.join(KNOWN_CONFIGS)}); pass a local model directory"
    )


def served_teacher(cfg: DictConfig) -> bool:
    return (
        cfg.stage == "opd"
        and cfg.teacher.get("backend", "hf") == "vllm"
        and bool(servers(cfg.teacher.get("server")))
    )


def detected_device_memory_gb() -> float | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return None


def memory_plan(cfg: DictConfig, prompt_tokens: int = 512) -> dict:
    """Rows of (component, GiB per device) and the context needed to read them."""
    tc, r = cfg.trainer, cfg.rollout
    student, s_src = model_shape(cfg.model.path, cfg)
    with_teacher = cfg.stage == "opd"  # GRPO (rlvr) and SFT train without a teacher in memory
    if not with_teacher:
        teacher, t_src = ModelShape(0, 0, 0, 0, 0, 0, 0, True), f"none in memory (stage={cfg.stage})"
    elif served_teacher(cfg):  # teacher.backend=vllm teacher.server=URL: the teacher lives elsewhere
        teacher = ModelShape(0, 0, 0, 0, 0, 0, 0, True)
        t_src = f"served by {', '.join(servers(cfg.teacher.server))} (no learner memory)"
    elif cfg.teacher.kind == "self_pi" and not cfg.teacher.get("pi_checkpoint"):
        teacher, t_src = student, "frozen copy of the student"
    elif cfg.teacher.kind == "self_pi":
        teacher, t_src = model_shape(cfg.teacher.pi_checkpoint, cfg, student)
    else:
        fallback = student if cfg.teacher.kind == "rlvr" else None
        teacher, t_src = model_shape(cfg.teacher.path, cfg, fallback)
    ranks = tc.nproc
    sharded = tc.parallel == "fsdp" and ranks > 1
    shard = ranks if sharded else 1
    sft = cfg.stage == "sft"  # one process; batches of teacher traces (up to eval.max_new_tokens long)
    response_len = cfg.eval.max_new_tokens if sft else r.max_new_tokens
    samples = cfg.stabilization.batch_size if sft else math.ceil(tc.prompts_per_step * r.n / ranks)
    seq = prompt_tokens + response_len
    tokens = samples * seq
    micro = min(tc.micro_batch_size or samples, samples)  # sequences per forward/backward (every learner)
    mb_tokens, mb_response = micro * seq, micro * response_len
    cuda = tc.device == "cuda" or (tc.device == "auto" and detected_device_memory_gb() is not None)
    act_bytes = 2 if cuda else 4  # bf16 autocast on CUDA, fp32 on CPU
    # teacher.device: the teacher's weights and forward on a device of their own (its outputs still
    # land on the learner's device for the loss)
    td = str(cfg.teacher.device)
    separate = (
        with_teacher
        and cfg.teacher.get("backend", "hf") == "hf"
        and td not in ("same", "cuda" if cuda else "cpu")
        and not (cuda and ranks == 1 and td == "cuda:0")
    )
    t_cuda = td.startswith("cuda") if separate else cuda
    t_dtype = cfg.teacher.dtype if cfg.teacher.dtype != "auto" else ("bfloat16" if t_cuda else "float32")
    t_bytes = 4 if t_dtype == "float32" else 2
    t_name = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[t_dtype]
    v = student.vocab
    chunked = cfg.loss.chunk_size > 0
    logit_rows = cfg.loss.chunk_size if chunked else mb_response
    checkpointed = tc.activation_checkpointing
    if checkpointed:  # each layer's fp32 input, plus one layer's activations recomputed in backward
        act_name = "activations (checkpointed)"
        act = mb_tokens * (
            student.layers * student.hidden * 4 + student.layer_activation_values_per_token() * act_bytes
        )
    else:
        act_name = "activations (no checkpointing)"
        act = mb_tokens * student.activation_values_per_token() * act_bytes
    if with_teacher and cfg.teacher.get("backend", "hf") == "vllm":  # top-K ids (int64) + log-probs + sampled
        k = logprobs_k(cfg.loss)
        teacher_out = (f"teacher top-{k} ids + log-probs [tokens, {k}]", mb_response * (k * (8 + 4) + 4))
    elif chunked:
        teacher_out = (
            "teacher hidden states [tokens, H_t]",
            mb_response * teacher.hidden * max(t_bytes, act_bytes),
        )
    else:
        teacher_out = ("teacher log-probs [tokens, V] fp32", mb_response * v * 4)
    t_act_bytes = 2 if t_cuda else 4
    teacher_rows = [
        (f"teacher parameters ({t_name}, frozen)", t_bytes * teacher.params),
        (
            "teacher forward (transient, one layer)",
            mb_tokens * teacher.layer_activation_values_per_token() * min(t_bytes, t_act_bytes),
        ),
    ]
    if served_teacher(cfg):
        teacher_rows = []
    elif with_teacher and cfg.teacher.get("backend", "hf") == "vllm":  # a vLLM engine in this process
        weights = (f"teacher parameters in vLLM ({t_name})", t_bytes * teacher.params)
        known = tc.device_memory_gb or detected_device_memory_gb()
        share = cfg.teacher.gpu_memory_utilization
        # on a GPU vLLM reserves its share of the device (weights + KV cache) up front; that is what counts
        teacher_rows = (
            [
                (
                    f"teacher vLLM reserve (teacher.gpu_memory_utilization={share}; its weights "
                    f"{weights[1] / GIB:.1f} GiB)",
                    share * known * GIB,
                )
            ]
            if known and cuda
            else [weights]
        )
    rows = [
        ("student parameters (fp32)", 4 * student.params / shard),
        ("student gradients (fp32)", 4 * student.params / shard),
        ("Adam states (2 x fp32)", 8 * student.params / shard),
        *([] if separate or not with_teacher else teacher_rows[:1]),
        (act_name, act),
        *([teacher_out] if with_teacher else []),
        *([] if separate or not with_teacher else teacher_rows[1:]),
        *(
            [("teacher LM head copy (for the chunked loss)", t_bytes * teacher.vocab * teacher.hidden)]
            if separate and chunked
            else []
        ),
        (
            "student logits + grad "
            + (f"(chunks of {cfg.loss.chunk_size})" if chunked else "[tokens, V] x3 fp32"),
            3 * logit_rows * v * 4,
        ),
    ]
    memory = tc.device_memory_gb or detected_device_memory_gb()
    tp = r.tensor_parallel_size
    if r.engine == "vllm" and not sft:  # SFT's trace engine is closed before training starts
        need = 2 * student.params / tp + samples * seq * student.kv_bytes_per_token / tp
        if memory:
            rows.append((f"vLLM reserve (gpu_memory_utilization={r.gpu_memory_utilization})", 0.0))
            rows[-1] = (rows[-1][0], r.gpu_memory_utilization * memory * GIB)
        rows.append(("  of which vLLM weights bf16 + KV cache needed", need))
    total = sum(b for name, b in rows if not name.startswith("  "))
    teacher_side = None
    if separate:
        teacher_rows.append(teacher_out)  # made there, then copied to the learner's device
        teacher_side = {
            "device": td,
            "rows": [(name, b / GIB) for name, b in teacher_rows],
            "total_gb": sum(b for _, b in teacher_rows) / GIB,
            "device_memory_gb": (tc.device_memory_gb or detected_device_memory_gb()) if t_cuda else None,
        }
    return {
        "student": (s_src, student.params),
        "teacher": (t_src, teacher.params),
        "ranks": ranks,
        "parallel": tc.parallel if ranks > 1 else "single process",
        "tensor_parallel_size": tp,
        "samples_per_rank": samples,
        "tokens_per_rank": tokens,
        "micro_batch": micro,
        "prompt_tokens": prompt_tokens,
        "rows": [(name, b / GIB) for name, b in rows],
        "total_gb": total / GIB,
        "device_memory_gb": memory,
        "teacher_device": teacher_side,
    }


def format_plan(plan: dict) -> str:
    s_src, s_params = plan["student"]
    t_src, t_params = plan["teacher"]
    lines = [
        f"memory plan per device ({plan['ranks']} rank(s), {plan['parallel']}, vLLM TP "
        f"{plan['tensor_parallel_size']}); {plan['samples_per_rank']} samples x "
        f"({plan['prompt_tokens']} prompt + response) = {plan['tokens_per_rank']} tokens per rank, "
        f"{plan['micro_batch']} sequence(s) per micro-batch (tokens below: one micro-batch's)",
        f"  student {s_params / 1e9:.2f}B params: {s_src}",
        f"  teacher {t_params / 1e9:.2f}B params: {t_src}" if t_params else f"  teacher: {t_src}",
    ]
    width = max(len(name) for name, _ in plan["rows"])
    lines += [f"  {name:<{width}}  {gb:9.2f} GiB" for name, gb in plan["rows"]]
    mem = plan["device_memory_gb"]
    lines.append(f"  {'total':<{width}}  {plan['total_gb']:9.2f} GiB")
    lines.append(
        f"  {'device memory':<{width}}  {mem:9.2f} GiB"
        if mem
        else "  device memory: unknown (no CUDA device); set trainer.device_memory_gb to check the fit"
    )
    rows = dict(plan["rows"])
    reserve = next((gb for name, gb in plan["rows"] if name.startswith("vLLM reserve")), None)
    need = rows.get("  of which vLLM weights bf16 + KV cache needed")
    if reserve is not None and need is not None and need > reserve:
        lines.append(
            f"  note: vLLM's weights and the KV cache of all {plan['samples_per_rank']} sequences need "
            f"{need:.1f} GiB but it reserves {reserve:.1f} GiB: it will decode fewer sequences at a time "
            f"(slower rollouts, no error); raise rollout.gpu_memory_utilization if the device has room"
        )
    side = plan.get("teacher_device")
    if side:
        lines.append(f"teacher device (teacher.device={side['device']}):")
        lines += [f"  {name:<{width}}  {gb:9.2f} GiB" for name, gb in side["rows"]]
        lines.append(f"  {'total':<{width}}  {side['total_gb']:9.2f} GiB")
    return "\n".join(lines)


def check_fit(plan: dict) -> None:
    side = plan.get("teacher_device")
    if side and side["device_memory_gb"] and side["total_gb"] > side["device_memory_gb"]:
        raise PlanError(
            f"the teacher needs {side['total_gb']:.1f} GiB on teacher.device={side['device']} but it has "
            f"{side['device_memory_gb']:.1f} GiB; set teacher.dtype=bfloat16, lower "
            f"trainer.micro_batch_size, or set loss.chunk_size"
        )
    mem = plan["device_memory_gb"]
    if mem and plan["total_gb"] > mem:
        counted = [row for row in plan["rows"] if not row[0].startswith("  ")]  # "of which" rows are not
        biggest = max(counted, key=lambda row: row[1])
        raise PlanError(
            f"the plan needs {plan['total_gb']:.1f} GiB per device but it has {mem:.1f} GiB (largest: "
            f"{biggest[0].strip()} {biggest[1]:.1f} GiB); lower trainer.micro_batch_size, set "
            f"trainer.activation_checkpointing=true or loss.chunk_size, raise trainer.nproc, use "
            f"trainer.parallel=fsdp, or lower rollout.gpu_memory_utilization / rollout.max_new_tokens"
        )
