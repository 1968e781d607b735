"""The flow/diffusion model protocol every image sampler consumes (DESIGN.md "Protocols").

A :class:`FlowModel` is a pytree: its ``params`` are array leaves (so one compiled sampler serves
any weights and they are never closed over), while ``apply`` and ``interpolant`` are static.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
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
    """Run a linear-path (rectified-flow) model on the VP path (Kim et al. 2025, ALGORITHMS.md 0.3).

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
