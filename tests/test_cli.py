"""The command line: help texts, config composition, and one-line errors with exit code 2 on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_opd

REPO = Path(__file__).resolve().parent.parent


def opd(*args: str, cwd: Path | None = None, timeout: int = 120):
    return run_opd(*args, cwd=cwd, timeout=timeout)


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["run", "--help"],
        ["doctor", "--help"],
        ["bench", "--help"],
        ["bench", "loss", "--help"],
        ["bench", "step", "--help"],
    ],
)
def test_help_has_an_example(args):
    res = opd(*args)
    assert res.returncode == 0, res.stderr
    assert "Example" in res.stdout and "opd" in res.stdout


def test_cfg_job_prints_composed_config():
    res = opd("run", "--cfg", "job", "loss=topk_rkl", "loss.k=1", "teacher=rlvr", "seed=3", "trainer.lr=2e-4")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "name: topk_rkl" in out and "k: 1" in out
    assert "path: testbed:teacher_rlvr" in out and "seed: 3" in out and "lr: 0.0002" in out


def test_every_group_option_composes_and_validates():
    from opd_cli.launch import compose

    conf = REPO / "conf"
    for group in (
        "task",
        "model",
        "teacher",
        "loss",
        "stabilization",
        "rollout",
        "eval",
        "logger",
        "experiment",
    ):
        for option in sorted(p.stem for p in (conf / group).glob("*.yaml")):
            extra = ["task.path=/data/x.jsonl"] if option == "math" else []
            cfg = compose([f"{group}={option}", *extra])
            assert cfg is not None


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("loss=foo", "unknown option 'foo' for config group 'loss'; allowed: full_fkl"),
        ("trainer.lrr=1", "unknown config key 'trainer.lrr'"),
        ("+trainer.foo=2", "unknown config key 'trainer.foo'"),
        ("trainer.lr=abc", "trainer.lr='abc' has the wrong type: expected float"),
        ("loss.k=0", "loss.k=0 must be >= 1"),
        ("loss.support=bogus", "loss.support='bogus' is not allowed; choose one of: student"),
        ("rollout.engine=sglang", "rollout.engine='sglang' is not allowed"),
        ("teacher=self_answer teacher.pi_field=null", "teacher.kind=self_pi needs teacher.pi_field"),
        ("hydra/launcher=nope", "unknown option 'nope' for config group 'hydra/launcher'"),
        ("foo", "cannot parse override"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, override, expected):
    res = opd("run", *override.split(), cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert expected in lines[0]
    assert "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == [], "a rejected run must leave no output directory"


def test_bad_sweep_value_rejected_before_any_job(tmp_path):
    res = opd("run", "-m", "loss=topk_rkl,nope", "seed=0,1", cwd=tmp_path)
    assert res.returncode == 2
    assert "unknown option 'nope' for config group 'loss'" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_run_dir_is_not_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text("{}")
    res = opd("run", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 2 and "already holds a run" in res.stderr
    assert (run_dir / "summary.json").read_text() == "{}"


def test_resume_of_a_non_run_directory(tmp_path):
    res = opd("run", f"resume={tmp_path}", cwd=tmp_path)
    assert res.returncode == 2 and "not an opd run directory" in res.stderr


def test_debug_flag_shows_traceback(tmp_path):
    res = opd("--debug", "run", "loss.k=0", cwd=tmp_path)
    assert res.returncode != 0
    assert "Traceback" in res.stderr


def test_probe_with_no_problems_is_one_line_exit_2(tmp_path):
    res = opd("probe", "teacher=large", "-n", "0", "--out", str(tmp_path / "probe.json"), cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "-n 0: the probe needs at least one problem" in lines[0], res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "probe.json").exists()
