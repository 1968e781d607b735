"""Particle chunking: a model's or a reward's rows evaluated ``max_batch`` at a time.

When ``N`` particles' activations do not fit on a device at once, wrap the model and the reward
and hand the wrappers to any sampler, unchanged:

    flow = chunked(flow, max_batch=16)               # FlowModel: velocity in chunks of 16 rows
    reward = chunked_reward(reward, max_batch=16)    # Reward: scores in chunks of 16 rows
    policy = chunked_language_model(lm, max_batch=16)  # LanguageModel: prefill / decode in chunks
    scorer = chunked_scorer(prm_scorer, max_batch=16)  # StepScorer: update / read in chunks

Inside the sampler's compiled loop each call becomes one ``lax.map`` over ``ceil(N / max_batch)``
chunks of ``max_batch`` rows: one compiled body, run sequentially, so peak activation memory is
that of ``max_batch`` rows. The wrappers only slice, pad and concatenate; the results equal the
unchunked ones up to float32 rounding, not always bit for bit, because XLA compiles a
``max_batch``-row loop body and an ``N``-row program to different code (matmul library chosen
by size, vectorised loops with scalar remainders, loop-invariant factors re-associated): one
forward pass differs by 1-2 ulps. ``tests/test_chunking.py`` checks that FK steering, best-of-N
and the LM particle filter keep the same ancestors, tokens and best candidate, with floats
within 1e-5 (docs/precision.md, "Particle chunking", has the measurements).

**Padding.** ``N`` need not be a multiple of ``max_batch``: the last chunk is filled with copies of
the last real row (a valid input, so no NaN from made-up rows), and their outputs are dropped.
The padded rows cost compute, not correctness; the wasted fraction is at most
``(max_batch - 1) / N``.

**Conditioning.** ``cond`` is any pytree whose array leaves have a leading batch axis ``B``
dividing ``N`` (the convention of the samplers and pipelines: particle ``i`` uses row
``i // (N / B)``). A leaf with ``B = N`` is chunked with the particles; a leaf with ``B = 1`` or
a scalar is shared by every chunk as it is; a leaf with ``1 < B < N`` is repeated to ``N`` rows
first (so each chunk carries its own prompts). Any other leading size is an error naming it.

**What is chunked.** Only the evaluation: the particle state itself (latents, a KV cache) still
lives at ``N`` rows. A chunked :class:`~tts_jax.models.base.LanguageModel` moves each chunk's
cache rows through the model with its tokens and reassembles the cache, which costs one copy of
the cache per call; the memory it bounds is the per-row activations (attention scores, MLP
intermediates, logits) of prefill and decode.

Rewards must score each particle on its own (as SMC weights require anyway): a batch-relative
reward (ranks, ``mean_rank_ensemble``) would rank within a chunk.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tts_jax.models.base import ApplyFn, FlowModel, LanguageModel, as_language_model
from tts_jax.rewards.base import (
    Aggregation,
    Reward,
    RewardFn,
    SequenceScoreFn,
    StepScorer,
    as_step_scorer,
)

Array = jax.Array
PyTree = Any

__all__ = [
    "chunked",
    "chunked_language_model",
    "chunked_reward",
    "chunked_scorer",
    "map_rows",
    "split_cond",
]


def _check_max_batch(max_batch: int, where: str) -> int:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"{where}: max_batch must be a positive int, got {max_batch!r}")
    return max_batch


def _pad_rows(leaf: Array, pad: int) -> Array:
    """``leaf [N, ...]`` with ``pad`` copies of its last row appended."""
    if pad == 0:
        return leaf
    tail = jnp.broadcast_to(leaf[-1:], (pad, *leaf.shape[1:]))
    return jnp.concatenate([leaf, tail])


def map_rows(fn: Callable[[PyTree], PyTree], rows: PyTree, max_batch: int) -> PyTree:
    """``fn`` over the rows of ``rows`` in chunks of ``max_batch`` rows (``lax.map``).

    Args:
        fn: a batch of rows (pytree, every leaf ``[B, ...]``) -> outputs with ``B`` rows first on
            every leaf; traced once, at ``B = max_batch``.
        rows: pytree whose every leaf has the same leading size ``N``.
        max_batch: rows per call. ``max_batch >= N`` calls ``fn`` once on all rows.

    Returns:
        ``fn``'s outputs for all ``N`` rows, as if ``fn(rows)`` (the padding rows of the last chunk,
        copies of row ``N - 1``, are dropped).
    """
    leaves = jax.tree.leaves(rows)
    if not leaves:
        raise ValueError("map_rows: rows has no array leaves (nothing gives the row count)")
    n = leaves[0].shape[0]
    sizes = {leaf.shape[0] for leaf in leaves}
    if sizes != {n}:
        raise ValueError(f"map_rows: every leaf needs the same leading (row) size, got {sizes}")
    if max_batch >= n:
        return fn(rows)
    chunks = math.ceil(n / max_batch)
    pad = chunks * max_batch - n
    stacked = jax.tree.map(
        lambda a: _pad_rows(a, pad).reshape(chunks, max_batch, *a.shape[1:]), rows
    )
    out = jax.lax.map(fn, stacked)
    return jax.tree.map(lambda o: o.reshape(chunks * max_batch, *o.shape[2:])[:n], out)


def split_cond(cond: Any, n: int) -> tuple[list[Array], Callable[[list[Array]], Any]]:
    """Split ``cond`` into its per-row leaves (``[N, ...]``, to chunk) and a rebuild function.

    Returns:
        ``(rows, rebuild)``: ``rows`` the leaves to chunk with the particles (leaves with a batch
        ``1 < B < N`` repeated to ``N`` rows), and ``rebuild(chunk_rows) -> cond`` putting a
        chunk of them back among the shared leaves (``B = 1``, scalars, non-arrays).

    Raises:
        ValueError: a leaf whose leading size is neither 1 nor a divisor of ``N``.
    """
    leaves, treedef = jax.tree.flatten(cond)
    per_row, kept = [], []
    for i, leaf in enumerate(leaves):
        shape = getattr(leaf, "shape", ())
        if len(shape) == 0 or (shape[0] == 1 and n != 1):
            kept.append((i, leaf))
            continue
        b = shape[0]
        if n % b:
            raise ValueError(
                f"chunked: cond leaf {i} has leading size {b}, which divides neither the "
                f"{n} particles nor is 1 (cond leaves are batch-first: B = N per particle, "
                "B = 1 shared, or B dividing N, particle i using row i // (N / B))"
            )
        per_row.append((i, leaf if b == n else jnp.repeat(leaf, n // b, axis=0)))

    def rebuild(chunk_rows: list[Array]) -> Any:
        out = dict(kept)
        out.update({i: leaf for (i, _), leaf in zip(per_row, chunk_rows, strict=True)})
        return jax.tree.unflatten(treedef, [out[i] for i in range(len(leaves))])

    return [leaf for _, leaf in per_row], rebuild


# --------------------------------------------------------------------------- flow models


@dataclasses.dataclass(frozen=True)
class ChunkedApply:
    """Static apply of :func:`chunked` (a frozen dataclass: hashed by value, so rebuilding the
    wrapper never recompiles)."""

    inner: ApplyFn
    max_batch: int

    def __call__(self, params: PyTree, x: Array, t: Array, cond: Any = None) -> Array:
        n = x.shape[0]
        cond_rows, rebuild = split_cond(cond, n)

        def rows(chunk):
            xc, tc, cc = chunk
            return self.inner(params, xc, tc, rebuild(cc))

        t = jnp.broadcast_to(jnp.asarray(t), (n,))
        return map_rows(rows, (x, t, cond_rows), self.max_batch)


def chunked(model: FlowModel, max_batch: int) -> FlowModel:
    """``model`` with its velocity evaluated ``max_batch`` particles at a time.

    Args:
        model: any :class:`~tts_jax.models.base.FlowModel` (a DiT, a text-to-image pipeline's
            flow, a Gaussian mixture); a guided model still doubles each chunk internally.
        max_batch: rows per forward (static).

    Returns:
        The same model (params, interpolant, sample shape) with a chunked ``apply``: same
        outputs, peak activation memory of ``max_batch`` rows.
    """
    max_batch = _check_max_batch(max_batch, "chunked")
    apply = ChunkedApply(model.apply, max_batch)
    return FlowModel(model.params, apply, model.interpolant, model.sample_shape)


# --------------------------------------------------------------------------- rewards


@dataclasses.dataclass(frozen=True)
class ChunkedRewardApply:
    """Static apply of :func:`chunked_reward`."""

    inner: RewardFn
    max_batch: int

    def __call__(self, params: PyTree, x: Array, cond: Any = None) -> Array:
        cond_rows, rebuild = split_cond(cond, x.shape[0])

        def rows(chunk):
            xc, cc = chunk
            return self.inner(params, xc, rebuild(cc))

        return map_rows(rows, (x, cond_rows), self.max_batch)


def chunked_reward(reward: Reward, max_batch: int) -> Reward:
    """``reward`` scored ``max_batch`` particles at a time (same name, params and values).

    The reward must score each particle on its own (not a rank within the batch).
    """
    max_batch = _check_max_batch(max_batch, "chunked_reward")
    return Reward(reward.params, ChunkedRewardApply(reward.apply, max_batch), reward.name)


# --------------------------------------------------------------------------- language models


@dataclasses.dataclass(frozen=True)
class ChunkedPrefill:
    """Static ``prefill_fn`` of :func:`chunked_language_model`: tokens, cache rows and lengths
    move together, chunk by chunk."""

    inner: Callable
    max_batch: int

    def __call__(self, params, tokens: Array, cache: PyTree, lengths: Array):
        def rows(chunk):
            return self.inner(params, *chunk)

        return map_rows(rows, (tokens, cache, lengths), self.max_batch)


@dataclasses.dataclass(frozen=True)
class ChunkedDecode:
    """Static ``decode_fn`` of :func:`chunked_language_model`."""

    inner: Callable
    max_batch: int

    def __call__(self, params, token: Array, cache: PyTree, feed: Array):
        def rows(chunk):
            return self.inner(params, *chunk)

        return map_rows(rows, (token, cache, feed), self.max_batch)


def chunked_language_model(model: Any, max_batch: int) -> LanguageModel:
    """``model`` (a :class:`~tts_jax.models.base.LanguageModel` or a model with an adapter, e.g.
    the NNX :class:`~tts_jax.models.lm.LM`) with prefill and decode run ``max_batch`` rows at a
    time; each chunk's KV-cache rows go through the model with its tokens. ``init_cache`` is
    unchanged (the cache is particle state, allocated for every row).
    """
    max_batch = _check_max_batch(max_batch, "chunked_language_model")
    lm = as_language_model(model)
    return LanguageModel(
        lm.params,
        lm.init_cache_fn,
        ChunkedPrefill(lm.prefill_fn, max_batch),
        ChunkedDecode(lm.decode_fn, max_batch),
        lm.vocab_size,
    )


# --------------------------------------------------------------------------- step scorers


@dataclasses.dataclass(frozen=True)
class ChunkedScorer:
    """A :class:`~tts_jax.rewards.base.StepScorer` whose ``update`` and ``read`` run ``max_batch``
    rows at a time: the scorer state's rows (e.g. a PRM's KV cache) move with their completions.
    ``init`` is the inner scorer's (the state is particle state, built for every row)."""

    inner: StepScorer
    max_batch: int

    def init(self, params, prompt, prompt_length, num_particles: int, max_new_tokens: int):
        return self.inner.init(params, prompt, prompt_length, num_particles, max_new_tokens)

    def update(
        self,
        params,
        state,
        completion: Array,
        length: Array,
        step_ends: Array,
        window: int,
        how: Aggregation,
        needed=True,
    ):
        def rows(chunk):
            return self.inner.update(params, *chunk, window, how, needed)

        return map_rows(rows, (state, completion, length, step_ends), self.max_batch)

    def read(self, params, state, completion, length, step_ends, how, needed=True) -> Array:
        def rows(chunk):
            return self.inner.read(params, *chunk, how, needed)

        return map_rows(rows, (state, completion, length, step_ends), self.max_batch)


def chunked_scorer(scorer: StepScorer | SequenceScoreFn, max_batch: int) -> ChunkedScorer:
    """``scorer`` (a :class:`~tts_jax.rewards.base.StepScorer`, or a whole-sequence function
    ``fn(params, tokens, step_ends)``, made a ``RescoringScorer``) scoring ``max_batch`` particles
    at a time; a frozen dataclass, so it is a static, hashable argument of the LM samplers."""
    max_batch = _check_max_batch(max_batch, "chunked_scorer")
    return ChunkedScorer(as_step_scorer(scorer), max_batch)
