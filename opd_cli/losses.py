"""Token-level on-policy distillation (OPD) losses: pure tensor functions.

Notation (see shared/PAPER.md): p = student, q = teacher (always a constant: detached here),
r_v = log p(v) - log q(v), S = a top-K token set, P_S = sum_{v in S} p(v), KL_S = sum_{v in S} p(v) r_v.

Batch inputs:
  student_logits [B, T, V]  position t holds the logits that predict response token t
  teacher        TeacherLogprobs (log-probs: full / top-K / sampled token) or TeacherHidden
  tokens         [B, T] long, the sampled response tokens
  mask           [B, T] response mask; nonzero = response token, 0 = padding (values are not weights)

Every loss is computed on the flattened response tokens only ([N, V] rows, N = mask.sum()), in
fp32 at least (bf16/fp16 logits are upcast; float64 stays float64). `compute_loss` returns
`LossOutput(loss, per_token)`: `loss` is the reduced scalar, `per_token` holds detached [B, T]
diagnostics that are 0 on padding. An all-zero mask gives loss 0.0 that is still connected to the
inputs (its gradient is zero), never NaN.

Teacher log-probs are clamped below at log(smallest normal float) so that q = 0 gives a large
finite penalty instead of inf/NaN, on every path (full, top-K or sampled log-probs, or log-probs from a
TeacherHidden in `compute_loss` and in `chunked_loss` alike). -inf teacher log-probs are legal (q = 0);
NaN or +inf teacher values and non-finite student logits raise `NonFiniteInputError`, which names the
tensor, its side (teacher / student) and the first bad position.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTS = ("student", "teacher", "intersection", "union")
REDUCTIONS = ("token_mean", "seq_mean")
DEFAULT_DIAG_K = 20
# options every loss accepts (handled by the dispatcher, not by the per-token functions)
COMMON_OPTIONS = {"reduction": "token_mean", "diag_k": None, "diagnostics": True}


def _upcast(x: Tensor) -> Tensor:
    """fp32 at least: half-precision log_softmax loses the tail; float64 is kept for exact tests."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _log_tiny(dtype: torch.dtype) -> float:
    return math.log(torch.finfo(dtype).tiny)


class NonFiniteInputError(ValueError):
    """A loss input holds NaN/inf where it must not: `side` is "teacher" or "student", `tensor` the
    input's name, `position` the (sequence, response position) of the first bad value when known."""

    def __init__(self, side: str, tensor: str, what: str, position: tuple[int, ...] | None):
        self.side, self.tensor, self.what, self.position = side, tensor, what, position
        where = "" if position is None else f" at sequence {position[0]}, response position {position[1]}"
        super().__init__(f"{side} {tensor} hold {what}{where}")


def _first_bad(bad: Tensor, sel: Tensor | None, offset: int = 0) -> tuple[int, int] | None:
    """(sequence, response position) of the first bad row: `bad` is [N, ...] over the response rows
    (row i = the i-th True of the [B, T] mask `sel`, shifted by `offset` for a chunk)."""
    rows = bad.reshape(bad.shape[0], -1).any(-1) if bad.dim() > 1 else bad
    first = int(rows.nonzero()[0, 0]) + offset
    if sel is None:
        return None
    b, t = sel.nonzero()[first].tolist()
    return b, t


def check_student_logits(logits: Tensor, sel: Tensor | None = None, offset: int = 0) -> None:
    """Raise NonFiniteInputError if a student logit row ([N, V] response rows) holds NaN or +-inf. One
    reduction (a sum is finite iff every term is, short of overflow past 3e38); the position is searched
    only on failure."""
    x = logits.detach()
    if x.numel() and not bool(torch.isfinite(x.sum())):
        bad = ~torch.isfinite(x)
        if bad.any():
            what = "NaN" if bool(torch.isnan(x).any()) else "inf"
            raise NonFiniteInputError("student", "logits", what, _first_bad(bad, sel, offset))


def check_teacher_values(teacher: TeacherLogprobs, sel: Tensor | None = None, offset: int = 0) -> None:
    """Raise NonFiniteInputError if a teacher log-prob row holds NaN or +inf (a broken checkpoint, a bad
    value from a served teacher); -inf is q = 0 and legal (clamped). One max per field: NaN propagates
    through max, so `max < inf` fails for both."""
    for name in ("full", "topk_logprobs", "sampled"):
        x = getattr(teacher, name)
        if x is None or not x.numel():
            continue
        x = x.detach()
        if not bool(x.max() < math.inf):
            bad = torch.isnan(x) | (x == math.inf)
            what = "NaN" if bool(torch.isnan(x).any()) else "+inf"
            raise NonFiniteInputError("teacher", f"log-probs ({name})", what, _first_bad(bad, sel, offset))


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum_v a[..., v] * b[..., v] without materializing the [..., V] product (saves one [N, V] temp)."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).squeeze(-1).squeeze(-1)


def lm_head_logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None = None, logit_scale: float | None = None
) -> Tensor:
    """logits = (hidden @ weight.T + bias) in the input dtype, upcast to fp32, times logit_scale.

    The one definition of "logits from hidden states" shared by the chunked and unchunked paths.
    """
    logits = _upcast(F.linear(hidden, weight, bias))
    return logits if logit_scale is None else logits * logit_scale


