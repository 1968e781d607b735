"""Steering runs and resumable scaling sweeps for image/flow models (the CLI layer).

A run is (model bundle, method, budget, seed). String registries live here, in the CLI layer only:
:data:`MODELS` builds a :class:`Bundle` (flow model, steering reward, held-out rewards) by name and
:data:`METHODS` maps a method name to an adapter that spends an NFE budget with a library sampler.
A user-defined Python file that defines ``make_bundle(config) -> Bundle`` works wherever a model
name does.

Every run writes ``config.json`` (resolved config, seed, versions), ``result.json`` and
``samples.npz``; a sweep appends one line per finished run to ``runs.jsonl`` and skips finished
runs when restarted.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax import diagnostics, smc
from tts_jax import interpolants as I
from tts_jax.app import plots, runs, sweeps
from tts_jax.models.base import FlowModel, linear_to_vp
from tts_jax.rewards.base import Reward
from tts_jax.samplers.image import dlbs, fk_correctors, flow_particles, noise_search
from tts_jax.samplers.image.fk_steering import fk_steering
from tts_jax.samplers.result import Result

log = logging.getLogger("tts_jax")


NAN_POLICIES = ("raise", "drop")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One steering run.

    Attributes:
        model: a name in :data:`MODELS` or a path to a Python file defining ``make_bundle``.
        method: a name in :data:`METHODS`.
        budget: model forward passes (NFE) the method may spend, counted per sample.
        num_steps: denoising steps of one trajectory.
        lam: inverse temperature of the reward tilt (FK / SMC methods).
        target_class: steering target for class-conditional rewards (digits).
        diffusion_norm: ``g = norm t^2`` of the SDE for stochastic methods.
        seed: PRNG seed.
        nan_policy: ``raise`` (a NaN reward is an error) or ``drop`` (its particle gets zero
            weight / is never selected).
        out_dir: folder for this run's files (not part of the run's identity).

    The defaults are the settings of the digits results in ``experiments/RESULTS.md``
    (20 steps, ``lam = 1``, ``g = 3 t^2``).
    """

    model: str = "gmm"
    method: str = "fk"
    budget: int = 2000
    num_steps: int = 20
    lam: float = 1.0
    target_class: int = 3
    diffusion_norm: float = 3.0
    seed: int = 0
    nan_policy: str = "raise"
    out_dir: str = "outputs/run"

    def __post_init__(self):
        for name in ("lam", "diffusion_norm"):
            value = getattr(self, name)
            if not np.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.diffusion_norm < 0:
            raise ValueError(f"diffusion_norm must be >= 0, got {self.diffusion_norm}")
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        if self.budget < 1 or self.num_steps < 1:
            raise ValueError(
                f"budget ({self.budget}) and num_steps ({self.num_steps}) must be >= 1"
            )
        if self.budget < self.num_steps:
            raise ValueError(
                f"budget {self.budget} NFE is below one trajectory of {self.num_steps} steps; "
                f"the minimum budget is {self.num_steps}"
            )


def identity(config: RunConfig) -> dict[str, Any]:
    """The fields that define a run's result: every config field but the output folder."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k != "out_dir"}


@dataclasses.dataclass(frozen=True)
class Bundle:
    """What a run steers: a flow model, the steering reward, held-out rewards (never optimized).

    Attributes:
        model: the flow model.
        reward: the steering reward.
        held_out: rewards evaluated on the returned samples only (on the decoded images when
            ``decode`` is set).
        cond: the condition passed to the model and the rewards.
        grid: the model's own time grid ``[num_steps + 1]`` on its path (a text-to-image
            pipeline's sigmas), or ``None`` for :func:`tts_jax.interpolants.uniform_grid`; on
            the VP-converted SDE the methods use the VP times of the same noise levels.
        decode: ``samples -> images [N, 3, H, W]`` in ``[-1, 1]`` for the PNG grid (latent
            models), or ``None`` (the samples are the images).
        members: the members of an ensemble reward, each reported on its own (like
            ``held_out``, on the decoded images when ``decode`` is set).
        record: extra JSON-able fields of the run's record (what was loaded).
    """

    model: FlowModel
    reward: Reward
    held_out: dict[str, Reward]
    cond: Any = None
    grid: Any = None
    decode: Callable[[Any], Any] | None = None
    members: dict[str, Reward] = dataclasses.field(default_factory=dict)
    record: dict[str, Any] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------- models


def _gmm_bundle(config: RunConfig) -> Bundle:
    from tts_jax.models import gmm as G
    from tts_jax.rewards.analytic import distance_reward, linear_reward

    mixture = G.asymmetric_gmm_2d()
    rare_mode = mixture.means[2]
    return Bundle(
        G.flow_model(mixture),
        distance_reward(rare_mode),
        {"linear": linear_reward([1.0, -0.5])},
    )


def _digits_bundle(config: RunConfig) -> Bundle:
    from tts_jax.models.zoo import load_digits_flow
    from tts_jax.rewards.classifier import (
        class_log_prob_reward,
        load_digits_heldout,
        load_digits_verifier,
    )

    target = config.target_class
    heldout = load_digits_heldout()
    return Bundle(
        load_digits_flow(),
        class_log_prob_reward(load_digits_verifier(), target, name="verifier_log_prob"),
        {
            "heldout_log_prob": class_log_prob_reward(heldout, target, name="heldout"),
            "heldout_correct": Reward(
                {"classifier": heldout, "target": jnp.int32(target)}, _classified_as_target
            ),
        },
    )


def _classified_as_target(params, x, cond=None):
    """1.0 where the classifier's argmax is the target class (held-out accuracy per sample)."""
    logits, _ = params["classifier"](x)
    return (jnp.argmax(logits, axis=-1) == params["target"]).astype(jnp.float32)


