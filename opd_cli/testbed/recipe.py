"""The testbed's recipe: every size, budget and stopping criterion of the build (`RECIPE`), and the hashes
that say whether a built step is still the recipe's (manifest `config_hash`, each step's `stage_hash`).
What the recipe builds and why: opd_cli/testbed/build.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

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
        "strings": 32768,
        "max_len": 24,
        "domain": 0.75,
        "domain_max_len": 48,
        "with_user_turn": 0.5,
        "steps": 1200,
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
        "eval_every": 2,
        "eval_below_loss": 0.35,
        # the band student_sft must land in (well formed, room to improve): its dev accuracy jumps between
        # evaluations (0.26 -> 0.905 at steps 380 -> 400 in one build), so the top of the band is a stop
        # condition too
        "stop_at": 0.70,
        "stop_below": 0.80,
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
        # response formats of tasks/arith.py: 2 = the concise step opens with "=", the restatement with "Q:"
        # (each style differs from the full scratchpad at its first token)
        "formats": 2,
        "mix": {"plain": 0.1, "hint": 0.12, "solution": 0.08, "system": 0.4, "preference": 0.3},
        # this share of the hint traces answers directly (`A:<answer>`). The learned first-token mass sits
        # well below the share (0.35 at 0.5: the hint prompt is a plain prompt plus one line), and at 0.5
        # the greedy direct-answer rate was a coin toss of the build's kernels (69% in v3, 24% in v4, and
        # the answer-PI cells flipped from collapses to stable with it). 0.7, with stop_at_direct_answer,
        # keeps the mass away from that edge. v6: 0.8 (mass 0.93), stop 0.6; trials at 0.75 / 0.85 and what
        # the answer-PI cells did on each build: experiments/testbed.md, "Testbed v6". The mass alone does
        # not decide that cell (a build at 0.74 did not collapse, one at 0.65 did).
        "hint_direct": 0.8,
        # unprompted, the model writes a plain prompt's response concise or restated this often (as an LLM
        # is sometimes brief, or restates, without being told): OPSD with a shared rule amplifies a
        # behaviour in the student's support. Without it the student has ~0 mass on the rule's first
        # token, reverse KL only pushes its own token down, and the mass goes to other digits (measured:
        # `0+8+0=08;` for 115+308, the cell collapsed; experiments/matrix.md)
        "plain_styles": {"concise": 0.1, "restate": 0.1},
        "system_switch": 0.3,
        # the first character of a switch trace is a prefill (no loss): the teacher learns to continue a
        # full-style start, never to make one
        "switch_prefill": True,
        # the stated preferences of the "preference" share (system line P:<name>), drawn uniformly
        "preferences": ["msd", "lsd", "restate"],
        # this fraction of P:restate traces starts without the restatement (its first character a
        # prefill): the teacher continues a student that did not restate, as a real model would
        "restate_switch": 0.3,
        "switch_later": 0.35,
        "steps": 5000,
        "batch_size": 32,
        "lr": 2e-3,
        "warmup_ratio": 0.02,
        "schedule": "constant",
        "eval_every": 20,
        # the PI behaviours are met after ~3000 steps at the earliest (loss ~0.05), so dev evaluations
        # start late; each costs ~0.3 s (200 greedy rows, measured in v6): training is the step's time
        "eval_below_loss": 0.07,
        "stop_at": 0.65,
        "stop_at_system": 0.9,
        "stop_at_preference": 0.9,
        # the R:<solution> teacher writes out the reference it is given (without this check the build
        # stopped at 2760 steps with that teacher at 0.14: the solution cell would test a broken teacher)
        "stop_at_solution": 0.9,
        # the H:<answer> teacher's mean probability of answering directly (first token `A`) on the dev
        # prompts: the rate the answer-PI cells rest on is a stop condition, not a by-product of the kernels
        "stop_at_direct_answer": 0.6,
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
# the RLVR-adapted PI teacher: opsd_base after GRPO on plain prompts, with teacher_rlvr's settings
RECIPE["opsd_rlvr"] = dict(RECIPE["teacher_rlvr"])
# what each step loads from other steps (the build runs a step once these are built)
PARENTS = {"teacher_rlvr": ("student_sft",), "opsd_rlvr": ("opsd_base",)}
# the order in which ready steps start (longest first, so two workers finish together)
PRIORITY = ("opsd_base", "teacher_large", "student_sft", "student_base", "teacher_rlvr", "opsd_rlvr")


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
