"""The ``tts-jax`` command line.

* ``tts-jax demo``: the main job on the embedded defaults.
* ``tts-jax presets``: every preset (model, method, defaults) and every option.
* ``tts-jax run PRESET``: one steering run; ``PRESET`` is ``<model>-<method>`` (``gmm-fk``,
  ``digits-rbf``, ``arith-pf``, ...) or ``path/to/config.py:<method>`` for a user file defining
  ``make_bundle``. ``t2i-<method>`` steers a text-to-image pipeline (:mod:`tts_jax.app.t2i`):
  ``tts-jax run t2i-fk --pipeline DIR_OR_HUB_ID --prompt "..." --reward pickscore=DIR``.
* ``tts-jax sweep PRESET --methods ... --budgets ... --seeds ...``: a resumable scaling study with
  a plot, in a folder that holds one configuration; started on several processes
  (``--num-processes N --process-id I --coordinator HOST:PORT``, or ``$JAX_COORDINATOR_ADDRESS``,
  ``$JAX_NUM_PROCESSES``, ``$JAX_PROCESS_ID``) it splits the grid and writes one ``runs.jsonl``.
* ``tts-jax plan --config NAME``: compile FK steering of a real text-to-image model, or a
  particle-filter step of an LM policy + PRM pair (``qwen2.5-math-1.5b+prm-7b``), on abstract
  shapes (no weights) and print its memory per particle count (:mod:`tts_jax.app.plan`,
  :mod:`tts_jax.app.plan_lm`).
* ``tts-jax train MODEL``: retrain an embedded model (:mod:`tts_jax.app.training`), into an
  output folder (``--install`` copies it over the shipped asset).

Options left unset take the preset's defaults (the settings its published results were made
with); an option the preset does not read is an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import subprocess
import sys
from typing import Annotated, Any

import tyro

from tts_jax import distributed
from tts_jax.app import (
    experiment,
    experiment_lm,
    experiment_math,
    plan,
    plots,
    reward_specs,
    runs,
    t2i,
)
from tts_jax.app.demos import arith as arith_demo
from tts_jax.app.demos import digits as digits_demo
from tts_jax.app.demos.arith import ArithDemoConfig
from tts_jax.app.demos.digits import DigitsDemoConfig
from tts_jax.app.demos.gmm import GMMDemoConfig, format_table, run_gmm_demo
from tts_jax.app.training import MODULES
from tts_jax.models import partitioning
from tts_jax.sharding import mesh_from_string

log = logging.getLogger("tts_jax")

PER_PRESET = "(default: per preset, see `tts-jax presets`)"


def _option(help: str, hint: str = PER_PRESET, metavar: str | None = None) -> Any:
    return tyro.conf.arg(help=help, help_behavior_hint=hint, metavar=metavar)


# Meaning of every run/sweep option, shared by the parser's help and `tts-jax presets`.
OPTION_HELP = {
    "budget": "image presets: model forward passes (NFE) the method may spend",
    "num_steps": "image presets: denoising steps of one trajectory",
    "lam": "image fk/smc: inverse temperature of the reward tilt p(x) exp(lam r(x))",
    "diffusion_norm": "image SDE methods (fk, smc, svdd, code, rbf): g(t) = norm t^2",
    "target_class": "digits and user files: the class the reward steers toward",
    "nan_policy": "image presets: raise (a NaN reward is an error) | drop (zero weight)",
    "num_particles": "arith and lm presets: N, the number of samples / particles / beams",
    "problems": "arith and lm presets: problem range START STOP (lm default: every problem)",
    "scorer": "arith presets that use a verifier: prm (the embedded PRM) | oracle (exact checker)",
    "pipeline": "t2i: a diffusers SD3 / FLUX pipeline folder or hub id",
    "prompt": "t2i: the text prompt (text-reading rewards get it too)",
    "negative_prompt": "t2i SD3: the negative prompt (default: empty)",
    "reward": "t2i: a steering reward KIND=ARGS (kinds: " + ", ".join(reward_specs.KINDS) + ")",
    "held_out": "t2i: a held-out reward KIND=ARGS, reported, never optimized",
    "ensemble": "t2i with several --reward: mean (weighted mean) | rank (search methods only)",
    "height": "t2i: image height in pixels",
    "width": "t2i: image width in pixels",
    "guidance": "t2i: guidance scale (SD3 CFG weight, FLUX.1-dev embedded guidance)",
    "dtype": "t2i: float32 | bfloat16, the networks' dtype",
    "max_sequence_length": "t2i: T5 prompt length",
    "policy": "lm: the policy LM folder (transformers layout with a chat template)",
    "prm": "lm with a verifier: the process reward model folder (Qwen2.5-Math-PRM layout)",
    "data": "lm: problems (.jsonl, .parquet or a datasets save_to_disk folder)",
    "problem_field": "lm: field of the problem statement (default: problem)",
    "answer_field": "lm: field of the reference answer (default: answer)",
    "selection": "lm: final answer rule argmax | majority | weighted | weight_vote",
    "temperature": "lm: sampling temperature (default: generation_config.json, else 0.8)",
    "softmax_temperature": "lm pf / epf / gibbs: temperature of the particle weights",
    "aggregation": "lm with a PRM: step-score aggregation last | min | prod | model",
    "max_steps": "lm: reasoning steps per solution",
    "max_step_tokens": "lm: tokens per step",
    "max_new_tokens": "lm: completion budget (default: generation_config.json, else 2048)",
    "separator": "lm: the text that ends a step (default: a blank line)",
    "system_prompt": "lm: the chat system prompt (default: Qwen2.5-Math's)",
    "seed": "PRNG seed",
    "out_dir": "output folder",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Demo:
    """The main demo on the embedded defaults.

    ``gmm``: FK steering of an exact mixture against its closed-form tilt; ``digits``: FK steering
    and RBF of the digits flow model toward a class versus best-of-N at equal NFE; ``arith``:
    particle filtering versus best-of-N on the arithmetic LM, with the learned PRM and the oracle.
    """

    parts: tuple[str, ...] = ("gmm", "digits", "arith")
    """which parts to run: gmm, digits, arith"""
    gmm: GMMDemoConfig = GMMDemoConfig()
    digits: DigitsDemoConfig = DigitsDemoConfig()
    arith: ArithDemoConfig = ArithDemoConfig()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Presets:
    """List every preset (model, method, defaults) and every run/sweep option."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Settings:
    """Options of both ``run`` and ``sweep`` (unset: the preset's default)."""

    preset: Annotated[
        str, tyro.conf.Positional, tyro.conf.arg(metavar="PRESET", help="<model>-<method>")
    ]
    num_steps: Annotated[int | None, _option(OPTION_HELP["num_steps"], metavar="INT")] = None
    lam: Annotated[float | None, _option(OPTION_HELP["lam"], metavar="FLOAT")] = None
    diffusion_norm: Annotated[
        float | None, _option(OPTION_HELP["diffusion_norm"], metavar="FLOAT")
    ] = None
    target_class: Annotated[int | None, _option(OPTION_HELP["target_class"], metavar="INT")] = None
    nan_policy: Annotated[
        str | None, _option(OPTION_HELP["nan_policy"], "(default: raise)", "{raise,drop}")
    ] = None
    problems: Annotated[
        tuple[int, int] | None, _option(OPTION_HELP["problems"], "(default: 0 10)", "START STOP")
    ] = None
    scorer: Annotated[
        str | None, _option(OPTION_HELP["scorer"], "(default: prm)", "{prm,oracle}")
    ] = None
    pipeline: Annotated[
        str | None, _option(OPTION_HELP["pipeline"], "(t2i: required)", "DIR|HUB_ID")
    ] = None
    prompt: Annotated[str | None, _option(OPTION_HELP["prompt"], "(t2i: required)", "TEXT")] = None
    negative_prompt: Annotated[str | None, _option(OPTION_HELP["negative_prompt"], "", "TEXT")] = (
        None
    )
    reward: Annotated[
        tuple[str, ...],
        tyro.conf.UseAppendAction,
        _option(OPTION_HELP["reward"], "(repeatable: several make an --ensemble)", "SPEC"),
    ] = ()
    held_out: Annotated[
        tuple[str, ...],
        tyro.conf.UseAppendAction,
        _option(OPTION_HELP["held_out"], "(repeatable)", "SPEC"),
    ] = ()
    ensemble: Annotated[
        str | None, _option(OPTION_HELP["ensemble"], "(default: mean)", "{mean,rank}")
    ] = None
    height: Annotated[
        int | None, _option(OPTION_HELP["height"], "(default: per pipeline)", "INT")
    ] = None
    width: Annotated[
        int | None, _option(OPTION_HELP["width"], "(default: per pipeline)", "INT")
    ] = None
    guidance: Annotated[
        float | None, _option(OPTION_HELP["guidance"], "(default: per pipeline)", "FLOAT")
    ] = None
    dtype: Annotated[
        str | None, _option(OPTION_HELP["dtype"], "(default: bfloat16)", "{float32,bfloat16}")
    ] = None
    max_sequence_length: Annotated[
        int | None, _option(OPTION_HELP["max_sequence_length"], "(default: per pipeline)", "INT")
    ] = None
    policy: Annotated[str | None, _option(OPTION_HELP["policy"], "(lm: required)", "DIR")] = None
    prm: Annotated[str | None, _option(OPTION_HELP["prm"], "", "DIR")] = None
    data: Annotated[str | None, _option(OPTION_HELP["data"], "(lm: required)", "FILE|DIR")] = None
    problem_field: Annotated[str | None, _option(OPTION_HELP["problem_field"], "", "NAME")] = None
    answer_field: Annotated[str | None, _option(OPTION_HELP["answer_field"], "", "NAME")] = None
    selection: Annotated[
        str | None,
        _option(OPTION_HELP["selection"], "(default: per method)", "{argmax,majority,...}"),
    ] = None
    temperature: Annotated[float | None, _option(OPTION_HELP["temperature"], "", "FLOAT")] = None
    softmax_temperature: Annotated[
        float | None, _option(OPTION_HELP["softmax_temperature"], "(default: 1)", "FLOAT")
    ] = None
    aggregation: Annotated[
        str | None, _option(OPTION_HELP["aggregation"], "(default: last)", "{last,min,prod,model}")
    ] = None
    max_steps: Annotated[int | None, _option(OPTION_HELP["max_steps"], "", "INT")] = None
    max_step_tokens: Annotated[int | None, _option(OPTION_HELP["max_step_tokens"], "", "INT")] = (
        None
    )
    max_new_tokens: Annotated[int | None, _option(OPTION_HELP["max_new_tokens"], "", "INT")] = None
    separator: Annotated[str | None, _option(OPTION_HELP["separator"], "", "TEXT")] = None
    system_prompt: Annotated[str | None, _option(OPTION_HELP["system_prompt"], "", "TEXT")] = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run(_Settings):
    """One steering run of PRESET (``<model>-<method>`` or ``file.py:<method>``).

    Image presets spend ``--budget`` NFE; ``t2i-<method>`` presets steer a text-to-image
    pipeline (``--pipeline DIR_OR_HUB_ID --prompt TEXT --reward KIND=ARGS``, e.g.
    ``--reward pickscore=DIR``); ``arith-<method>`` presets use ``--num-particles`` N on
    ``--problems START STOP`` held-out arithmetic problems. `tts-jax presets` lists the presets
    and the options each reads.
    """

    budget: Annotated[int | None, _option(OPTION_HELP["budget"], metavar="INT")] = None
    num_particles: Annotated[
        int | None, _option(OPTION_HELP["num_particles"], "(default: 8)", "INT")
    ] = None
    seed: Annotated[int | None, _option(OPTION_HELP["seed"], "(default: 0)", "INT")] = None
    out_dir: Annotated[
        str | None,
        _option(OPTION_HELP["out_dir"], "(default: outputs/<preset>-seed<seed>)", "DIR"),
    ] = None
    mesh: Annotated[
        str | None,
        _option(
            "image presets: device mesh particles=P,model=M (-1: the rest); the networks' "
            "weights split over model (docs/design.md, Scale-out)",
            "(default: one device)",
            "AXES",
        ),
    ] = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sweep(_Settings):
    """A scaling study: every method x budget x seed, resumable, with a plot.

    The output folder holds one configuration: resuming with the same settings skips finished
    runs; other settings are refused (the default folder name carries a hash of the settings).
    """

    methods: Annotated[
        tuple[str, ...], _option("methods to compare", "(default: the preset's method)")
    ] = ()
    budgets: Annotated[
        tuple[int, ...] | None,
        _option(
            "NFE budgets (image) or N (arith)",
            "(default: 100 200 400 800 | 1 2 4 8)",
            "INT [INT ...]",
        ),
    ] = None
    seeds: Annotated[tuple[int, ...], _option("PRNG seeds", "(default: 0 1 2)")] = (0, 1, 2)
    out_dir: Annotated[
        str | None,
        _option(OPTION_HELP["out_dir"], "(default: outputs/sweep-<model>-<settings hash>)", "DIR"),
    ] = None
    coordinator: Annotated[
        str | None,
        _option("multi-process: process 0's HOST:PORT", "(default: $JAX_COORDINATOR_ADDRESS)"),
    ] = None
    num_processes: Annotated[
        int | None, _option("multi-process: the number of processes", "(default: 1)", "INT")
    ] = None
    process_id: Annotated[
        int | None, _option("multi-process: this process's id, 0 .. N-1", "", "INT")
    ] = None


