"""The flow/diffusion model protocol every image sampler consumes (DESIGN.md "Protocols").

A :class:`FlowModel` is a pytree: its ``params`` are array leaves (so one compiled sampler serves
any weights and they are never closed over), while ``apply`` and ``interpolant`` are static.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import struct

from tts_jax.interpolants import Interpolant

Array = jax.Array
PyTree = Any
# apply(params, x [N, ...], t [N], cond [N, ...] | None) -> velocity [N, ...]
ApplyFn = Callable[[PyTree, Array, Array, Any], Array]


@struct.dataclass
class FlowModel:
    """A batched velocity model on a known interpolant.

    Attributes:
        params: pytree of weights (dynamic).
        apply: ``(params, x [N, ...], t [N], cond) -> u [N, ...]`` velocity on ``interpolant``'s path;
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
