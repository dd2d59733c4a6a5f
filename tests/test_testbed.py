"""The shipped testbed (manifest, weights, loading) and `testbed:` path resolution and building (the SFT /
GRPO loops that build it: test_stage_sft.py, test_stage_rlvr.py)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from opd_cli.errors import OpdError
from opd_cli.stages.sft import prompt_ids
from opd_cli.tasks import make_task
from opd_cli.testbed import paths
from opd_cli.testbed.builders import make_rows
from opd_cli.testbed.recipe import RECIPE, config_hash, file_sha256
from opd_cli.testbed.tokenizer import build_char_tokenizer

ASSETS = paths.ASSETS_DIR
FIGURES = (
    "accuracy",
    "well_formed",
    "answer_rate",
    "truncation_ratio",
    "hedging_rate",
    "concise_with_system",
    "concise_without_system",
    "topk_overlap",
)


pytestmark = pytest.mark.usefixtures("torch_threads_for_tests")


@pytest.fixture(scope="module")
def manifest() -> dict:
    path = ASSETS / paths.MANIFEST
    if not path.is_file():
        pytest.fail(f"no shipped testbed at {ASSETS}; build it with `opd testbed build`")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def tok(char_tokenizer):
    return char_tokenizer


# ---- the shipped testbed ------------------------------------------------------------------------------
def test_manifest_schema(manifest):
    for key, kind in [
        ("format", int),
        ("seed", int),
        ("config_hash", str),
        ("recipe", dict),
        ("versions", dict),
        ("tokenizer", dict),
        ("data", dict),
        ("models", dict),
        ("timing", dict),
    ]:
        assert isinstance(manifest.get(key), kind), key
    assert set(manifest["versions"]) >= {"torch", "transformers", "opd"}
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["config_hash"])
    assert manifest["config_hash"] == config_hash(manifest["recipe"])
    assert set(manifest["models"]) == set(paths.MODEL_NAMES)
    for name, entry in manifest["models"].items():
        assert entry["path"] == name
        assert re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]), name
        assert isinstance(entry["architecture"]["params"], int) and entry["architecture"]["head_dim"] >= 32
        figures = entry["eval"]
        for key in FIGURES:
            assert isinstance(figures[key], (int, float)) and 0.0 <= figures[key] <= 1.0, (name, key)
        assert figures["mean_length"] >= 1
    for task_name in ("arith", "arith_concise"):
        for split in ("train", "eval"):
            entry = manifest["data"][task_name][split]
            assert file_sha256(ASSETS / entry["path"]) == entry["sha256"]


def test_manifest_is_current_recipe(manifest):
    """The shipped build is the one `opd testbed build` would produce (else rebuild and commit it)."""
    assert manifest["config_hash"] == config_hash(RECIPE), (
        "RECIPE changed: run `opd testbed build` and commit"
    )


def test_manifest_targets(manifest):
    """The figures the experiments rely on (see experiments/testbed.md)."""
    m = {name: e["eval"] for name, e in manifest["models"].items()}
    assert m["student_base"]["answer_rate"] < 0.05  # malformed
    assert 0.6 <= m["student_sft"]["accuracy"] <= 0.8  # well formed, room to improve
    assert m["teacher_large"]["accuracy"] >= 0.95 and m["teacher_rlvr"]["accuracy"] >= 0.95
    assert m["teacher_large"]["topk_overlap"] < m["teacher_rlvr"]["topk_overlap"] - 0.1
    assert m["teacher_large"]["revision_mass_after_step"] > 0.2  # it pushes student prefixes to revise
    opsd = m["opsd_base"]
    # every PI teacher does what it is told, about as accurately as the student without PI (the build's
    # dev targets are 0.9; the seed-0 build stops at 3200 steps with 0.954 / 0.938 / 0.98 / 0.97 on the
    # eval set): a rule teacher weaker than the student makes OPSD trade accuracy for the rule
    assert opsd["concise_with_system"] > 0.85 and opsd["concise_without_system"] < 0.1
    assert opsd["with_pi"]["system"]["accuracy"] > 0.85
    for pref in ("preference_lsd", "preference_restate"):
        assert opsd["with_pi"][pref]["follows"] > 0.85 and opsd["with_pi"][pref]["accuracy"] > 0.85
    assert opsd["with_pi"]["solution"]["accuracy"] > 0.85
    # with the answer as a hint it skips the reasoning more often than not (the build stops on a dev mass
    # >= stop_at_direct_answer, 0.6; at 0.35 in v4 the answer-PI cells did not collapse, though a high mass
    # alone does not make them collapse: experiments/testbed.md, "Testbed v6")
    assert opsd["with_pi"]["hint"]["direct_answer_mass"] > 0.55
    assert opsd["with_pi"]["hint"]["direct_answer_rate"] > 0.5
    # the RLVR-adapted PI teacher is at least as strong without PI and still reads the hint
    assert m["opsd_rlvr"]["accuracy"] >= opsd["accuracy"]
    assert m["opsd_rlvr"]["with_pi"]["hint"]["direct_answer_mass"] > 0.5


def test_shipped_weights_match_manifest(manifest):
    for name, entry in manifest["models"].items():
        assert file_sha256(ASSETS / name / "model.safetensors") == entry["sha256"], name


def test_shipped_models_load_and_generate(manifest):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = make_task("arith", digits=3)
    row = task.make_row(347, 285)
    for name in paths.MODEL_NAMES:
        model = AutoModelForCausalLM.from_pretrained(str(ASSETS / name))
        tok = AutoTokenizer.from_pretrained(str(ASSETS / name))
        ids = torch.tensor([prompt_ids(tok, task.messages(row))])
        out = model.generate(
            ids,
            max_new_tokens=40,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        assert out.shape[1] > ids.shape[1], name
        if name in ("teacher_large", "teacher_rlvr"):
            text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            assert task.verify(row, text).correct, (name, text)


@pytest.mark.numerics
def test_student_sft_accuracy_reproduces(manifest):
    from opd_cli.stages.evaluate import greedy_accuracy
    from opd_cli.testbed.builders import load

    rows = make_rows(manifest["recipe"], manifest["seed"])["arith"]["eval"]
    task = make_task("arith", digits=manifest["recipe"]["task"]["digits"])
    got = greedy_accuracy(
        load(ASSETS / "student_sft"),
        build_char_tokenizer(),
        task,
        rows,
        max_new_tokens=manifest["recipe"]["eval"]["max_new_tokens"],
    )
    assert got["accuracy"] == pytest.approx(manifest["models"]["student_sft"]["eval"]["accuracy"], abs=0.01)


@pytest.mark.slow
@pytest.mark.vllm
def test_shipped_model_loads_in_vllm(manifest):
    """vLLM runs the shipped teacher as HF does: the same greedy responses (fp32 in both; a near-tie at
    the argmax may flip one of 8 between the two kernels), and mostly right ones (it is ~97% accurate)."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM

    from opd_cli.rollout import make_engine
    from opd_cli.rollout.base import SamplingConfig

    path = str(ASSETS / "teacher_rlvr")
    tok = build_char_tokenizer()
    task = make_task("arith", digits=3)
    rows = [task.make_row(347, 285), task.make_row(999, 999)] + task.generate(6, seed=11)
    prompts = [prompt_ids(tok, task.messages(r)) for r in rows]
    engine = make_engine("vllm", path, max_num_seqs=4)
    try:
        groups = engine.generate(prompts, SamplingConfig(greedy=True, max_new_tokens=48), seed=0)
    finally:
        engine.close()
    hf = AutoModelForCausalLM.from_pretrained(path)
    same = right = 0
    for row, ids, group in zip(rows, prompts, groups, strict=True):
        out = hf.generate(
            torch.tensor([ids]),
            max_new_tokens=48,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        hf_ids = [t for t in out[0, len(ids) :].tolist() if t != tok.eos_token_id]
        vllm_ids = [t for t in group[0].response_ids if t != tok.eos_token_id]
        same += hf_ids == vllm_ids
        right += task.verify(row, tok.decode(vllm_ids, skip_special_tokens=True)).correct
    assert same >= len(rows) - 1 and right >= len(rows) - 2, (same, right)


# ---- testbed: path resolution -------------------------------------------------------------------------
def _fake_testbed(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / paths.MANIFEST).write_text(json.dumps({"seed": 0, "config_hash": "x" * 64}))
    for name in paths.MODEL_NAMES:
        (root / name).mkdir()
        (root / name / "config.json").write_text("{}")
    return root


def test_resolve_model_path(tmp_path, monkeypatch):
    root = _fake_testbed(tmp_path / "tb")
    assert paths.resolve_model_path("Qwen/Qwen3-1.7B") == "Qwen/Qwen3-1.7B"
    assert paths.resolve_model_path("/some/dir", str(root)) == "/some/dir"
    assert paths.resolve_model_path("testbed:student_sft", str(root)) == str(root / "student_sft")
    monkeypatch.setenv("OPD_TESTBED_DIR", str(root))
    assert paths.resolve_model_path("testbed:teacher_rlvr") == str(root / "teacher_rlvr")
    monkeypatch.delenv("OPD_TESTBED_DIR")
    assert paths.testbed_dir() == paths.ASSETS_DIR
    assert paths.testbed_status(root).startswith("ok")


def test_resolve_unknown_name_lists_allowed(tmp_path):
    with pytest.raises(OpdError) as err:
        paths.resolve_model_path("testbed:teacher_huge", str(_fake_testbed(tmp_path / "tb")))
    for name in paths.MODEL_NAMES:
        assert f"testbed:{name}" in str(err.value)


def test_ensure_builds_missing_testbed_and_resolve_names_the_build(tmp_path, monkeypatch):
    """The commands build a missing testbed on first use (`build.ensure_for_config`, before a stage);
    path resolution itself never builds, and says how to when a model is missing."""
    calls = []
    import opd_cli.testbed.build as build
    from opd_cli.launch import compose

    monkeypatch.setattr(build, "build_testbed", lambda root: calls.append(root) or _fake_testbed(Path(root)))
    root = tmp_path / "empty"
    assert paths.testbed_status(root).startswith("not built")
    with pytest.raises(OpdError, match="opd testbed build"):
        paths.resolve_model_path("testbed:opsd_base", str(root))
    assert calls == []
    build.ensure_for_config(compose([f"testbed_dir={root}", "model.path=/some/dir", "teacher.path=/other"]))
    assert calls == []  # no testbed model named: nothing to build
    build.ensure_for_config(compose([f"testbed_dir={root}", "model=opsd_base"]))
    assert calls == [root]
    assert paths.resolve_model_path("testbed:opsd_base", str(root)) == str(root / "opsd_base")


# ---- stages -------------------------------------------------------------------------------------------


def test_shipped_tokenizer_loads_with_the_build_ids():
    """Every testbed character, newline and space included, gets the same id through `AutoTokenizer` (which
    loads a qwen2 directory as Qwen2Tokenizer, with its own byte-level pre-tokenizer) as through the
    tokenizer the build trains with; with raw "\\n"/" " vocabulary entries the loaded one dropped both."""
    from transformers import AutoTokenizer

    from opd_cli.testbed.tokenizer import CHARACTERS

    built = build_char_tokenizer()
    text = "".join(CHARACTERS)
    for name in paths.MODEL_NAMES:
        loaded = AutoTokenizer.from_pretrained(str(ASSETS / name))
        assert loaded(text).input_ids == built(text).input_ids == list(range(6, 6 + len(CHARACTERS))), name
        prompt = loaded.apply_chat_template(
            [{"role": "user", "content": "Q:347+285\nH:632"}], add_generation_prompt=True, tokenize=False
        )
        assert loaded.decode(loaded(prompt).input_ids) == prompt


# ---- determinism across CPUs ----------------------------------------------------------------------------
_TINY_BUILD = """
import copy, json, sys
from opd_cli.testbed import build
from opd_cli.testbed.builders import run_step
from opd_cli.testbed.recipe import RECIPE, file_sha256
recipe = copy.deepcopy(RECIPE)
recipe["student_sft"].update(steps=6, eval_every=1000)
out = sys.argv[1]
kernels = build._run_jobs({"k": (build.worker_kernels, (), (), False)}, 1, False)[0]["k"]
build._run_jobs({"student_sft": (run_step, ("student_sft", out, 0, recipe, True), (), True)}, 1, False)
print(json.dumps({"kernels": kernels, "sha": file_sha256(__import__("pathlib").Path(out) / "student_sft" / "model.safetensors")}))
"""


@pytest.mark.slow
def test_build_step_weights_do_not_depend_on_the_callers_kernels(tmp_path):
    """A build step runs in a worker with PINNED_KERNELS, so a caller under ATen's scalar kernels and one
    under the CPU's best (AVX-512 where it has them) get the same weights: what makes `opd testbed
    build --force` reproduce a build's sha256 on another CPU of the same vendor (measured: Zen 3 = Zen 4,
    and Intel = Intel; an AMD and an Intel build differ, experiments/testbed.md)."""
    import os
    import subprocess
    import sys

    from opd_cli.testbed.build import PINNED_CAPABILITY, PINNED_KERNELS

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file() or "avx2" not in cpuinfo.read_text():
        pytest.skip("the pinned kernels need an x86-64 CPU with AVX2")
    results = []
    for capability in ("default", None):
        env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        out = tmp_path / (capability or "unset")
        res = subprocess.run(
            [sys.executable, "-c", _TINY_BUILD, str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
    pinned = {"capability": PINNED_CAPABILITY, "MKL_CBWR": PINNED_KERNELS["MKL_CBWR"]}
    assert [r["kernels"] for r in results] == [pinned] * 2
    assert results[0]["sha"] == results[1]["sha"]


def _mark(done: str, needs: tuple = (), wait_for: str | None = None) -> bool:
    """A pool job: waits (up to 120 s) for the file `wait_for` when given, then writes `done`; returns
    whether every file in `needs` (jobs that must have finished first) and `wait_for` existed."""
    deadline = time.monotonic() + 120
    while wait_for is not None and not Path(wait_for).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    ok = all(Path(n).exists() for n in needs) and (wait_for is None or Path(wait_for).exists())
    Path(done).write_text("")
    return ok


def test_run_jobs_runs_evaluations_beside_build_steps(tmp_path):
    """The build pool: a job starts only once the jobs it depends on have finished, and a job whose
    dependencies are done runs on a free worker while another job still runs (here `slow` only finishes
    once `after_fast`, which needs `fast`, has run beside it: with one worker busy on `slow` it would
    wait 120 s and report False)."""
    from opd_cli.testbed import build

    f = {n: str(tmp_path / n) for n in ("slow", "fast", "after_fast", "last")}
    jobs = {
        "slow": (_mark, (f["slow"], (), f["after_fast"]), (), False),
        "fast": (_mark, (f["fast"],), (), False),
        "after_fast": (_mark, (f["after_fast"], (f["fast"],)), ("fast",), False),
        "last": (_mark, (f["last"], (f["slow"], f["after_fast"])), ("slow", "after_fast"), False),
    }
    results, finished = build._run_jobs(jobs, 2, False)
    assert results == dict.fromkeys(jobs, True)
    assert finished["fast"] <= finished["after_fast"]
    assert max(finished["slow"], finished["after_fast"]) <= finished["last"]


def test_run_jobs_refuses_a_job_whose_dependency_never_runs():
    from opd_cli.testbed import build

    with pytest.raises(RuntimeError, match="never run"):
        build._run_jobs({"a": (_mark, ("unused",), ("missing",), False)}, 2, False)


def test_pinned_environment_restores_the_callers(monkeypatch):
    import os

    from opd_cli.testbed import build

    monkeypatch.setenv("MKL_CBWR", "AUTO")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    with build.pinned_environment():
        assert {k: os.environ[k] for k in build.PINNED_KERNELS} == build.PINNED_KERNELS
    assert os.environ["MKL_CBWR"] == "AUTO" and "ATEN_CPU_CAPABILITY" not in os.environ


def test_sft_until_checks_first_and_stops_at_the_same_step(monkeypatch):
    """extra_first (opsd_base's order: its PI checks, then the plain dev accuracy only when they pass) must
    stop where the plain-first order stops, with the same weights: the build's --force reproduction
    rests on it. The two figures are stood in by functions of how far training has got (a tiny model's
    greedy accuracy is 0 for hundreds of steps): the plain figure enters its band at step 3, the extra
    check passes from step 6, so both orders must stop at step 6, and extra_first skips the plain figure
    at steps 1-5. The step is counted from the training forwards (a hook on the embedding), not read off
    the weights: a pseudo-random function of the weights' bits gave other bands on another CPU (it held
    on a Zen 4 EPYC and failed on a Zen 3, whose kernels round differently)."""
    from opd_cli.testbed import builders
    from opd_cli.testbed.builders import _sft_until, char_tokenizer, new_model

    tok = char_tokenizer()
    task = make_task("arith", digits=3)
    rows = task.generate(64, 0)
    examples = [(task.messages(r), r["solution"]) for r in rows]
    cfg = {
        "steps": 40,
        "batch_size": 4,
        "lr": 1e-3,
        "warmup_ratio": 0.0,
        "schedule": "constant",
        "eval_every": 1,
        "eval_below_loss": 100.0,
        "stop_at": 0.4,
        "stop_below": 0.9,
    }
    runs = {}
    for extra_first in (False, True):
        model = new_model(RECIPE, "student", len(tok), 0)
        state = {"forwards": 0, "per_step": None, "plain": 0}

        def count(module, args, state=state):
            if module.training:
                state["forwards"] += 1

        model.get_input_embeddings().register_forward_pre_hook(count)

        def step(state=state) -> float:
            # the first evaluation is after step 1 in both orders: its count is the forwards per step
            state["per_step"] = state["per_step"] or state["forwards"]
            return state["forwards"] / state["per_step"]

        def plain(m, *args, state=state, step=step, **kwargs):
            state["plain"] += 1
            return 0.5 if step() >= 3 else 0.1

        monkeypatch.setattr(builders, "_dev_accuracy", plain)
        info = _sft_until(
            model,
            tok,
            examples,
            task,
            rows[:4],
            cfg,
            RECIPE,
            0,
            lambda *a: None,
            extra_check=lambda step=step: (step() >= 6, 0.9 if step() >= 6 else 0.1),
            extra_first=extra_first,
        )
        weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
        runs[extra_first] = (info, weights, state["plain"])
    (plain_first, w0, n0), (checks_first, w1, n1) = runs[False], runs[True]
    assert plain_first["steps"] == 6 and checks_first["steps"] == 6 and w1 == w0
    assert checks_first["dev_accuracy"] == plain_first["dev_accuracy"] == 0.5
    assert (n0, n1) == (6, 1)
    assert [h[1] for h in checks_first["dev_history"]] == [None] * 5 + [0.5]


def test_unmet_stops_names_a_step_that_ran_to_its_cap():
    """A --force build on another CPU vendor ran teacher_rlvr to its 200-step cap at dev 0.825 (its
    stop is 0.97) without a word; the build now warns. The shipped build has no such step."""
    from opd_cli.testbed.build import unmet_stops

    shipped = json.loads((paths.ASSETS_DIR / paths.MANIFEST).read_text())
    built = {n: {"train": m["train"]} for n, m in shipped["models"].items()}
    assert unmet_stops(built, RECIPE) == []
    cap = RECIPE["teacher_rlvr"]["steps"]
    built["teacher_rlvr"] = {"train": {"steps": cap, "dev_accuracy": 0.825}}
    built["student_base"] = {"train": {"steps": RECIPE["student_base"]["steps"]}}  # no stop condition
    built["opsd_base"] = {"train": {"steps": RECIPE["opsd_base"]["steps"]}, "skipped": True}
    (line,) = unmet_stops(built, RECIPE)
    assert "teacher_rlvr" in line and f"cap of {cap}" in line and "0.825" in line


def test_status_says_where_the_testbed_was_built():
    from opd_cli.testbed.cli import built_on_line

    amd = "AuthenticAMD AMD EPYC (family 25 model 17, avx512f)"
    intel = "GenuineIntel Intel(R) Xeon(R) (family 6 model 143, avx512f)"
    line = built_on_line({"kernels": {"cpu": intel}}, here=amd)
    assert "built on: GenuineIntel" in line and "another CPU vendor" in line
    assert "another CPU vendor" not in built_on_line({"kernels": {"cpu": amd}}, here=amd)
    assert "not recorded" in built_on_line({"kernels": {}}, here=amd)
