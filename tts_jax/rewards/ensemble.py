"""Verifier ensemble by mean rank (Ma et al. 2025, "Inference-Time Scaling for Diffusion Models
beyond Scaling Denoising Steps": combine verifiers by the mean of their per-candidate ranks).

Each member reward ranks the N candidates of the batch (1 = worst, N = best, ties get their
average rank, as ``scipy.stats.rankdata(method="average")``); the ensemble reward is the mean rank
over members. Ranks make members with different scales (log-probabilities, margins, CLIP-like
scores) comparable and are invariant to any strictly increasing transform of a member.

The score is relative to the batch: a candidate's value depends on the other candidates. That is
right for selection (best-of-N, zero-order search, search over paths, keeping the top-k), but it
is not a fixed function of ``x``, so it is not a valid potential for FK/SMC weights, whose target
``p(x) exp(lambda r(x))`` needs a per-particle reward.

NaN handling: a NaN member reward is ranked as ``-inf`` (worst, tied with other NaN/-inf
candidates), so the ensemble output is always finite.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from tts_jax.rewards.base import Reward, RewardFn

Array = jax.Array


def average_ranks(scores: Array) -> Array:
    """1-based ranks within the batch, ties averaged; NaN ranks as ``-inf``.

    Args:
        scores: ``Float[N]``.

    Returns:
        ``Float32[N]`` in ``[1, N]``; ``sum == N (N + 1) / 2``.
    """
    s = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
    ordered = jnp.sort(s)
    below = jnp.searchsorted(ordered, s, side="left")
    below_or_equal = jnp.searchsorted(ordered, s, side="right")
    return (below + below_or_equal + 1).astype(jnp.float32) / 2.0


@dataclasses.dataclass(frozen=True)
class _MeanRank:
    """Static apply of the ensemble: the member applies, called with the member params."""

    applies: tuple[RewardFn, ...]

    def __call__(self, params: tuple, x: Array, cond: Any) -> Array:
        ranks = [average_ranks(f(p, x, cond)) for f, p in zip(self.applies, params, strict=True)]
        return jnp.mean(jnp.stack(ranks), axis=0)


def mean_rank_ensemble(rewards: Sequence[Reward], name: str = "mean_rank") -> Reward:
    """Combine rewards by the mean of their within-batch average ranks.

    Args:
        rewards: member rewards, each ``x [N, ...] -> Float[N]`` (higher is better).
        name: label in results.

    Returns:
        A :class:`Reward` ``x [N, ...] -> Float32[N]`` in ``[1, N]``, whose params are the tuple
        of member params (so members' weights and hyper-parameters stay dynamic).
    """
    if not rewards:
        raise ValueError("mean_rank_ensemble needs at least one reward")
    return Reward(
        tuple(r.params for r in rewards), _MeanRank(tuple(r.apply for r in rewards)), name
    )
