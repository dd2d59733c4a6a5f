"""Tasks: generators, formats, verifiers, rule checkers, tokenizer round trips, math-verify grading."""

from __future__ import annotations

import dataclasses
import random
import threading

import pytest

from opd_cli.tasks import TASKS, ArithTask, MathTask, Verdict, make_task
from opd_cli.tasks.arith import (
    ALPHABET,
    computed_lsd,
    domain_pretraining_strings,
    extract_answer,
    follows_concise,
    format_concise_solution,
    format_student_solution,
    format_teacher_solution,
    random_pretraining_strings,
    teacher_style_solution,
)
from opd_cli.tasks.math import last_boxed, math_equal

ROW_KEYS = {"problem", "answer", "solution", "system_prompt"}


def _row(a: int, b: int, rule: str | None = None) -> dict:
    return ArithTask(digits=len(str(a)), rule=rule).make_row(a, b)


# ---- registry -----------------------------------------------------------------------------------------
def test_registry_and_unknown_task():
    assert set(TASKS) == {"arith", "math"}
    assert isinstance(make_task("arith", digits=2), ArithTask)
    assert isinstance(make_task("math"), MathTask)
    with pytest.raises(ValueError, match="allowed: arith, math"):
        make_task("nope")
    with pytest.raises(ValueError, match="bad options"):
        make_task("arith", colour="red")
    for bad in (0, 9, "3", True):
        with pytest.raises(ValueError, match="digits"):
            ArithTask(digits=bad)
    with pytest.raises(ValueError, match="rule"):
        ArithTask(rule="polite")


# ---- generation -----------------------------------------------------------------------------------------
def test_generate_deterministic_and_seed_dependent():
    t = ArithTask(digits=3)
    assert t.generate(50, seed=1) == t.generate(50, seed=1)
    assert t.generate(50, seed=1) != t.generate(50, seed=2)
    # global RNG is neither used nor disturbed
    random.seed(0)
    state = random.getstate()
    t.generate(10, seed=3)
    assert random.getstate() == state


@pytest.mark.parametrize("digits", [1, 2, 3, 4, 5, 8])
def test_rows_have_protocol_fields(digits):
    for row in ArithTask(digits=digits).generate(20, seed=digits):
        assert ROW_KEYS <= set(row)
        a, b = row["a"], row["b"]
        assert len(str(a)) == len(str(b)) == digits == row["digits"]
        assert row["problem"] == f"Q:{a}+{b}"
        assert row["answer"] == row["hint"] == str(a + b)
        assert row["system_prompt"] == ""
        assert row["solution"] == row["solution_student"]


def test_example_formats():
    row = _row(347, 285)
    assert row["solution"] == "7+5+0=12;4+8+1=13;3+2+1=06;A:632"
    assert row["solution_concise"] == "=12;=13;=06;A:632"
    assert row["solution_teacher"] == "5+7+0=12;8+4+1=13;2+3+1=06;A:632"
    assert format_teacher_solution(347, 285, revise_after=1) == "7+5+0=12;W;5+7+0=12;8+4+1=13;2+3+1=06;A:632"
    assert format_student_solution(999, 999) == "9+9+0=18;9+9+1=19;9+9+1=19;A:1998"
    assert format_concise_solution(5, 7) == "=12;A:12"


def test_rule_concise_rows():
    t = ArithTask(digits=3, rule="concise")
    row = t.generate(1, seed=0)[0]
    assert row["system_prompt"] == "concise"
    assert row["solution"] == row["solution_concise"]
    assert t.messages(row) == [
        {"role": "system", "content": "S:concise"},
        {"role": "user", "content": row["problem"]},
    ]
    assert t.messages(row, system_prompt=False) == [{"role": "user", "content": row["problem"]}]
    v = t.verify(row, row["solution"])
    assert v == Verdict(correct=True, well_formed=True, follows_rule=True, answer=row["answer"])
    v = t.verify(row, row["solution_student"])
    assert v.correct and v.well_formed and v.follows_rule is False


