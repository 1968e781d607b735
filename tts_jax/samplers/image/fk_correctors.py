"""Feynman-Kac correctors: weighted SDEs for annealed, product and guidance targets
(Skreta et al. 2025, docs/algorithms.md 6.3).

Skreta, Akhound-Sadegh, Ohanesian, Bondesan, Aspuru-Guzik, Doucet, Brekelmans, Tong, Neklyudov
2025, "Feynman-Kac Correctors in Diffusion: Annealing, Guidance, and Product of Experts".

A :class:`Target` is a product of powers of diffusion marginals, ``p~_t(x) = prod_i
q_t^i(x)^{beta_i}`` at every noise level ``t``, with constant exponents (a float32 array: sweeping
them never recompiles):

* :func:`annealed` ``q^beta`` (one model);
* :func:`product` ``q^a q^b`` (any two :class:`~tts_jax.models.base.FlowModel` on one path);
* :func:`guided` ``q(x | c)^w q(x | null)^{1 - w}``: classifier-free guidance read as the
  geometric mixture it targets (not the tilt of the conditional); :func:`geometric` is the same
  for two different models.

Particles follow the SDE whose drift uses the target's score ``S = sum_i beta_i s_i``
(``s_i = grad log q_t^i`` from each model's velocity, docs/algorithms.md 0.1). On a path
``x_t = alpha x0 + sigma eps``, with ``kappa = alpha' / alpha``, the forward diffusion
``g_f^2 = 2 sigma sigma' - 2 kappa sigma^2`` and any free noise level ``sigma_n(t)``, one step
from ``t`` to ``t' < t`` (``h = t - t'``) is

    x' = x - h [kappa x - (g_f^2 + sigma_n^2) / 2 * S] + sigma_n sqrt(h) z,

and the particle's log-weight gains ``h G(x)``, at the left point, with

    G = (B - 1) D kappa + (g_f^2 / 2) (|S|^2 - sum_i beta_i |s_i|^2),     B = sum_i beta_i,

``D`` the number of entries of one particle. Because drift and target share one score, every
Laplacian and every ``sigma_n`` term cancels: only scores are needed. The bracket equals
``(B - 1) sum_i beta_i |s_i|^2 - sum_{i<j} beta_i beta_j |s_i - s_j|^2`` (the form computed,
free of cancellation for guidance): ``beta (beta - 1) |s|^2`` when annealing,
``2 <s_a, s_b>`` for a product, ``w (w - 1) |s_c - s_u|^2`` for guidance. The first term of
``G`` is the same for every particle: it enters the log-evidence only, never the weights, and
each step's increments are shifted by their maximum over the live particles before reweighting
(the shift also goes to the log-evidence), so float32 weights stay exact for large ``D``.
Weights are never clamped or centred per particle.

Initialization (the pitfall of starting from ``N(0, I)``): the particles start from
``N(0, sigma(t_0)^2 I / B)``, the product of the Gaussians ``q_{t_0}^i ~ N(0, sigma(t_0)^2 I)``
raised to ``beta_i``; exact up to ``O(alpha(t_0)^2)`` (``7e-3^2`` for the VP path at ``t = 1``).
The path must have ``alpha(t_0) > 0`` (``kappa`` is infinite where ``alpha = 0``): run a
linear-path model with :func:`tts_jax.models.base.linear_to_vp`.

Resampling is the shared engine's (:func:`tts_jax.smc.step`): any schedule (a value) and any
resampler. Without weights (``smc.never`` and the particles read unweighted) the same SDE samples
a wrong distribution (tests/samplers/test_fk_correctors.py shows it).

Cost: ``M K`` NFE per particle (``M`` terms: annealing 1, product and guidance 2; a term is one
velocity evaluation) and one reward call per particle when a reward scores the final samples
(it never weights them). ``log_evidence`` estimates ``log (Z_0 / Z_{t_0})`` with ``Z_t = int
prod_i q_t^i(x)^{beta_i} dx``.

Two ways to call it, as every method (:mod:`tts_jax.samplers.base`): :func:`sampler` +
:func:`make_params` + :func:`check_params` + :func:`tts_jax.samplers.run`, or the convenience
entry point :func:`fk_correctors`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax import smc
from tts_jax.interpolants import Diffusion, Interpolant, velocity_to_score
from tts_jax.models.base import FlowModel
from tts_jax.resampling import Resampler, get_resampler
from tts_jax.rewards.base import Reward
from tts_jax.samplers.base import Sampler, float32, run
from tts_jax.samplers.result import (
    Cost,
    Result,
    check_finite_hyperparameters,
    check_nan_policy,
    held_out_scores,
    make_info,
    mask_invalid_rewards,
    raise_for_invalid_rewards,
    to_host,
)

Array = jax.Array
PyTree = Any

METHOD = "fk_correctors"

# --------------------------------------------------------------------------- targets


class Target(NamedTuple):
    """``p~_t = prod_i q_t^i(x)^{beta_i}``: a pytree (the exponents and the models' weights are
    leaves; the number of terms ``M`` is static).

    Attributes:
        models: ``M`` :class:`~tts_jax.models.base.FlowModel` on one path (same interpolant and
            sample shape); a model may appear twice (guidance).
        conds: ``M`` conditions, one per term (``None`` for an unconditional call).
        exponents: ``Float[M]`` the constant ``beta_i`` (their sum must be positive).
    """

    models: tuple[FlowModel, ...]
    conds: tuple[Any, ...]
    exponents: Array


def annealed(model: FlowModel, beta: float | Array, cond: Any = None) -> Target:
    """``q^beta``: one model raised to ``beta > 0`` (``beta > 1`` sharpens, ``< 1`` flattens)."""
    beta = float32(beta)
    return Target((model,), (cond,), beta.reshape((1,)))


def product(
    model_a: FlowModel, model_b: FlowModel, cond_a: Any = None, cond_b: Any = None
) -> Target:
    """``q^a q^b``: the product of two models (exponents 1, 1) on one path."""
    return Target((model_a, model_b), (cond_a, cond_b), np.ones((2,), np.float32))


def geometric(
    model_a: FlowModel, model_b: FlowModel, w: float | Array, cond_a: Any = None, cond_b: Any = None
) -> Target:
    """``q^a(x)^w q^b(x)^{1 - w}``: the geometric mixture of two models on one path (exponents
    summing to 1; ``w > 1`` extrapolates away from ``q^b``)."""
    w = float32(w)
    stack = jnp.stack if isinstance(w, jax.Array) else np.stack
    exponents = stack([w, 1.0 - w]).astype(np.float32)
    return Target((model_a, model_b), (cond_a, cond_b), exponents)


def guided(model: FlowModel, w: float | Array, cond: Any, null_cond: Any = None) -> Target:
    """``q(x | cond)^w q(x | null_cond)^{1 - w}``, the geometric mixture that classifier-free
    guidance with scale ``w`` follows (:func:`geometric` of one model under two conditions).
    ``model`` must be the plain conditional model (not one that applies guidance itself);
    ``null_cond`` is its unconditional input (``None`` for the digits DiT, whose ``cond=None`` is
    the null label)."""
    return geometric(model, model, w, cond, null_cond)


# --------------------------------------------------------------------------- path quantities


def _kappa_and_forward_g2(interp: Interpolant, t: Array) -> tuple[Array, Array]:
    """``(kappa = alpha' / alpha, g_f^2 = 2 sigma sigma' - 2 kappa sigma^2)`` at ``t``: the drift
    coefficient and squared diffusion of the path's forward SDE ``dx = kappa x dt + g_f dW``."""
    a, s = interp.alpha(t), interp.sigma(t)
    kappa = interp.alpha_dot(t) / a
    return kappa, 2.0 * s * interp.sigma_dot(t) - 2.0 * kappa * s**2


