"""Math problems from JSONL, parquet and ``datasets`` folders, and the shipped 20-problem set."""

import builtins
import json
import pathlib

import pytest

from tts_jax.app.tasks.math import answers as A
from tts_jax.app.tasks.math import data as D

MATH20 = pathlib.Path(__file__).parents[2] / "data" / "math20.jsonl"


def test_math20_loads_and_its_solutions_check_out():
    problems = D.load_problems(MATH20)
    assert len(problems) == 20 and [p.index for p in problems] == list(range(20))
    assert problems[2].answer == "\\frac{5}{6}" and problems[5].answer == "(-3, 3)"
    assert problems[0].extra["subject"] == "Algebra" and "solution" in problems[0].extra
    for p in problems:
        assert A.is_correct(p.extra["solution"], p.answer), p
    assert len(D.load_problems(MATH20, limit=3)) == 3


def test_a_line_without_the_problem_field_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [{"problem": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": "4"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(D.ProblemFormatError, match=r"line 2: no 'problem' field"):
        D.load_problems(path)
    with pytest.raises(D.ProblemFormatError, match="line 1"):
        D.load_problems(path, problem_field="question")


def test_other_field_names_invalid_json_and_unknown_types(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "gt": 2}) + "\n\n")
    (problem,) = D.load_problems(path, problem_field="question", answer_field="gt")
    assert problem.problem == "1+1?" and problem.answer == "2"
    path.write_text('{"problem": "x"\n')
    with pytest.raises(D.ProblemFormatError, match="line 1: invalid JSON"):
        D.load_problems(path)
    (tmp_path / "p.csv").write_text("problem,answer\n")
    with pytest.raises(D.ProblemFormatError, match="unknown problem file type"):
        D.load_problems(tmp_path / "p.csv")
    with pytest.raises(FileNotFoundError):
        D.load_problems(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(D.ProblemFormatError, match="no problems"):
        D.load_problems(tmp_path / "empty.jsonl")


def _hide(monkeypatch, name):
    real = builtins.__import__

    def fake(module, *args, **kwargs):
        if module == name or module.startswith(name + "."):
            raise ImportError(f"No module named {module!r}")
        return real(module, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_missing_optional_readers_are_named(tmp_path, monkeypatch):
    (tmp_path / "p.parquet").write_bytes(b"")
    (tmp_path / "saved").mkdir()
    _hide(monkeypatch, "pyarrow")
    with pytest.raises(D.MissingDependencyError, match="pip install pyarrow"):
        D.load_problems(tmp_path / "p.parquet")
    _hide(monkeypatch, "datasets")
    with pytest.raises(D.MissingDependencyError, match="pip install datasets"):
        D.load_problems(tmp_path / "saved")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"problem": ["1+1?", "2+2?"], "answer": ["2", "4"], "level": [1, 2]})
    pq.write_table(table, tmp_path / "p.parquet")
    problems = D.load_problems(tmp_path / "p.parquet")
    assert [(p.problem, p.answer, p.extra["level"]) for p in problems] == [
        ("1+1?", "2", 1),
        ("2+2?", "4", 2),
    ]


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    from datasets.table import InMemoryTable

    def make(name):  # not Dataset.from_dict: its fingerprint hashing breaks on some pyarrows
        rows = pa.table({"problem": ["1+1?", "2+2?"], "answer": ["2", "4"]})
        return datasets.Dataset(InMemoryTable(rows), fingerprint=name)

    make("one").save_to_disk(str(tmp_path / "one"))
    assert [p.answer for p in D.load_problems(tmp_path / "one")] == ["2", "4"]
    datasets.DatasetDict({"test": make("a"), "train": make("b")}).save_to_disk(
        str(tmp_path / "two")
    )
    with pytest.raises(D.ProblemFormatError, match="splits"):
        D.load_problems(tmp_path / "two")
    assert len(D.load_problems(tmp_path / "two", split="test")) == 2
    with pytest.raises(D.ProblemFormatError, match="no split"):
        D.load_problems(tmp_path / "two", split="validation")
