"""The math task's LM steering runner on the tiny Qwen2 policy / Qwen2.5-Math-PRM folders and a
few problems of ``tests/data/math20.jsonl``: every method end to end, resuming, refusing another
configuration, named errors."""

import dataclasses
import json
import pathlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
torch.set_num_threads(1)

from tests.lm_folders import shared_folders  # noqa: E402
from tts_jax.app import experiment_math as M  # noqa: E402
from tts_jax.app import runs  # noqa: E402
from tts_jax.app.tasks.math.data import ProblemFormatError  # noqa: E402

DATA = pathlib.Path(__file__).parents[1] / "data" / "math20.jsonl"
TINY = {"max_steps": 2, "max_step_tokens": 3, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("math-models")
    data = root / "math5.jsonl"
    data.write_text("".join(DATA.read_text().splitlines(keepends=True)[:5]))
    return (*shared_folders(), data)


@pytest.fixture(scope="module")
def base(folders):
    policy, prm, data = folders
    return M.MathRunConfig(
        method="pf", num_particles=2, policy=str(policy), prm=str(prm), data=str(data), **TINY
    )


@pytest.fixture(scope="module")
def bundle(base):
    return M.load_math_bundle(base, with_prm=True)


@pytest.mark.parametrize("method", sorted(M.MATH_METHODS))
def test_every_method_runs_end_to_end(method, base, bundle, tmp_path):
    n = 4 if method == "gibbs" else 2
    config = dataclasses.replace(base, method=method, num_particles=n, out_dir=str(tmp_path))
    summary = M.run_math(config, bundle)
    (record,) = summary["records"]
    assert record["method"] == method and record["problem"] == 0
    assert record["expected"] == "5" and isinstance(record["completion"], str)
    assert record["budget"] == (1 if method == "greedy" else n)
    assert (record["prm_calls"] > 0) == M.MATH_METHODS[method].uses_scorer
    assert record["selection"] == M.MATH_METHODS[method].selection
    assert record["tokens"] > 0 and record["lm_calls"] > 0
    assert record["config"]["prm_scoring"] == "incremental"  # which PRM scorer ran
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["num_problems"] == 1 and result["ci_method"] == "wilson"
    low, high = result["correct_ci95"]
    assert 0.0 <= low <= result["correct"] <= high <= 1.0
    assert result["config"]["temperature"] == (0.0 if method == "greedy" else 0.7)
    assert result["environment"]["versions"]["jax"]
    assert "top_p" in result["generation_settings"]["unsupported"]
    assert len(runs.read_jsonl(tmp_path / "runs.jsonl")) == 1


def test_restart_skips_finished_problems_and_refuses_another_config(
    base, bundle, tmp_path, monkeypatch
):
    calls = []
    real = M.run_problem

    def counted(config, problem, bundle):
        calls.append(problem.index)
        return real(config, problem, bundle)

    monkeypatch.setattr(M, "run_problem", counted)
    config = dataclasses.replace(base, method="majority", out_dir=str(tmp_path), problems=(0, 3))
    first = M.run_math(config, bundle)["records"]
    assert calls == [0, 1, 2]
    # "killed" after three problems, restarted on five: only the two new ones run
    summary = M.run_math(dataclasses.replace(config, problems=(0, 5)), bundle)
    assert calls == [0, 1, 2, 3, 4]
    assert summary["num_problems"] == 5 and summary["records"][:3] == first
    assert len(runs.read_jsonl(tmp_path / "runs.jsonl")) == 5
    # the same config again runs nothing
    M.run_math(dataclasses.replace(config, problems=(1, 4)), bundle)
    assert calls == [0, 1, 2, 3, 4]
    # killed while writing problem 4: its truncated line is skipped and the problem re-run
    path = tmp_path / "runs.jsonl"
    path.write_text(path.read_text()[:-40])
    assert M.run_math(dataclasses.replace(config, problems=(0, 5)), bundle)["num_problems"] == 5
    assert calls == [0, 1, 2, 3, 4, 4]
    # another configuration in the same folder is refused before anything runs
    for other in ({"seed": 1}, {"method": "bon"}, {"temperature": 0.3}):
        with pytest.raises(M.ConfigMismatchError, match="another configuration"):
            M.run_math(dataclasses.replace(config, **other), bundle)
    assert calls == [0, 1, 2, 3, 4, 4]
    assert len(runs.read_jsonl(tmp_path / "runs.jsonl")) == 5


def test_a_line_without_the_problem_field_is_named(folders, tmp_path):
    policy, _, _ = folders
    data = tmp_path / "bad.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n{"question": "2+2", "answer": "4"}\n')
    config = M.MathRunConfig(
        method="majority", policy=str(policy), data=str(data), out_dir=str(tmp_path / "o"), **TINY
    )
    with pytest.raises(ProblemFormatError, match=r"line 2: no 'problem' field"):
        M.run_math(config)


def test_a_prm_folder_that_is_not_a_prm_is_refused(folders, tmp_path):
    policy, _, data = folders
    config = M.MathRunConfig(
        method="bon", policy=str(policy), prm=str(policy), data=str(data), out_dir=str(tmp_path)
    )
    with pytest.raises(M.NotAPRMError, match="Qwen2ForProcessRewardModel"):
        M.run_math(config)
    with pytest.raises(M.NotAPRMError):
        M.load_math_bundle(config)
    assert not (tmp_path / "runs.jsonl").exists()


def test_config_is_validated_and_resolved(base, bundle, tmp_path):
    with pytest.raises(ValueError, match="gibbs"):
        dataclasses.replace(base, method="gibbs", num_particles=2)
    with pytest.raises(ValueError, match="set prm"):
        dataclasses.replace(base, prm=None)
    with pytest.raises(ValueError, match="unknown prm_scoring"):
        dataclasses.replace(base, prm_scoring="cached")
    host = bundle.scorer_and_params(dataclasses.replace(base, prm_scoring="host"), "1 + 1")
    assert host == (bundle.scorers["host"], None)
    scorer, params = bundle.scorer_and_params(base, "1 + 1")
    assert scorer == bundle.scorers["incremental"] and int(params.head_length) > 0
    with pytest.raises(ValueError, match="unknown selection"):
        dataclasses.replace(base, selection="first")
    with pytest.raises(ValueError, match="problems"):
        dataclasses.replace(base, problems=(3, 3))
    free = dataclasses.replace(base, max_new_tokens=None, temperature=None)
    resolved = M.resolve_config(free, bundle.settings)
    assert resolved.max_new_tokens == 64 and resolved.temperature == 0.7
    assert resolved.selection == "argmax"
    majority = M.resolve_config(dataclasses.replace(base, method="majority"), bundle.settings)
    assert majority.prm is None and majority.selection == "majority"
    with pytest.raises(ValueError, match="exceed the 5 problems"):
        M.run_math(dataclasses.replace(base, problems=(0, 6), out_dir=str(tmp_path)), bundle)


def test_wilson_interval():
    assert M.wilson_interval(0, 0) == (0.0, 1.0)
    low, high = M.wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high = M.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)