GROUP_OPTIONS = ("coordinator", "num_processes", "process_id")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Train:
    """Retrain an embedded model with its script (resumes from its orbax checkpoints).

    Training writes into ``--out-dir``; only ``--install`` copies the result over the shipped
    asset in ``tts_jax/assets/``. Extra flags of the training module go after ``--args``
    (``python -m tts_jax.app.training.<module> --help`` lists them).
    """

    model: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="MODEL")]
    out_dir: Annotated[
        str | None, _option("output folder", "(default: outputs/train/<model>)", "DIR")
    ] = None
    install: bool = False
    """copy the trained model over the shipped asset in tts_jax/assets/"""
    args: tuple[str, ...] = ()
    """extra flags passed to the training script"""


# --------------------------------------------------------------------------- presets

ARITH = "arith"
T2I = t2i.T2I
LM = experiment_math.PRESET_MODEL


def parse_preset(preset: str) -> tuple[str, str]:
    """Split ``<model>-<method>`` or ``file.py:<method>`` into ``(model, method)``."""
    if ".py:" in preset:
        model, method = preset.rsplit(":", 1)
    elif "-" in preset:
        model, method = preset.split("-", 1)
    else:
        raise ValueError(f"preset {preset!r} must look like <model>-<method>; {known_presets()}")
    if model == ARITH:
        if method not in experiment_lm.LM_METHODS:
            raise ValueError(f"unknown method in preset {preset!r}; {known_presets()}")
        return model, method
    if model == LM:
        if method not in experiment_math.MATH_METHODS:
            raise ValueError(f"unknown method in preset {preset!r}; {known_presets()}")
        return model, method
    if not model.endswith(".py") and model not in experiment.MODELS and model != T2I:
        raise ValueError(f"unknown model in preset {preset!r}; {known_presets()}")
    if method not in experiment.METHODS:
        raise ValueError(f"unknown method in preset {preset!r}; {known_presets()}")
    return model, method


