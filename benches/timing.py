"""The wall-clock loop the benchmark scripts share (pytest-benchmark runs the suites themselves)."""

from __future__ import annotations

import time
from typing import Callable, List


def times_ms(fn: Callable[[], object], reps: int, warmup: int) -> List[float]:
    """Wall times of ``reps`` calls of ``fn`` in milliseconds, sorted, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)


def median_ms(fn: Callable[[], object], reps: int = 8, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in milliseconds (the upper one of an even count)."""
    times = times_ms(fn, reps, warmup)
    return times[len(times) // 2]
