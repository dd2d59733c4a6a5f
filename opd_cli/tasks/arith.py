"""`arith`: multi-digit addition with a right-to-left scratchpad (the testbed task).

Formats (3 digits, 347+285; the answer is the plain integer, a final carry adds a digit: 999+999 -> 1998)::

    problem           Q:347+285
    student solution  7+5+0=12;4+8+1=13;3+2+1=06;A:632       one step per column, right to left,
                                                            "a+b+carry=two-digit sum;"
    concise solution  =12;=13;=06;A:632                      only the two-digit column sums: each step
                                                            skips the operands (`a+b+c`) and opens at `=`
    teacher solution  5+7+0=12;8+4+1=13;2+3+1=06;A:632       operands swapped in every step
    revision trace    7+5+0=12;W;5+7+0=12;8+4+1=13;2+3+1=06;A:632
                      k >= 1 student-style steps, the revision token "W;" ("wait"), then the full
                      teacher-style scratchpad from the first column

Rule "concise" (the analogue of the paper's conciseness system prompt): rows store
``system_prompt="concise"``, the model sees the system message ``S:concise``.

Preferences (the analogue of an alignment preference / a user profile): how the result is presented.
``msd`` is the usual order (``A:632``), ``lsd`` the digits in the order the right-to-left scratchpad
computed them (``A:236``). The model sees the system message ``P:lsd`` / ``P:msd``; a row's `answer` (and
every solution field) is the presented result, so the verifier grades "right value, presented as this
row's user prefers". Rule ``lsd``: every row prefers lsd (a shared preference). Rule ``profile``: each row's
preference is drawn at random (a per-user profile the prompt does not reveal), from its own stream.
Rule ``restate`` (system line ``P:restate``, the shared preference of the matrix): the response first
restates the problem, ``Q:347+285;7+5+0=12;...;A:632``; the result is presented as usual.

Why the concise step opens with ``=`` and the restatement with ``Q:``: each style differs from the full
scratchpad at its first token, as "Let me restate..." differs from "7 plus 5..." in text. With digits
at both openings (``12;`` against ``7+5+0=12;``) a per-token OPSD signal moved the student's first digit
to the concise one while it went on in the full style (``1+8+0=09;`` for a column 6+8), a mixture of
styles no model of either style writes (experiments/matrix.md, testbed v2).

Reference solutions: ``reference="student"`` (default) makes `solution` the student scratchpad, a function
of the problem; ``reference="any"`` draws it per row among the problem's valid scratchpads (student,
operand-swapped, concise), as a dataset whose reference writers chose freely would hold: a teacher
conditioned on *this* solution then commits to a choice the problem does not determine.

Privileged information for OPSD teachers is appended to the user message with ";" so that every
prompt stays inside the task alphabet: ``Q:347+285;A:632`` (answer) or ``Q:347+285;<solution>``.
"""

from __future__ import annotations

import random
import re
from typing import ClassVar

from opd_cli.tasks.base import Row, Task

REVISION_TOKEN = "W;"
MIN_DIGITS, MAX_DIGITS = 1, 8
RULES = (None, "concise", "lsd", "profile", "restate")
PREFERENCES = ("msd", "lsd")  # how the result is presented
# what a per-user profile (rule "profile") may prefer; `profiles` picks the set each row draws from
PROFILE_PREFERENCES = ("msd", "lsd", "restate", "concise")
REFERENCES = ("student", "any")
# characters of the task (and of the pretraining strings)
ALPHABET = "0123456789+=;:AQSW" + "abcdefghijklmnopqrstuvwxyz"

_PROBLEM_RE = re.compile(r"Q:([1-9][0-9]*)\+([1-9][0-9]*)")
_DIGITS_RE = re.compile(r"[0-9]+")
# a response far longer than any well-formed one is rejected before any parsing work
_MAX_WELL_FORMED_CHARS = 2 * (MAX_DIGITS * len("9+9+1=19;") + 8) + 16