# ----------------------------------------------------------------------------------------- teacher
@dataclass
class TeacherLogprobs:
    """What the teacher tells us about each position; every field is optional.

    full          [B, T, V]  log q(v) for the whole vocabulary
    topk_ids      [B, T, Kt] the teacher's top-Kt token ids (long), e.g. from a logprob server
    topk_logprobs [B, T, Kt] log q of those ids (normalized over the full vocabulary)
    sampled       [B, T]     log q(y_t) of the sampled token
    """

    full: Tensor | None = None
    topk_ids: Tensor | None = None
    topk_logprobs: Tensor | None = None
    sampled: Tensor | None = None

    @classmethod
    def from_logits(
        cls, logits: Tensor, tokens: Tensor | None = None, k: int | None = None, keep_full: bool = True
    ) -> TeacherLogprobs:
        """Teacher log-probs from logits [B, T, V]: full (unless keep_full=False), sampled (if tokens
        are given; padding ids are clamped into range, their value is meaningless) and top-k (if k)."""
        with torch.no_grad():
            full = F.log_softmax(_upcast(logits.detach()), dim=-1)
            sampled = None
            if tokens is not None:
                sampled = full.gather(-1, tokens.clamp(0, full.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
            topk_logprobs = topk_ids = None
            if k is not None:
                topk_logprobs, topk_ids = full.topk(k, dim=-1)
        return cls(full if keep_full else None, topk_ids, topk_logprobs, sampled)

    def map(self, fn: Callable[[Tensor], Tensor]) -> TeacherLogprobs:
        """Apply fn to every present field (flattening, chunk slicing)."""
        return TeacherLogprobs(
            *(None if (v := getattr(self, f.name)) is None else fn(v) for f in fields(self))
        )

    def prepared(self) -> TeacherLogprobs:
        """Detached, upcast, clamped copy: the teacher is a constant in every loss."""

        def prep(x: Tensor) -> Tensor:
            if x.dtype == torch.long:
                return x.detach()
            x = _upcast(x.detach())
            floor = _log_tiny(x.dtype)
            # clamp only when needed: a clamped copy of full [B, T, V] log-probs costs as much as the logits
            # (`not min >= floor` also clamps when a NaN, e.g. in padding, hides the minimum)
            return x.clamp_min(floor) if x.numel() and not bool(x.min() >= floor) else x

        return self.map(prep)


@dataclass
class TeacherHidden:
    """A teacher given by its final hidden states and LM head: log-probs are computed on demand
    (per chunk in `chunked_loss`, which is what makes chunked full-vocabulary losses cheap).

    hidden [B, T, Ht], lm_head_weight [V, Ht], optional lm_head_bias [V] and logit_scale.
    """

    hidden: Tensor
    lm_head_weight: Tensor
    lm_head_bias: Tensor | None = None
    logit_scale: float | None = None

    def logits(self) -> Tensor:
        with torch.no_grad():
            return lm_head_logits(self.hidden, self.lm_head_weight, self.lm_head_bias, self.logit_scale)

    def to_logprobs(self, tokens: Tensor | None = None, k: int | None = None) -> TeacherLogprobs:
        """The teacher's log-probs, prepared (clamped) as every loss uses them: the one definition shared
        by `compute_loss` (the whole [B, T, V] at once) and `chunked_loss` (row chunks of a TeacherHidden).
        NaN/+inf logits (a broken LM head) come out as NaN log-probs, which the losses reject."""
        return TeacherLogprobs.from_logits(self.logits(), tokens, k).prepared()

    def rows(self, start: int, end: int) -> TeacherHidden:
        """Rows start:end of a [N, Ht] (flattened) teacher."""
        return TeacherHidden(self.hidden[start:end], self.lm_head_weight, self.lm_head_bias, self.logit_scale)


Teacher = TeacherLogprobs | TeacherHidden


@dataclass
class LossOutput:
    loss: Tensor  # scalar, differentiable
    per_token: dict[str, Tensor]  # detached [B, T] diagnostics, 0 on padding

    def summary(self, mask: Tensor) -> dict[str, float]:
        """Mean of every diagnostic over response tokens (for logging)."""
        sel = mask != 0
        n = max(int(sel.sum()), 1)
        return {k: float(v[sel].sum()) / n for k, v in self.per_token.items()}


# --------------------------------------------------------------------------- per-token building blocks
class TokenLoss(NamedTuple):
    """What a per-token loss function returns for N flattened rows."""

    per_token: Tensor  # [N], differentiable w.r.t. the logits rows
    student_logp: Tensor  # [N, V] log p (reused, detached, by the diagnostics)
    extra: dict[str, Tensor]  # loss-specific detached diagnostics [N]
    support: Support | None = None  # the token set S of TopK losses
    student_probs: Tensor | None = None  # p, when the loss computed it anyway (saves the diagnostics a copy)


class Support(NamedTuple):
    """A top-K token set S per row, gathered by index: ids [N, M] and which entries count [N, M]
    (M = k, or 2k for the union, whose duplicates are marked invalid)."""

    ids: Tensor
    valid: Tensor


def _require_full(teacher: TeacherLogprobs, loss: str) -> Tensor:
    if teacher.full is None:
        raise ValueError(
            f"loss '{loss}' needs the teacher's full log-probs (TeacherLogprobs.full or "
            "TeacherHidden); this teacher has only top-K / sampled log-probs"
        )
    return teacher.full


def _teacher_topk_ids(teacher: TeacherLogprobs, k: int) -> Tensor | None:
    """The teacher's top-k ids [N, k]: from `full` when present, else from `topk_ids`."""
    if teacher.full is not None:
        return teacher.full.topk(k, dim=-1).indices
    if teacher.topk_ids is None:
        return None
    have = teacher.topk_ids.shape[-1]
    if have < k:
        raise ValueError(
            f"k={k} exceeds the teacher's top-K list (k mismatch: topk_ids has {have} ids per "
            "position); use k <= that or give full teacher log-probs"
        )
    if have == k:
        return teacher.topk_ids
    order = teacher.topk_logprobs.topk(k, dim=-1).indices  # the list need not be sorted
    return teacher.topk_ids.gather(-1, order)


def teacher_logprobs_at(teacher: TeacherLogprobs, ids: Tensor) -> tuple[Tensor, Tensor]:
    """log q at ids [N, M] and whether it is known [N, M] (always with `full`; with top-K only,
    known iff the id is in the teacher's list; unknown entries are 0)."""
    if teacher.full is not None:
        return teacher.full.gather(-1, ids), torch.ones_like(ids, dtype=torch.bool)
    if teacher.topk_ids is None:
        raise ValueError("the teacher has neither full nor top-K log-probs")
    match = ids.unsqueeze(-1) == teacher.topk_ids.unsqueeze(-2)  # [N, M, Kt], small
    logq = torch.where(match, teacher.topk_logprobs.unsqueeze(-2), 0.0).sum(-1)
    return logq, match.any(-1)


def _isin_rows(a: Tensor, b: Tensor) -> Tensor:
    """a[n, i] in b[n, :] for every row n: [N, Ka] bool."""
    return (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1)


def topk_support(student_logp: Tensor, teacher: TeacherLogprobs, k: int, support: str) -> Support:
    """S per row. student: the student's top-k; teacher: the teacher's; intersection: student top-k
    ids also in the teacher's list; union: both, duplicates invalid."""
    student_ids = student_logp.detach().topk(k, dim=-1).indices
    all_valid = torch.ones_like(student_ids, dtype=torch.bool)
    if support == "student":
        return Support(student_ids, all_valid)
    teacher_ids = _teacher_topk_ids(teacher, k)
    if teacher_ids is None:
        raise ValueError(f"support='{support}' needs the teacher's top-K (topk_ids or full)")
    if support == "teacher":
        return Support(teacher_ids, all_valid)
    if support == "intersection":
        return Support(student_ids, _isin_rows(student_ids, teacher_ids))
    teacher_new = ~_isin_rows(teacher_ids, student_ids)
    return Support(torch.cat([student_ids, teacher_ids], -1), torch.cat([all_valid, teacher_new], -1))


def _support_mask(support: Support, vocab: int) -> Tensor:
    """S as a [N, V] bool mask (only for the tail bucket); scatter_add so duplicate ids can't unset."""
    counts = torch.zeros(support.ids.shape[0], vocab, dtype=torch.int32, device=support.ids.device)
    return counts.scatter_add_(-1, support.ids, support.valid.to(torch.int32)) > 0


def _masked_logsumexp(x: Tensor, valid: Tensor) -> Tensor:
    """logsumexp over valid entries; 0 for rows without any (their terms are masked out anyway)."""
    any_valid = valid.any(-1, keepdim=True)
    filled = torch.where(valid, x, float("-inf"))
    filled = torch.where(any_valid, filled, 0.0)  # keep empty rows finite: no NaN in backward
    return torch.where(any_valid.squeeze(-1), torch.logsumexp(filled, -1), 0.0)


# -------------------------------------------------------------------------------------------- losses
def full_reverse_kl(logits: Tensor, teacher: TeacherLogprobs, tokens: Tensor) -> TokenLoss:
    """full_rkl: sum_v p(v) (log p(v) - log q(v)), gradient through everything.

    d/dz_j = p_j (r_j - KL): no "+1" term because sum_v p grad log p = 0."""
    logq = _require_full(teacher, "full_rkl")
    logp = F.log_softmax(logits, -1)
    p = logp.exp()
    return TokenLoss(_rowdot(p, logp - logq), logp, {}, student_probs=p)


def full_forward_kl(logits: Tensor, teacher: TeacherLogprobs, tokens: Tensor) -> TokenLoss:
    """full_fkl: sum_v q(v) (log q(v) - log p(v)); d/dz_j = p_j - q_j."""
    logq = _require_full(teacher, "full_fkl")
    logp = F.log_softmax(logits, -1)
    return TokenLoss(_rowdot(logq.exp(), logq - logp), logp, {})


def generalized_jsd(
    logits: Tensor, teacher: TeacherLogprobs, tokens: Tensor, *, beta: float = 0.5
) -> TokenLoss:
    """gjsd, TRL/GKD convention: mixture m = (1 - beta) p + beta q,
    JSD_beta = beta KL(q || m) + (1 - beta) KL(p || m).

    beta = 0 is exactly the forward KL(q || p) and beta = 1 exactly the reverse KL(p || q) (as in TRL);
    in between, JSD_beta ~ beta * FKL as beta -> 0 and ~ (1 - beta) * RKL as beta -> 1.
    Swapping p and q maps beta to 1 - beta, so beta = 0.5 is symmetric."""
    logq = _require_full(teacher, "gjsd")
    logp = F.log_softmax(logits, -1)
    if beta == 0.0:
        return TokenLoss(_rowdot(logq.exp(), logq - logp), logp, {})
    if beta == 1.0:
        return TokenLoss(_rowdot(logp.exp(), logp - logq), logp, {})
    log_m = torch.logaddexp(logp + math.log(1.0 - beta), logq + math.log(beta))
    kl_q_m = _rowdot(logq.exp(), logq - log_m)
    kl_p_m = _rowdot(logp.exp(), logp - log_m)
    return TokenLoss(beta * kl_q_m + (1.0 - beta) * kl_p_m, logp, {})


def sampled_reverse_kl(
    logits: Tensor,
    teacher: TeacherLogprobs,
    tokens: Tensor,
    *,
    is_clip: float | None = None,
    behavior_logprobs: Tensor | None = None,
) -> TokenLoss:
    """sampled_rkl (policy gradient): A_t = sg(log q(y_t) - log p(y_t)), loss = -w_t A_t log p(y_t).

    Its expectation over y ~ p has the full reverse-KL gradient p_j (r_j - KL). With rollout-engine
    log-probs `behavior_logprobs` and `is_clip`, w_t = sg(min(exp(log p(y_t) - log p_behavior(y_t)),
    is_clip)) (truncated importance sampling); otherwise w_t = 1.
    Diagnostics: k1 = log p - log q, k2 = (log p - log q)^2 / 2, k3 = (rho - 1) - log rho with
    rho = q/p, all at y_t; k1 and k3 are unbiased estimators of KL(p || q), k3 >= 0."""
    logp = F.log_softmax(logits, -1)
    logp_y = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if teacher.sampled is not None:
        logq_y = teacher.sampled
    elif teacher.full is not None:
        logq_y = teacher.full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    else:
        raise ValueError(
            "loss 'sampled_rkl' needs the teacher's log-prob of the sampled token "
            "(TeacherLogprobs.sampled or full)"
        )
    log_ratio = (logq_y - logp_y).detach()  # the advantage
    weight = torch.ones_like(log_ratio)
    extra = {}
    if is_clip is not None and behavior_logprobs is not None:
        weight = torch.exp(logp_y.detach() - behavior_logprobs.to(logp_y.dtype)).clamp_max(is_clip)
        extra["is_weight"] = weight
    k1 = -log_ratio
    extra.update(k1=k1, k2=0.5 * k1**2, k3=torch.expm1(log_ratio) - log_ratio)
    return TokenLoss(-(weight * log_ratio) * logp_y, logp, extra)


def _topk_reverse_kl(
    logits: Tensor,
    teacher: TeacherLogprobs,
    *,
    loss: str,
    k: int,
    support: str,
    tail_bucket: bool,
    stopgrad: bool,
    renorm: bool,
) -> TokenLoss:
    """The TopK family on buckets b in S (+ the tail bucket): sum_b w_b (l_b - lq_b), with
    l_b = log p_b (renormalized over the buckets if renorm), w_b = exp(l_b), and l_b under
    stop-gradient inside the log-ratio if stopgrad."""
    if support in ("student", "union") and teacher.full is None:
        raise ValueError(
            f"loss '{loss}' with support='{support}' needs log q for student top-K tokens the teacher did "
            "not list: give full teacher log-probs (TeacherLogprobs.full or TeacherHidden), or use "
            "support='intersection' (the paper authors' setting: such tokens are excluded) or 'teacher'"
        )
    logp = F.log_softmax(logits, -1)
    support_set = topk_support(logp, teacher, k, support)
    valid = support_set.valid
    lq, _ = teacher_logprobs_at(teacher, support_set.ids)  # known wherever valid, by construction
    lq = torch.where(valid, lq, 0.0)
    if renorm and not tail_bucket:
        # from the logits, not from log p: the tail logits then get exactly zero gradient
        lp = logits.gather(-1, support_set.ids)
    else:
        lp = logp.gather(-1, support_set.ids)
    if tail_bucket:
        # the mass outside S as one more bucket, summed over the tail (no 1 - P_S cancellation)
        in_s = _support_mask(support_set, logits.shape[-1])
        p_tail = logp.exp().masked_fill(in_s, 0.0).sum(-1)
        if teacher.full is not None:
            q_tail = teacher.full.exp().masked_fill(in_s, 0.0).sum(-1)
        else:
            q_tail = (1.0 - torch.where(valid, lq.exp(), 0.0).sum(-1)).clamp_min(0.0)
        tiny = torch.finfo(lp.dtype).tiny
        lp = torch.cat([lp, p_tail.clamp_min(tiny).log().unsqueeze(-1)], -1)
        lq = torch.cat([lq, q_tail.clamp_min(tiny).log().unsqueeze(-1)], -1)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], -1)
    if renorm:
        lp = lp - _masked_logsumexp(lp, valid).unsqueeze(-1)
        lq = lq - _masked_logsumexp(lq, valid).unsqueeze(-1)
    log_ratio = (lp.detach() if stopgrad else lp) - lq
    per_token = torch.where(valid, lp.exp() * log_ratio, 0.0).sum(-1)
    return TokenLoss(per_token, logp, {}, support_set)


