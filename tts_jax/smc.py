"""The Feynman-Kac SMC engine every particle sampler shares (docs/algorithms.md 0.5).

For ``k = 0 .. K-1``:

1. propagate ``x_k -> x_{k+1}`` with the caller's proposal, which may add a log-weight correction
   (``log p/q`` when the proposal is not the model),
2. reweight ``lw += log G_{k+1}(x_{k+1}) - log G_k(x_k) + correction``,
3. resample when the schedule allows it at this step and ``ESS < threshold * N``.

Weights are kept normalized; the log-evidence estimate ``log Z_hat`` is the sum of the log mean
weight increments, so it stays unbiased in ``Z`` across resampling. The final potential
must be exactly the target tilt (e.g. ``lambda * r(x0)``) for the particles to target
``p(x0) exp(lambda r(x0)) / Z``.

Two levels of API:

* :func:`init` / :func:`step` are pure, un-jitted functions over :class:`SMCState` that samplers
  compose inside their own jitted programs (optax / blackjax style): the kernels of
  :mod:`tts_jax.samplers` (e.g. :func:`tts_jax.samplers.image.fk_steering.sampler`) are built on
  them, and :func:`run_scan` / :func:`run_until` loop over :func:`step`;
* :func:`run` jits the whole loop once (``lax.scan`` over steps), returns per-step
  :class:`SMCInfo` as scan outputs, and performs the host-side checks (NaN potentials).

Keys: step ``k`` of a loop started from ``key`` uses ``jax.random.fold_in(key, k)``, split
into the proposal's and the resampler's keys; :func:`step_keys` derives every step's pair in one
batch before the loop and :func:`step` accepts the pair as is.

Resamplers are values: any ``(key, log_weights [N], num) -> Int32[num]`` function (see
:mod:`tts_jax.resampling`; its names stay accepted as aliases).

Numeric hyper-parameters live in ``params`` (any pytree passed to ``propagate`` and
``log_potential``) and in the :class:`ResampleSchedule` arrays, so sweeping them never recompiles.

Shapes are checked when the loop is traced: ``log_potential`` must return ``[N]`` and
``propagate`` must keep ``N`` particles (its correction ``[N]`` or a scalar); a mismatch is a
``ValueError`` naming the expected ``[N]`` and the shape received, not a broadcasting error
deep inside the loop.

Reference: Chopin & Papaspiliopoulos (2020), "An Introduction to Sequential Monte Carlo", ch. 10.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax.particles import Particles, ess, gather, make_particles, num_particles
from tts_jax.resampling import Resampler, get_resampler

Array = jax.Array
PyTree = Any
# propagate(key, state, step, params) -> (new_state, log_weight_correction [N])
Propagate = Callable[[Array, PyTree, Array, PyTree], tuple[PyTree, Array]]
# log_potential(state, step, params) -> [N]
LogPotential = Callable[[PyTree, Array, PyTree], Array]


class ResampleSchedule(NamedTuple):
    """When resampling may happen: at step ``k`` if ``mask[k]`` and ``ESS < ess_threshold * N``.

    Both fields are arrays (the constructors below build them host-side in numpy: no device op
    per call), so changing the schedule or the threshold never recompiles.
    A threshold above 1 resamples at every masked step regardless of the ESS.

    Attributes:
        mask: ``Bool[K]``, one entry per propagation step (after the step's reweighting).
        ess_threshold: scalar.
    """

    mask: Array
    ess_threshold: Array


def adaptive(
    num_steps: int, threshold: float = 0.5, resample_last: bool = False
) -> ResampleSchedule:
    """Resample whenever ``ESS < threshold * N`` (optionally never after the final step)."""
    mask = np.ones(num_steps, bool)
    mask[-1] = resample_last
    return ResampleSchedule(mask, np.float32(threshold))


def at_steps(num_steps: int, steps: Sequence[int]) -> ResampleSchedule:
    """Resample unconditionally after each listed step index (0-based propagation steps)."""
    mask = np.zeros(num_steps, bool)
    for s in steps:
        if not 0 <= s < num_steps:
            raise ValueError(f"resampling step {s} is outside 0..{num_steps - 1}")
        mask[s] = True
    return ResampleSchedule(mask, np.float32(2.0))


def every(
    num_steps: int, interval: int, start: int = 0, end: int | None = None, include_last: bool = True
) -> ResampleSchedule:
    """Resample every ``interval`` steps in ``[start, end)``, plus the last step if asked."""
    if interval < 1:
        raise ValueError(f"resampling interval must be >= 1, got {interval}")
    end = num_steps if end is None else end
    steps = set(range(start + interval - 1, end, interval))
    if include_last:
        steps.add(num_steps - 1)
    return at_steps(num_steps, sorted(steps))


def never(num_steps: int) -> ResampleSchedule:
    """No resampling: sequential importance sampling."""
    return ResampleSchedule(np.zeros(num_steps, bool), np.float32(0.0))


class SMCState(NamedTuple):
    """Carry of the SMC loop.

    Attributes:
        particles: :class:`Particles` with normalized log-weights ``[N]``.
        log_potential: ``[N]`` the current potential ``log G_k(x_k)`` (divided out next step).
        log_evidence: scalar running ``log Z_hat``.
        step: int32 scalar, number of propagation steps taken.
    """

    particles: Particles
    log_potential: Array
    log_evidence: Array
    step: Array


class SMCInfo(NamedTuple):
    """Per-step diagnostics (scan outputs, leading axis K in :class:`SMCResult`).

    Attributes:
        ess: ESS after reweighting, before resampling.
        resampled: whether this step resampled.
        ancestors: ``Int[N]`` ancestor of each particle (identity when not resampled).
        unique_ancestors: number of distinct ancestors.
        log_evidence_increment: ``log sum_i W_i G_i`` of this step.
        num_nan_potentials: potentials that were NaN and were dropped (weight -> 0).
        all_dead: every weight is zero after this step.
        observed: what the caller's ``observe(state)`` returned for the propagated particles
            (before resampling), or ``None`` (see :func:`run_scan`).
    """

    ess: Array
    resampled: Array
    ancestors: Array
    unique_ancestors: Array
    log_evidence_increment: Array
    num_nan_potentials: Array
    all_dead: Array
    observed: PyTree = None


class SMCResult(NamedTuple):
    """Output of :func:`run`.

    Attributes:
        particles: final weighted particles (normalized log-weights).
        log_evidence: scalar ``log Z_hat`` (``-inf`` when every particle died).
        info: :class:`SMCInfo` with a leading step axis ``K``.
        all_dead: True when every particle had zero weight at the end.
        num_nan_initial: NaN potentials of the initial particles (dropped).
    """

    particles: Particles
    log_evidence: Array
    info: SMCInfo
    all_dead: Array
    num_nan_initial: Array


def _check_shape(value: Array, n: int, what: str, allow_scalar: bool = False) -> None:
    """Trace-time check (shapes are static) that a callback returned one value per particle."""
    shape = np.shape(value)
    if shape != (n,) and not (allow_scalar and shape == ()):
        also = " (or a scalar)" if allow_scalar else ""
        raise ValueError(
            f"{what} must have shape [N] = ({n},){also}, one entry per particle; got shape {shape}"
        )


def _potential(log_potential: LogPotential, state: PyTree, k, params, n: int) -> Array:
    """``log_potential(state, k, params)``, its shape checked against ``[N]``."""
    lp = log_potential(state, k, params)
    _check_shape(lp, n, "log_potential(state, step, params)")
    return lp


def _drop_nan(log_potential: Array) -> tuple[Array, Array]:
    nan = jnp.isnan(log_potential)
    return jnp.where(nan, -jnp.inf, log_potential), jnp.sum(nan).astype(jnp.int32)


def _reweight(log_weights: Array, increment: Array) -> tuple[Array, Array, Array]:
    """Add ``increment`` to normalized ``log_weights``.

    Returns:
        ``(normalized log-weights, log mass, ESS)``: one max and one pass of exponentials give
        both the ``logsumexp`` and the ESS (:func:`tts_jax.particles.ess` of the result, up to
        rounding).
    """
    new = jnp.where(jnp.isneginf(log_weights), -jnp.inf, log_weights + increment)
    new = jnp.where(jnp.isnan(new), -jnp.inf, new)
    top = jnp.max(new)
    shift = jnp.where(jnp.isfinite(top), top, 0.0)  # as in jax.scipy.special.logsumexp
    w = jnp.exp(new - shift)
    total = jnp.sum(w)
    mass = jnp.log(total) + shift
    alive = jnp.isfinite(mass)
    ess_now = jnp.where(alive, total**2 / jnp.sum(w**2), 0.0)
    return jnp.where(alive, new - mass, new), mass, ess_now


def init(state: PyTree, log_potential: LogPotential, params: PyTree = None) -> SMCState:
    """Start the loop: equal weights times the initial potential ``G_0(x_0)``.

    Args:
        state: pytree of ``[N, ...]`` leaves (the particles at step 0).
        log_potential: ``(state, step, params) -> [N]``.
        params: numeric hyper-parameters passed through to the callbacks.

    Raises:
        ValueError: leaves with different particle axes, or a log-potential whose shape is not
            ``[N]`` (checked at trace time: shapes are static).
    """
    return _init(state, log_potential, params)[0]


def _init(state, log_potential, params) -> tuple[SMCState, Array]:
    n = num_particles(state)
    lp0, num_nan = _drop_nan(_potential(log_potential, state, jnp.int32(0), params, n))
    lw, mass, _ = _reweight(jnp.full((n,), -jnp.log(n), jnp.float32), lp0)
    return SMCState(make_particles(state, lw), lp0, mass, jnp.int32(0)), num_nan


def step(
    key: Array,
    smc_state: SMCState,
    propagate: Propagate,
    log_potential: LogPotential,
    schedule: ResampleSchedule,
    params: PyTree = None,
    resampler: str | Resampler = "systematic",
    observe: Callable[[PyTree], PyTree] | None = None,
) -> tuple[SMCState, SMCInfo]:
    """One propagate / reweight / maybe-resample step (docs/algorithms.md 0.5).

    Pure and traceable: call it inside your own ``jit`` / ``lax.scan`` (``run_scan``,
    ``run_until`` and the samplers of :mod:`tts_jax.samplers` do).

    Args:
        key: PRNG key of this step, split here into the proposal's key and the resampler's
            (``jax.random.split(key)``); or that pair already split (``Key[2]``, as
            :func:`step_keys` derives for every step in one batch before a loop, which saves a
            hash inside the loop body).
        smc_state: current :class:`SMCState` (``N`` particles).
        propagate: ``(key, state, step, params) -> (state, log_correction [N])``; ``step`` is the
            index ``k`` of the transition ``x_k -> x_{k+1}``. The correction may be a scalar
            (the same for every particle).
        log_potential: ``(state, step, params) -> [N]``, called with ``step = k + 1``.
        schedule: :class:`ResampleSchedule` indexed by ``k``.
        params: numeric hyper-parameters (array leaves; never static).
        resampler: any ``(key, log_weights [N], num) -> Int32[num]`` ancestor function, or the
            name of one in :mod:`tts_jax.resampling`.
        observe: optional ``state -> pytree`` diagnostic of the propagated particles (before
            resampling), returned in ``info.observed``.

    Returns:
        ``(new SMCState, SMCInfo of this step)``.

    Raises:
        ValueError: at trace time, when ``log_potential`` does not return shape ``[N]``, the
            correction is neither ``[N]`` nor a scalar, or ``propagate`` changes ``N``.
    """
    k_prop, k_res = _proposal_and_resampling_keys(key)
    return _step(
        k_prop, k_res, smc_state, propagate, log_potential, schedule, params, resampler, observe
    )


def _proposal_and_resampling_keys(key: Array) -> tuple[Array, Array]:
    """``jax.random.split(key)`` unpacked, or ``key`` unpacked when it is that pair already
    (typed keys: ``Key[2]``; raw ``uint32`` keys: ``[2, 2]``)."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    keys = key if key.ndim == (1 if typed else 2) else jax.random.split(key)
    return keys[0], keys[1]


def _step(
    k_prop, k_res, smc_state, propagate, log_potential, schedule, params, resampler, observe=None
):
    """:func:`step` with its key already split (so a scan can split every key up front)."""
    resample_fn = get_resampler(resampler)
    particles = smc_state.particles
    n = particles.log_weights.shape[0]
    k = smc_state.step

    new_state, correction = propagate(k_prop, particles.state, k, params)
    if num_particles(new_state) != n:
        raise ValueError(
            f"propagate returned a state with {num_particles(new_state)} particles, expected "
            f"N = {n}"
        )
    _check_shape(correction, n, "propagate's log-weight correction", allow_scalar=True)
    observed = None if observe is None else observe(new_state)
    lp_new, num_nan = _drop_nan(_potential(log_potential, new_state, k + 1, params, n))
    old = smc_state.log_potential
    ratio = jnp.where(
        jnp.isneginf(lp_new), -jnp.inf, lp_new - jnp.where(jnp.isfinite(old), old, 0.0)
    )
    lw, mass, ess_now = _reweight(particles.log_weights, ratio + correction)
    alive = jnp.isfinite(mass)
    # jnp: the schedule may be host (NumPy) values closed over by the loop body.
    mask = jnp.asarray(schedule.mask)
    do_resample = mask[k] & (ess_now < schedule.ess_threshold * n) & alive

    # The gather (and the count of distinct ancestors) runs only in the resampling branch: no
    # copy of the state on other steps.
    def resample(carry):
        anc = resample_fn(k_res, lw, n).astype(jnp.int32)
        unique = jnp.sum(jnp.zeros((n,), jnp.int32).at[anc].set(1))
        return anc, unique, jnp.full((n,), -jnp.log(n), lw.dtype), gather(carry, anc)

    def keep(carry):
        return jnp.arange(n, dtype=jnp.int32), jnp.int32(n), lw, carry

    ancestors, unique, lw_out, (new_state, lp_new) = jax.lax.cond(
        do_resample, resample, keep, (new_state, lp_new)
    )
    out = SMCState(
        make_particles(new_state, lw_out),
        lp_new,
        smc_state.log_evidence + mass,
        k + 1,
    )
    info = SMCInfo(ess_now, do_resample, ancestors, unique, mass, num_nan, ~alive, observed)
    return out, info


def step_keys_for(key: Array, num_steps: int) -> Array:
    """``[fold_in(key, k) for k < num_steps]`` as one batched hash (the same keys)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(num_steps))


def step_keys(key: Array, num_steps: int) -> Array:
    """Every step's ``(propagate, resample)`` key pair, ``Key[num_steps, 2]``: step ``k`` gets
    ``jax.random.split(jax.random.fold_in(key, k))``, what :func:`step` would split from
    ``fold_in(key, k)`` itself, hashed in one batch before the loop: on CPU each threefry call
    inside a loop body is a small while loop of its own (benchmarks/overhead_profile.py)."""
    return jax.vmap(jax.random.split)(step_keys_for(key, num_steps))


def _start(key, state, log_potential, schedule, params):
    """Initial SMC state, its NaN count, and every step's key pair ``[K, 2]``."""
    smc_state, num_nan_initial = _init(state, log_potential, params)
    return smc_state, num_nan_initial, step_keys(key, schedule.mask.shape[0])


def run_scan(
    key: Array,
    state: PyTree,
    propagate: Propagate,
    log_potential: LogPotential,
    schedule: ResampleSchedule,
    params: PyTree = None,
    resampler: str | Resampler = "systematic",
    propagate_last: Propagate | None = None,
    observe: Callable[[PyTree], PyTree] | None = None,
) -> SMCResult:
    """The whole loop as one ``lax.scan`` (un-jitted: call it inside your own jitted program).

    The number of steps is the length of ``schedule.mask``. Step ``k`` uses
    ``jax.random.fold_in(key, k)``.

    Args:
        propagate_last: optional proposal for the final step only. The scan then runs the first
            ``K - 1`` steps and the last one is traced separately, so ``propagate`` never needs a
            ``lax.cond`` on ``k == K - 1`` (e.g. to skip a model call whose output only later
            steps use).
        observe: optional ``state -> pytree`` per-step diagnostic of the propagated particles
            (before resampling, e.g. their best reward), stacked in ``info.observed`` with a
            leading step axis ``K``.
    """
    smc_state, num_nan_initial, keys = _start(key, state, log_potential, schedule, params)

    def body(carry, pair, propagate=propagate):
        return step(pair, carry, propagate, log_potential, schedule, params, resampler, observe)

    if propagate_last is None:
        final, info = jax.lax.scan(body, smc_state, keys)
    else:
        final, info = jax.lax.scan(body, smc_state, keys[:-1])
        final, last = body(final, keys[-1], propagate_last)
        info = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), info, last)
    all_dead = ~jnp.isfinite(final.log_evidence)
    return SMCResult(final.particles, final.log_evidence, info, all_dead, num_nan_initial)


