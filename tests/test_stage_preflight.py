"""opd preflight: every pair-compatibility check fails on a deliberately broken pair with its one line and
exit 2, and passes on the testbed pairs; `opd run preflight=true` refuses to start on a fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model_dir, run_opd

FAST = ["rollout=hf", "rollout.max_new_tokens=16", "task.train_size=32", "logger=none"]


@pytest.fixture(scope="module")
def pair_root(tmp_path_factory) -> Path:
    """A tiny student and teacher (same char tokenizer) to copy and break."""
    root = tmp_path_factory.mktemp("pair")
    build_tiny_model_dir(root / "student", seed=0)
    build_tiny_model_dir(root / "teacher", seed=1, hidden_size=96, num_layers=3)
    return root


def broken(pair_root: Path, tmp_path: Path, side: str, edit) -> list[str]:
    """model.path / teacher.path overrides for a copy of the pair with `side`'s directory edited."""
    paths = {}
    for name in ("student", "teacher"):
        paths[name] = tmp_path / name
        shutil.copytree(pair_root / name, paths[name])
    edit(paths[side])
    return [f"model.path={paths['student']}", f"teacher.path={paths['teacher']}"]


def edit_json(path: Path, **values) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**data, **values}))


def edit_template(directory: Path, old: str, new: str) -> None:
    file = directory / "chat_template.jinja"
    text = file.read_text()
    assert old in text
    file.write_text(text.replace(old, new))


def preflight(tmp_path: Path, *args: str):
    return run_opd("preflight", *FAST, "--rollouts", "0", "--out", str(tmp_path / "out"), *args, timeout=300)


def assert_fails(proc, check: str, words: str, tmp_path: Path) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: preflight:") and f"{check}: " in last and words in last, last
    assert f"fail  {check}" in proc.stdout
    report = json.loads((tmp_path / "out" / "preflight.json").read_text())
    failed = [c["name"] for r in report["recipes"] for c in r["checks"] if c["status"] == "fail"]
    assert check in failed
    # nothing expensive after a failed file check: no weights loaded, no rollouts
    assert all(r["part_b"] is None for r in report["recipes"])


@pytest.mark.parametrize(
    "side, edit, check, words",
    [
        (
            "teacher",
            lambda d: edit_json(d / "generation_config.json", eos_token_id=5),
            "stop_tokens",
            "[2, 5]",
        ),
        (
            "student",
            lambda d: edit_template(d, "{%- if add_generation_prompt -%}<|assistant|>", "{%- if false -%}"),
            "generation_prompt",
            "appends nothing",
        ),
        (  # the teacher's prompt is shifted by one token: an extra "#" after its generation prompt
            "teacher",
            lambda d: edit_template(d, "<|assistant|>{%- endif -%}", "<|assistant|>#{%- endif -%}"),
            "prompt_tail",
            "one context off",
        ),
        (
            "teacher",
            lambda d: edit_json(d / "config.json", vocab_size=128),
            "embedding_rows",
            "student 102 rows",
        ),
    ],
    ids=["other_eos", "no_generation_prompt", "shifted_prompt", "padded_vocab"],
)
def test_broken_pair_fails_with_one_line(pair_root, tmp_path, side, edit, check, words):
    proc = preflight(tmp_path, *broken(pair_root, tmp_path, side, edit))
    assert_fails(proc, check, words, tmp_path)


def test_pi_field_missing_and_pi_not_in_prompt(tmp_path):
    proc = preflight(
        tmp_path,
        "teacher=self_answer",
        "model=opsd_base",
        "teacher.prompt_template='{problem} H:{reference}'",
    )
    assert_fails(proc, "pi_fields", "['reference']", tmp_path)
    proc = preflight(
        tmp_path, "teacher=self_answer", "model=opsd_base", "teacher.prompt_template='{problem}'"
    )
    assert_fails(proc, "pi_fields", "does not change", tmp_path)


