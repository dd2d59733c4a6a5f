"""What a vLLM teacher can serve, checked when the config is composed (before any output is written).

vLLM returns, per position, the teacher's top-K log-probs and the log-prob of the actual token
(`prompt_logprobs=K`). That is exactly what these losses read:

- sampled_rkl: log q(y_t) of the sampled token;
- topk_rkl, topk_rkl_stopgrad, topk_rkl_renorm with loss.support=teacher or intersection (the paper
  authors' setting), with or without loss.tail_bucket (the tail's mass is 1 - the listed mass).

Full-vocabulary losses (full_rkl, full_fkl, gjsd) and support=student/union need log q at tokens the
teacher did not list: refused, with the reason and the alternatives.
"""

from __future__ import annotations

import re

FULL_VOCAB_LOSSES = ("full_rkl", "full_fkl", "gjsd")
TOPK_SUPPORTS = ("teacher", "intersection")
BACKENDS = ("hf", "vllm")
ALTERNATIVES = (
    "use loss=topk_rkl_stopgrad (or topk_rkl / topk_rkl_renorm) with loss.support=intersection or "
    "loss.support=teacher (loss.tail_bucket optional), or loss=sampled_rkl; or teacher.backend=hf "
    "(full logits from a local forward)"
)


def servers(value) -> list[str]:
    """teacher.server as a list of base URLs ([] = in process)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [str(u).rstrip("/") for u in items]


def teacher_backend_problem(c) -> str | None:
    """What is wrong with a teacher.backend / teacher.server / loss combination that cannot run (one line
    for config.validate to raise), or None."""
    t = c.teacher
    if t.backend not in BACKENDS:
        return f"teacher.backend={t.backend!r} is not allowed; choose one of: {', '.join(BACKENDS)}"
    urls = servers(t.server)
    if t.backend == "hf":
        if urls:
            return (
                f"teacher.server={t.server} needs teacher.backend=vllm (a server returns top-K log-probs "
                f"from vLLM); add teacher.backend=vllm or drop teacher.server"
            )
        return None
    for url in urls:
        if not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", url):
            return (
                f"teacher.server={url!r} is not a URL; pass the one `opd teacher serve` prints, e.g. "
                f"teacher.server=http://127.0.0.1:8000 (or a list: teacher.server=[http://a:8000,http://b:8000])"
            )
    name = c.loss.name
    if name in FULL_VOCAB_LOSSES:
        return (
            f"loss={name} needs the teacher's log-probs over the whole vocabulary, but teacher.backend=vllm "
            f"returns only its top-K and the sampled token's; {ALTERNATIVES}"
        )
    if name.startswith("topk_") and c.loss.support not in TOPK_SUPPORTS:
        return (
            f"loss={name} with loss.support={c.loss.support} needs log q at the student's top-K tokens, which "
            f"a vLLM teacher did not return when they are outside its own top-K; {ALTERNATIVES}"
        )
    if urls and t.kind == "self_pi" and c.stabilization.kind == "sft":
        return (
            "teacher.kind=self_pi with stabilization=sft: the OPSD teacher is the student after its SFT stage, "
            "which this run creates, so no server can hold it yet; use teacher.server=null (vLLM in process) "
            "or serve the SFT'd student and run without stabilization (model.path=<its directory>)"
        )
    if not urls and c.trainer.nproc > 1:
        return (
            f"teacher.backend=vllm in process with trainer.nproc={c.trainer.nproc} would start one teacher "
            f"engine per rank; serve it once (`opd teacher serve`) and pass teacher.server=<its URL>"
        )
    for key in ("timeout_s", "retry_backoff_s"):
        if getattr(t, key) <= 0:
            return f"teacher.{key}={getattr(t, key)!r} must be > 0"
    if t.retries < 0:
        return f"teacher.retries={t.retries!r} must be >= 0"
    if t.max_request_tokens < 1:
        return f"teacher.max_request_tokens={t.max_request_tokens!r} must be >= 1"
    if t.tensor_parallel_size < 1:
        return f"teacher.tensor_parallel_size={t.tensor_parallel_size!r} must be >= 1"
    return None


def logprobs_k(loss_cfg) -> int:
    """K asked of the teacher per position: loss.k for the TopK losses; sampled_rkl needs only the
    sampled token (K=1 keeps the top-1 for the overlap diagnostics)."""
    return int(loss_cfg.k) if str(loss_cfg.name).startswith("topk_") else 1
