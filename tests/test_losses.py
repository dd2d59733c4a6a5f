"""Tests for opd_cli.losses / opd_cli.losses_chunked (CPU, small tensors, float64 where exactness matters)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from opd_cli.losses import (
    LOSSES,
    REDUCTIONS,
    TeacherHidden,
    TeacherLogprobs,
    compute_loss,
    full_reverse_kl_logit_grad,
    grad_cosine_to_full_rkl,
    lm_head_logits,
    logit_grad,
)
from opd_cli.losses_chunked import chunked_loss

# every test here compares floats across code paths (float64 unless said otherwise)
pytestmark = pytest.mark.numerics

F64 = torch.float64
TOPK_LOSSES = ("topk_rkl", "topk_rkl_stopgrad", "topk_rkl_renorm")


def make_batch(batch=2, length=6, vocab=40, seed=0, dtype=F64, padding=True, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(batch, length, vocab, generator=g)).to(dtype)
    teacher_logits = (scale * torch.randn(batch, length, vocab, generator=g)).to(dtype)
    tokens = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if padding:
        mask[-1, length // 2 :] = False
        tokens[-1, length // 2 :] = -100  # padding ids must never be read
    return student, teacher_logits, tokens, mask


def teacher_full(teacher_logits, tokens, k=None):
    return TeacherLogprobs.from_logits(teacher_logits, tokens, k=k)


def teacher_topk_only(teacher_logits, tokens, k):
    return TeacherLogprobs.from_logits(teacher_logits, tokens, k=k, keep_full=False)


def single_position_grad(name, student_logits_1d, teacher_logprobs_1d, **options):
    """Gradient of one position's loss w.r.t. its logits, [V]."""
    z = student_logits_1d.view(1, 1, -1)
    teacher = TeacherLogprobs(full=teacher_logprobs_1d.view(1, 1, -1))
    tokens = torch.zeros(1, 1, dtype=torch.long)
    return logit_grad(name, z, teacher, tokens, torch.ones(1, 1), **options).view(-1)


# -------------------------------------------------------------------------------- student == teacher
ZERO_GRAD_CASES = [
    ("full_rkl", {}),
    ("full_fkl", {}),
    ("gjsd", {"beta": 0.0}),
    ("gjsd", {"beta": 0.5}),
    ("gjsd", {"beta": 1.0}),
    ("sampled_rkl", {}),
    ("topk_rkl", {"k": 5, "tail_bucket": True}),
    ("topk_rkl_stopgrad", {"k": 5}),
    ("topk_rkl_stopgrad", {"k": 5, "support": "union", "tail_bucket": True}),
    ("topk_rkl_renorm", {"k": 5}),
    ("topk_rkl_renorm", {"k": 5, "stopgrad": True, "support": "teacher"}),
]


@pytest.mark.parametrize(("name", "options"), ZERO_GRAD_CASES)
def test_identical_student_teacher_gives_zero_loss_and_zero_grad(name, options):
    student, _, tokens, mask = make_batch()
    teacher = teacher_full(student, tokens, k=5)
    logits = student.clone().requires_grad_(True)
    out = compute_loss(name, logits, teacher, tokens, mask, **options)
    out.loss.backward()
    assert abs(out.loss.item()) < 1e-12
    assert logits.grad.abs().max().item() < 1e-12


def test_naive_topk_at_identical_distributions_keeps_the_mass_gradient():
    """The naive TopK loss is 0 at p == q but its gradient is grad P_S != 0: the "+1" bias."""
    student, _, tokens, mask = make_batch(padding=False)
    teacher = teacher_full(student, tokens)
    logits = student.clone().requires_grad_(True)
    out = compute_loss("topk_rkl", logits, teacher, tokens, mask, k=5, reduction="token_mean")
    out.loss.backward()
    assert abs(out.loss.item()) < 1e-12
    z = student.clone().requires_grad_(True)
    p = F.softmax(z, -1)
    mean_mass = p.gather(-1, p.detach().topk(5, -1).indices).sum() / mask.sum()  # token mean of P_S
    (mass_grad,) = torch.autograd.grad(mean_mass, z)
    torch.testing.assert_close(logits.grad, mass_grad)
    assert mass_grad.abs().max() > 1e-3


# ----------------------------------------------------------------------------------- closed forms
def test_full_rkl_grad_matches_closed_form():
    student, teacher_logits, tokens, mask = make_batch()
    teacher = teacher_full(teacher_logits, tokens)
    grad = logit_grad("full_rkl", student, teacher, tokens, mask)
    expected = full_reverse_kl_logit_grad(student, teacher.full) * mask.unsqueeze(-1)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-13)