def test_messages_extra_user_and_privileged_info():
    t = ArithTask()
    row = _row(347, 285)
    assert t.messages(row) == [{"role": "user", "content": "Q:347+285"}]
    pi = t.privileged_info(row, "answer")
    assert pi == "A:632"
    assert t.messages(row, extra_user=pi) == [{"role": "user", "content": "Q:347+285;A:632"}]
    assert t.privileged_info(row, "solution") == row["solution"]
    with pytest.raises(ValueError):
        t.privileged_info(row, "nope")


# ---- verification -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("digits", [1, 2, 3, 4, 5])
def test_all_solution_styles_verify(digits):
    t = ArithTask(digits=digits)
    rng = random.Random(digits)
    rows = t.generate(150, seed=100 + digits)
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    rows.append(t.make_row(hi, hi))  # final carry
    rows.append(t.make_row(lo, lo))
    assert any(len(r["answer"]) == digits + 1 for r in rows)
    for row in rows:
        responses = [
            row["solution"],
            row["solution_concise"],
            row["solution_teacher"],
            teacher_style_solution(row, rng, revise_prob=1.0),
        ] + [format_teacher_solution(row["a"], row["b"], revise_after=k) for k in range(1, digits + 1)]
        for resp in responses:
            v = t.verify(row, resp)
            assert v.correct and v.well_formed, (row["problem"], resp, v)
            assert v.answer == row["answer"] and v.follows_rule is None
            assert t.reward(row, resp) == 1.0


def test_revision_traces():
    t = ArithTask(digits=3, teacher_revise_prob=0.5)
    rows = t.generate(200, seed=0)
    revised = [r["solution_teacher"] for r in rows if "W;" in r["solution_teacher"]]
    assert 60 < len(revised) < 140
    for r in rows:
        assert t.verify(r, r["solution_teacher"]).well_formed
    # teacher_revise_prob does not change the operands
    assert [r["problem"] for r in rows] == [r["problem"] for r in ArithTask(digits=3).generate(200, seed=0)]
    rng = random.Random(0)
    row = _row(347, 285)
    assert "W;" not in teacher_style_solution(row, rng, revise_prob=0.0)
    trace = teacher_style_solution(row, rng, revise_prob=1.0)
    assert trace.count("W;") == 1 and trace.endswith("5+7+0=12;8+4+1=13;2+3+1=06;A:632")
    assert t.hedging_tokens == ["W;"]


@pytest.mark.parametrize(
    "response, correct, wf, answer",
    [
        ("", False, False, None),
        ("A:", False, False, None),
        ("632", False, False, None),  # no A:
        ("A:632", True, False, "632"),  # no scratchpad
        ("=12;=13;=06;A:632" * 700, True, False, "632"),  # overlong (~10k chars), ends with the right answer
        ("=12;=13;=06;A:632;" * 700, False, False, None),  # overlong, nothing after the last A: parses
        ("7+5+0=12;" * 1200 + "A:632", True, False, "632"),  # overlong but ends with the right answer
        ("7+5+0=12;4+8+1=13;3+2+1=06;A:６３２", False, False, None),  # unicode digits
        ("7+5+0=12;4+8+1=13;3+2+1=06;A:632\n", False, False, None),  # trailing newline
        ("7+5+0=12;4+8+1=13;3+2+1=06;A:632 é", False, False, None),
        ("7+5+0=12;4+8+1=13;3+2+1=06;A:12x", False, False, None),
        ("7+5+0=12;4+8+1=13;3+2+1=06;A:0632", False, False, "0632"),  # leading zero
        ("7+5+0=12;4+8+1=13;3+2+1=06;A:631", False, True, "631"),  # consistent pad, wrong answer
        ("7+5+0=12;4+8+1=13;A:632;3+2+1=06;A:632", True, False, "632"),  # A: twice
        ("A:632;A:632", True, False, "632"),
        ("7+5+0=12;4+8+0=12;3+2+1=06;A:632", True, False, "632"),  # carry chain broken
        ("7+5+0=12;4+8+1=13;3+2+1=6;A:632", True, False, "632"),  # sum not two digits
        ("7+5+0=12;4+8+1=13;A:632", True, False, "632"),  # missing step
        ("7+5+0=12;4+8+1=13;3+2+1=06;3+2+1=06;A:632", True, False, "632"),  # extra step
        ("4+3+0=07;8+4+1=13;3+2+1=06;A:632", True, False, "632"),  # wrong column digits
        ("=12;=13;=06;A:632", True, True, "632"),
        ("=12;=13;=07;A:632", True, False, "632"),  # concise, inconsistent
        ("5+7+0=12;4+8+1=13;3+2+1=06;A:632", True, False, "632"),  # mixed styles
        ("W;5+7+0=12;8+4+1=13;2+3+1=06;A:632", True, False, "632"),  # revision with no prefix
        ("7+5+0=12;W;W;5+7+0=12;8+4+1=13;2+3+1=06;A:632", True, False, "632"),
        ("8+5+0=13;W;5+7+0=12;8+4+1=13;2+3+1=06;A:632", True, False, "632"),  # wrong revised prefix
        ("7+5+0=12;4+8+1=13;3+2+1=06;W;5+7+0=12;8+4+1=13;2+3+1=06;A:632", True, True, "632"),
        ("\x00\ud800\U0001f600A:632", True, False, "632"),
    ],
)
def test_adversarial_responses(response, correct, wf, answer):
    t = ArithTask(digits=3)
    row = _row(347, 285)
    v = t.verify(row, response)
    assert (v.correct, v.well_formed, v.answer) == (correct, wf, answer)
    assert v.follows_rule is None


