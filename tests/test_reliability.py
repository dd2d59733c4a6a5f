"""Reliability: exact resume after SIGKILL, failed sweep jobs, concurrent runs, bad inputs, config fuzz.

Runs in-process (click's CliRunner around `opd run`, Hydra's basic launcher) wherever no kill is needed,
on the tiny random models of conftest with a few steps of 4 prompts, so the whole file takes a few
minutes at most on two busy cores. Only the killed runs are subprocesses.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import threads_for_tests

from opd_cli.checkpoint import latest_checkpoint, load_trainer_state
from opd_cli.cli import main
from opd_cli.launch import claim_dir, release_claims

TINY = [
    "trainer.prompts_per_step=4",
    "eval.size=4",
    "eval.max_new_tokens=16",
    "rollout.max_new_tokens=16",
    "rollout=hf",
    "logger=none",
    "task.train_size=32",
    "eval.every=0",
]


@pytest.fixture(autouse=True)
def _one_thread_in_tmp(tmp_path, monkeypatch):
    """Runs write relative to the cwd; one torch thread, as the subprocesses get (same float sums)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("OPD_DEBUG", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads_for_tests())
    yield
    torch.set_num_threads(threads)
    release_claims()


def opd_inprocess(*args: str):
    """`opd run ...` in this process; returns click's Result (exit_code, stdout, stderr, exception)."""
    from hydra.core.global_hydra import GlobalHydra

    try:
        return CliRunner().invoke(main, ["run", *args], catch_exceptions=True)
    finally:
        GlobalHydra.instance().clear()  # hydra.main leaves its global state initialized