def known_presets() -> str:
    names = [f"{m}-{k}" for m in experiment.MODELS for k in experiment.METHODS]
    names += [f"{ARITH}-{k}" for k in experiment_lm.LM_METHODS]
    names += [f"{T2I}-{k}" for k in experiment.METHODS]
    names += [f"{LM}-{k}" for k in experiment_math.MATH_METHODS]
    return "known presets: " + ", ".join(names) + " (or file.py:<method>)"


def arith_options(method: str) -> frozenset[str]:
    """Options an ``arith-<method>`` preset reads."""
    entry = experiment_lm.LM_METHODS[method]
    options = {"problems", "seed", "out_dir"}
    if not entry.budget_independent:
        options.add("num_particles")
    if entry.uses_scorer:
        options.add("scorer")
    return frozenset(options)


def preset_options(model: str, method: str) -> frozenset[str]:
    """Options the preset ``model-method`` reads."""
    if model == ARITH:
        return arith_options(method)
    if model == LM:
        return experiment_math.math_options(method)
    if model == T2I:
        return experiment.METHODS[method].options | t2i.OPTIONS | experiment.COMMON_OPTIONS
    return (
        experiment.METHODS[method].options
        | experiment.model_options(model)
        | experiment.COMMON_OPTIONS
    )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def given_options(cmd: Run | Sweep, swept: tuple[str, ...] = ()) -> dict[str, Any]:
    """The options set on the command line (unset ones are ``None``)."""
    skip = {"preset", *swept}
    return {
        f.name: getattr(cmd, f.name)
        for f in dataclasses.fields(cmd)
        if f.name not in skip and getattr(cmd, f.name) not in (None, ())
    }