def test_full_fkl_grad_is_p_minus_q():
    student, teacher_logits, tokens, mask = make_batch()
    grad = logit_grad("full_fkl", student, teacher_full(teacher_logits, tokens), tokens, mask)
    expected = (F.softmax(student, -1) - F.softmax(teacher_logits, -1)) * mask.unsqueeze(-1)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("support", ["student", "teacher", "intersection", "union"])
def test_mechanism2_naive_topk_equals_stopgrad_plus_mass_gradient(support):
    student, teacher_logits, tokens, mask = make_batch(vocab=30)
    teacher = teacher_full(teacher_logits, tokens)
    naive = logit_grad("topk_rkl", student, teacher, tokens, mask, k=6, support=support)
    stopgrad = logit_grad("topk_rkl_stopgrad", student, teacher, tokens, mask, k=6, support=support)
    # grad of P_S = sum_{v in S} p(v), with S fixed (it is chosen without gradient)
    z = student.clone().requires_grad_(True)
    p = F.softmax(z, -1)
    in_s = torch.zeros_like(student, dtype=torch.bool)
    student_top = student.topk(6, -1).indices
    teacher_top = teacher_logits.topk(6, -1).indices
    student_sets = torch.zeros_like(in_s).scatter(-1, student_top, True)
    teacher_sets = torch.zeros_like(in_s).scatter(-1, teacher_top, True)
    in_s = {
        "student": student_sets,
        "teacher": teacher_sets,
        "intersection": student_sets & teacher_sets,
        "union": student_sets | teacher_sets,
    }[support]
    mass = (p * in_s * mask.unsqueeze(-1)).sum()
    (mass_grad,) = torch.autograd.grad(mass, z)
    torch.testing.assert_close(naive, stopgrad + mass_grad, rtol=1e-10, atol=1e-13)


