"""Why the per-user profile cell (opsd_profile_pi) does or does not move: two measurements on a testbed.

    python scripts/profile_support.py [TESTBED_DIR]      # default: the shipped assets; ~5 s

On the student's own response to a profile prompt (full scratchpad, result msd-first, `A:d1d2d3`, for the
3-digit results whose first and last digits differ):
- the student's support for the other presentation: p(d3) at the first result digit (lsd-first) and p(d1)
  at the third, after `A:d1d2` (the mixture `d1d2d1` that the PI-free average of the two teachers holds);
- what the P:lsd teacher does there: p(d3) at the first digit; at the third, after the student's msd start
  `A:d1d2`, p(d3) (it follows the student's choice) against p(d1) (it keeps lsd order by position).
The PI-free optimum q_bar mixes the two orders position by position when the teacher keeps its order, so
the average would be wrong for both users; reverse KL moves a token at a rate proportional to the student's
own probability of it, so it gets there only where the student gives that mixture some mass.
"""

from __future__ import annotations

import sys

import torch

from opd_cli.batching import pack, response_hidden_and_logits
from opd_cli.stages.sft import prompt_ids
from opd_cli.tasks import make_task
from opd_cli.tasks.arith import _join, student_steps
from opd_cli.testbed.builders import char_tokenizer, load, opsd_messages
from opd_cli.testbed.paths import testbed_dir


def response_probs(model, tok, messages, response: str) -> tuple[torch.Tensor, int]:
    """Per-position next-token probabilities over `response`, and the index of its first result digit."""
    ids = tok(response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        _, logits = response_hidden_and_logits(model, pack([prompt_ids(tok, messages)], [ids], 0))
    start = len(tok(response[: response.rfind("A:") + 2], add_special_tokens=False)["input_ids"])
    return logits[0].float().softmax(-1), start


def result(row: dict) -> str:
    """The row's sum as the student presents it (msd first)."""
    return str(row["a"] + row["b"])


def main(argv: list[str]) -> int:
    directory = testbed_dir(argv[0] if argv else None)
    model, tok = load(directory / "opsd_base"), char_tokenizer()
    task = make_task("arith", digits=3, rule="profile")
    rows = [r for r in task.generate(400, 12345) if len(result(r)) == 3 and result(r)[0] != result(r)[2]][
        :200
    ]
    tid = tok.convert_tokens_to_ids
    figures: dict[str, list[float]] = {
        k: [] for k in ("s_first", "s_third", "t_first", "t_follows", "t_keeps")
    }
    for r in rows:
        d1, _, d3 = result(r)
        response = _join(student_steps(r["a"], r["b"]), result(r))
        p, i = response_probs(model, tok, opsd_messages(task, r, "plain"), response)
        figures["s_first"].append(float(p[i, tid(d3)]))
        figures["s_third"].append(float(p[i + 2, tid(d1)]))
        t, i = response_probs(
            model, tok, opsd_messages(task, {**r, "system_prompt": "lsd"}, "preference"), response
        )
        figures["t_first"].append(float(t[i, tid(d3)]))
        figures["t_follows"].append(float(t[i + 2, tid(d3)]))
        figures["t_keeps"].append(float(t[i + 2, tid(d1)]))
    m = {k: sum(v) / len(v) for k, v in figures.items()}
    print(f"testbed {directory} ({len(rows)} profile prompts, the student's msd response)")
    print(
        f"  student: p(lsd first digit) {m['s_first']:.4f}; p(d1 as the third digit after A:d1d2) {m['s_third']:.4f}"
    )
    print(
        f"  P:lsd teacher: p(lsd first digit) {m['t_first']:.3f}; after the student's A:d1d2, "
        f"p(d3: follows the student) {m['t_follows']:.3f}, p(d1: keeps lsd by position) {m['t_keeps']:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
