"""`opd probe-pi` (opd_cli/stages/pi_probe.py): the PI-dependence measurement of OPSD teachers, on the shipped
testbed's opsd_base (a second each) and on hand-made log-probs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import opd

from opd_cli import launch
from opd_cli.stages.pi_probe import alignment_error, geometric_mean, per_token_kl, pi_dependence


@pytest.fixture(scope="module")
def probes() -> dict[str, dict]:
    """The testbed OPSD cells with different PI kinds, 16 rollouts x 2 I' samples each."""
    out = {}
    for cell in (
        "opsd_answer_pi",
        "opsd_solution_pi",
        "opsd_system_rule",
        "opsd_shared_preference",
        "opsd_profile_pi",
    ):
        cfg = launch.compose([f"experiment={cell}", "logger=none"])
        out[cell] = pi_dependence(cfg, n=16, seed=0, samples=2)
    return out


def test_a_shared_rule_gives_no_gap_and_the_no_pi_gap_is_the_rule(probes):
    r = probes["opsd_system_rule"]
    assert r["shared"] and r["pi_kind"] == "shared rule"
    assert r["student_pi_same_as_reference"] == 1.0 and r["marginal_same_as_reference"] == 1.0
    # I' = I: the same teacher prompt scored in one batch, so the KL is 0 up to the float32 round-off of
    # identical rows (0 here); q_bar of identical log-probs differs only by the renormalization of float32
    # log-softmax outputs (a shift of ~1e-7 per position), hence 1e-5
    assert r["kl"]["student"]["mean"] < 1e-6 and r["kl"]["marginal"]["mean"] < 1e-6
    assert r["kl"]["student_bar"]["mean"] < 1e-5
    # what the student sees (no system line) differs from the rule-teacher: the rule is the signal
    assert r["kl"]["none"]["mean"] > 0.1


def test_a_shared_preference_has_no_gap_and_a_profile_does(probes):
    shared, profile = probes["opsd_shared_preference"], probes["opsd_profile_pi"]
    assert shared["pi_kind"] == "shared rule" and shared["gap_to_student_optimum"] < 1e-5
    assert shared["kl"]["none"]["mean"] > 0.1
    # a per-user profile the student cannot write: its optimum is the geometric mean over the profiles
    assert profile["pi_kind"] == "instance-specific" and profile["kl"]["student_bar"] is None
    assert profile["gap_to_student_optimum_over"] == "the valid PIs"
    assert profile["gap_to_student_optimum"] == profile["kl"]["valid_bar"]["mean"] > 0.01
    assert profile["valid_alternatives_per_prompt"] == 1  # msd <-> lsd


def test_solution_references_in_any_style_leave_a_gap(probes):
    r = probes["opsd_solution_pi"]
    assert r["gap_to_student_optimum_over"] == "the student's own"
    assert r["kl"]["valid_bar"]["mean"] > 0.1 and r["gap_to_student_optimum"] > 0.1


def test_an_answer_that_differs_gives_a_finite_positive_gap(probes):
    r = probes["opsd_answer_pi"]
    assert not r["shared"] and r["pi_kind"] == "answer"
    marginal = r["kl"]["marginal"]
    assert 0 < marginal["mean"] < math.inf and r["marginal_same_as_reference"] < 1
    assert marginal["ci95"][0] <= marginal["mean"] <= marginal["ci95"][1]
    if r["kl"]["student_differs"] is not None:  # some of the student's own answers are wrong
        assert 0 < r["kl"]["student_differs"]["mean"] < math.inf
    assert r["valid_alternatives_per_prompt"] == 0  # an answer is unique
    assert probes["opsd_solution_pi"]["valid_alternatives_per_prompt"] == 2  # concise + operand-swapped


def test_the_probe_scores_the_positions_the_loss_uses(probes):
    # the student's prompt, scored through teachers.Teacher.score, reproduces the rollout engine's own
    # log-prob of every response token: float32 forward with and without the KV cache, |log p| <= ~10,
    # a few ulps apart (measured 1.3e-5); a one-position shift moves these by O(1)
    for r in probes.values():
        assert r["alignment_max_abs_logprob_diff"] < 1e-3


def test_alignment_error_catches_a_shifted_position():
    logp = torch.log_softmax(torch.randn(1, 4, 7, generator=torch.Generator().manual_seed(0)), -1)
    ids = [3, 1, 5, 2]
    own = [float(logp[0, t, i]) for t, i in enumerate(ids)]
    assert alignment_error(logp, [ids], [own]) == 0.0
    assert alignment_error(logp, [ids], [own[1:] + own[:1]]) > 0.1


