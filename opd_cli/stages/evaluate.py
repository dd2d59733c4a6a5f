"""Evaluation: math accuracy and system-prompt internalization, through the same rollout engines.

    opd eval checkpoint=testbed:student_sft --engine hf
    opd eval checkpoint=testbed:opsd_base task=arith_concise --engine hf   # with vs without the system prompt
    opd eval checkpoint=outputs/2026-11-29/10-00-00-000000/checkpoints/step_000100 eval.samples=8

Accuracy is greedy exact-match by the task's verifier (math-verify for real math data), plus, with
`eval.samples=n`, sampled avg@n and the unbiased pass@k. The report always carries mean response length,
the truncation ratio and the accuracy on truncated vs finished responses, because a too-short evaluation
length fakes an accuracy drop (a warning is printed above 5% truncation).

For a task whose rows carry a system-prompt rule, the model is evaluated with and without the system
prompt; the internalization score is (follow_without - base_follow_without) /
(base_follow_with - base_follow_without) relative to the starting checkpoint's numbers.

`greedy_accuracy` (the last section) evaluates a model held in memory; the testbed's build steps use it.
"""

from __future__ import annotations

import logging
import math

import torch

from opd_cli.learner import check_model_dir, load_tokenizer, pick_device
from opd_cli.rollout import RolloutEngine, SamplingConfig
from opd_cli.rollout.hf_engine import HFEngine
from opd_cli.stages.common import load_task_and_data, resolve_path, rollout_engine
from opd_cli.stages.sft import prompt_ids as sft_prompt_ids
from opd_cli.tasks.base import Row, Task
from opd_cli.teachers import student_prompt_ids

log = logging.getLogger("opd")
TRUNCATION_WARNING = 0.05


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def internalization_score(
    follow_without: float, base_follow_with: float, base_follow_without: float
) -> float:
    """How much of the gap between the base model with and without the system prompt was closed."""
    gap = base_follow_with - base_follow_without
    if abs(gap) < 1e-9:
        return float("nan")
    return (follow_without - base_follow_without) / gap


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def evaluate_prompts(
    engine: RolloutEngine,
    tokenizer,
    task: Task,
    rows: list[Row],
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    samples: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    keep_samples: int = 5,
) -> dict:
    """Greedy (and optionally sampled) evaluation of already-built prompts."""
    greedy = engine.generate(prompt_ids, SamplingConfig(max_new_tokens=max_new_tokens, greedy=True), seed)
    texts = [tokenizer.decode(s[0].response_ids, skip_special_tokens=True) for s in greedy]
    verdicts = [task.verify(r, t) for r, t in zip(rows, texts, strict=True)]
    finished = [s[0].finish_reason == "stop" for s in greedy]
    correct = [v.correct for v in verdicts]
    result = {
        "n": len(rows),
        "accuracy": _mean([float(c) for c in correct]),
        "well_formed": _mean([float(v.well_formed) for v in verdicts]),
        "mean_length": _mean([float(len(s[0].response_ids)) for s in greedy]),
        "truncation_ratio": _mean([float(not f) for f in finished]),
        "accuracy_finished": _mean([float(c) for c, f in zip(correct, finished, strict=True) if f]),
        "accuracy_truncated": _mean([float(c) for c, f in zip(correct, finished, strict=True) if not f]),
    }
    follows = [v.follows_rule for v in verdicts if v.follows_rule is not None]
    if follows:
        result["rule_following"] = _mean([float(f) for f in follows])
    if result["truncation_ratio"] > TRUNCATION_WARNING:
        log.warning(
            "%.0f%% of evaluation responses hit eval.max_new_tokens=%d: accuracy is understated; "
            "raise eval.max_new_tokens",
            100 * result["truncation_ratio"],
            max_new_tokens,
        )
    if samples > 0:
        sampled = engine.generate(
            prompt_ids,
            SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, n=samples),
            seed + 1,
        )
        counts = []
        for row, group in zip(rows, sampled, strict=True):
            counts.append(
                sum(
                    task.verify(row, tokenizer.decode(s.response_ids, skip_special_tokens=True)).correct
                    for s in group
                )
            )
        result[f"avg@{samples}"] = _mean([c / samples for c in counts])
        ks = sorted({1, samples} | {2**i for i in range(1, 8) if 2**i < samples})
        for k in ks:
            result[f"pass@{k}"] = _mean([pass_at_k(samples, c, k) for c in counts])
    result["samples"] = [
        {
            "prompt": tokenizer.decode(p, skip_special_tokens=False),
            "response": t,
            "correct": c,
            "finish_reason": s[0].finish_reason,
        }
        for p, t, c, s in list(zip(prompt_ids, texts, correct, greedy, strict=True))[:keep_samples]
    ]
    return result


