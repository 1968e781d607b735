"""The reward protocols (docs/design.md "Protocols").

A :class:`Reward` (image samplers) is a pytree: ``params`` (e.g. a classifier's weights, a target
class, a reward direction) are array leaves, ``apply`` is static. In-graph rewards run inside the
jitted sampler.

A :class:`StepScorer` (LM samplers) scores partial solutions step by step (a process reward
model, an exact checker): ``init`` / ``update`` / ``read`` over a per-particle scorer state. Its
parameters (e.g. the PRM's weights) are passed next to it as a traced argument of the samplers;
the scorer itself is static (hashed). :class:`RescoringScorer` turns any function that scores
whole sequences into one; :func:`tts_jax.models.lm_reward.cached_prm_scorer` keeps a PRM's KV
cache in the scorer state instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
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


# --------------------------------------------------------------------------------------------
# Step scorers (language models)
# --------------------------------------------------------------------------------------------
# fn(params, tokens int32[N, T], step_ends bool[N, T]) -> float32[N, T]: P(correct so far) at the
# marked step ends (values elsewhere are ignored); tokens are prompt + completion, right-padded.
SequenceScoreFn = Callable[[PyTree, Array, Array], Array]


@runtime_checkable
class StepScorer(Protocol):
    """Scores the particles' partial solutions after every step (higher is better, in ``[0, 1]``).

    The scorer state is a pytree with the particle axis first on every leaf: it lives in the
    particle state (``LMState.scorer_state``) and is resampled with it. Every method is pure and
    traceable; ``params`` is the scorer's traced parameter pytree (e.g. a PRM module). The
    completion arguments are the particles' buffers: ``completion int32[N, L]`` (tokens after
    the prompt, right-padded), ``length int32[N]`` tokens written, ``step_ends bool[N, L]`` true
    at the last token of every finished step. ``how`` is an :class:`Aggregation` (static).
    """

    def init(
        self,
        params: PyTree,
        prompt: Array,
        prompt_length: Array | None,
        num_particles: int,
        max_new_tokens: int,
    ) -> PyTree:
        """The state of ``num_particles`` empty completions of ``prompt`` (``int32[P]``,
        right-padded to ``prompt_length`` real tokens; ``None``: all ``P``), completions of at
        most ``max_new_tokens`` tokens (static)."""
        ...

    def update(
        self,
        params: PyTree,
        state: PyTree,
        completion: Array,
        length: Array,
        step_ends: Array,
        window: int,
        how: Aggregation,
        needed: Array | bool = True,
    ) -> tuple[Array, PyTree]:
        """Take the tokens written since the last update (at most ``window``, static, per row)
        and score the partial solutions.

        ``needed`` (traced bool): whether the caller uses the score; when false the scorer may
        skip its work and return anything, but the state must still take the new tokens.

        Returns:
            ``(score float32[N], state)``: each row's aggregate of its step scores so far.
        """
        ...

    def read(
        self,
        params: PyTree,
        state: PyTree,
        completion: Array,
        length: Array,
        step_ends: Array,
        how: Aggregation,
        needed: Array | bool = True,
    ) -> Array:
        """``float32[N]``: the aggregate score of the completions as they are, after the last
        :meth:`update` (no new tokens since; ``needed`` as in :meth:`update`)."""
        ...


def last_step_only(step_ends: Array) -> Array:
    """Keep only the last marked position of each row of ``bool[N, T]``."""
    t = step_ends.shape[1]
    last = jnp.max(jnp.where(step_ends, jnp.arange(t)[None, :], -1), axis=1)
    return jnp.arange(t)[None, :] == last[:, None]


class Aggregation(NamedTuple):
    """How the per-step scores of a partial solution become one score (Puri et al. 2025,
    docs/algorithms.md 4.1). A value: pass one of the built-ins or your own wherever an
    ``aggregation`` / ``how`` is expected (their names in :data:`AGGREGATIONS` are aliases).

    Attributes:
        name: shown in messages and records.
        reduce: ``(scores float32[N, T], step_ends bool[N, T]) -> float32[N]`` over the marked
            positions (pure, traceable; NaN must propagate so callers can report it).
        outcome: the scorer is shown only the last step end, so it judges the whole response as
            one step (an outcome reward model).
    """

    name: str
    reduce: Callable[[Array, Array], Array]
    outcome: bool = False


def _last(scores: Array, step_ends: Array) -> Array:
    return jnp.sum(jnp.where(last_step_only(step_ends), scores, 0.0), axis=1)


def _min(scores: Array, step_ends: Array) -> Array:
    return jnp.min(jnp.where(step_ends, scores, jnp.inf), axis=1)


def _prod(scores: Array, step_ends: Array) -> Array:
    return jnp.exp(jnp.sum(jnp.where(step_ends, jnp.log(scores), 0.0), axis=1))


LAST = Aggregation("last", _last)
"""The newest step's score."""
MIN = Aggregation("min", _min)
"""The minimum over the steps (a solution is as good as its weakest step)."""
PROD = Aggregation("prod", _prod)
"""The product over the steps (the chance that every step is correct, if independent)."""
OUTCOME = Aggregation("model", _last, outcome=True)
"""The scorer's judgement of the whole response (only the last position is shown)."""
AGGREGATIONS: dict[str, Aggregation] = {a.name: a for a in (LAST, MIN, PROD, OUTCOME)}
"""The built-in aggregations by name (the command line's choices)."""


