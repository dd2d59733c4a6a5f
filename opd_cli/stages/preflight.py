"""`opd preflight`: before the GPU week, check that student and teacher form a compatible pair (part A),
measure the paper's mechanisms on a bounded number of the student's own rollouts (part B), optionally run
the recipe's first steps (part C, stages/pilot.py) and predict the outcome (part D, stages/predict.py).

    opd preflight                                   # the default recipe on the testbed
    opd preflight teacher=self_answer               # an OPSD recipe (its PI fields are checked)
    opd preflight experiment=matrix                 # one row per cell of the grid, ranked by its prediction
    opd preflight experiment=qwen3_opd_8b_topk --rollouts 0   # part A only
    opd preflight experiment=opd_naive_topk_k5 --pilot-steps 30   # + the recipe's first 30 training steps
    opd preflight experiment=matrix seed=0 --against experiments/matrix/report.json   # calibration
    opd run preflight=true                          # part A before training: a fail refuses to start

Part A, pair compatibility (each check passes or fails with its fix in one line; any fail ends the
command with exit 2 before weights are loaded or rollouts sampled):
  from the tokenizers and config.json / generation_config.json alone (works where the models do not fit):
    vocabulary        same token -> id map
    embedding_rows    same config.json vocab_size (padded embedding rows, Qwen3: 151,936 for 151,669)
    special_tokens    same eos / pad / bos ids
    stop_tokens       same EOS ids, tokenizer and generation_config.json together
    generation_prompt the student's template appends a generation prompt
    prompt_tail       the teacher's prompt ends exactly as the student's (generation prompt, think block,
                      enable_thinking of each side)
    pi_fields         OPSD: the PI fields exist in the data and change the teacher's prompt
  with weights (skipped, with the reason, where they are absent or too large for this device):
    position_alignment  the student scoring its own rollouts through the teacher-scoring path: KL ~ 0
    teacher_determinism the same sequences scored twice, and one at a time vs batched, agree within the
                        tolerances argued at TOLERANCES
    teacher_paths       teacher.backend=vllm: vLLM's top-K / sampled-token log-probs = the HF forward's
    temperature         the temperature contract: the rollout engine's sample log-probs (what sampled_rkl
                        and the diagnostics use) = the learner's log_softmax at temperature 1; the teacher's
                        are log_softmax of its raw logits (HF) or checked by teacher_paths (vLLM)

Part B, no training: mechanism 1 (top-K overlap, the teacher's NLL of the student's samples, its mass on
hedging / revision tokens after student prefixes), mechanism 2 (per loss arm: the first-order change of
the student's top-K and tail mass under one step, from the closed-form logit gradients; the share of
positions with truncated KL_S > 0), mechanism 3 (OPSD PI dependence: `mechanism_3`, the gap to q_bar
measured by opd_cli/stages/pi_probe.py) and readiness (well-formedness, truncation, sampled accuracy).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from opd_cli import losses
from opd_cli.batching import ResponseForward, pack
from opd_cli.errors import OpdError
from opd_cli.io import atomic_write_json, atomic_write_text
from opd_cli.learner import load_model, load_tokenizer, pick_device, teacher_device, weights_dtype
from opd_cli.rollout import SamplingConfig, derive_seed
from opd_cli.stages.common import (
    load_task_and_data,
    resolve_path,
    rollout_engine,
    seed_everything,
    teacher_checkpoint,
    teacher_enable_thinking,
)
from opd_cli.stages.opd import batch_rows, loss_kwargs
from opd_cli.stages.pi_probe import pi_dependence
from opd_cli.stages.pilot import SIGNS, pilot
from opd_cli.stages.predict import Prediction, calibration_markdown, predict, rank_key
from opd_cli.teachers import (
    PromptBuilder,
    Teacher,
    chat_prompt_ids,
    student_prompt_builder,
    teacher_prompt_builder,
)

TOPK_ARMS = ("topk_rkl", "topk_rkl_stopgrad", "topk_rkl_renorm")  # mechanism 2's comparison arms
# The exact reverse KL at the same k: the unbiased gradient the TopK arms approximate. The prediction
# (stages/predict.py) reads each arm's tail-rise share against this one's on the same positions.
REFERENCE_ARM = "full_rkl"
# Models whose weights exceed this on a CPU are not loaded: part A keeps its tokenizer/config checks.
CPU_WEIGHTS_LIMIT_GB = 4.0
TEMPLATE_ROWS = 8  # rows whose prompts the template checks compare
WEIGHT_CHECK_SEQUENCES = 8  # rollouts the weight checks score (each check is a max over their positions)
OVERLAP_K = 20  # mechanism 1's top-K overlap (the diagnostics' default K)
# Part B scores this many sequences per forward (or trainer.micro_batch_size): [chunk, T, V] fp32 tensors
# stay bounded on a 151,936-token vocabulary (8 x 1,024 x 151,936 x 4 B = 5 GB per tensor).
PART_B_CHUNK = 8

# Tolerances of the weight checks, in nats, per the dtype the models run in. fp32 (the CPU default): the
# same tokens in another batch (other padding, other matmul blocking) differ only in reduction order, a
# relative ~1e-7 of logits and hidden states that compounds over the layers: measured <= 1.6e-5 nats per
# log-prob on the testbed's pairs (experiments/preflight.md); 1e-3 leaves 60x room and still fails a real
# leak (a padding token attended to, one shifted position: > 0.1 nats). The student scoring itself through
# the teacher path computes the very same forward: KL 0 measured, 1e-4 allowed. bf16 (CUDA): 8 mantissa
# bits, a relative 4e-3 of logits of size ~10, so ~0.04 per log-prob; 0.1 is the bound. The same sequences
# scored twice by one path in one process must agree far tighter (identical kernels): 1e-5 fp32, 1e-3
# bf16. Another implementation against the HF forward (the rollout engine's sample log-probs: KV-cached
# decoding or vLLM; the vLLM teacher): other kernels, measured <= 1.7e-5 / 3.1e-5 nats in fp32; 1e-3 fp32
# and 0.15 bf16 bound it, while log-probs at temperature 0.9 instead of 1 differ by ~0.1 x (the token's
# logit - the mean logit), > 0.1 nats for any token 1 logit from the mean.
TOLERANCES = {
    "fp32": {"same_path": 1e-5, "batching": 1e-3, "position_kl": 1e-4, "sampler": 1e-3, "vllm": 1e-3},
    "bf16": {"same_path": 1e-3, "batching": 0.1, "position_kl": 0.05, "sampler": 0.15, "vllm": 0.15},
}
KL_S_EPS = 1e-6  # "KL_S > 0": above fp32 round-off of a sum of k terms of size <= 1


@dataclass
class Check:
    name: str
    status: str  # pass | fail | skip
    detail: str  # what was measured (pass) / what is wrong and the fix (fail) / why not run (skip)

    def line(self) -> str:
        return f"{self.name}: {self.detail}"


@dataclass
class RecipeResult:
    recipe: str
    overrides: list[str]
    seed: int = 0
    checks: list[Check] = field(default_factory=list)
    part_b: dict | None = None
    part_b_skipped: str | None = None
    budget: dict = field(default_factory=dict)
    wall_s: float = 0.0  # parts A and B
    facts: dict = field(default_factory=dict)  # what of the config the prediction's messages name
    pilot: dict | None = None  # part C (--pilot-steps), its own wall_s
    prediction: dict | None = None  # part D: stages.predict.predict of the above

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def to_json(self) -> dict:
        return {**asdict(self), "ok": not self.failed}


def _pass(name: str, detail: str) -> Check:
    return Check(name, "pass", detail)


def _fail(name: str, detail: str) -> Check:
    return Check(name, "fail", detail)


# --------------------------------------------------------------------------------- part A: the files
def read_model_json(path: str, name: str) -> dict | None:
    """config.json / generation_config.json of a local model directory (None when absent)."""
    file = Path(path).expanduser() / name
    return json.loads(file.read_text()) if file.is_file() else None


def _ids(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, list) else [value])}


def eos_ids(tokenizer, generation_config: dict | None) -> set[int]:
    """Every id that ends a response on one side: the tokenizer's EOS and generation_config's."""
    return _ids(tokenizer.eos_token_id) | _ids((generation_config or {}).get("eos_token_id"))


def check_vocabulary(s_tok, t_tok) -> Check:
    sv, tv = s_tok.get_vocab(), t_tok.get_vocab()
    if sv == tv:
        return _pass("vocabulary", f"identical ({len(sv)} tokens)")
    differ = sorted(set(sv.items()) ^ set(tv.items()), key=lambda kv: kv[1])[:3]
    return _fail(
        "vocabulary",
        f"the teacher's tokenizer ({len(tv)} tokens) differs from the student's ({len(sv)}), e.g. "
        f"{differ}; token-level distillation needs one vocabulary: pick a teacher of the student's family",
    )


def check_embedding_rows(s_conf: dict | None, t_conf: dict | None, s_tok) -> Check:
    if s_conf is None or t_conf is None:
        return Check("embedding_rows", "skip", "config.json not found locally (a hub id): rows not compared")
    vs, vt = s_conf.get("vocab_size"), t_conf.get("vocab_size")
    if vs != vt:
        return _fail(
            "embedding_rows",
            f"config.json vocab_size: student {vs} rows, teacher {vt} (for {len(s_tok)} tokens): the logits "
            f"do not line up; pick a teacher whose embedding is padded like the student's",
        )
    if vs is not None and vs < len(s_tok):
        return _fail(
            "embedding_rows",
            f"vocab_size {vs} < {len(s_tok)} tokenizer tokens: ids past row {vs} have no logit; fix config.json",
        )
    return _pass("embedding_rows", f"{vs} rows on both sides for {len(s_tok)} tokens")


def check_special_tokens(s_tok, t_tok) -> Check:
    names = ("eos_token_id", "pad_token_id", "bos_token_id")
    diff = {
        n: (getattr(s_tok, n), getattr(t_tok, n)) for n in names if getattr(s_tok, n) != getattr(t_tok, n)
    }
    if diff:
        return _fail(
            "special_tokens",
            "special token ids differ (student, teacher): "
            + ", ".join(f"{n} {a} vs {b}" for n, (a, b) in diff.items())
            + "; use the same tokenizer files on both sides",
        )
    return _pass(
        "special_tokens", ", ".join(f"{n.removesuffix('_token_id')} {getattr(s_tok, n)}" for n in names)
    )


def check_stop_tokens(s_tok, t_tok, s_gen: dict | None, t_gen: dict | None) -> Check:
    s_eos, t_eos = eos_ids(s_tok, s_gen), eos_ids(t_tok, t_gen)
    if s_eos != t_eos:
        return _fail(
            "stop_tokens",
            f"the student ends responses at EOS ids {sorted(s_eos)}, the teacher at {sorted(t_eos)} "
            f"(tokenizer + generation_config.json): the teacher never scores the student's stop as a stop; "
            f"align eos_token_id (SFT the student on the teacher's format first)",
        )
    return _pass("stop_tokens", f"EOS ids {sorted(s_eos)} on both sides")


def _generation_suffix(tokenizer, messages: list[dict], thinking: bool) -> list[int] | None:
    """The ids the template appends for add_generation_prompt=True (None when it appends nothing)."""
    with_gen = chat_prompt_ids(tokenizer, messages, thinking, add_generation_prompt=True)
    without = chat_prompt_ids(tokenizer, messages, thinking, add_generation_prompt=False)
    common = 0
    while common < min(len(with_gen), len(without)) and with_gen[common] == without[common]:
        common += 1
    suffix = with_gen[common:]
    return suffix or None


def check_generation_prompt(s_tok, s_builder: PromptBuilder, rows: list[dict], thinking: bool) -> Check:
    suffix = _generation_suffix(s_tok, s_builder.messages(rows[0]), thinking)
    if suffix is None:
        return _fail(
            "generation_prompt",
            "the student's chat template appends nothing for add_generation_prompt=True: responses would "
            "start without the assistant header; fix the template's `if add_generation_prompt` branch",
        )
    return _pass("generation_prompt", f"{s_tok.decode(suffix)!r} ({len(suffix)} tokens)")


def check_prompt_tail(
    s_tok, t_tok, s_builder, t_builder, rows: list[dict], s_thinking: bool, t_thinking: bool
) -> Check:
    """The teacher's prompt must end with the ids the student's generation prompt ends with, so that the
    first response token is predicted from the same context on both sides (think block included)."""
    for i, row in enumerate(rows):
        tail = _generation_suffix(s_tok, s_builder.messages(row), s_thinking) or []
        t_ids = chat_prompt_ids(t_tok, t_builder.messages(row), t_thinking)
        s_ids = chat_prompt_ids(s_tok, s_builder.messages(row), s_thinking)
        if not tail or t_ids[-len(tail) :] != tail:
            seen = t_ids[-max(len(tail), 1) :]
            return _fail(
                "prompt_tail",
                f"row {i}: the student's prompt ends with {s_tok.decode(s_ids[-max(len(tail), 1) :])!r}, the "
                f"teacher's with {t_tok.decode(seen)!r} (enable_thinking student={s_thinking}, "
                f"teacher={t_thinking}): the teacher scores each response token one context off; use one chat "
                f"template and set teacher.enable_thinking to model.enable_thinking",
            )
    return _pass("prompt_tail", f"{len(rows)} rows end with the student's generation prompt on both sides")


def check_pi_fields(cfg: DictConfig, rows: list[dict], s_tok, s_builder, t_builder, s_thinking, t_thinking):
    """OPSD: every PI field the teacher's prompt reads is in the rows, and it changes the teacher's prompt
    (against the student's prompt and against the same row with the PI field emptied)."""
    if cfg.teacher.kind != "self_pi":
        return Check("pi_fields", "skip", f"teacher.kind={cfg.teacher.kind}: no privileged information")
    try:
        for row in rows:
            t_builder.check_fields(row)
    except OpdError as exc:
        return _fail("pi_fields", str(exc))
    field_ = cfg.teacher.pi_field
    if field_ not in rows[0]:
        return _fail(
            "pi_fields",
            f"teacher.pi_field={field_!r} is not a field of the task's rows ({sorted(rows[0])}); fix teacher.pi_field",
        )
    for i, row in enumerate(rows):
        t_ids = chat_prompt_ids(s_tok, t_builder.messages(row), t_thinking)
        s_ids = chat_prompt_ids(s_tok, s_builder.messages(row), s_thinking)
        blank = chat_prompt_ids(s_tok, t_builder.messages({**row, field_: ""}), t_thinking)
        if t_ids == s_ids or (row.get(field_) and t_ids == blank):
            return _fail(
                "pi_fields",
                f"row {i}: the teacher's prompt does not change with teacher.pi_field={field_!r}: the OPSD "
                f"teacher sees nothing the student does not; put {{{field_}}} in teacher.prompt_template or set "
                f"teacher.system_prompt_from_pi=true",
            )
    return _pass("pi_fields", f"{field_!r} present in {len(rows)} rows and changes the teacher's prompt")


@dataclass
class Pair:
    """What part A reads: both sides' tokenizers, files, prompt builders and chat settings."""

    student_path: str
    teacher_path: str
    s_tok: object
    t_tok: object
    s_conf: dict | None
    t_conf: dict | None
    s_gen: dict | None
    t_gen: dict | None
    s_builder: PromptBuilder
    t_builder: PromptBuilder
    s_thinking: bool
    t_thinking: bool


def read_pair(cfg: DictConfig, task) -> Pair:
    student_path = resolve_path(cfg.model.path, cfg)
    teacher_path = teacher_checkpoint(cfg, student_path)
    s_tok = load_tokenizer(student_path)
    t_tok = s_tok if teacher_path == student_path else load_tokenizer(teacher_path)
    return Pair(
        student_path,
        teacher_path,
        s_tok,
        t_tok,
        read_model_json(student_path, "config.json"),
        read_model_json(teacher_path, "config.json"),
        read_model_json(student_path, "generation_config.json"),
        read_model_json(teacher_path, "generation_config.json"),
        student_prompt_builder(task, cfg.teacher),
        teacher_prompt_builder(task, cfg.teacher),
        bool(cfg.model.enable_thinking),
        bool(teacher_enable_thinking(cfg)),
    )


def file_checks(cfg: DictConfig, task, rows: list[dict], pair: Pair) -> list[Check]:
    """Part A from the tokenizers and the json files only. The teacher's prompt is built only once its
    PI fields are known to exist (pi_fields first), and compared only when the student's has a
    generation prompt to compare with."""
    p = pair
    pi = check_pi_fields(cfg, rows, p.s_tok, p.s_builder, p.t_builder, p.s_thinking, p.t_thinking)
    checks = [
        check_vocabulary(p.s_tok, p.t_tok),
        check_embedding_rows(p.s_conf, p.t_conf, p.s_tok),
        check_special_tokens(p.s_tok, p.t_tok),
        check_stop_tokens(p.s_tok, p.t_tok, p.s_gen, p.t_gen),
        check_generation_prompt(p.s_tok, p.s_builder, rows, p.s_thinking),
    ]
    if checks[-1].status == "fail" or pi.status == "fail":
        why = (
            "the student's template has no generation prompt"
            if checks[-1].status == "fail"
            else "pi_fields failed"
        )
        checks.append(Check("prompt_tail", "skip", why))
    else:
        checks.append(
            check_prompt_tail(p.s_tok, p.t_tok, p.s_builder, p.t_builder, rows, p.s_thinking, p.t_thinking)
        )
    return [*checks, pi]


# ------------------------------------------------------------------------------- part A: the weights
def weights_gb(path: str) -> float | None:
    """GB of *.safetensors / *.bin weights in a local model directory (None: not a local directory)."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        return None
    files = [*directory.glob("*.safetensors"), *directory.glob("*.bin")]
    return sum(f.stat().st_size for f in files) / 1e9 if files else None


def weights_skip_reason(pair: Pair, device: torch.device) -> str | None:
    sizes = {"student": weights_gb(pair.student_path), "teacher": weights_gb(pair.teacher_path)}
    absent = [k for k, v in sizes.items() if v is None]
    if absent:
        return (
            f"no local weights for the {' and '.join(absent)}: position/determinism checks and part B skipped"
        )
    if device.type == "cpu" and sum(sizes.values()) > CPU_WEIGHTS_LIMIT_GB:
        return (
            f"{sum(sizes.values()):.1f} GB of weights on a CPU (limit {CPU_WEIGHTS_LIMIT_GB} GB): position/"
            f"determinism checks and part B skipped; run opd preflight on a GPU node"
        )
    return None


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """max |a - b| over the response positions (mask [B, T]) of [B, T] or [B, T, V] tensors."""
    d = (a.float() - b.float()).abs()
    if d.dim() == 3:
        d = d.amax(-1)
    return float(d[mask].max()) if bool(mask.any()) else 0.0


def check_teacher_determinism(score, rows: list[dict], responses: list[list[int]], tol: dict) -> Check:
    """`score(rows, responses)` -> TeacherLogprobs(full [B, T, V]): twice on the same batch, then one
    sequence at a time (batch composition and padding must not change a log-prob)."""
    first, second = score(rows, responses).full, score(rows, responses).full
    mask = torch.zeros(first.shape[:2], dtype=torch.bool)
    for i, r in enumerate(responses):
        mask[i, : len(r)] = True
    mask = mask.to(first.device)
    again = max_abs_diff(first, second, mask)
    if again > tol["same_path"]:
        return _fail(
            "teacher_determinism",
            f"the same sequences scored twice differ by up to {again:.2e} nats (tolerance {tol['same_path']:.0e}): "
            f"the teacher is noisy between calls (dropout on, sampling in the scorer?); make teacher scoring "
            f"deterministic (model.eval(), no sampling)",
        )
    worst = 0.0
    for i, (row, resp) in enumerate(zip(rows, responses, strict=True)):
        if resp:
            alone = score([row], [resp]).full[0, : len(resp)]
            worst = max(worst, float((alone.float() - first[i, : len(resp)].float()).abs().max()))
    if worst > tol["batching"]:
        return _fail(
            "teacher_determinism",
            f"a sequence scored alone and in a batch differs by up to {worst:.2e} nats (tolerance "
            f"{tol['batching']:.0e}): padding leaks into the teacher's scores; check the attention mask",
        )
    return _pass("teacher_determinism", f"twice: {again:.1e}, alone vs batched: {worst:.1e} nats (max)")


def check_vllm_path(vllm_out, hf_full: torch.Tensor, responses: list[list[int]], tol: dict) -> Check:
    """teacher.backend=vllm: its top-K and sampled-token log-probs against the HF forward's full ones."""
    worst = 0.0
    for i, r in enumerate(responses):
        n = len(r)
        if n:
            hf = hf_full[i, :n].float()
            at_top = hf.gather(-1, vllm_out.topk_ids[i, :n].to(hf.device))
            worst = max(
                worst, float((at_top - vllm_out.topk_logprobs[i, :n].to(hf.device).float()).abs().max())
            )
            ids = torch.tensor(r, device=hf.device).unsqueeze(-1)
            sampled = hf.gather(-1, ids).squeeze(-1)
            worst = max(worst, float((sampled - vllm_out.sampled[i, :n].to(hf.device).float()).abs().max()))
    if worst > tol["vllm"]:
        return _fail(
            "teacher_paths",
            f"the vLLM teacher's log-probs differ from the HF forward's by up to {worst:.2e} nats (tolerance "
            f"{tol['vllm']:.0e}) on the same sequences: the two teacher paths disagree; check the served "
            f"model, its tokenizer and --logprobs-mode raw_logprobs",
        )
    return _pass("teacher_paths", f"vLLM vs HF teacher: {worst:.1e} nats (max, top-K and sampled tokens)")


def position_alignment(
    student_logp: torch.Tensor, as_teacher_logp: torch.Tensor, mask: torch.Tensor, tol
) -> Check:
    """KL(p_learner || p_teacher-path) per response position; the same model on the same tokens: ~0."""
    kl = (student_logp.exp() * (student_logp - as_teacher_logp)).sum(-1)
    worst = float(kl[mask].abs().max()) if bool(mask.any()) else 0.0
    if worst > tol["position_kl"]:
        t, pos = divmod(int(torch.where(mask, kl.abs(), -1.0).argmax()), kl.shape[1])
        return _fail(
            "position_alignment",
            f"the student scoring its own rollouts through the teacher path gives KL {worst:.2e} at sequence "
            f"{t} position {pos} (tolerance {tol['position_kl']:.0e}): the teacher's log-probs are shifted "
            f"against the response tokens (off-by-one or re-tokenized prompt); score from token ids",
        )
    return _pass("position_alignment", f"max KL {worst:.1e} over {int(mask.sum())} positions")


def check_temperature(
    samples, learner_logp: torch.Tensor, responses, tol, rollout_temperature: float
) -> Check:
    """The log-probs the loss uses are at temperature 1: the engine reports raw log-probs of its samples
    (rollout/base.py's contract) and the learner's forward gives the same numbers for the same tokens.
    Sampling at rollout.temperature != 1 is allowed (the samples then come from p^(1/T), stated)."""
    worst = 0.0
    for i, (s, r) in enumerate(zip(samples, responses, strict=True)):
        if r:
            ids = torch.tensor(r, device=learner_logp.device)
            mine = learner_logp[i, : len(r)].gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            worst = max(worst, float((mine - torch.tensor(s.logprobs, device=mine.device)).abs().max()))
    if worst > tol["sampler"]:
        return _fail(
            "temperature",
            f"the rollout engine's log-probs differ from the learner's temperature-1 log-probs by up to "
            f"{worst:.2e} nats (tolerance {tol['sampler']:.0e}): the engine reports another temperature or "
            f"other weights; report raw log-probs (vLLM logprobs_mode=raw_logprobs) and check the weight sync",
        )
    note = (
        "" if rollout_temperature == 1.0 else f"; samples drawn at rollout.temperature={rollout_temperature}"
    )
    return _pass("temperature", f"engine vs learner at temperature 1: {worst:.1e} nats (max){note}")


# ---------------------------------------------------------------------------------------- part B
def hedging_ids(tokenizer, hedging: list[str]) -> list[int]:
    """The first token of each hedging / revision string: the mass on them bounds from above the
    probability of starting one at a position (multi-token strings would need a forward per prefix)."""
    out: list[int] = []
    for text in hedging:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if ids and ids[0] not in out:
            out.append(ids[0])
    return out


def mass_change(logp: torch.Tensor, grad: torch.Tensor, k: int) -> torch.Tensor:
    """First-order change of P_S (the student's top-k mass) under one unit step z <- z - g in logit space:
    dp_v = p_v (dz_v - <p, dz>) with dz = -g, so dP_S = -(sum_S p_v g_v - P_S <p, g>). [B, T]; the tail
    mass changes by the opposite amount."""
    p = logp.exp()
    top = logp.topk(k, dim=-1).indices
    p_s, g_s = p.gather(-1, top), grad.gather(-1, top)
    mean_g = (p * grad).sum(-1)
    return -((p_s * g_s).sum(-1) - p_s.sum(-1) * mean_g)


def position_measures(cfg: DictConfig, logits, s_logp, teacher, tokens, mask, behavior, hedge) -> dict:
    """Per response position [B, T]: mechanism 1 (top-K overlap at OVERLAP_K, the teacher's NLL of the
    sampled token, the full reverse KL(p_S || q_T), both sides' mass on the hedging tokens) and mechanism 2
    (KL_S > 0 on the student's top-k, k = loss.k; per loss arm, the recipe's, every TopK arm and the exact
    full_rkl reference at the recipe's k / support / tail_bucket: the first-order change of the top-k
    mass, whether the tail mass rises, and how much the step changes when the teacher's tail is flattened:
    0 for a loss that reads the teacher only on the student's top-k and as a tail total)."""
    t_logp = teacher.full
    vocab = s_logp.shape[-1]
    ko, k = min(OVERLAP_K, vocab), min(int(cfg.loss.k), vocab)
    s_top, t_top = s_logp.topk(ko, dim=-1).indices, t_logp.topk(ko, dim=-1).indices
    out = {
        "overlap": (s_top.unsqueeze(-1) == t_top.unsqueeze(-2)).any(-1).float().mean(-1),
        "teacher_nll": -t_logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
        # the teaching signal: the full reverse KL the exact loss starts from, per position
        "reverse_kl": (s_logp.exp() * (s_logp - t_logp)).sum(-1),
    }
    if hedge:
        ids = torch.tensor(hedge, device=t_logp.device)
        out["teacher_hedging_mass"] = t_logp.exp().index_select(-1, ids).sum(-1)
        out["student_hedging_mass"] = s_logp.exp().index_select(-1, ids).sum(-1)
    top = s_logp.topk(k, dim=-1).indices
    kl_s = (s_logp.exp().gather(-1, top) * (s_logp.gather(-1, top) - t_logp.gather(-1, top))).sum(-1)
    out["kl_s_positive"] = (kl_s > KL_S_EPS).float()
    base = loss_kwargs(cfg.loss)
    flat_tail = teacher_with_flat_tail(t_logp, top, tokens)
    for name in arms(cfg):
        opts = {key: v for key, v in base.items() if key in losses.loss_options(name)}
        for key in ("k", "support", "tail_bucket"):
            if key in losses.loss_options(name) and key in cfg.loss:
                opts[key] = cfg.loss[key]
        if name == "sampled_rkl":
            opts["behavior_logprobs"] = behavior
        grad = losses.logit_grad(name, logits, teacher, tokens, mask, **opts)
        d_top = mass_change(s_logp, grad, k)
        out[f"{name}/d_topk_mass"] = d_top  # per unit logit step; the tail mass moves by the opposite
        out[f"{name}/tail_rises"] = (d_top < 0).float()
        # does the step read the teacher's tail? the same loss with the teacher's mass outside the student's
        # top-k spread uniformly over it (the top-k and the tail's total unchanged): relative change
        other = losses.logit_grad(name, logits, flat_tail, tokens, mask, **opts)
        size = grad.norm(dim=-1)
        moved = (other - grad).norm(dim=-1)
        out[f"{name}/teacher_tail_sensitivity"] = torch.where(size > 0, moved / size.clamp_min(1e-30), 0.0)
        del grad, other
    return out


def teacher_with_flat_tail(t_logp: torch.Tensor, top: torch.Tensor, tokens: torch.Tensor):
    """The teacher with its mass outside the student's top-k (`top` [B, T, k]) spread uniformly over
    those tokens: the same log-probs on the top-k, the same tail total, no information inside the tail."""
    in_top = torch.zeros_like(t_logp, dtype=torch.bool).scatter_(-1, top, True)
    tail_total = torch.logsumexp(t_logp.masked_fill(in_top, float("-inf")), -1, keepdim=True)
    flat = torch.where(in_top, t_logp, tail_total - math.log(t_logp.shape[-1] - top.shape[-1]))
    return losses.TeacherLogprobs(full=flat, sampled=flat.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))


