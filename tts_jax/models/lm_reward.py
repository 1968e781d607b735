"""Process and outcome reward models on the :mod:`tts_jax.models.lm` backbone.

Layout of Qwen2.5-Math-PRM (``Qwen2ForProcessRewardModel``; Zhang et al. 2025, "The Lessons of
Developing Process Reward Models in Mathematical Reasoning"): a Qwen2 backbone ``model.*`` and a
head ``score = Sequential(Linear(h, h), ReLU, Linear(h, 2))`` whose softmax probability of class 1
at each step-separator token is that step's correctness score. ``Qwen2ForRewardModel`` (the
Qwen2.5-Math-RM outcome/value model) is the same network with one output read at the last token.
Parameters keep the transformers names (``score.0.weight``, ``score.2.bias``, ...).

As step scorers of the LM samplers (:class:`~tts_jax.rewards.base.StepScorer`, with the PRM as
``scorer_params``): :data:`prm_scorer` rereads the whole prompt + completion at every step
(``[N, P + L]`` tokens per call, quadratic in the number of steps); :data:`cached_prm_scorer`
keeps the PRM's own KV cache in each particle's state and feeds it only the tokens written since
the last step, with the same scores (attention is causal). Both read the policy's own tokens, so
they suit a PRM trained on the policy's format (same vocabulary). :class:`ConversationPRMScorer`
feeds a PRM *its own* input format (e.g. the Qwen2.5-Math-PRM model card's conversation, each
step followed by a marker token) incrementally too: the conversation's head is prefilled once,
and after every step only the step's re-encoded tokens and its marker are appended to the PRM's
KV cache and the reward is read at the marker.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

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
from tts_jax.particles import gather
from tts_jax.rewards.base import (
    AGGREGATIONS,
    Aggregation,
    RescoringScorer,
    as_aggregation,
    last_step_only,
)

Array = jax.Array

# architecture name -> number of outputs of the score head
REWARD_ARCHITECTURES = {"Qwen2ForProcessRewardModel": 2, "Qwen2ForRewardModel": 1}


class RewardModel(nnx.Module):
    """Backbone plus an MLP score head ``Linear(h, h) -> ReLU -> Linear(h, num_labels)``.

    ``num_labels = 2`` is a PRM (per-step correctness), ``1`` an outcome / value model.
    """

    def __init__(
        self, config: LMConfig, num_labels: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32
    ):
        self.config = config
        self.num_labels = num_labels
        h = config.hidden_size
        self.model = Backbone(config, rngs=rngs, dtype=dtype)
        # Index 1 is the parameter-free ReLU, kept so names match ``nn.Sequential``.
        self.score = nnx.List(
            [
                Linear(h, h, bias=True, rngs=rngs, dtype=dtype),
                None,
                Linear(h, num_labels, bias=True, rngs=rngs, dtype=dtype),
            ]
        )

    @property
    def architecture(self) -> str:
        return {v: k for k, v in REWARD_ARCHITECTURES.items()}[self.num_labels]


def reward_logits(
    rm: RewardModel, tokens: Array, cache: KVCache, num_new: Array | None = None
) -> tuple[Array, KVCache]:
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


prm_scorer = RescoringScorer(prm_scores)
"""Step scorer of a 2-label :class:`RewardModel` PRM (``scorer_params``): a full PRM forward over
the ``[N, P + L]`` prompt + completion at every scoring, read at the step ends. Called directly
it is :func:`prm_scores` (``prm_scorer(prm, tokens, step_ends) -> float32[N, T]``)."""


class PRMCache(NamedTuple):
    """Per-particle state of :data:`cached_prm_scorer` (leading axis ``N``).

    Attributes:
        cache: the PRM's :class:`~tts_jax.models.lm.KVCache` over the prompt and the fed tokens.
        fed: ``int32[N]`` completion tokens already fed.
        last: ``float32[N]`` score of the newest step end (0 before any).
        low: ``float32[N]`` minimum step score (``+inf`` before any).
        log_prod: ``float32[N]`` sum of the log step scores (0 before any).
    """

    cache: KVCache
    fed: Array
    last: Array
    low: Array
    log_prod: Array


def _fold_step_scores(
    state: PRMCache, cache: KVCache, fed: Array, logits: Array, ends: Array
) -> PRMCache:
    """``state`` after new PRM positions with head outputs ``logits float32[N, T, 2]``, of
    which ``ends bool[N, T]`` are step ends: the running newest / minimum / log-product of the
    step scores ``softmax(logits)[1]`` (a row without a new step end keeps its values)."""
    p = jax.nn.softmax(logits, axis=-1)[..., 1]
    newest = jnp.sum(jnp.where(last_step_only(ends), p, 0.0), axis=1)
    last = jnp.where(jnp.any(ends, axis=1), newest, state.last)
    low = jnp.minimum(state.low, jnp.min(jnp.where(ends, p, jnp.inf), axis=1))
    log_prod = state.log_prod + jnp.sum(jnp.where(ends, jnp.log(p), 0.0), axis=1)
    return PRMCache(cache, fed, last, low, log_prod)


@dataclasses.dataclass(frozen=True)
class CachedPRMScorer:
    """:class:`~tts_jax.rewards.base.StepScorer` of a 2-label PRM that keeps the PRM's KV cache
    per particle (use the instance :data:`cached_prm_scorer`).

    :meth:`init` prefills the prompt once on one row and broadcasts it to ``N``; :meth:`update`
    (after every step) feeds each row its new tokens, at most one step's worth: a PRM pass over
    ``window`` token positions per particle and step (each written token is fed once) instead of
    ``P + L``. The state is part of :class:`~tts_jax.samplers.lm.state.LMState` and is resampled
    with it. Scores equal :data:`prm_scorer`'s.
    """

    def init(
        self,
        prm: RewardModel,
        prompt: Array,
        prompt_length: Array | None,
        num_particles: int,
        max_new_tokens: int,
    ) -> PRMCache:
        """Prefill ``prompt`` (``int32[P]``, right-padded to ``prompt_length``) once and
        broadcast it to ``num_particles`` rows of a cache for ``P + max_new_tokens`` tokens."""
        if prm.num_labels != 2:
            raise ValueError(
                f"cached_prm_scorer needs a 2-label PRM head, got num_labels={prm.num_labels}"
            )
        p = prompt.shape[0]
        length = jnp.reshape(
            jnp.asarray(p if prompt_length is None else prompt_length, jnp.int32), (1,)
        )
        rows = init_cache(prm.config, 1, p + max_new_tokens)
        _, cache = reward_logits(prm, prompt[None, :], rows, length)
        n = num_particles
        zeros = jnp.zeros((n,), jnp.float32)
        return PRMCache(
            gather(cache, jnp.zeros((n,), jnp.int32)),
            jnp.zeros((n,), jnp.int32),
            zeros,
            jnp.full((n,), jnp.inf, jnp.float32),
            zeros,
        )

    def update(
        self,
        prm: RewardModel,
        state: PRMCache,
        completion: Array,
        length: Array,
        step_ends: Array,
        window: int,
        how: Aggregation,
        needed: Array | bool = True,
    ) -> tuple[Array, PRMCache]:
        """Feed every row its completion tokens ``[fed, length)`` and aggregate the new step
        ends' scores (always, whatever ``needed``: every token must reach the cache once).

        Args:
            prm: the PRM.
            state: :class:`PRMCache`.
            completion: ``int32[N, L]`` completion buffer.
            length: ``int32[N]`` tokens written.
            step_ends: ``bool[N, L]`` step-end marks of the completion.
            window: static bound on the tokens a row writes between two updates (one step).
            how: an :class:`~tts_jax.rewards.base.Aggregation` (a built-in one).
            needed: unused.

        Returns:
            ``(score float32[N], state)``: the same aggregate as
            :func:`~tts_jax.rewards.base.score_sequences` of :func:`prm_scores` over the whole
            prompt + completion.
        """
        positions = state.fed[:, None] + jnp.arange(window, dtype=jnp.int32)[None, :]
        safe = jnp.minimum(positions, completion.shape[1] - 1)
        tokens = jnp.take_along_axis(completion, safe, axis=1)
        ends = jnp.take_along_axis(step_ends, safe, axis=1) & (positions < length[:, None])
        logits, cache = reward_logits(prm, tokens, state.cache, length - state.fed)
        state = _fold_step_scores(state, cache, length, logits, ends)
        return self.read(prm, state, completion, length, step_ends, how), state

    def read(
        self,
        prm: RewardModel,
        state: PRMCache,
        completion: Array,
        length: Array,
        step_ends: Array,
        how: Aggregation,
        needed: Array | bool = True,
    ) -> Array:
        """The aggregate ``float32[N]`` of every step end fed so far (no PRM call).

        The cache keeps the running newest / minimum / log-product of the step scores, so it
        reads the built-in aggregations (:data:`~tts_jax.rewards.base.AGGREGATIONS`); for an
        aggregation of your own, score with ``RescoringScorer(prm_scores)``, which applies any.
        """
        how = as_aggregation(how)
        if AGGREGATIONS.get(how.name) is not how:
            raise ValueError(
                f"the cached PRM scorer reads only the built-in aggregations "
                f"{sorted(AGGREGATIONS)}, got {how.name!r}: use RescoringScorer(prm_scores) for "
                "another"
            )
        running = {
            "last": state.last,
            "model": state.last,
            "min": state.low,
            "prod": jnp.exp(state.log_prod),
        }
        return running[how.name]


cached_prm_scorer = CachedPRMScorer()
"""The cached PRM step scorer (samplers compile per scorer value; this one is shared)."""


class PRMConversation(NamedTuple):
    """The ``scorer_params`` of a :class:`ConversationPRMScorer`, for one problem.

    Attributes:
        prm: the 2-label :class:`RewardModel`.
        head: ``int32[H]`` the PRM conversation's tokens before the first step (for
            Qwen2.5-Math-PRM: system, user, the assistant header), right-padded; traced, so
            problems whose heads are padded to one width share a compiled sampler.
        head_length: int32 scalar, its real tokens (``1 <= . <= H``).
        step_token: int32 scalar, the marker token that follows every step (``<extra_0>``),
            where the step's reward is read.
    """

    prm: RewardModel
    head: Array
    head_length: Array
    step_token: Array


# encode(completion int32[N, L], step_ends bool[N, L], fed int32[N], length int32[N],
#        room int32[N], width) -> (ids int32[N, width], count int32[N], fed int32[N])
StepEncoder = Callable[[Array, Array, Array, Array, Array, int], tuple[Array, Array, Array]]


@dataclasses.dataclass(frozen=True)
class ConversationPRMScorer(CachedPRMScorer):
    """:class:`~tts_jax.rewards.base.StepScorer` of a 2-label PRM that reads its own input
    format (a conversation in which every step is followed by a marker token), fed
    incrementally from a KV cache kept per particle (``scorer_params``: a
    :class:`PRMConversation`; state: :class:`PRMCache`, resampled with the particles).

    :meth:`init` prefills the conversation's head once on one row and broadcasts it. After every
    step, :meth:`update` asks ``encode`` for the PRM tokens of each row's newly completed
    steps, each step's tokens followed by ``step_token``, appends them to the row's PRM cache
    (one PRM pass over ``token_ratio * window`` positions per particle) and reads each new step's
    reward ``softmax(logits)[1]`` at its marker. The PRM thus sees, after ``k`` steps, exactly
    the head plus ``k`` encoded steps each with its marker: for Qwen2.5-Math-PRM, the token
    prefix of the model card's conversation up to the ``k``-th ``<extra_0>``
    (:func:`tts_jax.app.tasks.math.prm_format.conversation_step_encoder`), whose rewards equal
    those of the whole conversation because attention is causal. Cost per step: the new step's
    tokens, not the conversation (:data:`prm_scorer`-like rescoring re-reads everything).

    Attributes:
        encode: a :data:`StepEncoder`: ``encode(completion, step_ends, fed, length, room,
            width)`` returns, per row, the PRM tokens (``int32[N, width]``, right-padded) of
            the steps that end in ``completion[fed:length]`` (marked in ``step_ends``), their
            number ``count int32[N]`` (``<= room``, the row's free cache positions) and the new
            ``fed`` (just after the last step end; tokens of an unfinished step wait for its
            end). Static (hashed by identity): build it once, e.g. a host function behind
            ``jax.pure_callback``.
        token_ratio: static bound on PRM tokens per policy token: one update appends at most
            ``token_ratio * window`` tokens per row, and the cache holds the head plus
            ``token_ratio * max_new_tokens``. The encoder must refuse (not truncate) a step
            that does not fit.
    """

    encode: StepEncoder
    token_ratio: int = 2

    def init(
        self,
        params: PRMConversation,
        prompt: Array,
        prompt_length: Array | None,
        num_particles: int,
        max_new_tokens: int,
    ) -> PRMCache:
        """Prefill ``params.head`` once and broadcast it to ``num_particles`` rows of a cache for
        ``H + token_ratio * max_new_tokens`` tokens (the policy ``prompt`` is not read: the
        head carries the problem in the PRM's format)."""
        if not isinstance(params, PRMConversation):
            raise ValueError(
                "ConversationPRMScorer takes a PRMConversation (prm, head, head_length, "
                f"step_token) as scorer_params, got {type(params).__name__}"
            )
        room = self.token_ratio * max_new_tokens
        return super().init(params.prm, params.head, params.head_length, num_particles, room)

    def update(
        self,
        params: PRMConversation,
        state: PRMCache,
        completion: Array,
        length: Array,
        step_ends: Array,
        window: int,
        how: Aggregation,
        needed: Array | bool = True,
    ) -> tuple[Array, PRMCache]:
        """Append every row's newly completed steps (encoded, each with its marker) to its PRM
        cache and aggregate the step rewards (always, whatever ``needed``).

        Returns:
            ``(score float32[N], state)``: ``how`` (a built-in aggregation) of every step reward
            read so far.
        """
        width = self.token_ratio * window
        cache = state.cache
        room = cache.max_len - cache.length
        ids, count, fed = self.encode(completion, step_ends, state.fed, length, room, width)
        logits, cache = reward_logits(params.prm, ids, cache, count)
        ends = (ids == params.step_token) & (jnp.arange(width)[None, :] < count[:, None])
        state = _fold_step_scores(state, cache, fed, logits, ends)
        return self.read(params, state, completion, length, step_ends, how), state


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


def load_reward_model(
    path: str | pathlib.Path, *, dtype: Any = jnp.float32
) -> tuple[LMConfig, RewardModel]:
    """Loads a ``Qwen2ForProcessRewardModel`` / ``Qwen2ForRewardModel`` folder (safetensors).

    Args:
        path: folder with ``config.json`` and ``model.safetensors`` (or its shards listed by
            ``model.safetensors.index.json``), read by :mod:`tts_jax.models.checkpoint`.
        dtype: parameter dtype.

    Returns:
        ``(config, model)``; the architecture gives ``num_labels`` (2 for a PRM, 1 for an RM).

    Raises:
        FileNotFoundError: the folder, its ``config.json`` or its ``*.safetensors`` is missing.
        ValueError: invalid JSON, a missing or wrongly typed config key, another architecture
            (naming the folder, the file and the key), or missing / mis-shaped / unexpected
            tensors (named).
    """
    loader = "load_reward_model"
    architecture, config = read_lm_config(path, REWARD_ARCHITECTURES, loader=loader)
    num_labels = REWARD_ARCHITECTURES[architecture]
    abstract = nnx.eval_shape(
        lambda: RewardModel(config, num_labels, rngs=nnx.Rngs(0), dtype=dtype)
    )
    return config, load_weights(abstract, path, dtype, loader=loader)


def save_reward_model(
    path: str | pathlib.Path,
    config: LMConfig,
    rm: RewardModel,
    *,
    max_shard_size: int | None = None,
) -> None:
    """Saves ``config.json`` + ``model.safetensors`` in the transformers layout (with
    ``max_shard_size`` bytes: shards and ``model.safetensors.index.json``)."""
    save_weights(rm, path, config.to_hf_dict(rm.architecture), max_shard_size=max_shard_size)
