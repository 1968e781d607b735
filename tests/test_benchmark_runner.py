"""benchmarks/run_all.py keeps finished sections: RESULTS.md round-trips through its parser."""

from benchmarks import run_all


def test_results_sections_round_trip_in_benchmark_order(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "RESULTS", tmp_path / "RESULTS.md")
    (first, _), (second, _) = run_all.BENCHMARKS[0], run_all.BENCHMARKS[-1]
    sections = {
        second: "`python -m x` (measured then)\n\n| a | b |\n|---|---|\n| 1 | 2 |",
        first: "text with a #3 and\n\nblank lines",
        "a benchmark that no longer exists": "dropped",
    }
    run_all.write_results(sections)
    text = run_all.RESULTS.read_text()
    assert text.index(f"## {first}") < text.index(f"## {second}")
    assert "no longer exists" not in text
    back = run_all.read_sections(run_all.RESULTS)
    assert back == {first: sections[first], second: sections[second]}
    assert run_all.read_sections(tmp_path / "missing.md") == {}