def arms(cfg: DictConfig) -> list[str]:
    return list(dict.fromkeys([cfg.loss.name, *TOPK_ARMS, REFERENCE_ARM]))


def part_b_summary(cfg: DictConfig, means: dict[str, float], vocab: int) -> dict:
    m1 = {
        "overlap_k": min(OVERLAP_K, vocab),
        "topk_overlap": means["overlap"],
        "teacher_nll": means["teacher_nll"],
        "reverse_kl": means["reverse_kl"],
        **{key: means[key] for key in ("teacher_hedging_mass", "student_hedging_mass") if key in means},
    }
    m2 = {
        "recipe_loss": cfg.loss.name,  # its arm is in "arms" beside the TopK ones (a json file sorts keys)
        "k": min(int(cfg.loss.k), vocab),
        "kl_s_positive_share": means["kl_s_positive"],
        "arms": {
            name: {
                "d_topk_mass": means[f"{name}/d_topk_mass"],
                "tail_rises_share": means[f"{name}/tail_rises"],
                "teacher_tail_sensitivity": means[f"{name}/teacher_tail_sensitivity"],
            }
            for name in arms(cfg)
        },
    }
    return {"mechanism_1": m1, "mechanism_2": m2}


def mechanism_3(cfg: DictConfig, n: int, seed: int) -> dict:
    """Mechanism 3 (OPSD aggregation): how much the PI-conditioned teacher depends on information the
    student cannot supply, on `n` of the student's rollouts (`stages.pi_probe.pi_dependence`, 4 samples of
    the student's own PI per prompt). The headline is the per-token KL from the reference teacher to q_bar,
    the normalized geometric mean over what the student would put in the PI's place (its optimum in the
    paper's analysis), and, for an answer PI, the same where the teacher commits to its answer; ~0 for a
    shared rule."""
    if cfg.teacher.kind != "self_pi":
        return {"status": "n/a (no privileged information)"}
    if n <= 0:
        return {"status": "not measured (no rollouts)"}
    result = pi_dependence(cfg, n, seed, samples=4)
    gaps = {
        "gap_to_student_optimum": result["gap_to_student_optimum"],
        "gap_where_teacher_commits": result["gap_where_teacher_commits"],
    }
    worst = max((g for g in gaps.values() if g is not None), default=None)
    none = result["kl"].get("none") or {}
    return {
        "status": (
            "not measurable"
            if worst is None
            # float round-off around an exact 0 (a shared rule) is said as such
            else "gap to the student's optimum ~0 (< 1e-6 nats/token)"
            if abs(worst) < 1e-6
            else f"gap to the student's optimum {worst:.3g} nats/token"
        ),
        **gaps,
        "kl_to_no_pi": none.get("mean"),
        "shared": result["shared"],
        "student_pi_same_as_reference": result["student_pi_same_as_reference"],
        # can the student finish, without the PI, what the PI teacher starts (stages/pi_probe.py)
        "path": result["path"],
        # what q_bar itself writes, greedily, and how often it is right (stages/pi_probe.py); reported,
        # not read by the prediction rules (they were fitted before it existed: stages/predict.py)
        "optimum": result["optimum"],
        "wall_s": result["wall_s"],
    }