def topk_reverse_kl(
    logits: Tensor,
    teacher: TeacherLogprobs,
    tokens: Tensor,
    *,
    k: int = 20,
    support: str = "student",
    tail_bucket: bool = False,
) -> TokenLoss:
    """topk_rkl (naive, biased): sum_{v in S} p(v) (log p(v) - log q(v)), not renormalized.

    sum_S p grad log p = grad P_S != 0, so the "+1" survives: for j outside S,
    d/dz_j = -p_j (KL_S + P_S) (descent raises tail logits); a token in S is pushed up only if q > e p.
    tail_bucket adds (1 - P_S) (log(1 - P_S) - log(1 - Q_S)) and removes the bias at p = q."""
    return _topk_reverse_kl(
        logits,
        teacher,
        loss="topk_rkl",
        k=k,
        support=support,
        tail_bucket=tail_bucket,
        stopgrad=False,
        renorm=False,
    )


def topk_reverse_kl_stopgrad(
    logits: Tensor,
    teacher: TeacherLogprobs,
    tokens: Tensor,
    *,
    k: int = 20,
    support: str = "student",
    tail_bucket: bool = False,
) -> TokenLoss:
    """topk_rkl_stopgrad: sum_{v in S} p(v) (sg(log p(v)) - log q(v)).

    The "+1" is gone (push-up criterion q > p), but for j outside S, d/dz_j = -p_j KL_S: the tail
    still rises whenever the truncated KL is positive."""
    return _topk_reverse_kl(
        logits,
        teacher,
        loss="topk_rkl_stopgrad",
        k=k,
        support=support,
        tail_bucket=tail_bucket,
        stopgrad=True,
        renorm=False,
    )