class ImageModel(NamedTuple):
    """A registry entry: how to build the bundle, what it is, the options it reads.

    Attributes:
        build: ``config -> Bundle``.
        description: one line for ``tts-jax presets``.
        options: config fields the bundle reads (beyond the method's).
        defaults: the preset's default config fields (the settings its results were made with).
    """

    build: Callable[[RunConfig], Bundle]
    description: str
    options: frozenset[str] = frozenset()
    defaults: dict[str, Any] = {}


RESULT_DEFAULTS = {"num_steps": 20, "lam": 1.0, "diffusion_norm": 3.0}

MODELS: dict[str, ImageModel] = {
    "gmm": ImageModel(
        _gmm_bundle,
        "exact 2-D Gaussian mixture flow; reward -|x - rare mode|^2, held-out a.x",
        defaults={**RESULT_DEFAULTS, "budget": 2000},
    ),
    "digits": ImageModel(
        _digits_bundle,
        "embedded 8x8 digits DiT; reward verifier log p(class), held-out classifier",
        options=frozenset({"target_class"}),
        defaults={**RESULT_DEFAULTS, "budget": 400, "target_class": 3},
    ),
}
USER_FILE_OPTIONS = frozenset({"target_class"})  # a user's make_bundle may read it


def load_user_bundle(config: RunConfig) -> Bundle:
    """Import the user file ``config.model`` (its folder importable) and call its ``make_bundle``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: no ``make_bundle``, or it returns something other than a :class:`Bundle`.
    """
    path = pathlib.Path(config.model).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"user config file {config.model} does not exist")
    folder = str(path.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)  # sibling modules of the user's file import as usual
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not callable(getattr(module, "make_bundle", None)):
            raise ValueError(
                f"{path} must define make_bundle(config) -> tts_jax.app.experiment.Bundle"
            )
        bundle = module.make_bundle(config)
    finally:
        if added:
            sys.path.remove(folder)
    if not isinstance(bundle, Bundle):
        raise ValueError(
            f"{path}: make_bundle returned {type(bundle).__module__}.{type(bundle).__qualname__}, "
            "expected tts_jax.app.experiment.Bundle(model, reward, held_out)"
        )
    if not isinstance(bundle.model, FlowModel) or not isinstance(bundle.reward, Reward):
        raise ValueError(
            f"{path}: make_bundle's Bundle needs a FlowModel and a Reward, got "
            f"{type(bundle.model).__name__} and {type(bundle.reward).__name__}"
        )
    return bundle


T2I = "t2i"  # the text-to-image task (tts_jax.app.t2i), configured by its own flags


def load_bundle(config: RunConfig) -> Bundle:
    """Build the bundle named by ``config.model`` (a registry name, ``t2i`` or a user file)."""
    if config.model.endswith(".py"):
        return load_user_bundle(config)
    if config.model == T2I:
        from tts_jax.app import t2i

        return t2i.build_bundle(config)
    if config.model not in MODELS:
        raise ValueError(f"unknown model {config.model!r}; known: {sorted(MODELS)} or a .py file")
    return MODELS[config.model].build(config)


