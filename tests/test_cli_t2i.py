"""``tts-jax run t2i-<method>``: text-to-image steering from the command line, on tiny random SD3
and FLUX pipeline folders (tests/t2i_folders.py) with tiny CLIP rewards (tests/clip_folders.py);
reward specs, pipeline defaults, named errors, the VP time grid.

Runs are minimal (3 steps, 2 trajectories, 32 x 32 images, T5 prompts of 24 tokens, float32).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tts_jax import interpolants as I
from tts_jax.app import cli, experiment, reward_specs, runs, t2i
from tts_jax.app.cli import main

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from tests import clip_folders as C  # noqa: E402
from tests import t2i_folders as T  # noqa: E402

PROMPT = "a photo of a red car"
SMALL = {"num_steps": 3, "budget": 6, "dtype": "float32", "max_sequence_length": 24}
# Unoptimised XLA compiles of the samplers' kernels (3-4x faster to compile; the programs are
# tiny), as in tests/samplers/test_t2i_samplers.py.
_FAST = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}


@pytest.fixture(scope="module", autouse=True)
def _fast_and_shared():
    """One torch thread; the sampler entry points' jits compiled unoptimised; bundles of equal
    settings (all but method, budget, seed) loaded once, as a sweep loads them."""
    from tts_jax.samplers.image import fk_steering, flow_search, noise_search, rollover

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cache = {}
    load = experiment.load_bundle

    def shared(config):
        key = json.dumps(runs.to_jsonable(experiment.sweep_identity(config)), sort_keys=True)
        if key not in cache:
            cache[key] = load(config)
        return cache[key]

    def fast(module, name, static):
        original = getattr(module, name, None)
        if not hasattr(original, "__wrapped__"):
            return  # renamed: the run compiles optimised, slower but the same
        quick = jax.jit(original.__wrapped__, static_argnames=static, compiler_options=_FAST)

        def run(key, *args, **kwargs):
            # The feasibility check traces abstractly: a nested jit takes no compiler options.
            chosen = original if isinstance(key, jax.core.Tracer) else quick
            return chosen(key, *args, **kwargs)

        mp.setattr(module, name, run)

    with pytest.MonkeyPatch.context() as mp:
        fast(fk_steering, "_run", "sampler")
        fast(flow_search, "_run", "sampler")
        fast(noise_search, "_run_compat", ("sampler", "layout"))
        fast(rollover, "_run_rbf", "sampler")
        mp.setattr(experiment, "load_bundle", shared)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_t2i")
    return {
        "sd3": T.make_tiny_sd3(root / "sd3"),
        "flux": T.make_tiny_flux(root / "flux"),
        "schnell": T.make_tiny_flux(root / "schnell", guidance_embeds=False),
        "clip": C.make_tiny_clip(root / "clip"),
    }


def _given(folders, kind):
    """The options of the runs here: two steering rewards (a mean ensemble), one held out."""
    clip = folders["clip"]
    return {
        "pipeline": str(folders[kind]),
        "prompt": PROMPT,
        "reward": (f"clip={clip}", f"aesthetic={clip},{clip / C.HEAD_NAME},weight=0.5"),
        "held_out": (f"pickscore={clip}",),
        **SMALL,
        **({} if kind == "sd3" else {"height": 32, "width": 32}),
    }


def _argv(given):
    out = []
    for name, value in given.items():
        for v in value if isinstance(value, tuple) else (value,):
            out += [cli._flag(name), str(v)]
    return out


def _written(out, printed):
    line = next(line for line in printed.splitlines() if line.startswith(f"wrote {out}/"))
    return set(line.split(": ", 1)[1].split(", "))


# --------------------------------------------------------------------------- runs


@pytest.mark.parametrize("kind", ["sd3", pytest.param("flux", marks=pytest.mark.slow)])
def test_fk_and_bon_write_images_and_the_resolved_config(folders, kind, tmp_path, capsys):
    given = _given(folders, kind)
    for method in ("fk", "bon"):
        out = tmp_path / method
        main(["run", f"t2i-{method}", *_argv(given), "--out-dir", str(out)])
        files = _written(out, capsys.readouterr().out)
        assert files == {
            "config.json",
            "result.json",
            "samples.npz",
            "diagnostics.npz",
            "samples.png",
        }
        record = json.loads((out / "result.json").read_text())
        config = json.loads((out / "config.json").read_text())
        assert config["config"].pop("out_dir") == str(out) and config["config"] == record["config"]
        assert config["environment"]["versions"]["jax"] and record["seed"] == 0
        resolved = record["config"]
        assert resolved["pipeline"] == str(folders[kind].resolve())
        assert resolved["prompt"] == PROMPT and resolved["method"] == method
        assert resolved["reward"] == list(given["reward"])
        assert resolved["held_out"] == list(given["held_out"]) and resolved["ensemble"] == "mean"
        assert resolved["guidance"] == (7.0 if kind == "sd3" else 3.5)
        assert (resolved["height"], resolved["width"], resolved["num_steps"]) == (32, 32, 3)
        assert record["pipeline_kind"] == kind and record["nfe"] <= 6
        assert record["reward_specs"] == resolved["reward"]
        assert np.isfinite([record["pickscore_best"], record["pickscore_mean"]]).all()
        members = record["reward_members"]
        assert set(members) == {f"{m}_{s}" for m in ("clip", "aesthetic") for s in ("best", "mean")}
        # the mean ensemble of the best sample, from its members: (clip + 0.5 aesthetic) / 1.5
        expected = (members["clip_best"] + 0.5 * members["aesthetic_best"]) / 1.5
        assert record["best_reward"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
        samples = np.load(out / "samples.npz")
        assert samples["samples"].shape == (2, T.LATENT_CHANNELS, T.LATENT_SIZE, T.LATENT_SIZE)
        images = samples["images"]
        assert images.shape == (2, 3, 32, 32) and np.abs(images).max() <= 1.0
        assert (out / "samples.png").stat().st_size > 2_000


def test_sweep_records_the_t2i_settings_and_resumes(folders, tmp_path, capsys):
    out = tmp_path / "sweep"
    given = {k: v for k, v in _given(folders, "sd3").items() if k != "budget"}
    argv = ["sweep", "t2i-bon", "--methods", "bon", "fk", "--budgets", "6", "--seeds", "0"]
    main([*argv, *_argv(given), "--out-dir", str(out)])
    records = runs.read_jsonl(out / "runs.jsonl")
    assert sorted(r["method"] for r in records) == ["bon", "fk"]
    assert all(r["config"]["prompt"] == PROMPT and "pickscore_best" in r for r in records)
    shared = json.loads((out / "config.json").read_text())["sweep"]
    assert shared["pipeline"] == str(folders["sd3"].resolve())
    assert shared["reward"] == list(given["reward"])
    assert (out / "scaling.png").exists()
    main([*argv, *_argv(given), "--out-dir", str(out)])  # resumed: nothing re-run
    assert len(runs.read_jsonl(out / "runs.jsonl")) == 2
    with pytest.raises(SystemExit, match="another configuration .*prompt"):
        main([*argv, *_argv({**given, "prompt": "a dog"}), "--out-dir", str(out)])


# --------------------------------------------------------------------------- planning


@pytest.mark.parametrize("method", list(experiment.METHODS))
def test_every_image_method_is_accepted_and_planned(folders, method):
    """Every method resolves its t2i preset, plans and passes the sweep's feasibility check (an
    abstract trace of the run) at its default budget on the pipeline's grid."""
    given = {k: v for k, v in _given(folders, "sd3").items() if k != "budget"}
    model, name = cli.parse_preset(f"t2i-{method}")
    assert (model, name) == ("t2i", method)
    cli.check_applicable(given, cli.preset_options(model, name), f"t2i-{method}")
    config = cli.image_config(model, name, given)
    units = experiment._plan(config, [method], [config.budget], [0])
    experiment._check_all(units, experiment.load_bundle(config))
    assert config.budget == 3 * t2i.TRAJECTORIES.get(method, 4) and config.guidance == 7.0


