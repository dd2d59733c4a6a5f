"""Greedy evaluation of a model on task rows through a rollout engine (the HF engine by default).

    greedy_accuracy(model, tokenizer, task, rows, max_new_tokens=96)
    # -> {"n", "accuracy", "well_formed", "answer_rate", "follows_rule": {"concise": ...}, "mean_length",
    #     "truncation_ratio", "hedging_rate"}

`mean_length` counts generated tokens (EOS included); `answer_rate` is the fraction of responses from
which an answer could be extracted (a malformed base model scores ~0); `hedging_rate` the fraction of
responses containing one of the task's hedging/revision tokens. Rule-following is measured per rule
over the rows that carry that rule, whether or not the system line was shown (`system_prompt=False`
measures internalization).
"""

from __future__ import annotations

import torch

from opd_cli.rollout.base import RolloutEngine, SamplingConfig
from opd_cli.rollout.hf_engine import HFEngine
from opd_cli.stages.sft import prompt_ids
from opd_cli.tasks.base import Row, Task


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
    prompts = [prompt_ids(tokenizer, make(r)) for r in rows]
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