def _tail_leak_setup(vocab=25, k=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(vocab, generator=g, dtype=F64)
    logq = F.log_softmax(2.0 * torch.randn(vocab, generator=g, dtype=F64), -1)
    logp = F.log_softmax(z, -1)
    p = logp.exp()
    s = z.topk(k).indices
    in_s = torch.zeros(vocab, dtype=torch.bool)
    in_s[s] = True
    kl_s = (p[s] * (logp[s] - logq[s])).sum()
    return z, logq, p, in_s, kl_s, p[s].sum()


def test_tail_leak_stopgrad_is_minus_p_times_truncated_kl():
    z, logq, p, in_s, kl_s, _ = _tail_leak_setup()
    grad = single_position_grad("topk_rkl_stopgrad", z, logq, k=4)
    torch.testing.assert_close(grad[~in_s], -p[~in_s] * kl_s, rtol=1e-10, atol=1e-15)


def test_tail_leak_naive_is_minus_p_times_truncated_kl_plus_mass():
    z, logq, p, in_s, kl_s, mass_s = _tail_leak_setup()
    grad = single_position_grad("topk_rkl", z, logq, k=4)
    torch.testing.assert_close(grad[~in_s], -p[~in_s] * (kl_s + mass_s), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("stopgrad", [False, True])
def test_tail_leak_renormalized_is_exactly_zero(stopgrad):
    z, logq, _, in_s, _, _ = _tail_leak_setup()
    grad = single_position_grad("topk_rkl_renorm", z, logq, k=4, stopgrad=stopgrad)
    assert torch.equal(grad[~in_s], torch.zeros_like(grad[~in_s]))
    assert grad[in_s].abs().max() > 1e-4


def test_topk_with_k_equal_to_vocab_matches_full_rkl():
    student, teacher_logits, tokens, mask = make_batch(vocab=16)
    teacher = teacher_full(teacher_logits, tokens)
    full = logit_grad("full_rkl", student, teacher, tokens, mask)
    for name in ("topk_rkl", "topk_rkl_stopgrad"):
        grad = logit_grad(name, student, teacher, tokens, mask, k=16, support="student")
        torch.testing.assert_close(grad, full, rtol=1e-9, atol=1e-13)
    values = [
        compute_loss(n, student, teacher, tokens, mask, k=16).loss for n in ("topk_rkl", "topk_rkl_renorm")
    ]
    torch.testing.assert_close(values[0], compute_loss("full_rkl", student, teacher, tokens, mask).loss)
    torch.testing.assert_close(values[1], values[0])


def test_renorm_with_tail_bucket_equals_naive_with_tail_bucket():
    student, teacher_logits, tokens, mask = make_batch()
    teacher = teacher_full(teacher_logits, tokens)
    for stopgrad, plain in ((False, "topk_rkl"), (True, "topk_rkl_stopgrad")):
        a = logit_grad(
            "topk_rkl_renorm", student, teacher, tokens, mask, k=5, tail_bucket=True, stopgrad=stopgrad
        )
        b = logit_grad(plain, student, teacher, tokens, mask, k=5, tail_bucket=True)
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------------------------- sign tests
def _one_descent_step(name, lr=1.0):
    """Student: flat over 1000 tokens except 3 top tokens; teacher: q = (0.5, 1.5, 4) x p on them.
    Returns (p before, p after one gradient step on the logits) for the 3 tokens."""
    vocab = 1000
    z = torch.zeros(vocab, dtype=F64)
    z[:3] = 1.0
    p = F.softmax(z, -1)
    q = p.clone()
    q[:3] = p[:3] * torch.tensor([0.5, 1.5, 4.0], dtype=F64)
    q[3:] = p[3:] * (1 - q[:3].sum()) / p[3:].sum()
    grad = single_position_grad(name, z, q.log(), k=3)
    return p[:3], F.softmax(z - lr * grad, -1)[:3]


def test_stopgrad_topk_raises_p_iff_teacher_above_student():
    before, after = _one_descent_step("topk_rkl_stopgrad")
    assert after[0] < before[0]  # q = 0.5 p: down
    assert after[1] > before[1]  # q = 1.5 p: up (q > p)
    assert after[2] > before[2]  # q = 4 p: up


def test_naive_topk_raises_p_iff_teacher_above_e_times_student():
    before, after = _one_descent_step("topk_rkl")
    assert after[0] < before[0]  # q = 0.5 p: down
    assert after[1] < before[1]  # p < q = 1.5 p < e p: down under naive (but up under stop-grad)
    assert after[2] > before[2]  # q = 4 p > e p: up


# ----------------------------------------------------------------------------- chunked == unchunked
def _hidden_batch(seed=0, batch=3, length=5, hidden=8, vocab=37, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, generator=g, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype)
    th = torch.randn(batch, length, hidden + 2, generator=g, dtype=dtype)
    tw = torch.randn(vocab, hidden + 2, generator=g, dtype=dtype)
    tokens = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, 2:] = False
    mask[2, 4:] = False
    behavior = torch.randn(batch, length, generator=g, dtype=dtype) - 3.0
    return h, w, th, tw, tokens, mask, behavior


CHUNK_CASES = [
    ("full_rkl", "hidden", {}),
    ("full_fkl", "hidden", {}),
    ("gjsd", "hidden", {"beta": 0.3}),
    ("topk_rkl", "topk", {"k": 4, "support": "intersection"}),
    ("topk_rkl_stopgrad", "topk", {"k": 4, "support": "teacher", "tail_bucket": True}),
    ("topk_rkl_renorm", "topk", {"k": 4, "support": "intersection"}),
    ("topk_rkl_stopgrad", "hidden", {"k": 5, "support": "union"}),
    ("sampled_rkl", "sampled", {}),
    ("sampled_rkl", "sampled", {"is_clip": 2.0, "behavior": True}),
]


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("name", "teacher_kind", "options"), CHUNK_CASES)
def test_chunked_matches_unchunked(name, teacher_kind, options, reduction, chunk_size):
    h, w, th, tw, tokens, mask, behavior = _hidden_batch()
    options = dict(options)
    if options.pop("behavior", False):
        options["behavior_logprobs"] = behavior
    hidden_teacher = TeacherHidden(th, tw)
    if teacher_kind == "hidden":
        teacher = hidden_teacher
    elif teacher_kind == "topk":
        teacher = hidden_teacher.to_logprobs(tokens, k=6)
        teacher.full = None
    else:
        teacher = TeacherLogprobs(sampled=hidden_teacher.to_logprobs(tokens).sampled)

    h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    reference = compute_loss(
        name, lm_head_logits(h1, w1), teacher, tokens, mask, reduction=reduction, **options
    )
    reference.loss.backward()
    h2, w2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    chunked = chunked_loss(
        name, h2, w2, teacher, tokens, mask, chunk_size=chunk_size, reduction=reduction, **options
    )
    chunked.loss.backward()

    torch.testing.assert_close(chunked.loss, reference.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-9, atol=1e-12)
    assert chunked.per_token.keys() == reference.per_token.keys()
    for key in reference.per_token:
        torch.testing.assert_close(chunked.per_token[key], reference.per_token[key], rtol=1e-9, atol=1e-12)