def run_until(
    key: Array,
    state: PyTree,
    propagate: Propagate,
    log_potential: LogPotential,
    schedule: ResampleSchedule,
    params: PyTree = None,
    resampler: str | Resampler = "systematic",
    *,
    finished: Callable[[PyTree, PyTree], Array],
) -> SMCResult:
    """:func:`run_scan` that stops as soon as ``finished(state, params)`` (a bool scalar) holds.

    For proposals that become idle, e.g. language-model particles that have all emitted their
    stop token: rather than a ``lax.cond`` that skips idle steps (a conditional's output is a
    new buffer, so a large state such as a KV cache would be copied on every step), the loop is
    one ``lax.while_loop`` whose state is updated in place and which ends at the first finished
    state. Steps that are not run are recorded as the no-ops they would have been: ``ess`` of
    the final weights, no resampling, identity ancestors, zero evidence increment. Same keys
    per step as :func:`run_scan` (un-jitted: call it inside your own jitted program).
    """
    smc_state, num_nan_initial, keys = _start(key, state, log_potential, schedule, params)
    num_steps = schedule.mask.shape[0]
    n = smc_state.particles.log_weights.shape[0]
    skipped = SMCInfo(
        ess=jnp.zeros((num_steps,), jnp.float32),
        resampled=jnp.zeros((num_steps,), bool),
        ancestors=jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (num_steps, n)),
        unique_ancestors=jnp.full((num_steps,), n, jnp.int32),
        log_evidence_increment=jnp.zeros((num_steps,), jnp.float32),
        num_nan_potentials=jnp.zeros((num_steps,), jnp.int32),
        all_dead=jnp.zeros((num_steps,), bool),
    )

    def running(carry):
        s, _ = carry
        return (s.step < num_steps) & ~finished(s.particles.state, params)

    def body(carry):
        s, info = carry
        new, step_info = step(
            keys[s.step], s, propagate, log_potential, schedule, params, resampler
        )
        info = jax.tree.map(lambda a, b: a.at[s.step].set(b), info, step_info)
        return new, info

    final, info = jax.lax.while_loop(running, body, (smc_state, skipped))
    all_dead = ~jnp.isfinite(final.log_evidence)
    not_run = jnp.arange(num_steps) >= final.step
    info = info._replace(
        ess=jnp.where(not_run, ess(final.particles.log_weights), info.ess),
        all_dead=jnp.where(not_run, all_dead, info.all_dead),
    )
    return SMCResult(final.particles, final.log_evidence, info, all_dead, num_nan_initial)


