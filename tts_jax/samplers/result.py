"""The result every sampler returns, and the checks shared by all of them.

Non-finite values (docs/policies.md): a reward of NaN or ``+inf`` is invalid. Inside the jitted
loop it is replaced by ``-inf`` (never selected, zero weight) and counted; after the run it is
an error unless ``nan_policy="drop"``. A ``-inf`` reward is valid and rejects its sample.
Non-finite numeric hyper-parameters are an error at the call, before tracing.
"""

from __future__ import annotations

from collections.abc import Mapping
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


NAN_POLICIES = ("raise", "drop")


def check_nan_policy(method: str, nan_policy: str) -> None:
    """Reject an unknown ``nan_policy`` (host-side, before tracing)."""
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"{method}: unknown nan_policy {nan_policy!r}; known: {NAN_POLICIES}")


def check_finite_hyperparameters(method: str, values: Mapping[str, Any]) -> None:
    """Host-side check, before tracing, that every numeric hyper-parameter is finite.

    A NaN or infinite ``lam`` (or diffusion norm, cosine, ...) would otherwise run to the end and
    come back as dead particles or NaN samples. ``None`` values and traced values (the sampler
    called inside someone's ``jit``) are skipped: they cannot be read on the host.

    Args:
        method: sampler name, used in the message.
        values: ``argument name -> value`` (scalars or arrays of any shape).

    Raises:
        ValueError: naming the first argument with a NaN or infinite entry and its value.
    """
    for name, value in values.items():
        if value is None or isinstance(value, jax.core.Tracer):
            continue
        arr = np.asarray(value)
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            shown = arr.item() if arr.ndim == 0 else arr.tolist()
            raise ValueError(f"{method}: {name} must be finite, got {shown}")


def reward_name(reward: Any) -> str:
    """``reward.name`` when it has one, else its type's name (for error messages)."""
    name = getattr(reward, "name", None)
    return name if isinstance(name, str) and name else type(reward).__name__


def check_finite_rewards(
    result: SampleResult, method: str, reward: Any = None, nan_policy: str = "raise"
) -> SampleResult:
    """Host-side check after a run: NaN and ``+inf`` rewards are an error under
    ``nan_policy="raise"``, naming the method, the reward and the count of each.

    Samplers count both kinds inside the jitted loop (``info["num_nan_rewards"]`` and
    ``info["num_inf_rewards"]``) and treat them alike: the sample is never selected and gets
    zero weight (see :func:`mask_invalid_rewards`). That is the documented fallback under
    ``nan_policy="drop"``; under ``"raise"`` a run that saw any is an error. ``-inf`` is a legal
    reward (it rejects its sample) and is never counted.

    Args:
        result: the finished :class:`SampleResult`.
        method: sampler name, used in the message.
        reward: the steering reward (its ``name`` goes in the message).
        nan_policy: ``raise`` or ``drop`` (``drop`` returns ``result`` unchecked).

    Returns:
        ``result`` unchanged.
    """
    if nan_policy == "drop":
        return result
    nan = int(np.asarray(result.info.get("num_nan_rewards", 0)).sum())
    inf = int(np.asarray(result.info.get("num_inf_rewards", 0)).sum())
    if nan or inf:
        counts = (("NaN", nan), ("+inf", inf))
        returned = " and ".join(f"{kind} in {n} evaluations" for kind, n in counts if n)
        raise ValueError(
            f"{method}: reward {reward_name(reward)!r} returned {returned}; a reward must be a "
            "real number or -inf (which rejects its sample). Pass nan_policy='drop' to never "
            "select such samples (zero weight) instead"
        )
    return result


def held_out_scores(held_out, samples: Array, cond: Any = None) -> dict[str, Array]:
    """Held-out rewards of the returned samples, ``name -> [N]`` (never used for selection).

    Args:
        held_out: ``{name: Reward}`` or a sequence of rewards (keyed by ``Reward.name``).
    """
    items = held_out.items() if isinstance(held_out, dict) else ((r.name, r) for r in held_out)
    return {name: reward(samples, cond) for name, reward in items}


def mask_invalid_rewards(rewards: Array) -> tuple[Array, Array]:
    """Replace the invalid rewards, NaN and ``+inf``, by ``-inf`` (never selected, zero weight).

    Runs inside jit. ``-inf`` is a valid reward ("reject this sample") and is kept as is.

    Args:
        rewards: ``Float[N]``.

    Returns:
        ``(rewards Float[N], invalid Bool[2, N])``: row 0 marks the NaN rewards, row 1 the
        ``+inf`` ones; :func:`count_invalid` turns it into the two counts.
    """
    invalid = jnp.stack([jnp.isnan(rewards), jnp.isposinf(rewards)])
    return jnp.where(invalid[0] | invalid[1], -jnp.inf, rewards), invalid


def count_invalid(invalid: Array) -> Array:
    """``Int32[2]`` counts (NaN, ``+inf``) of an ``invalid Bool[2, ...]`` mask from
    :func:`mask_invalid_rewards`."""
    return jnp.sum(invalid.reshape(2, -1), axis=1, dtype=jnp.int32)


def invalid_reward_info(counts: Array) -> dict[str, Array]:
    """The ``info`` entries every image sampler reports from ``counts Int32[2]``:
    ``num_nan_rewards`` and ``num_inf_rewards`` (``+inf`` evaluations)."""
    return {"num_nan_rewards": counts[0], "num_inf_rewards": counts[1]}
