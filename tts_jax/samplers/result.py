"""The result every sampler returns, and the checks shared by all of them."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class SampleResult(NamedTuple):
    """Output of every image sampler.

    Attributes:
        samples: ``[N, ...]`` final samples (particles, chains or search candidates kept).
        rewards: ``[N]`` steering reward of each sample.
        log_weights: ``[N]`` normalized log-weights (uniform for search methods).
        best: index of the sample with the highest reward.
        nfe: model forward passes spent, counted per particle (int scalar).
        reward_calls: reward evaluations, counted per particle (int scalar).
        log_evidence: ``log Z_hat`` for SMC methods, NaN otherwise.
        info: per-step diagnostics (dict of arrays with a leading step axis).
    """

    samples: Array
    rewards: Array
    log_weights: Array
    best: Array
    nfe: Array
    reward_calls: Array
    log_evidence: Array
    info: dict[str, Any]

    @property
    def best_sample(self) -> Array:
        return self.samples[self.best]

    @property
    def best_reward(self) -> Array:
        return self.rewards[self.best]


def check_finite_rewards(result: SampleResult, method: str) -> SampleResult:
    """Host-side check after a run: NaN rewards are an error that names the method and count.

    Samplers drop particles whose reward is NaN inside the jitted loop (weight / score ``-inf``,
    documented fallback); this turns a run in which that happened into a clear error unless the
    caller asked for the fallback.
    """
    nan = int(np.asarray(result.info.get("num_nan_rewards", 0)).sum())
    if nan:
        raise ValueError(
            f"{method}: the reward returned NaN for {nan} particle evaluations "
            "(pass nan_policy='drop' to give such particles zero weight instead)"
        )
    return result


def held_out_scores(held_out, samples: Array, cond: Any = None) -> dict[str, Array]:
    """Held-out rewards of the returned samples, ``name -> [N]`` (never used for selection).

    Args:
        held_out: ``{name: Reward}`` or a sequence of rewards (keyed by ``Reward.name``).
    """
    items = held_out.items() if isinstance(held_out, dict) else ((r.name, r) for r in held_out)
    return {name: reward(samples, cond) for name, reward in items}


def nan_to_neg_inf(rewards: Array) -> tuple[Array, Array]:
    """``rewards [N]`` with NaN replaced by ``-inf`` (never selected), and the NaN mask
    ``Bool[N]``."""
    nan = jnp.isnan(rewards)
    return jnp.where(nan, -jnp.inf, rewards), nan
