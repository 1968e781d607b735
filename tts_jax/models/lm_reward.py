"""Process and outcome reward models on the :mod:`tts_jax.models.lm` backbone.

Layout of Qwen2.5-Math-PRM (``Qwen2ForProcessRewardModel``; Zhang et al. 2025, "The Lessons of
Developing Process Reward Models in Mathematical Reasoning"): a Qwen2 backbone ``model.*`` and a
head ``score = Sequential(Linear(h, h), ReLU, Linear(h, 2))`` whose softmax probability of class 1
at each step-separator token is that step's correctness score. ``Qwen2ForRewardModel`` (the
Qwen2.5-Math-RM outcome/value model) is the same network with one output read at the last token.
Parameters keep the transformers names (``score.0.weight``, ``score.2.bias``, ...).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tts_jax.models.lm import (
    Backbone,
    KVCache,
    Linear,
    LMConfig,
    hidden_states,
    init_cache,
    load_weights,
    read_lm_config,
    save_weights,
)

Array = jax.Array

# architecture name -> number of outputs of the score head
REWARD_ARCHITECTURES = {"Qwen2ForProcessRewardModel": 2, "Qwen2ForRewardModel": 1}


class RewardModel(nnx.Module):
    """Backbone plus an MLP score head ``Linear(h, h) -> ReLU -> Linear(h, num_labels)``.

    ``num_labels = 2`` is a PRM (per-step correctness), ``1`` an outcome / value model.
    """

    def __init__(self, config: LMConfig, num_labels: int, *, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32):
        self.config = config
        self.num_labels = num_labels
        h = config.hidden_size
        self.model = Backbone(config, rngs=rngs, dtype=dtype)
        # Index 1 is the parameter-free ReLU, kept so names match ``nn.Sequential``.
        self.score = nnx.List([Linear(h, h, bias=True, rngs=rngs, dtype=dtype), None,
                               Linear(h, num_labels, bias=True, rngs=rngs, dtype=dtype)])

    @property
    def architecture(self) -> str:
        return {v: k for k, v in REWARD_ARCHITECTURES.items()}[self.num_labels]


def reward_logits(rm: RewardModel, tokens: Array, cache: KVCache,
                  num_new: Array | None = None) -> tuple[Array, KVCache]:
    """Score-head outputs of new tokens, reading and writing a cache (incremental scoring).

    Args:
        rm: :class:`RewardModel`.
        tokens: ``int32[N, T]``.
        cache: :class:`KVCache` for ``rm.config`` with ``N`` rows.
        num_new: ``int32[N]`` tokens appended per row (``None``: all ``T``).

    Returns:
        ``(logits float32[N, T, num_labels], cache)``.
    """
    hidden, cache = hidden_states(rm, tokens, cache, num_new)
    first, _, last = rm.score
    return last(jax.nn.relu(first(hidden))).astype(jnp.float32), cache


def prm_scores(prm: RewardModel, tokens: Array, sep_mask: Array) -> Array:
    """Per-step PRM probabilities read at step-separator positions.

    Args:
        prm: :class:`RewardModel` with ``num_labels == 2``.
        tokens: ``int32[N, T]`` full (question + partial solution) sequences; right padding is
            harmless because attention is causal.
        sep_mask: ``bool[N, T]`` true at each step-separator token.

    Returns:
        ``float32[N, T]``: ``P(step correct)`` where ``sep_mask``, 0 elsewhere.
    """
    if prm.num_labels != 2:
        raise ValueError(f"prm_scores needs a 2-label PRM head, got num_labels={prm.num_labels}")
    n, t = tokens.shape
    logits, _ = reward_logits(prm, tokens, init_cache(prm.config, n, t))
    return jnp.where(sep_mask, jax.nn.softmax(logits, axis=-1)[..., 1], 0.0)


def outcome_scores(rm: RewardModel, tokens: Array, lengths: Array) -> Array:
    """Outcome / value score of each (right-padded) sequence, read at its last token.

    Args:
        rm: :class:`RewardModel` with ``num_labels == 1``.
        tokens: ``int32[N, T]``.
        lengths: ``int32[N]`` true lengths (``>= 1``).

    Returns:
        ``float32[N]`` raw scores.
    """
    if rm.num_labels != 1:
        raise ValueError(f"outcome_scores needs a 1-output head, got num_labels={rm.num_labels}")
    n, t = tokens.shape
    logits, _ = reward_logits(rm, tokens, init_cache(rm.config, n, t))
    return jnp.take_along_axis(logits[..., 0], (jnp.asarray(lengths) - 1)[:, None], axis=1)[:, 0]


def load_reward_model(path: str | pathlib.Path, *,
                      dtype: Any = jnp.float32) -> tuple[LMConfig, RewardModel]:
    """Loads a ``Qwen2ForProcessRewardModel`` / ``Qwen2ForRewardModel`` folder (safetensors).

    Raises:
        FileNotFoundError: the folder, its ``config.json`` or its ``*.safetensors`` is missing.
        ValueError: invalid JSON, a missing or wrongly typed config key, another architecture
            (naming the folder, the file and the key), or missing / mis-shaped tensors (named).
    """
    loader = "load_reward_model"
    architecture, config = read_lm_config(path, REWARD_ARCHITECTURES, loader=loader)
    num_labels = REWARD_ARCHITECTURES[architecture]
    abstract = nnx.eval_shape(lambda: RewardModel(config, num_labels, rngs=nnx.Rngs(0),
                                                  dtype=dtype))
    return config, load_weights(abstract, path, dtype, loader=loader)


def save_reward_model(path: str | pathlib.Path, config: LMConfig, rm: RewardModel) -> None:
    """Saves ``config.json`` + ``model.safetensors`` in the transformers layout."""
    save_weights(rm, path, config.to_hf_dict(rm.architecture))
