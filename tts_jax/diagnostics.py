"""Weight-degeneracy checks on the per-step diagnostics of particle methods.

A particle method whose importance weights collapse onto one or two particles still returns N
samples, but they are copies of a handful of ancestors and its estimates are no better than those
of one or two samples: a reward tilt that is too sharp (a large inverse temperature) does this
without any error. :func:`weight_collapse` reads the per-step ESS and ancestor counts that every
SMC-type sampler reports and says whether, and where, this happened.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

MIN_ESS_FRACTION = 0.05
MIN_UNIQUE_ANCESTORS = 2


def weight_collapse(
    info: Mapping[str, Any],
    num_particles: int,
    min_ess_fraction: float = MIN_ESS_FRACTION,
    min_unique_ancestors: int = MIN_UNIQUE_ANCESTORS,
) -> dict[str, Any] | None:
    """Summarize the weight degeneracy of one run from its per-step diagnostics.

    A step *collapses* when its ESS (before resampling) falls below ``min_ess_fraction * N`` or,
    at a resampling step, fewer than ``min_unique_ancestors`` distinct particles survive.

    Args:
        info: per-step diagnostics with ``ess [K]`` and optionally ``resampled [K]`` and
            ``unique_ancestors [K]`` (the :class:`~tts_jax.smc.SMCInfo` fields; leading axes
            beyond the step axis, e.g. problems, are flattened), e.g. ``Result.info.flat()``.
        num_particles: N.
        min_ess_fraction: collapse threshold on ``ESS / N``.
        min_unique_ancestors: collapse threshold on distinct ancestors at a resampling step.

    Returns:
        ``None`` when ``info`` has no (or an empty) ``ess`` (not a weighted particle method);
        else
        ``{"collapsed", "min_ess", "min_ess_fraction", "min_unique_ancestors",
        "collapsed_steps", "first_collapsed_step"}`` (``min_unique_ancestors`` is ``None`` when
        the method never resampled or does not report ancestors).
    """
    if "ess" not in info or np.size(info["ess"]) == 0 or num_particles < 1:
        return None
    ess = np.asarray(info["ess"], np.float64)
    ess = ess.reshape(-1, ess.shape[-1]) if ess.ndim > 1 else ess[None]
    low = ess < min_ess_fraction * num_particles
    unique_min = None
    if "unique_ancestors" in info and "resampled" in info:
        unique = np.asarray(info["unique_ancestors"]).reshape(ess.shape)
        resampled = np.asarray(info["resampled"], bool).reshape(ess.shape)
        few = resampled & (unique < min_unique_ancestors)
        low = low | few
        if resampled.any():
            unique_min = int(unique[resampled].min())
    steps = sorted({int(k) for k in np.nonzero(low)[1]})
    return {
        "collapsed": bool(steps),
        "min_ess": float(ess.min()),
        "min_ess_fraction": float(ess.min() / num_particles),
        "min_unique_ancestors": unique_min,
        "collapsed_steps": steps,
        "first_collapsed_step": steps[0] if steps else None,
    }


def collapse_message(what: str, summary: dict[str, Any] | None, num_particles: int) -> str | None:
    """A one-line warning for a collapsed run (``None`` when it did not collapse)."""
    if not summary or not summary["collapsed"]:
        return None
    unique = summary["min_unique_ancestors"]
    survivors = "" if unique is None else f", {unique} distinct ancestors survived a resampling"
    return (
        f"{what}: the particle weights collapsed (ESS {summary['min_ess']:.1f} of "
        f"{num_particles} at step {summary['first_collapsed_step']}{survivors}); the samples are "
        "copies of very few particles: lower the inverse temperature (--lam) or add particles"
    )
