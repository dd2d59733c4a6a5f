"""`opd preflight`'s prediction (part D): will the recipe improve the student, leave it stable, degrade it
or collapse it? Read from the recipe's own measurements (parts A, B and the optional pilot, part C) by a
few ordered rules, with the mechanism blamed, a confidence and the fix to try.

    opd preflight experiment=matrix                            # one ranked row per cell, with its prediction
    opd preflight experiment=matrix seed=0 --against experiments/matrix/report.json   # calibration
    opd preflight experiment=opd_naive_topk_k5 --pilot-steps 30                       # with the pilot

The rules read measurements only, never a recipe's name: the same numbers give the same prediction for
any recipe (a loss enters through what mechanism 2 measures of its gradient, not through its name). The
first rule that fires decides; its measurement's distance from the threshold sets the confidence.

 1. pair     part A failed -> collapses. A mismatched pair (EOS ids, template, shifted positions, ...) is
             what most "OPD collapsed" reports turn out to be; `opd preflight` exits 2 before a GPU-hour.
 2. ready    well-formed share of the student's rollouts < READY_WELL_FORMED -> stable: a student that
             does not produce the task's format gets no score the teacher can move (the testbed's base
             student: 0.00; its SFT'd students: 0.31 and 0.81). Fix: SFT first. With stabilization=sft
             the measured student is the one before the SFT stage, and the rule reads the teacher
             instead: its T=1 answers on 64 prompts x stabilization.num_traces estimate the traces the SFT
             stage keeps; >= SFT_KEPT_MIN -> improves (SFT gives the format, then OPD on a well-formed
             student; low confidence, the OPD stage is not measured: preflight the SFT checkpoint),
             else stable.
 3. teacher  top-K overlap < OVERLAP_MIN or the teacher's mass on revision / hedging tokens after the
             student's prefixes > REVISION_MASS_MAX, with a loss blind to the teacher's tail (its step
             does not change when the teacher's mass outside the student's top-k is reshuffled:
             teacher_tail_sensitivity <= TAIL_BLIND_MAX) -> collapses (mechanism 1, teacher mismatch):
             the teacher pulls the student towards continuations it never writes itself and the loss
             sees that teacher only through the student's top-k. With a loss that reads the whole
             teacher the rule is silent (low confidence): off the grid, full_rkl and sampled_rkl with
             the mismatched teacher improved. Fix: such a loss, a closer teacher, or SFT on its traces.
 4. tail     the recipe's loss raises the student's tail mass (first-order, one step, from its
             closed-form logit gradient) at a share of positions that exceeds the exact reverse KL's at
             the same k by > TAIL_EXCESS_MAX -> collapses (mechanism 2, biased TopK gradient: the "+1"
             term drains the top-K mass step after step). Fix: the measured arm with the least excess.
 5a. path   privileged information only (mechanism 3): the student, without the PI, continuing the
             first quarter of the PI teacher's greedy response is right less often than on its own by
             > PATH_DROP_MAX -> collapses. OPSD pulls the student onto the teacher's path; an answer-
             conditioned teacher starts with the answer, which the student cannot write without working
             it out (the shortcut: the paper's DAPO length collapse). Per-token gaps miss it when the
             student's own rollouts end at the right answer (90-97% of them on the testbed).
 5. PI gap   privileged information only (mechanism 3): the KL from the reference-PI teacher to q_bar,
             the student's optimum over the PIs it can produce itself, where the teacher commits to its
             answer > PI_GAP_MAX -> collapses (the shortcut: the teacher skips to an answer the student
             cannot know); the same gap over all positions > PI_GAP_COLLAPSE -> collapses, > PI_GAP_MAX
             -> degrades (the student is trained towards information it does not have, everywhere).
             Fix: a PI the student can supply (a rule shared by every prompt leaves no gap).
 6. PI signal privileged information only: KL from the PI teacher to the PI-free prompt < PI_SIGNAL_MIN
             -> stable: the PI hardly changes the teacher, there is nothing to internalize.
 7. pilot    with --pilot-steps: a warning sign of the collapse detector (opd_cli/diagnostics.py), its
             least-squares slope over the last half of the pilot's steps (stages/pilot.py) extrapolated
             linearly from the last value to trainer.steps, crosses the
             detector's threshold (student mass in the TopK support < mass_threshold, truncation >
             truncation_threshold, 3-gram repeats > repeat_threshold) with the slope at least
             PILOT_SLOPE_SE standard errors from 0 -> collapses (the mechanism the sign belongs to).
 8. otherwise -> improves; the confidence is that of the closest call among the rules above.

Thresholds: fitted on seed 0 of the testbed matrix (experiments/matrix/report.json) as the midpoint
between the nearest seed-0 values that must fall on either side (arithmetic for shares in [0, 1],
geometric for masses and KLs, which span orders of magnitude), rounded to two digits; the values on each
side are given at each constant. Seeds 1 and 2 are reported separately (experiments/preflight.md).
Confidence: a share at least CONF_SHARE["high"] from its threshold, or a mass / KL at least a factor
CONF_RATIO["high"] away, is high; within CONF_SHARE["medium"] / CONF_RATIO["medium"] low; medium between.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from opd_cli.errors import UsageError

VERDICTS = ("improves", "stable", "degrades", "collapses")
LEVELS = ("low", "medium", "high")

# rule 2: well-formed rollouts. Seed 0: base student 0.00 (stable) | SFT'd students 0.309, 0.805.
READY_WELL_FORMED = 0.15
# rule 2 with stabilization=sft: the SFT stage's kept traces (stabilization.num_traces x the teacher's T=1
# accuracy). Not fitted (one matrix cell SFTs): a prior from the testbed's trials, where ~2.5k kept traces
# made student_base well formed on every seed and ~640 on seed 0 (experiments/matrix.md).
SFT_KEPT_MIN = 500.0
# rule 3: top-20 overlap. Seed 0: teacher_large 0.812 (collapses) | every other ready pair >= 0.919.
OVERLAP_MIN = 0.87
# rule 3: the teacher's mass on the revision tokens' first token. Seed 0: ready pairs <= 1.17e-5 |
# teacher_large 0.0437 (collapses); geometric midpoint 7.1e-4.
REVISION_MASS_MAX = 7.1e-4
# rule 3 applies to losses blind to the teacher's tail: the relative change of the recipe's logit gradient
# when the teacher's mass outside the student's top-k is spread uniformly (top-k and tail total kept)
# below this. Not fitted: the TopK arms read exactly 0 (they see the teacher only on the top-k and as a
# tail total), full_rkl >= 0.28 and sampled_rkl 0.018 on seed 0; 1e-6 is fp32 round-off of that ratio.
# Added after two off-grid runs (teacher_large with full_rkl and with sampled_rkl improved, where the
# overlap / revision-mass test alone predicted collapse; experiments/preflight.md): no matrix cell changes,
# and those two runs are no longer held out.
TAIL_BLIND_MAX = 1e-6
# rule 4: tail-rise share minus the exact reverse KL's. Seed 0: sampled / stop-gradient arms <= 0.046
# (improve) | naive TopK 0.495 (k=5) and 0.755 (k=1) (collapse).
TAIL_EXCESS_MAX = 0.27
# Rules 5a, 5 and 6 were refitted on seed 0 of the v3 testbed's matrix (experiments/preflight.md, "Testbed
# v3"); where v3's seed 0 has no value on one side of a threshold, the nearest seed-0 value of an earlier
# testbed's matrix stands in, named below. The first testbed's fit: PI_GAP_MAX 0.028, PI_SIGNAL_MIN 0.26.
# rule 5a: the path probe's accuracy drop (the student on its own minus the student continuing the PI
# teacher's first quarter, 64 prompts). v3 seed 0: the system rule 0.156 (improves) | the answer PI with the
# RLVR-adapted teacher 0.766 and with the step-0 one 0.797 (collapse); arithmetic midpoint 0.46.
PATH_DROP_MAX = 0.46
# rule 5: gap to q_bar, nats/token, where the teacher commits (-> collapses) and over all positions
# (-> degrades, above PI_GAP_COLLAPSE -> collapses). v3 seed 0: the profile PI 0.072 (stable) | v2 seed 0's
# profile PI 0.14 (degrades); geometric midpoint 0.10. (The answer PI where its teacher commits, 0.20 on v3,
# collapses: above it too.)
PI_GAP_MAX = 0.10
# v3 seed 0: the profile PI 0.072 (stable) | the solution PI 1.53 (collapses); geometric midpoint 0.33. v2's
# degrading profile (0.14) lies between the two thresholds.
PI_GAP_COLLAPSE = 0.33
# rule 6: KL to the PI-free prompt, nats/token. v3 seed 0: the shared preference 0.146 (improves,
# internalized) | the first testbed's solution PI 0.073 (stable; no v3 cell is stable for lack of signal);
# geometric midpoint 0.10.
PI_SIGNAL_MIN = 0.10
# rule 7: a pilot slope counts when it is this many standard errors from 0 (a two-sided ~5% test).
PILOT_SLOPE_SE = 2.0
# confidence bands: distance of the deciding measurement from its threshold
CONF_SHARE = {"high": 0.1, "medium": 0.03}
CONF_RATIO = {"high": 2.0, "medium": 1.25}

# pilot signal -> (metric in the run's metrics, detector threshold key, direction of the danger, mechanism)
PILOT_SIGNS = {
    "student top-K mass": ("student_mass_in_support", "mass_threshold", -1, "2: biased TopK gradient"),
    "truncation": ("truncation_ratio", "truncation_threshold", +1, "1: length explosion"),
    "repeats": ("repeat_ratio", "repeat_threshold", +1, "1: repetition loop"),
}


@dataclass
class Prediction:
    verdict: str  # improves | stable | degrades | collapses | n/a (nothing measured)
    mechanism: str
    confidence: str  # low | medium | high
    evidence: str  # the deciding numbers
    fix: str
    rule: str
    margins: dict = field(default_factory=dict)  # rule -> confidence level of its closest measurement

    def to_json(self) -> dict:
        return asdict(self)


def share_level(x: float, threshold: float) -> str:
    d = abs(x - threshold)
    return "high" if d >= CONF_SHARE["high"] else "medium" if d >= CONF_SHARE["medium"] else "low"


def ratio_level(x: float, threshold: float) -> str:
    if x <= 0:
        return "high"
    r = max(x / threshold, threshold / x)
    return "high" if r >= CONF_RATIO["high"] else "medium" if r >= CONF_RATIO["medium"] else "low"


def weakest(levels) -> str:
    levels = list(levels)
    return min(levels, key=LEVELS.index) if levels else "low"


def strongest(levels) -> str:
    return max(levels, key=LEVELS.index)


def lower(level: str) -> str:
    return LEVELS[max(LEVELS.index(level) - 1, 0)]


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


# ------------------------------------------------------------------------------------------- rules
def rule_pair(rec: dict, margins: dict) -> Prediction | None:
    failed = [c for c in rec.get("checks", []) if c["status"] == "fail"]
    if not failed:
        return None
    c = failed[0]
    return Prediction(
        "collapses",
        "pair mismatch (part A)",
        "high",
        f"{len(failed)} check(s) failed: {', '.join(f['name'] for f in failed)}",
        f"{c['name']}: {c['detail']}",
        "pair",
    )


def rule_ready(rec: dict, margins: dict) -> Prediction | None:
    r = rec["part_b"]["readiness"]
    wf = r["well_formed"]
    margins["ready"] = share_level(wf, READY_WELL_FORMED)
    if wf >= READY_WELL_FORMED:
        return None
    sft = rec.get("facts", {}).get("stabilization") == "sft"
    t = rec["part_b"].get("teacher_readiness")
    if sft and t is not None:
        kept = t["expected_kept_traces"]
        margins["ready"] = ratio_level(kept, SFT_KEPT_MIN)
        if kept >= SFT_KEPT_MIN:
            return Prediction(
                "improves",
                "readiness: SFT on the teacher's traces gives the format first",
                "low",
                f"student well-formed {wf:.2f} < {READY_WELL_FORMED}, but the teacher's T=1 answers are right "
                f"{t['sampled_accuracy']:.2f} (well-formed {t['well_formed']:.2f}): ~{kept:.0f} kept SFT traces "
                f">= {SFT_KEPT_MIN}",
                "the OPD stage is not measured here (its student does not exist yet): run opd preflight on the "
                "SFT checkpoint (model.path=<the SFT stage's checkpoint>) to check it",
                "ready",
            )
        return Prediction(
            "stable",
            "readiness: too few correct teacher traces to SFT on",
            margins["ready"],
            f"student well-formed {wf:.2f} < {READY_WELL_FORMED}; the teacher's T=1 answers are right "
            f"{t['sampled_accuracy']:.2f}: ~{kept:.0f} kept SFT traces < {SFT_KEPT_MIN}",
            "more SFT traces (stabilization.num_traces), or a teacher that answers this task",
            "ready",
        )
    return Prediction(
        "stable",
        "readiness: the student does not produce the task's format",
        "low" if sft else margins["ready"],
        f"well-formed {wf:.2f} < {READY_WELL_FORMED}, sampled accuracy {r['sampled_accuracy']:.2f}",
        (
            "the recipe SFTs first: this measured the student before SFT; run opd preflight on the SFT "
            "checkpoint (model.path=<the SFT stage's checkpoint>) for a prediction of the OPD stage"
            if sft
            else "SFT the student on verifier-filtered teacher traces first (stabilization=sft)"
        ),
        "ready",
    )


def rule_teacher(rec: dict, margins: dict) -> Prediction | None:
    m1, m2 = rec["part_b"]["mechanism_1"], rec["part_b"]["mechanism_2"]
    overlap, mass = m1["topk_overlap"], m1.get("teacher_hedging_mass")
    levels = {"overlap": share_level(overlap, OVERLAP_MIN)}
    fired = []
    if overlap < OVERLAP_MIN:
        fired.append(("overlap", f"top-{m1['overlap_k']} overlap {overlap:.3f} < {OVERLAP_MIN}"))
    if mass is not None:
        levels["mass"] = ratio_level(mass, REVISION_MASS_MAX)
        if mass > REVISION_MASS_MAX:
            fired.append(("mass", f"teacher mass on revision tokens {mass:.2g} > {REVISION_MASS_MAX:.2g}"))
    margins["teacher"] = weakest(levels.values())
    if not fired:
        return None
    sees_tail = m2["arms"][m2["recipe_loss"]].get("teacher_tail_sensitivity")
    if sees_tail is not None and sees_tail > TAIL_BLIND_MAX:  # a mismatched teacher, a loss that sees it all
        margins["teacher"] = "low"
        return None
    return Prediction(
        "collapses",
        "1: teacher mismatch",
        strongest([levels[k] for k, _ in fired]),
        "; ".join(text for _, text in fired)
        + f"; KL_S > 0 at {_pct(m2['kl_s_positive_share'])} of positions (where a stop-gradient TopK still pulls)",
        "the teacher's distribution is far from the student's and the loss reads it only on the student's "
        "top-k: use a loss that reads the whole teacher (loss=full_rkl or sampled_rkl), a teacher closer to "
        "the student (an RLVR-adapted student-size teacher, teacher=rlvr on the testbed), or SFT the student "
        "on this teacher's traces first",
        "teacher",
    )


def tail_excess(m2: dict) -> dict[str, float] | None:
    """Each measured arm's tail-rise share minus the exact reverse KL's (None: not measured)."""
    ref = m2["arms"].get("full_rkl")
    if ref is None:
        return None
    return {name: a["tail_rises_share"] - ref["tail_rises_share"] for name, a in m2["arms"].items()}


def rule_tail(rec: dict, margins: dict) -> Prediction | None:
    m2 = rec["part_b"]["mechanism_2"]
    excess = tail_excess(m2)
    if excess is None:
        return None
    loss, x = m2["recipe_loss"], excess[m2["recipe_loss"]]
    margins["tail"] = share_level(x, TAIL_EXCESS_MAX)
    if x <= TAIL_EXCESS_MAX:
        return None
    best = min((n for n in excess if n not in (loss, "full_rkl")), key=lambda n: excess[n])
    return Prediction(
        "collapses",
        "2: biased TopK gradient",
        margins["tail"],
        f"{loss} (k={m2['k']}) raises the tail mass at {_pct(m2['arms'][loss]['tail_rises_share'])} of "
        f"positions, {_pct(x)} more than the exact reverse KL (> {_pct(TAIL_EXCESS_MAX)})",
        f"try loss={best} (excess {excess[best]:+.2f} measured here) or loss=full_rkl (exact)",
        "tail",
    )


def rule_pi_path(rec: dict, margins: dict) -> Prediction | None:
    path = (rec["part_b"].get("mechanism_3") or {}).get("path")
    if not path:
        return None
    drop = path["drop"]
    margins["pi_path"] = share_level(drop, PATH_DROP_MAX)
    if drop <= PATH_DROP_MAX:
        return None
    return Prediction(
        "collapses",
        "3: OPSD aggregation (the PI teacher takes a path the student cannot finish without the PI)",
        margins["pi_path"],
        f"the student continuing the PI teacher's first {_pct(path['prefix_share'])} "
        f"({path['teacher_prefix_example']!r}) is right {path['student_on_teacher_path']:.2f}, on its own "
        f"{path['student_accuracy']:.2f} (drop {drop:.2f} > {PATH_DROP_MAX}); the PI teacher's responses are "
        f"{path['teacher_mean_length']:.0f} tokens, the student's {path['student_mean_length']:.0f}",
        "OPSD will pull the student onto the teacher's shortcut: use privileged information that does not "
        "let the teacher skip the work the student must do (a shared rule, a hint short of the answer), or a "
        "teacher without PI",
        "pi_path",
    )


def rule_pi_gap(rec: dict, margins: dict) -> Prediction | None:
    m3 = rec["part_b"].get("mechanism_3") or {}
    commits, everywhere = m3.get("gap_where_teacher_commits"), m3.get("gap_to_student_optimum")
    if commits is None and everywhere is None:
        return None
    levels = [ratio_level(g, PI_GAP_MAX) for g in (commits, everywhere) if g is not None]
    margins["pi_gap"] = weakest(levels)
    fix = (
        "use privileged information the student can supply itself (a rule shared by every prompt leaves "
        "no gap), or a teacher without PI"
    )
    if commits is not None and commits > PI_GAP_MAX:
        return Prediction(
            "collapses",
            "3: OPSD aggregation (the teacher commits to PI the student cannot know)",
            ratio_level(commits, PI_GAP_MAX),
            f"gap to the student's optimum where the teacher commits {commits:.3g} nats/token > {PI_GAP_MAX}",
            fix,
            "pi_gap",
        )
    if everywhere is not None and everywhere > PI_GAP_COLLAPSE:
        return Prediction(
            "collapses",
            "3: OPSD aggregation (the student is trained towards information it lacks, everywhere)",
            ratio_level(everywhere, PI_GAP_COLLAPSE),
            f"gap to the student's optimum {everywhere:.3g} nats/token > {PI_GAP_COLLAPSE}",
            fix,
            "pi_gap",
        )
    if everywhere is not None and everywhere > PI_GAP_MAX:
        return Prediction(
            "degrades",
            "3: OPSD aggregation (the student is trained towards information it lacks)",
            weakest([ratio_level(everywhere, PI_GAP_MAX), ratio_level(everywhere, PI_GAP_COLLAPSE)]),
            f"gap to the student's optimum {everywhere:.3g} nats/token > {PI_GAP_MAX} "
            f"(<= {PI_GAP_COLLAPSE}, where it would collapse)",
            fix,
            "pi_gap",
        )
    return None


def rule_pi_signal(rec: dict, margins: dict) -> Prediction | None:
    kl = (rec["part_b"].get("mechanism_3") or {}).get("kl_to_no_pi")
    if kl is None:
        return None
    margins["pi_signal"] = ratio_level(kl, PI_SIGNAL_MIN)
    if kl >= PI_SIGNAL_MIN:
        return None
    return Prediction(
        "stable",
        "3: little privileged signal (nothing to internalize)",
        margins["pi_signal"],
        f"the PI changes the teacher by {kl:.3g} nats/token (KL to the PI-free prompt) < {PI_SIGNAL_MIN}",
        "a PI that changes what the teacher would write (a rule or information the student lacks but can "
        "learn to produce), or a stronger teacher",
        "pi_signal",
    )


def slope(values: list[float]) -> tuple[float, float]:
    """Least-squares slope per step of `values` (one per step) and its standard error."""
    n = len(values)
    xs = range(n)
    mx, my = (n - 1) / 2, sum(values) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, values, strict=True)) / sxx
    resid = sum((y - my - b * (x - mx)) ** 2 for x, y in zip(xs, values, strict=True))
    se = math.sqrt(resid / (n - 2) / sxx) if n > 2 else math.inf
    return b, se


def pilot_trends(rec: dict) -> list[dict]:
    """The detector signs whose late pilot slope points towards the detector's threshold, significantly
    (PILOT_SLOPE_SE standard errors), each with its value projected to trainer.steps."""
    pilot = rec.get("pilot") or {}
    signs, steps, thresholds = pilot.get("signs") or {}, pilot.get("run_steps"), pilot.get("thresholds") or {}
    out = []
    for name, (_, key, danger, mechanism) in PILOT_SIGNS.items():
        s = signs.get(name)
        if not s or key not in thresholds or not steps:
            continue
        b, se = s["recent_slope"], s["recent_slope_se"]
        if b * danger > 0 and abs(b) >= PILOT_SLOPE_SE * se:
            # every detector sign is a share: the straight line stops at 0 and 1
            projected = min(max(s["last"] + b * (steps - pilot["steps"]), 0.0), 1.0)
            out.append(
                {
                    "sign": name,
                    "mechanism": mechanism,
                    "slope": b,
                    "last": s["last"],
                    "projected": projected,
                    "threshold": thresholds[key],
                    "crosses": (projected - thresholds[key]) * danger > 0,
                }
            )
    return out


def trend_text(t: dict, rec: dict) -> str:
    p = rec["pilot"]
    return (
        f"{t['sign']} {t['last']:.3g} after {p['steps']} pilot steps, {t['slope']:+.2g}/step late in the pilot: "
        f"{t['projected']:.2f} at step {p['run_steps']} (detector threshold {t['threshold']})"
    )


def rule_pilot(rec: dict, margins: dict) -> Prediction | None:
    crossing = [t for t in pilot_trends(rec) if t["crosses"]]
    if not crossing:
        return None
    t = crossing[0]
    return Prediction(
        "collapses",
        f"pilot: {t['mechanism']}",
        "medium",
        trend_text(t, rec),
        "the recipe's own first steps trend to the collapse detector's threshold: for a draining top-K mass "
        "a loss without the biased tail term (loss=topk_rkl_stopgrad / full_rkl), for length or repeats a "
        "teacher closer to the student",
        "pilot",
    )


RULES = (rule_ready, rule_teacher, rule_tail, rule_pi_path, rule_pi_gap, rule_pi_signal, rule_pilot)


def predict(rec: dict) -> Prediction:
    """The prediction for one recipe's record (RecipeResult.to_json(): checks, part_b, facts, pilot);
    with a pilot, its warning trends that cross a threshold are appended to the evidence whichever rule decided."""
    pred = decide(rec)
    if pred.rule != "pilot":
        trends = [trend_text(t, rec) for t in pilot_trends(rec) if t["crosses"]]
        if trends:
            pred.evidence += "; pilot: " + "; ".join(trends)
    return pred


def decide(rec: dict) -> Prediction:
    margins: dict[str, str] = {}
    hit = rule_pair(rec, margins)
    if hit is not None:
        return hit
    if rec.get("part_b") is None:
        return Prediction(
            "n/a",
            "not measured",
            "low",
            f"part B skipped ({rec.get('part_b_skipped')})",
            "run opd preflight where the models fit, with --rollouts > 0",
            "none",
        )
    for rule in RULES:
        hit = rule(rec, margins)
        if hit is not None:
            hit.margins = dict(margins)
            return hit
    closest = min(margins, key=lambda k: LEVELS.index(margins[k])) if margins else "-"
    return Prediction(
        "improves",
        "none: every mechanism within its threshold",
        weakest(margins.values()),
        f"{measured(rec)}; closest call: rule {closest}",
        "nothing to fix",
        "improves",
        dict(margins),
    )


def measured(rec: dict) -> str:
    """The numbers the rules read, in one line."""
    b = rec["part_b"]
    m1, m2, m3 = b["mechanism_1"], b["mechanism_2"], b.get("mechanism_3") or {}
    parts = [f"well-formed {b['readiness']['well_formed']:.2f}", f"overlap {m1['topk_overlap']:.3f}"]
    if m1.get("teacher_hedging_mass") is not None:
        parts.append(f"revision mass {m1['teacher_hedging_mass']:.2g}")
    excess = tail_excess(m2)
    if excess is not None:
        parts.append(f"tail excess {excess[m2['recipe_loss']]:+.2f}")
    for key, label in (
        ("gap_where_teacher_commits", "PI gap where committing"),
        ("gap_to_student_optimum", "PI gap"),
        ("kl_to_no_pi", "PI signal"),
    ):
        if m3.get(key) is not None:
            parts.append(f"{label} {m3[key]:.2g}")
    if m3.get("path"):
        parts.append(
            f"path drop {m3['path']['drop']:+.2f} (PI teacher right {m3['path']['teacher_accuracy']:.2f})"
        )
    if m3.get("optimum"):
        parts.append(
            f"optimum drop {m3['optimum']['drop']:+.2f} (q_bar right for one of its PIs "
            f"{m3['optimum']['right_for_some_pi']:.2f})"
        )
    if b.get("teacher_readiness"):
        parts.append(f"teacher's kept SFT traces ~{b['teacher_readiness']['expected_kept_traces']:.0f}")
    return ", ".join(parts)


def rank_key(pred: Prediction) -> tuple[int, int]:
    """Best first: improves before stable before degrades before collapses; surer before less sure
    within improves, less sure before surer within the others."""
    v = VERDICTS.index(pred.verdict) if pred.verdict in VERDICTS else len(VERDICTS)
    c = LEVELS.index(pred.confidence)
    return v, -c if pred.verdict == "improves" else c


# ------------------------------------------------------------------------------------- calibration
FIT_SEED = 0  # the thresholds above were fitted on this seed; the others are held out
# ...of this testbed's matrix: against a later testbed's matrix every seed is a test
FIT_MATRIX = "v3 testbed"


def read_report(path) -> dict:
    """A matrix report.json (`opd report`): cell -> verdict (and, from newer reports, per seed)."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise UsageError(f"--against {path}: no such file; give a matrix report.json (opd report --out DIR)")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"--against {path}: not JSON ({exc.msg}, line {exc.lineno}); give report.json"
        ) from exc
    if not isinstance(report, dict) or not all(
        isinstance(v, dict) and "verdict" in v for v in report.values()
    ):
        raise UsageError(f"--against {path}: not an opd report.json (cell -> {{verdict, ...}})")
    return report