def _path_noise(norm, t, interp):
    """``sigma_n = norm g_f(t)``: the path's own diffusion (``norm = 1`` is the standard reverse
    SDE); the default noise of :func:`make_params`."""
    _, g2 = _kappa_and_forward_g2(interp, t)
    return norm * jnp.sqrt(jnp.maximum(g2, 0.0))


def path_noise(norm: float = 1.0) -> Diffusion:
    """The noise level ``sigma_n = norm g_f(t)`` of the FKC SDE as a
    :class:`~tts_jax.interpolants.Diffusion` (``norm`` an array leaf: sweeping it never
    recompiles). Any other :class:`~tts_jax.interpolants.Diffusion` works too: the weights do not
    depend on the noise level."""
    return Diffusion(float32(norm), _path_noise)


def _flat_sq(v: Array) -> Array:
    return jnp.sum(jnp.square(v.reshape(v.shape[0], -1)), axis=-1)


def scores_and_increment(target: Target, x: Array, t: Array) -> tuple[Array, Array, Array, Array]:
    """The target's score and the per-particle FK rate at ``(x, t)`` (``M`` NFE).

    Args:
        target: :class:`Target`.
        x: ``[N, ...]`` particles at the scalar time ``t`` (``sigma(t) > 0``).

    Returns:
        ``(S [N, ...], G [N], kappa, g_f^2)``: ``S = sum_i beta_i s_i``; ``G`` the part of the
        rate that varies between particles, ``(g_f^2 / 2) (|S|^2 - sum_i beta_i |s_i|^2)``.
    """
    interp = target.models[0].interpolant
    beta = jnp.asarray(target.exponents, jnp.float32)
    scores = [
        velocity_to_score(interp, m.velocity(x, t, c), x, t)
        for m, c in zip(target.models, target.conds, strict=True)
    ]
    total = sum(beta[i] * s for i, s in enumerate(scores))
    bsum = jnp.sum(beta)
    spread = (bsum - 1.0) * sum(beta[i] * _flat_sq(s) for i, s in enumerate(scores))
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            spread = spread - beta[i] * beta[j] * _flat_sq(scores[i] - scores[j])
    kappa, g2 = _kappa_and_forward_g2(interp, jnp.asarray(t, jnp.float32))
    return total, 0.5 * g2 * spread, kappa, g2