def base_args(models, *extra: str) -> list[str]:
    return [f"model.path={models['student']}", f"teacher.path={models['teacher']}", *TINY, *extra]


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = [x for x in result.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def summary(run_dir: Path) -> dict:
    return {k: v for k, v in json.loads((run_dir / "summary.json").read_text()).items() if k != "run_dir"}


@pytest.mark.numerics
# ----------------------------------------------------------------------------------- kill and resume
def test_resuming_a_finished_run_logs_nothing_twice(models, tmp_path):
    """The last step's checkpoint is written after the final evaluation and carries it: a resume of a
    finished run (or of one killed after that checkpoint) must not evaluate and log the end again."""
    run_dir = tmp_path / "run"
    res = opd_inprocess(
        *base_args(models, "trainer.steps=2", "trainer.save_every=1"), f"hydra.run.dir={run_dir}"
    )
    assert res.exit_code == 0, res.output
    before, done = metrics(run_dir), summary(run_dir)
    assert sum(1 for r in before if r["step"] == 2 and "loss" not in r) == 1  # one final evaluation row
    # what a SIGKILL inside atomic_write_text / save_checkpoint leaves: a temp file and a temp directory
    ckpts = run_dir / "checkpoints"
    (ckpts / ".latest.abc123.tmp").write_text("step_0000")
    (ckpts / ".step_000003.tmp").mkdir()
    (ckpts / ".step_000003.tmp" / "model.safetensors").write_bytes(b"\0" * 10)
    res = opd_inprocess(f"resume={run_dir}")
    assert res.exit_code == 0, res.output
    assert metrics(run_dir) == before and summary(run_dir) == done
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000001", "step_000002"]


@pytest.mark.numerics
@pytest.mark.slow
def test_sigkill_at_three_random_steps_resumes_to_the_uninterrupted_metrics(models, tmp_path):
    steps = 6
    args = base_args(models, f"trainer.steps={steps}", "trainer.save_every=1", "eval.every=3")
    full = tmp_path / "full"
    res = opd_inprocess(*args, f"hydra.run.dir={full}")
    assert res.exit_code == 0, res.output
    reference = without_times(metrics(full))
    assert [r["step"] for r in reference if "loss" in r] == list(range(1, steps + 1))

    # Kill points: after step k's metrics line appears, i.e. anywhere in k's checkpoint write or step k+1.
    kill_after = sorted(random.Random(int(time.time())).sample(range(2, steps), 3))
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": str(threads_for_tests())}
    procs = {}
    for k in kill_after:  # the three killed runs share the cores: started together, each killed at its k
        run_dir = tmp_path / f"killed_{k}"
        procs[k] = (
            run_dir,
            subprocess.Popen(
                [sys.executable, "-m", "opd_cli.cli", "run", *args, f"hydra.run.dir={run_dir}"],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            ),
        )
    deadline = time.time() + 300
    pending = dict(procs)
    while pending and time.time() < deadline:
        for k, (run_dir, proc) in list(pending.items()):
            rows = metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
            if any(r.get("step", 0) >= k and "loss" in r for r in rows) or proc.poll() is not None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                del pending[k]
        time.sleep(0.05)
    for k, (run_dir, proc) in procs.items():
        assert proc.returncode == -signal.SIGKILL, (k, proc.stderr.read().decode()[-2000:])
        assert not (run_dir / "summary.json").exists(), f"run {k} finished before the kill"
        res = opd_inprocess(f"resume={run_dir}")
        assert res.exit_code == 0, (k, res.output)
        assert without_times(metrics(run_dir)) == reference, f"killed after step {k}"
        assert summary(run_dir) == summary(full)
        assert json.loads((run_dir / "status.json").read_text())["status"] == "ok"
        assert not list((run_dir / "checkpoints").glob(".*.tmp")), "a half-written checkpoint was left"


# ------------------------------------------------------------------------------------- failed sweep
@pytest.mark.slow
def test_a_sweep_job_failing_at_run_time_is_recorded_and_the_rest_complete(models, tmp_path):
    sweep = tmp_path / "sweep"
    # loss.k=1000 passes config validation (k >= 1) and fails at setup: larger than the vocabulary (102)
    res = opd_inprocess(
        "-m",
        *base_args(models, "trainer.steps=1", "loss=topk_rkl", "loss.k=1000,2", f"hydra.sweep.dir={sweep}"),
    )
    assert res.exit_code == 1, res.output
    failed, ok = sweep / "0", sweep / "1"
    status = json.loads((failed / "status.json").read_text())
    assert status["status"] == "failed" and "loss.k=1000" in status["error"]
    assert (failed / ".hydra" / "config.yaml").exists() and (failed / "config.yaml").exists()
    assert json.loads((ok / "status.json").read_text())["status"] == "ok"
    assert (ok / "summary.json").exists()
    assert "1 ok, 1 failed" in res.stdout and f"failed: {failed}" in res.stderr


# ---------------------------------------------------------------------------------- run directories
def test_runs_started_at_the_same_moment_get_distinct_directories(models, tmp_path, monkeypatch):
    import datetime as dt

    import hydra.core.utils

    class FrozenClock(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2030, 1, 1, 0, 0, 0, 0)

    # Freeze Hydra's `${now:...}`: both runs resolve one default directory, as two runs in one microsecond.
    monkeypatch.setattr(hydra.core.utils, "datetime", FrozenClock)
    default = tmp_path / "outputs" / "2030-01-01" / "00-00-00-000000"
    first = claim_dir(default, explicit=False)  # the first run, still running
    res = opd_inprocess(*base_args(models, "trainer.steps=1"))
    assert res.exit_code == 0, res.output
    second = default.with_name(default.name + "-1")
    assert first == default and sorted(p.name for p in first.iterdir()) == [".opd.lock"]
    assert (second / "summary.json").exists() and (second / ".hydra" / "config.yaml").exists()
    assert f"results: {second}" in res.stdout


def test_an_explicit_directory_held_by_a_running_process_is_refused(models, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from opd_cli.launch import claim_dir; from pathlib import Path;"
         f"claim_dir(Path({str(run_dir)!r}), explicit=True); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "held"
        res = opd_inprocess(*base_args(models, "trainer.steps=1"), f"hydra.run.dir={run_dir}")
        assert_one_line_error(res, "in use by another running opd process")
        assert sorted(p.name for p in run_dir.iterdir()) == [".opd.lock"]
    finally:
        proc.kill()
        proc.wait()
    res = opd_inprocess(*base_args(models, "trainer.steps=1"), f"hydra.run.dir={run_dir}")
    assert res.exit_code == 0, res.output  # the lock dies with its process (SIGKILL included)


@pytest.mark.slow
def test_an_existing_run_is_kept_without_overwrite_and_replaced_with_it(models, tmp_path):
    run_dir = tmp_path / "run"
    args = base_args(models, "trainer.save_every=1", f"hydra.run.dir={run_dir}")
    assert opd_inprocess(*args, "trainer.steps=3").exit_code == 0
    before = (run_dir / "metrics.jsonl").read_text()

    res = opd_inprocess(*args, "trainer.steps=1")
    assert_one_line_error(res, "already holds a run", "overwrite=true")
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_000003"

    res = opd_inprocess(*args, "trainer.steps=1", "overwrite=true")
    assert res.exit_code == 0, res.output
    assert max(r["step"] for r in metrics(run_dir)) == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_000001"]
    assert summary(run_dir)["steps"] == 1


# --------------------------------------------------------------------------------------- bad inputs
def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _bad_input_cases(tmp: Path, models: dict) -> dict[str, tuple[list[str], str]]:
    from conftest import build_tiny_model_dir
    from transformers import AutoTokenizer

    rows = [{"problem": "1+1", "answer": "2"}, {"problem": "2+2", "answer": "4"}]
    good = _write_jsonl(tmp / "good.jsonl", rows)
    no_problem = _write_jsonl(tmp / "no_problem.jsonl", [{"question": "1+1", "answer": "2"}])
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    not_a_model = tmp / "not_a_model"
    not_a_model.mkdir()
    broken_model = tmp / "broken_model"
    broken_model.mkdir()
    (broken_model / "config.json").write_text("{ not json")
    other_vocab = build_tiny_model_dir(tmp / "other_vocab", seed=2)
    tok = AutoTokenizer.from_pretrained(str(other_vocab))
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(str(other_vocab))
    a_file = tmp / "a_file"
    a_file.write_text("")
    math = ["task=math", "eval.size=2"]
    return {
        "missing dataset file": (
            [*math, f"task.path={tmp / 'nope.jsonl'}"],
            "dataset file not found",
        ),
        "dataset lacking the configured field": (
            [*math, f"task.path={good}", "task.fields.problem=question"],
            "has no column 'question' for field 'problem'",
        ),
        "dataset lacking a required field": (
            [*math, f"task.path={no_problem}"],
            "has no column 'problem' for field 'problem'",
        ),
        "empty dataset": ([*math, f"task.path={empty}"], "is empty"),
        "max length too small for the prompt": (
            ["rollout.max_new_tokens=300"],
            "exceeds the model's context (256)",
        ),
        "vllm max_model_len too small": (
            ["rollout=vllm", "rollout.max_model_len=20"],
            "raise rollout.max_model_len",
        ),
        "PI template referencing a missing field": (
            ["teacher=self_answer", "teacher.prompt_template='{problem};{nope}'"],
            "needs field(s) ['nope']",
        ),
        "model path that is not a model": ([f"model.path={not_a_model}"], "is not a model directory"),
        "model path with a broken config": ([f"model.path={broken_model}"], "is not a valid JSON file"),
        "teacher path that is not a model": ([f"teacher.path={not_a_model}"], "is not a model directory"),
        # not the hub's "Repo id must use alphanumeric chars"
        "model path that does not exist": (
            ["model.path=/nonexistent"],
            "no such model directory: /nonexistent",
        ),
        "relative teacher path that does not exist": (
            ["teacher.path=./no/such/dir"],
            "no such model directory",
        ),
        "tokenizer/vocab mismatch": ([f"teacher.path={other_vocab}"], "teacher tokenizer"),
        "K larger than the vocabulary": (["loss=topk_rkl", "loss.k=1000"], "loss.k=1000 is larger"),
        "teacher on a GPU the machine lacks": (["teacher.device=cuda:7"], "teacher.device=cuda:7 but"),
        "unwritable output directory": (
            [f"hydra.run.dir={a_file / 'run'}"],
            "cannot create the output directory",
        ),
    }


@pytest.mark.slow
def test_bad_inputs_give_one_line_exit_2_and_leave_nothing_behind(models, tmp_path):
    cases = _bad_input_cases(tmp_path, models)
    for name, (extra, needle) in cases.items():
        run_dir = tmp_path / "runs" / name.replace(" ", "_").replace("/", "_")
        explicit = [a for a in extra if a.startswith("hydra.run.dir=")]
        args = base_args(models, "trainer.steps=1", *extra)
        if not explicit:
            args.append(f"hydra.run.dir={run_dir}")
        res = opd_inprocess(*args)
        try:
            assert_one_line_error(res, needle)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
        assert not run_dir.exists(), f"{name}: a run rejected at setup leaves no directory"


@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(models, tmp_path, monkeypatch):
    import opd_cli.checkpoint as checkpoint

    real_save = checkpoint.torch.save

    def full_disk_at_step_2(obj, path, *a, **kw):
        if Path(path).parent.name == ".step_000002.tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk_at_step_2)
    run_dir = tmp_path / "run"
    args = base_args(models, "trainer.steps=3", "trainer.save_every=1", f"hydra.run.dir={run_dir}")
    assert_one_line_error(opd_inprocess(*args), "could not write checkpoint", "disk full", "resume=")
    ckpts = run_dir / "checkpoints"
    latest = latest_checkpoint(ckpts)
    assert latest is not None and latest.name == "step_000001"
    assert load_trainer_state(latest)["step"] == 1
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(latest))  # the previous checkpoint still loads
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000001"], "half-written step left"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "disk full" in status["error"]

    monkeypatch.setattr(checkpoint.torch, "save", real_save)  # space freed: the run resumes and ends
    res = opd_inprocess(f"resume={run_dir}")
    assert res.exit_code == 0, res.output
    assert summary(run_dir)["steps"] == 3


# ------------------------------------------------------------------------------------------ fuzzing
def _schema_keys() -> list[str]:
    import dataclasses

    from opd_cli.config import Config

    def walk(node, prefix):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                yield from walk(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    return sorted(walk(Config(), ""))


def _override_strategy():
    from hypothesis import strategies as st

    groups = ["task", "model", "teacher", "loss", "stabilization", "rollout", "eval", "logger", "experiment"]
    keys = st.one_of(
        st.sampled_from(_schema_keys()),
        st.sampled_from([*groups, "hydra/launcher", "nosuchgroup", "loss/sub"]),
        st.sampled_from(["a.b.c", "trainer.nope", "hydra.run.dir", "hydra.job.chdir", "x", "task.fields.q"]),
        st.text("abcxyz._-/[]$@", min_size=1, max_size=8),
    )
    scalars = st.one_of(
        st.integers(-(10**12), 10**12).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.booleans().map(lambda b: str(b).lower()),
        st.sampled_from(["null", "", "''", "'quoted'", "full_rkl", "hf", "vllm", "testbed:nope", "1e-4"]),
        st.sampled_from(["${now:%H}", "${oc.env:HOME}", "${trainer.lr}", "${nope}", "???", "range(0,3)"]),
        st.text("ab1 ,;:=[]{}()'\"\\$%*~+-.#!", max_size=10),
    )
    values = st.one_of(
        scalars,
        st.lists(scalars, max_size=3).map(lambda v: "[" + ",".join(v) + "]"),
        st.dictionaries(st.sampled_from(["a", "b", "k"]), scalars, max_size=2).map(
            lambda d: "{" + ",".join(f"{k}:{v}" for k, v in d.items()) + "}"
        ),
    )
    override = st.one_of(
        st.tuples(st.sampled_from(["", "", "+", "++", "~"]), keys, values).map(
            lambda t: f"{t[0]}{t[1]}={t[2]}"
        ),
        st.tuples(st.sampled_from(["~", "+", ""]), keys).map(lambda t: f"{t[0]}{t[1]}"),
        keys.map(lambda k: f"{k}="),
    )
    return st.lists(override, min_size=1, max_size=4)


@pytest.mark.slow
def test_fuzzed_overrides_compose_or_fail_with_one_line_exit_2(tmp_path):
    from hypothesis import HealthCheck, given, settings

    @settings(
        max_examples=150,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(_override_strategy())
    def check(overrides):
        res = opd_inprocess("--cfg", "job", *overrides)
        assert res.exit_code in (0, 2), (overrides, res.exit_code, res.output, repr(res.exception))
        assert "Traceback" not in res.output, (overrides, res.output)
        if res.exit_code == 2:
            assert isinstance(res.exception, SystemExit), (overrides, repr(res.exception))
            lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > 8, (
                overrides,
                res.stderr,
            )
        assert not [p for p in tmp_path.iterdir() if p.name != ".hypothesis"], (
            overrides,
            "--cfg job wrote files",
        )

    check()


# ------------------------------------------------------------------------------ stage=rlvr resume
def _rlvr_args(run_dir: Path) -> list[str]:
    # the shipped SFT student gets some answers right, so GRPO groups carry signal and the optimizer moves
    return [
        "stage=rlvr",
        "model=student_sft",
        "rollout=hf",
        "logger=none",
        "rollout.n=4",
        "rollout.max_new_tokens=48",
        "trainer.prompts_per_step=4",
        "trainer.steps=4",
        "trainer.save_every=1",
        "trainer.lr=1e-4",
        "task.train_size=64",
        "eval.size=8",
        "eval.max_new_tokens=48",
        f"hydra.run.dir={run_dir}",
    ]


def _rlvr_rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in without_times(metrics(run_dir))]


@pytest.mark.numerics
@pytest.mark.slow
def test_rlvr_stage_resumes_from_its_last_checkpoint_to_the_same_teacher(tmp_path, monkeypatch):
    full = tmp_path / "full"
    res = opd_inprocess(*_rlvr_args(full))
    assert res.exit_code == 0, res.output
    reference = _rlvr_rows(full)
    assert any(r.get("loss") is not None for r in reference), "no GRPO update: the test would prove nothing"

    import opd_cli.stages.rlvr as rlvr

    real, calls = rlvr.group_advantages, []

    def dies_at_step_3(rewards, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process goes down in the middle of step 3
        return real(rewards, *a, **kw)

    killed = tmp_path / "killed"
    monkeypatch.setattr(rlvr, "group_advantages", dies_at_step_3)
    res = opd_inprocess(*_rlvr_args(killed))
    assert res.exit_code != 0
    assert latest_checkpoint(killed / "checkpoints").name == "step_000002"
    monkeypatch.setattr(rlvr, "group_advantages", real)
    (killed / "checkpoints" / ".latest.x.tmp").write_text("debris of a kill")
    res = opd_inprocess(f"resume={killed}")
    assert res.exit_code == 0, res.output
    assert _rlvr_rows(killed) == reference
    assert summary(killed)["final_accuracy"] == summary(full)["final_accuracy"]
    from safetensors.torch import load_file

    a, b = (
        load_file(str(full / "model" / "model.safetensors")),
        load_file(str(killed / "model" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((killed / "checkpoints").glob(".*.tmp"))
    # and a resume of the finished run changes nothing
    before = metrics(killed)
    res = opd_inprocess(f"resume={killed}")
    assert res.exit_code == 0, res.output
    assert metrics(killed) == before


@pytest.mark.numerics
# ------------------------------------------------------------------------------- stage=sft resume
@pytest.mark.slow
def test_sft_stage_resumes_from_its_last_checkpoint_on_the_saved_traces(models, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import opd_cli.stages.sft as sft

    def args(run_dir: Path) -> list[str]:
        return [
            *base_args(models, "stage=sft", "stabilization=sft", "stabilization.source=reference"),
            "stabilization.num_traces=32",
            "stabilization.steps=5",
            "stabilization.batch_size=4",
            "trainer.save_every=1",
            f"hydra.run.dir={run_dir}",
        ]

    full = tmp_path / "full"
    res = opd_inprocess(*args(full))
    assert res.exit_code == 0, res.output

    real_next, calls = sft._Batches.next, []

    def dies_at_step_4(self):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # the process goes down in the middle of SFT step 4
        return real_next(self)

    killed = tmp_path / "killed"
    monkeypatch.setattr(sft._Batches, "next", dies_at_step_4)
    assert opd_inprocess(*args(killed)).exit_code != 0
    assert latest_checkpoint(killed / "model" / "checkpoints").name == "step_000003"
    assert (killed / "model" / "traces.json").is_file()
    monkeypatch.setattr(sft._Batches, "next", real_next)

    def no_new_traces(*a, **kw):
        raise AssertionError("a resumed SFT stage wrote its traces again")

    monkeypatch.setattr(sft, "teacher_traces", no_new_traces)
    res = opd_inprocess(f"resume={killed}")
    assert res.exit_code == 0, res.output
    stats = [json.loads((d / "model" / "sft_stats.json").read_text()) for d in (full, killed)]
    assert stats[0] == stats[1]
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (full, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (killed / "model" / "DONE").exists() and not (killed / "model" / "checkpoints").exists()


@pytest.mark.slow
def test_a_nan_teacher_is_blamed_on_the_teacher_not_the_learning_rate(models, tmp_path):
    """A broken teacher checkpoint (NaN in its final norm) stops the run at step 1 with one line that
    names the teacher's output and the first bad position, not "lower trainer.lr"."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan_teacher"
    shutil.copytree(models["teacher"], broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.norm.weight"][:] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    res = opd_inprocess(*base_args(models, "trainer.steps=1"), f"teacher.path={broken}", "hydra.run.dir=run")
    line = assert_one_line_error(res, "step 1: the teacher's output is broken", "response position")
    assert "check the teacher checkpoint (teacher.path)" in line and "lower trainer.lr will not help" in line