def evaluate(
    engine: RolloutEngine,
    tokenizer,
    task: Task,
    rows: list[Row],
    student_prompt_ids,
    *,
    max_new_tokens: int,
    samples: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    keep_samples: int = 5,
    base: dict | None = None,
) -> dict:
    """The evaluation sets of one checkpoint: `main` (the student's own prompts) and, when rows carry a
    system-prompt rule, `with_system` / `without_system` plus the internalization score vs `base`.

    `student_prompt_ids(row, system_prompt: bool) -> list[int]` builds the prompts.
    """
    opts = dict(
        max_new_tokens=max_new_tokens,
        samples=samples,
        temperature=temperature,
        seed=seed,
        keep_samples=keep_samples,
    )
    has_rule = any(task.rules.get(r.get("system_prompt") or "") for r in rows)
    if not has_rule:
        return {
            "main": evaluate_prompts(
                engine, tokenizer, task, rows, [student_prompt_ids(r, True) for r in rows], **opts
            )
        }
    with_sys = evaluate_prompts(
        engine, tokenizer, task, rows, [student_prompt_ids(r, True) for r in rows], **opts
    )
    without = evaluate_prompts(
        engine, tokenizer, task, rows, [student_prompt_ids(r, False) for r in rows], **opts
    )
    out = {"with_system": with_sys, "without_system": without}
    ref = base or out
    out["internalization"] = {
        "follow_with": with_sys.get("rule_following", float("nan")),
        "follow_without": without.get("rule_following", float("nan")),
        "score": internalization_score(
            without.get("rule_following", float("nan")),
            ref["with_system"].get("rule_following", float("nan")),
            ref["without_system"].get("rule_following", float("nan")),
        ),
    }
    return out


def headline(result: dict) -> dict[str, float]:
    """Flat scalar metrics of an `evaluate` result, for metrics.jsonl and the tracker."""
    flat = {}
    for set_name, values in result.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"eval/{set_name}/{key}"] = value
    return flat


def evaluate_checkpoint(cfg, checkpoint: str, engine_kind: str) -> dict:
    """`opd eval`: load a Hugging Face checkpoint and evaluate it on the configured task's eval set."""
    path = resolve_path(checkpoint, cfg)
    check_model_dir(path)
    device = pick_device(cfg.trainer.device)
    task, _, rows = load_task_and_data(cfg.task)
    tokenizer = load_tokenizer(path)
    dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    engine = rollout_engine(cfg, path, device, dtype=dtype, kind=engine_kind)
    try:
        e = cfg.eval
        return evaluate(
            engine,
            tokenizer,
            task,
            rows[: e.size],
            student_prompt_ids(tokenizer, task, cfg.model.enable_thinking),
            max_new_tokens=e.max_new_tokens,
            samples=e.samples,
            temperature=e.temperature,
            seed=cfg.seed,
            keep_samples=e.keep_samples,
        )
    finally:
        engine.close()