def test_pipeline_defaults(folders):
    def resolved(kind, method="fk", **given):
        base = {"pipeline": str(folders[kind]), "prompt": PROMPT}
        return cli.image_config(
            "t2i", method, {**base, "reward": (f"clip={folders['clip']}",), **given}
        )

    sd3, flux, schnell = resolved("sd3"), resolved("flux"), resolved("schnell")
    assert (sd3.num_steps, sd3.guidance, sd3.height, sd3.max_sequence_length) == (28, 7.0, 32, 256)
    assert (flux.num_steps, flux.guidance, flux.width, flux.max_sequence_length) == (
        28,
        3.5,
        512,
        512,
    )
    assert (schnell.num_steps, schnell.guidance, schnell.budget) == (4, None, 16)
    assert sd3.budget == 4 * 28 and sd3.dtype == "bfloat16" and sd3.ensemble == "mean"
    with pytest.raises(ValueError, match="--guidance does not apply to FLUX.1-schnell"):
        resolved("schnell", guidance=2.0)
    with pytest.raises(ValueError, match="--negative-prompt does not apply to FLUX"):
        resolved("flux", negative_prompt="blurry")
    with pytest.raises(ValueError, match="--ensemble combines several"):
        resolved("sd3", ensemble="rank")
    two = (f"clip={folders['clip']}", f"pickscore={folders['clip']}")
    assert resolved("sd3", "bon", reward=two, ensemble="rank").ensemble == "rank"
    with pytest.raises(ValueError, match="fk needs one: use --ensemble mean"):
        resolved("sd3", "fk", reward=two, ensemble="rank")


