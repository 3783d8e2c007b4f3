"""The wall-clock loop the benchmark scripts share (pytest-benchmark runs the suites themselves)."""

from __future__ import annotations

import time
from typing import Callable, List, Tuple


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


def warm_process(seconds: float = 1.0) -> None:
    """About ``seconds`` of parallel torch and moerust work, to run before the first timing.

    Why: the first cases of a fresh process ran 10-100x slower on the lent VM for a while (its
    threads and pages were still being set up), which a 10-round benchmark cannot average away;
    a d=64 layer timed right after two warm-up steps took 2.5-3x its time in a warmed process.
    """
    import torch

    from moerust import ops

    x = torch.randn(8192, 256, requires_grad=True)
    a = torch.randn(512, 512)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        probs = ops.softmax(x[:, :64])
        idx = ops.topk_route(probs.detach(), 2)
        plan = ops.dispatch_plan(idx, 64)
        ops.combine(ops.gather(x, plan), probs.gather(1, idx), plan).sum().backward()
        a @ a


def layer_step_args(argv: List[str]) -> Tuple[int, str, List[int]]:
    """``THREADS [VARIANT [d ff E k T]]`` of the layer-step scripts (default: moerust, the d=64
    config): sets torch's thread count and warms the process; returns the three."""
    import torch

    threads = int(argv[0])
    variant = argv[1] if len(argv) > 1 else "moerust"
    dims = [int(v) for v in argv[2:7]] if len(argv) > 2 else [64, 256, 8, 2, 1024]
    torch.set_num_threads(threads)
    warm_process()
    return threads, variant, dims
