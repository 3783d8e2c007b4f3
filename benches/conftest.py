"""Benchmark settings: ``MOERUST_BENCH_THREADS`` sets torch's (and so Rust's) thread count;
``MOERUST_BENCH_SIZES=small`` keeps only T <= 8192 for a quick pass."""

from __future__ import annotations

import os

import pytest
import torch

import moerust

THREADS = int(os.environ.get("MOERUST_BENCH_THREADS", str(torch.get_num_threads())))
SMALL = os.environ.get("MOERUST_BENCH_SIZES", "") == "small"
torch.set_num_threads(THREADS)

if not moerust.native_available():
    raise pytest.UsageError("benchmarks compare Rust with torch: build the extension first (pip install .)")


def pytest_benchmark_update_json(config, benchmarks, output_json):  # type: ignore[no-untyped-def]
    output_json["moerust"] = {"threads": THREADS, "torch": torch.__version__}


@pytest.fixture(autouse=True)
def _seed() -> None:
    # Both backends of a case must see the same inputs for the agreement checks.
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _warm_process() -> None:
    """About a second of parallel torch and moerust work before the first benchmark.

    Why: the first cases of a fresh process ran 10-100x slower on the lent VM for a while (its
    threads and pages were still being set up), which a 10-round benchmark cannot average away.
    """
    import time

    from moerust import ops

    x = torch.randn(8192, 256, requires_grad=True)
    a = torch.randn(512, 512)
    end = time.perf_counter() + 1.0
    while time.perf_counter() < end:
        probs = ops.softmax(x[:, :64])
        idx = ops.topk_route(probs.detach(), 2)
        plan = ops.dispatch_plan(idx, 64)
        ops.combine(ops.gather(x, plan), probs.gather(1, idx), plan).sum().backward()
        a @ a