# ---- formatting ---------------------------------------------------------------------------------------
def _columns(a: int, b: int) -> list[tuple[int, int, int, int]]:
    """(digit of a, digit of b, carry in, column sum) per column, right to left. a and b must have the
    same number of digits."""
    sa, sb = str(a), str(b)
    if len(sa) != len(sb):
        raise ValueError(f"operands must have the same number of digits: {a}, {b}")
    cols, carry = [], 0
    for da, db in zip(reversed(sa), reversed(sb), strict=True):
        x, y = int(da), int(db)
        s = x + y + carry
        cols.append((x, y, carry, s))
        carry = s // 10
    return cols


def student_steps(a: int, b: int) -> list[str]:
    return [f"{x}+{y}+{c}={s:02d}" for x, y, c, s in _columns(a, b)]


def teacher_steps(a: int, b: int) -> list[str]:
    return [f"{y}+{x}+{c}={s:02d}" for x, y, c, s in _columns(a, b)]


def concise_steps(a: int, b: int) -> list[str]:
    return [f"={s:02d}" for _, _, _, s in _columns(a, b)]


def _join(steps: list[str], answer: int | str) -> str:
    return "".join(f"{s};" for s in steps) + f"A:{answer}"


def present(value: int, preference: str = "msd") -> str:
    """The result as a user with `preference` reads it: `632` (msd) or `236` (lsd)."""
    if preference not in PREFERENCES:
        raise ValueError(f"unknown preference {preference!r}; use one of {list(PREFERENCES)}")
    return str(value) if preference == "msd" else str(value)[::-1]


def computed_lsd(response: str) -> str | None:
    """The result the response's own scratchpad computed, least significant digit first (the ones digit
    of each column sum, then the final carry if it is 1); None without a parseable scratchpad. Steps are
    `a+b+c=dd` or `=dd`; a revision trace counts from its restart after `W;`."""
    i = response.rfind("A:")
    if i < 0 or not response[:i].endswith(";"):
        return None
    steps = response[:i][:-1].split(";")
    if REVISION_TOKEN[:-1] in steps:
        steps = steps[len(steps) - 1 - steps[::-1].index(REVISION_TOKEN[:-1]) + 1 :]
    sums = []
    for step in steps:
        tail = step.rsplit("=", 1)[-1]
        if len(tail) != 2 or not tail.isdigit():
            return None
        sums.append(tail)
    if not sums:
        return None
    return "".join(s[1] for s in sums) + ("1" if sums[-1][0] == "1" else "")


def follows_lsd(row: Row, response: str) -> bool:
    """The "lsd" preference checker (presentation only): the answer is the response's own scratchpad
    result written least significant digit first. Whether the sums are right is `correct`'s business."""
    lsd = computed_lsd(response) if isinstance(response, str) else None
    return lsd is not None and extract_answer(response) == lsd


def restatement(row: Row) -> str:
    """What a response under P:restate opens with: `Q:347+285;`."""
    parsed = parse_problem(row.get("problem", ""))
    return "" if parsed is None else f"{format_problem(*parsed)};"


def follows_restate(row: Row, response: str) -> bool:
    """The "restate" preference checker: the response opens with the problem restated."""
    prefix = restatement(row)
    return bool(prefix) and isinstance(response, str) and response.startswith(prefix)


def _usual(checker):
    """`checker`, and the response is in the usual style: not restated, not concise."""

    def follows(row: Row, response: str) -> bool:
        return (
            checker(row, response)
            and not follows_restate(row, response)
            and not follows_concise(row, response)
        )

    follows.__doc__ = f"{checker.__doc__} The response is neither restated nor concise."
    return follows


def follows_msd(row: Row, response: str) -> bool:
    """The "msd" preference checker: the scratchpad's own result in the usual order."""
    lsd = computed_lsd(response) if isinstance(response, str) else None
    return lsd is not None and extract_answer(response) == lsd[::-1]


