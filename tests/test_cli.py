"""The command line and run records: demo output, reproducibility, resumable JSON lines."""

import json

import numpy as np
import pytest

from tts_jax.app import runs
from tts_jax.app.cli import main


@pytest.mark.slow
def test_demo_writes_results_that_match_the_analytic_target(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [
        "demo",
        "--parts",
        "gmm",
        "--gmm.num-particles",
        "2048",
        "--gmm.num-steps",
        "30",
        "--gmm.out-dir",
        str(out),
    ]
    main(argv)
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
    main(argv)
    np.testing.assert_array_equal(np.load(out / "samples.npz")["samples"], first)


def test_jsonl_survives_a_truncated_last_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    runs.append_jsonl(path, {"a": 1, "x": np.float32(2.5)})
    runs.append_jsonl(path, {"a": 2, "arr": np.arange(3)})
    with open(path, "a") as f:
        f.write('{"a": 3, "trunc')
    records = runs.read_jsonl(path)
    assert records == [{"a": 1, "x": 2.5}, {"a": 2, "arr": [0, 1, 2]}]


def test_run_writes_a_reproducible_record(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "gmm-fk", "--budget", "200", "--num-steps", "10", "--out-dir", str(out)]
    main(argv)
    first = json.loads((out / "result.json").read_text())
    assert first["nfe"] <= 200 and first["seed"] == 0
    assert json.loads((out / "config.json").read_text())["config"]["method"] == "fk"
    main(argv)
    assert json.loads((out / "result.json").read_text())["best_reward"] == first["best_reward"]


def test_unknown_preset_lists_the_known_ones(capsys):
    import pytest

    with pytest.raises(SystemExit, match="known presets: .*gmm-fk.*digits-rbf"):
        main(["run", "gmm-nope"])
    with pytest.raises(SystemExit, match="minimum budget is 20"):
        main(["run", "gmm-fk", "--budget", "5", "--num-steps", "20"])


@pytest.mark.slow
def test_sweep_resumes_without_redoing_finished_runs(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        "gmm-fk",
        "--budgets",
        "20",
        "40",
        "--seeds",
        "0",
        "--num-steps",
        "10",
        "--out-dir",
        str(out),
    ]
    main(argv)
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 2
    # Simulate a run killed mid-write: a truncated line, then resume with one more seed.
    with open(out / "runs.jsonl", "a") as f:
        f.write('{"method": "fk", "bud')
    main([*argv[:-6], "--seeds", "0", "1", "--num-steps", "10", "--out-dir", str(out)])
    records = runs.read_jsonl(out / "runs.jsonl")
    assert sorted((r["budget"], r["seed"]) for r in records) == [(20, 0), (20, 1), (40, 0), (40, 1)]
    assert (out / "scaling.png").exists() and (out / "scaling.svg").exists()


def test_image_run_writes_a_png_grid(tmp_path, capsys):
    out = tmp_path / "digits-run"
    main(["run", "digits-bon", "--budget", "40", "--num-steps", "10", "--out-dir", str(out)])
    assert (out / "samples.png").stat().st_size > 2_000
    assert np.load(out / "samples.npz")["samples"].shape == (4, 1, 8, 8)


@pytest.mark.slow
def test_digits_demo_writes_a_grid_and_respects_the_budget(tmp_path, capsys):
    out = tmp_path / "digits"
    main(
        [
            "demo",
            "--parts",
            "digits",
            "--digits.budget",
            "60",
            "--digits.num-steps",
            "10",
            "--digits.seeds",
            "0",
            "--digits.out-dir",
            str(out),
        ]
    )
    result = json.loads((out / "result.json").read_text())
    assert set(result["methods"]) == {"single", "bon", "fk", "rbf"}
    assert all(r["nfe"] <= 60 for r in result["methods"].values())
    assert (out / "digits_steering.png").stat().st_size > 5_000
    assert "held-out acc" in capsys.readouterr().out


def test_arith_run_writes_records_per_problem(tmp_path, capsys):
    out = tmp_path / "arith"
    main(
        [
            "run",
            "arith-pf",
            "--num-particles",
            "2",
            "--problems",
            "0",
            "2",
            "--scorer",
            "oracle",
            "--out-dir",
            str(out),
        ]
    )
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "pf" and result["budget"] == 2 and 0.0 <= result["correct"] <= 1.0
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all("completion" in json.loads(line) for line in lines)


def test_train_knows_every_embedded_model_and_rejects_others():
    import importlib.util

    import pytest

    from tts_jax.app.cli import training_module
    from tts_jax.app.training import MODULES

    for model in MODULES:
        assert importlib.util.find_spec(training_module(model)) is not None
    with pytest.raises(SystemExit, match="known: \\['arith-lm'"):
        main(["train", "nope"])


def test_arith_sweep_records_step_diagnostics_and_resumes(tmp_path, capsys):
    out = tmp_path / "asweep"
    argv = [
        "sweep",
        "arith-pf",
        "--methods",
        "bon",
        "pf",
        "--budgets",
        "2",
        "--seeds",
        "0",
        "--problems",
        "0",
        "1",
        "--scorer",
        "oracle",
        "--out-dir",
        str(out),
    ]
    main(argv)
    records = runs.read_jsonl(out / "runs.jsonl")
    assert sorted(r["method"] for r in records) == ["bon", "pf"]
    pf = next(r for r in records if r["method"] == "pf")
    assert len(pf["step_ess"]) == len(pf["step_resampled"]) >= 1
    main(argv)
    assert len(runs.read_jsonl(out / "runs.jsonl")) == 2
    assert (out / "scaling.png").exists()


USER_CONFIG = """
from tts_jax.app.experiment import Bundle
from tts_jax.models import gmm as G
from tts_jax.rewards.analytic import linear_reward


def make_bundle(config):
    mixture = G.asymmetric_gmm_2d()
    held_out = {"x": linear_reward([1.0, 0.0])}
    return Bundle(G.flow_model(mixture), linear_reward([0.0, 1.0]), held_out)
"""


def test_user_config_file_works_like_a_preset(tmp_path, capsys):
    import pytest

    path = tmp_path / "my_config.py"
    path.write_text(USER_CONFIG)
    out = tmp_path / "user"
    main(["run", f"{path}:bon", "--budget", "100", "--num-steps", "10", "--out-dir", str(out)])
    result = json.loads((out / "result.json").read_text())
    samples = np.load(out / "samples.npz")
    assert result["nfe"] == 100 and "x_best" in result
    assert result["best_reward"] == pytest.approx(float(samples["samples"][:, 1].max()), rel=1e-5)
    with pytest.raises(SystemExit, match="does not exist"):
        main(["run", f"{tmp_path / 'missing.py'}:bon"])
