"""`math`: real math datasets (DAPO-Math-17k, MATH500, AIME, ...) graded with math-verify.

Rows come from a dataset through :func:`opd_cli.data.load_rows` (field mapping: problem, answer,
optional solution). The user message is the problem followed by the instruction
"Please reason step by step, and put your final answer within \\boxed{}." (configurable).

Grading: the model's LAST ``\\boxed{...}`` (balanced braces) is parsed and compared with the gold
answer by math-verify (`parse` + `verify`). ``well_formed`` iff a boxed answer exists.

Threads: math-verify enforces its timeouts with ``signal.alarm``, which only works in the main
thread. We pass ``parsing_timeout`` / ``timeout_seconds`` only when called from the main thread and
``None`` (no timeout) elsewhere, so verification works in any thread; to bound the time spent off the
main thread, inputs longer than ``max_answer_chars`` are rejected before parsing.
"""

from __future__ import annotations

import logging
import random
import re
import threading
from typing import Any, ClassVar

from opd_cli.data import DataError, load_rows
from opd_cli.tasks.base import Row, Task

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CONCISE_SYSTEM_PROMPT = (
    "Be concise. Reason briefly, skip unnecessary steps and explanations, and put your final answer "
    "within \\boxed{}."
)
HEDGING_TOKENS = ["wait", "but", "maybe", "Wait", "But", "Maybe"]

# math-verify logs a warning when timeouts are disabled; we do that deliberately off the main thread.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces; None if there is none
    or it is unterminated."""
    if not isinstance(text, str):
        return None
    best = None
    for marker in ("\\boxed", "\\fbox"):
        i = text.rfind(marker)
        if i >= 0 and (best is None or i > best[0]):
            best = (i, marker)
    if best is None:
        return None
    j = best[0] + len(best[1])
    while j < len(text) and text[j] == " ":
        j += 1
    if j >= len(text) or text[j] != "{":
        # `\boxed 5` style: a single token after a space
        k = best[0] + len(best[1])
        if k < len(text) and text[k] == " ":
            tok = text[k + 1 :].split("$")[0].split()
            return tok[0] if tok else None
        return None
    depth = 0
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1 : k]
    return None


def _timeouts() -> int | None:
    return 5 if threading.current_thread() is threading.main_thread() else None


def math_equal(gold: str, predicted: str, max_chars: int = 1000) -> bool:
    """Whether `predicted` (the content of a box) equals `gold` according to math-verify. Never raises."""
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    except ImportError as e:  # pragma: no cover - math-verify is a core dependency
        raise ImportError("the math task needs math-verify: pip install 'math-verify>=0.7'") from e
    gold, predicted = str(gold).strip(), str(predicted).strip()
    if not gold or not predicted or len(predicted) > max_chars or len(gold) > max_chars:
        return False
    if gold == predicted:
        return True
    t = _timeouts()
    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    try:
        g = parse(
            gold if "\\boxed" in gold else f"\\boxed{{{gold}}}", extraction_config=configs, parsing_timeout=t
        )
        p = parse(f"\\boxed{{{predicted}}}", extraction_config=configs, parsing_timeout=t)
        if not g or not p:
            return False
        return bool(verify(g, p, timeout_seconds=t))
    except BaseException as e:  # noqa: BLE001 - TimeoutException, sympy recursion, ...
        if isinstance(e, KeyboardInterrupt | SystemExit):
            raise
        return False


def word_count(text: str) -> int:
    return len(text.split())


class MathTask(Task):
    """Options: path (dataset: local file/dir or hub name; needed by `generate`), split, fields (our field
    -> dataset column), instruction, rule (None or "concise"), concise_max_words (the concise rule's
    length threshold), max_answer_chars."""

    name: ClassVar[str] = "math"
    system_prompts: ClassVar[dict[str, str]] = {"concise": CONCISE_SYSTEM_PROMPT}
    hedging_tokens: ClassVar[list[str]] = HEDGING_TOKENS

    def __init__(
        self,
        path: str | None = None,
        split: str = "train",
        fields: dict[str, str] | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        rule: str | None = None,
        concise_max_words: int = 400,
        max_answer_chars: int = 1000,
        problem_regex: str | None = None,
    ) -> None:
        super().__init__()
        try:
            self.problem_regex = re.compile(problem_regex) if problem_regex else None
        except re.error as e:
            raise ValueError(f"math: task.problem_regex is not a valid regex ({e})") from e
        if self.problem_regex is not None and "problem" not in self.problem_regex.groupindex:
            raise ValueError("math: task.problem_regex needs a named group (?P<problem>...)")
        if rule not in (None, "concise"):
            raise ValueError(f"math: rule must be one of [None, 'concise'], got {rule!r}")
        self.path, self.split = path, split
        self.fields = dict(fields) if fields else None
        self.instruction = instruction
        self.rule = rule
        self.concise_max_words = int(concise_max_words)
        self.max_answer_chars = int(max_answer_chars)
        self.rules = {"concise": self._follows_concise}

    def _follows_concise(self, row: Row, response: str) -> bool:
        """Proxy for the conciseness prompt (no model judge): a boxed answer exists and the response has
        at most `concise_max_words` whitespace-separated words."""
        return last_boxed(response) is not None and word_count(response) <= self.concise_max_words

    # ---- data -----------------------------------------------------------------------------------
    def prepare(self, rows: list[dict[str, Any]]) -> list[Row]:
        """Normalize loaded rows: string fields, `hint` = answer, `task`, the rule's system prompt. A
        problem wrapped in a dataset's instructions is cut out by `problem_regex`; an answer column that
        holds a whole solution (OpenThoughts) is reduced to its last \\boxed{...}."""
        out = []
        for r in rows:
            row = dict(r)
            for key in ("problem", "answer", "solution", "system_prompt"):
                v = row.get(key)
                row[key] = "" if v is None else str(v)
            if self.problem_regex is not None:
                m = self.problem_regex.search(row["problem"])
                if m and m.group("problem").strip():
                    row["problem"] = m.group("problem").strip()
            if "\\boxed" in row["answer"] or "\\fbox" in row["answer"]:
                row["answer"] = last_boxed(row["answer"]) or row["answer"]
            if self.rule:
                row["system_prompt"] = self.rule
            row.setdefault("hint", row["answer"])
            row["task"] = self.name
            out.append(row)
        return out

    def load(self, limit: int | None = None) -> list[Row]:
        if not self.path:
            raise DataError(
                "the math task has no dataset; set task.path to a local file/directory or a hub dataset name"
            )
        return self.prepare(load_rows(self.path, split=self.split, fields=self.fields, limit=limit))

    def generate(self, n: int, seed: int) -> list[Row]:
        """`n` rows sampled without replacement from the dataset at `path` (all of them if it has fewer),
        deterministic in `seed`."""
        rows = self.load()
        idx = list(range(len(rows)))
        random.Random(seed).shuffle(idx)
        return [rows[i] for i in idx[:n]]

    # ---- prompting & grading ------------------------------------------------------------------------
    def user_text(self, row: Row) -> str:
        problem = str(row.get("problem", ""))
        return f"{problem}\n\n{self.instruction}" if self.instruction else problem

    def check(self, row: Row, response: str) -> tuple[bool, bool, str | None]:
        boxed = last_boxed(response)
        if boxed is None:
            return False, False, None
        correct = math_equal(str(row.get("answer", "")), boxed, self.max_answer_chars)
        return correct, True, boxed
