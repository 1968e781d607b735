"""The ``tts-jax`` command line.

* ``tts-jax demo``: the main job on the embedded defaults.
* ``tts-jax run PRESET``: one steering run; ``PRESET`` is ``<model>-<method>`` (``gmm-fk``,
  ``digits-rbf``, ...) or ``path/to/config.py:<method>`` for a user file defining ``make_bundle``.
* ``tts-jax sweep PRESET --methods ... --budgets ... --seeds ...``: a resumable scaling study with
  a plot.
* ``tts-jax train MODEL``: retrain an embedded model with its script in ``experiments/``.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import subprocess
import sys

import tyro

from tts_jax import experiment, experiment_lm, plots, runs
from tts_jax.demos import digits as digits_demo
from tts_jax.demos.digits import DigitsDemoConfig
from tts_jax.demos.gmm import GMMDemoConfig, format_table, run_gmm_demo

log = logging.getLogger("tts_jax")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Demo:
    """The main demo on the embedded defaults.

    ``gmm``: FK steering of an exact mixture against its closed-form tilt; ``digits``: FK steering
    and RBF of the digits flow model toward a class versus best-of-N at equal NFE; ``arith``:
    particle filtering versus best-of-N on the arithmetic LM, with the learned PRM and the oracle.
    """

    parts: tuple[str, ...] = ("gmm", "digits", "arith")
    gmm: GMMDemoConfig = GMMDemoConfig()
    digits: DigitsDemoConfig = DigitsDemoConfig()
    arith_particles: int = 8
    arith_problems: tuple[int, int] = (0, 10)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
    """One steering run of PRESET (``<model>-<method>`` or ``file.py:<method>``).

    Image presets spend ``--budget`` NFE; ``arith-<method>`` presets use ``--num-particles`` N on
    ``--problems START STOP`` held-out arithmetic problems with the ``--scorer`` (prm | oracle).
    """

    preset: tyro.conf.Positional[str]
    budget: int = 2000
    num_particles: int = 8
    problems: tuple[int, int] = (0, 10)
    scorer: str = "prm"
    num_steps: int = 20
    lam: float = 10.0
    target_class: int = 3
    diffusion_norm: float = 3.0
    seed: int = 0
    out_dir: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sweep:
    """A scaling study: every method x budget x seed, resumable, with a plot."""

    preset: tyro.conf.Positional[str]
    methods: tuple[str, ...] = ()
    budgets: tuple[int, ...] = (100, 200, 400, 800)
    seeds: tuple[int, ...] = (0, 1, 2)
    problems: tuple[int, int] = (0, 10)
    scorer: str = "prm"
    num_steps: int = 20
    lam: float = 10.0
    target_class: int = 3
    out_dir: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Train:
    """Retrain an embedded model with its script (resumes from its orbax checkpoints).

    The scripts live in ``experiments/`` of a source checkout and write into
    ``tts_jax/assets/``; extra script flags go after ``--args``.
    """

    model: tyro.conf.Positional[str]
    args: tuple[str, ...] = ()


TRAIN_SCRIPTS = {
    "digits-dit": "train_digits_flow.py",
    "digits-classifiers": "train_digits_classifiers.py",
    "arith-tokenizer": "train_arith_tokenizer.py",
    "arith-lm": "train_arith_lm.py",
    "arith-prm": "train_arith_prm.py",
}


def training_script(model: str) -> pathlib.Path:
    """The script that trains ``model`` (a name in :data:`TRAIN_SCRIPTS`)."""
    if model not in TRAIN_SCRIPTS:
        raise ValueError(f"unknown model {model!r} to train; known: {sorted(TRAIN_SCRIPTS)}")
    script = pathlib.Path(__file__).resolve().parents[1] / "experiments" / TRAIN_SCRIPTS[model]
    if not script.is_file():
        raise FileNotFoundError(
            f"{script} not found: training scripts ship with a source checkout of tts-jax"
        )
    return script


def _train(cmd: Train) -> None:
    script = training_script(cmd.model)
    log.info("running %s %s", script, " ".join(cmd.args))
    subprocess.run([sys.executable, str(script), *cmd.args], check=True)


def parse_preset(preset: str) -> tuple[str, str]:
    """Split ``<model>-<method>`` or ``file.py:<method>`` into ``(model, method)``."""
    if preset.startswith("arith-"):
        method = preset.removeprefix("arith-")
        if method not in experiment_lm.LM_METHODS:
            raise ValueError(f"unknown method in preset {preset!r}; {known_presets()}")
        return "arith", method
    if ".py:" in preset:
        model, method = preset.rsplit(":", 1)
    elif "-" in preset:
        model, method = preset.split("-", 1)
    else:
        raise ValueError(f"preset {preset!r} must look like <model>-<method>; {known_presets()}")
    if not model.endswith(".py") and model not in experiment.MODELS:
        raise ValueError(f"unknown model in preset {preset!r}; {known_presets()}")
    if method not in experiment.METHODS:
        raise ValueError(f"unknown method in preset {preset!r}; {known_presets()}")
    return model, method


def known_presets() -> str:
    names = [f"{m}-{k}" for m in experiment.MODELS for k in experiment.METHODS]
    names += [f"arith-{k}" for k in experiment_lm.LM_METHODS]
    return "known presets: " + ", ".join(names) + " (or file.py:<method>)"


def _run(cmd: Run) -> None:
    model, method = parse_preset(cmd.preset)
    if model == "arith":
        _run_arith(cmd, method)
        return
    out_dir = cmd.out_dir or f"outputs/{pathlib.Path(model).stem}-{method}-seed{cmd.seed}"
    config = experiment.RunConfig(
        model=model,
        method=method,
        budget=cmd.budget,
        num_steps=cmd.num_steps,
        lam=cmd.lam,
        target_class=cmd.target_class,
        diffusion_norm=cmd.diffusion_norm,
        seed=cmd.seed,
        out_dir=out_dir,
    )
    record = experiment.run_one(config)
    for key, value in record.items():
        print(f"{key:>24}: {value}")
    print(f"wrote {out_dir}/config.json, result.json, samples.npz, diagnostics.npz (+ samples.png)")


def _run_arith(cmd: Run, method: str) -> None:
    out_dir = pathlib.Path(cmd.out_dir or f"outputs/arith-{method}-seed{cmd.seed}")
    config = experiment_lm.LMRunConfig(
        method=method,
        num_particles=cmd.num_particles,
        problems=cmd.problems,
        seed=cmd.seed,
        scorer=cmd.scorer,
    )
    summary = experiment_lm.run_lm(config)
    records = summary.pop("records")
    runs.write_json(out_dir / "config.json", {"config": config, "environment": runs.environment()})
    runs.write_json(out_dir / "result.json", summary)
    (out_dir / "samples.jsonl").unlink(missing_ok=True)
    for record in records:
        runs.append_jsonl(out_dir / "samples.jsonl", record)
    for key, value in summary.items():
        print(f"{key:>24}: {value}")
    print(f"wrote {out_dir}/config.json, result.json, samples.jsonl")


def _sweep_arith(cmd: Sweep, methods: list[str]) -> None:
    out_dir = cmd.out_dir or "outputs/sweep-arith"
    problems = range(cmd.problems[0], cmd.problems[1])
    base = experiment_lm.LMRunConfig(method=methods[0], scorer=cmd.scorer)
    records = experiment_lm.sweep_lm(methods, cmd.budgets, cmd.seeds, problems, out_dir, base=base)
    paths = plots.scaling_plot(records, ["correct"], f"{out_dir}/scaling", xlabel="N")
    print(plots.markdown_table(records, "correct"))
    print(f"{len(records)} runs in {out_dir}/runs.jsonl; plots: {', '.join(paths)}")


def _sweep(cmd: Sweep) -> None:
    model, first_method = parse_preset(cmd.preset)
    methods = list(cmd.methods) or [first_method]
    if model == "arith":
        _sweep_arith(cmd, methods)
        return
    for m in methods:
        if m not in experiment.METHODS:
            raise ValueError(f"unknown method {m!r}; known: {sorted(experiment.METHODS)}")
    out_dir = cmd.out_dir or f"outputs/sweep-{pathlib.Path(model).stem}"
    base = experiment.RunConfig(
        model=model,
        method=methods[0],
        budget=max(cmd.budgets),
        num_steps=cmd.num_steps,
        lam=cmd.lam,
        target_class=cmd.target_class,
        out_dir=out_dir,
    )
    records = experiment.sweep(base, methods, list(cmd.budgets), list(cmd.seeds), out_dir)
    held = sorted({k for r in records for k in r if k.endswith("_best") and k != "best_reward"})
    paths = plots.scaling_plot(records, ["best_reward", *held], f"{out_dir}/scaling")
    print(plots.markdown_table(records, "best_reward"))
    print(f"{len(records)} runs in {out_dir}/runs.jsonl; plots: {', '.join(paths)}")


def _demo(cmd: Demo) -> None:
    unknown = set(cmd.parts) - {"gmm", "digits", "arith"}
    if unknown:
        raise ValueError(f"unknown demo parts {sorted(unknown)}; known: gmm, digits, arith")
    if "gmm" in cmd.parts:
        _demo_gmm(cmd.gmm)
    if "digits" in cmd.parts:
        _demo_digits(cmd.digits)
    if "arith" in cmd.parts:
        _demo_arith(cmd.arith_particles, cmd.arith_problems)


def _demo_arith(num_particles: int, problems: tuple[int, int]) -> None:
    bundle = experiment_lm.load_lm_bundle()
    print(
        f"\nArithmetic LM, {problems[1] - problems[0]} held-out problems, N = {num_particles} "
        "(accuracy by the exact checker)"
    )
    print(f"{'method':<10}{'scorer':<8}{'accuracy':>10}{'tokens':>9}{'PRM calls':>11}")
    for method, scorer in [
        ("greedy", "prm"),
        ("bon", "prm"),
        ("pf", "prm"),
        ("bon", "oracle"),
        ("pf", "oracle"),
    ]:
        config = experiment_lm.LMRunConfig(
            method=method, num_particles=num_particles, problems=problems, scorer=scorer
        )
        s = experiment_lm.run_lm(config, bundle)
        shown = "-" if method == "greedy" else scorer
        print(
            f"{method:<10}{shown:<8}{s['correct']:>10.2f}{s['tokens']:>9.0f}{s['prm_calls']:>11.1f}"
        )


def _demo_digits(config: DigitsDemoConfig) -> None:
    result = digits_demo.run_digits_demo(config)
    print(
        f"\nDigits flow model steered toward class {config.target_class} "
        f"(reward: verifier log p; check: held-out classifier), {len(config.seeds)} seeds"
    )
    print(digits_demo.format_table(result))
    print(f"wrote {config.out_dir}/result.json, config.json, digits_steering.png")


def _demo_gmm(config: GMMDemoConfig) -> None:
    result = run_gmm_demo(config)
    print("FK steering of a Gaussian mixture toward r(x) = a.x (target p(x) exp(lam r) / Z)")
    print(format_table(result))
    print(
        f"NFE {result['nfe']}, reward calls {result['reward_calls']}, "
        f"resampling events {result['resampling_events']}, wall {result['wall_time_s']:.1f} s"
    )
    print(f"wrote {config.out_dir}/result.json, config.json, samples.npz, gmm_steering.png")


COMMANDS = {
    "demo": (Demo, _demo),
    "run": (Run, _run),
    "sweep": (Sweep, _sweep),
    "train": (Train, _train),
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tts-jax`` script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    cmd = tyro.extras.subcommand_cli_from_dict(
        {name: cls for name, (cls, _) in COMMANDS.items()}, args=argv, prog="tts-jax"
    )
    handler = next(h for cls, h in COMMANDS.values() if isinstance(cmd, cls))
    try:
        handler(cmd)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"tts-jax: error: {err}") from None


if __name__ == "__main__":
    main()
