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