def readiness(task, tokenizer, rows, samples) -> dict:
    texts = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    verdicts = [task.verify(r, t) for r, t in zip(rows, texts, strict=True)]
    n = max(len(samples), 1)
    return {
        "well_formed": sum(v.well_formed for v in verdicts) / n,
        "truncation": sum(s.finish_reason == "length" for s in samples) / n,
        "sampled_accuracy": sum(v.correct for v in verdicts) / n,
        "mean_length": sum(len(s.response_ids) for s in samples) / n,
    }


# ------------------------------------------------------------------------------------- one recipe
TEACHER_READINESS_PROMPTS = 64  # teacher samples that estimate the SFT stage's kept-trace share


def budget(cfg: DictConfig, rollouts: int) -> dict:
    run = cfg.trainer.steps * cfg.trainer.prompts_per_step * cfg.rollout.n
    return {
        "rollouts": rollouts,
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "run_rollouts": run,
        "fraction_of_run_rollouts": rollouts / run if run else 0.0,
    }


def recipe_facts(cfg: DictConfig) -> dict:
    return {
        "loss": cfg.loss.name,
        "k": int(cfg.loss.k),
        "teacher_kind": cfg.teacher.kind,
        "stabilization": cfg.stabilization.kind,
        "steps": int(cfg.trainer.steps),
    }