def matrix_seed_seconds(report: dict, report_path, seed: int) -> tuple[float | None, str]:
    """Job seconds of one seed of the matrix: the seed's jobs' wall_s from report.json where it has them,
    else the total job wall time that report.md (beside it) states, divided by the number of seeds."""
    walls = [c.get("wall_s", {}).get(str(seed)) for c in report.values()]
    if walls and all(w is not None for w in walls):
        return float(sum(walls)), f"sum of seed {seed}'s job wall times in report.json"
    md = Path(report_path)
    md = (md if md.is_dir() else md.parent) / "report.md"
    found = re.search(r"Job wall time: ([0-9.]+) min in total", md.read_text()) if md.is_file() else None
    seeds = max((int(c.get("seeds") or 0) for c in report.values()), default=0)
    if found and seeds:
        return float(found.group(1)) * 60 / seeds, f"report.md's total job wall time / {seeds} seeds"
    return None, "unknown (report.json has no wall_s and report.md no total)"


def check_against(names: list[str], report: dict) -> None:
    """Before anything runs: at least one recipe must be a cell of the report."""
    if not set(names) & set(report):
        raise UsageError(
            f"--against: none of the {len(set(names))} recipe(s) ({', '.join(sorted(set(names))[:3])}) is a "
            f"cell of the report ({', '.join(sorted(report)[:3])}, ...); run the grid the report is of "
            f"(e.g. experiment=matrix)"
        )


