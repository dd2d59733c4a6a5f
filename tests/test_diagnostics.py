"""The per-step diagnostics (opd_cli/diagnostics.py): rollout signals and the collapse detector."""

from __future__ import annotations

import pytest

from opd_cli.diagnostics import CollapseDetector, hedging_count, repeat_ratio, rollout_signals


def _trace(values: list[tuple[float, float, float]]) -> list[dict]:
    return [{"truncation_ratio": t, "student_mass_in_support": m, "repeat_ratio": r} for t, m, r in values]


def test_repeat_ratio_and_hedging():
    assert repeat_ratio([1, 2, 3, 4, 5, 6]) == 0.0
    assert repeat_ratio([7] * 20) == pytest.approx(1 - 1 / 18)
    assert hedging_count("1+2;W;2+1;W;", ["W;"]) == 2
    sig = rollout_signals([[1, 2, 3], [4] * 10], ["ok", "W;W;"], ["stop", "length"], ["W;"], [True, False])
    assert sig["truncation_ratio"] == 0.5 and sig["hedging_rate"] == 0.5 and sig["rollout_accuracy"] == 0.5


def test_collapse_detector_fires_on_a_collapsing_trace():
    healthy = [(0.0, 0.99, 0.05)] * 10
    draining = [(0.1, 0.8, 0.1), (0.2, 0.45, 0.2), (0.6, 0.3, 0.3), (0.9, 0.2, 0.5), (1.0, 0.1, 0.7)]
    det = CollapseDetector(patience=3)
    fired = [det.update(i + 1, m) for i, m in enumerate(_trace(healthy + draining))]
    assert fired.count(True) == 1
    assert det.collapsed_at == 12  # first of the three consecutive bad steps (mass < 0.5 from step 12)


def test_collapse_detector_is_silent_on_healthy_noisy_and_never_healthy_runs():
    det = CollapseDetector(patience=3)
    noisy = [(0.0, 0.99, 0.05)] * 5 + [(0.7, 0.99, 0.05)] + [(0.0, 0.99, 0.05)] * 2 + [(0.0, 0.4, 0.05)] * 2
    assert not any(det.update(i + 1, m) for i, m in enumerate(_trace(noisy * 3)))
    never = CollapseDetector(patience=3)
    assert not any(never.update(i + 1, m) for i, m in enumerate(_trace([(1.0, 0.1, 0.9)] * 20)))
    assert never.collapsed_at is None


def test_collapse_detector_state_round_trips():
    det = CollapseDetector(patience=3)
    for i, m in enumerate(_trace([(0.0, 0.99, 0.0), (1.0, 0.1, 0.9), (1.0, 0.1, 0.9)])):
        det.update(i + 1, m)
    clone = CollapseDetector(patience=3)
    clone.load_state_dict(det.state_dict())
    assert clone.update(4, _trace([(1.0, 0.1, 0.9)])[0]) and clone.collapsed_at == 2