def test_chunked_with_bias_and_logit_scale_and_scaled_backward():
    h, w, th, tw, tokens, mask, _ = _hidden_batch(seed=1)
    bias = torch.randn(w.shape[0], dtype=F64)
    teacher = TeacherHidden(th, tw, logit_scale=0.5)
    leaves1 = [t.clone().requires_grad_(True) for t in (h, w, bias)]
    reference = compute_loss("full_rkl", lm_head_logits(*leaves1, logit_scale=0.7), teacher, tokens, mask)
    (3.0 * reference.loss).backward()
    leaves2 = [t.clone().requires_grad_(True) for t in (h, w, bias)]
    chunked = chunked_loss(
        "full_rkl",
        leaves2[0],
        leaves2[1],
        teacher,
        tokens,
        mask,
        chunk_size=4,
        lm_head_bias=leaves2[2],
        logit_scale=0.7,
    )
    (3.0 * chunked.loss).backward()
    torch.testing.assert_close(chunked.loss, reference.loss)
    for a, b in zip(leaves1, leaves2, strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12)


def test_chunked_without_grad_and_backward_twice_is_an_error():
    h, w, th, tw, tokens, mask, _ = _hidden_batch()
    with torch.no_grad():
        value = chunked_loss("full_rkl", h, w, TeacherHidden(th, tw), tokens, mask, chunk_size=4).loss
    reference = compute_loss("full_rkl", lm_head_logits(h, w), TeacherHidden(th, tw), tokens, mask).loss
    torch.testing.assert_close(value, reference)
    out = chunked_loss("full_rkl", h.requires_grad_(True), w, TeacherHidden(th, tw), tokens, mask)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        out.loss.backward()


# ------------------------------------------------------------------------------ sampled estimators
def test_sampled_rkl_mean_gradient_matches_full_rkl_gradient():
    """MC over y ~ p at one position: the mean sampled-loss gradient points along the full RKL gradient
    (tolerance: cosine > 0.95 with 20000 samples; the estimator is unbiased)."""
    g = torch.Generator().manual_seed(0)
    vocab, samples = 12, 20000
    z = torch.randn(vocab, generator=g, dtype=F64)
    logq = F.log_softmax(torch.randn(vocab, generator=g, dtype=F64), -1)
    y = torch.multinomial(F.softmax(z, -1), samples, replacement=True, generator=g)
    logits = z.expand(samples, 1, vocab)
    teacher = TeacherLogprobs(full=logq.expand(samples, 1, vocab))
    grad = logit_grad("sampled_rkl", logits, teacher, y.view(samples, 1), torch.ones(samples, 1)).mean((0, 1))
    expected = full_reverse_kl_logit_grad(z, logq)
    assert F.cosine_similarity(grad, expected, dim=0) > 0.95


def test_k1_is_unbiased_for_kl_and_k3_is_nonnegative():
    """mean k1 over y ~ p is within 4 standard errors of KL(p || q) (200000 samples, fixed seed)."""
    g = torch.Generator().manual_seed(1)
    vocab, samples = 10, 200000
    z = torch.randn(vocab, generator=g, dtype=F64)
    logq = F.log_softmax(torch.randn(vocab, generator=g, dtype=F64), -1)
    logp = F.log_softmax(z, -1)
    kl = (logp.exp() * (logp - logq)).sum()
    y = torch.multinomial(logp.exp(), samples, replacement=True, generator=g).view(samples, 1)
    out = compute_loss(
        "sampled_rkl",
        z.expand(samples, 1, vocab),
        TeacherLogprobs(full=logq.expand(samples, 1, vocab)),
        y,
        torch.ones(samples, 1),
    )
    for key in ("k1", "k3"):  # both unbiased
        values = out.per_token[key].view(-1)
        stderr = values.std() / math.sqrt(samples)
        assert abs(values.mean() - kl) < 4 * stderr
    assert (out.per_token["k3"] >= 0).all()
    torch.testing.assert_close(out.per_token["k2"], 0.5 * out.per_token["k1"] ** 2)


