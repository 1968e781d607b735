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
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax import interpolants as I
from tts_jax import plots, runs, smc
from tts_jax.models.base import FlowModel, linear_to_vp
from tts_jax.rewards.base import Reward
from tts_jax.samplers import flow_particles, noise_search
from tts_jax.samplers.fk_steering import fk_steering
from tts_jax.samplers.result import SampleResult


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
        out_dir: folder for this run's files.
    """

    model: str = "gmm"
    method: str = "fk"
    budget: int = 2000
    num_steps: int = 20
    lam: float = 10.0
    target_class: int = 3
    diffusion_norm: float = 3.0
    seed: int = 0
    out_dir: str = "outputs/run"

    def __post_init__(self):
        if self.budget < 1 or self.num_steps < 1:
            raise ValueError(
                f"budget ({self.budget}) and num_steps ({self.num_steps}) must be >= 1"
            )
        if self.budget < self.num_steps:
            raise ValueError(
                f"budget {self.budget} NFE is below one trajectory of {self.num_steps} steps; "
                f"the minimum budget is {self.num_steps}"
            )


@dataclasses.dataclass(frozen=True)
class Bundle:
    """What a run steers: a flow model, the steering reward, held-out rewards (never optimized)."""

    model: FlowModel
    reward: Reward
    held_out: dict[str, Reward]
    cond: Any = None


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


MODELS: dict[str, Callable[[RunConfig], Bundle]] = {"gmm": _gmm_bundle, "digits": _digits_bundle}


def load_bundle(config: RunConfig) -> Bundle:
    """Build the bundle named by ``config.model`` (a registry name or a user Python file)."""
    if config.model.endswith(".py"):
        path = pathlib.Path(config.model)
        if not path.is_file():
            raise FileNotFoundError(f"user config file {path} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "make_bundle"):
            raise ValueError(f"{path} must define make_bundle(config) -> tts_jax.experiment.Bundle")
        return module.make_bundle(config)
    if config.model not in MODELS:
        raise ValueError(f"unknown model {config.model!r}; known: {sorted(MODELS)} or a .py file")
    return MODELS[config.model](config)


# --------------------------------------------------------------------------- methods


def _fk(key, bundle: Bundle, config: RunConfig) -> SampleResult:
    """FK steering with the ``max`` potential, ~5 resampling points, on the VP-converted SDE."""
    n = max(config.budget // config.num_steps, 1)
    model = _vp(bundle.model)
    return fk_steering(
        key,
        model,
        bundle.reward,
        n,
        I.uniform_grid(config.num_steps),
        I.diffusion("square", config.diffusion_norm),
        config.lam,
        schedule=smc.every(config.num_steps, max(config.num_steps // 5, 1)),
        potential="max",
        cond=bundle.cond,
    )


def _vp(model: FlowModel) -> FlowModel:
    return linear_to_vp(model) if isinstance(model.interpolant, I.Linear) else model


def _search(search_fn, single: bool = False):
    """A Ma et al. 2025 search (ODE, library defaults) spending the run's NFE budget.

    ``single`` spends exactly one trajectory whatever the budget: the no-search baseline.
    """

    def run(key, bundle: Bundle, config: RunConfig) -> SampleResult:
        budget = config.num_steps if single else config.budget
        grid = I.uniform_grid(config.num_steps)
        return search_fn(key, bundle.model, bundle.reward, budget, grid, cond=bundle.cond)

    return run


def _particles(method: str):
    """A Kim et al. 2025 particle method on the VP-converted SDE (``g = norm t^2``)."""

    def run(key, bundle: Bundle, config: RunConfig) -> SampleResult:
        args = (
            key,
            _vp(bundle.model),
            bundle.reward,
            I.uniform_grid(config.num_steps),
            I.diffusion("square", config.diffusion_norm),
            config.budget,
        )
        if method == "smc":
            return flow_particles.smc(*args, config.lam, cond=bundle.cond)
        if method == "rbf":
            # A pool of 4 per chain (2 NFE each): at 100 NFE and 20 steps, 25 would not fit.
            return flow_particles.rbf(*args, num_init=4, cond=bundle.cond)
        return getattr(flow_particles, method)(*args, cond=bundle.cond)

    run.__doc__ = f"flow_particles.{method} on the VP-SDE"
    return run


METHODS: dict[str, Callable[[Any, Bundle, RunConfig], SampleResult]] = {
    "single": _search(noise_search.best_of_n, single=True),
    "bon": _search(noise_search.best_of_n),
    "zo": _search(noise_search.zero_order_search),
    "paths": _search(noise_search.search_over_paths),
    "fk": _fk,
    "smc": _particles("smc"),
    "svdd": _particles("svdd"),
    "code": _particles("code"),
    "rbf": _particles("rbf"),
}


# --------------------------------------------------------------------------- running


def evaluate_held_out(bundle: Bundle, result: SampleResult) -> dict[str, float]:
    """Held-out rewards of the selected (best) sample and their mean over all returned samples."""
    out = {}
    for name, reward in bundle.held_out.items():
        values = np.asarray(reward(result.samples, bundle.cond))
        out[f"{name}_best"] = float(values[int(result.best)])
        out[f"{name}_mean"] = float(np.mean(values))
    return out


def run_one(config: RunConfig, bundle: Bundle | None = None, write: bool = True) -> dict[str, Any]:
    """Run one method at one budget and seed; returns the JSON-able record."""
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; known: {sorted(METHODS)}")
    bundle = load_bundle(config) if bundle is None else bundle
    start = time.perf_counter()
    result = METHODS[config.method](jax.random.key(config.seed), bundle, config)
    jax.block_until_ready(result)
    wall = time.perf_counter() - start
    if int(result.nfe) > config.budget:
        raise AssertionError(
            f"{config.method} spent {int(result.nfe)} NFE over its budget {config.budget}"
        )
    record = {
        "model": config.model,
        "method": config.method,
        "budget": config.budget,
        "seed": config.seed,
        "target_class": config.target_class,
        "nfe": int(result.nfe),
        "reward_calls": int(result.reward_calls),
        "best_reward": float(result.best_reward),
        "mean_reward": float(
            jnp.mean(jnp.where(jnp.isfinite(result.rewards), result.rewards, 0.0))
        ),
        "wall_time_s": wall,
        "best_sample": np.asarray(result.best_sample, np.float32).ravel(),
        **evaluate_held_out(bundle, result),
    }
    if write:
        out = pathlib.Path(config.out_dir)
        runs.write_json(out / "config.json", {"config": config, "environment": runs.environment()})
        runs.write_json(out / "result.json", record)
        np.savez(
            out / "samples.npz",
            samples=np.asarray(result.samples),
            rewards=np.asarray(result.rewards),
            log_weights=np.asarray(result.log_weights),
        )
        diagnostics = {k: np.asarray(v) for k, v in result.info.items() if np.ndim(v) >= 1}
        np.savez(out / "diagnostics.npz", **diagnostics)
        if np.ndim(result.samples) == 4:  # [N, C, H, W] images
            plots.image_grid(
                np.asarray(result.samples), np.asarray(result.rewards), out / "samples.png"
            )
    return record


def sweep(
    base: RunConfig,
    methods: list[str],
    budgets: list[int],
    seeds: list[int],
    out_dir: str,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every (method, budget, seed), appending each finished run to ``out_dir/runs.jsonl``.

    Runs already recorded there are skipped, so an interrupted sweep resumes where it stopped.
    """
    from tqdm.auto import tqdm

    path = pathlib.Path(out_dir) / "runs.jsonl"
    target = base.target_class
    done = {
        (r["method"], r["budget"], r["seed"])
        for r in runs.read_jsonl(path)
        if r.get("target_class", target) == target
    }
    todo = [(m, b, s) for m in methods for b in budgets for s in seeds if (m, b, s) not in done]
    if not todo:
        return runs.read_jsonl(path)
    bundle = load_bundle(base)
    # disable=None: tqdm stays quiet when stderr is not a terminal (CI, logs, notebooks' files).
    quiet = None if progress else True
    for method, budget, seed in tqdm(todo, disable=quiet, desc="sweep"):
        cfg = dataclasses.replace(base, method=method, budget=budget, seed=seed, out_dir=out_dir)
        record = run_one(cfg, bundle, write=False)
        runs.append_jsonl(path, record)
    return runs.read_jsonl(path)