def preflight_recipe(
    cfg: DictConfig, recipe: str, overrides: list[str], rollouts: int, pilot_steps: int = 0
) -> RecipeResult:
    """Part A (files, then weights), then part B on `rollouts` student rollouts (0: part A only), then
    the pilot's `pilot_steps` training steps (part C, 0: none) and the prediction (part D). Stops at the
    first stage with a fail: nothing expensive runs after a failed check."""
    started = time.monotonic()
    result = RecipeResult(
        recipe, overrides, seed=cfg.seed, budget=budget(cfg, rollouts), facts=recipe_facts(cfg)
    )
    seed_everything(cfg.seed)
    task, train_rows, _ = load_task_and_data(cfg.task)
    rows = train_rows[:TEMPLATE_ROWS]
    pair = read_pair(cfg, task)
    result.checks = file_checks(cfg, task, rows, pair)
    device = pick_device(cfg.trainer.device)
    skip = "part A failed" if result.failed else weights_skip_reason(pair, device)
    if skip is None:
        run_weights(cfg, result, task, train_rows, pair, device, rollouts)
    else:
        for name in ("position_alignment", "teacher_determinism", "temperature"):
            result.checks.append(Check(name, "skip", skip))
        result.part_b_skipped = skip
    result.wall_s = round(time.monotonic() - started, 1)
    if pilot_steps > 0 and not result.failed:
        result.pilot = pilot(cfg, pilot_steps)
    result.prediction = predict(result.to_json()).to_json()
    return result


