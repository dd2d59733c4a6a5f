"""`opd report` and grid presets: a synthetic multirun directory (with a failed and an unfinished job),
grid expansion and slicing, and the CI smoke (a 2-cell few-step multirun on the testbed, then the report).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_opd

from opd_cli.report import build_report
from opd_cli.verdicts import job_verdict

REPO = Path(__file__).resolve().parents[1]


def opd(*args: str, cwd: Path | None = None, timeout: int = 600):
    return run_opd(*args, cwd=cwd, timeout=timeout)


def fake_job(
    root: Path,
    num: int,
    cell: str,
    seed: int,
    accs: list[float],
    *,
    verdict: str = "collapses",
    status: str = "ok",
    error: str | None = None,
    rollout_acc: float = 0.2,
    better_than: str | None = None,
) -> Path:
    """A job directory as `opd run -m` leaves it: config, status, metrics, evals, summary."""
    d = root / str(num)
    (d / "eval").mkdir(parents=True)
    (d / ".hydra").mkdir()
    cfg = {
        "seed": seed,
        "loss": {"name": "topk_rkl"},
        "cell": {"name": cell, "axis": "loss", "paper_verdict": verdict, "better_than": better_than},
    }
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"experiment={cell}", f"seed={seed}"]))
    steps = [i * 10 for i in range(len(accs))]
    for step, acc in zip(steps, accs, strict=True):
        result = {
            "step": step,
            "main": {"accuracy": acc, "mean_length": 30.0 + step, "truncation_ratio": 0.0},
        }
        (d / "eval" / f"step_{step:06d}.json").write_text(json.dumps(result))
    lines = [
        {
            "step": s,
            "rollout_accuracy": rollout_acc,
            "response_length": 30.0,
            "topk_overlap": 0.9,
            "hedging_rate": 0,
        }
        for s in range(1, steps[-1] + 1)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = {"start_accuracy": accs[0], "final_accuracy": accs[-1], "collapsed_at": None}
    if status == "ok":
        (d / "summary.json").write_text(json.dumps(summary))
    (d / "status.json").write_text(
        json.dumps({"status": status, "error": error, "overrides": [], "wall_s": 60.0})
    )
    return d


@pytest.fixture()
def sweep(tmp_path):
    root = tmp_path / "multirun"
    fake_job(root, 0, "naive", 0, [0.7, 0.95, 0.1])  # collapses, as the paper says
    fake_job(root, 1, "naive", 1, [0.7, 0.9, 0.2])
    fake_job(root, 2, "stopgrad", 0, [0.7, 0.8, 0.85], verdict="stable", better_than="naive")  # improves
    fake_job(root, 3, "stopgrad", 1, [0.7], verdict="stable", status="failed", error="loss.k=999 > vocab")
    fake_job(root, 4, "full", 0, [0.7, 0.6, 0.5], verdict="stable", status="running")  # killed, unfinished
    return root


def test_report_on_a_synthetic_multirun(sweep, tmp_path):
    out = tmp_path / "report"
    report, text = build_report([sweep], out)
    cells = {c.name: c for c in report.cells}
    assert cells["naive"].verdict == "collapses" and cells["naive"].match is True
    assert cells["naive"].verdicts == ["collapses", "collapses"]
    mean, sd, n = cells["naive"].stat("final_accuracy")
    assert n == 2 and mean == pytest.approx(0.15) and sd == pytest.approx(0.0707, abs=1e-3)
    assert cells["stopgrad"].verdict == "improves" and cells["stopgrad"].match is True  # stable <- improves
    assert cells["full"].verdict == "unfinished" and cells["full"].match is None
    # the failed job is shown as failed with its error, not dropped
    assert "failed" in text and "loss.k=999 > vocab" in text
    assert "| stopgrad | loss | 1 (+1 failed)" in text
    assert "Paper verdict reproduced in **2 of 2**" in text
    assert report.comparisons[0]["holds"] is True  # stopgrad (0.85) better than naive (0.15)
    for name in ("report.md", "report.html", "report.json", "accuracy.png", "response_length.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "report.json").read_text())
    assert summary["naive"]["verdict"] == "collapses" and summary["full"]["verdict"] == "unfinished"
    # per seed, for opd preflight --against: the finished jobs' verdicts, every job's wall time
    assert summary["stopgrad"]["seed_verdicts"] == {"0": "improves"}
    assert summary["naive"]["wall_s"] == {"0": 60.0, "1": 60.0}


def test_a_cell_whose_only_job_failed_is_reported_failed(tmp_path):
    root = tmp_path / "m"
    fake_job(root, 0, "renorm", 0, [0.7], verdict="stable", status="failed", error="boom")
    report, text = build_report([root], tmp_path / "out", plots=False)
    assert report.cells[0].verdict == "failed" and "boom" in text


def test_verdict_rules():
    base = {"start_accuracy": 0.7, "best_accuracy": 0.9}
    assert job_verdict({**base, "final_accuracy": 0.3}) == "collapses"
    assert job_verdict({**base, "final_accuracy": 0.6}) == "degrades"
    assert job_verdict({**base, "final_accuracy": 0.72}) == "stable"
    assert job_verdict({**base, "final_accuracy": 0.8}) == "improves"
    # greedy survives, but the student's own samples fell apart: still a collapse
    sampled = {"sampled_start": 0.2, "sampled_best": 0.25, "sampled_final": 0.02}
    assert job_verdict({**base, "final_accuracy": 0.8, **sampled}) == "collapses"
    # a base model that never learned anything neither improves nor collapses
    assert job_verdict({"start_accuracy": 0.0, "best_accuracy": 0.01, "final_accuracy": 0.0}) == "stable"
    # shared-rule OPSD: internalized and as accurate as the rule-teacher
    rule = {**base, "final_accuracy": 0.68, "internalization": 0.9, "teacher_accuracy": 0.7}
    assert job_verdict(rule, metric="internalization") == "improves"
    assert job_verdict({**rule, "internalization": 0.1}, metric="internalization") == "stable"


def test_bench_matrix_times_a_sweep_from_its_job_files(sweep):
    from opd_cli.bench.matrix_bench import format_report, job_times

    times = job_times(sweep)
    assert len(times) == 5 and {t.wall_s for t in times} == {60.0}
    text = format_report(times, None, seeds=2, where=str(sweep))
    assert "| naive | 2 | 60 | 60-60 | ok |" in text
    assert "sum of job wall times 5.0 min" in text and "per seed" in text and "target" in text


def test_report_cli_bad_input_is_one_line_exit_2(tmp_path):
    res = opd("report", str(tmp_path / "nope"), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "not a directory" in res.stderr
    (tmp_path / "empty").mkdir()
    res = opd("report", str(tmp_path / "empty"), cwd=tmp_path)
    assert res.returncode == 2 and "no job directories" in res.stderr


# ------------------------------------------------------------------------------------------- grids
def test_grid_expansion_and_slicing():
    from opd_cli.errors import UsageError
    from opd_cli.grid import expand_grid, grid_cells
    from opd_cli.launch import cell_choices, compose, conf_dir

    cells = grid_cells(conf_dir(), "matrix")
    assert len(cells) >= 14 and grid_cells(conf_dir(), "opd_full_rkl") is None
    for cell in cells:  # every cell is a preset that states the paper's claim and opens with its command
        cfg = compose([f"experiment={cell}"])
        assert cfg.cell.name == cell and cfg.cell.axis and cfg.cell.paper_claim, cell
        assert f"opd run experiment={cell}" in (conf_dir() / "experiment" / f"{cell}.yaml").read_text()
    e = expand_grid(["experiment=matrix", "seed=0,1,2"], True, conf_dir(), cell_choices)
    assert e.overrides == [f"experiment={','.join(cells)}", "seed=0,1,2"] and not e.filters
    slice_ = ["experiment=matrix", "loss=topk_rkl,topk_rkl_stopgrad", "rollout=vllm"]
    e = expand_grid(slice_, True, conf_dir(), cell_choices)
    assert e.filters == ["loss=topk_rkl,topk_rkl_stopgrad"] and "rollout=vllm" in e.overrides
    assert {cell_choices(c)["loss"] for c in e.cells} == {"topk_rkl", "topk_rkl_stopgrad"}
    assert "opd_naive_topk_k5" in e.cells and "opd_full_rkl" not in e.cells
    with pytest.raises(UsageError, match="no cell of experiment=matrix matches loss=gjsd"):
        expand_grid(["experiment=matrix", "loss=gjsd"], True, conf_dir(), cell_choices)
    with pytest.raises(UsageError, match="is a grid of .* run it as a sweep: opd run -m experiment=matrix"):
        expand_grid(["experiment=matrix"], False, conf_dir(), cell_choices)
    assert expand_grid(["experiment=opd_full_rkl"], False, conf_dir(), cell_choices) is None


@pytest.mark.slow
def test_ci_smoke_two_cells_then_report(tmp_path):
    """The grid pipeline end to end on the shipped testbed: 2 cells x 3 steps, then `opd report`."""
    sweep = tmp_path / "sweep"
    res = opd(
        "run",
        "-m",
        "experiment=matrix_smoke",
        "trainer.steps=3",
        "eval.every=0",
        "eval.size=16",
        "trainer.prompts_per_step=16",
        "logger=none",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "grid matrix_smoke: 2 of 2 cells" in res.stderr
    res = opd("report", str(sweep), "--out", str(tmp_path / "rep"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    text = (tmp_path / "rep" / "report.md").read_text()
    for cell in ("opd_naive_topk_k5", "opd_stopgrad_topk_k5"):
        assert f"| {cell} |" in text and cell in res.stdout
    assert "2 finished, 0 failed" in text
    # the headline and where the report is, printed
    assert "paper verdict reproduced in " in res.stdout and "cells with a verdict" in res.stdout
    assert f"report: {tmp_path / 'rep' / 'report.md'}" in res.stdout
