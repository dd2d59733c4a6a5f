"""`opd gpu-check --tiny` (the mode CI runs) and the offline wheelhouse's skip-list handling."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import REPO, run_opd


@pytest.mark.slow
def test_tiny_mode_runs_every_part_and_writes_table_and_json(tmp_path):
    out = tmp_path / "check"
    proc = run_opd("gpu-check", "--tiny", "--out", str(out), "--work-dir", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "gpu_check.json").read_text())
    parts = record["parts"]
    assert record["mode"] == "tiny"
    assert {name: parts[name]["status"] for name in ("loss_bench", "opd_hf", "testbed")} == {
        "loss_bench": "ok",
        "opd_hf": "ok",
        "testbed": "ok",
    }
    assert parts["opd_vllm"]["status"] == "skipped"

    opd = parts["opd_hf"]
    assert [s["step"] for s in opd["steps"]] == [1, 2]
    for step in opd["steps"]:
        assert step["loss_finite"] and step["tokens"] > 0 and step["plan_gib"] > 0
        assert step["learner_peak_gib"] is None  # CPU: no allocator peak, reported as not measured
        assert step["rollout_s"] >= 0 and step["learner_s"] > 0
    # the same micro-batch and teacher outputs under bf16 autocast and in fp32 (tolerance: gpu_check.py)
    precision = opd["precision"]
    assert precision["within_tolerance"] and precision["loss_bf16"] != precision["loss_fp32"]

    # tiny mode: the "device" run is the CPU run; two CPU runs of one seed are identical (the engines'
    # per-request seeding makes a run a function of its seed), so every difference is exactly 0
    rows = parts["testbed"]["rows"]
    assert {r["metric"] for r in rows} >= {"start_accuracy", "final_accuracy", "mean_loss"}
    assert all(r["difference"] == 0 and r["within"] for r in rows)

    table = (out / "gpu_check.md").read_text()
    assert "| opd_hf | ok |" in table and "## Testbed recipe" in table and "peak / plan" in table
    assert not list(tmp_path.glob("opd-gpu-check-*")), "the random models are removed after the check"


def test_a_failing_part_is_recorded_and_the_next_part_still_runs(tmp_path):
    from opd_cli.gpu_check import Check

    check = Check(tmp_path, "tiny", budget_s=60)

    def broken() -> dict:
        raise RuntimeError("CUDA error: out of memory")

    check.run("first", 1, broken)
    check.run("second", 1, lambda: {"value": 3})
    check.run("third", 120, lambda: {"value": 4})  # over the budget: not started
    record = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert record["first"]["status"] == "failed"
    assert record["first"]["error"] == "RuntimeError: CUDA error: out of memory"
    assert record["second"] == {"status": "ok", "value": 3, "seconds": record["second"]["seconds"]}
    assert record["third"]["status"] == "skipped"
    assert "| first | failed |" in (tmp_path / "gpu_check.md").read_text()


def _wheelhouse_module():
    spec = importlib.util.spec_from_file_location("wheelhouse", REPO / "scripts" / "wheelhouse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wheelhouse_skip_list_names_and_pins(tmp_path):
    wh = _wheelhouse_module()
    skip = tmp_path / "has.txt"
    skip.write_text("# the image\ntorch==2.11.0\nHuggingFace_Hub==1.33.0  # pinned\nPyYAML\n\n")
    names, pins = wh.read_skip(skip)
    assert names == {"torch", "huggingface-hub", "pyyaml"}
    assert pins == ["torch==2.11.0", "HuggingFace_Hub==1.33.0"]
    assert wh.requirement_name("hydra-core>=1.3.2") == "hydra-core"
    assert wh.requirement_name("math_verify[antlr4_9_3]>=0.7") == "math-verify"


def test_the_shipped_skip_list_leaves_out_torch_and_keeps_what_the_gpu_image_lacks():
    wh = _wheelhouse_module()
    names, _ = wh.read_skip(Path(REPO / "scripts" / "gpu_image_has.txt"))
    assert {"torch", "transformers"} <= names
    assert not names & {"hydra-core", "omegaconf", "wandb", "datasets", "math-verify", "vllm"}