def run_weights(cfg, result: RecipeResult, task, train_rows, pair: Pair, device, rollouts: int) -> None:
    dtype = (
        "bf16"
        if device.type == "cuda" and weights_dtype(device, cfg.teacher.dtype) != torch.float32
        else "fp32"
    )
    tol = TOLERANCES[dtype]
    student = load_model(pair.student_path, device, trainable=False)
    t_device = teacher_device(cfg.teacher.device, device)
    teacher_model = load_model(
        pair.teacher_path, t_device, trainable=False, dtype=weights_dtype(t_device, cfg.teacher.dtype)
    )
    teacher = Teacher(
        teacher_model, pair.t_tok, pair.t_builder, enable_thinking=pair.t_thinking, output_device=device
    )
    # the student as its own teacher, through the teacher-scoring path, with the student's prompts
    as_teacher = Teacher(
        student,
        pair.s_tok,
        PromptBuilder(task, pair.s_builder.system_prompt),
        enable_thinking=pair.t_thinking,
        output_device=device,
    )
    n = max(rollouts, 4)  # the weight checks need a few rollouts even with --rollouts 0
    rows = batch_rows(train_rows, 0, cfg.seed, n)
    prompts = [chat_prompt_ids(pair.s_tok, pair.s_builder.messages(r), pair.s_thinking) for r in rows]
    engine = rollout_engine(cfg, pair.student_path, device, dtype="float32", model=student)
    try:
        sampling = SamplingConfig(
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_new_tokens=cfg.rollout.max_new_tokens,
        )
        samples = [g[0] for g in engine.generate(prompts, sampling, derive_seed(cfg.seed, 0, 17))]
    finally:
        engine.close()
    responses = [s.response_ids for s in samples]
    few = slice(0, WEIGHT_CHECK_SEQUENCES)
    batch = pack(prompts[few], responses[few], pair.s_tok.pad_token_id).to(device)
    with torch.no_grad():
        _, logits = ResponseForward(student)(batch.input_ids, batch.attention_mask, batch.response_index)
    s_logp = torch.log_softmax(logits.float(), -1)
    mask = batch.response_mask
    as_teacher_logp = as_teacher.score(rows[few], responses[few]).full
    result.checks.append(position_alignment(s_logp, as_teacher_logp, mask, tol))
    result.checks.append(check_teacher_determinism(teacher.score, rows[few], responses[few], tol))
    result.checks.append(
        check_temperature(samples[few], s_logp, responses[few], tol, cfg.rollout.temperature)
    )
    if cfg.teacher.backend == "vllm":  # the recipe's own path, against the HF forward on the same sequences
        from opd_cli.teacher_server.scorer import build_vllm_teacher

        served = build_vllm_teacher(
            cfg, task, pair.s_tok, student.config.vocab_size, pair.teacher_path, device, rows[0]
        )
        try:
            vllm_out = served.score(rows[few], responses[few])
        finally:
            served.close()
        hf_full = teacher.score(rows[few], responses[few]).full
        result.checks.append(check_vllm_path(vllm_out, hf_full, responses[few], tol))
    del logits, s_logp, as_teacher_logp
    if result.failed:
        result.part_b_skipped = "part A failed"
        return
    if rollouts <= 0:
        result.part_b_skipped = "--rollouts 0"
        return
    result.part_b = measure_part_b(cfg, task, pair, student, teacher, rows, prompts, samples, device)
    if cfg.stabilization.kind == "sft":  # the SFT stage's traces come from this teacher
        result.part_b["teacher_readiness"] = teacher_readiness(
            cfg, task, pair, teacher_model, t_device, rows[:TEACHER_READINESS_PROMPTS]
        )