def test_sampled_rkl_truncated_importance_weight():
    student, teacher_logits, tokens, mask = make_batch(padding=False)
    teacher = teacher_full(teacher_logits, tokens)
    logp_y = F.log_softmax(student, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    plain = logit_grad("sampled_rkl", student, teacher, tokens, mask)
    on_policy = logit_grad(
        "sampled_rkl", student, teacher, tokens, mask, is_clip=2.0, behavior_logprobs=logp_y
    )
    torch.testing.assert_close(on_policy, plain)
    behavior = logp_y - 5.0  # ratio e^5 clipped to 2
    clipped = compute_loss(
        "sampled_rkl", student, teacher, tokens, mask, is_clip=2.0, behavior_logprobs=behavior
    )
    torch.testing.assert_close(clipped.per_token["is_weight"], torch.full_like(logp_y, 2.0))
    grad = logit_grad("sampled_rkl", student, teacher, tokens, mask, is_clip=2.0, behavior_logprobs=behavior)
    torch.testing.assert_close(grad, 2.0 * plain)


# -------------------------------------------------------------------------------------- gjsd
def test_gjsd_endpoints_limits_and_swap_symmetry():
    student, teacher_logits, tokens, mask = make_batch()
    teacher = teacher_full(teacher_logits, tokens)

    def value(beta, a=student, b=teacher):
        return compute_loss("gjsd", a, b, tokens, mask, beta=beta).loss

    fkl = compute_loss("full_fkl", student, teacher, tokens, mask).loss
    rkl = compute_loss("full_rkl", student, teacher, tokens, mask).loss
    torch.testing.assert_close(value(0.0), fkl)
    torch.testing.assert_close(value(1.0), rkl)
    eps = 1e-7  # the first-order correction is ~eps * chi2(q || p), large for random logits
    torch.testing.assert_close(value(eps) / eps, fkl, rtol=1e-3, atol=0)
    torch.testing.assert_close(value(1 - eps) / eps, rkl, rtol=1e-3, atol=0)
    swapped_teacher = teacher_full(student, tokens)
    for beta in (0.5, 0.2):  # swapping p and q maps beta -> 1 - beta; 0.5 is symmetric
        torch.testing.assert_close(value(beta), value(1 - beta, teacher_logits, swapped_teacher))
    assert 0 < value(0.5) <= math.log(2) + 1e-12  # JSD_0.5 is bounded by log 2


# ---------------------------------------------------------------------------- teacher forms, diagnostics
@pytest.mark.parametrize("name", TOPK_LOSSES)
@pytest.mark.parametrize("support", ["teacher", "intersection"])
def test_topk_only_teacher_matches_full_teacher(name, support):
    student, teacher_logits, tokens, mask = make_batch()
    full = teacher_full(teacher_logits, tokens, k=8)
    topk = teacher_topk_only(teacher_logits, tokens, k=8)
    a = compute_loss(name, student, full, tokens, mask, k=5, support=support)
    b = compute_loss(name, student, topk, tokens, mask, k=5, support=support)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.per_token["teacher_mass_in_support"], b.per_token["teacher_mass_in_support"])
    torch.testing.assert_close(a.per_token["topk_overlap"], b.per_token["topk_overlap"])


def test_empty_intersection_gives_zero_loss_and_finite_grad():
    vocab = 10
    student = torch.arange(vocab, dtype=F64).view(1, 1, vocab)
    teacher = teacher_topk_only(-student, torch.zeros(1, 1, dtype=torch.long), k=3)  # opposite top-3
    for name in TOPK_LOSSES:
        logits = student.clone().requires_grad_(True)
        out = compute_loss(
            name,
            logits,
            teacher,
            torch.zeros(1, 1, dtype=torch.long),
            torch.ones(1, 1),
            k=3,
            support="intersection",
        )
        out.loss.backward()
        assert out.loss.item() == 0.0 and torch.isfinite(logits.grad).all()
        assert out.per_token["topk_overlap"].item() == 0.0


def test_diagnostics_values():
    student, teacher_logits, tokens, mask = make_batch()
    teacher = teacher_full(teacher_logits, tokens)
    out = compute_loss("full_rkl", student, teacher, tokens, mask)
    assert set(out.per_token) == {
        "loss",
        "student_entropy",
        "sampled_logratio",
        "student_mass_in_support",
        "teacher_mass_in_support",
        "topk_overlap",
    }
    for value in out.per_token.values():
        assert value.shape == tokens.shape and not value.requires_grad
        assert (value[~mask] == 0).all()
    logp = F.log_softmax(student, -1)
    entropy = -(logp.exp() * logp).sum(-1) * mask
    torch.testing.assert_close(out.per_token["student_entropy"], entropy)
    same = compute_loss("topk_rkl", student, teacher_full(student, tokens), tokens, mask, k=5)
    torch.testing.assert_close(same.per_token["topk_overlap"], mask.to(F64))
    torch.testing.assert_close(
        same.per_token["student_mass_in_support"], same.per_token["teacher_mass_in_support"]
    )
    assert out.summary(mask)["topk_overlap"] <= 1.0


