"""The testbed's build steps, one function per model (student_base, student_sft, teacher_large,
teacher_rlvr, opsd_base), trained with this tool's own loops (`stages.sft.sft_train`,
`stages.rlvr.grpo_train`) on data generated from the seed; `run_step` builds one and saves it with its
build_info.json. The recipe they follow: opd_cli/testbed/recipe.py; the orchestration: build.py."""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import torch

from opd_cli.batching import pack, response_hidden_and_logits
from opd_cli.io import atomic_write_json
from opd_cli.rollout.hf_engine import HFEngine
from opd_cli.stages.evaluate import greedy_accuracy
from opd_cli.stages.rlvr import GRPOOptions, grpo_train
from opd_cli.stages.sft import SFTOptions, prompt_ids, sft_train
from opd_cli.tasks import make_task
from opd_cli.tasks.arith import (
    concise_steps,
    domain_pretraining_strings,
    present,
    random_pretraining_strings,
    restatement,
    student_steps,
    teacher_steps,
    teacher_style_solution,
)
from opd_cli.testbed.models import tiny_qwen2_config
from opd_cli.testbed.recipe import HINT_TEMPLATE, SOLUTION_TEMPLATE, stage_hash, stage_seed
from opd_cli.testbed.tokenizer import build_char_tokenizer