def teacher_readiness(cfg, task, pair: Pair, teacher_model, t_device, rows) -> dict:
    """The teacher's own T=1 answers to `rows` on its own prompt, with the verifier: how many of the SFT
    stage's traces it would keep (stabilization=sft trains the student on the correct ones)."""
    prompts = [chat_prompt_ids(pair.t_tok, pair.t_builder.messages(r), pair.t_thinking) for r in rows]
    engine = rollout_engine(cfg, pair.teacher_path, t_device, dtype="float32", model=teacher_model)
    try:
        sampling = SamplingConfig(
            temperature=cfg.rollout.temperature,  # as stages/sft.py samples its traces
            top_p=cfg.rollout.top_p,
            max_new_tokens=cfg.rollout.max_new_tokens,
        )
        samples = [g[0] for g in engine.generate(prompts, sampling, derive_seed(cfg.seed, 0, 19))]
    finally:
        engine.close()
    out = readiness(task, pair.t_tok, rows, samples)
    out["prompts"] = len(rows)
    out["expected_kept_traces"] = out["sampled_accuracy"] * int(cfg.stabilization.num_traces)
    return out


def measure_part_b(cfg, task, pair: Pair, student, teacher, rows, prompts, samples, device) -> dict:
    """Part B on the rollouts, PART_B_CHUNK sequences per forward; every figure is a mean over all
    response positions (readiness: over rollouts)."""
    hedge = hedging_ids(pair.s_tok, list(cfg.diagnostics.hedging_tokens or task.hedging_tokens))
    chunk = cfg.trainer.micro_batch_size or PART_B_CHUNK
    values: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(samples), chunk):
        part = samples[start : start + chunk]
        responses = [s.response_ids for s in part]
        batch = pack(prompts[start : start + chunk], responses, pair.s_tok.pad_token_id).to(device)
        with torch.no_grad():
            _, logits = ResponseForward(student)(batch.input_ids, batch.attention_mask, batch.response_index)
        logits = logits.float()
        behavior = torch.zeros(batch.response_mask.shape, device=device)
        for i, s in enumerate(part):
            behavior[i, : len(s.logprobs)] = torch.tensor(s.logprobs, device=device)
        t_out = teacher.score(rows[start : start + chunk], responses)
        measures = position_measures(
            cfg,
            logits,
            torch.log_softmax(logits, -1),
            t_out,
            batch.response_ids,
            batch.response_mask,
            behavior,
            hedge,
        )
        for key, v in measures.items():
            values.setdefault(key, []).append(v[batch.response_mask].float().cpu())
        del logits, t_out, measures
    means = {
        key: float(torch.cat(v).mean()) if sum(map(len, v)) else float("nan") for key, v in values.items()
    }
    return {
        **part_b_summary(cfg, means, student.config.vocab_size),
        "mechanism_3": mechanism_3(cfg, len(rows), cfg.seed),
        "readiness": readiness(task, pair.s_tok, rows, samples),
        "positions": sum(len(s.response_ids) for s in samples),
    }