def as_aggregation(how: str | Aggregation) -> Aggregation:
    """``how`` as an :class:`Aggregation` (a name of :data:`AGGREGATIONS` or a value)."""
    if isinstance(how, Aggregation):
        return how
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; known: {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[how]


def aggregate(scores: Array, step_ends: Array, how: str | Aggregation) -> Array:
    """Aggregate per-step scores ``float32[N, T]`` over the marked ``bool[N, T]`` positions.

    Args:
        scores: scorer output.
        step_ends: positions to aggregate (at least one per row for a meaningful score).
        how: an :class:`Aggregation` or its name.

    Returns:
        ``float32[N]`` (NaN propagates so callers can report it).
    """
    return as_aggregation(how).reduce(scores, step_ends)


def score_sequences(
    fn: SequenceScoreFn, params: PyTree, tokens: Array, step_ends: Array, how: str
) -> Array:
    """Aggregated score ``float32[N]`` of prompt + completion ``tokens`` (one ``fn`` call).

    Args:
        fn: ``(params, tokens int32[N, T], step_ends bool[N, T]) -> float32[N, T]``.
        params: its parameters.
        tokens: ``int32[N, T]``.
        step_ends: ``bool[N, T]`` step ends of the completions.
        how: an :class:`Aggregation` or its name (an outcome one shows ``fn`` only the last
            step end).
    """
    how = as_aggregation(how)
    ends = last_step_only(step_ends) if how.outcome else step_ends
    return how.reduce(fn(params, tokens, ends), ends)


def join_prompt(
    prompt: Array, prompt_length: Array | None, completion: Array, step_ends: Array
) -> tuple[Array, Array]:
    """Prompt + completion of every row, the input of a sequence scorer.

    Args:
        prompt: ``int32[P]``, right-padded to ``prompt_length`` real tokens (``None``: ``P``);
            the completion follows the real tokens directly and the padding moves to the end.
        prompt_length: int32 scalar or ``None``.
        completion: ``int32[N, L]``.
        step_ends: ``bool[N, L]``.

    Returns:
        ``(tokens int32[N, P + L], step_ends bool[N, P + L])`` (prompt positions never marked).
    """
    n, max_len = completion.shape
    p = prompt.shape[0]
    length = jnp.asarray(p if prompt_length is None else prompt_length, jnp.int32)
    cols = jnp.arange(p + max_len, dtype=jnp.int32)
    in_completion = (cols >= length) & (cols < length + max_len)
    src = jnp.clip(cols - length, 0, max_len - 1)
    head = jnp.take(prompt, jnp.clip(jnp.where(cols < length, cols, cols - max_len), 0, p - 1))
    tokens = jnp.where(
        in_completion[None, :],
        completion[:, src],
        jnp.broadcast_to(head[None, :], (n, p + max_len)),
    )
    ends = in_completion[None, :] & step_ends[:, src]
    return tokens, ends


class PromptRows(NamedTuple):
    """State of a :class:`RescoringScorer`: the prompt, replicated on every particle row (so
    resampling leaves it unchanged).

    Attributes:
        prompt: ``int32[N, P]`` (all rows equal).
        length: ``int32[N]`` real prompt tokens (all entries equal).
    """

    prompt: Array
    length: Array


@dataclasses.dataclass(frozen=True)
class RescoringScorer:
    """The :class:`StepScorer` that rescores whole sequences with ``fn``.

    Every :meth:`update` / :meth:`read` runs ``fn`` once over the ``[N, P + L]`` prompt +
    completion tokens (quadratic in the number of steps for a transformer; see
    :func:`tts_jax.models.lm_reward.cached_prm_scorer` for a PRM fed one step at a time), inside
    a ``lax.cond`` on ``needed`` so skipped scorings cost nothing. Called directly it is ``fn``.
    Equal for equal ``fn``, so rebuilding it does not recompile a sampler.

    Attributes:
        fn: ``(params, tokens int32[N, T], step_ends bool[N, T]) -> float32[N, T]``, the
            probability that the solution is correct so far at every marked step end.
    """

    fn: SequenceScoreFn

    def __call__(self, params: PyTree, tokens: Array, step_ends: Array) -> Array:
        return self.fn(params, tokens, step_ends)

    def init(
        self,
        params: PyTree,
        prompt: Array,
        prompt_length: Array | None,
        num_particles: int,
        max_new_tokens: int,
    ) -> PromptRows:
        """:class:`PromptRows` of ``prompt`` (``int32[P]``) on ``num_particles`` rows."""
        n, p = num_particles, prompt.shape[0]
        length = jnp.asarray(p if prompt_length is None else prompt_length, jnp.int32)
        return PromptRows(jnp.broadcast_to(prompt[None, :], (n, p)), jnp.broadcast_to(length, (n,)))

    def update(
        self,
        params: PyTree,
        state: PromptRows,
        completion: Array,
        length: Array,
        step_ends: Array,
        window: int,
        how: Aggregation,
        needed: Array | bool = True,
    ) -> tuple[Array, PromptRows]:
        """``(scores float32[N], state)``: :meth:`read` (nothing to feed)."""
        return self.read(params, state, completion, length, step_ends, how, needed), state

    def read(
        self,
        params: PyTree,
        state: PromptRows,
        completion: Array,
        length: Array,
        step_ends: Array,
        how: Aggregation,
        needed: Array | bool = True,
    ) -> Array:
        """``float32[N]``: :func:`score_sequences` of prompt + completion when ``needed``, else
        zeros (the ``fn`` call is skipped)."""

        def full(operands):
            tokens, ends = join_prompt(state.prompt[0], state.length[0], *operands)
            return score_sequences(self.fn, params, tokens, ends, how)

        def skipped(operands):
            return jnp.zeros(operands[0].shape[:1], jnp.float32)

        return jax.lax.cond(needed, full, skipped, (completion, step_ends))


def as_step_scorer(scorer: StepScorer | SequenceScoreFn) -> StepScorer:
    """``scorer`` as a :class:`StepScorer`: a plain function ``fn(params, tokens, step_ends)``
    of whole sequences becomes ``RescoringScorer(fn)``; a :class:`StepScorer` is returned as it
    is."""
    return scorer if isinstance(scorer, StepScorer) else RescoringScorer(scorer)