def format_problem(a: int, b: int) -> str:
    return f"Q:{a}+{b}"


def format_student_solution(a: int, b: int) -> str:
    """`7+5+0=12;4+8+1=13;3+2+1=06;A:632` for 347+285."""
    return _join(student_steps(a, b), a + b)


def format_concise_solution(a: int, b: int) -> str:
    """`=12;=13;=06;A:632` for 347+285."""
    return _join(concise_steps(a, b), a + b)


def format_teacher_solution(a: int, b: int, revise_after: int = 0) -> str:
    """Teacher style (operands swapped); with `revise_after` = k >= 1, k student-style steps, `W;`, then
    the full teacher-style scratchpad."""
    steps = teacher_steps(a, b)
    if revise_after:
        if not 1 <= revise_after <= len(steps):
            raise ValueError(f"revise_after must be in 1..{len(steps)}, got {revise_after}")
        prefix = "".join(f"{s};" for s in student_steps(a, b)[:revise_after])
        return prefix + REVISION_TOKEN + _join(steps, a + b)
    return _join(steps, a + b)


def parse_problem(problem: str) -> tuple[int, int] | None:
    """(a, b) from `Q:a+b` (same number of digits, no leading zeros); None if it is not a problem."""
    if not isinstance(problem, str):
        return None
    m = _PROBLEM_RE.fullmatch(problem)
    if m is None or len(m.group(1)) != len(m.group(2)):
        return None
    return int(m.group(1)), int(m.group(2))


def teacher_style_solution(row: Row, rng: random.Random, revise_prob: float) -> str:
    """A valid solution in the teacher's style. With probability `revise_prob` the trace first writes
    k ~ U{1..digits} student-style steps, then `W;`, then restarts in the teacher style. `rng` is only
    drawn from when `revise_prob > 0`."""
    parsed = parse_problem(row["problem"])
    if parsed is None:
        raise ValueError(f"not an arith problem: {row.get('problem')!r}")
    a, b = parsed
    k = 0
    if revise_prob > 0 and rng.random() < revise_prob:
        k = rng.randint(1, len(str(a)))
    return format_teacher_solution(a, b, revise_after=k)


# ---- grammar checks -----------------------------------------------------------------------------------
def extract_answer(response: str) -> str | None:
    """The text after the LAST `A:` if it is a non-empty run of ASCII digits, else None."""
    i = response.rfind("A:")
    if i < 0:
        return None
    tail = response[i + 2 :]
    return tail if _DIGITS_RE.fullmatch(tail) else None


def well_formed(a: int, b: int, response: str, preference: str = "msd") -> bool:
    """True iff `response` is exactly one of: the student scratchpad, the concise scratchpad, the
    teacher scratchpad, or a revision trace (k in 1..digits student steps, `W;`, teacher scratchpad) —
    every step must be the arithmetically consistent one for this problem (column digits and carry
    chain) — followed by `A:` and an integer without leading zeros of digits or digits+1 digits. The
    answer's *value* is graded by `correct`, not here."""
    if len(response) > _MAX_WELL_FORMED_CHARS:
        return False
    i = response.rfind("A:")
    if i < 0:
        return False
    body, ans = response[:i], response[i + 2 :]
    digits = len(str(a))
    if preference == "lsd":  # the presented digits read backwards are the integer
        ans = ans[::-1]
    if not (_DIGITS_RE.fullmatch(ans) and ans[0] != "0" and len(ans) in (digits, digits + 1)):
        return False
    if not body.endswith(";"):
        return False
    parts = body[:-1].split(";")
    student, teacher = student_steps(a, b), teacher_steps(a, b)
    if parts in (student, concise_steps(a, b), teacher):
        return True
    # revision trace: student[:k] + ["W"] + teacher
    if len(parts) > digits + 1 and parts[-digits:] == teacher:
        k = len(parts) - digits - 1
        if 1 <= k <= digits and parts[k] == REVISION_TOKEN[:-1] and parts[:k] == student[:k]:
            return True
    return False