def calibrate(records: list[dict], report: dict, report_path, command_s: float | None = None) -> dict:
    """Each recipe's prediction against the report's verdict of the cell of the same name: per seed, the
    confusion table, the hit rate and the compute as a fraction of one seed of the matrix."""
    check_against([r["recipe"] for r in records], report)
    matched = [r for r in records if r["recipe"] in report]
    n_seeds = len({r["seed"] for r in records})
    out = {"seeds": {}, "unmatched": sorted({r["recipe"] for r in records} - set(report))}
    for seed in sorted({r["seed"] for r in matched}):
        rows, confusion = [], {}
        for r in (r for r in matched if r["seed"] == seed):
            cell = report[r["recipe"]]
            per_seed = (cell.get("seed_verdicts") or {}).get(str(seed))
            actual = per_seed or cell["verdict"]
            pred = r["prediction"]
            rows.append(
                {
                    "cell": r["recipe"],
                    "predicted": pred["verdict"],
                    "actual": actual,
                    "actual_from": "seed" if per_seed else "cell majority",
                    "hit": pred["verdict"] == actual,
                    "mechanism": pred["mechanism"],
                    "confidence": pred["confidence"],
                    "measured": measured(r) if r.get("part_b") else "-",
                }
            )
            confusion.setdefault(actual, {}).setdefault(pred["verdict"], 0)
            confusion[actual][pred["verdict"]] += 1
        spent = sum(
            r["wall_s"] + (r.get("pilot") or {}).get("wall_s", 0.0) for r in records if r["seed"] == seed
        )
        pilot = sum((r.get("pilot") or {}).get("wall_s", 0.0) for r in records if r["seed"] == seed)
        matrix_s, source = matrix_seed_seconds(report, report_path, seed)
        # the pilot rule on its own, whichever rule decided: how often it fires on collapsed / other cells
        piloted = [r for r in matched if r["seed"] == seed and (r.get("pilot") or {}).get("signs")]
        actual_of = {row["cell"]: row["actual"] for row in rows}
        fires = {r["recipe"]: any(t["crosses"] for t in pilot_trends(r)) for r in piloted}
        collapsed = [c for c in fires if actual_of[c] == "collapses"]
        others = [c for c in fires if actual_of[c] != "collapses"]
        hits = sum(row["hit"] for row in rows)
        out["seeds"][str(seed)] = {
            "fitted": seed == FIT_SEED,
            "cells": len(rows),
            "hits": hits,
            "hit_rate": hits / len(rows),
            "confusion": confusion,
            "rows": rows,
            "preflight_s": spent,
            "pilot_s": pilot,
            "command_s": command_s / n_seeds if command_s is not None else None,
            "matrix_seed_s": matrix_s,
            "matrix_seed_source": source,
            "fraction": (command_s / n_seeds if command_s is not None else spent) / matrix_s
            if matrix_s
            else None,
            "pilot_alone": {
                "collapses": [sum(fires[c] for c in collapsed), len(collapsed)],
                "others": [sum(fires[c] for c in others), len(others)],
            }
            if piloted
            else None,
        }
    return out


