"""Dataset I/O: one loader for testbed rows and real (hub or local) datasets.

- :func:`write_rows` / :func:`save_dataset` write rows atomically (JSONL, or HF `datasets` Arrow via
  ``save_to_disk``).
- :func:`load_rows` reads a local ``.jsonl``/``.json``/``.parquet`` file, a ``save_to_disk`` directory,
  or a hub dataset name, maps columns to our field names and returns plain dict rows.

Every user-facing failure raises :class:`DataError` (a ValueError) whose one-line message names the
problem and the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from opd_cli.errors import OpdError

# the fields of a task row (opd_cli/tasks/base.py): a dataset must provide the required ones
REQUIRED_FIELDS = ("problem", "answer")
OPTIONAL_FIELDS = ("solution", "system_prompt")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HUB_PROBE_TIMEOUT_S = 3.0


class DataError(OpdError, ValueError):
    """A dataset could not be written or loaded; the message says what and how to fix it."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No `datasets` progress bars for small local reads/writes (restored afterwards)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


# ---- writing ------------------------------------------------------------------------------------------
def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_rows(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows as JSONL (one JSON object per line, UTF-8) atomically: a temp file in the same
    directory, then ``os.replace``. Creates parent directories. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(dict(row), ensure_ascii=False, default=_json_default))
                f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def save_dataset(rows: Iterable[Mapping[str, Any]], directory: str | os.PathLike) -> Path:
    """Write rows as a HF `datasets` Arrow directory (``Dataset.from_list(rows).save_to_disk``) into a
    temp directory next to `directory`, then rename it into place (an existing directory is replaced)."""
    from datasets import Dataset

    rows = [dict(r) for r in rows]
    if not rows:
        raise DataError(f"no rows to save to {str(directory)!r}; generate or load some rows first")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        with _quiet():
            Dataset.from_list(rows).save_to_disk(str(tmp))
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
            os.rmdir(old)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


# ---- loading ------------------------------------------------------------------------------------------
def _looks_local(source: str) -> bool:
    return (
        os.path.exists(source)
        or source.startswith(("/", "./", "../", "~", "file:"))
        or source.count("/") > 1
        or Path(source).suffix.lower() in FILE_BUILDERS
    )


def _is_saved_dataset(directory: Path) -> bool:
    return any((directory / f).exists() for f in ("state.json", "dataset_info.json", "dataset_dict.json"))


def _load_file(path: Path) -> Any:
    import datasets

    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"unsupported data file {str(path)!r} (suffix {path.suffix or 'none'}); "
            f"use one of {', '.join(FILE_BUILDERS)} or a save_to_disk directory"
        )
    if path.stat().st_size == 0:
        raise DataError(
            f"dataset file {str(path)!r} is empty; regenerate it or point task.path at a non-empty file"
        )
    # the builder's Arrow cache goes to a throwaway directory, the table is kept in memory
    with tempfile.TemporaryDirectory(prefix="opd-data-") as cache, _quiet():
        try:
            ds = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
            )
        except Exception as e:
            raise DataError(
                f"could not read {str(path)!r} as {builder}: {type(e).__name__}: {_one_line(e)}; "
                "check that the file is valid (JSONL: one JSON object per line)"
            ) from e
        rows = ds.to_list()
    return rows, list(ds.column_names)


def _load_saved(directory: Path, split: str) -> tuple[list[dict], list[str]]:
    import datasets

    state = directory / "state.json"
    if state.is_file():  # a 0-row Dataset is saved with no shards, which load_from_disk cannot read
        with contextlib.suppress(OSError, ValueError):
            if json.loads(state.read_text()).get("_data_files") == []:
                return [], []
    try:
        with _quiet():
            obj = datasets.load_from_disk(str(directory), keep_in_memory=True)
    except Exception as e:
        raise DataError(
            f"could not load the saved dataset {str(directory)!r}: {type(e).__name__}: {_one_line(e)}; "
            "re-create it with opd_cli.data.save_dataset"
        ) from e
    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise DataError(
                f"saved dataset {str(directory)!r} has no split {split!r} (splits: {', '.join(obj)}); "
                "set task.split to one of them"
            )
        obj = obj[split]
    return obj.to_list(), list(obj.column_names)


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    from datasets import config

    url = urlparse(getattr(config, "HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_mode() -> Iterator[None]:
    """Force datasets/huggingface_hub offline (cache only) for the duration of the block."""
    import huggingface_hub.constants as hub_constants
    from datasets import config

    saved = (
        config.HF_HUB_OFFLINE,
        getattr(config, "HF_DATASETS_OFFLINE", None),
        hub_constants.HF_HUB_OFFLINE,
    )
    config.HF_HUB_OFFLINE = True
    config.HF_DATASETS_OFFLINE = True
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE, config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _load_hub(name: str, split: str) -> tuple[list[dict], list[str]]:
    """A hub dataset. When the hub endpoint does not answer a TCP connect within a few seconds, the load
    runs in offline mode (cache only), so a machine without network fails fast instead of hanging."""
    import datasets
    from datasets import config

    offline = bool(config.HF_HUB_OFFLINE) or not _hub_reachable()
    try:
        with _offline_mode() if offline else contextlib.nullcontext():
            ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        if isinstance(e, ValueError) and "split" in str(e).lower() and not isinstance(e, ConnectionError):
            raise DataError(
                f"hub dataset {name!r}: bad split {split!r} ({_one_line(e)}); fix task.split"
            ) from e
        raise DataError(
            f"could not load hub dataset {name} (offline?); download it on a machine with internet or point "
            f"task.path at a local file [{type(e).__name__}: {_one_line(e)}]"
        ) from e
    if isinstance(ds, datasets.DatasetDict):  # pragma: no cover - split= returns a Dataset
        ds = ds[split]
    return ds.to_list(), list(ds.column_names)


def _one_line(e: BaseException, limit: int = 300) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


_MISSING = object()


def _get(row: Mapping[str, Any], column: str) -> Any:
    """row[column]; a dotted path (``reward_model.ground_truth``) walks nested dicts."""
    if column in row:
        return row[column]
    cur: Any = row
    for part in column.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        else:
            return _MISSING
    return cur


def _has_column(columns: list[str], first_row: Mapping[str, Any], column: str) -> bool:
    return column in columns or ("." in column and _get(first_row, column) is not _MISSING)


def _as_text(value: Any) -> str:
    """Field value -> str. A chat-format prompt (list of {role, content}) gives its last user message."""
    if value is None or value is _MISSING:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, Mapping) and "content" in m for m in value):
        users = [m for m in value if m.get("role") == "user"] or list(value)
        return str(users[-1]["content"])
    if isinstance(value, list) and len(value) == 1:  # e.g. answer columns stored as one-element lists
        return _as_text(value[0])
    return str(value)