def check_applicable(given: dict[str, Any], reads: frozenset[str], what: str) -> None:
    """Refuse options that ``what`` does not read, naming them and the ones it does."""
    extra = sorted(set(given) - reads)
    if extra:
        raise ValueError(
            f"{', '.join(_flag(k) for k in extra)} "
            f"{'does' if len(extra) == 1 else 'do'} not apply to {what}; it reads "
            + ", ".join(_flag(k) for k in sorted(reads))
        )


def image_config(model: str, method: str, given: dict[str, Any]) -> experiment.RunConfig:
    """The resolved config of an image run: RunConfig < the model's preset defaults < flags
    (``t2i``: the pipeline's defaults, :func:`tts_jax.app.t2i.resolve_config`)."""
    if model == T2I:
        return t2i.resolve_config(method, given)
    fields = {**experiment.model_defaults(model), **given, "model": model, "method": method}
    return experiment.RunConfig(**fields)


def arith_config(method: str, given: dict[str, Any]) -> experiment_lm.LMRunConfig:
    """The resolved config of an arith run (the CLI runs problems 0-10 unless told otherwise)."""
    fields = {"problems": (0, 10), **given, "method": method}
    fields.pop("out_dir", None)
    return experiment_lm.LMRunConfig(**fields)


def _presets(_cmd: Presets) -> None:
    print(presets_text())


