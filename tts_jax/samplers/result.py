"""The result every sampler returns (:class:`Result`: samples, rewards, weights, :class:`Cost`,
:class:`Info`), and the checks shared by all of them.

Non-finite values (docs/policies.md): a reward of NaN or ``+inf`` is invalid. Inside the jitted
loop it is replaced by ``-inf`` (never selected, zero weight) and counted; after the run it is
an error unless ``nan_policy="drop"``. A ``-inf`` reward is valid and rejects its sample.
Non-finite numeric hyper-parameters are an error at the call, before tracing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Cost(NamedTuple):
    """Compute a run spent, counted per particle so that methods compare at equal cost.

    Attributes:
        nfe: int32, model forward passes: one velocity evaluation of one image particle, or one
            LM forward of one row (a prompt prefill counts 1).
        reward_calls: int32, reward / verifier / step-scorer evaluations, one per particle (or
            partial solution) scored.
        tokens: int32, tokens sampled, discarded ones included (0 for image samplers).
    """

    nfe: Array
    reward_calls: Array
    tokens: Array


class Info(NamedTuple):
    """The diagnostics of a run, one name per quantity for every sampler.

    Per-step fields have a leading step axis ``S`` (the SMC steps; ``S = 0`` for search methods,
    which never reweight).

    Attributes:
        num_nan: int32, NaN rewards / potentials / scores seen (such particles get zero weight
            and are never selected, see docs/policies.md).
        num_inf: int32, ``+inf`` rewards seen (treated as NaN; ``-inf`` is a valid rejection).
        ess: ``float32[S]`` effective sample size after reweighting, before resampling.
        resampled: ``bool[S]`` whether the step resampled.
        ancestors: ``int32[S, N]`` ancestor of each particle (identity when not resampled).
        unique_ancestors: ``int32[S]`` distinct ancestors kept.
        held_out: ``name -> float32[N]`` held-out rewards of the returned samples (never used
            for selection).
        extra: the method's own diagnostics (e.g. ``best_reward``, the best-of-n curve of a
            search; ``log_evidence_increment [S]`` of SMC), documented by each method.
    """

    num_nan: Array
    num_inf: Array
    ess: Array
    resampled: Array
    ancestors: Array
    unique_ancestors: Array
    held_out: dict[str, Array]
    extra: dict[str, Any]

    def flat(self) -> dict[str, Any]:
        """One ``name -> array`` dict of every field (``held_out/<name>`` for held-out rewards,
        the ``extra`` entries under their own names), e.g. to save as ``.npz``."""
        out = {k: getattr(self, k) for k in self._fields if k not in ("held_out", "extra")}
        out.update({f"held_out/{k}": v for k, v in self.held_out.items()})
        return {**out, **self.extra}

    def arrays(self) -> dict[str, np.ndarray]:
        """The non-empty array entries (at least one axis) of :meth:`flat` as host numpy, the
        per-step and per-sample diagnostics a run saves (e.g. ``np.savez(file, **arrays)``)."""
        flat = {k: np.asarray(v) for k, v in self.flat().items()}
        return {k: v for k, v in flat.items() if v.ndim >= 1 and v.size}


def make_info(
    num_particles: int,
    *,
    num_nan: Any = 0,
    num_inf: Any = 0,
    steps: Any = None,
    held_out: dict[str, Array] | None = None,
    extra: dict[str, Any] | None = None,
) -> Info:
    """An :class:`Info` (inside jit).

    Args:
        num_particles: ``N`` (the ancestor rows of a run without SMC steps are ``[0, N]``).
        num_nan, num_inf: the counts.
        steps: per-step SMC diagnostics with ``ess``, ``resampled``, ``ancestors`` and
            ``unique_ancestors`` (:class:`tts_jax.smc.SMCInfo` or a dict); ``None`` for a search.
        held_out: held-out rewards.
        extra: the method's own diagnostics.
    """
    if steps is None:
        per_step = (
            jnp.zeros((0,), jnp.float32),
            jnp.zeros((0,), bool),
            jnp.zeros((0, num_particles), jnp.int32),
            jnp.zeros((0,), jnp.int32),
        )
    else:
        get = steps.get if isinstance(steps, Mapping) else functools.partial(getattr, steps)
        per_step = tuple(get(k) for k in ("ess", "resampled", "ancestors", "unique_ancestors"))
    return Info(
        jnp.asarray(num_nan, jnp.int32),
        jnp.asarray(num_inf, jnp.int32),
        *per_step,
        dict(held_out or {}),
        dict(extra or {}),
    )


class Text(NamedTuple):
    """The samples of an LM sampler: ``N`` completions of one prompt.

    Attributes:
        tokens: ``int32[N, L]`` completion tokens (``pad_id`` after ``lengths``).
        lengths: ``int32[N]``.
        finished: ``bool[N]`` a stop token was generated (else truncated or out of steps).
    """

    tokens: Array
    lengths: Array
    finished: Array


class Result(NamedTuple):
    """What every sampler returns, image and text alike.

    Attributes:
        samples: the ``N`` final samples (particles, chains or search candidates kept):
            ``[N, ...]`` arrays for flow models, a :class:`Text` for language models.
        rewards: ``float32[N]`` the steering reward of each sample (LM: the final aggregated
            scorer score, or the final log-potential of token-level SMC).
        log_weights: ``float32[N]`` normalized final log-weights (uniform for searches).
        best: int32 index of the highest-reward live sample.
        log_evidence: ``log Z_hat`` of proper SMC weightings; NaN otherwise; ``-inf`` when
            every particle died.
        all_dead: bool, every particle has zero weight (``best`` is then meaningless).
        cost: :class:`Cost`.
        info: :class:`Info`.
    """

    samples: Any
    rewards: Array
    log_weights: Array
    best: Array
    log_evidence: Array
    all_dead: Array
    cost: Cost
    info: Info

    @property
    def best_sample(self) -> Any:
        """The sample at ``best`` (every leaf indexed)."""
        return jax.tree.map(lambda leaf: leaf[self.best], self.samples)

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
        if arr.dtype.kind not in "fc":
            continue
        # math.isfinite for scalars: a third of np.isfinite(...).all()'s cost, paid per call
        finite = math.isfinite(abs(arr.item())) if arr.ndim == 0 else np.isfinite(arr).all()
        if not finite:
            shown = arr.item() if arr.ndim == 0 else arr.tolist()
            raise ValueError(f"{method}: {name} must be finite, got {shown}")


def reward_name(reward: Any) -> str:
    """``reward.name`` when it has one, else its type's name (for error messages)."""
    name = getattr(reward, "name", None)
    return name if isinstance(name, str) and name else type(reward).__name__


