"""Build the testbed: tiny models trained from scratch, with this tool's own stages, in which the paper's
failure modes happen on a CPU in minutes.

    opd testbed build                    # into opd_cli/testbed/assets (or $OPD_TESTBED_DIR); skips built steps
    opd testbed build --force            # rebuild everything
    python -m opd_cli.testbed.build /tmp/testbed --seed 1

What gets built (3-digit addition with a scratchpad, `opd_cli.tasks.arith`; char-level tokenizer):

  student_base   2 layers x 64, pretrained by `sft_train` on generic strings of the task alphabet only:
                 it knows the characters, not the task, so its task rollouts are malformed.
  student_sft    2 x 64, SFT on verified student-style traces, stopped early (first dev evaluation at or
                 above `stop_at`) so it is well formed but only ~70% accurate: room for distillation.
                 Trained from scratch, not from student_base: on this task the generic-string pretraining
                 slowed SFT several-fold (dev accuracy after 500 steps at lr 1e-3: 12% from student_base vs
                 85% from scratch), a cost the build budget cannot pay; student_base stays the analogue of
                 the paper's Base model for the "OPD without SFT" cell.
  teacher_large  3 x 96, SFT to >= 95% on a different reasoning style (operands swapped) in which a
                 fraction of traces start with student-style steps, write the revision token `W;` and
                 restart: on student-style prefixes it pushes toward revising (mechanism 1).
  teacher_rlvr   student_sft trained by `grpo_train` (GRPO, verifier reward) to >= 95%: close to the student.
  opsd_base      2 x 64, SFT on a mixture in which some prompts carry privileged information in the OPSD
                 teacher formats of conf/teacher/self_*.yaml: a hint line (`{problem}\\nH:{answer}`; with a
                 hint it answers directly `A:<answer>` half of the time), a reference solution
                 (`{problem}\\nR:{solution}`) or the system line `S:concise` (concise scratchpad, also
                 continued from full-style prefixes). Without PI it writes the full scratchpad. It trains
                 until the concise scratchpad is >= 90% accurate under `S:concise`, so the full one is
                 ~90% too (stronger than student_sft: at this size concise is learned much later).

Determinism: every step seeds itself from (seed, step name), runs single-threaded (results do not depend
on the machine's core count) and trains on data generated from the seed, so the same seed gives the same
weights and figures on the same kind of CPU. Independent steps run in two worker processes. A step whose
recipe hash matches the `build_info.json` in its directory is skipped (`force=True` rebuilds).
`manifest.json` records versions, the recipe hash, weight hashes and each model's measured figures.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import hashlib
import json
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from opd_cli.io import atomic_write_json
from opd_cli.testbed.paths import ASSETS_DIR, MANIFEST, MODEL_NAMES

log = logging.getLogger("opd")

MANIFEST_FORMAT = 1
HINT_TEMPLATE = "{problem}\nH:{answer}"  # conf/teacher/self_answer.yaml
SOLUTION_TEMPLATE = "{problem}\nR:{solution}"  # conf/teacher/self_solution.yaml

# The whole recipe; its hash is the manifest's config_hash. Step budgets are caps: the stop_at criteria
# (greedy accuracy on a dev set, checked every eval_every steps) end most steps earlier.
RECIPE: dict = {
    "task": {"name": "arith", "digits": 3},
    # 32768 training problems (of 810k): SFT sees each about once, so it learns addition, not the set;
    # data/<task>/train.jsonl ships the first `shipped_train` of them (the rest regenerate from the seed)
    "data": {"train": 32768, "shipped_train": 4096, "eval": 500, "dev": 200},
    "student": {"hidden_size": 64, "num_layers": 2, "head_dim": 32},
    "teacher": {"hidden_size": 96, "num_layers": 3, "head_dim": 32, "intermediate_size": 192},
    # half the strings are a bare response, half answer a user turn holding another generic string, so the
    # base model knows the chat format (it answers a task prompt with text) but not the task
    "student_base": {
        "strings": 8192,
        "max_len": 24,
        "with_user_turn": 0.5,
        "steps": 150,
        "batch_size": 64,
        "lr": 2e-3,
        "warmup_ratio": 0.05,
    },
    "student_sft": {
        "init": "scratch",
        "steps": 800,
        "batch_size": 64,
        "lr": 2e-3,
        "warmup_ratio": 0.02,
        "schedule": "constant",
        "eval_every": 10,
        "eval_below_loss": 0.35,
        "stop_at": 0.70,
    },
    "teacher_large": {
        "revise_prob": 0.3,
        "steps": 1400,
        "batch_size": 32,
        "lr": 2e-3,
        "warmup_ratio": 0.05,
        "schedule": "cosine",
        "eval_every": 50,
        "eval_below_loss": 0.15,
        "stop_at": 0.97,
    },
    "teacher_rlvr": {
        "steps": 200,
        "prompts_per_step": 16,
        "samples_per_prompt": 8,
        "lr": 1e-4,
        "clip_eps": 0.2,
        "temperature": 1.0,
        "max_new_tokens": 48,
        "eval_every": 5,
        "stop_at": 0.97,
    },
    # stops when the plain prompt reaches stop_at AND the concise scratchpad under S:concise reaches
    # stop_at_system: the shared-rule teacher must be about as accurate as the student it teaches, or
    # OPSD with the rule trades accuracy for length. The concise scratchpad (column sums without
    # operands) is learned much later than the full one (hence its large share of the mix), so by then
    # the full scratchpad is near saturation: opsd_base is strong (~95%) without PI. A `system_switch` fraction of the S:concise traces start with full
    # steps and switch to concise ones (see build_opsd_base).
    "opsd_base": {
        "mix": {"plain": 0.25, "hint": 0.15, "solution": 0.05, "system": 0.55},
        "hint_direct": 0.5,
        "system_switch": 0.3,
        "switch_later": 0.35,
        "steps": 2400,
        "batch_size": 32,
        "lr": 2e-3,
        "warmup_ratio": 0.02,
        "schedule": "constant",
        "eval_every": 20,
        "eval_below_loss": 0.2,
        "stop_at": 0.65,
        "stop_at_system": 0.9,
    },
    "eval": {
        "max_new_tokens": 96,
        "dev_max_new_tokens": 64,
        "topk": 5,
        "overlap_prompts": 128,
        "overlap_max_new_tokens": 64,
        "prefix_prompts": 200,
    },
}
# what each step loads from other steps (the build runs a step once these are built)
PARENTS = {"teacher_rlvr": ("student_sft",)}
# the order in which ready steps start (longest first, so two workers finish together)
PRIORITY = ("opsd_base", "teacher_large", "student_sft", "student_base", "teacher_rlvr")


# ---------------------------------------------------------------------------------------------- helpers
def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def stage_seed(seed: int, name: str) -> int:
    """A stable 31-bit seed for one step of the build."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=4).digest(), "little") >> 1


