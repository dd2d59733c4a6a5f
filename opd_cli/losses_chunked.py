"""Chunked OPD losses from hidden states: never materializes the [N_tokens, V] logits of the batch.

`chunked_loss(name, hidden, lm_head_weight, teacher, tokens, mask, ...)` equals
`compute_loss(name, lm_head_logits(hidden, W, b, scale), teacher, tokens, mask, ...)` in value and in
gradients w.r.t. hidden, lm_head_weight and lm_head_bias, but processes the response tokens in chunks of
`chunk_size` rows. The gradients are computed chunk by chunk during the forward pass (like a fused
linear-cross-entropy kernel) and handed to autograd in backward, so peak memory is a few
[chunk_size, V] fp32 tensors plus the [V, H] weight gradient that any path must produce.

Consequences: the forward does the backward's matmuls too (when a gradient is needed), and backward can
run only once per call (no retain_graph / double backward).
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd_cli.losses import (
    LossOutput,
    TeacherHidden,
    TeacherLogprobs,
    _fail,
    _upcast,
    check_student_logits,
    check_teacher_values,
    flatten_rows,
    lm_head_logits,
    loss_on_rows,
    resolve_options,
    scatter_rows,
    token_weights,
    validate_batch,
)


class _ChunkRunner:
    """Loops over row chunks; holds everything the per-chunk loss needs except the student's tensors."""

    def __init__(self, name, teacher, tokens, weights, row_opts, common, chunk_size, logit_scale, sel):
        self.name, self.teacher, self.tokens, self.weights, self.sel = name, teacher, tokens, weights, sel
        self.row_opts, self.common, self.chunk_size, self.logit_scale = (
            row_opts,
            common,
            chunk_size,
            logit_scale,
        )
        self.diag: dict[str, Tensor] = {}

    def _teacher_chunk(self, start: int, end: int) -> TeacherLogprobs:
        if isinstance(self.teacher, TeacherHidden):  # the same definition as compute_loss's
            teacher = self.teacher.rows(start, end).to_logprobs(self.tokens[start:end])
            check_teacher_values(teacher, self.sel, start)
            return teacher
        return self.teacher.map(lambda x: x[start:end])  # checked once, in chunked_loss

    def _chunk(self, start: int, end: int, h: Tensor, weight: Tensor, bias: Tensor | None, need_grad: bool):
        """Loss, diagnostics and d loss / d logits of one chunk; its [chunk, V] temporaries die on return."""
        logits = lm_head_logits(h, weight, bias, self.logit_scale).detach().requires_grad_(need_grad)
        check_student_logits(logits, self.sel, start)
        teacher = self._teacher_chunk(start, end)
        opts = {k: v[start:end] if isinstance(v, Tensor) else v for k, v in self.row_opts.items()}
        with torch.enable_grad():
            chunk_loss, diag = loss_on_rows(
                self.name,
                logits,
                teacher,
                self.tokens[start:end],
                self.weights[start:end],
                opts,
                self.common["diag_k"],
                self.common["diagnostics"],
            )
        del teacher, opts  # backward needs only what the graph saved: free the teacher's log-probs first
        g_logits = None
        if need_grad:
            (g_logits,) = torch.autograd.grad(chunk_loss, logits, allow_unused=True)
            if g_logits is None:  # a loss with no dependence on the logits (e.g. zero advantage)
                g_logits = torch.zeros_like(logits)
        return chunk_loss.detach(), diag, g_logits

    def run(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, need_grad: bool):
        """-> (loss, grad_hidden [N, H], grad_weight [V, H] fp32, grad_bias [V] fp32 or None)."""
        n_rows = hidden.shape[0]
        compute_dtype = _upcast(hidden[:0]).dtype
        loss = torch.zeros((), dtype=compute_dtype, device=hidden.device)
        grad_hidden = grad_weight = grad_bias = None
        if need_grad:
            grad_hidden = torch.empty_like(hidden)
            # accumulate in fp32 (fp64 for fp64 inputs): bf16 sums over thousands of chunks drift
            grad_weight = torch.zeros(weight.shape, dtype=compute_dtype, device=weight.device)
            grad_bias = (
                None if bias is None else torch.zeros(bias.shape, dtype=compute_dtype, device=bias.device)
            )
        diag_parts: dict[str, list[Tensor]] = {}
        for start in range(0, n_rows, self.chunk_size):
            end = min(start + self.chunk_size, n_rows)
            h = hidden[start:end]
            chunk_loss, diag, g_logits = self._chunk(start, end, h, weight, bias, need_grad)
            loss += chunk_loss
            for key, v in diag.items():
                diag_parts.setdefault(key, []).append(v)
            if need_grad:
                if self.logit_scale is not None:
                    g_logits = g_logits * self.logit_scale
                # manual backward of logits = h @ W.T + b (then upcast): same dtypes autograd would use
                grad_hidden[start:end] = g_logits.to(weight.dtype) @ weight
                grad_weight.addmm_(g_logits.t().to(compute_dtype), h.to(compute_dtype))
                if grad_bias is not None:
                    grad_bias += g_logits.sum(0)
                del g_logits  # before the next chunk allocates its own
        self.diag = {key: torch.cat(parts) for key, parts in diag_parts.items()}
        return loss, grad_hidden, grad_weight, grad_bias