# --------------------------------------------------------------------------- params


class Params(NamedTuple):
    """Everything array-valued FKC needs (a jit argument, never static).

    Attributes:
        target: :class:`Target`.
        grid: ``Float[K + 1]`` times from noise to the data end (``grid[-1] = 0``; every step is
            evaluated at its left point, so the scores are never needed at ``sigma = 0``).
        diffusion: the free noise level ``sigma_n(t)`` of the SDE
            (:class:`~tts_jax.interpolants.Diffusion`; default :func:`path_noise`).
        schedule: :class:`~tts_jax.smc.ResampleSchedule`.
        reward: optional :class:`~tts_jax.rewards.base.Reward` scoring the final samples
            (reported, never weighted), or ``None``.
        cond: the reward's condition, or ``None``.
    """

    target: Target
    grid: Array
    diffusion: Diffusion
    schedule: smc.ResampleSchedule
    reward: Reward | None = None
    cond: Any = None


_default_schedule = functools.lru_cache(smc.adaptive)


def make_params(
    target: Target,
    grid: Array,
    diffusion: Diffusion | None = None,
    schedule: smc.ResampleSchedule | None = None,
    reward: Reward | None = None,
    cond: Any = None,
) -> Params:
    """:class:`Params` with the grid as float32, the noise level defaulting to
    :func:`path_noise` ``(1)`` and the schedule to adaptive resampling (``ESS < N / 2``, never
    after the last step). No checks (:func:`check_params`)."""
    grid = float32(grid)
    diffusion = path_noise(1.0) if diffusion is None else diffusion
    if schedule is None and grid.ndim == 1 and grid.shape[0] >= 2:
        schedule = _default_schedule(grid.shape[0] - 1)
    return Params(target, grid, diffusion, schedule, reward, cond)


