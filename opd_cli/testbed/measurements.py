"""The figures the manifest records for each testbed model: greedy accuracy and format on the eval set,
top-k overlap with the student, the revision-token probability on student prefixes (mechanism 1), the
teacher continuing student prefixes, and the OPSD models' behaviour with and without privileged
information (`evaluate_model`)."""

from __future__ import annotations

from pathlib import Path

import torch

from opd_cli.batching import pack, response_hidden_and_logits
from opd_cli.rollout.base import SamplingConfig
from opd_cli.rollout.hf_engine import HFEngine
from opd_cli.stages.evaluate import greedy_accuracy, greedy_responses
from opd_cli.stages.sft import prompt_ids
from opd_cli.tasks import make_task
from opd_cli.testbed.builders import (
    char_tokenizer,
    deterministic,
    direct_answer_mass,
    load,
    make_rows,
    opsd_messages,
    recipe_tasks,
)
from opd_cli.testbed.recipe import stage_seed


# ------------------------------------------------------------------------------------------- measuring
@torch.no_grad()
def topk_overlap_stats(
    student,
    other,
    student_prompts,
    other_prompts,
    responses,
    pad_id: int,
    k: int,
    revision_id: int | None = None,
    after_ids: tuple[int, ...] = (),
) -> dict:
    """Mean |top-k(student) ∩ top-k(other)| / k over the response tokens, and `other`'s mean probability of
    `revision_id` at positions right after a token in `after_ids` (e.g. after every `;` step separator)."""
    bs, bo = pack(student_prompts, responses, pad_id), pack(other_prompts, responses, pad_id)
    _, ls = response_hidden_and_logits(student, bs)
    _, lo = response_hidden_and_logits(other, bo)
    ts, to = ls.topk(k, -1).indices, lo.topk(k, -1).indices
    inter = (ts[..., :, None] == to[..., None, :]).any(-1).sum(-1).float() / k
    mask = bs.response_mask
    out = {"topk_overlap": float(inter[mask].mean())}
    if revision_id is not None:
        prev = torch.zeros_like(bs.response_ids)
        prev[:, 1:] = bs.response_ids[:, :-1]
        after = mask & torch.isin(prev, torch.tensor(after_ids)) & (torch.arange(prev.shape[1]) > 0)
        q = lo.softmax(-1)[..., revision_id]
        out["revision_mass_after_step"] = float(q[after].mean()) if after.any() else 0.0
    return out