def test_grad_cosine_to_full_rkl():
    student, teacher_logits, tokens, mask = make_batch(vocab=16)
    teacher = teacher_full(teacher_logits, tokens)
    assert grad_cosine_to_full_rkl("full_rkl", student, teacher, tokens, mask).item() == pytest.approx(1.0)
    assert grad_cosine_to_full_rkl(
        "topk_rkl_stopgrad", student, teacher, tokens, mask, k=16
    ).item() == pytest.approx(1.0)
    per_token = grad_cosine_to_full_rkl("topk_rkl", student, teacher, tokens, mask, k=4, reduce="none")
    assert per_token.shape == tokens.shape and (per_token[~mask] == 0).all() and (per_token.abs() <= 1).all()
    same = teacher_full(student, tokens)
    assert grad_cosine_to_full_rkl("full_rkl", student, same, tokens, mask).item() == 0.0
    with pytest.raises(ValueError, match="full"):
        grad_cosine_to_full_rkl(
            "full_rkl", student, teacher_topk_only(teacher_logits, tokens, 4), tokens, mask
        )


# ------------------------------------------------------------------------------------- bad input
def _bad_input_cases():
    student, teacher_logits, tokens, mask = make_batch(vocab=20)
    teacher = teacher_full(teacher_logits, tokens, k=4)
    topk_only = teacher_topk_only(teacher_logits, tokens, k=4)
    wider = teacher_full(torch.randn(*student.shape[:2], 21, dtype=F64), tokens)
    ok = dict(student_logits=student, teacher=teacher, tokens=tokens, mask=mask)
    return [
        ("vocab", "full_rkl", {**ok, "teacher": wider}, {}),
        ("vocab", "full_rkl", {**ok, "teacher": TeacherHidden(torch.randn(2, 6, 3), torch.randn(21, 3))}, {}),
        ("k must be", "topk_rkl", ok, {"k": 0}),
        ("k must be", "topk_rkl", ok, {"k": 21}),
        ("k must be", "topk_rkl", ok, {"k": 2.5}),
        ("dtype", "full_rkl", {**ok, "tokens": tokens.int()}, {}),
        ("tokens shape", "full_rkl", {**ok, "tokens": tokens[:, :-1]}, {}),
        ("mask shape", "full_rkl", {**ok, "mask": mask[:, :-1]}, {}),
        ("support", "topk_rkl", ok, {"support": "both"}),
        ("reduction", "full_rkl", ok, {"reduction": "sum"}),
        ("beta", "gjsd", ok, {"beta": 1.5}),
        ("unknown option", "full_rkl", ok, {"k": 5}),
        ("unknown loss", "rkl", ok, {}),
        ("full", "topk_rkl", {**ok, "teacher": topk_only}, {"support": "student"}),
        ("full", "topk_rkl_stopgrad", {**ok, "teacher": topk_only}, {"support": "union"}),
        ("full", "full_rkl", {**ok, "teacher": topk_only}, {}),
        ("exceeds the teacher", "topk_rkl", {**ok, "teacher": topk_only}, {"k": 5, "support": "teacher"}),
        ("out of range", "full_rkl", {**ok, "tokens": tokens.clamp_min(0) + 20}, {}),
        ("is_clip", "sampled_rkl", ok, {"is_clip": -1.0}),
    ]


@pytest.mark.parametrize(("keyword", "name", "inputs", "options"), _bad_input_cases())
def test_bad_input_raises_value_error_naming_the_problem(keyword, name, inputs, options):
    with pytest.raises(ValueError, match=keyword):
        compute_loss(name, **inputs, **options)


def test_unknown_option_lists_the_allowed_ones():
    student, teacher_logits, tokens, mask = make_batch()
    with pytest.raises(ValueError) as info:
        compute_loss("topk_rkl", student, teacher_full(teacher_logits, tokens), tokens, mask, kk=3)
    for allowed in ("k", "support", "tail_bucket", "reduction", "diag_k"):
        assert f"'{allowed}'" in str(info.value)


