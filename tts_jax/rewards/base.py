"""The reward protocol (DESIGN.md "Protocols").

A :class:`Reward` is a pytree: ``params`` (e.g. a classifier's weights, a target class, a reward
direction) are array leaves, ``apply`` is static. In-graph rewards run inside the jitted sampler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import struct

Array = jax.Array
PyTree = Any
# apply(params, x [N, ...], cond) -> [N]
RewardFn = Callable[[PyTree, Array, Any], Array]


@struct.dataclass
class Reward:
    """A batched reward ``r(x, cond) -> [N]`` (higher is better).

    Attributes:
        params: pytree of arrays the reward depends on (dynamic).
        apply: ``(params, x [N, ...], cond) -> [N]``, a module-level function.
        name: label used in results and ensembles.
    """

    params: PyTree
    apply: RewardFn = struct.field(pytree_node=False)
    name: str = struct.field(pytree_node=False, default="reward")

    def __call__(self, x: Array, cond: Any = None) -> Array:
        return self.apply(self.params, x, cond)