def parents_of(name: str, recipe: dict) -> tuple[str, ...]:
    if name == "student_sft" and recipe["student_sft"]["init"] == "student_base":
        return ("student_base",)
    return PARENTS.get(name, ())


def config_hash(recipe: dict = RECIPE) -> str:
    return _hash({"format": MANIFEST_FORMAT, "recipe": recipe})


def stage_hash(name: str, recipe: dict, seed: int) -> str:
    """What a step's weights depend on: its recipe, the shared parts, the seed and its parents' hashes."""
    shared = {k: recipe[k] for k in ("task", "data", "student", "teacher")}
    parents = [stage_hash(p, recipe, seed) for p in parents_of(name, recipe)]
    return _hash({"name": name, "recipe": recipe[name], "shared": shared, "seed": seed, "parents": parents})


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _deterministic(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _tokenizer():
    from opd_cli.testbed.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


def _tasks(recipe: dict):
    from opd_cli.tasks import make_task

    digits = recipe["task"]["digits"]
    return make_task("arith", digits=digits), make_task("arith", digits=digits, rule="concise")


def make_rows(recipe: dict, seed: int) -> dict[str, dict[str, list[dict]]]:
    """{"arith": {"train", "dev", "eval"}, "arith_concise": {...}}: same problems in both variants; train
    problems that also occur in dev or eval are dropped."""
    out = {}
    for task in _tasks(recipe):
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

    from opd_cli.testbed.models import tiny_qwen2_config

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
    from opd_cli.evaluation import greedy_accuracy

    return greedy_accuracy(
        model,
        tokenizer,
        task,
        rows,
        max_new_tokens=recipe["eval"]["dev_max_new_tokens"],
        messages_fn=messages_fn,
    )["accuracy"]


def _sft_until(
    model, tokenizer, examples, task, dev, cfg, recipe, seed, report, messages_fn=None, extra_check=None
) -> dict:
    """sft_train, stopped at the first dev evaluation >= cfg['stop_at'] (and `extra_check()` true, when
    given). Dev evaluations start once the loss is below cfg['eval_below_loss'] (before that the greedy
    accuracy is 0 and evaluating is wasted time)."""
    from opd_cli.stages.sft import sft_train

    history = []

    def callback(step, metrics):
        if metrics["loss"] > cfg["eval_below_loss"] and step < cfg["steps"]:
            report(step, cfg["steps"], f"loss {metrics['loss']:.3f}")
            return False
        acc = _dev_accuracy(model, tokenizer, task, dev, recipe, messages_fn)
        extra = extra_check() if extra_check is not None and acc >= cfg["stop_at"] else None
        history.append((step, acc) if extra is None else (step, acc, extra[1]))
        report(
            step,
            cfg["steps"],
            f"loss {metrics['loss']:.3f} dev acc {acc:.2f}" + ("" if extra is None else f" {extra[1]:.2f}"),
        )
        return acc >= cfg["stop_at"] and (extra is None or extra[0])

    metrics = sft_train(
        model,
        tokenizer,
        examples,
        steps=cfg["steps"],
        batch_size=cfg["batch_size"],
        lr=cfg["lr"],
        warmup_ratio=cfg["warmup_ratio"],
        schedule=cfg["schedule"],
        seed=seed,
        progress=False,
        callback=callback,
        eval_every=cfg["eval_every"],
    )
    return {
        "steps": metrics["step"],
        "loss": metrics["loss"],
        "dev_accuracy": history[-1][1] if history else None,
        "dev_history": history,
    }


# ------------------------------------------------------------------------------------------------ steps
def build_student_base(ctx: dict) -> dict:
    from opd_cli.stages.sft import sft_train
    from opd_cli.tasks.arith import random_pretraining_strings

    recipe, cfg, tok = ctx["recipe"], ctx["recipe"]["student_base"], ctx["tokenizer"]
    model = new_model(recipe, "student", len(tok), stage_seed(ctx["seed"], "student_base/init"))
    rng = random.Random(stage_seed(ctx["seed"], "student_base/data"))
    strings = random_pretraining_strings(2 * cfg["strings"], rng, cfg["max_len"])
    examples = []
    for i in range(cfg["strings"]):
        user = strings[cfg["strings"] + i]
        messages = [{"role": "user", "content": user}] if rng.random() < cfg["with_user_turn"] else []
        examples.append((messages, strings[i]))
    report = ctx["report"]
    metrics = sft_train(
        model,
        tok,
        examples,
        steps=cfg["steps"],
        batch_size=cfg["batch_size"],
        lr=cfg["lr"],
        warmup_ratio=cfg["warmup_ratio"],
        schedule="cosine",
        seed=stage_seed(ctx["seed"], "student_base/batches"),
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
    from opd_cli.tasks.arith import teacher_style_solution

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


def build_teacher_rlvr(ctx: dict):
    from opd_cli.rollout.hf_engine import HFEngine
    from opd_cli.stages.rlvr import grpo_train

    recipe, cfg, tok, seed = ctx["recipe"], ctx["recipe"]["teacher_rlvr"], ctx["tokenizer"], ctx["seed"]
    task, rows = ctx["task"], ctx["rows"]["arith"]
    model = load(ctx["out_dir"] / "student_sft")
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
        engine=engine,
        steps=cfg["steps"],
        prompts_per_step=cfg["prompts_per_step"],
        samples_per_prompt=cfg["samples_per_prompt"],
        lr=cfg["lr"],
        clip_eps=cfg["clip_eps"],
        temperature=cfg["temperature"],
        max_new_tokens=cfg["max_new_tokens"],
        seed=stage_seed(seed, "teacher_rlvr/grpo"),
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
    """The prompt an OPSD teacher sees for PI `kind` (plain | hint | solution | system)."""
    if kind == "plain":
        return task.messages(row, system_prompt=False)
    if kind == "hint":
        return [{"role": "user", "content": HINT_TEMPLATE.format(**row)}]
    if kind == "solution":
        return [{"role": "user", "content": SOLUTION_TEMPLATE.format(**row)}]
    if kind == "system":
        return task.messages({**row, "system_prompt": "concise"}, system_prompt=True)
    raise ValueError(f"unknown PI kind {kind!r}")


def switch_trace(row: dict, rng: random.Random, later: float) -> str:
    """k full scratchpad steps, then the remaining steps concise: `7+5+0=12;13;06;A:632` (k=1). k=1, else
    one more with probability `later` each time (k < digits).

    Why: the OPSD teacher scores the *student's* full-style prefixes. A real instruction-following model
    told to be concise continues a verbose prefix sensibly (and concisely); a model that saw only pure
    concise traces under S:concise produces garbage on a full-style prefix, so OPSD with the shared rule
    would teach garbage instead of the rule. With these traces the S:concise teacher continues any
    full-style prefix correctly and prefers a concise next step at every step boundary."""
    from opd_cli.tasks.arith import concise_steps, student_steps

    a, b = int(row["a"]), int(row["b"])
    full, short = student_steps(a, b), concise_steps(a, b)
    k = 1
    while k < len(full) - 1 and rng.random() < later:
        k += 1
    return "".join(f"{s};" for s in full[:k] + short[k:]) + f"A:{row['answer']}"


def build_opsd_base(ctx: dict):
    recipe, cfg, tok, seed = ctx["recipe"], ctx["recipe"]["opsd_base"], ctx["tokenizer"], ctx["seed"]
    task, rows = ctx["task"], ctx["rows"]["arith"]
    model = new_model(recipe, "student", len(tok), stage_seed(seed, "opsd_base/init"))
    rng = random.Random(stage_seed(seed, "opsd_base/mix"))
    kinds, weights = zip(*cfg["mix"].items(), strict=True)
    examples, counts = [], dict.fromkeys(kinds, 0)
    for r in rows["train"]:
        kind = rng.choices(kinds, weights)[0]
        if kind == "system" and rng.random() < cfg["system_switch"]:
            response = switch_trace(r, rng, cfg["switch_later"])
        elif kind == "system":
            response = r["solution_concise"]
        elif kind == "hint" and rng.random() < cfg["hint_direct"]:
            response = f"A:{r['answer']}"
        else:
            response = r["solution_student"]
        counts[kind] += 1
        examples.append((opsd_messages(task, r, kind), response))
    concise_task, concise_dev = _tasks(recipe)[1], ctx["rows"]["arith_concise"]["dev"]

    def system_ok():
        acc = _dev_accuracy(
            model, tok, concise_task, concise_dev, recipe, lambda r: opsd_messages(task, r, "system")
        )
        return acc >= cfg["stop_at_system"], acc

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
    )
    info["mix_counts"] = counts
    return model, info


BUILDERS = {
    "student_base": build_student_base,
    "student_sft": build_student_sft,
    "teacher_large": build_teacher_large,
    "teacher_rlvr": build_teacher_rlvr,
    "opsd_base": build_opsd_base,
}


def _run_stage(name: str, out_dir: str, seed: int, recipe: dict, force: bool, q) -> dict:
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
        _deterministic(stage_seed(seed, name))
        tok = _tokenizer()
        ctx = {
            "recipe": recipe,
            "seed": seed,
            "out_dir": out,
            "tokenizer": tok,
            "task": _tasks(recipe)[0],
            "rows": make_rows(recipe, seed),
            "report": _Reporter(q, name),
        }
        t0 = time.perf_counter()
        model, train_info = BUILDERS[name](ctx)
        info = {"stage_hash": h, "seconds": round(time.perf_counter() - t0, 1), "train": train_info}
        save(model, tok, out / name, info)
        _Reporter(q, name)(1, 1, f"done in {info['seconds']:.0f}s")
        return info
    finally:
        torch.set_num_threads(threads)


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
    from opd_cli.batching import pack, response_hidden_and_logits

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
    from opd_cli.rollout.base import SamplingConfig
    from opd_cli.rollout.hf_engine import HFEngine
    from opd_cli.stages.sft import prompt_ids

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
    from opd_cli.evaluation import greedy_responses
    from opd_cli.stages.sft import prompt_ids

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


@torch.no_grad()
def _first_token_mass(model, prompts: list[list[int]], token_id: int) -> float:
    from opd_cli.batching import pack, response_hidden_and_logits

    batch = pack(prompts, [[token_id]] * len(prompts), 0)
    _, logits = response_hidden_and_logits(model, batch)
    return float(logits[:, 0].softmax(-1)[:, token_id].mean())


def _rounded(d):
    if isinstance(d, float):
        return round(d, 4)
    if isinstance(d, dict):
        return {k: _rounded(v) for k, v in d.items()}
    return d


def evaluate_model(name: str, out_dir: str, seed: int, recipe: dict) -> dict:
    """Every figure the manifest records for one model (deterministic: seeded, single-threaded)."""
    from opd_cli.evaluation import greedy_accuracy
    from opd_cli.stages.sft import prompt_ids

    threads = torch.get_num_threads()
    _deterministic(stage_seed(seed, "eval"))
    try:
        out = Path(out_dir)
        tok = _tokenizer()
        task, concise = _tasks(recipe)
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
        if name == "opsd_base":
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
            from opd_cli.evaluation import greedy_responses

            direct = greedy_responses(model, tok, hint_prompts, max_new_tokens=mnt)
            pi["hint"]["direct_answer_rate"] = sum(
                tok.decode(s.response_ids, skip_special_tokens=True).startswith("A:") for s in direct
            ) / len(direct)
            # the probability of answering directly (first token "A"): what OPSD's teacher passes on
            pi["hint"]["direct_answer_mass"] = _first_token_mass(
                model, hint_prompts, tok.convert_tokens_to_ids("A")
            )
            pi["system"] = {
                "concise": figures["concise_with_system"],
                "accuracy": with_sys["accuracy"],
                "mean_length": with_sys["mean_length"],
            }
            figures["with_pi"] = pi
        return _rounded(figures)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- build
def _versions() -> dict:
    import platform

    import transformers

    import opd_cli

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "opd": opd_cli.__version__,
    }


