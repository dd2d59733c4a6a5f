"""The summary an `opd run` ends with (opd_cli/run_summary.py): figures from metrics.jsonl, the moved
warning signs, the collapse step."""

from __future__ import annotations

import json

from opd_cli.run_summary import format_summary, summary_lines


def write_run(run_dir, train: list[dict], evals: list[dict], summary: dict) -> None:
    run_dir.mkdir(parents=True)
    rows = [{"step": 0, **evals[0]}] + train[:-1] + [{**train[-1]}, {"step": train[-1]["step"], **evals[1]}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "summary.json").write_text(json.dumps(summary))


def step(i: int, mass: float, length: float, acc: float) -> dict:
    return {
        "step": i,
        "loss": 0.1,
        "rollout_accuracy": acc,
        "student_mass_in_support": mass,
        "topk_overlap": 0.9,
        "response_length": length,
        "truncation_ratio": 0.0,
        "hedging_rate": 0.0,
    }


def test_a_collapsing_run_names_the_step_and_the_signs_that_moved(tmp_path):
    train = [step(i, 0.99, 33.0, 0.3) for i in range(1, 11)] + [
        step(i, 0.4, 60.0, 0.0) for i in range(11, 21)
    ]
    evals = [
        {"eval/main/accuracy": 0.665, "eval/main/n": 200},
        {"eval/main/accuracy": 0.01, "eval/main/n": 200},
    ]
    write_run(tmp_path / "run", train, evals, {"collapsed_at": 12})
    text = format_summary(tmp_path / "run")
    lines = text.splitlines()
    assert lines[0].startswith("opd run summary") and lines[-1] == f"results: {tmp_path / 'run'}"
    assert "greedy accuracy (200 problems): 0.665 -> 0.010 (-0.655; best 0.665 at step 0)" in text
    assert "sampled accuracy (T=1 rollouts, first/last 10 steps): 0.300 -> 0.000 (-0.300)" in text
    assert "collapse: at step 12" in text and "verdict by opd report's rules: collapses" in text
    assert "moved: student top-K mass, response length" in text
    mass = next(x for x in lines if x.startswith("  student top-K mass"))
    overlap = next(x for x in lines if "top-K overlap" in x)
    assert mass.endswith("moved") and not overlap.endswith("moved")


def test_a_healthy_run_says_none_moved_and_an_empty_one_says_so(tmp_path):
    train = [step(i, 0.99, 33.0, 0.3) for i in range(1, 5)]
    evals = [{"eval/main/accuracy": 0.6}, {"eval/main/accuracy": 0.7}]
    write_run(tmp_path / "ok", train, evals, {"collapsed_at": None})
    text = "\n".join(summary_lines(tmp_path / "ok"))
    assert "collapse detector (truncation, top-K mass, repeats): not triggered in 4 steps" in text
    assert "none moved" in text and "first/last 2 steps" in text
    assert "verdict by opd report's rules: improves" in text  # 0.6 -> 0.7
    (tmp_path / "empty").mkdir()
    assert summary_lines(tmp_path / "empty") == ["no training steps logged"]
