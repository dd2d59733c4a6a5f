"""Task protocol: rows, verdicts and the small class every task implements (nanochat style).

A dataset *row* is a plain ``dict`` (so Hugging Face ``datasets`` can store it) with at least

- ``problem``: the user message (without any instruction the task appends),
- ``answer``: the canonical final answer string,
- ``solution``: a full reference response,
- ``system_prompt``: ``""`` when none; otherwise either the *name* of one of the task's rules
  (``"concise"``; the task renders it with :meth:`Task.system_text`) or a literal system prompt,

plus task-specific fields. A task turns rows into chat messages, grades responses (:class:`Verdict`)
and owns the rule checkers used to measure whether a system-prompt rule was internalized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

Row = dict[str, Any]
RuleChecker = Callable[[Row, str], bool]


@dataclass(frozen=True)
class Verdict:
    """The grade of one response.

    correct: the extracted answer matches the row's answer.
    well_formed: the response follows the task's expected format (see each task).
    follows_rule: whether the response obeys the row's system-prompt rule; None when the row has no
        rule the task can check.
    answer: the extracted final answer, None when none could be extracted.
    """

    correct: bool
    well_formed: bool
    follows_rule: bool | None
    answer: str | None


class Task:
    """Base class. Subclasses set ``name``, ``rules``, ``hedging_tokens`` and implement
    :meth:`generate`, :meth:`check` (and optionally :meth:`user_text` / :meth:`system_text`)."""

    name: ClassVar[str] = "task"
    # rule name -> literal system prompt text (what the model sees); rows store the rule name.
    system_prompts: ClassVar[dict[str, str]] = {}
    # strings whose frequency in responses is a diagnostic (revision / hedging tokens).
    hedging_tokens: ClassVar[list[str]] = []
    # how `extra_user` (privileged information) is joined to the user message.
    extra_user_separator: ClassVar[str] = "\n\n"

    def __init__(self) -> None:
        self.rules: dict[str, RuleChecker] = {}

    # ---- data -----------------------------------------------------------------------------------
    def generate(self, n: int, seed: int) -> list[Row]:
        raise NotImplementedError

    # ---- prompting ------------------------------------------------------------------------------
    def user_text(self, row: Row) -> str:
        return str(row.get("problem", ""))

    def system_text(self, row: Row) -> str:
        """The system prompt the model sees: a rule name is rendered, anything else is verbatim."""
        sp = row.get("system_prompt") or ""
        return self.system_prompts.get(sp, sp)

    def messages(
        self, row: Row, *, system_prompt: bool = True, extra_user: str | None = None
    ) -> list[dict[str, str]]:
        """Chat messages for `row` (no assistant turn). The system message is included only when the
        row has a non-empty system prompt and `system_prompt` is True; `extra_user` (e.g. privileged
        information for an OPSD teacher) is appended to the user message."""
        msgs: list[dict[str, str]] = []
        system = self.system_text(row)
        if system_prompt and system:
            msgs.append({"role": "system", "content": system})
        user = self.user_text(row)
        if extra_user:
            user = f"{user}{self.extra_user_separator}{extra_user}"
        msgs.append({"role": "user", "content": user})
        return msgs

    def privileged_info(self, row: Row, kind: str) -> str:
        """Text for `extra_user` carrying privileged information: kind is "answer" (alias "hint") or
        "solution"."""
        if kind in ("answer", "hint"):
            return f"Reference answer: {row.get('answer', '')}"
        if kind == "solution":
            return f"Reference solution:\n{row.get('solution', '')}"
        raise ValueError(f"unknown privileged information kind {kind!r}; use 'answer', 'hint' or 'solution'")

    def alternative_pis(self, row: Row, field: str) -> list[str]:
        """Other valid values of the privileged-information field `field` for this row's problem (another
        correct solution of the same problem, ...), for the PI-dependence probe; [] when the task knows
        none (a final answer is unique)."""
        return []

    # ---- grading --------------------------------------------------------------------------------
    def check(self, row: Row, response: str) -> tuple[bool, bool, str | None]:
        """(correct, well_formed, extracted answer). Must never raise on any string."""
        raise NotImplementedError

    def follows_rule(self, row: Row, response: str) -> bool | None:
        checker = self.rules.get(row.get("system_prompt") or "")
        if checker is None:
            return None
        try:
            return bool(checker(row, response))
        except Exception:  # a rule checker must not take an evaluation down
            return False

    def verify(self, row: Row, response: str) -> Verdict:
        if not isinstance(response, str):
            response = "" if response is None else str(response)
        try:
            correct, well_formed, answer = self.check(row, response)
        except Exception:  # defensive: verification never raises
            correct, well_formed, answer = False, False, None
        return Verdict(
            correct=bool(correct),
            well_formed=bool(well_formed),
            follows_rule=self.follows_rule(row, response),
            answer=answer,
        )

    def reward(self, row: Row, response: str) -> float:
        return 1.0 if self.verify(row, response).correct else 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