def model_options(model: str) -> frozenset[str]:
    """Config fields that ``model`` (a registry name or a user file) reads."""
    return USER_FILE_OPTIONS if model.endswith(".py") else MODELS[model].options


def model_defaults(model: str) -> dict[str, Any]:
    """A model's preset defaults (a user file gets the results' settings and RunConfig's)."""
    return MODELS[model].defaults if model in MODELS else dict(RESULT_DEFAULTS)


# --------------------------------------------------------------------------- methods


def _fk(key, bundle: Bundle, config: RunConfig) -> Result:
    """FK steering with the ``max`` potential, ~5 resampling points, on the VP-converted SDE."""
    n = max(config.budget // config.num_steps, 1)
    model = _vp(bundle.model)
    return fk_steering(
        key,
        model,
        bundle.reward,
        n,
        _grid(bundle, config, model),
        I.diffusion("square", config.diffusion_norm),
        config.lam,
        schedule=smc.every(config.num_steps, max(config.num_steps // 5, 1)),
        potential="max",
        cond=bundle.cond,
        nan_policy=config.nan_policy,
    )


def _vp(model: FlowModel) -> FlowModel:
    return linear_to_vp(model) if isinstance(model.interpolant, I.Linear) else model


def _grid(bundle: Bundle, config: RunConfig, model: FlowModel) -> Any:
    """The time grid of ``model`` (the bundle's model, or its VP conversion)."""
    if bundle.grid is None:
        return I.uniform_grid(config.num_steps)
    if len(bundle.grid) != config.num_steps + 1:
        raise ValueError(
            f"the bundle's grid has {len(bundle.grid) - 1} steps, the config {config.num_steps}"
        )
    if model.interpolant != bundle.model.interpolant:  # VP-converted: the same noise levels
        from tts_jax.app.t2i import vp_times

        return vp_times(bundle.grid)
    return bundle.grid


def _search(search_fn, single: bool = False):
    """A Ma et al. 2025 search (ODE, library defaults) spending the run's NFE budget.

    ``single`` spends exactly one trajectory whatever the budget: the no-search baseline.
    """

    def run(key, bundle: Bundle, config: RunConfig) -> Result:
        budget = config.num_steps if single else config.budget
        grid = _grid(bundle, config, bundle.model)
        return search_fn(
            key,
            bundle.model,
            bundle.reward,
            budget,
            grid,
            cond=bundle.cond,
            nan_policy=config.nan_policy,
        )

    return run


def _particles(method: str):
    """A Kim et al. 2025 particle method on the VP-converted SDE (``g = norm t^2``)."""

    def run(key, bundle: Bundle, config: RunConfig) -> Result:
        model = _vp(bundle.model)
        args = (
            key,
            model,
            bundle.reward,
            _grid(bundle, config, model),
            I.diffusion("square", config.diffusion_norm),
            config.budget,
        )
        common = {"cond": bundle.cond, "nan_policy": config.nan_policy}
        if method == "smc":
            return flow_particles.smc(*args, config.lam, **common)
        if method == "rbf":
            # A pool of 4 per chain (2 NFE each): at 100 NFE and 20 steps, 25 would not fit.
            return flow_particles.rbf(*args, num_init=4, **common)
        return getattr(flow_particles, method)(*args, **common)

    run.__doc__ = f"flow_particles.{method} on the VP-SDE"
    return run


def _second_gmm() -> Any:
    """The second mixture of the ``gmm`` model's pairs (FKC product and guidance): two broad
    components overlapping the first mixture's."""
    from tts_jax.models import gmm as G

    return G.make_gmm(
        [0.5, 0.5],
        [[0.0, 0.5], [1.5, -1.0]],
        [[[0.5, 0.0], [0.0, 0.5]], [[0.4, 0.1], [0.1, 0.3]]],
    )


def _model_pair(bundle: Bundle, config: RunConfig, method: str) -> tuple:
    """``((model_a, cond_a), (model_b, cond_b))`` of FKC's two-model targets: for ``gmm`` the
    bundle's mixture and :func:`_second_gmm`; for ``digits`` the DiT conditioned on
    ``target_class`` and unconditioned (null label); for an SD3 text-to-image pipeline with
    classifier-free guidance, its prompt and negative-prompt branches."""
    if config.model == "gmm":
        from tts_jax.models import gmm as G

        return (bundle.model, None), (G.flow_model(_second_gmm()), None)
    if config.model == "digits":
        return (bundle.model, jnp.int32(config.target_class)), (bundle.model, None)
    from tts_jax.models.pipelines.text_to_image import SD3Velocity

    cond = bundle.cond
    if isinstance(bundle.model.apply, SD3Velocity) and cond.negative_embeds is not None:
        plain = FlowModel(
            bundle.model.params,
            SD3Velocity(False),
            bundle.model.interpolant,
            bundle.model.sample_shape,
        )
        null = cond._replace(embeds=cond.negative_embeds, pooled=cond.negative_pooled)
        return (plain, cond), (plain, null)
    raise ValueError(
        f"{method} needs a pair of models: gmm (two mixtures), digits (conditional and "
        "unconditional DiT) or an SD3 pipeline with classifier-free guidance"
    )


def _fkc(kind: str):
    """Feynman-Kac correctors on the VP-converted path: ``anneal`` targets ``q^lam``,
    ``product`` the product of :func:`_model_pair`, ``cfg`` its geometric mixture
    ``q_a^lam q_b^(1 - lam)``; ``N = budget // (terms x num_steps)`` particles."""
    method = f"fkc-{kind}"

    def run(key, bundle: Bundle, config: RunConfig) -> Result:
        if kind == "anneal":
            target = fk_correctors.annealed(_vp(bundle.model), config.lam, bundle.cond)
        else:
            (model_a, cond_a), (model_b, cond_b) = _model_pair(bundle, config, method)
            model_a, model_b = _vp(model_a), _vp(model_b)
            if kind == "product":
                target = fk_correctors.product(model_a, model_b, cond_a, cond_b)
            else:
                target = fk_correctors.geometric(model_a, model_b, config.lam, cond_a, cond_b)
        terms = len(target.models)
        n = config.budget // (terms * config.num_steps)
        if n < 1:
            raise ValueError(
                f"{method}: budget {config.budget} NFE is below one particle "
                f"({terms * config.num_steps} NFE: {terms} models x {config.num_steps} steps)"
            )
        return fk_correctors.fk_correctors(
            key,
            target,
            n,
            _grid(bundle, config, target.models[0]),
            reward=bundle.reward,
            cond=bundle.cond,
            nan_policy=config.nan_policy,
        )

    run.__doc__ = f"FKC {kind} on the VP path"
    return run


def _dlbs(key, bundle: Bundle, config: RunConfig) -> Result:
    """DLBS with K = 2 candidates and a 1-step lookahead on the VP-converted SDE, as many beams
    as the budget buys."""
    k, lookahead = 2, 1
    per_beam, _ = dlbs.cost(dlbs.Plan(1, k, lookahead, config.num_steps))
    if config.budget < per_beam:
        raise ValueError(
            f"dlbs: budget {config.budget} NFE is below one beam ({per_beam} NFE at "
            f"{config.num_steps} steps, K = {k}, lookahead {lookahead})"
        )
    model = _vp(bundle.model)
    return dlbs.dlbs(
        key,
        model,
        bundle.reward,
        _grid(bundle, config, model),
        I.diffusion("square", config.diffusion_norm),
        num_beams=config.budget // per_beam,
        num_candidates=k,
        lookahead=lookahead,
        cond=bundle.cond,
        nan_policy=config.nan_policy,
    )


class ImageMethod(NamedTuple):
    """A registry entry.

    Attributes:
        run: ``(key, bundle, config) -> Result`` spending ``config.budget`` NFE.
        description: one line for ``tts-jax presets``.
        options: config fields the method reads (besides seed, nan_policy and out_dir).
    """

    run: Callable[[Any, Bundle, RunConfig], Result]
    description: str
    options: frozenset[str]


SEARCH = frozenset({"budget", "num_steps"})
SDE = frozenset({"budget", "num_steps", "diffusion_norm"})
TILTED = SDE | {"lam"}

METHODS: dict[str, ImageMethod] = {
    "single": ImageMethod(
        _search(noise_search.best_of_n, single=True),
        "one ODE trajectory, no search (baseline)",
        frozenset({"num_steps"}),
    ),
    "bon": ImageMethod(
        _search(noise_search.best_of_n), "best-of-N / random search (Ma et al. 2025)", SEARCH
    ),
    "zo": ImageMethod(
        _search(noise_search.zero_order_search), "zero-order search (Ma et al. 2025)", SEARCH
    ),
    "paths": ImageMethod(
        _search(noise_search.search_over_paths), "search over paths (Ma et al. 2025)", SEARCH
    ),
    "fk": ImageMethod(_fk, "FK steering, max potential, VP-SDE (Singhal et al. 2025)", TILTED),
    "smc": ImageMethod(_particles("smc"), "SMC on the reward tilt (Kim et al. 2025)", TILTED),
    "svdd": ImageMethod(_particles("svdd"), "SVDD (Kim et al. 2025)", SDE),
    "code": ImageMethod(_particles("code"), "CoDe (Kim et al. 2025)", SDE),
    "rbf": ImageMethod(_particles("rbf"), "rollover budget forcing (Kim et al. 2025)", SDE),
    "fkc-anneal": ImageMethod(
        _fkc("anneal"),
        "Feynman-Kac correctors, q^beta with beta = lam (Skreta et al. 2025)",
        frozenset({"budget", "num_steps", "lam"}),
    ),
    "fkc-product": ImageMethod(
        _fkc("product"),
        "Feynman-Kac correctors, product of two models (Skreta et al. 2025)",
        SEARCH,
    ),
    "fkc-cfg": ImageMethod(
        _fkc("cfg"),
        "Feynman-Kac correctors, guidance q_c^lam q_u^(1 - lam) (Skreta et al. 2025)",
        frozenset({"budget", "num_steps", "lam"}),
    ),
    "dlbs": ImageMethod(
        _dlbs, "diffusion latent beam search, K = 2, lookahead 1 (Oshima et al. 2025)", SDE
    ),
}
COMMON_OPTIONS = frozenset({"seed", "nan_policy", "out_dir"})


# --------------------------------------------------------------------------- running


def evaluate_held_out(
    bundle: Bundle, result: Result, rewards: dict[str, Reward] | None = None, images: Any = None
) -> dict[str, float]:
    """Held-out rewards (or ``rewards``) of the selected (best) sample and their mean over all
    returned samples (``images``: the decoded samples of a bundle with ``decode``)."""
    out = {}
    if bundle.decode is not None and images is None:
        images = bundle.decode(result.samples)
    x = result.samples if images is None else images
    for name, reward in (bundle.held_out if rewards is None else rewards).items():
        values = np.asarray(reward(x, bundle.cond))
        out[f"{name}_best"] = float(values[int(result.best)])
        out[f"{name}_mean"] = float(np.mean(values))
    return out


def run_one(config: RunConfig, bundle: Bundle | None = None, write: bool = True) -> dict[str, Any]:
    """Run one method at one budget and seed; returns the JSON-able record.

    The record holds the full resolved config (``config``) and its identity hash
    (``config_id``, see :func:`tts_jax.app.runs.config_id`), the costs, rewards, held-out
    rewards and, for weighted particle methods, ``weight_collapse``
    (:func:`tts_jax.diagnostics.weight_collapse`; a collapse is also logged as a warning). With
    ``write``, the files listed in ``record["files"]`` are written to ``config.out_dir``.
    """
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; known: {sorted(METHODS)}")
    bundle = load_bundle(config) if bundle is None else bundle
    start = time.perf_counter()
    result = METHODS[config.method].run(jax.random.key(config.seed), bundle, config)
    jax.block_until_ready(result)
    wall = time.perf_counter() - start
    if int(result.cost.nfe) > config.budget:
        raise AssertionError(
            f"{config.method} spent {int(result.cost.nfe)} NFE over its budget {config.budget}"
        )
    num = int(np.shape(result.rewards)[0])
    collapse = diagnostics.weight_collapse(result.info.flat(), num)
    warning = diagnostics.collapse_message(f"{config.model}-{config.method}", collapse, num)
    if warning:
        log.warning(warning)
    fields = identity(config)
    images = None if bundle.decode is None else bundle.decode(result.samples)
    record = {
        "model": config.model,
        "method": config.method,
        "budget": config.budget,
        "seed": config.seed,
        "target_class": config.target_class,
        "config": fields,
        "config_id": runs.config_id(fields),
        "nfe": int(result.cost.nfe),
        "reward_calls": int(result.cost.reward_calls),
        "num_samples": num,
        "best_reward": float(result.best_reward),
        "mean_reward": float(
            jnp.mean(jnp.where(jnp.isfinite(result.rewards), result.rewards, 0.0))
        ),
        "wall_time_s": wall,
        **evaluate_held_out(bundle, result, images=images),
        **bundle.record,
    }
    if bundle.decode is None:  # latents are too large for a JSON record (samples.npz has them)
        record["best_sample"] = np.asarray(result.best_sample, np.float32).ravel()
    if bundle.members:
        record["reward_members"] = evaluate_held_out(bundle, result, bundle.members, images)
    if collapse is not None:
        record["weight_collapse"] = collapse
    if write:
        out = pathlib.Path(config.out_dir)
        record["files"] = write_run(out, config, record, result, images)
    return record


def write_run(
    out: pathlib.Path, config: RunConfig, record: dict, result: Result, images: Any = None
) -> list:
    """Write a run's files into ``out``; returns the names of the files written.

    ``images`` (``[N, 3, H, W]`` in ``[-1, 1]``, the decoded samples of a latent model) are
    drawn in ``samples.png`` and saved in ``samples.npz`` next to the samples; without them,
    samples of shape ``[N, C, H, W]`` are drawn as they are.
    """
    files = ["config.json", "result.json", "samples.npz", "diagnostics.npz"]
    is_image = images is not None or np.ndim(result.samples) == 4  # [N, C, H, W]
    if is_image:
        files.append("samples.png")
    record = {**record, "files": files}
    runs.write_json(out / "config.json", {"config": config, "environment": runs.environment()})
    runs.write_json(out / "result.json", record)
    arrays = {"images": np.asarray(images, np.float32)} if images is not None else {}
    np.savez(
        out / "samples.npz",
        samples=np.asarray(result.samples),
        rewards=np.asarray(result.rewards),
        log_weights=np.asarray(result.log_weights),
        **arrays,
    )
    np.savez(out / "diagnostics.npz", **result.info.arrays())
    if is_image:
        shown = np.asarray(result.samples if images is None else images, np.float32)
        plots.image_grid(shown, np.asarray(result.rewards), out / "samples.png")
    return files


def check_feasible(config: RunConfig, bundle: Bundle) -> None:
    """Raise the error ``run_one(config)`` would raise for its budget or settings, without running.

    The samplers check their arguments on the host before tracing; this traces the run abstractly
    (``jax.eval_shape``: no compilation, no model evaluation), so those checks fire here.

    Raises:
        ValueError: the sampler refuses the config (e.g. a budget below its minimum).
    """
    method = METHODS[config.method]

    def dry(key):
        # Only the key is abstract: settings built inside the adapter stay concrete, so the
        # samplers' host checks can read them.
        with jax.ensure_compile_time_eval():
            return method.run(key, bundle, config)

    try:
        jax.eval_shape(dry, jax.random.key(0))  # a ValueError from a host check propagates
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        pass  # the host checks passed; the post-run checks need concrete values


def sweep_identity(base: RunConfig) -> dict[str, Any]:
    """What every run of a sweep shares: the config but the swept method, budget and seed."""
    return {k: v for k, v in identity(base).items() if k not in ("method", "budget", "seed")}


def _plan(base: RunConfig, methods, budgets, seeds) -> list[sweeps.Unit]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {sorted(METHODS)}")
    # RunConfig's own checks run here, for every run, before anything runs.
    return [
        sweeps.Unit(dataclasses.replace(base, method=m, budget=b, seed=s))
        for m in methods
        for b in budgets
        for s in seeds
    ]


def _check_all(units: list[sweeps.Unit], bundle: Bundle) -> None:
    """:func:`check_feasible` once per distinct (method, budget) of ``units``."""
    for config in {(u.config.method, u.config.budget): u.config for u in units}.values():
        try:
            check_feasible(config, bundle)
        except ValueError as err:
            raise ValueError(
                f"sweep: method {config.method} at budget {config.budget} is infeasible: {err}"
            ) from None


IMAGE_TASK = sweeps.Task(
    name="sweep",
    plan=_plan,
    shared=sweep_identity,
    identity=lambda unit: identity(unit.config),
    load=lambda units: load_bundle(units[0].config),
    check=_check_all,
    run=lambda unit, bundle: run_one(unit.config, bundle, write=False),
)


def sweep(
    base: RunConfig,
    methods: list[str],
    budgets: list[int],
    seeds: list[int],
    out_dir: str,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Every (method, budget, seed) of ``base``'s model with the sweep engine
    (:func:`tts_jax.app.sweeps.sweep`: one configuration per folder, resumable, every
    (method, budget) checked before the first run).

    Returns:
        The records of exactly the requested runs (never runs of other settings).
    """
    return sweeps.sweep(IMAGE_TASK, base, methods, budgets, seeds, out_dir, progress=progress)