# ------------------------------------------------------------------------------------------ output
def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def check_table(result: RecipeResult) -> str:
    lines = [f"{result.recipe}:"]
    for c in result.checks:
        lines.append(f"  {c.status:<4}  {c.name:<20} {c.detail}")
    return "\n".join(lines)


B_COLUMNS = (
    ("top-K overlap", lambda b: b["mechanism_1"]["topk_overlap"]),
    ("teacher NLL", lambda b: b["mechanism_1"]["teacher_nll"]),
    ("teacher hedge mass", lambda b: b["mechanism_1"].get("teacher_hedging_mass", "n/a")),
    ("KL_S>0", lambda b: b["mechanism_2"]["kl_s_positive_share"]),
    ("recipe loss", lambda b: b["mechanism_2"]["recipe_loss"]),
    ("dP_topK", lambda b: b["mechanism_2"]["arms"][b["mechanism_2"]["recipe_loss"]]["d_topk_mass"]),
    ("tail rises", lambda b: b["mechanism_2"]["arms"][b["mechanism_2"]["recipe_loss"]]["tail_rises_share"]),
    ("well-formed", lambda b: b["readiness"]["well_formed"]),
    ("truncation", lambda b: b["readiness"]["truncation"]),
    ("sampled acc", lambda b: b["readiness"]["sampled_accuracy"]),
    ("mechanism 3", lambda b: b["mechanism_3"]["status"]),
)