def test_verify_never_raises_on_odd_inputs():
    t = ArithTask(digits=3)
    row = _row(347, 285)
    for resp in (None, 123, b"A:632", "A:" * 5000):
        v = t.verify(row, resp)  # type: ignore[arg-type]
        assert isinstance(v, Verdict)
    for bad_row in ({}, {"problem": "Q:1+22", "answer": "23"}, {"problem": None, "answer": None}):
        v = t.verify(bad_row, "A:23")
        assert not v.well_formed
    assert extract_answer("A:1A:2") == "2"
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.correct = True  # type: ignore[misc]


def test_final_carry_answers():
    t = ArithTask(digits=2)
    row = t.make_row(99, 99)
    assert row["answer"] == "198"
    assert t.verify(row, "9+9+0=18;9+9+1=19;A:198").well_formed
    assert not t.verify(row, "9+9+0=18;9+9+1=19;A:98").correct
    row = t.make_row(10, 10)
    assert t.verify(row, "0+0+0=00;1+1+0=02;A:20") == Verdict(True, True, None, "20")


def test_concise_rule_checker():
    row = _row(347, 285, rule="concise")
    good = [
        "=12;=13;=06;A:632",
        "=99;=99;=99;A:1",
        "=00;=00;=00;A:0632",
    ]  # format only: digits are not checked
    bad = [
        "",
        "=12;=13;A:632",  # too few groups
        "=12;=13;=06;=07;A:632",
        "=12;=13;=6;A:632",
        "12;13;06;A:632",  # the steps must open with =
        "=12;=13;=06;A:",
        "=12;=13;=06;A:63x",
        "7+5+0=12;4+8+1=13;3+2+1=06;A:632",
        "=12;W;=12;=13;=06;A:632",
        "=12;=13;=06;A:632\n",
        " =12;=13;=06;A:632",
        "=１２;=13;=06;A:632",
    ]
    for s in good:
        assert follows_concise(row, s), s
    for s in bad:
        assert not follows_concise(row, s), s
    t = ArithTask(rule="concise")
    assert t.rules["concise"] is follows_concise
    assert t.verify(row, "=99;=99;=99;A:1") == Verdict(False, False, True, "1")
    # rows without a rule report None
    assert ArithTask().verify(_row(347, 285), "=12;=13;=06;A:632").follows_rule is None