def deterministic(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def char_tokenizer():
    return build_char_tokenizer()


def recipe_tasks(recipe: dict):
    digits = recipe["task"]["digits"]
    return make_task("arith", digits=digits), make_task("arith", digits=digits, rule="concise")


def make_rows(recipe: dict, seed: int) -> dict[str, dict[str, list[dict]]]:
    """{"arith": {"train", "dev", "eval"}, "arith_concise": {...}}: same problems in both variants; train
    problems that also occur in dev or eval are dropped."""
    out = {}
    for task in recipe_tasks(recipe):
        sizes = recipe["data"]
        ev = task.generate(sizes["eval"], stage_seed(seed, "data/eval"))
        dev = task.generate(sizes["dev"], stage_seed(seed, "data/dev"))
        held = {r["problem"] for r in ev + dev}
        train = [
            r
            for r in task.generate(sizes["train"], stage_seed(seed, "data/train"))
            if r["problem"] not in held
        ]
        out["arith_concise" if task.rule else "arith"] = {"train": train, "dev": dev, "eval": ev}
    return out


def new_model(recipe: dict, size: str, vocab_size: int, seed: int):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(tiny_qwen2_config(vocab_size, **recipe[size]))


def load(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model


def save(model, tokenizer, path: Path, info: dict) -> None:
    """Write the model (safetensors) + tokenizer + build_info.json into `path` atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    atomic_write_json(tmp / "build_info.json", info)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def read_build_info(path: Path) -> dict | None:
    try:
        return json.loads((path / "build_info.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


class _Reporter:
    """Progress events from a step (possibly in a worker process) to the main process."""

    def __init__(self, q, name: str):
        self.q, self.name = q, name

    def __call__(self, completed: int, total: int, info: str = "") -> None:
        if self.q is not None:
            self.q.put((self.name, completed, total, info))


def _dev_accuracy(model, tokenizer, task, rows, recipe, messages_fn=None) -> float:
    return greedy_accuracy(
        model,
        tokenizer,
        task,
        rows,
        max_new_tokens=recipe["eval"]["dev_max_new_tokens"],
        messages_fn=messages_fn,
    )["accuracy"]


def direct_answer_mass(model, tokenizer, task, rows) -> float:
    """The H:<answer> teacher's mean probability of answering directly (first response token `A`) on
    `rows`: what OPSD's answer-PI teacher passes on to the student at its first token."""
    prompts = [prompt_ids(tokenizer, opsd_messages(task, r, "hint")) for r in rows]
    token = tokenizer.convert_tokens_to_ids("A")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, logits = response_hidden_and_logits(model, pack(prompts, [[token]] * len(prompts), 0))
    finally:
        model.train(was_training)
    return float(logits[:, 0].float().softmax(-1)[:, token].mean())


def _sft_until(
    model,
    tokenizer,
    examples,
    task,
    dev,
    cfg,
    recipe,
    seed,
    report,
    messages_fn=None,
    extra_check=None,
    extra_first=False,
) -> dict:
    """sft_train, stopped at the first dev evaluation in [cfg['stop_at'], cfg.get('stop_below', 1)] (and
    `extra_check()` true, when given). Dev evaluations start once the loss is below cfg['eval_below_loss']
    (before that the greedy accuracy is 0 and evaluating is wasted time). Dev accuracy jumps between
    evaluations while the format is being learned (0.26 -> 0.905 in 10 steps, measured), so a model meant
    to stay in a band needs its upper end too.

    extra_first: run `extra_check()` first and the plain dev accuracy only when it passes (or at the last
    step), for a model whose plain accuracy is in the band long before its extra behaviours are learned
    (opsd_base: 72 of 73 plain evaluations were wasted, measured). Both figures are pure functions of the
    weights at that step, so the step it stops at, and the weights, are the same either way; the
    history then holds None where the plain accuracy was not computed."""
    low, high = cfg["stop_at"], cfg.get("stop_below", 1.0)
    history = []

    def callback(step, metrics):
        if metrics["loss"] > cfg["eval_below_loss"] and step < cfg["steps"]:
            report(step, cfg["steps"], f"loss {metrics['loss']:.3f}")
            return False
        if extra_first and extra_check is not None:
            extra = extra_check()
            run_plain = extra[0] or step >= cfg["steps"]
            acc = _dev_accuracy(model, tokenizer, task, dev, recipe, messages_fn) if run_plain else None
        else:
            acc = _dev_accuracy(model, tokenizer, task, dev, recipe, messages_fn)
            extra = extra_check() if extra_check is not None and low <= acc <= high else None
        history.append((step, acc) if extra is None else (step, acc, extra[1]))
        plain = "-" if acc is None else f"{acc:.2f}"
        report(
            step,
            cfg["steps"],
            f"loss {metrics['loss']:.3f} dev acc {plain}" + ("" if extra is None else f" {extra[1]:.2f}"),
        )
        return acc is not None and low <= acc <= high and (extra is None or extra[0])

    metrics = sft_train(
        model,
        tokenizer,
        examples,
        SFTOptions(
            steps=cfg["steps"],
            batch_size=cfg["batch_size"],
            lr=cfg["lr"],
            warmup_ratio=cfg["warmup_ratio"],
            schedule=cfg["schedule"],
            seed=seed,
        ),
        progress=False,
        callback=callback,
        eval_every=cfg["eval_every"],
    )
    return {
        "steps": metrics["step"],
        "loss": metrics["loss"],
        "dev_accuracy": next((h[1] for h in reversed(history) if h[1] is not None), None),
        "dev_history": history,
    }


# ------------------------------------------------------------------------------------------------ steps
def build_student_base(ctx: dict) -> dict:
    recipe, cfg, tok = ctx["recipe"], ctx["recipe"]["student_base"], ctx["tokenizer"]
    model = new_model(recipe, "student", len(tok), stage_seed(ctx["seed"], "student_base/init"))
    rng = random.Random(stage_seed(ctx["seed"], "student_base/data"))
    strings = random_pretraining_strings(2 * cfg["strings"], rng, cfg["max_len"])
    # raw task-domain text (sums and column facts, never the response format): the base model's latent
    # skill, like a Base LM that has read arithmetic but not this chat format
    domain = domain_pretraining_strings(cfg["strings"], rng, cfg["domain_max_len"])
    examples = []
    for i in range(cfg["strings"]):
        user = strings[cfg["strings"] + i]
        messages = [{"role": "user", "content": user}] if rng.random() < cfg["with_user_turn"] else []
        text = domain[i] if rng.random() < cfg["domain"] else strings[i]
        examples.append((messages, text))
    report = ctx["report"]
    metrics = sft_train(
        model,
        tok,
        examples,
        SFTOptions(
            steps=cfg["steps"],
            batch_size=cfg["batch_size"],
            lr=cfg["lr"],
            warmup_ratio=cfg["warmup_ratio"],
            schedule="cosine",
            seed=stage_seed(ctx["seed"], "student_base/batches"),
        ),
        progress=False,
        log_fn=lambda s, m: report(s, cfg["steps"], f"loss {m['loss']:.3f}"),
        log_every=10,
    )
    return model, {"steps": metrics["step"], "loss": metrics["loss"]}


def build_student_sft(ctx: dict):
    recipe, cfg, tok, seed = ctx["recipe"], ctx["recipe"]["student_sft"], ctx["tokenizer"], ctx["seed"]
    task, rows = ctx["task"], ctx["rows"]["arith"]
    if cfg["init"] == "student_base":
        model = load(ctx["out_dir"] / "student_base")
    else:
        model = new_model(recipe, "student", len(tok), stage_seed(seed, "student_sft/init"))
    # verified traces: the reference scratchpads, kept only if the verifier accepts them
    examples = [
        (task.messages(r), r["solution"]) for r in rows["train"] if task.verify(r, r["solution"]).correct
    ]
    info = _sft_until(
        model,
        tok,
        examples,
        task,
        rows["dev"],
        cfg,
        recipe,
        stage_seed(seed, "student_sft/batches"),
        ctx["report"],
    )
    return model, info


def build_teacher_large(ctx: dict):
    recipe, cfg, tok, seed = ctx["recipe"], ctx["recipe"]["teacher_large"], ctx["tokenizer"], ctx["seed"]
    task, rows = ctx["task"], ctx["rows"]["arith"]
    model = new_model(recipe, "teacher", len(tok), stage_seed(seed, "teacher_large/init"))
    rng = random.Random(stage_seed(seed, "teacher_large/style"))
    examples = []
    for r in rows["train"]:
        trace = teacher_style_solution(r, rng, cfg["revise_prob"])
        if task.verify(r, trace).correct:
            examples.append((task.messages(r), trace))
    info = _sft_until(
        model,
        tok,
        examples,
        task,
        rows["dev"],
        cfg,
        recipe,
        stage_seed(seed, "teacher_large/batches"),
        ctx["report"],
    )
    info["revision_traces"] = sum("W;" in e[1] for e in examples) / len(examples)
    return model, info


def build_teacher_rlvr(ctx: dict, name: str = "teacher_rlvr", parent: str = "student_sft"):
    """GRPO (verifier reward, plain prompts) from `parent`: teacher_rlvr from student_sft (the OPD cells'
    close teacher), opsd_rlvr from opsd_base (an RLVR-adapted PI teacher: it keeps opsd_base's reading of
    the hint, solution and preference lines and is stronger without them)."""
    recipe, cfg, tok, seed = ctx["recipe"], ctx["recipe"][name], ctx["tokenizer"], ctx["seed"]
    task, rows = ctx["task"], ctx["rows"]["arith"]
    model = load(ctx["out_dir"] / parent)
    engine = HFEngine(None, model=model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    history = []

    def callback(step, metrics):
        acc = _dev_accuracy(model, tok, task, rows["dev"], recipe)
        history.append((step, acc))
        ctx["report"](step, cfg["steps"], f"reward {metrics['reward']:.2f} dev acc {acc:.2f}")
        return acc >= cfg["stop_at"]

    metrics = grpo_train(
        model,
        tok,
        task,
        rows["train"],
        GRPOOptions(
            steps=cfg["steps"],
            prompts_per_step=cfg["prompts_per_step"],
            samples_per_prompt=cfg["samples_per_prompt"],
            lr=cfg["lr"],
            clip_eps=cfg["clip_eps"],
            temperature=cfg["temperature"],
            max_new_tokens=cfg["max_new_tokens"],
            seed=stage_seed(seed, f"{name}/grpo"),
        ),
        engine=engine,
        progress=False,
        callback=callback,
        eval_every=cfg["eval_every"],
    )
    return model, {
        "steps": metrics["step"],
        "reward": metrics["reward"],
        "dev_accuracy": history[-1][1] if history else None,
        "dev_history": history,
    }


def opsd_messages(task, row: dict, kind: str) -> list[dict]:
    """The prompt an OPSD teacher sees for PI `kind` (plain | hint | solution | system | preference; the
    preference prompt shows the row's `system_prompt`, P:lsd or P:msd, as the system line)."""
    if kind == "plain":
        return task.messages(row, system_prompt=False)
    if kind == "hint":
        return [{"role": "user", "content": HINT_TEMPLATE.format(**row)}]
    if kind == "solution":
        return [{"role": "user", "content": SOLUTION_TEMPLATE.format(**row)}]
    if kind == "system":
        return task.messages({**row, "system_prompt": "concise"}, system_prompt=True)
    if kind == "preference":
        return task.messages(row, system_prompt=True)
    raise ValueError(f"unknown PI kind {kind!r}")


def switch_trace(row: dict, rng: random.Random, later: float) -> tuple[str, str]:
    """(prefill, continuation): k full scratchpad steps, then the remaining steps concise:
    `7` + `+5+0=12;=13;=06;A:632` (k=1). k=1, else one more with probability `later` each time (k < digits).
    The first character is a prefill (no loss): the teacher learns to continue a full-style start (the
    student's) and never to make one.

    Why: the OPSD teacher scores the *student's* full-style prefixes. A real instruction-following model
    told to be concise continues a verbose prefix sensibly (and concisely); a model that saw only pure
    concise traces under S:concise produces garbage on a full-style prefix, so OPSD with the shared rule
    would teach garbage instead of the rule. With these traces the S:concise teacher continues any
    full-style prefix correctly and prefers a concise next step at every step boundary."""
    a, b = int(row["a"]), int(row["b"])
    full, short = student_steps(a, b), concise_steps(a, b)
    k = 1
    while k < len(full) - 1 and rng.random() < later:
        k += 1
    trace = "".join(f"{s};" for s in full[:k] + short[k:]) + f"A:{row['answer']}"
    return trace[:1], trace[1:]


def plain_response(row: dict, u: float, styles: dict) -> str:
    """The response to a plain prompt, for a uniform draw `u`: concise with probability
    styles["concise"], restated with styles["restate"], the result presented lsd-first (the full
    scratchpad, then `A:` and the reversed digits) with styles.get("lsd", 0), else the student's full
    scratchpad. The shares put each PI behaviour in the student's support (see recipe.py)."""
    edges = [styles["concise"], styles["restate"], styles.get("lsd", 0.0)]
    if u < edges[0]:
        return row["solution_concise"]
    if u < edges[0] + edges[1]:
        return restatement(row) + row["solution_student"]
    if u < edges[0] + edges[1] + edges[2]:
        steps = "".join(f"{s};" for s in student_steps(row["a"], row["b"]))
        return steps + "A:" + present(row["a"] + row["b"], "lsd")
    return row["solution_student"]


def build_opsd_base(ctx: dict):
    recipe, cfg, tok, seed = ctx["recipe"], ctx["recipe"]["opsd_base"], ctx["tokenizer"], ctx["seed"]
    task, rows = ctx["task"], ctx["rows"]["arith"]
    model = new_model(recipe, "student", len(tok), stage_seed(seed, "opsd_base/init"))
    rng = random.Random(stage_seed(seed, "opsd_base/mix"))
    kinds, weights = zip(*cfg["mix"].items(), strict=True)
    examples, counts = [], dict.fromkeys(kinds, 0)
    for r in rows["train"]:
        kind = rng.choices(kinds, weights)[0]
        prefill = ""
        if kind == "system" and rng.random() < cfg["system_switch"]:
            prefill, response = switch_trace(r, rng, cfg["switch_later"])
            if not cfg["switch_prefill"]:
                prefill, response = "", prefill + response
        elif kind == "system":
            response = r["solution_concise"]
        elif kind == "hint" and rng.random() < cfg["hint_direct"]:
            response = f"A:{r['answer']}"
        elif kind == "solution":
            # a reference written in any valid style; the teacher writes out the one it was given
            a, b = r["a"], r["b"]
            steps = rng.choice((student_steps, teacher_steps, concise_steps))(a, b)
            response = "".join(f"{s};" for s in steps) + f"A:{r['answer']}"
            r = {**r, "solution": response}
        elif kind == "preference":
            # a stated presentation preference (P:msd / P:lsd / P:restate) the response follows
            pref = rng.choice(cfg["preferences"])
            steps = "".join(f"{s};" for s in student_steps(r["a"], r["b"]))
            if pref == "restate" and rng.random() < cfg["restate_switch"]:
                prefill, response = steps[:1], steps[1:] + f"A:{r['answer']}"
            elif pref == "restate":
                response = restatement(r) + steps + f"A:{r['answer']}"
            else:
                response = steps + "A:" + present(r["a"] + r["b"], pref)
            r = {**r, "system_prompt": pref}
        elif kind == "plain":
            response = plain_response(r, rng.random(), cfg["plain_styles"])
        else:
            response = r["solution_student"]
        counts[kind] += 1
        examples.append((opsd_messages(task, r, kind), response, prefill))
    concise_task, concise_dev = recipe_tasks(recipe)[1], ctx["rows"]["arith_concise"]["dev"]
    lsd_task = make_task("arith", digits=task.digits, rule="lsd")
    lsd_dev = lsd_task.generate(len(rows["dev"]), stage_seed(seed, "data/dev"))
    restate_task = make_task("arith", digits=task.digits, rule="restate")
    restate_dev = restate_task.generate(len(rows["dev"]), stage_seed(seed, "data/dev"))

    def system_ok():
        """Every PI behaviour is learned: S:concise (accuracy of the concise scratchpad), P:lsd (of the
        lsd-presented result), P:restate (of the restated response) and R:<solution> (of the teacher
        that writes out the reference it is given); the figure reported is the smallest. Checked in
        that order, each only once the ones before it pass; then the H:<answer> teacher's direct-answer
        mass (`stop_at_direct_answer`)."""
        acc = _dev_accuracy(
            model, tok, concise_task, concise_dev, recipe, lambda r: opsd_messages(task, r, "system")
        )
        if acc < cfg["stop_at_system"]:
            return False, acc
        checks = (
            (lsd_task, lsd_dev, "preference", cfg["stop_at_preference"]),
            (restate_task, restate_dev, "preference", cfg["stop_at_preference"]),
            (task, rows["dev"], "solution", cfg["stop_at_solution"]),
        )
        prefs, ok = [acc], True
        for t, dev, kind, target in checks:
            prefs.append(
                _dev_accuracy(model, tok, t, dev, recipe, lambda r, k=kind: opsd_messages(task, r, k))
            )
            if prefs[-1] < target:
                ok = False
                break
        if ok:
            # checked last: the one figure here that is a rate, not an accuracy (it is not in the minimum)
            ok = direct_answer_mass(model, tok, task, rows["dev"]) >= cfg["stop_at_direct_answer"]
        return ok, min(prefs)

    info = _sft_until(
        model,
        tok,
        examples,
        task,
        rows["dev"],
        cfg,
        recipe,
        stage_seed(seed, "opsd_base/batches"),
        ctx["report"],
        messages_fn=lambda r: opsd_messages(task, r, "plain"),
        extra_check=system_ok,
        extra_first=True,
    )
    info["mix_counts"] = counts
    return model, info


BUILDERS = {
    "student_base": build_student_base,
    "student_sft": build_student_sft,
    "teacher_large": build_teacher_large,
    "teacher_rlvr": build_teacher_rlvr,
    "opsd_base": build_opsd_base,
    "opsd_rlvr": lambda ctx: build_teacher_rlvr(ctx, "opsd_rlvr", "opsd_base"),
}


def run_step(name: str, out_dir: str, seed: int, recipe: dict, force: bool, q) -> dict:
    """Build one step (in a worker process or in-process) unless its build_info says it is built for
    this recipe; returns its build_info."""
    out = Path(out_dir)
    h = stage_hash(name, recipe, seed)
    info = read_build_info(out / name)
    if (
        not force
        and info is not None
        and info.get("stage_hash") == h
        and (out / name / "model.safetensors").is_file()
    ):
        _Reporter(q, name)(1, 1, "already built")
        return {**info, "skipped": True}
    threads = torch.get_num_threads()
    try:
        deterministic(stage_seed(seed, name))
        tok = char_tokenizer()
        ctx = {
            "recipe": recipe,
            "seed": seed,
            "out_dir": out,
            "tokenizer": tok,
            "task": recipe_tasks(recipe)[0],
            "rows": make_rows(recipe, seed),
            "report": _Reporter(q, name),
        }
        t0 = time.perf_counter()
        model, train_info = BUILDERS[name](ctx)
        info = {
            "stage_hash": h,
            "seconds": round(time.perf_counter() - t0, 1),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "train": train_info,
        }
        save(model, tok, out / name, info)
        _Reporter(q, name)(1, 1, f"done in {info['seconds']:.0f}s")
        return info
    finally:
        torch.set_num_threads(threads)