def check_finite_rewards(
    result: Result, method: str, reward: Any = None, nan_policy: str = "raise"
) -> Result:
    """Host-side check after a run: NaN and ``+inf`` rewards are an error under
    ``nan_policy="raise"``, naming the method, the reward and the count of each.

    Samplers count both kinds inside the jitted loop (``info.num_nan`` and
    ``info.num_inf``) and treat them alike: the sample is never selected and gets
    zero weight (see :func:`mask_invalid_rewards`). That is the documented fallback under
    ``nan_policy="drop"``; under ``"raise"`` a run that saw any is an error. ``-inf`` is a legal
    reward (it rejects its sample) and is never counted.

    Args:
        result: the finished :class:`Result`.
        method: sampler name, used in the message.
        reward: the steering reward (its ``name`` goes in the message).
        nan_policy: ``raise`` or ``drop`` (``drop`` returns ``result`` unchecked).

    Returns:
        ``result`` unchanged.
    """
    if nan_policy == "drop":
        return result
    nan, inf = to_host(result.info.num_nan, result.info.num_inf)
    raise_for_invalid_rewards(method, reward, int(nan), int(inf))
    return result


def to_host(*arrays: Any) -> tuple[np.ndarray, ...]:
    """Host copies of a finished run's arrays (e.g. the scalars a check reads), one
    ``np.asarray`` each: on CPU ~5 us per scalar, where ``jax.device_get`` of the tuple spends
    ~60 us in its tree and async-copy machinery, a visible part of a sub-millisecond run."""
    return tuple(np.asarray(a) for a in arrays)


def raise_for_invalid_rewards(method: str, reward: Any, nan: int, inf: int) -> None:
    """The error of :func:`check_finite_rewards` for ``nan`` NaN and ``inf`` ``+inf`` reward
    evaluations (nothing when both are 0)."""
    if nan or inf:
        counts = (("NaN", nan), ("+inf", inf))
        returned = " and ".join(f"{kind} in {n} evaluations" for kind, n in counts if n)
        raise ValueError(
            f"{method}: reward {reward_name(reward)!r} returned {returned}; a reward must be a "
            "real number or -inf (which rejects its sample). Pass nan_policy='drop' to never "
            "select such samples (zero weight) instead"
        )


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