def write_data(out: Path, recipe: dict, seed: int) -> dict:
    """data/<task>/{train,eval}.jsonl (readable by `opd_cli.data.load_rows` / `datasets`); train.jsonl holds
    the first recipe["data"]["shipped_train"] training rows."""
    from opd_cli.data import write_rows

    entries = {}
    for task_name, splits in make_rows(recipe, seed).items():
        entries[task_name] = {}
        for split in ("train", "eval"):
            rows = splits[split][: recipe["data"]["shipped_train"]] if split == "train" else splits[split]
            path = write_rows(rows, out / "data" / task_name / f"{split}.jsonl")
            entries[task_name][split] = {
                "path": str(path.relative_to(out)),
                "rows": len(rows),
                "sha256": file_sha256(path),
            }
    return entries


def _params(path: Path) -> int:
    import math

    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def build_testbed(
    out_dir: str | os.PathLike | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    workers: int | None = None,
    recipe: dict | None = None,
) -> dict:
    """Build (or complete) the testbed in `out_dir` (default: the package's assets); returns the manifest."""
    out = Path(out_dir) if out_dir is not None else ASSETS_DIR
    recipe = copy.deepcopy(recipe or RECIPE)
    chash = config_hash(recipe)
    out.mkdir(parents=True, exist_ok=True)
    old = _read_manifest(out)
    if (
        not force
        and old is not None
        and old.get("config_hash") == chash
        and old.get("seed") == seed
        and _models_intact(out, old)
    ):
        log.info("testbed at %s is up to date (config %s)", out, chash[:12])
        return old
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    t0 = time.perf_counter()
    data = write_data(out, recipe, seed)
    built = _run_jobs(
        {n: (_run_stage, (n, str(out), seed, recipe, force), parents_of(n, recipe)) for n in PRIORITY},
        workers,
        progress,
        "build",
        with_queue=True,
    )
    build_seconds = time.perf_counter() - t0
    evals = _run_jobs(
        {n: (evaluate_model, (n, str(out), seed, recipe), ()) for n in MODEL_NAMES},
        workers,
        progress,
        "evaluate",
        with_queue=False,
    )
    models = {}
    for name in MODEL_NAMES:
        info, figures = built[name], evals[name]
        path = out / name
        size = "teacher" if name == "teacher_large" else "student"
        models[name] = {
            "path": name,
            "architecture": {**recipe[size], "params": _params(path)},
            "recipe_hash": info["stage_hash"],
            "sha256": file_sha256(path / "model.safetensors"),
            "train": _rounded({k: v for k, v in info["train"].items() if k != "dev_history"}),
            "eval": figures,
        }
    manifest = {
        "format": MANIFEST_FORMAT,
        "seed": seed,
        "config_hash": chash,
        "recipe": recipe,
        "versions": _versions(),
        "tokenizer": {"vocab_size": len(_tokenizer())},
        "data": data,
        "models": models,
        "timing": {
            "build_seconds": round(build_seconds, 1),
            "total_seconds": round(time.perf_counter() - t0, 1),
            "steps": {n: built[n].get("seconds") for n in MODEL_NAMES},
            "skipped": sorted(n for n in MODEL_NAMES if built[n].get("skipped")),
            "workers": workers,
        },
    }
    atomic_write_json(out / MANIFEST, manifest)
    log.info("testbed built at %s in %.0fs", out, manifest["timing"]["total_seconds"])
    return manifest