# ---- pretraining strings -------------------------------------------------------------------------------------
def test_pretraining_strings_are_not_task_responses():
    rng = random.Random(0)
    strings = random_pretraining_strings(2000, rng, max_len=40)
    assert strings == random_pretraining_strings(2000, random.Random(0), max_len=40)
    assert len(strings) == 2000 and all(1 <= len(s) <= 40 for s in strings)
    assert set("".join(strings)) <= set(ALPHABET)
    assert len(set("".join(strings))) > 30
    assert sum(s[:1].isdigit() for s in strings) > 400  # digit-heavy like the task
    rows = [_row(a, b) for a, b in [(5, 7), (9, 9), (47, 85), (347, 285), (999, 999), (1234, 5678)]]
    rows += ArithTask(digits=2).generate(30, seed=0)
    t = ArithTask()
    for s in strings:
        assert extract_answer(s) is None
        for row in rows:
            v = t.verify(row, s)
            assert not v.well_formed and not v.correct


# ---- tokenizer round trip -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from opd_cli.testbed.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


def test_tokenizer_round_trip(tokenizer):
    texts = []
    for digits in (1, 3, 5, 8):
        for row in ArithTask(digits=digits, teacher_revise_prob=0.5).generate(10, seed=digits):
            texts += [row["problem"], row["solution"], row["solution_concise"], row["solution_teacher"]]
    texts += random_pretraining_strings(50, random.Random(1), max_len=60)
    texts += ["S:concise", "Q:347+285;A:632"]
    for s in texts:
        ids = tokenizer.encode(s, add_special_tokens=False)
        assert len(ids) == len(s)
        assert tokenizer.decode(ids) == s


