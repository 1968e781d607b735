"""The command line and run records: demo output, reproducibility, resumable JSON lines."""

import json

import numpy as np

from tts_jax import runs
from tts_jax.cli import main


def test_demo_writes_results_that_match_the_analytic_target(tmp_path, capsys):
    out = tmp_path / "demo"
    main(
        ["demo", "--gmm.num-particles", "2048", "--gmm.num-steps", "30", "--gmm.out-dir", str(out)]
    )
    printed = capsys.readouterr().out
    assert "analytic" in printed and "FK steering" in printed
    result = json.loads((out / "result.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["seed"] == 0 and config["environment"]["versions"]["jax"]
    a, s = result["analytic"], result["sampled"]
    # 2048 weighted particles: the mixture's std is ~1.2, so 5 standard errors are < 0.15.
    np.testing.assert_allclose(s["mean"], a["mean"], atol=0.15)
    np.testing.assert_allclose(s["component_weights"], a["component_weights"], atol=0.06)
    assert (out / "gmm_steering.png").stat().st_size > 10_000
    first = np.load(out / "samples.npz")["samples"]
    main(
        ["demo", "--gmm.num-particles", "2048", "--gmm.num-steps", "30", "--gmm.out-dir", str(out)]
    )
    np.testing.assert_array_equal(np.load(out / "samples.npz")["samples"], first)


def test_jsonl_survives_a_truncated_last_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    runs.append_jsonl(path, {"a": 1, "x": np.float32(2.5)})
    runs.append_jsonl(path, {"a": 2, "arr": np.arange(3)})
    with open(path, "a") as f:
        f.write('{"a": 3, "trunc')
    records = runs.read_jsonl(path)
    assert records == [{"a": 1, "x": 2.5}, {"a": 2, "arr": [0, 1, 2]}]