@functools.partial(jax.jit, static_argnames=("propagate", "log_potential", "resampler"))
def _run_jit(key, state, propagate, log_potential, schedule, params, resampler):
    return run_scan(key, state, propagate, log_potential, schedule, params, resampler)


def run(
    key: Array,
    state: PyTree,
    propagate: Propagate,
    log_potential: LogPotential,
    schedule: ResampleSchedule,
    params: PyTree = None,
    resampler: str | Resampler = "systematic",
    nan_policy: str = "raise",
) -> SMCResult:
    """Jit and run the SMC loop, then check the result on the host.

    ``propagate`` and ``log_potential`` are static (hashed by identity: define them once, at module
    level or cached); every numeric hyper-parameter must travel in ``params`` or ``schedule`` so a
    sweep compiles once.

    Args:
        key: PRNG key.
        state: initial particle pytree ``[N, ...]``.
        propagate: ``(key, state, step, params) -> (state, log_correction [N])``.
        log_potential: ``(state, step, params) -> [N]``.
        schedule: :class:`ResampleSchedule` (its length is the number of steps).
        params: numeric hyper-parameters.
        resampler: an ancestor function ``(key, log_weights [N], num) -> Int32[num]`` or the name
            of one in :mod:`tts_jax.resampling` (``multinomial`` | ``stratified`` |
            ``systematic`` | ``residual``).
        nan_policy: ``raise`` (NaN potentials are an error naming the steps) or ``drop``
            (documented fallback: a particle with a NaN potential gets weight zero).

    Returns:
        :class:`SMCResult`. If every particle died, ``all_dead`` is True and ``log_evidence`` is
        ``-inf``; the particles keep their last states and all-``-inf`` log-weights.

    Raises:
        ValueError: before the run, for an unknown ``nan_policy``, a bad state or schedule, a
            non-finite ESS threshold, or callbacks returning the wrong shapes
            (``log_potential`` must return ``[N]``); after it, for NaN potentials under
            ``nan_policy="raise"``.
    """
    if nan_policy not in ("raise", "drop"):
        raise ValueError(f"nan_policy must be 'raise' or 'drop', got {nan_policy!r}")
    num_particles(state)
    if schedule.mask.ndim != 1 or schedule.mask.shape[0] < 1:
        raise ValueError(
            f"schedule.mask must be Bool[K] with K >= 1, got shape {schedule.mask.shape}"
        )
    threshold = schedule.ess_threshold
    if not isinstance(threshold, jax.core.Tracer) and not np.isfinite(np.asarray(threshold)).all():
        raise ValueError(
            f"schedule.ess_threshold must be finite (0: never resample, above 1: always), "
            f"got {threshold}"
        )
    result = _run_jit(key, state, propagate, log_potential, schedule, params, resampler)
    if nan_policy == "raise":
        nan_steps = np.flatnonzero(np.asarray(result.info.num_nan_potentials)) + 1
        if int(result.num_nan_initial):
            nan_steps = np.concatenate([[0], nan_steps])
        if nan_steps.size:
            raise ValueError(
                f"log_potential returned NaN at steps {nan_steps.tolist()} "
                "(pass nan_policy='drop' to give such particles zero weight instead)"
            )
    return result
