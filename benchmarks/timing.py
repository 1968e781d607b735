"""Timing helpers for the benchmarks: compile time apart, median of repetitions after warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def time_call(fn: Callable[[], object], repeats: int = 5) -> tuple[float, float]:
    """``(first call seconds incl. compile, median seconds of the next repeats)``."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def interleaved(
    fns: dict[str, Callable[[], object]],
    rounds: int = 7,
    budget: float = 0.03,
    min_reps: int = 3,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Per-name median seconds and the per-round times, measured in alternating rounds.

    Each round calls every function ``reps`` times (about ``budget`` seconds each, at least
    ``min_reps``) and keeps the median; one warm-up call of each comes first. Alternating cancels
    slow changes of the machine's load that would bias separate medians.
    """
    reps = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn())
        took = max(time.perf_counter() - start, 1e-6)
        reps[name] = max(min_reps, min(500, int(budget / took)))
    per_round = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times = []
            for _ in range(reps[name]):
                start = time.perf_counter()
                jax.block_until_ready(fn())
                times.append(time.perf_counter() - start)
            per_round[name].append(statistics.median(times))
    return {name: statistics.median(t) for name, t in per_round.items()}, per_round


def median_ratio(per_round: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``a``'s time over ``b``'s (from :func:`interleaved`)."""
    return statistics.median(x / y for x, y in zip(per_round[a], per_round[b], strict=True))


def time_pair(fn: Callable[[], object], ref: Callable[[], object], repeats: int = 5):
    """Time ``fn`` against ``ref`` in ``repeats`` alternating single calls.

    Returns ``(first call seconds of fn incl. compile, median fn seconds, median ref seconds,
    median of the per-repeat ratios fn / ref)``.
    """
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    med, per_round = interleaved({"fn": fn, "ref": ref}, rounds=repeats, budget=0.0, min_reps=1)
    return first, med["fn"], med["ref"], median_ratio(per_round, "fn", "ref")
