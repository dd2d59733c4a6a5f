"""Dataset recipes (conf/task/<dataset>.yaml) on local JSONL and Parquet files with each hub dataset's
schema, through the same loading code as a hub name; math-verify grading of boxed answers."""

from __future__ import annotations

import pytest

DAPO_PROMPT = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{p}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)
SCHEMAS = {  # task yaml -> (one row in the hub dataset's columns, expected problem, expected answer)
    "dapo_math": (
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": DAPO_PROMPT.format(p="What is $3+4$?")}],
            "ability": "MATH",
            "reward_model": {"ground_truth": "7", "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": "a1"},
        },
        "What is $3+4$?",
        "7",
    ),
    "math500": (
        {
            "problem": "Compute $\\frac{1}{2}+\\frac{1}{3}$.",
            "solution": "We get $\\boxed{\\frac{5}{6}}$.",
            "answer": "\\frac{5}{6}",
            "subject": "Prealgebra",
            "level": 2,
            "unique_id": "test/prealgebra/1.json",
        },
        "Compute $\\frac{1}{2}+\\frac{1}{3}$.",
        "\\frac{5}{6}",
    ),
    "aime24": (
        {
            "id": 60,
            "problem": "Find $x$.",
            "solution": "So $\\boxed{204}$.",
            "answer": "204",
            "url": "u",
            "year": "2024",
        },
        "Find $x$.",
        "204",
    ),
    "aime25": (
        {
            "ID": "2025-I-1",
            "Year": 2025,
            "Problem Number": 1,
            "problem": "Find $n$.",
            "answer": "70",
            "Part": "I",
            "question": "Find $n$.",
        },
        "Find $n$.",
        "70",
    ),
    "openthoughts_math": (
        {
            "source": "olympiads",
            "problem": "Find $y$.",
            "solution": "Clearly $y=2^{10}$, so the answer is $\\boxed{1024}$.",
            "messages": [{"role": "user", "content": "Find $y$."}],
            "system": "",
            "conversations": [{"from": "user", "value": "Find $y$."}],
            "generated_token_count": 10,
            "correct": True,
        },
        "Find $y$.",
        "1024",
    ),
}


def _write(rows: list[dict], path, fmt: str):
    if fmt == "jsonl":
        from opd_cli.data import write_rows

        return write_rows(rows, path.with_suffix(".jsonl"))
    from datasets import Dataset

    target = path.with_suffix(".parquet")
    Dataset.from_list(rows).to_parquet(str(target))
    return target


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("dataset", sorted(SCHEMAS))
def test_dataset_recipe_loads_a_local_file_with_the_hub_schema(tmp_path, dataset, fmt):
    from opd_cli.launch import compose
    from opd_cli.stages.common import load_task_and_data

    row, problem, answer = SCHEMAS[dataset]
    path = _write([row, row], tmp_path / dataset, fmt)
    cfg = compose(
        [
            f"task={dataset}",
            f"task.path={path}",
            f"task.eval_path={path}",
            f"task.eval_split={cfg_split(fmt)}",
        ]
    )
    assert cfg.task.name == "math"
    task, train, evals = load_task_and_data(cfg.task)
    assert train[0]["problem"] == problem and train[0]["answer"] == answer
    assert task.verify(train[0], f"so it is \\boxed{{{answer}}}").correct
    assert not task.verify(train[0], "so it is \\boxed{13}").correct
    if dataset == "openthoughts_math":  # the solution PI keeps the whole reference solution
        assert "2^{10}" in train[0]["solution"]


def cfg_split(fmt: str) -> str:
    return "train"  # a local file is read as one split


@pytest.mark.parametrize(
    ("gold", "response", "correct"),
    [
        ("7", "The sum is \\boxed{7}.", True),
        ("\\frac{5}{6}", "\\boxed{\\frac{5}{6}}", True),
        ("\\frac{5}{6}", "\\boxed{10/12}", True),
        ("0.5", "\\boxed{\\frac{1}{2}}", True),
        ("\\sqrt{2}/2", "\\boxed{\\frac{\\sqrt{2}}{2}}", True),
        ("x^2+2x+1", "\\boxed{(x+1)^2}", True),
        ("204", "first \\boxed{17} then finally \\boxed{204}", True),
        ("204", "\\boxed{205}", False),
        ("\\frac{5}{6}", "\\boxed{\\frac{6}{5}}", False),
        ("7", "The answer is 7.", False),  # no box: not well formed, not correct
    ],
)
def test_math_verify_grading(gold, response, correct):
    from opd_cli.tasks import make_task

    verdict = make_task("math").verify({"problem": "p", "answer": gold}, response)
    assert verdict.correct is correct
    assert verdict.well_formed is ("\\boxed" in response)