def check_params(params: Params, sampler: Sampler, method: str = METHOD) -> None:
    """Host-side checks before tracing (values only when concrete).

    Raises:
        ValueError: naming ``method``: a grid that is not ``[K + 1]`` for the sampler's ``K`` or
            does not end at the data end 0; a target whose term count differs from the
            sampler's, whose models differ in path or sample shape, whose exponents are not
            finite or sum to ``<= 0``; a path with ``alpha(grid[0]) = 0`` (use ``linear_to_vp``);
            a schedule of another length; non-finite noise numbers or ESS threshold.
    """
    target = params.target
    if not isinstance(target, Target):
        raise ValueError(f"{method}: params.target must be a Target, got {type(target).__name__}")
    num_terms = _TERMS.get(sampler)
    if num_terms is None:
        raise ValueError(f"{method}: the sampler was not built by fk_correctors.sampler")
    if len(target.models) != num_terms or len(target.conds) != num_terms:
        raise ValueError(
            f"{method}: the target has {len(target.models)} models and {len(target.conds)} "
            f"conditions, the sampler takes {num_terms} terms"
        )
    if np.shape(target.exponents) != (num_terms,):
        raise ValueError(
            f"{method}: exponents must be Float[{num_terms}], got shape "
            f"{np.shape(target.exponents)}"
        )
    first = target.models[0]
    for m in target.models:
        if not isinstance(m, FlowModel):
            raise ValueError(f"{method}: every term needs a FlowModel, got {type(m).__name__}")
        if m.interpolant != first.interpolant or m.sample_shape != first.sample_shape:
            raise ValueError(
                f"{method}: the models of a target must share one path and sample shape, got "
                f"{m.interpolant} {m.sample_shape} and {first.interpolant} {first.sample_shape}"
            )
    shape = np.shape(params.grid)
    if len(shape) != 1 or shape[0] < 2:
        raise ValueError(f"{method}: grid must be [K + 1] times with K >= 1, got shape {shape}")
    if shape[0] - 1 != sampler.num_steps:
        raise ValueError(
            f"{method}: the grid has {shape[0] - 1} steps but the sampler takes {sampler.num_steps}"
        )
    if params.schedule is None or np.shape(params.schedule.mask) != (sampler.num_steps,):
        got = None if params.schedule is None else np.shape(params.schedule.mask)
        raise ValueError(
            f"{method}: the schedule must have one entry per step ({sampler.num_steps}), got {got}"
        )
    norms = jax.tree_util.tree_leaves_with_path(getattr(params.diffusion, "norm", None))
    check_finite_hyperparameters(
        method,
        {
            "exponents": target.exponents,
            "grid": params.grid,
            **{f"diffusion.norm{jax.tree_util.keystr(path)}": v for path, v in norms},
            "schedule.ess_threshold": params.schedule.ess_threshold,
        },
    )
    if not isinstance(target.exponents, jax.core.Tracer):
        total = float(np.sum(np.asarray(target.exponents, np.float64)))
        if not total > 0:
            raise ValueError(
                f"{method}: the exponents must sum to a positive number (the target's noise end "
                f"is N(0, I / sum beta)), got sum {total}"
            )
    if not isinstance(params.grid, jax.core.Tracer):
        grid = np.asarray(params.grid, np.float32)
        if grid[-1] != 0.0 or not (np.diff(grid) < 0).all():
            raise ValueError(
                f"{method}: grid must decrease strictly from noise to the data end 0, got {grid}"
            )
        alpha0 = float(first.interpolant.alpha(jnp.float32(grid[0])))
        if not (alpha0 > 0 and math.isfinite(alpha0)):
            raise ValueError(
                f"{method}: the path has alpha(t) = {alpha0} at grid[0] = {grid[0]}: its forward "
                "drift alpha'/alpha is infinite there; run a linear-path model on the VP path "
                "(tts_jax.models.base.linear_to_vp) or start the grid below t = 1"
            )


# --------------------------------------------------------------------------- the kernel


def _propagate(key, state, k, params):
    """One weighted SDE step from ``grid[k]`` to ``grid[k + 1]``: the scores at the left point
    give the move and the log-weight increment (returned as the engine's correction)."""
    grid = jnp.asarray(params.grid)
    t, t_next = grid[k], grid[k + 1]
    x = state["x"]
    h = t - t_next
    total, rate, kappa, g2 = scores_and_increment(params.target, x, t)
    interp = params.target.models[0].interpolant
    noise = params.diffusion(t, interp)
    drift = kappa * x - 0.5 * (g2 + noise**2) * total
    z = jax.random.normal(key, x.shape, x.dtype)
    x_next = x - h * drift + noise * jnp.sqrt(h) * z
    increment = h * rate
    finite = jnp.isfinite(increment)
    alive = state["alive"] & finite  # a dropped particle's increments never matter again
    top = jnp.max(jnp.where(alive, increment, -jnp.inf))
    shift = jnp.where(jnp.isfinite(top), top, 0.0)
    n = x.shape[0]
    new = {
        "x": x_next,
        "flag": jnp.where(state["alive"] & ~finite, jnp.nan, 0.0).astype(jnp.float32),
        "shift": jnp.broadcast_to(shift, (n,)).astype(jnp.float32),
        "alive": alive,
    }
    return new, jnp.where(alive, increment - shift, 0.0).astype(jnp.float32)


def _log_potential(state, k, params):
    """0 for every particle, NaN where the step's increment of a live particle was not finite
    (the engine then drops the particle and counts it in ``num_nan_potentials``, once)."""
    return state["flag"]


def _observe(state):
    return state["shift"][0]