def test_q_bar_is_normalized_and_kl_is_zero_only_on_itself():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    logp = torch.log_softmax(logits, -1)
    # float64: logsumexp of a log_softmax is 0 up to a few ulps of 1 (1e-15)
    assert torch.allclose(
        torch.logsumexp(geometric_mean(logp), -1), torch.zeros(5, dtype=torch.float64), atol=1e-12
    )
    # float32 (what Teacher.score returns and the probe accumulates): ulp 1.2e-7, a few of them
    bar32 = geometric_mean(logp.float())
    assert torch.allclose(torch.logsumexp(bar32, -1), torch.zeros(5), atol=1e-6)
    assert torch.allclose(geometric_mean(logp[:1].expand(4, -1, -1)), logp[0], atol=1e-12)
    assert per_token_kl(logp[0], logp[0]).abs().max() == 0
    assert (per_token_kl(logp[0], logp[1]) > 0).all()
    # the position-chunked KL equals the one-shot formula
    direct = (logp[0].exp() * (logp[0] - logp[1])).sum(-1)
    assert torch.allclose(per_token_kl(logp[0], logp[1], rows=2), direct, atol=1e-12)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["teacher=rlvr", "-n", "4"], "teacher.kind=rlvr is not an OPSD teacher"),
        (["experiment=opsd_answer_pi", "-n", "0"], "-n 0: the PI probe needs at least one prompt"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    out = tmp_path / "pi.json"
    res = opd("probe-pi", *args, "--out", str(out), cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert not out.exists()


def test_arith_alternative_solutions_are_valid_and_differ_from_the_reference():
    from opd_cli.tasks import make_task

    task = make_task("arith", digits=3)
    for row in task.generate(20, seed=3):
        alternatives = task.alternative_pis(row, "solution")
        assert len(alternatives) == 2 and row["solution"] not in alternatives
        for text in alternatives:
            verdict = task.verify(row, text)
            assert verdict.correct and verdict.well_formed
        assert task.alternative_pis(row, "answer") == []


def test_the_answer_where_the_teacher_commits_comes_from_the_student(probes):
    r = probes["opsd_answer_pi"]
    assert 0 < r["direct_available"] <= 1 and 0 <= r["direct_same_as_reference"] <= 1
    assert r["kl"]["direct"]["prompts"] >= 1 and r["gap_where_teacher_commits"] is not None
    assert probes["opsd_solution_pi"]["direct_available"] is None  # only an answer PI has one


def test_the_teacher_prefix_is_cut_right_before_its_answer():
    from opd_cli.stages.pi_probe import prefix_before
    from opd_cli.testbed.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    for text in ("A:632", "7+5+0=12;4+8+1=13;3+2+1=06;A:632"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        cut = prefix_before(tok, ids, text.rfind("632"))
        assert tok.decode(ids[:cut]) == text[: text.rfind("632")]


@pytest.mark.numerics
def test_geometric_mean_decoding_in_batches_matches_recomputing_each_prompt(tiny_model_dir):
    """decode_geometric_means left-pads groups of prompts into batches with one KV cache each (here 3
    sequences per batch: the groups of 1 and 2 prompts share one, where the second stops early and runs
    on padded beside the first; the group of 3 and the last group run alone); the reference recomputes
    every prompt alone, unpadded, from scratch at every step, on the tokens the decoder chose. The mean log-probs agree to 1e-4: fp32 logits
    of the two paths differ by ~1e-6 (reordered sums over a hidden size of 64, log-probs of size ~5); an
    unmasked pad or a stale cache moves them by > 1e-2. Each chosen token is the argmax of its step's
    mean, and a group ends at its stop token."""
    import contextlib

    from opd_cli.learner import load_model
    from opd_cli.stages.pi_probe import decode_geometric_means

    model = load_model(tiny_model_dir, torch.device("cpu"), trainable=False)
    g = torch.Generator().manual_seed(3)
    groups = [
        [torch.randint(3, 100, (n,), generator=g).tolist() for n in lengths]
        for lengths in ((7,), (5, 9), (4, 11, 6), (8,))
    ]
    first = decode_geometric_means(model, groups, 12, set(), 0, contextlib.nullcontext, 3)
    # a stop token: group 1 ends at its 4th token (or earlier), the others where it first appears
    stop = {first[1][3]}
    scores: list[list[torch.Tensor]] = []
    got = decode_geometric_means(model, groups, 12, stop, 0, contextlib.nullcontext, 3, scores)
    for k, (prompts, tokens, steps) in enumerate(zip(groups, got, scores, strict=True)):
        end = next((t + 1 for t, x in enumerate(first[k]) if x in stop), 12)
        assert tokens == first[k][:end] and len(steps) == end, k
        for t, score in enumerate(steps):
            with torch.no_grad():
                ref = torch.stack(
                    [model(torch.tensor([p + tokens[:t]])).logits[0, -1].log_softmax(-1) for p in prompts]
                ).mean(0)
            assert float((score - ref).abs().max()) < 1e-4, (k, t)
            assert tokens[t] == int(score.argmax())


def test_the_optimum_of_a_shared_preference_is_its_teacher_and_a_profiles_is_out_of_reach(probes):
    """q_bar decoded (optimum_probe). A shared preference: q_bar is the preference teacher, right as
    often as the student is (0.97 on the shipped testbed) and reachable (the student restates ~24% of
    plain prompts unprompted: its least likely token of q_bar's response has log-prob ~ -1.4). The msd/lsd
    profile: q_bar mixes the two digit orders, so it is right for no more users than for the row's own,
    and its least likely token has log-prob ~ -8 for the student (measured -7.8 on 64 prompts): the
    averaging failure the student does not reach (experiments/pi_dependence.md)."""
    shared = probes["opsd_shared_preference"]["optimum"]
    assert shared["over"] == "the student's own" and shared["accuracy"] >= 0.8
    assert shared["right_for_some_pi"] == shared["accuracy"] and shared["student_least_logprob_median"] > -3
    profile = probes["opsd_profile_pi"]["optimum"]
    assert profile["over"] == "the valid PIs" and profile["prompts"] == 16
    assert profile["student_least_logprob_median"] < -5
    assert profile["accuracy"] < profile["student_accuracy"], profile