def test_command_line_config(folders):
    policy, prm, data = folders
    given = {"policy": str(policy), "prm": str(prm), "data": str(data), "num_particles": 4}
    config = M.math_config("pf", given)
    assert config.problems == (0, 5) and config.out_dir == "outputs/lm-pf-n4-seed0"
    assert M.math_config("pf", given | {"problems": (1, 3)}).problems == (1, 3)
    with pytest.raises(ValueError, match="prm do"):
        M.math_config("majority", given)
    assert "softmax_temperature" in M.math_options("gibbs")
    assert "num_particles" not in M.math_options("greedy")


def test_the_command_line_runs_an_lm_preset_and_refuses_options_it_does_not_read(folders, tmp_path):
    from tts_jax.app.cli import main

    policy, prm, data = folders
    out = tmp_path / "run"
    argv = ["run", "lm-pf", "--policy", str(policy), "--prm", str(prm), "--data", str(data)]
    tiny = ["--max-steps", "2", "--max-step-tokens", "3", "--max-new-tokens", "6"]
    main([*argv, *tiny, "--num-particles", "2", "--problems", "0", "2", "--out-dir", str(out)])
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["problem"] for r in records) == [0, 1]
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["policy"] == str(policy.resolve()) and "correct" in result
    with pytest.raises(SystemExit, match="--lam does not apply to lm-pf"):
        main([*argv, "--lam", "2"])