def test_chunked_bad_input():
    h, w, th, tw, tokens, mask, _ = _hidden_batch()
    with pytest.raises(ValueError, match="hidden size"):
        chunked_loss("full_rkl", h, w[:, :-1], TeacherHidden(th, tw), tokens, mask)
    with pytest.raises(ValueError, match="vocab"):
        chunked_loss("full_rkl", h, w, TeacherHidden(th, tw[:-1]), tokens, mask)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_loss("full_rkl", h, w, TeacherHidden(th, tw), tokens, mask, chunk_size=0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_empty_mask_gives_connected_zero_loss_not_nan(name):
    student, teacher_logits, tokens, _ = make_batch(vocab=12)
    mask = torch.zeros_like(tokens, dtype=torch.float32)
    teacher = teacher_full(teacher_logits, tokens, k=4)
    options = {"k": 4, "support": "intersection"} if name.startswith("topk") else {}
    for reduction in REDUCTIONS:
        logits = student.clone().requires_grad_(True)
        out = compute_loss(name, logits, teacher, tokens, mask, reduction=reduction, **options)
        assert out.loss.item() == 0.0 and out.loss.grad_fn is not None
        out.loss.backward()
        assert torch.equal(logits.grad, torch.zeros_like(logits))
        assert all(torch.isfinite(v).all() and (v == 0).all() for v in out.per_token.values())
    h, w, th, tw, tokens, _, _ = _hidden_batch()
    h.requires_grad_(True)
    out = chunked_loss(name, h, w, TeacherHidden(th, tw), tokens, torch.zeros_like(tokens), **options)
    assert out.loss.item() == 0.0 and out.loss.grad_fn is not None
    out.loss.backward()
    assert torch.equal(h.grad, torch.zeros_like(h))


def test_bf16_inputs_work_and_match_fp32_on_the_same_values():
    student, teacher_logits, tokens, mask = make_batch(dtype=torch.float32)
    student_bf16 = student.to(torch.bfloat16).requires_grad_(True)
    teacher = TeacherLogprobs.from_logits(teacher_logits.to(torch.bfloat16), tokens, k=5)
    for name, options in (("full_rkl", {}), ("topk_rkl_stopgrad", {"k": 5}), ("sampled_rkl", {})):
        out = compute_loss(name, student_bf16, teacher, tokens, mask, **options)
        reference = compute_loss(name, student_bf16.detach().float(), teacher, tokens, mask, **options)
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
        torch.testing.assert_close(out.loss, reference.loss)
        (grad,) = torch.autograd.grad(out.loss, student_bf16)
        assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()
    h, w, th, tw, tokens, mask, _ = _hidden_batch(dtype=torch.float32, vocab=64, hidden=16)
    h, w = h.bfloat16().requires_grad_(True), w.bfloat16().requires_grad_(True)
    h32, w32 = h.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    teacher = TeacherHidden(th.bfloat16(), tw.bfloat16())
    out = chunked_loss("full_rkl", h, w, teacher, tokens, mask, chunk_size=4)
    out.loss.backward()
    reference = compute_loss("full_rkl", lm_head_logits(h32, w32), teacher, tokens, mask)
    reference.loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss, reference.loss, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w.grad.float(), w32.grad, rtol=5e-2, atol=5e-3)


# ----------------------------------------------------------------------------------------- bench
def test_loss_bench_tiny_size_produces_finite_ratios():
    from opd_cli.bench.loss_bench import format_table, run_loss_bench

    rows = run_loss_bench(vocab=1000, hidden=64, tokens=256, k=20, chunk_size=64, isolate=False)
    assert {row["case"] for row in rows} == {
        "full_rkl",
        "topk_rkl_stopgrad/student",
        "topk_rkl_stopgrad/intersection",
    }
    for row in rows:
        for key in ("time_ratio", "memory_ratio", "memory_ratio_excl_grads"):
            assert math.isfinite(row[key]) and row[key] >= 0
        assert abs(row["naive_loss"] - row["chunked_loss"]) < 1e-3 * max(1.0, abs(row["naive_loss"]))
    table = format_table(rows)
    assert table.count("\n") >= len(rows) + 1 and "full_rkl" in table


# ------------------------------------------------------------------ teacher clamp and non-finite inputs
FULL_LOSSES = ("full_rkl", "full_fkl", "gjsd")


def _both_paths(name, h, w, teacher, tokens, mask):
    """(compute_loss on the materialized logits, chunked_loss) for a TeacherHidden teacher."""
    naive = compute_loss(name, lm_head_logits(h, w), teacher, tokens, mask).loss
    chunked = chunked_loss(name, h, w, teacher, tokens, mask, chunk_size=3).loss
    return naive, chunked