def follows_concise(row: Row, response: str) -> bool:
    """The "concise" rule checker (format only): the response is exactly `digits` steps `=dd;` (two ASCII
    digits after `=`), then `A:` and one or more ASCII digits, and nothing else (no `a+b+c=` expressions,
    no `W;`). Whether the digits are the right sums or the answer is right is not checked (that is
    `well_formed` / `correct`). `digits` is the operand length of row["problem"] (falls back to
    row["digits"])."""
    parsed = parse_problem(row.get("problem", ""))
    digits = len(str(parsed[0])) if parsed else int(row.get("digits", 0) or 0)
    if digits < 1 or not isinstance(response, str) or len(response) > 5 * digits + 16:
        return False
    return re.fullmatch(rf"(?:=[0-9]{{2}};){{{digits}}}A:[0-9]+", response) is not None


# ---- pretraining strings --------------------------------------------------------------------------------
_UNIGRAM = "0123456789" * 5 + "+=;" * 4 + ":" * 2 + "AQSW" + "abcdefghijklmnopqrstuvwxyz"
_FRAGMENTS = ["+", "=", ";", ":", "A:", "Q:", "S:", "W;", "+0", "+1"]


def _task_like(s: str) -> bool:
    return re.search(r"A:[0-9]+\Z", s) is not None or _PROBLEM_RE.fullmatch(s) is not None


def domain_pretraining_strings(n: int, rng: random.Random, max_len: int) -> list[str]:
    """`n` strings of raw task-domain text, like a worked-examples page a Base LM has read: a sum of two
    1-3 digit operands followed by its columns, right to left (`347+285=632 7+5+0=12 4+8+1=13 3+2+1=06`),
    or a run of single column facts (`7+5+1=13 4+0+0=04`); at most `max_len` characters. Never the
    response format (no `A:`, `Q:` or `;`): a model pretrained on them has the latent skill but does not
    answer the task's prompts."""
    out = []
    for _ in range(n):
        if rng.random() < 0.7:
            d = rng.randint(1, 3)
            x, y = rng.randint(10 ** (d - 1), 10**d - 1), rng.randint(10 ** (d - 1), 10**d - 1)
            text = " ".join([f"{x}+{y}={x + y}", *student_steps(x, y)])
        else:
            facts = []
            while sum(len(f) + 1 for f in facts) < max_len:
                a, b, c = rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 1)
                facts.append(f"{a}+{b}+{c}={a + b + c:02d}")
            text = " ".join(facts)
        out.append(text[:max_len].rstrip())
    return out


def random_pretraining_strings(n: int, rng: random.Random, max_len: int) -> list[str]:
    """`n` strings over the task alphabet (digits, `+=;:AQSW`, lowercase letters) that are NOT in the
    task format, to pretrain a base model that knows the vocabulary but not the task. Half are i.i.d.
    characters with a digit-heavy unigram distribution, half are random concatenations of digit runs,
    operator fragments and lowercase "words" (so local statistics resemble the task). Lengths are
    uniform in 1..max_len. A string ending in `A:<digits>` (the only way to be well formed or to yield
    an answer) or equal to a problem is resampled."""
    if max_len < 1:
        raise ValueError("max_len must be >= 1")
    out: list[str] = []
    while len(out) < n:
        length = rng.randint(1, max_len)
        if rng.random() < 0.5:
            s = "".join(rng.choice(_UNIGRAM) for _ in range(length))
        else:
            pieces: list[str] = []
            total = 0
            while total < length:
                r = rng.random()
                if r < 0.45:
                    p = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 3)))
                elif r < 0.8:
                    p = rng.choice(_FRAGMENTS)
                else:
                    p = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 6)))
                pieces.append(p)
                total += len(p)
            s = "".join(pieces)[:length]
        if not _task_like(s):
            out.append(s)
    return out