def summary_rows(results: list[RecipeResult]) -> tuple[list[str], list[list[str]]]:
    header = ["recipe", "seed", "part A", *(name for name, _ in B_COLUMNS)]
    rows = []
    for r in results:
        part_a = "fail: " + ", ".join(c.name for c in r.failed) if r.failed else "pass"
        if r.part_b is None:
            rows.append(
                [
                    r.recipe,
                    str(r.seed),
                    part_a,
                    *([f"skipped ({r.part_b_skipped})"] + [""] * (len(B_COLUMNS) - 1)),
                ]
            )
        else:
            rows.append([r.recipe, str(r.seed), part_a, *(_fmt(get(r.part_b)) for _, get in B_COLUMNS)])
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def arm_table(results: list[RecipeResult]) -> str:
    header = ["recipe", "seed", "k", *(f"{a}: dP_topK / tail rises" for a in TOPK_ARMS)]
    rows = []
    for r in results:
        if r.part_b:
            m2 = r.part_b["mechanism_2"]
            rows.append(
                [
                    r.recipe,
                    str(r.seed),
                    str(m2["k"]),
                    *(
                        f"{_fmt(m2['arms'][a]['d_topk_mass'])} / {_fmt(m2['arms'][a]['tail_rises_share'])}"
                        for a in TOPK_ARMS
                    ),
                ]
            )
    return markdown(header, rows)


def ranked(results: list[RecipeResult]) -> list[RecipeResult]:
    return sorted(results, key=lambda r: (rank_key(Prediction(**r.prediction)), r.recipe, r.seed))


def prediction_rows(results: list[RecipeResult]) -> tuple[list[str], list[list[str]]]:
    """One row per recipe, best first: the prediction, its mechanism, confidence, evidence and fix."""
    header = ["rank", "recipe", "seed", "prediction", "confidence", "mechanism", "evidence", "fix"]
    rows = []
    for i, r in enumerate(ranked(results), 1):
        p = r.prediction
        rows.append(
            [
                str(i),
                r.recipe,
                str(r.seed),
                p["verdict"],
                p["confidence"],
                p["mechanism"],
                p["evidence"],
                p["fix"],
            ]
        )
    return header, rows


def write_outputs(
    out_dir: Path, results: list[RecipeResult], command: str, calibration: dict | None = None
) -> None:
    """preflight.json and preflight.md (and, with a calibration, calibration.json / .md), each atomic."""
    payload = {"command": command, "recipes": [r.to_json() for r in results], "tolerances": TOLERANCES}
    md = [
        f"# opd preflight\n\n`{command}`\n",
        "## Prediction (one row per recipe, ranked; rules: opd_cli/stages/predict.py)\n",
        markdown(*prediction_rows(results)),
        "\n## Summary (one row per recipe)\n",
        markdown(*summary_rows(results)),
        "\nMechanism 2 per TopK arm: first-order change of the student's top-K mass per unit logit step "
        "(the tail mass changes by the opposite) / share of positions whose tail mass rises.\n",
        arm_table(results),
        "\n## Part A per recipe\n",
        *(f"```\n{check_table(r)}\n```\n" for r in results),
    ]
    if any(r.pilot for r in results):
        md += [
            "\n## Pilot (part C): first -> last value, slope per step ± its standard error\n",
            pilot_table(results),
        ]
    if calibration is not None:
        atomic_write_json(out_dir / "calibration.json", calibration)
        atomic_write_text(out_dir / "calibration.md", calibration_markdown(calibration, command) + "\n")
    atomic_write_json(out_dir / "preflight.json", payload)
    atomic_write_text(out_dir / "preflight.md", "\n".join(md) + "\n")


def pilot_table(results: list[RecipeResult]) -> str:
    header = ["recipe", "seed", "pilot", *SIGNS]
    rows = []
    for r in results:
        if r.pilot is None:
            continue
        signs = r.pilot.get("signs", {})
        cells = [
            f"{_fmt(s['first'])} -> {_fmt(s['last'])}, {s['slope']:+.2g} ± {s['slope_se']:.1g}" if s else "-"
            for s in (signs.get(name) for name in SIGNS)
        ]
        rows.append([r.recipe, str(r.seed), r.pilot["status"], *cells])
    return markdown(header, rows)


def gate(cfgs: list[DictConfig]) -> None:
    """`opd run preflight=true`: part A of every job before anything is written; the first fail raises
    OpdError with its check's one line (the caller exits 2)."""
    for cfg in cfgs:
        result = preflight_recipe(cfg, cfg.cell.name, [], rollouts=0)
        if result.failed:
            raise OpdError(f"preflight: {result.failed[0].line()} (opd preflight prints every check)")
        passed = sum(c.status == "pass" for c in result.checks)
        skipped = [c.name for c in result.checks if c.status == "skip"]
        print(
            f"preflight: {passed} checks passed" + (f", skipped: {', '.join(skipped)}" if skipped else ""),
            file=sys.stderr,
        )
