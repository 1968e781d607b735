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


def time_pair(fn: Callable[[], object], ref: Callable[[], object], repeats: int = 5):
    """Time ``fn`` against ``ref`` in alternating calls after one warm-up call of each.

    Returns ``(first call seconds of fn incl. compile, median fn seconds, median ref seconds,
    median of the per-repeat ratios fn / ref)``. Alternating the two cancels slow changes of
    the machine's load that would bias two separate medians.
    """
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    jax.block_until_ready(ref())
    fn_times, ref_times = [], []
    for _ in range(repeats):
        for call, times in ((ref, ref_times), (fn, fn_times)):
            start = time.perf_counter()
            jax.block_until_ready(call())
            times.append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(fn_times, ref_times, strict=True)]
    return (first, statistics.median(fn_times), statistics.median(ref_times),
            statistics.median(ratios))