# --------------------------------------------------------------------------- errors


def test_bad_reward_specs_and_a_missing_pipeline_are_named(folders, tmp_path):
    base = ["run", "t2i-bon", "--pipeline", str(folders["sd3"]), "--prompt", PROMPT]
    with pytest.raises(SystemExit, match="unknown reward kind 'pickscor'; known: clip=DIR"):
        main([*base, "--reward", f"pickscor={folders['clip']}"])
    with pytest.raises(SystemExit, match=r"aesthetic takes 2 argument\(s\), aesthetic=DIR,HEAD"):
        main([*base, "--reward", f"aesthetic={folders['clip']}"])
    missing = tmp_path / "nope"
    with pytest.raises(SystemExit, match=f"--held-out: .*DIR {missing} does not exist"):
        main([*base, "--reward", f"clip={folders['clip']}", "--held-out", f"clip={missing}"])
    with pytest.raises(SystemExit, match="t2i-bon needs --reward"):
        main(base)
    argv = ["run", "t2i-bon", "--pipeline", str(missing), "--prompt", PROMPT]
    with pytest.raises(SystemExit, match=f"folder {missing} does not exist"):
        main([*argv, "--reward", f"clip={folders['clip']}"])
    not_a_pipeline = folders["clip"]
    with pytest.raises(SystemExit, match="model_index.json"):
        main(["run", "t2i-bon", "--pipeline", str(not_a_pipeline), "--prompt", PROMPT,
              "--reward", f"clip={folders['clip']}"])  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["run", "t2i-bon", "--lam", "2"], "--lam"),
        (["run", "t2i-single", "--budget", "100"], "--budget"),
        (["run", "t2i-fk", "--target-class", "3"], "--target-class"),
        (["run", "t2i-fk", "--scorer", "oracle"], "--scorer"),
        (["run", "gmm-fk", "--prompt", "a cat"], "--prompt"),
        (["run", "digits-bon", "--reward", "clip=x"], "--reward"),
    ],
)
def test_options_a_t2i_preset_does_not_read_are_errors(argv, flag):
    with pytest.raises(SystemExit, match=f"{flag} does not apply"):
        main(argv)