def test_chat_template(tokenizer):
    t = ArithTask(rule="concise")
    row = t.make_row(347, 285)
    text = tokenizer.apply_chat_template(t.messages(row), tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>S:concise<|end|><|user|>Q:347+285<|end|><|assistant|>"
    text = tokenizer.apply_chat_template(
        t.messages(row, system_prompt=False, extra_user="A:632"), tokenize=False, add_generation_prompt=True
    )
    assert text == "<|user|>Q:347+285;A:632<|end|><|assistant|>"
    full = t.messages(row) + [{"role": "assistant", "content": row["solution"]}]
    text = tokenizer.apply_chat_template(full, tokenize=False)
    assert text == "<|system|>S:concise<|end|><|user|>Q:347+285<|end|><|assistant|>=12;=13;=06;A:632<|end|>"
    ids = tokenizer.apply_chat_template(full, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids[-1] == tokenizer.eos_token_id


# ---- math ---------------------------------------------------------------------------------------------------
MATH_ROW = {"problem": "What is 1/2 as a decimal?", "answer": "0.5", "solution": "", "system_prompt": ""}


def test_math_messages():
    t = MathTask()
    msgs = t.messages(MATH_ROW)
    assert msgs == [
        {
            "role": "user",
            "content": "What is 1/2 as a decimal?\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
        }
    ]
    assert MathTask(instruction="").messages(MATH_ROW)[0]["content"] == MATH_ROW["problem"]
    row = MathTask(rule="concise").prepare([MATH_ROW])[0]
    assert row["system_prompt"] == "concise" and row["hint"] == "0.5"
    msgs = MathTask().messages(row, extra_user="Reference answer: 0.5")
    assert msgs[0]["role"] == "system" and "concise" in msgs[0]["content"].lower()
    assert msgs[1]["content"].endswith("\\boxed{}.\n\nReference answer: 0.5")
    assert MathTask.hedging_tokens == ["wait", "but", "maybe", "Wait", "But", "Maybe"]


@pytest.mark.parametrize(
    "response, correct, wf, answer",
    [
        ("so the answer is \\boxed{\\frac{1}{2}}.", True, True, "\\frac{1}{2}"),
        ("\\boxed{0.5}", True, True, "0.5"),
        ("first \\boxed{0.5}, wait, \\boxed{2}", False, True, "2"),  # the last box counts
        ("\\boxed{2}", False, True, "2"),
        ("the answer is 0.5", False, False, None),
        ("", False, False, None),
        ("\\boxed{", False, False, None),
        ("\\boxed{}", False, True, ""),
        ("\\boxed{\\frac{", False, False, None),
        ("\\boxed{)(}{", False, True, ")("),
        ("\x00\ud800" * 5000, False, False, None),
        ("\\boxed{" + "(" * 5000 + "}", False, True, "(" * 5000),
    ],
)
def test_math_verify(response, correct, wf, answer):
    v = MathTask().verify(MATH_ROW, response)
    assert (v.correct, v.well_formed, v.answer) == (correct, wf, answer)
    assert v.follows_rule is None


def test_math_equal_and_threads():
    assert math_equal("3", "3") and not math_equal("3", "2")
    assert math_equal("\\frac{1}{2}", "0.5")
    assert math_equal("\\boxed{12}", "12")
    assert last_boxed("a \\boxed{x^{2}} b") == "x^{2}"
    assert last_boxed("\\fbox{7}") == "7"
    results = []
    th = threading.Thread(target=lambda: results.append(MathTask().verify(MATH_ROW, "\\boxed{1/2}")))
    th.start()
    th.join(timeout=30)
    assert results and results[0].correct


def test_math_concise_rule():
    t = MathTask(rule="concise", concise_max_words=5)
    row = t.prepare([MATH_ROW])[0]
    assert t.verify(row, "It is \\boxed{0.5}").follows_rule is True
    assert t.verify(row, "wait but maybe it is \\boxed{0.5}").follows_rule is False
    assert t.verify(row, "0.5").follows_rule is False


# ---- preferences, profiles and free reference solutions (the OPSD cells of issue 17) ------------------
def test_task_options_never_change_the_problems():
    """Every variant of arith poses the same problems from the same seed: the cells differ only in PI."""
    base = [r["problem"] for r in ArithTask().generate(50, 7)]
    for opts in (
        {"rule": "lsd"},
        {"rule": "profile"},
        {"rule": "profile", "profiles": ["msd", "concise", "restate"]},
        {"rule": "restate"},
        {"reference": "any"},
    ):
        assert [r["problem"] for r in ArithTask(**opts).generate(50, 7)] == base, opts


def test_reference_any_draws_every_valid_style_and_each_verifies():
    task = ArithTask(reference="any")
    rows = task.generate(300, 0)
    styles = set()
    for r in rows:
        correct, wf, _ = task.check(r, r["solution"])
        assert correct and wf, r
        styles.add(
            "concise"
            if "+" not in r["solution"]
            else "student"
            if r["solution"] == r["solution_student"]
            else "swap"
        )
        assert r["solution"] not in task.alternative_pis(r, "solution")
        assert len(task.alternative_pis(r, "solution")) == 2
    assert styles == {"student", "swap", "concise"}
    assert ArithTask().generate(5, 0)[0]["solution"] == ArithTask().generate(5, 0)[0]["solution_student"]


def test_lsd_presentation_grading_and_checkers():
    task = ArithTask(rule="lsd")
    row = task.make_row(347, 285)
    assert row["answer"] == "236" and row["system_prompt"] == "lsd"
    assert task.system_text(row) == "P:lsd"
    assert task.check(row, "7+5+0=12;4+8+1=13;3+2+1=06;A:236")[:2] == (True, True)
    assert task.check(row, "7+5+0=12;4+8+1=13;3+2+1=06;A:632")[0] is False
    assert task.follows_rule(row, "=12;=13;=06;A:236") is True
    # presentation only: a wrong scratchpad presented lsd-first still follows the preference
    assert task.follows_rule(row, "=12;=13;=07;A:237") is True
    assert task.follows_rule(row, "=12;=13;=06;A:632") is False
    # final carry: 999+999 = 1998 -> scratchpad sums 18;19;19 -> lsd 8991
    assert computed_lsd("9+9+0=18;9+9+1=19;9+9+1=19;A:8991") == "8991"
    assert computed_lsd("no scratchpad") is None


def test_profile_rows_mix_preferences_and_offer_the_other_one():
    task = ArithTask(rule="profile")
    rows = task.generate(400, 3)
    prefs = [r["system_prompt"] for r in rows]
    assert set(prefs) == {"msd", "lsd"} and 0.4 < prefs.count("lsd") / len(prefs) < 0.6
    for r in rows[:20]:
        assert task.check(r, r["solution"])[:2] == (True, True)
        assert task.alternative_pis(r, "system_prompt") == [
            p for p in ("msd", "lsd") if p != r["system_prompt"]
        ]
    # a shared rule has no alternative
    assert ArithTask(rule="lsd").alternative_pis(ArithTask(rule="lsd").make_row(1, 2), "system_prompt") == []


def test_a_profile_of_styles_grades_each_user_by_exactly_their_style():
    task = ArithTask(rule="profile", profiles=["msd", "concise", "restate"])
    rows = task.generate(300, 5)
    assert {r["system_prompt"] for r in rows} == {"msd", "concise", "restate"}
    # the default profile draws the same users as before the option existed (the same stream)
    assert [r["system_prompt"] for r in ArithTask(rule="profile").generate(50, 5)] == [
        r["system_prompt"] for r in ArithTask(rule="profile", profiles=["msd", "lsd"]).generate(50, 5)
    ]
    by_pref = {r["system_prompt"]: r for r in rows}
    for pref, row in by_pref.items():
        styles = {
            "msd": row["solution_student"],
            "concise": row["solution_concise"],
            "restate": "Q:" + row["problem"][2:] + ";" + row["solution_student"],
        }
        assert row["solution"] == styles[pref]
        for style, response in styles.items():
            # the right value in another user's style is wrong for this user
            assert task.check(row, response)[0] is (style == pref), (pref, style)
        assert task.alternative_pis(row, "system_prompt") == [p for p in task.profiles if p != pref]
        assert task.messages(row, system_prompt=True)[0]["content"] == task.system_prompts[pref]
    # without restate or concise in the profile, a restated msd response still counts (as it always did)
    plain = ArithTask(rule="profile")
    row = next(r for r in plain.generate(50, 5) if r["system_prompt"] == "msd")
    assert plain.check(row, "Q:" + row["problem"][2:] + ";" + row["solution_student"])[0] is True


@pytest.mark.parametrize("profiles", [["msd"], ["msd", "msd"], ["msd", "shouting"], []])
def test_a_profile_needs_two_known_preferences(profiles):
    with pytest.raises(ValueError, match="profiles must be two or more distinct preferences"):
        ArithTask(rule="profile", profiles=profiles)


def test_profiles_without_the_profile_rule_is_an_error_not_ignored():
    with pytest.raises(ValueError, match="only applies to rule 'profile'.*set task.rule=profile"):
        ArithTask(rule="lsd", profiles=["msd", "restate"])


def test_restate_preference():
    task = ArithTask(rule="restate")
    row = task.make_row(347, 285)
    assert row["solution"] == "Q:347+285;7+5+0=12;4+8+1=13;3+2+1=06;A:632" and row["answer"] == "632"
    assert task.check(row, row["solution"])[:2] == (True, True)
    assert task.follows_rule(row, row["solution"]) is True
    assert task.follows_rule(row, row["solution_student"]) is False
    assert task.check(row, row["solution_student"])[0] is True  # the result is graded as usual


def test_domain_pretraining_strings_hold_skill_not_the_format():
    rng = random.Random(0)
    strings = domain_pretraining_strings(300, rng, 40)
    assert all(0 < len(s) <= 40 for s in strings)
    assert not any(("A:" in s) or ("Q:" in s) or (";" in s) for s in strings)
    sums = [p for s in strings for p in s.split(" ")[:-1] if "=" in p and p.count("+") == 1]
    for p in sums:
        lhs, rhs = p.split("=")
        x, y = lhs.split("+")
        assert int(x) + int(y) == int(rhs), p
    assert sums


def test_task_profiles_reach_the_task_from_the_command_line():
    from opd_cli.launch import compose
    from opd_cli.stages.common import load_task_and_data

    cfg = compose(["experiment=opsd_profile_pi", "task.profiles=[msd,restate]", "task.train_size=40"])
    task, train, _ = load_task_and_data(cfg.task)
    assert task.profiles == ("msd", "restate")
    assert {r["system_prompt"] for r in train} == {"msd", "restate"}
    shipped, _, _ = load_task_and_data(compose(["experiment=opsd_profile_pi"]).task)
    assert shipped.profiles == ("msd", "lsd")