def topk_reverse_kl_renorm(
    logits: Tensor,
    teacher: TeacherLogprobs,
    tokens: Tensor,
    *,
    k: int = 20,
    support: str = "student",
    tail_bucket: bool = False,
    stopgrad: bool = False,
) -> TokenLoss:
    """topk_rkl_renorm: with p~ = p / P_S and q~ = q / Q_S on S, sum_{v in S} p~(v) (log p~(v) - log q~(v))
    (stopgrad=True: sg(log p~) inside the log-ratio). Tail logits get exactly zero gradient.
    With tail_bucket the buckets cover the whole vocabulary, so renormalizing is a no-op and this
    equals topk_rkl (or topk_rkl_stopgrad) with tail_bucket."""
    return _topk_reverse_kl(
        logits,
        teacher,
        loss="topk_rkl_renorm",
        k=k,
        support=support,
        tail_bucket=tail_bucket,
        stopgrad=stopgrad,
        renorm=True,
    )


# name -> per-token function on flattened rows: fn(logits [N, V] fp32, teacher rows, tokens [N], **options)
LOSSES: dict[str, Callable[..., TokenLoss]] = {
    "full_rkl": full_reverse_kl,
    "full_fkl": full_forward_kl,
    "gjsd": generalized_jsd,
    "sampled_rkl": sampled_reverse_kl,
    "topk_rkl": topk_reverse_kl,
    "topk_rkl_stopgrad": topk_reverse_kl_stopgrad,
    "topk_rkl_renorm": topk_reverse_kl_renorm,
}