def test_presets_list_the_t2i_presets_and_reward_kinds(capsys):
    main(["presets"])
    text = capsys.readouterr().out
    assert all(f"t2i-{m}" in text for m in experiment.METHODS)
    assert all(f"{k}=" in text for k in reward_specs.KINDS)


# --------------------------------------------------------------------------- specs, grid


def test_reward_specs_are_canonical_and_keep_secrets_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip").mkdir()
    (tmp_path / "head.safetensors").write_bytes(b"")
    spec = reward_specs.parse_spec("aesthetic=clip, head.safetensors ,weight=2")
    assert spec.text == f"aesthetic={tmp_path / 'clip'},{tmp_path / 'head.safetensors'},weight=2"
    assert reward_specs.parse_spec(spec.text) == spec and spec.weight == 2.0
    judge = reward_specs.parse_spec("http=http://localhost:8000/v1,model=qwen,key_env=MY_KEY")
    assert judge.args == ("http://localhost:8000/v1",)
    assert dict(judge.options) == {"model": "qwen", "key_env": "MY_KEY"}
    for bad, match in [
        ("http=http://localhost:8000/v1,model=m,api_key=sk-123", "secrets never go in a spec"),
        ("http=https://user:sk-123@host/v1,model=m", "the URL carries credentials"),
        ("http=http://localhost:8000/v1", "http needs model=NAME"),
        ("clip=clip,weight=-1", "weight must be > 0"),
        ("clip=clip,tokenizer=clip", "unknown key 'tokenizer' for clip"),
        ("clip", "no KIND= prefix"),
    ]:
        with pytest.raises(reward_specs.RewardSpecError, match=match):
            reward_specs.parse_spec(bad)
    monkeypatch.setenv("MY_KEY", "sk-secret")
    built = reward_specs.build_image_reward(judge, PROMPT, jnp.float32, "judge")
    assert built.name == "judge" and "sk-secret" not in repr(built)  # no request, no key kept
    hps = reward_specs.parse_spec("hps=head.safetensors")
    with pytest.raises(reward_specs.RewardSpecError, match="no tokenizer in .*pass tokenizer=DIR"):
        reward_specs.build_image_reward(hps, PROMPT, jnp.float32, "hps")
    names = [
        reward_specs.parse_spec(s)
        for s in ("clip=clip", "clip=clip", "aesthetic=clip,head.safetensors")
    ]
    assert reward_specs.unique_names(names) == ["clip", "clip_2", "aesthetic"]


def test_vp_times_visit_the_pipeline_noise_levels():
    sigmas = np.array([1.0, 0.98, 0.9, 0.6, 0.3, 0.05, 0.0])
    r = np.asarray(t2i.vp_times(sigmas))
    assert r[0] == 1.0 and r[-1] == 0.0 and np.all(np.diff(r) < 0)
    linear = np.asarray(I.LinearToVP().linear_time(jnp.asarray(r[1:])))
    np.testing.assert_allclose(linear, sigmas[1:], atol=1e-5)
    # sigmas noisier than the VP end (r = 1) are spread between 1 and the first time below it
    spread = np.asarray(t2i.vp_times([1.0, 0.9999, 0.9998, 0.5, 0.0]))
    r_half = float(np.asarray(t2i.vp_times([1.0, 0.5, 0.0]))[1])
    np.testing.assert_allclose(
        spread, [1.0, 1 - (1 - r_half) / 3, 1 - 2 * (1 - r_half) / 3, r_half, 0]
    )
    with pytest.raises(ValueError, match="must decrease strictly"):
        t2i.vp_times([1.0, 0.5, 0.5, 0.0])
