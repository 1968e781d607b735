"""Math problems (MATH500-style) from a JSONL file, a parquet file or a ``datasets`` folder.

Every source gives rows with a problem statement and a reference answer (the MATH500 fields
``problem`` and ``answer`` by default; other columns are kept in :attr:`MathProblem.extra`).
JSONL needs nothing beyond the standard library; parquet needs ``pyarrow`` and a
``datasets.Dataset.save_to_disk`` folder needs ``datasets``: both optional, and a missing one is
a :class:`MissingDependencyError` that says what to install.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple


class MathProblem(NamedTuple):
    """One problem.

    Attributes:
        problem: the statement (the user message of the prompt).
        answer: the reference final answer (LaTeX, without ``\\boxed``).
        index: position in the source.
        extra: the row's other fields (``level``, ``subject``, ``unique_id``, ...).
    """

    problem: str
    answer: str
    index: int
    extra: Mapping[str, Any] = {}


class ProblemFormatError(ValueError):
    """A row lacks the problem or answer field, or is not an object (naming where)."""


class MissingDependencyError(ImportError):
    """Reading this format needs an optional package that is not installed."""


def _row(row: Any, index: int, where: str, problem_field: str, answer_field: str) -> MathProblem:
    if not isinstance(row, Mapping):
        raise ProblemFormatError(f"{where}: expected an object, got {type(row).__name__}")
    missing = [f for f in (problem_field, answer_field) if f not in row or row[f] is None]
    if missing:
        raise ProblemFormatError(
            f"{where}: no {' / '.join(repr(m) for m in missing)} field (has {sorted(row)}); "
            "set problem_field / answer_field"
        )
    extra = {k: v for k, v in row.items() if k not in (problem_field, answer_field)}
    return MathProblem(str(row[problem_field]), str(row[answer_field]), index, extra)


def _jsonl_rows(path: pathlib.Path) -> Iterable[tuple[Any, str]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line), f"{path}, line {number}"
            except json.JSONDecodeError as err:
                raise ProblemFormatError(f"{path}, line {number}: invalid JSON ({err})") from err


def _parquet_rows(path: pathlib.Path) -> Iterable[tuple[Any, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise MissingDependencyError(
            f"reading {path} needs pyarrow: pip install pyarrow (or convert it to JSONL)"
        ) from err
    for i, row in enumerate(pq.read_table(path).to_pylist()):
        yield row, f"{path}, row {i}"


def _dataset_rows(path: pathlib.Path, split: str | None) -> Iterable[tuple[Any, str]]:
    try:
        import datasets
    except ImportError as err:
        raise MissingDependencyError(
            f"{path} is a `datasets` save_to_disk folder: pip install datasets to read it "
            "(or export it to JSONL with Dataset.to_json)"
        ) from err
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        names = list(data)
        if split is None and len(names) != 1:
            raise ProblemFormatError(f"{path}: pick one of the splits {names} with split=...")
        split = names[0] if split is None else split
        if split not in data:
            raise ProblemFormatError(f"{path}: no split {split!r}; has {names}")
        data = data[split]
    for i, row in enumerate(data):
        yield row, f"{path}, row {i}"


def load_problems(
    path: str | pathlib.Path,
    problem_field: str = "problem",
    answer_field: str = "answer",
    *,
    split: str | None = None,
    limit: int | None = None,
) -> list[MathProblem]:
    """Problems from a ``.jsonl`` / ``.json`` lines file, a ``.parquet`` file or a ``datasets``
    ``save_to_disk`` folder.

    Args:
        path: the file or folder.
        problem_field: column of the statement.
        answer_field: column of the reference answer.
        split: split of a ``DatasetDict`` folder (needed if it has several).
        limit: keep the first ``limit`` problems.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ProblemFormatError: a row without the fields (with its line or row number), invalid
            JSON, an unknown file type, or an empty source.
        MissingDependencyError: parquet without ``pyarrow``, a folder without ``datasets``.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load_problems: no such file or folder {path}")
    if path.is_dir():
        rows = _dataset_rows(path, split)
    elif path.suffix in (".jsonl", ".json", ".ndjson"):
        rows = _jsonl_rows(path)
    elif path.suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        raise ProblemFormatError(
            f"{path}: unknown problem file type {path.suffix!r} (.jsonl, .parquet or a "
            "datasets folder)"
        )
    problems = []
    for row, where in rows:
        if limit is not None and len(problems) >= limit:
            break
        problems.append(_row(row, len(problems), where, problem_field, answer_field))
    if not problems:
        raise ProblemFormatError(f"{path}: no problems")
    return problems