@pytest.mark.parametrize("name", FULL_LOSSES)
def test_hidden_teacher_with_a_minus_inf_row_is_clamped_on_both_paths(name):
    """q(v) = 0 for one token (its LM-head bias is -inf): both paths clamp log q at log(tiny) and agree.
    Before the fix compute_loss skipped the clamp: full_rkl was inf, full_fkl / gjsd NaN."""
    h, w, th, tw, tokens, mask, _ = _hidden_batch(seed=4)
    bias = torch.zeros(w.shape[0], dtype=F64)
    bias[5] = -math.inf
    teacher = TeacherHidden(th, tw, lm_head_bias=bias)
    naive, chunked = _both_paths(name, h, w, teacher, tokens, mask)
    assert torch.isfinite(naive) and torch.isfinite(chunked), (naive, chunked)
    # float64, the same operations on the same rows: equal to round-off (rtol 1e-10 >> 1e-16 x V terms)
    torch.testing.assert_close(naive, chunked, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", FULL_LOSSES)
def test_very_negative_fp32_teacher_logits_give_the_same_loss_on_both_paths(name):
    """Finite fp32 teacher logits whose log q falls below log(tiny fp32) = -87.3: both paths clamp
    there (before the fix compute_loss did not, and full_rkl differed by 0.6%)."""
    h, w, th, tw, tokens, mask, _ = _hidden_batch(seed=5, dtype=torch.float32)
    tw = tw.clone()
    tw[:7] *= 40.0  # 7 tokens with |logit| up to ~1e2: log q far below -87.3 at some positions
    teacher = TeacherHidden(th, tw)
    logq = torch.log_softmax(lm_head_logits(th, tw), -1)
    assert bool((logq[mask] < math.log(torch.finfo(torch.float32).tiny)).any())  # the case is exercised
    naive, chunked = _both_paths(name, h, w, teacher, tokens, mask)
    # fp32: the same row values, summed in chunks of 3 rows vs all rows: a few ulps (eps 1.2e-7) of a sum
    # over <= 15 rows, far inside 1e-5
    torch.testing.assert_close(naive, chunked, rtol=1e-5, atol=1e-6)


def _nonfinite(fn):
    from opd_cli.losses import NonFiniteInputError

    with pytest.raises(NonFiniteInputError) as err:
        fn()
    return err.value


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("field", ["full", "topk", "sampled"])
def test_nan_or_plus_inf_teacher_log_probs_are_rejected_with_the_position(bad, field):
    student, teacher_logits, tokens, mask = make_batch()
    teacher = teacher_full(teacher_logits, tokens, k=5)
    name, options = {
        "full": ("full_rkl", {}),
        "topk": ("topk_rkl_stopgrad", {"k": 5, "support": "teacher"}),
        "sampled": ("sampled_rkl", {}),
    }[field]
    target = {"full": teacher.full, "topk": teacher.topk_logprobs, "sampled": teacher.sampled}[field]
    target[1, 2] = bad  # sequence 1, response position 2 (inside the mask)
    if field != "full":
        teacher.full = None
    err = _nonfinite(lambda: compute_loss(name, student, teacher, tokens, mask, **options))
    assert err.side == "teacher" and err.position == (1, 2), str(err)
    assert ("NaN" if math.isnan(bad) else "+inf") in str(err) and "\n" not in str(err)


def test_nan_in_padding_is_ignored_and_minus_inf_teacher_log_probs_stay_legal():
    student, teacher_logits, tokens, mask = make_batch()
    teacher = teacher_full(teacher_logits, tokens)
    teacher.full[0, 1, 3] = -math.inf  # q = 0: clamped, a large finite penalty
    teacher.full[1, -1] = math.nan  # a padding position: never read
    student = student.clone()
    student[1, -1] = math.nan
    out = compute_loss("full_rkl", student, teacher, tokens, mask)
    assert torch.isfinite(out.loss)


def test_non_finite_student_logits_are_rejected_on_both_paths():
    student, teacher_logits, tokens, mask = make_batch()
    student = student.clone()
    student[0, 4, 7] = math.nan
    err = _nonfinite(
        lambda: compute_loss("full_rkl", student, teacher_full(teacher_logits, tokens), tokens, mask)
    )
    assert err.side == "student" and err.position == (0, 4) and "NaN" in str(err)
    h, w, th, tw, tokens, mask, _ = _hidden_batch()
    w = w.clone()
    w[2] = math.inf  # an inf row in the student's LM head: inf/NaN logits everywhere
    err = _nonfinite(
        lambda: chunked_loss("full_rkl", h, w, TeacherHidden(th, tw), tokens, mask, chunk_size=4)
    )
    assert err.side == "student" and err.position == (0, 0)


def test_nan_teacher_hidden_is_rejected_on_both_paths_with_the_position():
    h, w, th, tw, tokens, mask, _ = _hidden_batch()
    th = th.clone()
    th[2, 3] = math.nan  # sequence 2, position 3 (mask[2, 4:] is padding)
    for fn in (
        lambda: compute_loss("full_rkl", lm_head_logits(h, w), TeacherHidden(th, tw), tokens, mask),
        lambda: chunked_loss("full_rkl", h, w, TeacherHidden(th, tw), tokens, mask, chunk_size=4),
    ):
        err = _nonfinite(fn)
        assert err.side == "teacher" and err.position == (2, 3), str(err)
