"""Closed-form rewards for exact tests: a linear reward tilts a Gaussian mixture in closed form."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tts_jax.rewards.base import Reward

Array = jax.Array


def _linear(params, x, cond=None):
    return x.reshape(x.shape[0], -1) @ params["direction"]


def linear_reward(direction) -> Reward:
    """``r(x) = direction . x`` for ``x [N, D]``; see :func:`tts_jax.models.gmm.tilt_linear`."""
    return Reward({"direction": jnp.asarray(direction, jnp.float32)}, _linear, "linear")


def _quadrant(params, x, cond=None):
    return -jnp.sum((x.reshape(x.shape[0], -1) - params["target"][None]) ** 2, axis=-1)


def distance_reward(target) -> Reward:
    """``r(x) = -||x - target||^2``: peaked at ``target``, for mode-seeking search tests."""
    return Reward({"target": jnp.asarray(target, jnp.float32)}, _quadrant, "neg_sq_distance")