def test_testbed_pairs_pass_with_part_b(tmp_path):
    """The default recipe and OPSD with the answer as PI pass every check (weights ones included) and
    measure part B on their rollouts; both rows land in preflight.json / preflight.md."""
    out = tmp_path / "out"
    for args in ([], ["teacher=self_answer", "model=opsd_base"]):
        proc = run_opd("preflight", *FAST, "--rollouts", "6", "--out", str(out), *args, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stderr.startswith("preflight budget: 1 recipe(s)")
        recipe = json.loads((out / "preflight.json").read_text())["recipes"][0]
        status = {c["name"]: c["status"] for c in recipe["checks"]}
        for name in ("vocabulary", "stop_tokens", "prompt_tail", "position_alignment", "teacher_determinism"):
            assert status[name] == "pass", recipe["checks"]
        assert status["pi_fields"] == ("pass" if args else "skip")
        b = recipe["part_b"]
        assert b["positions"] > 0 and 0.0 <= b["mechanism_1"]["topk_overlap"] <= 1.0
        assert set(b["mechanism_2"]["arms"]) >= {"topk_rkl", "topk_rkl_stopgrad", "topk_rkl_renorm"}
        assert (
            b["mechanism_2"]["recipe_loss"] == "topk_rkl_stopgrad"
        )  # the default recipe's and self_answer's
        m3 = b["mechanism_3"]
        if args:  # the answer PI: a finite, positive gap where the teacher commits (stages/pi_probe.py)
            assert m3["status"].startswith("gap to the student's optimum") and not m3["shared"], m3
            # where the hint teacher commits to a direct answer (86% of prompts on v5, 24% on v4): None when
            # it commits on none of these 6 rollouts, else finite and positive
            commits = m3["gap_where_teacher_commits"]
            assert (commits is None or 0.0 < commits < float("inf")) and m3["kl_to_no_pi"] > 0.0, m3
            # after its own scratchpad: none when 16 new tokens end before the student's answer (FAST)
            gap = m3["gap_to_student_optimum"]
            assert gap is None or 0.0 <= gap < float("inf"), m3
            # q_bar over the student's own answers, decoded: a share of these 6 prompts, graded
            opt = m3["optimum"]
            assert opt is None or (0.0 <= opt["accuracy"] <= opt["right_for_some_pi"] <= 1.0), m3
        else:
            assert m3["status"] == "n/a (no privileged information)"
        assert "| recipe | seed | part A |" in (out / "preflight.md").read_text()
    # part B scores in chunks (bounded memory): 2 sequences per forward gives the means of 8 per forward.
    # The sequences differ only in padding, which moves fp32 log-probs by <= 1.6e-5 nats (measured, see
    # TOLERANCES), so a mean over positions moves by at most that: 1e-4 for the teacher NLL; dP_topK is a
    # product of such log-probs' probabilities and gradients, relative 1e-5 of its scale
    proc = run_opd(
        "preflight", *FAST, "--rollouts", "6", "--out", str(out), "trainer.micro_batch_size=2", *args
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    chunked = json.loads((out / "preflight.json").read_text())["recipes"][0]["part_b"]
    assert chunked["positions"] == b["positions"]
    assert abs(chunked["mechanism_1"]["teacher_nll"] - b["mechanism_1"]["teacher_nll"]) < 1e-4
    arm = "topk_rkl_stopgrad"
    got, want = (x["mechanism_2"]["arms"][arm]["d_topk_mass"] for x in (chunked, b))
    assert abs(got - want) < 1e-5 * max(abs(want), 1e-3)


def test_run_preflight_true_refuses_to_start(pair_root, tmp_path):
    overrides = broken(
        pair_root, tmp_path, "teacher", lambda d: edit_json(d / "generation_config.json", eos_token_id=5)
    )
    run_dir = tmp_path / "run"
    proc = run_opd("run", *FAST, "preflight=true", f"hydra.run.dir={run_dir}", *overrides, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: preflight: stop_tokens:"), proc.stderr
    assert not run_dir.exists()


# ------------------------------------------------------------------------- the weight checks, in process
@pytest.fixture(scope="module")
def scored(pair_root):
    """The real student and teacher, the teacher-scoring path and a few sequences."""
    from opd_cli.learner import load_model, load_tokenizer
    from opd_cli.tasks import make_task
    from opd_cli.teachers import PromptBuilder, Teacher

    task = make_task("arith", digits=3, rule=None)
    rows = task.generate(4, 0)
    tok = load_tokenizer(pair_root / "student")
    teacher = Teacher(
        load_model(pair_root / "teacher", torch.device("cpu"), trainable=False), tok, PromptBuilder(task)
    )
    responses = [tok.encode(r["answer"] + "<|end|>", add_special_tokens=False) for r in rows]
    responses[1] = responses[1][:2]  # unequal lengths: the batch is padded
    return teacher, rows, responses


def test_noisy_teacher_fails_determinism(scored):
    from opd_cli.losses import TeacherLogprobs
    from opd_cli.stages.preflight import TOLERANCES, check_teacher_determinism

    teacher, rows, responses = scored
    assert check_teacher_determinism(teacher.score, rows, responses, TOLERANCES["fp32"]).status == "pass"
    gen = torch.Generator().manual_seed(0)

    def noisy(r, s):  # a teacher whose scores move by ~1e-3 nats between calls (e.g. sampling noise)
        full = teacher.score(r, s).full
        return TeacherLogprobs(full=full + 1e-3 * torch.randn(full.shape, generator=gen))

    check = check_teacher_determinism(noisy, rows, responses, TOLERANCES["fp32"])
    assert check.status == "fail" and "noisy between calls" in check.detail


def test_shifted_scores_fail_position_alignment(scored):
    from opd_cli.stages.preflight import TOLERANCES, position_alignment

    teacher, rows, responses = scored
    full = teacher.score(rows, responses).full
    mask = torch.zeros(full.shape[:2], dtype=torch.bool)
    for i, r in enumerate(responses):
        mask[i, : len(r)] = True
    assert position_alignment(full, full, mask, TOLERANCES["fp32"]).status == "pass"
    shifted = torch.cat([full[:, :1], full[:, :-1]], dim=1)  # off by one position
    check = position_alignment(full, shifted, mask, TOLERANCES["fp32"])
    assert check.status == "fail" and "shifted" in check.detail


def test_mass_change_matches_autograd():
    """dP_S from the closed form equals d/d(eta) P_S(z - eta g) at eta = 0 (autograd)."""
    from opd_cli.stages.preflight import mass_change

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64)
    top = z.topk(4, dim=-1).indices
    eta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    p_s = torch.softmax(z - eta * g, -1).gather(-1, top).sum()
    (d,) = torch.autograd.grad(p_s, eta)
    closed = mass_change(torch.log_softmax(z, -1), g, 4).sum()
    # float64 sums of 165 terms of size <= 1: agreement to ~1e-14; 1e-10 is a loose, still-failing bound
    assert abs(float(closed) - float(d)) < 1e-10


def test_run_preflight_true_passes_then_trains(pair_root, tmp_path):
    overrides = broken(pair_root, tmp_path, "teacher", lambda d: None)
    run_dir = tmp_path / "run"
    proc = run_opd(
        "run",
        *FAST,
        "preflight=true",
        "trainer.steps=1",
        "trainer.prompts_per_step=2",
        "eval.size=2",
        "eval.max_new_tokens=8",
        f"hydra.run.dir={run_dir}",
        *overrides,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "preflight: 9 checks passed, skipped: pi_fields" in proc.stderr
    assert (run_dir / "summary.json").is_file()


def test_vllm_teacher_path_agrees_with_hf(tmp_path):
    """teacher.backend=vllm: the recipe's own teacher path (vLLM in process) is compared with the HF
    forward on the same sequences (tolerance TOLERANCES['fp32']['vllm'], argued there)."""
    proc = preflight(tmp_path, "teacher.backend=vllm", "loss.support=intersection")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recipe = json.loads((tmp_path / "out" / "preflight.json").read_text())["recipes"][0]
    assert {c["name"]: c["status"] for c in recipe["checks"]}["teacher_paths"] == "pass"


def test_vllm_path_check_fails_on_other_scores(scored):
    from opd_cli.losses import TeacherLogprobs
    from opd_cli.stages.preflight import TOLERANCES, check_vllm_path

    teacher, rows, responses = scored
    full = teacher.score(rows, responses).full
    top, ids = full.topk(5, dim=-1)
    sampled = full.gather(
        -1, torch.tensor([r + [0] * (full.shape[1] - len(r)) for r in responses]).unsqueeze(-1)
    )
    same = TeacherLogprobs(topk_ids=ids, topk_logprobs=top, sampled=sampled.squeeze(-1))
    assert check_vllm_path(same, full, responses, TOLERANCES["fp32"]).status == "pass"
    other = TeacherLogprobs(topk_ids=ids, topk_logprobs=top + 0.01, sampled=sampled.squeeze(-1))
    check = check_vllm_path(other, full, responses, TOLERANCES["fp32"])
    assert check.status == "fail" and "teacher paths disagree" in check.detail


def test_think_block_mismatch_fails_prompt_tail(pair_root, tmp_path):
    """Qwen3-style template on both sides, the student without thinking (an empty think block ends its
    prompt), the teacher with it: the teacher's prompt ends one think block earlier."""
    from test_chat_templates import QWEN3_STYLE

    def qwen3_style(directory: Path) -> None:
        (directory / "chat_template.jinja").write_text(QWEN3_STYLE)

    overrides = broken(pair_root, tmp_path, "teacher", qwen3_style)
    qwen3_style(Path(overrides[0].split("=", 1)[1]))
    proc = preflight(tmp_path, *overrides, "model.enable_thinking=false", "teacher.enable_thinking=true")
    assert_fails(proc, "prompt_tail", "enable_thinking student=False, teacher=True", tmp_path)


def test_without_weights_part_a_runs_from_tokenizer_and_config(pair_root, tmp_path):
    """Only tokenizer + config.json on disk: the file checks run and pass, the weight checks say why not."""

    def drop_weights(directory: Path) -> None:
        for f in directory.glob("*.safetensors"):
            f.unlink()

    overrides = broken(pair_root, tmp_path, "teacher", drop_weights)
    drop_weights(Path(overrides[0].split("=", 1)[1]))
    proc = preflight(tmp_path, *overrides)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recipe = json.loads((tmp_path / "out" / "preflight.json").read_text())["recipes"][0]
    status = {c["name"]: (c["status"], c["detail"]) for c in recipe["checks"]}
    assert status["stop_tokens"][0] == status["prompt_tail"][0] == status["embedding_rows"][0] == "pass"
    for name in ("position_alignment", "teacher_determinism", "temperature"):
        assert status[name] == (
            "skip",
            "no local weights for the student and teacher: position/determinism checks and part B skipped",
        )


def test_temperature_contract_fails_on_scaled_sampler_logprobs(scored):
    """Sample log-probs reported at temperature 0.8 (not the raw ones the loss uses) fail the contract."""
    from opd_cli.rollout.base import Sample
    from opd_cli.stages.preflight import TOLERANCES, check_temperature

    teacher, rows, responses = scored
    full = teacher.score(rows, responses).full  # the model's temperature-1 log-probs of these tokens

    def samples(temperature: float) -> list[Sample]:
        logp = torch.log_softmax(torch.log_softmax(full, -1) / temperature, -1)
        return [
            Sample(
                [1],
                r,
                logp[i, : len(r)].gather(-1, torch.tensor(r).unsqueeze(-1)).squeeze(-1).tolist(),
                "stop",
            )
            for i, r in enumerate(responses)
        ]

    assert check_temperature(samples(1.0), full, responses, TOLERANCES["fp32"], 1.0).status == "pass"
    check = check_temperature(samples(0.8), full, responses, TOLERANCES["fp32"], 1.0)
    assert check.status == "fail" and "another temperature" in check.detail
