"""The model protocols the samplers consume (docs/design.md "Protocols").

A :class:`FlowModel` (image samplers) and a :class:`LanguageModel` (LM samplers) are pytrees:
their ``params`` are array leaves (so one compiled sampler serves any weights and they are never
closed over), while their functions and sizes are static fields. The samplers depend only on
these protocols, never on a concrete network.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from tts_jax.interpolants import VP, Interpolant, Linear, LinearToVP

Array = jax.Array
PyTree = Any
# apply(params, x [N, ...], t [N], cond [N, ...] | None) -> velocity [N, ...]
ApplyFn = Callable[[PyTree, Array, Array, Any], Array]


@struct.dataclass
class FlowModel:
    """A batched velocity model on a known interpolant.

    Attributes:
        params: pytree of weights (dynamic).
        apply: ``(params, x [N, ...], t [N], cond) -> u [N, ...]``, the velocity on the path;
            a module-level function (hashed by identity as a static field).
        interpolant: the path the velocity refers to (t = 1 noise, t = 0 data).
        sample_shape: per-particle shape of ``x`` (without the particle axis).
    """

    params: PyTree
    apply: ApplyFn = struct.field(pytree_node=False)
    interpolant: Interpolant = struct.field(pytree_node=False)
    sample_shape: tuple[int, ...] = struct.field(pytree_node=False)

    def velocity(self, x: Array, t: Array, cond: Any = None) -> Array:
        """``u(x, t)`` for ``x [N, ...]`` and a scalar or ``[N]`` time."""
        t = jax.numpy.broadcast_to(jax.numpy.asarray(t, x.dtype), x.shape[:1])
        return self.apply(self.params, x, t, cond)


@dataclasses.dataclass(frozen=True)
class _VPConvertedApply:
    """Static, hashable apply of a linear-path model run on the VP path (stable jit cache key)."""

    inner: ApplyFn
    conversion: LinearToVP

    def __call__(self, params, x, t, cond):
        return self.conversion.velocity(lambda xl, tl: self.inner(params, xl, tl, cond), x, t)


def linear_to_vp(model: FlowModel, vp: VP = VP()) -> FlowModel:
    """Run a linear-path (rectified-flow) model on the VP path (Kim et al. 2025,
    docs/algorithms.md 0.3).

    The returned model's state ``xbar`` at VP time ``r`` is ``c(r) x`` of the linear model at
    ``t(r)``; its velocity is ``ubar = (c_dot / c) xbar + c t_dot u(xbar / c, t(r))`` and its score,
    Tweedie estimate and SDE all use the VP coefficients. Sampling starts from ``xbar ~ N(0, I)``.
    """
    if not isinstance(model.interpolant, Linear):
        raise ValueError(
            f"linear_to_vp needs a model on the Linear path, got {type(model.interpolant).__name__}"
        )
    apply = _VPConvertedApply(model.apply, LinearToVP(vp))
    return FlowModel(model.params, apply, vp, model.sample_shape)


# --------------------------------------------------------------------------------------------
# Language models
# --------------------------------------------------------------------------------------------
# init_cache(params, batch, max_len, dtype) -> cache (a pytree, batch axis first on every leaf)
InitCacheFn = Callable[[PyTree, int, int, Any], PyTree]
# prefill(params, tokens int32[B, P], cache, lengths int32[B]) -> (logits float32[B, V], cache)
PrefillFn = Callable[[PyTree, Array, PyTree, Array], tuple[Array, PyTree]]
# decode(params, token int32[B], cache, feed bool[B]) -> (logits float32[B, V], cache)
DecodeFn = Callable[[PyTree, Array, PyTree, Array], tuple[Array, PyTree]]


@struct.dataclass
class LanguageModel:
    """An autoregressive model over a vocabulary of ``V`` tokens with a per-row cache.

    A row is one sequence (a particle). The cache is whatever the model needs to continue a row
    (a transformer's key/value buffers, an n-gram model's last tokens); it is any pytree whose
    leaves all have the row axis first, so the samplers resample it with one
    :func:`tts_jax.particles.gather` (``jax.tree.map(lambda x: x[ancestors], cache)``) together
    with the rest of the particle state. Every function is pure and traceable.

    Attributes:
        params: pytree of weights (dynamic; e.g. a Flax NNX module).
        init_cache_fn: ``(params, batch, max_len, dtype) -> cache``: ``batch`` empty rows with
            room for ``max_len`` tokens each (``dtype``: of cached activations; models without
            floating state ignore it).
        prefill_fn: ``(params, tokens int32[B, P], cache, lengths int32[B]) -> (logits
            float32[B, V], cache)``: append ``tokens[i, :lengths[i]]`` (right-padded,
            ``lengths >= 1``) to row ``i`` and return the next-token logits after its last real
            token.
        decode_fn: ``(params, token int32[B], cache, feed bool[B]) -> (logits float32[B, V],
            cache)``: append one token to every row in ``feed`` and return its next-token
            logits; rows not in ``feed`` keep their cache unchanged (their logits are
            meaningless).
        vocab_size: ``V``.

    All three functions are module-level functions (static fields, hashed by identity: a
    compiled sampler is reused for any ``params`` of the same model type).
    """

    params: PyTree
    init_cache_fn: InitCacheFn = struct.field(pytree_node=False)
    prefill_fn: PrefillFn = struct.field(pytree_node=False)
    decode_fn: DecodeFn = struct.field(pytree_node=False)
    vocab_size: int = struct.field(pytree_node=False)

    def init_cache(self, batch: int, max_len: int, dtype: Any = jnp.float32) -> PyTree:
        """An empty cache of ``batch`` rows with room for ``max_len`` tokens each."""
        return self.init_cache_fn(self.params, batch, max_len, dtype)

    def prefill(self, tokens: Array, cache: PyTree, lengths: Array) -> tuple[Array, PyTree]:
        """``(logits float32[B, V], cache)`` after appending right-padded ``tokens [B, P]``
        (``lengths int32[B]`` real tokens per row)."""
        return self.prefill_fn(self.params, tokens, cache, lengths)

    def decode(self, token: Array, cache: PyTree, feed: Array) -> tuple[Array, PyTree]:
        """``(logits float32[B, V], cache)`` after appending ``token [B]`` to the rows in
        ``feed [B]`` (the other rows are untouched)."""
        return self.decode_fn(self.params, token, cache, feed)


@functools.singledispatch
def as_language_model(model: Any) -> LanguageModel:
    """``model`` as a :class:`LanguageModel` (the LM samplers call this on their ``model``).

    A :class:`LanguageModel` is returned as it is; a concrete network type registers its adapter
    with ``as_language_model.register(ModelType, adapter)`` (the Flax NNX transformer
    :class:`tts_jax.models.lm.LM` does). Pure Python, so it runs at trace time inside ``jit``.

    Raises:
        TypeError: no adapter is registered for ``type(model)``.
    """
    raise TypeError(
        f"{type(model).__name__} is not a LanguageModel and no adapter is registered for it "
        "(wrap it in tts_jax.models.base.LanguageModel, or register one with "
        "as_language_model.register)"
    )


@as_language_model.register(LanguageModel)
def _(model: LanguageModel) -> LanguageModel:
    return model
