"""Evaluation (opd_cli/stages/evaluate.py): metrics against hand-computed expectations, and `opd eval`."""

from __future__ import annotations

import json
import math

import pytest
from conftest import opd

from opd_cli.rollout.base import RolloutEngine, Sample, SamplingConfig
from opd_cli.stages.evaluate import evaluate, evaluate_prompts, internalization_score, pass_at_k
from opd_cli.tasks import make_task
from opd_cli.testbed.tokenizer import build_char_tokenizer


class ScriptedEngine(RolloutEngine):
    """Returns fixed responses per prompt (greedy: the first; sampled: the list), to test the arithmetic
    of evaluation, not generation (generation is tested against real models in test_rollout.py)."""

    def __init__(self, tok, greedy: dict, sampled: dict | None = None, truncated: set | None = None):
        self.tok, self.greedy, self.sampled, self.truncated = tok, greedy, sampled or {}, truncated or set()

    def _sample(self, prompt, text):
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        cut = tuple(prompt) in self.truncated
        return Sample(
            list(prompt),
            ids if cut else ids + [self.tok.eos_token_id],
            [0.0] * (len(ids) + (not cut)),
            "length" if cut else "stop",
        )

    def generate(self, prompts, sampling: SamplingConfig, seed: int):
        if sampling.is_greedy:
            return [[self._sample(p, self.greedy[tuple(p)])] for p in prompts]
        return [[self._sample(p, t) for t in self.sampled[tuple(p)]] for p in prompts]

    def sync_weights(self, model) -> float:
        return 0.0


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # 0.5
    assert pass_at_k(5, 2, 4) == 1.0  # n - c < k
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_math_accuracy_on_a_synthetic_set_matches_hand_computation(tok):
    task = make_task("arith", digits=2)
    rows = [
        task.make_row(12, 34),
        task.make_row(55, 66),
        task.make_row(10, 10),
        task.make_row(99, 1 * 10 + 9),
    ]
    prompts = [
        tok.apply_chat_template(task.messages(r), add_generation_prompt=True, tokenize=True) for r in rows
    ]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    greedy = {
        tuple(prompts[0]): rows[0]["solution"],  # correct, well formed
        tuple(prompts[1]): "A:121",  # correct answer, malformed scratchpad
        tuple(prompts[2]): "0+0+0=00;1+1+0=03;A:30",  # wrong, inconsistent step
        tuple(prompts[3]): rows[3]["solution"][:10],  # truncated, wrong
    }
    sampled = {tuple(p): [rows[i]["solution"], "A:0", "A:0", "A:0"] for i, p in enumerate(prompts)}
    engine = ScriptedEngine(tok, greedy, sampled, truncated={tuple(prompts[3])})
    res = evaluate_prompts(engine, tok, task, rows, prompts, max_new_tokens=10, samples=4)
    assert res["accuracy"] == pytest.approx(2 / 4)
    assert res["well_formed"] == pytest.approx(1 / 4)
    assert res["truncation_ratio"] == pytest.approx(1 / 4)
    assert res["accuracy_finished"] == pytest.approx(2 / 3) and res["accuracy_truncated"] == 0.0
    assert res["avg@4"] == pytest.approx(0.25) and res["pass@1"] == pytest.approx(0.25)
    assert res["pass@4"] == pytest.approx(1.0) and res["pass@2"] == pytest.approx(0.5)
    lengths = [
        len(tok(t, add_special_tokens=False)["input_ids"]) + (i != 3) for i, t in enumerate(greedy.values())
    ]
    assert res["mean_length"] == pytest.approx(sum(lengths) / 4)
    assert len(res["samples"]) == 4 and res["samples"][0]["correct"] is True


def test_internalization_score_on_a_constructed_case(tok):
    assert internalization_score(0.5, base_follow_with=0.9, base_follow_without=0.1) == pytest.approx(0.5)
    assert internalization_score(0.9, 0.9, 0.1) == pytest.approx(1.0)
    assert internalization_score(0.1, 0.9, 0.1) == pytest.approx(0.0)
    assert math.isnan(internalization_score(0.5, 0.3, 0.3))

    task = make_task("arith", digits=2, rule="concise")
    rows = task.generate(4, seed=0)

    def prompt_ids(row, system_prompt):
        ids = tok.apply_chat_template(
            task.messages(row, system_prompt=system_prompt), add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def engine(follow_without: int):
        greedy = {tuple(prompt_ids(r, True)): r["solution_concise"] for r in rows}
        greedy.update(
            {
                tuple(prompt_ids(r, False)): (
                    r["solution_concise"] if i < follow_without else r["solution_student"]
                )
                for i, r in enumerate(rows)
            }
        )
        return ScriptedEngine(tok, greedy)

    base = evaluate(engine(0), tok, task, rows, prompt_ids, max_new_tokens=40)
    assert base["internalization"]["follow_with"] == 1.0 and base["internalization"]["follow_without"] == 0.0
    later = evaluate(engine(3), tok, task, rows, prompt_ids, max_new_tokens=40, base=base)
    assert later["internalization"]["score"] == pytest.approx(0.75)
    assert later["without_system"]["accuracy"] == 1.0


@pytest.mark.slow
def test_opd_eval_prints_a_table_and_writes_json(models, tmp_path):
    out = tmp_path / "eval.json"
    res = opd(
        "eval",
        f"checkpoint={models['student']}",
        "eval.size=4",
        "eval.max_new_tokens=16",
        "--engine",
        "hf",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "accuracy" in res.stdout and "truncation_ratio" in res.stdout
    result = json.loads(out.read_text())
    assert result["main"]["n"] == 4 and 0.0 <= result["main"]["accuracy"] <= 1.0
    res = opd("eval", f"checkpoint={tmp_path}", "--engine", "hf", cwd=tmp_path)
    assert res.returncode == 2 and "is not a model directory" in res.stderr