def load_rows(
    source: str | os.PathLike,
    *,
    split: str = "train",
    fields: Mapping[str, str] | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Load rows from `source`: a local ``.jsonl``/``.json``/``.parquet`` file, a directory written by
    ``save_to_disk`` (a DatasetDict picks `split`), or a hub dataset name (``load_dataset(name, split)``).

    `fields` maps our field names to the dataset's columns (dotted paths walk nested dicts, e.g.
    ``{"problem": "prompt", "answer": "reward_model.ground_truth"}``). Unmapped fields use the column of
    the same name, except a column already used by an explicit mapping (so ``{"answer": "solution"}``
    does not also become our `solution`). `problem` and `answer` are required; `solution` and
    `system_prompt` default to "". The four fields are strings (a chat-format prompt becomes its last
    user message); other columns pass through unchanged unless their name is one of our fields or
    they were mapped to one of our fields.
    `limit` keeps the first `limit` rows. Raises DataError with the fix on every user error.
    """
    source = os.fspath(source)
    if not source:
        raise DataError(
            "no dataset given; set task.path to a local .jsonl/.json/.parquet file, a directory or a hub name"
        )
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}; pass None for all rows")
    fields = dict(fields or {})
    # extra (task-specific) fields may be mapped too; they keep the column's value as is
    extra = sorted(set(fields) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    expanded = os.path.expanduser(source.removeprefix("file://"))
    if _looks_local(source):
        path = Path(expanded)
        if not path.exists():
            kind = "file" if path.suffix.lower() in FILE_BUILDERS else "file or directory"
            raise DataError(
                f"dataset {kind} not found: {str(path)!r}; check task.path (build the testbed data first?)"
            )
        if path.is_dir():
            if not _is_saved_dataset(path):
                raise DataError(
                    f"directory {str(path)!r} is not a saved dataset (no state.json/dataset_dict.json); "
                    "point task.path at a .jsonl/.parquet file or a save_to_disk directory"
                )
            rows, columns = _load_saved(path, split)
        else:
            rows, columns = _load_file(path)
        where = repr(str(path))
    else:
        rows, columns = _load_hub(source, split)
        where = f"hub dataset {source!r} (split {split!r})"
    if not rows:
        raise DataError(f"{where} is empty (0 rows); regenerate it or point task.path at a non-empty dataset")

    # resolve the column of every field
    mapping: dict[str, str] = {}
    explicit = set(fields.values())
    for field in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS, *extra):
        column = fields.get(field)
        if column is not None:
            if not _has_column(columns, rows[0], column):
                raise DataError(
                    f"{where} has no column {column!r} for field {field!r} (columns: {', '.join(columns)}); "
                    "fix task.fields"
                )
            mapping[field] = column
        elif field in columns and field not in explicit:
            mapping[field] = field
        elif field in REQUIRED_FIELDS:
            raise DataError(
                f"{where} has no column for required field {field!r} (columns: {', '.join(columns)}); "
                f"map it with task.fields, e.g. {{{field!r}: '<column>'}}"
            )

    if limit is not None:
        rows = rows[:limit]
    ours = {*REQUIRED_FIELDS, *OPTIONAL_FIELDS, *extra}
    consumed = {c for c in mapping.values() if c in columns}  # mapped columns are not passed through again
    out = []
    for raw in rows:
        row = {k: v for k, v in raw.items() if k not in ours and k not in consumed}
        for field in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS):
            row[field] = _as_text(_get(raw, mapping[field])) if field in mapping else ""
        for field in extra:
            row[field] = _get(raw, mapping[field]) if field in mapping else None
        out.append(row)
    return out
