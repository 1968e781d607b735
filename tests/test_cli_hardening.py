"""What a new user meets first: preset defaults, sweeps that never mix configurations, weight
collapse reported, flags that do not apply refused, honest file lists, user files, training."""

import json
import logging
import sys

import numpy as np
import pytest

from tts_jax.app import cli, experiment, runs
from tts_jax.app.cli import main

README_FK = ["run", "digits-fk", "--budget", "800", "--target-class", "7", "--seed", "1"]


def _written(out, printed):
    """The file names the CLI says it wrote to ``out``, each checked to exist."""
    line = next(line for line in printed.splitlines() if line.startswith(f"wrote {out}/"))
    names = line.split(": ", 1)[1].split(", ")
    for name in names:
        assert (out / name).is_file(), f"the CLI says it wrote {name}, which does not exist"
    return set(names)


# --------------------------------------------------------------------------- 1: defaults, collapse


def test_preset_defaults_are_the_settings_of_the_results():
    # README / experiments/RESULTS.md digits results: 20 steps, lam = 1, g = 3 t^2.
    for model in experiment.MODELS:
        config = cli.image_config(model, "fk", {})
        assert (config.num_steps, config.lam, config.diffusion_norm) == (20, 1.0, 3.0)
    assert experiment.RunConfig().lam == 1.0


@pytest.mark.slow
def test_readme_fk_command_does_not_collapse_and_a_sharp_tilt_is_reported(tmp_path, caplog):
    ok = tmp_path / "ok"
    main([*README_FK, "--out-dir", str(ok)])
    record = json.loads((ok / "result.json").read_text())
    assert record["config"]["lam"] == 1.0
    assert not record["weight_collapse"]["collapsed"]
    assert record["weight_collapse"]["min_ess_fraction"] >= 0.05
    bad = tmp_path / "bad"
    with caplog.at_level(logging.WARNING, logger="tts_jax"):
        main([*README_FK, "--lam", "10", "--out-dir", str(bad)])
    record = json.loads((bad / "result.json").read_text())
    collapse = record["weight_collapse"]
    assert collapse["collapsed"] and collapse["min_ess"] < 0.05 * record["num_samples"]
    assert any("collapsed" in r.message for r in caplog.records)


# --------------------------------------------------------------------------- 2: sweeps


def _gmm_sweep(out, *extra):
    return [
        "sweep",
        "gmm-fk",
        "--budgets",
        "20",
        "--seeds",
        "0",
        "--num-steps",
        "10",
        "--out-dir",
        str(out),
        *extra,
    ]


def test_sweep_refuses_a_folder_of_other_settings_and_resumes_the_same(tmp_path, capsys):
    out = tmp_path / "sweep"
    main(_gmm_sweep(out, "--lam", "2"))
    stored = json.loads((out / "config.json").read_text())
    assert stored["sweep"]["lam"] == 2.0 and stored["versions"]["jax"]
    lines = (out / "runs.jsonl").read_text()
    record = json.loads(lines.splitlines()[0])
    assert record["config"]["lam"] == 2.0 and record["config_id"]
    with pytest.raises(SystemExit, match=r"another configuration \(sweep.lam: 2.0 -> 1.0\)"):
        main(_gmm_sweep(out))
    main(_gmm_sweep(out, "--lam", "2"))  # the same settings resume: nothing re-run
    assert (out / "runs.jsonl").read_text() == lines


def test_sweep_of_another_target_class_never_mixes_runs(tmp_path, capsys):
    out = tmp_path / "digits"
    argv = ["sweep", "digits-bon", "--budgets", "10", "--seeds", "0", "--num-steps", "10"]
    main([*argv, "--target-class", "3", "--out-dir", str(out)])
    with pytest.raises(SystemExit, match="target_class: 3 -> 5"):
        main([*argv, "--target-class", "5", "--out-dir", str(out)])
    assert len(runs.read_jsonl(out / "runs.jsonl")) == 1


def test_default_sweep_folders_differ_with_the_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["sweep", "gmm-bon", "--budgets", "10", "--seeds", "0", "--num-steps", "10"]
    main(argv)
    main([*argv[:-2], "--num-steps", "5"])
    folders = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert len(folders) == 2 and all(f.startswith("sweep-gmm-") for f in folders)


def test_records_of_other_versions_are_not_resumed(tmp_path):
    config = experiment.RunConfig(model="gmm", method="bon", budget=10, num_steps=10)
    fields = experiment.identity(config)
    versions = runs.identity_versions()
    assert runs.config_id(fields, versions) == runs.config_id(dict(fields), dict(versions))
    assert runs.config_id(fields, versions) != runs.config_id(fields, {**versions, "jax": "0"})
    assert runs.config_id(fields) != runs.config_id({**fields, "lam": 2.0})


