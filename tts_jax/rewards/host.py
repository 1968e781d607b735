"""The host boundary: any Python / NumPy / torch reward as a :class:`Reward` usable inside jit.

``host_reward(f)`` wraps ``f(np.ndarray [N, ...]) -> np.ndarray [N]`` with
:func:`jax.pure_callback`, so samplers can call it from their jitted loop
(docs/design.md "Protocols": rewards that need Python or another framework go through one
explicit host boundary).

Cost: every call is a device -> host copy of ``x``, a Python call holding the GIL, and a host ->
device copy of the rewards; it is a barrier XLA cannot fuse or reorder across, and on an
accelerator it serializes the step. Call it once per reward evaluation on the whole batch (which
the sampler protocol already does), keep ``f`` vectorized, and prefer an in-graph JAX reward when
one exists. The callback is opaque to autodiff: no gradients (fine for search and SMC, not for
gradient guidance).

Batching: ``vmap_method="expand_dims"``. Under :func:`jax.vmap` the callback receives the stacked
batch ``[B, N, ...]``; the wrapper flattens it to ``[B * N, ...]`` and makes *one* host call, so
``f`` must score candidates independently (per row), as the reward protocol requires.

``f`` must be a pure function of its input (:func:`jax.pure_callback` may cache, skip or repeat
calls). NaN handling: if ``f`` returns NaN, or a result of the wrong shape, the callback raises a
``ValueError`` naming the reward; the error surfaces from the jitted computation (a NaN is never
passed silently into the sampler's weights). Return ``-inf`` for candidates that should be
discarded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax.rewards.base import Reward

Array = jax.Array
HostFn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class _HostApply:
    """Static apply of a host reward (hashable by ``fn``'s identity: equal wrappers share a
    compilation)."""

    fn: HostFn
    name: str

    def _host_call(self, call_ndim: int, x: np.ndarray) -> np.ndarray:
        """Run ``fn`` on ``x [*batch, N, ...]`` (``batch`` from vmap) in one call."""
        lead = x.shape[: x.ndim - call_ndim + 1]
        flat = np.array(x).reshape(-1, *x.shape[len(lead) :])  # writable copy (torch-friendly)
        r = np.asarray(self.fn(flat))
        if r.shape != flat.shape[:1]:
            raise ValueError(
                f"host reward {self.name!r} returned shape {r.shape} for {flat.shape[0]} "
                f"candidates, expected ({flat.shape[0]},)"
            )
        if np.isnan(r).any():
            raise ValueError(
                f"host reward {self.name!r} returned NaN for {int(np.isnan(r).sum())} of "
                f"{r.size} candidates; return -inf to discard candidates instead"
            )
        return r.astype(np.float32).reshape(lead)

    def __call__(self, params: tuple, x: Array, cond: Any) -> Array:
        del params, cond
        out = jax.ShapeDtypeStruct(x.shape[:1], jnp.float32)
        return jax.pure_callback(
            lambda xs: self._host_call(x.ndim, xs), out, x, vmap_method="expand_dims"
        )


def host_reward(fn: HostFn, name: str = "host") -> Reward:
    """Wrap a host function as a jit-compatible :class:`Reward` (see module docstring for cost).

    Args:
        fn: ``f(x: np.ndarray [N, ...]) -> np.ndarray [N]``, higher is better. The input is a
            writable NumPy copy with ``x``'s dtype; for torch, e.g.
            ``lambda x: model(torch.from_numpy(x)).detach().numpy()``. Pass the same function
            object to reuse compilations.
        name: label in results and error messages.

    Returns:
        A :class:`Reward` with empty params, ``x [N, ...] -> Float32[N]``; ``cond`` is ignored.
    """
    return Reward((), _HostApply(fn, name), name)