def presets_text() -> str:
    """Every preset with its model, method, defaults and options, then every option's meaning."""
    lines = ["Presets (tts-jax run PRESET, tts-jax sweep PRESET):", ""]
    for model, entry in experiment.MODELS.items():
        lines.append(f"{model}: {entry.description}")
        for name, method in experiment.METHODS.items():
            reads = preset_options(model, name) - {"seed", "out_dir", "nan_policy"}
            defaults = experiment.model_defaults(model)
            shown = ", ".join(f"{_flag(k)} {defaults[k]}" for k in sorted(reads) if k in defaults)
            lines.append(f"  {model}-{name:<8} {method.description}; {shown}")
        lines.append("")
    lines.append("arith: embedded arithmetic policy LM with its PRM (or the exact oracle)")
    for name, entry in experiment_lm.LM_METHODS.items():
        doc = (entry.run.__doc__ or name).strip().splitlines()[0].rstrip(".")
        reads = ", ".join(_flag(k) for k in sorted(arith_options(name) - {"seed", "out_dir"}))
        lines.append(f"  {ARITH}-{name:<9} {doc}; reads {reads}")
    lines += ["", f"{LM}: a policy folder (--policy) steered on math problems (--data), PRM --prm"]
    for name, entry in experiment_math.MATH_METHODS.items():
        doc = (entry.run.__doc__ or name).strip().splitlines()[0].rstrip(".")
        options = experiment_math.math_options(name) - {"seed", "out_dir"}
        lines.append(
            f"  {LM}-{name:<9} {doc}; reads {', '.join(_flag(k) for k in sorted(options))}"
        )
    lines += ["", f"{T2I}: a text-to-image pipeline (SD3 / FLUX) steered toward --reward specs"]
    t2i_shown = (
        "--num-steps 28 (schnell 4), --guidance 7.0 SD3 / 3.5 FLUX.1-dev, "
        "--budget 4 x steps (paths, rbf 8)"
    )
    for name, method in experiment.METHODS.items():
        lines.append(f"  {T2I}-{name:<8} {method.description}")
    lines += [
        f"  defaults per pipeline: {t2i_shown}; needs --pipeline, --prompt, --reward",
        "  reward specs: " + reward_specs.kinds_text(),
        "    keys: weight=W (any kind), processor=DIR (clip, pickscore), tokenizer=DIR and "
        "config=JSON (hps), key_env=VAR (http; the key itself only ever in the environment)",
    ]
    lines += [
        "",
        "file.py:<method>: your own model and reward (make_bundle(config) -> Bundle), any image "
        "method",
        "",
        "Options (unset: the preset's default):",
    ]
    lines += [f"  {_flag(k):<18} {v}" for k, v in OPTION_HELP.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- run / sweep


def _run(cmd: Run) -> None:
    model, method = parse_preset(cmd.preset)
    given = given_options(cmd)
    mesh = given.pop("mesh", None)
    mesh = None if mesh is None else mesh_from_string(mesh)
    if mesh is not None and model in (LM, ARITH):
        raise ValueError(f"--mesh: image presets only for now, not {cmd.preset}")
    check_applicable(given, preset_options(model, method), cmd.preset)
    if model == LM:
        _run_math(cmd.preset, method, given)
        return
    seed = given.get("seed", 0)
    out_dir = cmd.out_dir or f"outputs/{pathlib.Path(model).stem}-{method}-seed{seed}"
    given.pop("out_dir", None)
    if model == ARITH:
        config = arith_config(method, given)
        summary = experiment_lm.run_lm(config)
        _warn_lm_collapse(cmd.preset, summary)
        files = experiment_lm.write_lm_run(out_dir, config, summary)
        summary.pop("records")
    else:
        config = dataclasses.replace(image_config(model, method, given), out_dir=out_dir)
        bundle = None if mesh is None else experiment.load_bundle(config)
        if mesh is not None:  # results do not depend on the layout: not part of the run identity
            bundle = dataclasses.replace(bundle, model=partitioning.shard_flow(bundle.model, mesh))
        summary = experiment.run_one(config, bundle)
        files = summary["files"]
    for key, value in summary.items():
        if key not in ("files", "config"):
            print(f"{key:>24}: {value}")
    print(f"wrote {out_dir}/: {', '.join(files)}")


def _run_math(preset: str, method: str, given: dict[str, Any]) -> None:
    """``lm-<method>``: a policy folder steered on a file of math problems
    (:mod:`tts_jax.app.experiment_math`), one record per problem as it finishes."""
    config = experiment_math.math_config(method, given)
    summary = experiment_math.run_math(config, progress=True)
    _warn_lm_collapse(preset, summary)
    summary.pop("records")
    for key, value in summary.items():
        if key != "config":
            print(f"{key:>24}: {value}")
    print(f"wrote {config.out_dir}/: config.json, runs.jsonl, result.json")


def _warn_lm_collapse(what: str, summary: dict[str, Any]) -> None:
    collapsed = summary.get("collapsed_problems", 0)
    if collapsed:
        log.warning(
            "%s: the particle weights collapsed (ESS < 5%% of N or < 2 distinct ancestors) on "
            "%d of %d problems; see step_ess in samples.jsonl",
            what,
            collapsed,
            len(summary["records"]),
        )


def _sweep(cmd: Sweep) -> None:
    # First thing: the group must start before any JAX computation (tts_jax.distributed).
    group = distributed.initialize(cmd.coordinator, cmd.num_processes, cmd.process_id)
    model, first_method = parse_preset(cmd.preset)
    methods = list(cmd.methods) or [first_method]
    given = given_options(cmd, swept=("methods", "budgets", "seeds", *GROUP_OPTIONS))
    out_dir = given.pop("out_dir", None)
    reads = frozenset().union(*(preset_options(model, m) for m in _checked(model, methods)))
    check_applicable(given, reads, f"a sweep of {', '.join(methods)} on {model}")
    if model == LM:
        raise ValueError("lm presets run one configuration per folder: use tts-jax run lm-<method>")
    if model == ARITH:
        _sweep_arith(cmd, methods, given, out_dir)
        return
    budgets = list(cmd.budgets or (100, 200, 400, 800))
    base = image_config(model, methods[0], given)
    shared = experiment.sweep_identity(base)
    out_dir = out_dir or f"outputs/sweep-{pathlib.Path(model).stem}-{runs.config_id(shared)[:8]}"
    records = experiment.sweep(base, methods, budgets, list(cmd.seeds), out_dir)
    if _not_reporting(group, out_dir):
        return
    held = sorted({k for r in records for k in r if k.endswith("_best") and k != "best_reward"})
    paths = plots.scaling_plot(records, ["best_reward", *held], f"{out_dir}/scaling")
    print(plots.markdown_table(records, "best_reward"))
    print(f"{len(records)} runs of this configuration in {out_dir}/runs.jsonl")
    print(f"wrote {', '.join(paths)}")


def _not_reporting(group: distributed.ProcessGroup, out_dir: str) -> bool:
    """Only process 0 of a multi-process sweep prints the table and draws the plot."""
    if group.process_id:
        print(f"process {group.process_id} of {group.num_processes}: done ({out_dir})")
    return group.process_id != 0


def _checked(model: str, methods: list[str]) -> list[str]:
    known = experiment_lm.LM_METHODS if model == ARITH else experiment.METHODS
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown methods {unknown} for {model}; known: {sorted(known)}")
    return methods


def _sweep_arith(cmd: Sweep, methods: list[str], given: dict, out_dir: str | None) -> None:
    problems = given.pop("problems", (0, 10))
    base = experiment_lm.LMRunConfig(method=methods[0], problems=problems, **given)
    shared = experiment_lm.sweep_identity(base)
    out_dir = out_dir or f"outputs/sweep-{ARITH}-{runs.config_id(shared)[:8]}"
    budgets = cmd.budgets or (1, 2, 4, 8)
    records = experiment_lm.sweep_lm(
        methods, budgets, cmd.seeds, range(*problems), out_dir, base=base
    )
    if _not_reporting(distributed.process_group(), out_dir):
        return
    paths = plots.scaling_plot(records, ["correct"], f"{out_dir}/scaling", xlabel="N")
    print(plots.markdown_table(records, "correct"))
    print(f"{len(records)} runs of this configuration in {out_dir}/runs.jsonl")
    print(f"wrote {', '.join(paths)}")


# --------------------------------------------------------------------------- train


def training_module(model: str) -> str:
    """The module that trains ``model`` (a name in :data:`tts_jax.app.training.MODULES`)."""
    if model not in MODULES:
        raise ValueError(f"unknown model {model!r} to train; known: {sorted(MODULES)}")
    return MODULES[model]


def training_command(cmd: Train) -> list[str]:
    """The training module's command line: into ``--out-dir``, over the asset only if
    ``--install``."""
    out_dir = cmd.out_dir or f"outputs/train/{cmd.model}"
    argv = [sys.executable, "-m", training_module(cmd.model), "--out", out_dir, *cmd.args]
    return [*argv, "--install"] if cmd.install else argv


def _train(cmd: Train) -> None:
    argv = training_command(cmd)
    log.info("running %s", " ".join(argv[1:]))
    subprocess.run(argv, check=True)


# --------------------------------------------------------------------------- demo


def _demo(cmd: Demo) -> None:
    unknown = set(cmd.parts) - {"gmm", "digits", "arith"}
    if unknown:
        raise ValueError(f"unknown demo parts {sorted(unknown)}; known: gmm, digits, arith")
    if "gmm" in cmd.parts:
        _demo_gmm(cmd.gmm)
    if "digits" in cmd.parts:
        _demo_digits(cmd.digits)
    if "arith" in cmd.parts:
        _demo_arith(cmd.arith)


def _demo_arith(config: ArithDemoConfig) -> None:
    result = arith_demo.run_arith_demo(config)
    start, stop = config.problems
    print(
        f"\nArithmetic LM, {stop - start} held-out problems, N = {config.num_particles} "
        "(accuracy by the exact checker)"
    )
    print(arith_demo.format_table(result))
    print(f"wrote {config.out_dir}/: {', '.join(result['files'])}")


def _demo_digits(config: DigitsDemoConfig) -> None:
    result = digits_demo.run_digits_demo(config)
    print(
        f"\nDigits flow model steered toward class {config.target_class} "
        f"(reward: verifier log p; check: held-out classifier), {len(config.seeds)} seeds"
    )
    print(digits_demo.format_table(result))
    print(f"wrote {config.out_dir}/: {', '.join(result['files'])}")


def _demo_gmm(config: GMMDemoConfig) -> None:
    result = run_gmm_demo(config)
    print("FK steering of a Gaussian mixture toward r(x) = a.x (target p(x) exp(lam r) / Z)")
    print(format_table(result))
    print(
        f"NFE {result['nfe']}, reward calls {result['reward_calls']}, "
        f"resampling events {result['resampling_events']}, wall {result['wall_time_s']:.1f} s"
    )
    print(f"wrote {config.out_dir}/: {', '.join(result['files'])}")


COMMANDS = {
    "demo": (Demo, _demo),
    "plan": (plan.Plan, plan.run_plan),
    "presets": (Presets, _presets),
    "run": (Run, _run),
    "sweep": (Sweep, _sweep),
    "train": (Train, _train),
}

DESCRIPTION = (
    "Inference-time steering of flow models and language models. Presets are <model>-<method>: "
    f"models {', '.join([*experiment.MODELS, T2I, ARITH, LM])}; image methods "
    f"{', '.join(experiment.METHODS)}; arith methods {', '.join(experiment_lm.LM_METHODS)}; "
    f"lm methods {', '.join(experiment_math.MATH_METHODS)}. "
    "`tts-jax presets` lists them with their defaults and options; `tts-jax run --help` explains "
    "every option."
)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tts-jax`` script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    cmd = tyro.extras.subcommand_cli_from_dict(
        {name: cls for name, (cls, _) in COMMANDS.items()},
        args=argv,
        prog="tts-jax",
        description=DESCRIPTION,
    )
    handler = next(h for cls, h in COMMANDS.values() if isinstance(cmd, cls))
    try:
        handler(cmd)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"tts-jax: error: {err}") from None


if __name__ == "__main__":
    main()
