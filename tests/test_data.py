"""Dataset I/O: JSONL / parquet / save_to_disk round trips, field mapping, and every DataError."""

from __future__ import annotations

import json
import os

import pytest

from opd_cli.data import DataError, load_rows, save_dataset, write_rows
from opd_cli.tasks import ArithTask, MathTask


@pytest.fixture(scope="module")
def rows():
    return ArithTask(digits=3, rule="concise").generate(12, seed=0)


def test_jsonl_round_trip(tmp_path, rows):
    path = write_rows(rows, tmp_path / "sub" / "train.jsonl")
    assert path.exists() and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(rows) and json.loads(lines[0]) == rows[0]
    assert load_rows(str(path)) == rows
    assert load_rows(path, limit=5) == rows[:5]
    # atomic overwrite
    write_rows(rows[:3], path)
    assert load_rows(path) == rows[:3]


def test_json_and_parquet_round_trip(tmp_path, rows):
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "train.parquet"))
    assert load_rows(tmp_path / "train.parquet") == rows
    (tmp_path / "train.json").write_text(json.dumps(rows))
    assert load_rows(tmp_path / "train.json") == rows


def test_save_to_disk_round_trip(tmp_path, rows):
    import datasets

    d = save_dataset(rows, tmp_path / "ds")
    assert load_rows(d) == rows
    save_dataset(rows[:2], d)  # replaces an existing directory
    assert load_rows(d) == rows[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    # a DatasetDict picks the split
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:4]), "test": datasets.Dataset.from_list(rows[4:6])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_rows(tmp_path / "dd", split="test") == rows[4:6]
    with pytest.raises(DataError, match="no split 'validation'.*train"):
        load_rows(tmp_path / "dd", split="validation")


def test_field_mapping(tmp_path):
    raw = [
        {"prompt": [{"role": "user", "content": "What is 1+1?"}], "solution": "2", "source": "x"},
        {"prompt": [{"role": "user", "content": "What is 2+2?"}], "solution": "4", "source": "y"},
    ]
    write_rows(raw, tmp_path / "dapo.jsonl")
    out = load_rows(tmp_path / "dapo.jsonl", fields={"problem": "prompt", "answer": "solution"})
    assert out == [
        {"source": "x", "problem": "What is 1+1?", "answer": "2", "solution": "", "system_prompt": ""},
        {"source": "y", "problem": "What is 2+2?", "answer": "4", "solution": "", "system_prompt": ""},
    ]
    # nested columns, numbers become strings, optional fields mapped explicitly
    raw = [{"q": "1+1?", "reward_model": {"ground_truth": 2}, "ref": "1+1=2", "sys": "be brief"}]
    write_rows(raw, tmp_path / "nested.jsonl")
    out = load_rows(
        tmp_path / "nested.jsonl",
        fields={
            "problem": "q",
            "answer": "reward_model.ground_truth",
            "solution": "ref",
            "system_prompt": "sys",
        },
    )
    assert out[0]["answer"] == "2" and out[0]["solution"] == "1+1=2" and out[0]["system_prompt"] == "be brief"
    # MathTask.load maps and normalizes
    t = MathTask(path=str(tmp_path / "dapo.jsonl"), fields={"problem": "prompt", "answer": "solution"})
    loaded = t.load()
    assert loaded[0]["hint"] == "2" and loaded[0]["task"] == "math"
    assert len(t.generate(1, seed=0)) == 1 and t.generate(2, seed=3) == t.generate(2, seed=3)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"not found: '.*nope\.jsonl'.*task\.path"):
        load_rows(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"not found: '.*missing_dir'"):
        load_rows(str(tmp_path / "missing_dir"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"'.*plain' is not a saved dataset"):
        load_rows(tmp_path / "plain")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unsupported data file '.*x\.csv'"):
        load_rows(tmp_path / "x.csv")
    with pytest.raises(DataError, match="no dataset given"):
        load_rows("")
    with pytest.raises(DataError, match="no dataset; set task.path"):
        MathTask().load()


def test_missing_field_names_field_and_columns(tmp_path):
    write_rows([{"question": "1+1?", "final": "2"}], tmp_path / "d.jsonl")
    with pytest.raises(DataError, match=r"required field 'problem' \(columns: question, final\)"):
        load_rows(tmp_path / "d.jsonl")
    with pytest.raises(
        DataError, match=r"no column 'prompt' for field 'problem' \(columns: question, final\)"
    ):
        load_rows(tmp_path / "d.jsonl", fields={"problem": "prompt", "answer": "final"})
    with pytest.raises(DataError, match=r"required field 'answer'"):
        load_rows(tmp_path / "d.jsonl", fields={"problem": "question"})
    out = load_rows(tmp_path / "d.jsonl", fields={"problem": "question", "answer": "final"})
    assert out == [{"problem": "1+1?", "answer": "2", "solution": "", "system_prompt": ""}]


def test_empty_and_corrupt(tmp_path):
    import datasets

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"'.*empty\.jsonl' is empty"):
        load_rows(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="no rows to save"):
        save_dataset([], tmp_path / "nothing")
    datasets.Dataset.from_dict({"problem": [], "answer": []}).save_to_disk(str(tmp_path / "empty_ds"))
    with pytest.raises(DataError, match=r"'.*empty_ds' is empty"):
        load_rows(tmp_path / "empty_ds")
    (tmp_path / "bad.jsonl").write_text('{"problem": "x", "answer"\n')
    with pytest.raises(DataError, match=r"could not read '.*bad\.jsonl' as json"):
        load_rows(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="limit"):
        load_rows(tmp_path / "bad.jsonl", limit=-1)


def test_hub_unreachable_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("opd_cli.data._hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(
        DataError, match=r"could not load hub dataset opd-test/does-not-exist \(offline\?\).*task\.path"
    ):
        load_rows("opd-test/does-not-exist")


def test_no_cache_in_home(tmp_path, rows, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    write_rows(rows, tmp_path / "t.jsonl")
    load_rows(tmp_path / "t.jsonl")
    assert not os.listdir(home)
