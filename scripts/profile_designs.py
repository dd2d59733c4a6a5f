"""What the PI-free optimum writes for a per-user profile: greedy decoding of q_bar, graded per user.

    python scripts/profile_designs.py [TESTBED_DIR] [-n 60]      # ~4 min on 2 cores for the six designs

OPSD's optimum for a student that never sees the PI is q_bar(.|x, y<t), the normalized geometric mean of
the PI-conditioned teachers (../../shared/PAPER.md, mechanism 3). For a profile (`task.profiles`, drawn per
row) the teachers are opsd_base under each preference's system line. This script decodes q_bar greedily,
token by token (log q_bar = the mean of the teachers' log-probabilities, renormalized), on `n` profile
rows and grades the response by the row's own user (tasks/arith.py: with restate or concise in the
profile, each user is graded by exactly the response they prefer). It also prints each teacher's
next-token choice on the other styles' prefixes, which decides whether q_bar commits to one style (the
teachers follow a prefix they did not start: q_bar serves one kind of user) or mixes styles position by
position (the teachers keep their own: q_bar is wrong for every user).

Compare q_bar's accuracy with the student's own (its PI-free greedy response, printed too): the gap is
what OPSD would lose at its optimum. Whether the student gets there is another matter (reverse KL moves a
token at a rate proportional to the student's own probability of it: experiments/testbed.md).
"""

from __future__ import annotations

import argparse

import torch

from opd_cli.batching import pack, response_hidden_and_logits
from opd_cli.stages.sft import prompt_ids
from opd_cli.tasks import make_task
from opd_cli.tasks.arith import concise_steps, restatement, student_steps
from opd_cli.testbed.builders import char_tokenizer, load
from opd_cli.testbed.paths import testbed_dir

DESIGNS = (
    ("msd", "lsd"),
    ("msd", "restate"),
    ("msd", "concise"),
    ("msd", "concise", "restate"),
    ("msd", "lsd", "restate"),
    ("msd", "lsd", "concise"),
)
MAX_TOKENS = 60


def next_logprobs(model, tok, prompts: list[list[int]], response: list[int]) -> torch.Tensor:
    """[len(prompts), vocab] next-token log-probabilities after `response` under each prompt."""
    with torch.no_grad():
        _, logits = response_hidden_and_logits(
            model, pack(prompts, [response + [tok.eos_token_id]] * len(prompts), 0)
        )
    return logits[:, len(response)].float().log_softmax(-1)


def greedy(model, tok, prompts: list[list[int]]) -> str:
    """Greedy decoding of the normalized geometric mean of the next-token distributions under `prompts`
    (one prompt: that model's own greedy response)."""
    response: list[int] = []
    for _ in range(MAX_TOKENS):
        t = int(next_logprobs(model, tok, prompts, response).mean(0).argmax())
        if t == tok.eos_token_id:
            break
        response.append(t)
    return tok.decode(response)


def cross_prefixes(model, tok, task, rows) -> None:
    """Each teacher's probability of continuing in its own style on the other styles' prefixes."""
    tid = tok.convert_tokens_to_ids
    figures: dict[str, list[float]] = {}
    for r in rows:
        full, short = student_steps(r["a"], r["b"]), concise_steps(r["a"], r["b"])
        prefixes = {
            "after one concise step": (tok(short[0] + ";", add_special_tokens=False)["input_ids"], full[1][0]),
            "after one full step": (tok(full[0] + ";", add_special_tokens=False)["input_ids"], full[1][0]),
            "after the restatement": (tok(restatement(r), add_special_tokens=False)["input_ids"], full[0][0]),
        }
        for pref in ("msd", "concise", "restate"):
            prompt = prompt_ids(tok, task.messages({**r, "system_prompt": pref}, system_prompt=True))
            for name, (ids, digit) in prefixes.items():
                p = next_logprobs(model, tok, [prompt], ids)[0].exp()
                figures.setdefault(f"{pref:8s} {name}: p(full step)", []).append(float(p[tid(digit)]))
                figures.setdefault(f"{pref:8s} {name}: p(concise step)", []).append(float(p[tid("=")]))
    for k, v in figures.items():
        print(f"  {k:50s} {sum(v) / len(v):.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("testbed", nargs="?", default=None)
    ap.add_argument("-n", type=int, default=60)
    args = ap.parse_args()
    directory = testbed_dir(args.testbed)
    model, tok = load(directory / "opsd_base"), char_tokenizer()
    print(f"testbed {directory}, {args.n} profile rows per design (seed 4242)")
    print("each teacher on the other styles' prefixes (100 rows):")
    cross_prefixes(model, tok, make_task("arith", digits=3, rule="profile"), make_task("arith").generate(100, 777))
    for prefs in DESIGNS:
        task = make_task("arith", digits=3, rule="profile", profiles=list(prefs))
        rows = task.generate(args.n, 4242)
        q_bar = student = 0
        for r in rows:
            teachers = [
                prompt_ids(tok, task.messages({**r, "system_prompt": p}, system_prompt=True)) for p in prefs
            ]
            q_bar += task.verify(r, greedy(model, tok, teachers)).correct
            student += task.verify(r, greedy(model, tok, [prompt_ids(tok, task.messages(r, system_prompt=False))])).correct
        print(
            f"profile {'/'.join(prefs):22s} student (no PI) {student / args.n:.3f}   q_bar {q_bar / args.n:.3f}"
            f"   (q_bar - student {(q_bar - student) / args.n:+.3f})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