class _ChunkedLinearLoss(torch.autograd.Function):
    """loss(hidden rows, W, b); gradients computed in forward by the runner, returned in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, runner):
        loss, grad_hidden, grad_weight, grad_bias = runner.run(hidden, weight, bias, need_grad=True)
        # kept as attributes (not save_for_backward) so backward can drop its reference and autograd
        # can adopt grad_weight as .grad without another [V, H] copy
        ctx.grads = (
            grad_hidden,
            grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("chunked_loss computes its gradients in forward; backward can run only once")
        grads, ctx.grads = ctx.grads, None
        if not bool(torch.all(grad_loss == 1)):  # loss.backward() passes 1: skip the [V, H] multiply
            grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)
        return (*grads, None)


def chunked_loss(
    name: str,
    hidden: Tensor,
    lm_head_weight: Tensor,
    teacher: TeacherLogprobs | TeacherHidden,
    tokens: Tensor,
    mask: Tensor,
    chunk_size: int = 1024,
    lm_head_bias: Tensor | None = None,
    logit_scale: float | None = None,
    **options,
) -> LossOutput:
    """compute_loss(name, ...) on logits = (hidden @ W.T + b) * logit_scale, `chunk_size` response
    tokens at a time.

    hidden [B, T, H] (student final hidden states), lm_head_weight [V, H], tokens/mask [B, T].
    teacher: TeacherHidden (its log-probs are computed per chunk: the cheap way to full-vocabulary
    losses) or TeacherLogprobs (top-K / sampled fields; `full` works, but then only the student side
    saves memory). Options as in compute_loss; both reductions use precomputed per-token weights."""
    loss_opts, common = resolve_options(name, options)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        _fail(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if hidden.dim() != 3 or not hidden.dtype.is_floating_point:
        _fail(
            f"hidden must be a float tensor [B, T, H], got shape {tuple(hidden.shape)} dtype {hidden.dtype}"
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        _fail(
            f"hidden size mismatch: hidden [..., {hidden.shape[-1]}] vs lm_head_weight {tuple(lm_head_weight.shape)}"
        )
    vocab = lm_head_weight.shape[0]
    if lm_head_bias is not None and tuple(lm_head_bias.shape) != (vocab,):
        _fail(f"lm_head_bias shape mismatch: expected ({vocab},), got {tuple(lm_head_bias.shape)}")
    validate_batch(tuple(hidden.shape), vocab, teacher, tokens, mask, loss_opts)

    sel = mask != 0
    all_selected = bool(sel.all())

    def rows(x: Tensor) -> Tensor:
        return flatten_rows(x, sel, all_selected)

    if isinstance(teacher, TeacherHidden):
        teacher_rows = TeacherHidden(
            rows(teacher.hidden.detach()),
            teacher.lm_head_weight.detach(),
            None if teacher.lm_head_bias is None else teacher.lm_head_bias.detach(),
            teacher.logit_scale,
        )
    else:
        teacher_rows = teacher.prepared().map(rows)
        check_teacher_values(teacher_rows, sel)
    compute_dtype = _upcast(hidden[:0]).dtype
    weights = rows(token_weights(sel, common["reduction"], compute_dtype))
    row_opts = {key: rows(v) if isinstance(v, Tensor) else v for key, v in loss_opts.items()}
    runner = _ChunkRunner(
        name, teacher_rows, rows(tokens), weights, row_opts, common, chunk_size, logit_scale, sel
    )

    hidden_rows = rows(hidden)
    inputs = [t for t in (hidden, lm_head_weight, lm_head_bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        loss = _ChunkedLinearLoss.apply(hidden_rows, lm_head_weight, lm_head_bias, runner)
    else:
        with torch.no_grad():
            loss = runner.run(hidden_rows, lm_head_weight, lm_head_bias, need_grad=False)[0]
    return LossOutput(loss, scatter_rows(runner.diag, sel))
