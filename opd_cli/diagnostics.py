"""Per-step signals the paper reads before accuracy shows a collapse, and the collapse detector.

Everything here works on data the step already has (rollout token ids, the loss's per-token
diagnostics, the verifier's verdicts): no extra forward passes. The gradient-cosine diagnostic lives in
`losses.grad_cosine_to_full_rkl` and is called every `diagnostics.every` steps by the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Absolute response-position buckets for the sampled-token log-ratio (the paper sees it large on early
# tokens): [0, 4), [4, 16), [16, 64), [64, inf).
POSITION_BUCKETS = ((0, 4), (4, 16), (16, 64), (64, None))


def repeat_ratio(ids: list[int], n: int = 3) -> float:
    """Fraction of the response's n-grams that already occurred earlier in it (0 = no repeats; -> 1 in
    a "maybe maybe maybe" loop)."""
    if len(ids) < n + 1:
        return 0.0
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def hedging_count(text: str, hedging_tokens: list[str]) -> int:
    return sum(text.count(tok) for tok in hedging_tokens if tok)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.to(x.dtype)
    denom = m.sum()
    return float((x * m).sum() / denom) if denom > 0 else float("nan")


def rollout_signals(
    responses: list[list[int]],
    texts: list[str],
    finish_reasons: list[str],
    hedging_tokens: list[str],
    correct: list[bool] | None,
) -> dict[str, float]:
    n = max(1, len(responses))
    out = {
        "response_length": sum(len(r) for r in responses) / n,
        "truncation_ratio": sum(f == "length" for f in finish_reasons) / n,
        "repeat_ratio": sum(repeat_ratio(r) for r in responses) / n,
        "hedging_per_response": sum(hedging_count(t, hedging_tokens) for t in texts) / n,
        "hedging_rate": sum(hedging_count(t, hedging_tokens) > 0 for t in texts) / n,
    }
    if correct is not None:
        out["rollout_accuracy"] = sum(correct) / n
    return out


def loss_signals(
    per_token: dict[str, torch.Tensor], mask: torch.Tensor, correct: list[bool] | None
) -> dict[str, float]:
    """Masked means of the loss's per-token diagnostics, plus the sampled-token log-ratio by position
    bucket and by rollout correctness."""
    out = {name: masked_mean(values, mask) for name, values in per_token.items()}
    ratio = per_token.get("sampled_logratio")
    if ratio is None:
        return out
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    for lo, hi in POSITION_BUCKETS:
        in_bucket = mask & (positions >= lo) & ((positions < hi) if hi is not None else True)
        if in_bucket.any():
            out[f"logratio_pos_{lo}_{hi or 'end'}"] = masked_mean(ratio, in_bucket)
    if correct is not None:
        right = torch.tensor(correct, device=mask.device, dtype=torch.bool)[:, None] & mask
        wrong = (~torch.tensor(correct, device=mask.device, dtype=torch.bool))[:, None] & mask
        if right.any():
            out["logratio_correct"] = masked_mean(ratio, right)
        if wrong.any():
            out["logratio_incorrect"] = masked_mean(ratio, wrong)
    return out


@dataclass
class CollapseDetector:
    """Flags the step at which a run left the task's distribution.

    A step is *bad* when any of these holds (defaults in `DiagnosticsConfig`):
    - truncation ratio > 0.5: most rollouts run to the length limit (the paper's length explosion);
    - student mass inside the TopK support < 0.5: half the probability leaked to tokens the loss never
      sees (the "+1" drain of mechanism 2; a healthy student keeps > 0.95 here);
    - 3-gram repeat ratio > 0.6: the "maybe maybe ..." loop (a well-formed scratchpad stays < 0.3).
    `patience` consecutive bad steps (default 3) mark the run collapsed at the first of them, so a single
    noisy batch never does. Only a run that has been healthy can collapse: a student that is malformed
    from step 1 (OPD from an un-SFT'd base model) is reported by its accuracy, not as a collapse.
    """

    truncation_threshold: float = 0.5
    mass_threshold: float = 0.5
    repeat_threshold: float = 0.6
    patience: int = 3
    collapsed_at: int | None = None
    _streak_start: int | None = None
    _streak: int = 0
    _was_healthy: bool = False

    def bad(self, metrics: dict[str, float]) -> list[str]:
        reasons = []
        if metrics.get("truncation_ratio", 0.0) > self.truncation_threshold:
            reasons.append("truncation")
        mass = metrics.get("student_mass_in_support")
        if mass is not None and mass == mass and mass < self.mass_threshold:
            reasons.append("support_mass")
        if metrics.get("repeat_ratio", 0.0) > self.repeat_threshold:
            reasons.append("repeats")
        return reasons

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Feed one step; True exactly once, at the step the run is declared collapsed."""
        if self.collapsed_at is not None:
            return False
        if not self.bad(metrics):
            self._was_healthy = True
        if self.bad(metrics) and self._was_healthy:
            if self._streak == 0:
                self._streak_start = step
            self._streak += 1
            if self._streak >= self.patience:
                self.collapsed_at = self._streak_start
                return True
        else:
            self._streak, self._streak_start = 0, None
        return False

    def state_dict(self) -> dict:
        return {
            "collapsed_at": self.collapsed_at,
            "streak_start": self._streak_start,
            "streak": self._streak,
            "was_healthy": self._was_healthy,
        }

    def load_state_dict(self, state: dict) -> None:
        self.collapsed_at = state["collapsed_at"]
        self._streak_start = state["streak_start"]
        self._streak = state["streak"]
        self._was_healthy = state["was_healthy"]