def test_infeasible_budget_is_rejected_before_the_first_run(tmp_path, capsys):
    out = tmp_path / "s"
    # rbf needs a pool of 4 noises per chain (2 NFE each) plus a quota: 24 NFE at 10 steps do not
    # fit, 400 do; the infeasible budget comes last in the sweep but fails before anything runs.
    with pytest.raises(SystemExit, match="rbf at budget 24 is infeasible"):
        main(
            [
                "sweep",
                "gmm-rbf",
                "--budgets",
                "400",
                "24",
                "--seeds",
                "0",
                "--num-steps",
                "10",
                "--out-dir",
                str(out),
            ]
        )
    assert runs.read_jsonl(out / "runs.jsonl") == []
    with pytest.raises(SystemExit, match="minimum budget is 10"):
        main(
            ["sweep", "gmm-bon", "--budgets", "40", "5", "--num-steps", "10", "--out-dir", str(out)]
        )
    assert runs.read_jsonl(out / "runs.jsonl") == []


# --------------------------------------------------------------------------- 6: help, flags, files


def test_help_explains_options_and_presets_are_listed(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert "PRESET" in text and "STR " not in text
    assert "inverse temperature" in text and "per preset" in text
    main(["presets"])
    text = capsys.readouterr().out
    for model, method in [(m, k) for m in experiment.MODELS for k in experiment.METHODS]:
        assert f"{model}-{method}" in text
    for method in cli.experiment_lm.LM_METHODS:
        assert f"arith-{method}" in text
    for option in cli.OPTION_HELP:
        assert cli._flag(option) in text


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["run", "gmm-fk", "--scorer", "oracle"], "--scorer"),
        (["run", "arith-pf", "--lam", "1"], "--lam"),
        (["run", "arith-pf", "--budget", "10"], "--budget"),
        (["run", "gmm-bon", "--lam", "2"], "--lam"),
        (["run", "gmm-fk", "--target-class", "4"], "--target-class"),
        (["run", "arith-greedy", "--num-particles", "4"], "--num-particles"),
        (["run", "arith-majority", "--scorer", "oracle"], "--scorer"),
        (["sweep", "gmm-bon", "--methods", "bon", "zo", "--lam", "2"], "--lam"),
    ],
)
def test_flags_that_do_not_apply_are_errors(argv, flag):
    with pytest.raises(SystemExit, match=f"{flag} does not apply"):
        main(argv)


@pytest.mark.slow
def test_every_run_writes_what_the_readme_promises(tmp_path, capsys):
    promised = {"config.json", "result.json", "samples.npz", "diagnostics.npz"}
    runs_argv = {
        "gmm": ["run", "gmm-fk", "--budget", "200", "--num-steps", "10"],
        "digits": ["run", "digits-bon", "--budget", "20", "--num-steps", "10"],
        "arith": [
            "run",
            "arith-pf",
            "--num-particles",
            "2",
            "--problems",
            "0",
            "1",
            "--scorer",
            "oracle",
        ],
    }
    for name, argv in runs_argv.items():
        out = tmp_path / name
        main([*argv, "--out-dir", str(out)])
        assert promised <= _written(out, capsys.readouterr().out)
    diagnostics = np.load(tmp_path / "arith" / "diagnostics.npz")
    assert diagnostics["ess"].shape[0] == 1 and diagnostics["tokens"].shape == (1,)
    assert np.load(tmp_path / "arith" / "samples.npz")["completion"].shape == (1,)


@pytest.mark.slow
def test_demo_writes_samples_and_diagnostics_for_every_part(tmp_path, capsys):
    main(
        [
            "demo",
            "--parts",
            "gmm",
            "digits",
            "arith",
            "--gmm.num-particles",
            "256",
            "--gmm.num-steps",
            "10",
            "--gmm.out-dir",
            str(tmp_path / "gmm"),
            "--digits.budget",
            "40",
            "--digits.num-steps",
            "10",
            "--digits.seeds",
            "0",
            "--digits.out-dir",
            str(tmp_path / "digits"),
            "--arith.num-particles",
            "2",
            "--arith.problems",
            "0",
            "1",
            "--arith.out-dir",
            str(tmp_path / "arith"),
        ]
    )
    printed = capsys.readouterr().out
    for part in ("gmm", "digits", "arith"):
        files = _written(tmp_path / part, printed)
        assert {"config.json", "result.json", "samples.npz", "diagnostics.npz"} <= files
    samples = np.load(tmp_path / "digits" / "samples.npz")
    assert samples["fk"].shape == (1, 1, 8, 8)