def calibration_markdown(cal: dict, command: str) -> str:
    labels = [v for v in VERDICTS]
    lines = [f"`{command}`\n"]
    for seed, s in cal["seeds"].items():
        role = f"thresholds fitted on this seed of the {FIT_MATRIX}'s matrix" if s["fitted"] else "held out"
        lines.append(f"### Seed {seed} ({role}): {s['hits']} of {s['cells']} cells right\n")
        actuals = [v for v in [*labels, *sorted(s["confusion"])] if v in s["confusion"]]
        actuals = list(dict.fromkeys(actuals))
        predicted = list(dict.fromkeys([*labels, *(v for row in s["confusion"].values() for v in row)]))
        lines.append("| matrix verdict \\ predicted | " + " | ".join(predicted) + " |")
        lines.append("|---|" + "---|" * len(predicted))
        for a in actuals:
            lines.append(f"| {a} | " + " | ".join(str(s["confusion"][a].get(p, 0)) for p in predicted) + " |")
        used = s["command_s"] if s["command_s"] is not None else s["preflight_s"]
        what = "the command's wall time per seed" if s["command_s"] is not None else "the recipes' wall time"
        frac = f"{100 * s['fraction']:.1f}%" if s["fraction"] is not None else "unknown"
        matrix = f"{s['matrix_seed_s']:.0f} s" if s["matrix_seed_s"] else "unknown"
        lines.append(
            f"\nHit rate {100 * s['hit_rate']:.0f}%. Compute: {used:.1f} s ({what}; pilot {s['pilot_s']:.1f} s "
            f"of it) against {matrix} for one matrix seed ({s['matrix_seed_source']}): **{frac}**.\n"
        )
        if s.get("pilot_alone"):
            (fc, nc), (fo, no) = s["pilot_alone"]["collapses"], s["pilot_alone"]["others"]
            lines.append(
                f"The pilot rule on its own (rule 7, whichever rule decided) fires on {fc} of the {nc} piloted "
                f"cells the matrix saw collapse and on {fo} of the {no} others.\n"
            )
        lines.append("| cell | predicted | matrix | | mechanism | confidence | what the rules read |")
        lines.append("|---|---|---|---|---|---|---|")
        for row in s["rows"]:
            actual = row["actual"] + ("" if row["actual_from"] == "seed" else " (cell majority)")
            mark = "✓" if row["hit"] else "✗"
            lines.append(
                f"| {row['cell']} | {row['predicted']} | {actual} | {mark} | {row['mechanism']} | {row['confidence']} "
                f"| {row['measured']} |"
            )
        lines.append("")
    if cal["unmatched"]:
        lines.append(f"Recipes with no cell in the report: {', '.join(cal['unmatched'])}.\n")
    return "\n".join(lines)