def _read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _models_intact(out: Path, manifest: dict) -> bool:
    for name in MODEL_NAMES:
        entry = manifest.get("models", {}).get(name)
        weights = out / name / "model.safetensors"
        if entry is None or not weights.is_file() or file_sha256(weights) != entry.get("sha256"):
            return False
    return True


def _run_jobs(jobs: dict[str, tuple], workers: int, progress: bool, title: str, with_queue: bool) -> dict:
    """Run jobs {name: (fn, args, names it depends on)} in dict order as their dependencies finish, in up
    to `workers` spawned processes (one worker: in this process); with_queue passes each job a progress
    queue as last argument. Returns {name: result}."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(file=sys.stderr)
    bars = Progress(
        TextColumn("[bold]{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not (progress and console.is_terminal),
        transient=False,
    )
    ids: dict[str, int] = {}

    def show(event) -> None:
        name, completed, total, info = event
        if name not in ids:
            ids[name] = bars.add_task(f"{title} {name}", total=total, info="")
        bars.update(ids[name], completed=completed, total=total, info=info)
        if progress and bars.disable and info and (completed == total or completed % 100 == 0):
            log.info("%s %s: %d/%d %s", title, name, completed, total, info)

    results: dict = {}
    with bars:
        if workers <= 1:
            direct = type("DirectQueue", (), {"put": staticmethod(show)})()
            while len(results) < len(jobs):
                name = next(
                    n
                    for n, (_, _, deps) in jobs.items()
                    if n not in results and all(d in results for d in deps)
                )
                fn, args, _ = jobs[name]
                results[name] = fn(*args, direct) if with_queue else fn(*args)
            return results
        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager, cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            q = manager.Queue()
            running: dict = {}
            while len(results) < len(jobs):
                for name, (fn, args, deps) in jobs.items():
                    if (
                        name not in results
                        and name not in running.values()
                        and all(d in results for d in deps)
                    ):
                        running[pool.submit(fn, *args, q) if with_queue else pool.submit(fn, *args)] = name
                done, _ = cf.wait(list(running), timeout=0.5, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    results[running.pop(future)] = future.result()
                while True:
                    try:
                        show(q.get_nowait())
                    except queue_mod.Empty:
                        break
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the opd testbed.")
    parser.add_argument("out_dir", nargs="?", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = build_testbed(args.out_dir, seed=args.seed, force=args.force, workers=args.workers)
    print(json.dumps({n: m["eval"] for n, m in manifest["models"].items()}, indent=1))
    print(json.dumps(manifest["timing"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
