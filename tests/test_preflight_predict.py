"""opd preflight's prediction (part D) and calibration: each rule on synthetic measurement records, at its
threshold's boundary; the calibration and the pilot (part C) end to end on the testbed's smoke grid; bad
--against input exits 2 with one line and writes nothing."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import run_opd

from opd_cli.stages import predict as P


def healthy() -> dict:
    """A record whose every measurement sits on the 'improves' side of its rule (a ready student, a close
    teacher, an unbiased loss, no PI)."""
    return {
        "recipe": "r",
        "seed": 0,
        "checks": [{"name": "vocabulary", "status": "pass", "detail": "identical"}],
        "facts": {"loss": "topk_rkl", "k": 5, "teacher_kind": "hf", "stabilization": "none", "steps": 120},
        "part_b": {
            "mechanism_1": {"overlap_k": 20, "topk_overlap": 0.96, "teacher_hedging_mass": 1e-5},
            "mechanism_2": {
                "recipe_loss": "topk_rkl",
                "k": 5,
                "kl_s_positive_share": 0.66,
                "arms": {
                    "topk_rkl": {"tail_rises_share": 0.30, "teacher_tail_sensitivity": 0.0},
                    "topk_rkl_stopgrad": {"tail_rises_share": 0.22, "teacher_tail_sensitivity": 0.0},
                    "topk_rkl_renorm": {"tail_rises_share": 0.25, "teacher_tail_sensitivity": 0.0},
                    "full_rkl": {"tail_rises_share": 0.24, "teacher_tail_sensitivity": 3.6},
                },
            },
            "mechanism_3": {"status": "n/a (no privileged information)"},
            "readiness": {"well_formed": 0.8, "sampled_accuracy": 0.5},
        },
        "part_b_skipped": None,
        "pilot": None,
        "wall_s": 2.0,
    }


def with_(rec: dict, path: str, value) -> dict:
    rec = copy.deepcopy(rec)
    *parents, last = path.split(".")
    node = rec
    for key in parents:
        node = node[key]
    node[last] = value
    return rec


def opsd(**m3) -> dict:
    rec = with_(healthy(), "part_b.mechanism_3", {"status": "x", **m3})
    arms = rec["part_b"]["mechanism_2"]["arms"]
    rec["part_b"]["mechanism_2"]["recipe_loss"] = "full_rkl"
    arms["full_rkl"]["tail_rises_share"] = 0.57  # OPSD cells' tail rises with full_rkl: the excess is 0
    return rec


def test_healthy_record_improves_with_the_closest_call_as_confidence():
    p = P.predict(healthy())
    assert (p.verdict, p.rule, p.fix) == ("improves", "improves", "nothing to fix")
    # overlap 0.96 is 0.09 from 0.87 (medium); everything else is far (high)
    assert p.confidence == "medium" and p.margins["teacher"] == "medium" and p.margins["tail"] == "high"


def test_part_a_fail_collapses_with_the_checks_fix():
    rec = with_(healthy(), "checks", [{"name": "stop_tokens", "status": "fail", "detail": "align eos"}])
    p = P.predict(rec)
    assert (p.verdict, p.rule) == ("collapses", "pair") and p.fix == "stop_tokens: align eos"


def test_not_measured_is_not_a_verdict():
    rec = with_(healthy(), "part_b", None)
    rec["part_b_skipped"] = "--rollouts 0"
    assert P.predict(rec).verdict == "n/a"


@pytest.mark.parametrize(
    "path, below, above, verdict_below, verdict_above, rule",
    [
        (
            "part_b.readiness.well_formed",
            P.READY_WELL_FORMED - 1e-9,
            P.READY_WELL_FORMED,
            "stable",
            "improves",
            "ready",
        ),
        (
            "part_b.mechanism_1.topk_overlap",
            P.OVERLAP_MIN - 1e-9,
            P.OVERLAP_MIN,
            "collapses",
            "improves",
            "teacher",
        ),
        (
            "part_b.mechanism_1.teacher_hedging_mass",
            P.REVISION_MASS_MAX,
            P.REVISION_MASS_MAX * (1 + 1e-9),
            "improves",
            "collapses",
            "teacher",
        ),
        (
            "part_b.mechanism_2.arms.topk_rkl.tail_rises_share",
            0.24 + P.TAIL_EXCESS_MAX - 1e-6,
            0.24 + P.TAIL_EXCESS_MAX + 1e-6,
            "improves",
            "collapses",
            "tail",
        ),
    ],
    ids=["ready", "overlap", "revision_mass", "tail_excess"],
)
def test_threshold_boundaries(path, below, above, verdict_below, verdict_above, rule):
    lo, hi = P.predict(with_(healthy(), path, below)), P.predict(with_(healthy(), path, above))
    assert (lo.verdict, hi.verdict) == (verdict_below, verdict_above)
    assert rule in (lo.rule, hi.rule)


def test_teacher_rule_only_for_losses_blind_to_the_teachers_tail():
    """A mismatched teacher with a loss that reads the teacher's tail: no verdict from rule 3, low
    confidence (off the grid, full_rkl and sampled_rkl with teacher_large improved)."""
    mismatched = with_(healthy(), "part_b.mechanism_1.topk_overlap", 0.8)
    whole = with_(mismatched, "part_b.mechanism_2.recipe_loss", "full_rkl")
    assert P.predict(mismatched).verdict == "collapses"
    assert (P.predict(whole).verdict, P.predict(whole).confidence) == ("improves", "low")
    path = "part_b.mechanism_2.arms.topk_rkl.teacher_tail_sensitivity"
    at = with_(mismatched, path, P.TAIL_BLIND_MAX)
    above = with_(mismatched, path, P.TAIL_BLIND_MAX * 1.01)
    assert (P.predict(at).verdict, P.predict(above).verdict) == ("collapses", "improves")


def test_tail_rule_names_the_least_biased_measured_arm_and_readiness_names_sft():
    p = P.predict(with_(healthy(), "part_b.mechanism_2.arms.topk_rkl.tail_rises_share", 0.9))
    assert p.mechanism.startswith("2:") and "loss=topk_rkl_stopgrad" in p.fix and p.confidence == "high"
    not_ready = with_(healthy(), "part_b.readiness.well_formed", 0.0)
    assert "stabilization=sft" in P.predict(not_ready).fix
    sft = with_(not_ready, "facts.stabilization", "sft")
    assert P.predict(sft).confidence == "low" and "SFT checkpoint" in P.predict(sft).fix


def test_pi_rules_collapse_degrade_stable_improve():
    gap = P.PI_GAP_MAX
    commits = P.predict(
        opsd(gap_where_teacher_commits=gap * 1.01, gap_to_student_optimum=0.0, kl_to_no_pi=0.5)
    )
    assert (commits.verdict, commits.rule, commits.confidence) == ("collapses", "pi_gap", "low")
    at = P.predict(opsd(gap_where_teacher_commits=gap, gap_to_student_optimum=gap, kl_to_no_pi=0.5))
    assert at.verdict == "improves"
    # between the two all-positions thresholds: degrades, as confident as the nearer threshold allows
    mid = (P.PI_GAP_MAX * P.PI_GAP_COLLAPSE) ** 0.5
    spread = P.predict(opsd(gap_where_teacher_commits=None, gap_to_student_optimum=mid, kl_to_no_pi=0.5))
    assert (spread.verdict, spread.rule) == ("degrades", "pi_gap") and spread.confidence != "high"
    for value, verdict in ((P.PI_GAP_COLLAPSE, "degrades"), (P.PI_GAP_COLLAPSE * 1.01, "collapses")):
        everywhere = opsd(gap_where_teacher_commits=None, gap_to_student_optimum=value, kl_to_no_pi=0.5)
        assert P.predict(everywhere).verdict == verdict
    quiet = P.predict(opsd(gap_where_teacher_commits=None, gap_to_student_optimum=0.0, kl_to_no_pi=0.07))
    assert (quiet.verdict, quiet.rule) == ("stable", "pi_signal")
    rule = P.predict(opsd(gap_where_teacher_commits=None, gap_to_student_optimum=1e-10, kl_to_no_pi=0.9))
    assert rule.verdict == "improves"


def path(drop: float, student: float = 0.98) -> dict:
    return {
        "prompts": 64,
        "prefix_share": 0.25,
        "teacher_prefix_example": "A",
        "teacher_accuracy": 0.77,
        "teacher_mean_length": 12.0,
        "student_accuracy": student,
        "student_mean_length": 33.6,
        "student_on_teacher_path": student - drop,
        "drop": drop,
    }


def test_path_rule_collapses_where_the_student_cannot_finish_the_teachers_path():
    """Rule 5a decides before the per-token gaps: a small gap (the student knows the answer after its own
    scratchpad) does not save a recipe whose teacher skips the scratchpad."""
    small_gap = {"gap_where_teacher_commits": 0.01, "gap_to_student_optimum": 0.0, "kl_to_no_pi": 0.5}
    above = P.predict(opsd(**small_gap, path=path(P.PATH_DROP_MAX + 1e-6)))
    assert (above.verdict, above.rule) == ("collapses", "pi_path") and "'A'" in above.evidence
    at = P.predict(opsd(**small_gap, path=path(P.PATH_DROP_MAX)))
    assert at.verdict == "improves" and at.margins["pi_path"] == "low"
    # no path measured (a recipe without PI, or an old record): the rule is silent
    assert P.predict(opsd(**small_gap)).verdict == "improves"


def test_sft_recipe_readiness_reads_the_teachers_kept_traces():
    not_ready = with_(with_(healthy(), "part_b.readiness.well_formed", 0.0), "facts.stabilization", "sft")

    def teacher(kept: float) -> dict:
        return {"well_formed": 0.9, "sampled_accuracy": 0.3, "prompts": 64, "expected_kept_traces": kept}

    enough = P.predict(with_(not_ready, "part_b.teacher_readiness", teacher(P.SFT_KEPT_MIN)))
    assert (enough.verdict, enough.rule, enough.confidence) == ("improves", "ready", "low")
    assert "SFT checkpoint" in enough.fix
    few = P.predict(with_(not_ready, "part_b.teacher_readiness", teacher(P.SFT_KEPT_MIN * 0.99)))
    assert (few.verdict, few.rule) == ("stable", "ready") and "num_traces" in few.fix


def pilot(values: list[float], steps: int = 120) -> dict:
    b, se = P.slope(values[len(values) // 2 :])
    sign = {"first": values[0], "last": values[-1], "recent_slope": b, "recent_slope_se": se}
    return {
        "steps": len(values),
        "run_steps": steps,
        "signs": {"student top-K mass": sign},
        "thresholds": {"mass_threshold": 0.5, "truncation_threshold": 0.5, "repeat_threshold": 0.6},
        "wall_s": 1.0,
    }


def test_pilot_trend_collapses_only_when_it_crosses_significantly():
    draining = [0.998] * 10 + [0.998 - 0.01 * i for i in range(10)]  # late slope -0.01/step x 100 steps
    p = P.predict({**healthy(), "pilot": pilot(draining)})
    assert (p.verdict, p.rule) == ("collapses", "pilot") and "student top-K mass" in p.evidence
    assert P.pilot_trends({"pilot": pilot(draining)})[0]["projected"] == 0.0  # a share stops at 0
    # the same slope does not reach 0.5 in a 40-step run: no collapse
    assert P.predict({**healthy(), "pilot": pilot(draining, steps=40)}).verdict == "improves"
    noisy = [0.998, 0.6] * 10  # a "slope" within its noise
    assert P.predict({**healthy(), "pilot": pilot(noisy)}).verdict == "improves"


def test_slope_is_least_squares():
    b, se = P.slope([1.0, 3.0, 5.0, 7.0])
    assert b == pytest.approx(2.0) and se == pytest.approx(0.0, abs=1e-12)


def test_ranking_best_first():
    preds = [P.predict(healthy()), P.predict(with_(healthy(), "part_b.mechanism_1.topk_overlap", 0.5))]
    preds.append(P.predict(with_(healthy(), "part_b.readiness.well_formed", 0.0)))
    assert [p.verdict for p in sorted(preds, key=P.rank_key)] == ["improves", "stable", "collapses"]


def test_calibration_confusion_per_seed_and_compute(tmp_path):
    good, bad = healthy(), with_(healthy(), "part_b.mechanism_1.topk_overlap", 0.5)
    records = []
    for seed in (0, 1):
        for name, rec in (("a", good), ("b", bad)):
            records.append({**rec, "recipe": name, "seed": seed, "prediction": P.predict(rec).to_json()})
    report = {
        "a": {"verdict": "improves", "seeds": 2, "seed_verdicts": {"0": "improves", "1": "stable"}},
        "b": {"verdict": "collapses", "seeds": 2},  # an older report: the cell's majority for every seed
    }
    (tmp_path / "report.md").write_text("Job wall time: 4.0 min in total.\n")
    cal = P.calibrate(records, report, tmp_path / "report.json")
    s0, s1 = cal["seeds"]["0"], cal["seeds"]["1"]
    assert (s0["hits"], s1["hits"]) == (2, 1) and s0["fitted"] and not s1["fitted"]
    assert s1["confusion"] == {"stable": {"improves": 1}, "collapses": {"collapses": 1}}
    assert s0["matrix_seed_s"] == pytest.approx(120.0) and s0["fraction"] == pytest.approx(4.0 / 120.0)
    report["a"]["wall_s"], report["b"]["wall_s"] = {"0": 100.0}, {"0": 50.0}
    assert P.calibrate(records, report, tmp_path / "report.json")["seeds"]["0"]["matrix_seed_s"] == 150.0
    md = P.calibration_markdown(cal, "opd preflight x")
    assert "### Seed 1 (held out): 1 of 2 cells right" in md and "| stable | 1 | 0 | 0 | 0 |" in md


# ------------------------------------------------------------------------------------- end to end
SMOKE = [
    "experiment=matrix_smoke",
    "rollout.max_new_tokens=16",
    "task.train_size=32",
    "trainer.prompts_per_step=4",
    "logger=none",
]


def test_calibration_and_pilot_end_to_end(tmp_path):
    """The smoke grid's two cells: part B on 6 rollouts, a 6-step pilot in a temporary directory that is
    gone afterwards, predictions, and the calibration against a report.json of those cells."""
    report = {
        "opd_naive_topk_k5": {"verdict": "collapses", "seeds": 1, "seed_verdicts": {"0": "collapses"}},
        "opd_stopgrad_topk_k5": {"verdict": "improves", "seeds": 1, "seed_verdicts": {"0": "stable"}},
    }
    for i, cell in enumerate(report.values()):
        cell["wall_s"] = {"0": 1000.0 + i}
    (tmp_path / "report.json").write_text(json.dumps(report))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out"
    args = ["--rollouts", "6", "--pilot-steps", "6", "--against", str(tmp_path / "report.json")]
    proc = run_opd("preflight", *SMOKE, *args, "--out", str(out), env={"TMPDIR": str(tmp)}, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list(tmp.glob("opd-pilot-*"))  # the pilots' run directories are removed
    recipes = {r["recipe"]: r for r in json.loads((out / "preflight.json").read_text())["recipes"]}
    assert set(recipes) == set(report)
    for r in recipes.values():
        assert r["pilot"]["status"] == "6 steps" and r["pilot"]["wall_s"] > 0
        assert len(r["pilot"]["signs"]["student top-K mass"]["values"]) == 6
        assert r["prediction"]["verdict"] in P.VERDICTS
    cal = json.loads((out / "calibration.json").read_text())["seeds"]["0"]
    hits = sum(recipes[c]["prediction"]["verdict"] == report[c]["seed_verdicts"]["0"] for c in report)
    assert cal["hits"] == hits and cal["cells"] == 2 and cal["matrix_seed_s"] == 2001.0
    assert cal["pilot_s"] == pytest.approx(sum(r["pilot"]["wall_s"] for r in recipes.values()))
    assert 0 < cal["fraction"] == pytest.approx(cal["command_s"] / 2001.0)
    alone = cal["pilot_alone"]  # the pilot rule on its own, over the collapsed cell and the other one
    assert (alone["collapses"][1], alone["others"][1]) == (1, 1)
    assert (
        "prediction (ranked):" in proc.stdout
        and f"calibration seed 0: {hits} of 2 cells right" in proc.stdout
    )
    assert "## Pilot (part C)" in (out / "preflight.md").read_text()


@pytest.mark.parametrize(
    "content, words",
    [(None, "no such file"), ("{not json", "not JSON"), ('{"x": {"verdict": "stable"}}', "none of the")],
    ids=["missing", "not_json", "no_cell_in_report"],
)
def test_bad_against_exits_2_before_anything_runs(tmp_path, content, words):
    path = tmp_path / "report.json"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    proc = run_opd(
        "preflight", *SMOKE, "--rollouts", "2", "--against", str(path), "--out", str(out), timeout=120
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --against") and words in lines[0], proc.stderr
    assert not out.exists()


def test_splice_generated_replaces_only_the_blocks(tmp_path):
    """scripts/splice_generated.py (make preflight-calibration): generated tables go into the doc."""
    import subprocess
    import sys

    from conftest import REPO

    (tmp_path / "gen.md").write_text("| new | table |\n")
    doc = tmp_path / "doc.md"
    doc.write_text("prose\n<!-- generated from gen.md -->\nold\n<!-- end generated -->\nmore prose\n")
    script = str(REPO / "scripts" / "splice_generated.py")
    assert subprocess.run([sys.executable, script, str(doc)], cwd=REPO).returncode == 0
    assert (
        doc.read_text()
        == "prose\n<!-- generated from gen.md -->\n| new | table |\n<!-- end generated -->\nmore prose\n"
    )
    (tmp_path / "gen.md").unlink()
    proc = subprocess.run([sys.executable, script, str(doc)], cwd=REPO, capture_output=True, text=True)
    assert (
        proc.returncode == 2
        and "gen.md does not exist" in proc.stderr
        and "| new | table |" in doc.read_text()
    )