# ---- the task -----------------------------------------------------------------------------------------
class ArithTask(Task):
    """Options: digits (1..8, default 3), rule (None, "concise", "lsd", "profile" or "restate"), reference ("student"
    or "any": how a row's reference `solution` is chosen), teacher_revise_prob (probability that a row's
    `solution_teacher` is a revision trace; default 0), profiles (rule "profile": the preferences a row's
    user draws from, two or more of msd, lsd, restate, concise; default msd, lsd).

    A profile that includes ``restate`` or ``concise`` grades each user by exactly the response they
    prefer: the restated one for a ``restate`` user, the concise scratchpad for a ``concise`` user (the
    system line S:concise), the usual full, unrestated one for an msd or lsd user (a style nobody asked
    for is not what that user prefers), so no single PI-free response satisfies every kind of user."""

    name: ClassVar[str] = "arith"
    system_prompts: ClassVar[dict[str, str]] = {
        "concise": "S:concise",
        "lsd": "P:lsd",
        "msd": "P:msd",
        "restate": "P:restate",
    }
    hedging_tokens: ClassVar[list[str]] = [REVISION_TOKEN]
    extra_user_separator: ClassVar[str] = ";"

    def __init__(
        self,
        digits: int = 3,
        rule: str | None = None,
        teacher_revise_prob: float = 0.0,
        reference: str = "student",
        profiles: tuple[str, ...] | list[str] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(digits, bool) or not isinstance(digits, int) or not MIN_DIGITS <= digits <= MAX_DIGITS:
            raise ValueError(
                f"arith: digits must be an integer in {MIN_DIGITS}..{MAX_DIGITS}, got {digits!r}"
            )
        if rule not in RULES:
            raise ValueError(f"arith: rule must be one of {list(RULES)}, got {rule!r}")
        if not 0.0 <= float(teacher_revise_prob) <= 1.0:
            raise ValueError(f"arith: teacher_revise_prob must be in [0, 1], got {teacher_revise_prob!r}")
        if reference not in REFERENCES:
            raise ValueError(f"arith: reference must be one of {list(REFERENCES)}, got {reference!r}")
        if profiles is not None and rule != "profile":
            raise ValueError(
                f"arith: profiles={list(profiles)!r} only applies to rule 'profile' (got rule {rule!r}); "
                "set task.rule=profile or drop task.profiles"
            )
        profiles = PREFERENCES if profiles is None else tuple(profiles)
        if (
            len(profiles) < 2
            or len(set(profiles)) != len(profiles)
            or any(p not in PROFILE_PREFERENCES for p in profiles)
        ):
            raise ValueError(
                f"arith: profiles must be two or more distinct preferences of {list(PROFILE_PREFERENCES)},"
                f" got {list(profiles)!r}"
            )
        self.digits = digits
        self.rule = rule
        self.profiles = profiles
        self.reference = reference
        self.teacher_revise_prob = float(teacher_revise_prob)
        self.rules = {
            "concise": follows_concise,
            "lsd": follows_lsd,
            "msd": follows_msd,
            "restate": follows_restate,
        }
        # each user gets exactly the response they prefer (class doc)
        self.strict_profile = rule == "profile" and bool({"restate", "concise"} & set(profiles))
        if self.strict_profile:
            for name in ("msd", "lsd"):
                self.rules[name] = _usual(self.rules[name])

    def make_row(
        self,
        a: int,
        b: int,
        rng: random.Random | None = None,
        preference: str | None = None,
        reference_style: int = 0,
    ) -> Row:
        """One row; `preference` (msd | lsd | restate | concise) is the row's presentation (default: the
        rule's, msd without one); `reference_style` picks `solution` among (student, operand-swapped,
        concise) when the task's reference is "any"."""
        if preference is None:
            preference = "lsd" if self.rule == "lsd" else "msd"
        problem = format_problem(a, b)
        answer = present(a + b, "lsd" if preference == "lsd" else "msd")
        student = _join(student_steps(a, b), answer)
        concise = _join(concise_steps(a, b), answer)
        teacher = teacher_style_solution(
            {"problem": problem}, rng or random.Random(0), self.teacher_revise_prob
        )
        teacher = teacher[: teacher.rfind("A:") + 2] + answer
        if self.rule == "concise" or preference == "concise":
            reference = concise
        elif self.reference == "any":
            reference = (student, _join(teacher_steps(a, b), answer), concise)[reference_style]
        else:
            reference = student
        system_prompt = self.rule or ""
        if self.rule in ("lsd", "profile"):
            system_prompt = preference
        if self.rule == "restate" or preference == "restate":
            reference = restatement({"problem": problem}) + reference
        return {
            "problem": problem,
            "answer": answer,
            "solution": reference,
            "system_prompt": system_prompt,
            "task": self.name,
            "digits": len(str(a)),
            "a": a,
            "b": b,
            "solution_student": student,
            "solution_concise": concise,
            "solution_teacher": teacher,
            "hint": answer,
        }

    def generate(self, n: int, seed: int) -> list[Row]:
        """`n` rows, operands uniform over `digits`-digit integers (leading digit nonzero); deterministic in
        `seed`. Duplicates are possible (only 81 pairs exist for 1 digit)."""
        rng = random.Random(seed)
        # revision, profile and reference-style draws come from their own streams, so that no option
        # changes the operands (every variant of the task poses the same problems)
        teacher_rng = random.Random(f"arith-teacher-{seed}")
        profile_rng = random.Random(f"arith-profile-{seed}")
        style_rng = random.Random(f"arith-reference-{seed}")
        lo, hi = 10 ** (self.digits - 1), 10**self.digits - 1
        rows = []
        for _ in range(n):
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            preference = profile_rng.choice(self.profiles) if self.rule == "profile" else None
            style = style_rng.randrange(3) if self.reference == "any" else 0
            rows.append(self.make_row(a, b, teacher_rng, preference=preference, reference_style=style))
        return rows

    def privileged_info(self, row: Row, kind: str) -> str:
        if kind in ("answer", "hint"):
            return f"A:{row.get('answer', '')}"
        if kind == "solution":
            return str(row.get("solution", ""))
        raise ValueError(f"unknown privileged information kind {kind!r}; use 'answer', 'hint' or 'solution'")

    def alternative_pis(self, row: Row, field: str) -> list[str]:
        """For `solution`: the other well-formed scratchpads of the problem (student, concise and
        operand-swapped teacher style) that differ from the row's reference; for a per-row preference
        profile (`system_prompt` under rule "profile"): the other preferences. Nothing else has one."""
        if field == "system_prompt" and self.rule == "profile":  # the other users' preferences
            return [p for p in self.profiles if p != row.get("system_prompt")]
        parsed = parse_problem(row.get("problem", ""))
        if field != "solution" or parsed is None:
            return []
        a, b = parsed
        answer = str(row.get("answer", a + b))
        styles = [_join(f(a, b), answer) for f in (student_steps, concise_steps, teacher_steps)]
        return [s for s in styles if s != row.get("solution")]

    def check(self, row: Row, response: str) -> tuple[bool, bool, str | None]:
        answer = extract_answer(response)
        correct = answer is not None and answer == str(row.get("answer", ""))
        parsed = parse_problem(row.get("problem", ""))
        preference = "lsd" if row.get("system_prompt") == "lsd" else "msd"
        body = response
        if row.get("system_prompt") == "restate" and follows_restate(row, response):
            body = response[len(restatement(row)) :]
        wf = parsed is not None and well_formed(parsed[0], parsed[1], body, preference)
        if self.strict_profile:  # the right value, presented as exactly this user prefers
            correct = correct and bool(self.follows_rule(row, response))
        return correct, wf, answer
