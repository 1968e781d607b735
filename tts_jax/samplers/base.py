"""The shape every sampler takes: pure ``init`` / ``step`` / ``finalize`` kernels and one ``run``.

A method is a :class:`Sampler`, a NamedTuple of pure functions built by a factory from its
*static* configuration only (sizes, and functions such as a potential or a resampler), in the
blackjax / optax style::

    sampler = fk_steering.sampler(num_particles=64, num_steps=50, potential=potentials.max)
    params = fk_steering.make_params(model, reward, grid, diffusion, lam=2.0)
    fk_steering.check_params(params, sampler)   # host-side checks, before tracing
    result = jax.jit(run, static_argnames="sampler")(key, sampler, params)

Everything array-valued travels in ``params``, a pytree: the model's weights, the reward's,
``lam``, the time grid, the resampling schedule's mask and threshold, the diffusion
coefficient's numbers, the condition. Sweeping a number or swapping weights of the same shapes
therefore reuses the compiled program, and weights are arguments of that program, never
constants baked into it. Factories return the same :class:`Sampler` (equal and of equal hash)
for equal configurations, so ``jax.jit(run, static_argnames="sampler")`` compiles once per
configuration and shapes.

:func:`run` is pure and traceable: jit it, ``vmap`` it over keys
(``jax.vmap(run, in_axes=(0, None, None))``), or shard the particles it creates. It never reads
values on the host; argument checks are a separate host-side function of each method
(e.g. :func:`tts_jax.samplers.image.fk_steering.check_params`) that the convenience entry points
call first, and checks of the finished result (NaN rewards, every particle dead) come after.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax.smc import step_keys_for

Array = jax.Array
PyTree = Any


class Sampler(NamedTuple):
    """A sampling method as pure functions (hashable: pass it to ``jit`` as a static argument).

    Attributes:
        init: ``(key, params) -> state``: the state before the first step (e.g. the initial
            particles and their weights).
        step: ``(key, state, params) -> (state, info)``: one transition; ``info`` is a pytree of
            per-step diagnostics (stacked by :func:`run` along a leading step axis).
        finalize: ``(state, infos, params) -> result``: the result (e.g. a
            :class:`~tts_jax.samplers.result.Result`) from the last state and the stacked
            ``infos``.
        num_steps: number of transitions ``K`` (static).
        last_step: optional ``(key, state, params) -> (state, info)`` that replaces ``step`` for
            the final transition, when it differs (a flow sampler's step landing at the data end
            needs no velocity: its Tweedie estimate is the sample itself). :func:`run` then
            scans ``K - 1`` steps and traces the last one apart, so ``step`` needs no
            ``lax.cond`` on the step index. Its ``info`` must have the structure of ``step``'s.
        keys_per_step: how many PRNG keys a step consumes. Step ``k`` of :func:`run` receives
            ``fold_in(key_run, k)`` when 1, else ``jax.random.split(fold_in(key_run, k),
            keys_per_step)`` (``Key[keys_per_step]``), derived for every step in one batch
            before the loop: on CPU each threefry hash inside a loop body costs a small loop of
            its own. SMC kernels use 2 (the proposal's and the resampler's keys, which
            :func:`tts_jax.smc.step` accepts already split).
        done: optional ``(state, params) -> bool`` scalar: early stopping. When set,
            :func:`run` is a ``lax.while_loop`` bounded by ``num_steps`` that stops before the
            first step whose state is ``done`` (e.g. language-model particles that have all
            emitted their stop token): the state is updated in place, never copied by a
            ``lax.cond``. ``infos`` is then a fixed-size ``[num_steps, ...]`` buffer whose rows
            of steps not run are zeros; ``finalize`` tells them apart from its state (e.g.
            :attr:`tts_jax.smc.SMCState.step` counts the steps taken). Incompatible with
            ``last_step``.
    """

    init: Callable[[Array, PyTree], PyTree]
    step: Callable[[Array, PyTree, PyTree], tuple[PyTree, PyTree]]
    finalize: Callable[[PyTree, PyTree, PyTree], Any]
    num_steps: int
    last_step: Callable[[Array, PyTree, PyTree], tuple[PyTree, PyTree]] | None = None
    keys_per_step: int = 1
    done: Callable[[PyTree, PyTree], Array] | None = None


def run(key: Array, sampler: Sampler, params: PyTree) -> Any:
    """Run ``sampler`` for its ``num_steps`` steps: ``init``, a ``lax.scan`` of ``step``, then
    ``finalize`` (a bounded ``lax.while_loop`` instead of the scan when the sampler has a
    :attr:`Sampler.done` test: it stops early).

    The key is split once into the ``init`` key and the run key; step ``k`` uses
    ``jax.random.fold_in(run_key, k)`` (see :attr:`Sampler.keys_per_step`). Un-jitted and pure:
    ``jax.jit(run, static_argnames="sampler")`` compiles it once per sampler and shapes of
    ``params``; ``jax.vmap(run, in_axes=(0, None, None))`` runs independent copies over a batch
    of keys. No host-side checks happen here (see the method's ``check_params``).

    Args:
        key: PRNG key.
        sampler: :class:`Sampler` (static).
        params: the method's pytree of arrays (models, rewards, hyper-parameters).

    Returns:
        ``sampler.finalize(state, infos, params)``, with ``infos`` the per-step diagnostics
        stacked along a leading axis of length ``num_steps`` (zeros for steps not run when the
        sampler stopped early).
    """
    k_init, k_run = jax.random.split(key)
    keys = step_keys_for(k_run, sampler.num_steps)
    if sampler.keys_per_step > 1:
        keys = jax.vmap(lambda k: jax.random.split(k, sampler.keys_per_step))(keys)
    return run_with_keys(k_init, keys, sampler, params)


def run_with_keys(init_key: Array, step_keys: Array, sampler: Sampler, params: PyTree) -> Any:
    """:func:`tts_jax.samplers.base.run` with every key given: ``init`` gets ``init_key`` and
    step ``k`` gets ``step_keys[k]``.

    ``run(key, sampler, params)`` is this with ``init_key, run_key = jax.random.split(key)`` and
    ``step_keys = [fold_in(run_key, k) for k < K]`` (each split into ``keys_per_step`` keys
    when that is above 1). The convenience entry points of the searches use it to keep the key
    layout they had before they were kernels, so their results stay bit-identical. Pure and
    traceable like ``run`` (jit it with ``static_argnames="sampler"``).

    Args:
        init_key: PRNG key of ``sampler.init``.
        step_keys: ``Key[K]`` (``Key[K, keys_per_step]`` when that is above 1), one per step.
        sampler: :class:`~tts_jax.samplers.base.Sampler` (static).
        params: the method's pytree of arrays.
    """
    state = sampler.init(init_key, params)

    def body(state, step_key, step=sampler.step):
        return step(step_key, state, params)

    if sampler.done is not None:
        if sampler.last_step is not None:
            raise ValueError("a Sampler with a done test cannot have a last_step")
        state, infos = _run_until_done(state, step_keys, sampler, params)
    elif sampler.last_step is None:
        state, infos = jax.lax.scan(body, state, step_keys)
    else:
        state, infos = jax.lax.scan(body, state, step_keys[:-1])
        state, last = body(state, step_keys[-1], sampler.last_step)
        infos = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), infos, last)
    return sampler.finalize(state, infos, params)


def _run_until_done(state, step_keys, sampler, params):
    """``(state, infos)`` of at most ``num_steps`` steps, stopping before the first step whose
    state is ``sampler.done``: one ``lax.while_loop`` (state updated in place), each step's
    info written at its row of a zero-filled ``[num_steps, ...]`` buffer (as
    :func:`tts_jax.smc.run_until` records its diagnostics)."""
    num_steps = step_keys.shape[0]
    info_shape = jax.eval_shape(lambda s, k: sampler.step(k, s, params)[1], state, step_keys[0])
    infos = jax.tree.map(lambda a: jnp.zeros((num_steps, *a.shape), a.dtype), info_shape)

    def running(carry):
        i, s, _ = carry
        return (i < num_steps) & ~sampler.done(s, params)

    def body(carry):
        i, s, buf = carry
        s, info = sampler.step(step_keys[i], s, params)
        buf = jax.tree.map(lambda a, b: a.at[i].set(b), buf, info)
        return i + 1, s, buf

    _, state, infos = jax.lax.while_loop(running, body, (jnp.int32(0), state, infos))
    return state, infos


def float32(x: Any) -> Any:
    """``x`` as a float32 array for a params pytree: NumPy for host values (no device op when
    the params are built), ``jnp`` for JAX arrays (traced values included)."""
    if isinstance(x, jax.Array):  # no dispatch (~15 us on CPU) when it is float32 already
        return x if x.dtype == jnp.float32 else x.astype(jnp.float32)
    return np.asarray(x, np.float32)