def _student_rollouts(student, tok, task, rows, recipe, seed):
    ev = recipe["eval"]
    rows = rows[: ev["overlap_prompts"]]
    prompts = [prompt_ids(tok, task.messages(r)) for r in rows]
    engine = HFEngine(None, model=student, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    groups = engine.generate(
        prompts,
        SamplingConfig(temperature=1.0, max_new_tokens=ev["overlap_max_new_tokens"]),
        stage_seed(seed, "eval/overlap"),
    )
    return rows, prompts, [g[0].response_ids for g in groups]


def _prefix_continuation(model, student, tok, task, rows, recipe) -> dict:
    """The paper's mechanism-1 probe: the model continues student_sft's greedy responses cut after their
    first scratchpad step. Accuracy, well-formedness and revision rate of prefix + continuation."""
    rows = rows[: recipe["eval"]["prefix_prompts"]]
    prompts = [prompt_ids(tok, task.messages(r)) for r in rows]
    own = greedy_responses(student, tok, prompts, max_new_tokens=recipe["eval"]["max_new_tokens"])
    semi = tok.convert_tokens_to_ids(";")
    cut = []
    for s in own:
        ids = [t for t in s.response_ids if t != tok.eos_token_id]
        cut.append(ids[: ids.index(semi) + 1] if semi in ids else ids)
    conts = greedy_responses(
        model,
        tok,
        [p + c for p, c in zip(prompts, cut, strict=True)],
        max_new_tokens=recipe["eval"]["max_new_tokens"],
    )
    verdicts, revised = [], 0
    for r, c, s in zip(rows, cut, conts, strict=True):
        text = tok.decode(c + s.response_ids, skip_special_tokens=True)
        verdicts.append(task.verify(r, text))
        revised += any(h in text for h in task.hedging_tokens)
    n = len(rows)
    return {
        "accuracy": sum(v.correct for v in verdicts) / n,
        "well_formed": sum(v.well_formed for v in verdicts) / n,
        "hedging_rate": revised / n,
    }


def rounded(d):
    if isinstance(d, float):
        return round(d, 4)
    if isinstance(d, dict):
        return {k: rounded(v) for k, v in d.items()}
    return d


def evaluate_model(name: str, out_dir: str, seed: int, recipe: dict) -> dict:
    """Every figure the manifest records for one model (deterministic: seeded, single-threaded)."""
    threads = torch.get_num_threads()
    deterministic(stage_seed(seed, "eval"))
    try:
        out = Path(out_dir)
        tok = char_tokenizer()
        task, concise = recipe_tasks(recipe)
        rows = make_rows(recipe, seed)
        plain_rows, concise_rows = rows["arith"]["eval"], rows["arith_concise"]["eval"]
        mnt = recipe["eval"]["max_new_tokens"]
        model = load(out / name)
        plain = greedy_accuracy(model, tok, task, plain_rows, max_new_tokens=mnt)
        with_sys = greedy_accuracy(model, tok, concise, concise_rows, max_new_tokens=mnt, system_prompt=True)
        without_sys = greedy_accuracy(
            model, tok, concise, concise_rows, max_new_tokens=mnt, system_prompt=False
        )
        figures = {
            k: plain[k]
            for k in (
                "accuracy",
                "well_formed",
                "answer_rate",
                "mean_length",
                "truncation_ratio",
                "hedging_rate",
            )
        }
        figures["concise_with_system"] = with_sys["follows_rule"].get("concise", 0.0)
        figures["concise_without_system"] = without_sys["follows_rule"].get("concise", 0.0)
        figures["accuracy_with_system"] = with_sys["accuracy"]
        student = load(out / "student_sft")
        srows, sprompts, responses = _student_rollouts(student, tok, task, plain_rows, recipe, seed)
        figures.update(
            topk_overlap_stats(
                student,
                model,
                sprompts,
                sprompts,
                responses,
                tok.pad_token_id,
                recipe["eval"]["topk"],
                tok.convert_tokens_to_ids("W"),
                (tok.convert_tokens_to_ids(";"),),
            )
        )
        if name in ("teacher_large", "teacher_rlvr", "student_sft"):
            figures["prefix_continuation"] = _prefix_continuation(
                model, student, tok, task, plain_rows, recipe
            )
        if name in ("opsd_base", "opsd_rlvr"):
            pi = {}
            for kind in ("hint", "solution"):
                r = greedy_accuracy(
                    model,
                    tok,
                    task,
                    plain_rows,
                    max_new_tokens=mnt,
                    messages_fn=lambda row, k=kind: opsd_messages(task, row, k),
                )
                pi[kind] = {k: r[k] for k in ("accuracy", "mean_length")}
            hint_prompts = [prompt_ids(tok, opsd_messages(task, r, "hint")) for r in plain_rows]
            direct = greedy_responses(model, tok, hint_prompts, max_new_tokens=mnt)
            pi["hint"]["direct_answer_rate"] = sum(
                tok.decode(s.response_ids, skip_special_tokens=True).startswith("A:") for s in direct
            ) / len(direct)
            # the probability of answering directly (first token "A"): what OPSD's teacher passes on
            pi["hint"]["direct_answer_mass"] = direct_answer_mass(model, tok, task, plain_rows)
            pi["system"] = {
                "concise": figures["concise_with_system"],
                "accuracy": with_sys["accuracy"],
                "mean_length": with_sys["mean_length"],
            }
            # the stated preference P:lsd: accuracy on rows whose answer is presented lsd-first
            lsd_task = make_task("arith", digits=task.digits, rule="lsd")
            lsd_rows = lsd_task.generate(len(plain_rows), stage_seed(seed, "data/eval"))
            r = greedy_accuracy(model, tok, lsd_task, lsd_rows, max_new_tokens=mnt, system_prompt=True)
            pi["preference_lsd"] = {"accuracy": r["accuracy"], "follows": r["follows_rule"].get("lsd", 0.0)}
            restate_task = make_task("arith", digits=task.digits, rule="restate")
            restate_rows = restate_task.generate(len(plain_rows), stage_seed(seed, "data/eval"))
            r = greedy_accuracy(
                model, tok, restate_task, restate_rows, max_new_tokens=mnt, system_prompt=True
            )
            pi["preference_restate"] = {
                "accuracy": r["accuracy"],
                "follows": r["follows_rule"].get("restate", 0.0),
            }
            figures["with_pi"] = pi
        return rounded(figures)
    finally:
        torch.set_num_threads(threads)
