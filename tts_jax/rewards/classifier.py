"""Rewards from an image classifier: ``log p(y | x)`` and the logit margin of a target class.

These are the verifiers of classifier-guided search and steering (Ma et al. 2025, "Inference-Time
Scaling for Diffusion Models beyond Scaling Denoising Steps"; Singhal et al. 2025, FK steering).
They are in-graph JAX: batched over the particle axis, jit/vmap/grad-safe. The classifier weights
and the target class are array leaves of ``Reward.params``, so one compiled sampler serves any
target class (or per-particle targets) without recompiling.

NaN handling: inputs are clipped to the pixel range ``[-1, 1]`` (the image that would be shown),
so finite inputs always give finite rewards. A particle with any non-finite pixel gets reward
``-inf`` (a dead particle: zero weight, never selected) instead of NaN; the clipping uses a
``where`` guard so gradients stay finite for the other particles.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tts_jax.models.classifier import Classifier, load_classifier
from tts_jax.models.zoo import asset_path
from tts_jax.rewards.base import Reward

Array = jax.Array


def prepare_images(x: Array) -> tuple[Array, Array]:
    """Clip images to ``[-1, 1]`` and flag particles with non-finite pixels.

    Args:
        x: ``Float[N, C, H, W]``.

    Returns:
        ``(x_safe [N, C, H, W], finite Bool[N])``: non-finite pixels replaced by 0.
    """
    ok = jnp.isfinite(x)
    x_safe = jnp.clip(jnp.where(ok, x, 0.0), -1.0, 1.0)
    return x_safe, jnp.all(ok.reshape(x.shape[0], -1), axis=1)


def _target_logits(params: dict, x: Array) -> tuple[Array, Array, Array]:
    """``(logits [N, K], one-hot target [N, K], finite [N])`` for the reward functions."""
    clf: Classifier = params["classifier"]
    x_safe, finite = prepare_images(x)
    logits, _ = clf(x_safe)
    target = jnp.broadcast_to(params["target"], x.shape[:1])
    return logits, jax.nn.one_hot(target, logits.shape[-1], dtype=bool), finite


def _log_prob_apply(params: dict, x: Array, cond: Any) -> Array:
    del cond
    logits, onehot, finite = _target_logits(params, x)
    log_p = jnp.sum(jnp.where(onehot, jax.nn.log_softmax(logits, axis=-1), 0.0), axis=-1)
    return jnp.where(finite, log_p, -jnp.inf)


def _margin_apply(params: dict, x: Array, cond: Any) -> Array:
    del cond
    logits, onehot, finite = _target_logits(params, x)
    own = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    best_other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
    return jnp.where(finite, own - best_other, -jnp.inf)


def _reward_params(classifier: Classifier, target_class) -> dict:
    target = jnp.asarray(target_class, jnp.int32)
    if target.ndim > 1:
        raise ValueError(f"target_class must be a scalar or [N], got shape {target.shape}")
    k = classifier.config.num_classes
    if not isinstance(target, jax.core.Tracer) and bool(((target < 0) | (target >= k)).any()):
        raise ValueError(f"target_class must be in [0, {k}), got {target_class}")
    return {"classifier": classifier, "target": target}


def class_log_prob_reward(
    classifier: Classifier, target_class, name: str = "class_log_prob"
) -> Reward:
    """``r(x) = log p(y = target | x)`` under ``classifier`` (``log_softmax`` of its logits).

    Args:
        classifier: e.g. :func:`load_digits_verifier`.
        target_class: ``Int[]`` or ``Int[N]`` (per particle), stored as an int32 array leaf.
        name: label in results (static: keep it independent of the target class).

    Returns:
        A :class:`Reward` mapping ``x [N, C, H, W] -> Float[N]`` in ``(-inf, 0]`` (``cond`` is
        ignored).
    """
    return Reward(_reward_params(classifier, target_class), _log_prob_apply, name)


def class_margin_reward(classifier: Classifier, target_class, name: str = "class_margin") -> Reward:
    """``r(x) = logit_target(x) - max_{j != target} logit_j(x)``, positive iff x is classified
    as the target.

    Unlike the log-probability it does not saturate at 0 for confident samples.

    Args:
        classifier: e.g. :func:`load_digits_verifier`.
        target_class: ``Int[]`` or ``Int[N]`` (per particle), stored as an int32 array leaf.
        name: label in results (static: keep it independent of the target class).

    Returns:
        A :class:`Reward` mapping ``x [N, C, H, W] -> Float[N]`` (``cond`` is ignored).
    """
    return Reward(_reward_params(classifier, target_class), _margin_apply, name)


def load_asset_classifier(name: str, *, loader: str = "load_asset_classifier") -> Classifier:
    """The classifier embedded in ``tts_jax/assets/<name>`` (config.json + model.safetensors).

    Raises:
        KeyError: ``name`` is not a registered asset (:data:`tts_jax.models.zoo.EMBEDDED`).
        FileNotFoundError: its files are missing (naming the folder, the file and the script
            that builds them).
        ValueError: its config or weights are broken (naming the folder, the file and the key).
    """
    return load_classifier(asset_path(name), loader=loader)


def load_digits_verifier() -> Classifier:
    """The steering verifier: a CNN trained on part ``"a"`` of the digits split (see
    ``tts-jax train digits-classifiers``; accuracy in its ``metrics.json``)."""
    return load_asset_classifier("digits-verifier", loader="load_digits_verifier")


def load_digits_heldout() -> Classifier:
    """The held-out evaluator: an MLP trained on the disjoint part ``"b"``; never steer on it."""
    return load_asset_classifier("digits-heldout", loader="load_digits_heldout")