def _constant_log_rate(params: Params, dim: int) -> Array:
    """``sum_k h_k (B - 1) D kappa(t_k)``: the part of the log-weights shared by every particle
    (it only scales ``Z``)."""
    grid = jnp.asarray(params.grid)
    interp = params.target.models[0].interpolant
    kappa, _ = _kappa_and_forward_g2(interp, grid[:-1])
    bsum = jnp.sum(jnp.asarray(params.target.exponents, jnp.float32))
    return jnp.sum((grid[:-1] - grid[1:]) * (bsum - 1.0) * dim * kappa)


_TERMS: dict[Sampler, int] = {}


def sampler(
    num_particles: int,
    num_steps: int,
    num_terms: int,
    resampler: str | Resampler = "systematic",
) -> Sampler:
    """FKC (docs/algorithms.md 6.3) as a :class:`~tts_jax.samplers.base.Sampler`.

    Static configuration only (memoized: equal arguments give the same sampler); the target's
    models and exponents, the grid, the noise level and the schedule travel in :class:`Params`.

    Args:
        num_particles: ``N >= 1``.
        num_steps: ``K >= 1`` SDE steps.
        num_terms: ``M >= 1``, the number of factors of the target (annealing 1, product and
            guidance 2).
        resampler: a ``(key, log_weights [N], num) -> Int32[num]`` function or its name in
            :mod:`tts_jax.resampling`.

    Returns:
        A sampler over :class:`~tts_jax.smc.SMCState` of ``{"x" [N, ...], "flag" [N], "shift"
        [N], "alive" Bool[N]}`` with ``keys_per_step = 2``; its result is the :class:`Result` of
        :func:`fk_correctors`.
    """
    for name, value in (
        ("num_particles", num_particles),
        ("num_steps", num_steps),
        ("num_terms", num_terms),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{METHOD}: {name} must be an int >= 1, got {value!r}")
    if not (isinstance(resampler, str) or callable(resampler)):
        raise ValueError(f"{METHOD}: resampler must be a name or a function, got {resampler}")
    built = _sampler(int(num_particles), int(num_steps), int(num_terms), get_resampler(resampler))
    _TERMS[built] = int(num_terms)
    return built


@functools.cache
def _sampler(n: int, num_steps: int, num_terms: int, resampler: Resampler) -> Sampler:
    def init(key, params):
        model = params.target.models[0]
        t0 = jnp.asarray(params.grid)[0]
        bsum = jnp.sum(jnp.asarray(params.target.exponents, jnp.float32))
        scale = model.interpolant.sigma(t0) / jnp.sqrt(bsum)
        x = scale * jax.random.normal(key, (n, *model.sample_shape), jnp.float32)
        state = {
            "x": x,
            "flag": jnp.zeros((n,), jnp.float32),
            "shift": jnp.zeros((n,), jnp.float32),
            "alive": jnp.ones((n,), bool),
        }
        return smc.init(state, _log_potential, params)

    def step(keys, state, params):
        return smc.step(
            keys, state, _propagate, _log_potential, params.schedule, params, resampler, _observe
        )

    def finalize(state, infos, params):
        x = state.particles.state["x"]
        lw = state.particles.log_weights
        alive = jnp.isfinite(lw)
        if params.reward is None:
            rewards = jnp.zeros((n,), jnp.float32)
            invalid = jnp.zeros((2, n), bool)
            best = jnp.argmax(lw)
            calls = 0
        else:
            rewards, invalid = mask_invalid_rewards(params.reward(x, params.cond))
            best = jnp.argmax(jnp.where(alive, rewards, -jnp.inf))
            calls = n
        dim = math.prod(params.target.models[0].sample_shape)
        log_z = state.log_evidence + jnp.sum(infos.observed) + _constant_log_rate(params, dim)
        log_z = jnp.where(jnp.isneginf(state.log_evidence), -jnp.inf, log_z)
        info = make_info(
            n,
            num_nan=jnp.sum(invalid[0]),
            num_inf=jnp.sum(invalid[1]),
            steps=infos,
            extra={
                "log_evidence_increment": infos.log_evidence_increment,
                "num_nan_weights": infos.num_nan_potentials,
                "weight_shift": infos.observed,
                "all_dead": infos.all_dead,
            },
        )
        return Result(
            samples=x,
            rewards=rewards,
            log_weights=lw,
            best=best.astype(jnp.int32),
            log_evidence=log_z,
            all_dead=~jnp.any(alive),
            cost=Cost(jnp.int32(num_steps * num_terms * n), jnp.int32(calls), jnp.int32(0)),
            info=info,
        )

    return Sampler(init, step, finalize, num_steps, keys_per_step=2)


_run = jax.jit(run, static_argnames="sampler")


def fk_correctors(
    key: Array,
    target: Target,
    num_particles: int,
    grid: Array,
    diffusion: Diffusion | None = None,
    schedule: smc.ResampleSchedule | None = None,
    resampler: str | Resampler = "systematic",
    reward: Reward | None = None,
    cond: Any = None,
    held_out: dict[str, Reward] | None = None,
    nan_policy: str = "raise",
) -> Result:
    """Run FKC on ``target``: host checks, the jitted kernel, the host checks of the result.

    Args:
        key: PRNG key.
        target: :class:`Target` (:func:`annealed`, :func:`product`, :func:`guided` or your own).
        num_particles: ``N``.
        grid: ``[K + 1]`` times from noise to 0 on the models' path (with ``alpha(grid[0]) > 0``:
            the VP path, e.g. :func:`tts_jax.models.base.linear_to_vp`).
        diffusion: the SDE's free noise level (default :func:`path_noise` ``(1)``).
        schedule: when to resample (default adaptive, ``ESS < N / 2``, not after the last step).
        resampler: the resampling function or its name (default systematic).
        reward: optional reward of the final samples (``Result.rewards`` and ``best``; never
            used for the weights), with ``cond``.
        held_out: ``name -> Reward`` evaluated on the final samples (``info.held_out``).
        nan_policy: ``raise``: a non-finite weight increment (a model returning NaN or
            overflowing scores) or a NaN / ``+inf`` reward is an error after the run; ``drop``:
            such particles get zero weight (rewards: never best).

    Returns:
        :class:`Result`: weighted particles targeting ``p~_0`` (normalized ``log_weights``),
        ``log_evidence`` estimating ``log (Z_0 / Z_{t_0})``, ``cost.nfe = M K N``; ``info``: the
        per-step SMC diagnostics, ``extra``: ``log_evidence_increment [K]``, ``num_nan_weights
        [K]``, ``weight_shift [K]``, ``all_dead [K]``.

    Raises:
        ValueError: bad arguments (before tracing, :func:`check_params`); after the run, per
            ``nan_policy``, and when every particle has zero weight.
    """
    check_nan_policy(METHOD, nan_policy)
    params = make_params(target, grid, diffusion, schedule, reward, cond)
    if not isinstance(target, Target):
        raise ValueError(f"{METHOD}: target must be a Target, got {type(target).__name__}")
    shape = np.shape(params.grid)
    if len(shape) != 1 or shape[0] < 2:
        raise ValueError(f"{METHOD}: grid must be [K + 1] times with K >= 1, got shape {shape}")
    fkc = sampler(num_particles, shape[0] - 1, len(target.models), resampler)
    check_params(params, fkc)
    result = _run(key, fkc, params)
    if held_out:
        result = result._replace(
            info=result.info._replace(held_out=held_out_scores(held_out, result.samples, cond))
        )
    return check_result(result, reward, nan_policy)


def check_result(result: Result, reward: Reward | None, nan_policy: str) -> Result:
    """Host-side checks of a finished FKC run.

    Raises:
        ValueError: under ``nan_policy="raise"``, non-finite weight increments (naming the
            steps) or NaN / ``+inf`` rewards; whatever the policy, every particle with zero
            weight.
    """
    nan_weights, all_dead = to_host(result.info.extra["num_nan_weights"], result.all_dead)
    if nan_policy != "drop":
        steps = np.flatnonzero(nan_weights)
        if steps.size:
            raise ValueError(
                f"{METHOD}: non-finite log-weight increments (a model returned NaN or "
                f"overflowing scores) at {steps.size} of {nan_weights.size} steps, first at "
                f"step {steps[0] + 1} ({int(nan_weights[steps[0]])} particles there); pass "
                "nan_policy='drop' to give such particles zero weight"
            )
        if reward is not None:
            nan, inf = to_host(result.info.num_nan, result.info.num_inf)
            raise_for_invalid_rewards(METHOD, reward, int(nan), int(inf))
    if bool(all_dead):
        raise ValueError(
            f"{METHOD}: every particle has zero weight (non-finite increments dropped under "
            "nan_policy='drop')"
        )
    return result