def loss_options(name: str) -> dict[str, object]:
    """The options a loss accepts and their defaults (its keyword-only parameters + the common ones)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}'; allowed: {sorted(LOSSES)}")
    params = inspect.signature(LOSSES[name]).parameters.values()
    own = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return {**own, **COMMON_OPTIONS}


# --------------------------------------------------------------------------------------- validation
def _fail(msg: str) -> None:
    raise ValueError(msg)


def resolve_options(name: str, options: dict) -> tuple[dict, dict]:
    """Split and check options -> (per-token loss options, common options), defaults filled in.
    Checks that need the vocabulary size (k <= V) happen in validate_batch."""
    allowed = loss_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        _fail(f"unknown option(s) {unknown} for loss '{name}'; allowed options: {sorted(allowed)}")
    opts = {**allowed, **options}
    if "k" in opts and (isinstance(opts["k"], bool) or not isinstance(opts["k"], int) or opts["k"] < 1):
        _fail(f"k must be an int >= 1 (and <= vocab size), got k={opts['k']!r}")
    if "support" in opts and opts["support"] not in SUPPORTS:
        _fail(f"unknown support={opts['support']!r}; allowed: {list(SUPPORTS)}")
    if opts["reduction"] not in REDUCTIONS:
        _fail(f"unknown reduction={opts['reduction']!r}; allowed: {list(REDUCTIONS)}")
    if "beta" in opts and not (isinstance(opts["beta"], int | float) and 0.0 <= opts["beta"] <= 1.0):
        _fail(f"beta must be a float in [0, 1], got beta={opts['beta']!r}")
    if opts.get("is_clip") is not None and not (
        isinstance(opts["is_clip"], int | float) and opts["is_clip"] > 0
    ):
        _fail(f"is_clip must be None or a float > 0, got is_clip={opts['is_clip']!r}")
    for flag in ("tail_bucket", "stopgrad", "diagnostics"):
        if flag in opts and not isinstance(opts[flag], bool):
            _fail(f"{flag} must be a bool, got {flag}={opts[flag]!r}")
    dk = opts["diag_k"]
    if dk is not None and (isinstance(dk, bool) or not isinstance(dk, int) or dk < 1):
        _fail(f"diag_k must be None or an int >= 1, got diag_k={dk!r}")
    common = {key: opts.pop(key) for key in COMMON_OPTIONS}
    if common["diag_k"] is None:
        common["diag_k"] = opts.get("k", DEFAULT_DIAG_K)
    return opts, common


def validate_batch(
    logits_shape: tuple,
    vocab: int,
    teacher: TeacherLogprobs | TeacherHidden,
    tokens: Tensor,
    mask: Tensor,
    loss_opts: dict,
) -> None:
    """Shape/dtype/vocab checks; `logits_shape` is [B, T, V] (or [B, T, H] for hidden states)."""
    if len(logits_shape) != 3:
        _fail(f"student logits/hidden must be 3-D [B, T, V], got shape {tuple(logits_shape)}")
    bt = tuple(logits_shape[:2])
    if tokens.dtype != torch.long:
        _fail(f"tokens must be torch.long (dtype mismatch: got {tokens.dtype})")
    if tuple(tokens.shape) != bt:
        _fail(f"tokens shape mismatch: expected {bt} (B, T), got {tuple(tokens.shape)}")
    if tuple(mask.shape) != tuple(tokens.shape):
        _fail(f"mask shape mismatch: mask {tuple(mask.shape)} != tokens {tuple(tokens.shape)}")
    if mask.dtype.is_complex:
        _fail(f"mask must be bool, int or float (dtype mismatch: got {mask.dtype})")
    sel = mask != 0
    if sel.any() and (int(tokens[sel].min()) < 0 or int(tokens[sel].max()) >= vocab):
        _fail(f"token ids out of range: response tokens must lie in [0, V={vocab})")
    if "k" in loss_opts and loss_opts["k"] > vocab:
        _fail(f"k must be an int in [1, V={vocab}], got k={loss_opts['k']}")
    if isinstance(teacher, TeacherHidden):
        if teacher.lm_head_weight.shape[0] != vocab:
            _fail(
                f"vocab size mismatch: student V={vocab}, teacher lm_head V={teacher.lm_head_weight.shape[0]}"
            )
        if teacher.hidden.dim() != 3 or tuple(teacher.hidden.shape[:2]) != bt:
            _fail(f"teacher hidden shape mismatch: expected {bt} + (Ht,), got {tuple(teacher.hidden.shape)}")
        if teacher.hidden.shape[-1] != teacher.lm_head_weight.shape[1]:
            _fail("teacher hidden size mismatch: hidden [..., Ht] vs lm_head_weight [V, Ht]")
    elif isinstance(teacher, TeacherLogprobs):
        if teacher.full is not None:
            if teacher.full.shape[-1] != vocab:
                _fail(
                    f"vocab size mismatch: student V={vocab}, teacher full log-probs V={teacher.full.shape[-1]}"
                )
            if tuple(teacher.full.shape[:2]) != bt or teacher.full.dim() != 3:
                _fail(f"teacher full shape mismatch: expected {bt} + (V,), got {tuple(teacher.full.shape)}")
        if (teacher.topk_ids is None) != (teacher.topk_logprobs is None):
            _fail("teacher topk_ids and topk_logprobs must be given together")
        if teacher.topk_ids is not None:
            if teacher.topk_ids.dtype != torch.long:
                _fail(f"teacher topk_ids must be torch.long (dtype mismatch: got {teacher.topk_ids.dtype})")
            if teacher.topk_ids.dim() != 3 or tuple(teacher.topk_ids.shape[:2]) != bt:
                _fail(
                    f"teacher topk_ids shape mismatch: expected {bt} + (Kt,), got {tuple(teacher.topk_ids.shape)}"
                )
            if teacher.topk_logprobs.shape != teacher.topk_ids.shape:
                _fail("teacher topk_logprobs shape mismatch: must equal topk_ids' shape")
            if teacher.topk_ids.numel() and int(teacher.topk_ids.max()) >= vocab:
                _fail(
                    f"vocab size mismatch: teacher top-K id {int(teacher.topk_ids.max())} >= student V={vocab}"
                )
        if teacher.sampled is not None and tuple(teacher.sampled.shape) != bt:
            _fail(f"teacher sampled shape mismatch: expected {bt}, got {tuple(teacher.sampled.shape)}")
    else:
        _fail(f"teacher must be TeacherLogprobs or TeacherHidden, got {type(teacher).__name__}")
    behavior = loss_opts.get("behavior_logprobs")
    if behavior is not None and not isinstance(behavior, Tensor):
        _fail(f"behavior_logprobs must be None or a [B, T] tensor, got {type(behavior).__name__}")
    if behavior is not None and tuple(behavior.shape) != bt:
        _fail(f"behavior_logprobs shape mismatch: expected {bt}, got {tuple(behavior.shape)}")


# ----------------------------------------------------------------------------- shared row pipeline
def token_weights(sel: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    """[B, T] weights so that loss = sum(w * per_token): precomputed, so chunks never need each other.
    token_mean: 1 / (#response tokens); seq_mean: 1 / len(seq) / (#non-empty sequences);
    "sum" (internal, for gradients): 1 per response token."""
    w = sel.to(dtype)
    if reduction == "sum":
        return w
    if reduction == "token_mean":
        return w / w.sum().clamp_min(1.0)
    lengths = w.sum(1, keepdim=True)
    n_seq = (lengths > 0).sum().clamp_min(1).to(dtype)
    return w / lengths.clamp_min(1.0) / n_seq


def flatten_rows(x: Tensor, sel: Tensor, all_selected: bool) -> Tensor:
    """[B, T, ...] -> [N, ...] response rows; a view (no copy) when every position is selected."""
    return x.reshape(-1, *x.shape[2:]) if all_selected else x[sel]


@torch.no_grad()
def row_diagnostics(
    out: TokenLoss, teacher: TeacherLogprobs, tokens: Tensor, diag_k: int
) -> dict[str, Tensor]:
    """Per-row diagnostics from the loss's own tensors (no extra forward).

    student/teacher_mass_in_support: mass in the loss's S, or in the student's top-diag_k for losses
    without S (with a top-K-only teacher, unlisted tokens count as 0 teacher mass: as in the authors'
    code). topk_overlap: |student top-K & teacher top-K| / K, K = min(diag_k, teacher list length).
    sampled_logratio: log q(y_t) - log p(y_t). student_entropy: -sum_v p log p."""
    logp = out.student_logp.detach()
    vocab = logp.shape[-1]
    p = logp.exp() if out.student_probs is None else out.student_probs.detach()
    diag = {"loss": out.per_token.detach(), "student_entropy": -_rowdot(p, logp)}
    del p
    logq_y = teacher.sampled
    if logq_y is None and teacher.full is not None:
        logq_y = teacher.full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if logq_y is not None:
        diag["sampled_logratio"] = logq_y - logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    k_overlap = min(diag_k, vocab)
    if teacher.full is None and teacher.topk_ids is not None:
        k_overlap = min(k_overlap, teacher.topk_ids.shape[-1])
    student_top = logp.topk(k_overlap, dim=-1).indices
    support = out.support
    if support is None:
        support = Support(student_top, torch.ones_like(student_top, dtype=torch.bool))
    diag["student_mass_in_support"] = torch.where(support.valid, logp.gather(-1, support.ids).exp(), 0.0).sum(
        -1
    )
    if teacher.full is not None or teacher.topk_ids is not None:
        logq_s, known = teacher_logprobs_at(teacher, support.ids)
        diag["teacher_mass_in_support"] = torch.where(support.valid & known, logq_s.exp(), 0.0).sum(-1)
        teacher_top = _teacher_topk_ids(teacher, k_overlap)
        diag["topk_overlap"] = _isin_rows(student_top, teacher_top).sum(-1).to(logp.dtype) / k_overlap
    diag.update({key: v.detach() for key, v in out.extra.items()})
    return diag


def loss_on_rows(
    name: str,
    logits_rows: Tensor,
    teacher_rows: TeacherLogprobs,
    tokens_rows: Tensor,
    weights_rows: Tensor,
    loss_opts: dict,
    diag_k: int,
    diagnostics: bool,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted loss sum and diagnostics for N rows (a whole batch or one chunk)."""
    out = LOSSES[name](_upcast(logits_rows), teacher_rows, tokens_rows, **loss_opts)
    loss = (weights_rows.to(out.per_token.dtype) * out.per_token).sum()
    diag = row_diagnostics(out, teacher_rows, tokens_rows, diag_k) if diagnostics else {}
    return loss, diag


def scatter_rows(values: dict[str, Tensor], sel: Tensor) -> dict[str, Tensor]:
    """[N] row values -> [B, T] tensors with 0 on padding."""
    result = {}
    for key, v in values.items():
        full = torch.zeros(sel.shape, dtype=v.dtype, device=v.device)
        full[sel] = v
        result[key] = full
    return result


def _as_logprobs(teacher: Teacher, tokens: Tensor) -> TeacherLogprobs:
    """Prepared (detached, upcast, clamped) teacher log-probs; a TeacherHidden is materialized to
    [B, T, V] here (chunked_loss avoids that)."""
    if isinstance(teacher, TeacherHidden):
        return teacher.to_logprobs(tokens)
    return teacher.prepared()


def _compute(
    name: str,
    student_logits: Tensor,
    teacher: Teacher,
    tokens: Tensor,
    mask: Tensor,
    options: dict,
    reduction_override: str | None = None,
) -> LossOutput:
    loss_opts, common = resolve_options(name, options)
    if student_logits.dim() != 3 or not student_logits.dtype.is_floating_point:
        _fail(
            f"student_logits must be a float tensor [B, T, V], got shape {tuple(student_logits.shape)} "
            f"dtype {student_logits.dtype}"
        )
    vocab = student_logits.shape[-1]
    validate_batch(tuple(student_logits.shape), vocab, teacher, tokens, mask, loss_opts)
    teacher = _as_logprobs(teacher, tokens)
    sel = mask != 0
    all_selected = bool(sel.all())
    compute_dtype = _upcast(student_logits[:0]).dtype
    weights = token_weights(sel, reduction_override or common["reduction"], compute_dtype)
    row_opts = {
        key: flatten_rows(v, sel, all_selected) if isinstance(v, Tensor) else v
        for key, v in loss_opts.items()
    }
    logits_rows = flatten_rows(student_logits, sel, all_selected)
    teacher_rows = teacher.map(lambda x: flatten_rows(x, sel, all_selected))
    check_student_logits(logits_rows, sel)
    check_teacher_values(teacher_rows, sel)
    loss, diag = loss_on_rows(
        name,
        logits_rows,
        teacher_rows,
        flatten_rows(tokens, sel, all_selected),
        flatten_rows(weights, sel, all_selected),
        row_opts,
        common["diag_k"],
        common["diagnostics"],
    )
    return LossOutput(loss, scatter_rows(diag, sel))


def compute_loss(
    name: str, student_logits: Tensor, teacher: Teacher, tokens: Tensor, mask: Tensor, **options
) -> LossOutput:
    """The loss `name` (a key of LOSSES) on a batch, reduced by options['reduction'].

    Options: the loss's own (see `loss_options(name)`) plus reduction ("token_mean": mean over all
    response tokens; "seq_mean": per-sequence mean, then mean over non-empty sequences), diag_k (K of
    the overlap diagnostic; default the loss's k, else 20) and diagnostics (bool). A TeacherHidden is
    materialized to full log-probs here; use `chunked_loss` to avoid that."""
    return _compute(name, student_logits, teacher, tokens, mask, options)


# ------------------------------------------------------------------------------ gradient diagnostics
def logit_grad(
    name: str, student_logits: Tensor, teacher: Teacher, tokens: Tensor, mask: Tensor, **options
) -> Tensor:
    """d(sum over response tokens of the per-token loss) / d logits: [B, T, V] (fp32 at least), i.e.
    each position's own d l_t / d z_t; 0 on padding. Computed by autograd on a detached copy."""
    options = {**options, "diagnostics": False}
    logits = _upcast(student_logits.detach()).requires_grad_(True)
    with torch.enable_grad():
        out = _compute(name, logits, teacher, tokens, mask, options, reduction_override="sum")
        (grad,) = torch.autograd.grad(out.loss, logits, allow_unused=True)
    return torch.zeros_like(logits) if grad is None else grad


def full_reverse_kl_logit_grad(student_logits: Tensor, teacher_full: Tensor) -> Tensor:
    """Closed form d KL(p || q) / d z_j = p_j (log p_j - log q_j - KL), [..., V]."""
    logp = F.log_softmax(_upcast(student_logits.detach()), -1)
    logq = _upcast(teacher_full.detach()).clamp_min(_log_tiny(logp.dtype))
    p = logp.exp()
    r = logp - logq
    return p * (r - _rowdot(p, r).unsqueeze(-1))


def grad_cosine_to_full_rkl(
    name: str,
    student_logits: Tensor,
    teacher: Teacher,
    tokens: Tensor,
    mask: Tensor,
    reduce: str = "mean",
    **options,
) -> Tensor:
    """Cosine between loss `name`'s per-token logit gradient and the full reverse-KL one.

    reduce="none": [B, T] (0 on padding); "mean": mean over response tokens (a scalar). Needs the
    teacher's full log-probs (TeacherLogprobs.full or TeacherHidden), also for sampled_rkl, whose
    per-token gradient is a one-sample estimate (low cosine per token; its mean over y ~ p is exact).
    A zero gradient (e.g. student == teacher) gives cosine 0."""
    if reduce not in ("mean", "none"):
        _fail(f"unknown reduce={reduce!r}; allowed: ['mean', 'none']")
    full = _as_logprobs(teacher, tokens)
    grad = logit_grad(name, student_logits, full, tokens, mask, **options)
    reference = full_reverse_kl_logit_grad(student_logits, _require_full(full, "grad_cosine_to_full_rkl"))
    cos = F.cosine_similarity(grad, reference.to(grad.dtype), dim=-1, eps=1e-30)
    sel = mask != 0
    cos = torch.where(sel, cos, 0.0)
    if reduce == "none":
        return cos
    return cos.sum() / sel.sum().clamp_min(1)