# --------------------------------------------------------------------- a model in memory (the testbed)
# Greedy evaluation of a model on task rows through a rollout engine (the HF engine by default); the
# testbed's build steps use it for their dev checks and the manifest's figures:
#       greedy_accuracy(model, tokenizer, task, rows, max_new_tokens=96)
#       # -> {"n", "accuracy", "well_formed", "answer_rate", "follows_rule": {"concise": ...}, "mean_length",
#       #     "truncation_ratio", "hedging_rate"}
#
#   `mean_length` counts generated tokens (EOS included); `answer_rate` is the fraction of responses from
#   which an answer could be extracted (a malformed base model scores ~0); `hedging_rate` the fraction of
#   responses containing one of the task's hedging/revision tokens. Rule-following is measured per rule
#   over the rows that carry that rule, whether or not the system line was shown (`system_prompt=False`
#   measures internalization).


def greedy_responses(
    model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, engine: RolloutEngine | None = None
) -> list:
    """One greedy Sample per prompt."""
    if engine is None:
        engine = HFEngine(
            None, model=model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
    return [
        g[0] for g in engine.generate(prompts, SamplingConfig(max_new_tokens=max_new_tokens, greedy=True), 0)
    ]


def greedy_accuracy(
    model,
    tokenizer,
    task: Task,
    rows: list[Row],
    *,
    max_new_tokens: int,
    engine: RolloutEngine | None = None,
    system_prompt: bool = True,
    messages_fn=None,
) -> dict:
    """Greedy exact-match accuracy and format statistics. `messages_fn(row)` overrides the prompt
    (e.g. a teacher prompt carrying privileged information); default `task.messages(row, system_prompt)`."""
    if not rows:
        raise ValueError("greedy_accuracy: no rows")
    make = messages_fn or (lambda r: task.messages(r, system_prompt=system_prompt))
    prompts = [sft_prompt_ids(tokenizer, make(r)) for r in rows]
    with torch.no_grad():
        samples = greedy_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, engine=engine)
    texts = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    verdicts = [task.verify(r, t) for r, t in zip(rows, texts, strict=True)]
    n = len(rows)
    rules: dict[str, list[bool]] = {}
    for r, v in zip(rows, verdicts, strict=True):
        if v.follows_rule is not None:
            rules.setdefault(str(r.get("system_prompt")), []).append(v.follows_rule)
    hedges = list(getattr(task, "hedging_tokens", []) or [])
    return {
        "n": n,
        "accuracy": sum(v.correct for v in verdicts) / n,
        "well_formed": sum(v.well_formed for v in verdicts) / n,
        "answer_rate": sum(v.answer is not None for v in verdicts) / n,
        "follows_rule": {k: sum(f) / len(f) for k, f in sorted(rules.items())},
        "mean_length": sum(s.num_tokens for s in samples) / n,
        "truncation_ratio": sum(s.finish_reason == "length" for s in samples) / n,
        "hedging_rate": sum(any(h in t for h in hedges) for t in texts) / n if hedges else 0.0,
    }


def format_table(result: dict) -> str:
    """A plain-text table of an `evaluate` result (one row per evaluation set)."""
    cols = [
        "accuracy",
        "well_formed",
        "rule_following",
        "mean_length",
        "truncation_ratio",
        "accuracy_finished",
        "accuracy_truncated",
    ]
    extra = sorted(
        {k for v in result.values() if isinstance(v, dict) for k in v if k.startswith(("avg@", "pass@"))}
    )
    header = ["set", *cols, *extra]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for name, values in result.items():
        if not isinstance(values, dict) or "accuracy" not in values:
            continue
        cells = [name] + [
            f"{values[c]:.3f}" if isinstance(values.get(c), float) else str(values.get(c, "-"))
            for c in cols + extra
        ]
        lines.append(" | ".join(cells))
    if "internalization" in result:
        i = result["internalization"]
        lines.append(
            f"internalization: follow_with={i['follow_with']:.3f} follow_without={i['follow_without']:.3f}"
            f" score={i['score']:.3f}"
        )
    return "\n".join(lines)
