"""The prefix probe (the paper's mechanism-1 experiment): does the teacher still solve the problem when
it must continue from the student's prefix instead of its own?

    opd probe teacher=large -n 200                         # testbed: teacher_large on student_sft prefixes
    opd probe teacher=rlvr -n 200                          # the RLVR-adapted teacher instead

For each problem the student samples a response; it is cut at a uniformly random token; the teacher
continues greedily from `teacher prompt + student prefix`. Compared with the teacher's own greedy
answers on the same problems: accuracy, format correctness, right->wrong and wrong->right counts, and
the hedging (revision) rate of the continuations, the signature of a teacher that disagrees with the
prefix it was handed. The paper's figure: Qwen3-14B on Qwen3-1.7B prefixes, GPQA-Diamond 62.1% -> 46.0%.
"""

from __future__ import annotations

import random

from opd_cli.diagnostics import hedging_count
from opd_cli.errors import OpdError
from opd_cli.learner import load_model, load_tokenizer, pick_device
from opd_cli.rollout import SamplingConfig, derive_seed, make_engine
from opd_cli.stages.common import load_task_and_data, resolve_path, teacher_enable_thinking
from opd_cli.teachers import PromptBuilder, chat_prompt_ids, check_same_vocabulary, student_prompt_ids


def run_probe(cfg, n: int, seed: int) -> dict:
    if n < 1:
        raise OpdError(
            f"-n {n}: the probe needs at least one problem; pass -n 200 (the default) or another n >= 1"
        )
    device = pick_device(cfg.trainer.device)
    task, _, rows = load_task_and_data(cfg.task)
    rows = rows[:n]
    student_path = resolve_path(cfg.model.path, cfg)
    teacher_path = resolve_path(cfg.teacher.path, cfg)
    s_tok, t_tok = load_tokenizer(student_path), load_tokenizer(teacher_path)
    check_same_vocabulary(s_tok, t_tok)
    student = make_engine(
        "hf", student_path, device=device.type, model=load_model(student_path, device, trainable=False)
    )
    teacher = make_engine(
        "hf", teacher_path, device=device.type, model=load_model(teacher_path, device, trainable=False)
    )
    student_prompt = student_prompt_ids(s_tok, task, cfg.model.enable_thinking)
    prompts_s = [student_prompt(r) for r in rows]
    # the teacher answers the same question, in its own chat template
    t_think = teacher_enable_thinking(cfg)
    prompts_t = [chat_prompt_ids(t_tok, PromptBuilder(task).messages(r), t_think) for r in rows]
    max_new = cfg.eval.max_new_tokens
    greedy = SamplingConfig(max_new_tokens=max_new, greedy=True)

    own = [g[0] for g in teacher.generate(prompts_t, greedy, seed)]
    student_samples = [
        g[0]
        for g in student.generate(
            prompts_s, SamplingConfig(temperature=cfg.rollout.temperature, max_new_tokens=max_new), seed
        )
    ]
    rng = random.Random(derive_seed(seed, 99))
    prefixes = []
    for s in student_samples:
        body = [t for t in s.response_ids if t != s_tok.eos_token_id]
        cut = rng.randint(1, len(body) - 1) if len(body) > 1 else len(body)
        prefixes.append(body[:cut])
    continued = [
        g[0]
        for g in teacher.generate(
            [p + q for p, q in zip(prompts_t, prefixes, strict=True)],
            SamplingConfig(max_new_tokens=max_new, greedy=True),
            seed,
        )
    ]

    def grade(row, ids):
        text = t_tok.decode(ids, skip_special_tokens=True)
        return task.verify(row, text), text

    counts = {"right_to_wrong": 0, "wrong_to_right": 0}
    # A prefix cut from a wrong student response may already hold the error: report the teacher on
    # prefixes of correct student responses separately (there only a disagreement can make it fail).
    on_track = on_track_correct = 0
    own_correct = own_format = pre_correct = pre_format = 0
    hedges_own = hedges_prefix = 0
    examples = []
    for row, o, p, c, s in zip(rows, own, prefixes, continued, student_samples, strict=True):
        v_own, t_own = grade(row, o.response_ids)
        v_pre, t_pre = grade(row, p + c.response_ids)
        if grade(row, s.response_ids)[0].correct:
            on_track += 1
            on_track_correct += v_pre.correct
        cont_text = t_tok.decode(c.response_ids, skip_special_tokens=True)
        own_correct += v_own.correct
        own_format += v_own.well_formed
        pre_correct += v_pre.correct
        pre_format += v_pre.well_formed
        hedges_own += hedging_count(t_own, task.hedging_tokens) > 0
        hedges_prefix += hedging_count(cont_text, task.hedging_tokens) > 0
        counts["right_to_wrong"] += v_own.correct and not v_pre.correct
        counts["wrong_to_right"] += v_pre.correct and not v_own.correct
        if len(examples) < 8:
            examples.append(
                {
                    "problem": row["problem"],
                    "teacher_own": t_own,
                    "student_prefix": t_tok.decode(p, skip_special_tokens=True),
                    "teacher_continuation": cont_text,
                    "own_correct": v_own.correct,
                    "from_prefix_correct": v_pre.correct,
                }
            )
    student.close()
    teacher.close()
    k = len(rows)
    return {
        "n": k,
        "student": cfg.model.path,
        "teacher": cfg.teacher.path,
        "teacher_own_accuracy": own_correct / k,
        "teacher_own_format": own_format / k,
        "from_student_prefix_accuracy": pre_correct / k,
        "from_student_prefix_format": pre_format / k,
        "teacher_own_hedging_rate": hedges_own / k,
        "continuation_hedging_rate": hedges_prefix / k,
        "correct_student_prefixes": on_track,
        "from_correct_student_prefix_accuracy": on_track_correct / on_track if on_track else float("nan"),
        **counts,
        "examples": examples,
    }


def format_probe(result: dict) -> str:
    k = result["n"]
    return "\n".join(
        [
            f"prefix probe: teacher {result['teacher']} continuing {result['student']} prefixes, {k} problems",
            "| | accuracy | format | hedging rate |",
            "|---|---|---|---|",
            f"| teacher, own generations | {result['teacher_own_accuracy']:.3f} | {result['teacher_own_format']:.3f} "
            f"| {result['teacher_own_hedging_rate']:.3f} |",
            f"| teacher from student prefixes | {result['from_student_prefix_accuracy']:.3f} | "
            f"{result['from_student_prefix_format']:.3f} | {result['continuation_hedging_rate']:.3f} |",
            f"teacher from prefixes of the {result['correct_student_prefixes']} correct student responses: accuracy "
            f"{result['from_correct_student_prefix_accuracy']:.3f}",
            f"right->wrong: {result['right_to_wrong']}/{k}   wrong->right: {result['wrong_to_right']}/{k}",
        ]
    )