# --------------------------------------------------------------------------- 5: extreme lambda


@pytest.mark.slow
def test_gmm_demo_reports_a_collapsed_tilt_and_its_discrepancy(tmp_path, caplog, capsys):
    out = tmp_path / "sharp"
    with caplog.at_level(logging.WARNING, logger="tts_jax"):
        main(
            [
                "demo",
                "--parts",
                "gmm",
                "--gmm.lam",
                "1e4",
                "--gmm.num-particles",
                "512",
                "--gmm.num-steps",
                "20",
                "--gmm.out-dir",
                str(out),
            ]
        )
    result = json.loads((out / "result.json").read_text())
    assert result["weight_collapse"]["collapsed"] and result["mean_error_std"] > 10
    messages = " ".join(r.message for r in caplog.records)
    assert "collapsed" in messages and "misses the exact tilted mean" in messages
    assert "COLLAPSED" in capsys.readouterr().out


# --------------------------------------------------------------------------- 8: user files

SIBLING = "DIRECTION = [0.0, 1.0]\n"
USER_CONFIG = """
from tts_jax.app.experiment import Bundle
from tts_jax.models import gmm as G
from tts_jax.rewards.analytic import linear_reward
from my_rewards import DIRECTION


def make_bundle(config):
    return Bundle(G.flow_model(G.asymmetric_gmm_2d()), linear_reward(DIRECTION), {})
"""


def test_user_file_imports_its_siblings_and_wrong_types_are_named(tmp_path, capsys):
    (tmp_path / "my_rewards.py").write_text(SIBLING)
    path = tmp_path / "my_config.py"
    path.write_text(USER_CONFIG)
    out = tmp_path / "user"
    main(["run", f"{path}:bon", "--budget", "100", "--num-steps", "10", "--out-dir", str(out)])
    samples = np.load(out / "samples.npz")
    best = json.loads((out / "result.json").read_text())["best_reward"]
    assert best == pytest.approx(float(samples["samples"][:, 1].max()), rel=1e-5)
    assert str(tmp_path) not in sys.path
    bad = tmp_path / "bad_config.py"
    bad.write_text("def make_bundle(config):\n    return {'model': None}\n")
    with pytest.raises(
        SystemExit,
        match="make_bundle returned builtins.dict, expected tts_jax.app.experiment.Bundle",
    ):
        main(["run", f"{bad}:bon", "--budget", "100", "--num-steps", "10"])


# --------------------------------------------------------------------------- 9: training


def test_train_writes_to_an_output_folder_unless_installing():
    command = cli.training_command(cli.Train(model="arith-tokenizer"))
    assert command[command.index("--out") + 1] == "outputs/train/arith-tokenizer"
    assert "--install" not in command
    command = cli.training_command(cli.Train(model="digits-dit", out_dir="x", install=True))
    assert command[command.index("--out") + 1] == "x" and command[-1] == "--install"


# --------------------------------------------------------------------------- 3: --nan-policy

NAN_CONFIG = """
import jax.numpy as jnp
from tts_jax.app.experiment import Bundle
from tts_jax.models import gmm as G
from tts_jax.rewards.base import Reward


def _half_nan(params, x, cond=None):
    return jnp.where(x[:, 0] > 0, jnp.nan, x[:, 1])


def make_bundle(config):
    return Bundle(G.flow_model(G.asymmetric_gmm_2d()), Reward({}, _half_nan, "half_nan"), {})
"""


def test_nan_policy_flag_reaches_the_sampler(tmp_path, capsys):
    path = tmp_path / "nan_config.py"
    path.write_text(NAN_CONFIG)
    argv = ["run", f"{path}:bon", "--budget", "200", "--num-steps", "10"]
    with pytest.raises(SystemExit, match="reward 'half_nan' returned NaN"):
        main([*argv, "--out-dir", str(tmp_path / "raise")])
    main([*argv, "--nan-policy", "drop", "--out-dir", str(tmp_path / "drop")])
    record = json.loads((tmp_path / "drop" / "result.json").read_text())
    assert record["config"]["nan_policy"] == "drop" and np.isfinite(record["best_reward"])
    with pytest.raises(SystemExit, match="nan_policy must be one of"):
        main([*argv, "--nan-policy", "ignore"])
