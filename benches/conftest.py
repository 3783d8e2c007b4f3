"""Benchmark settings: ``MOERUST_BENCH_THREADS`` sets torch's (and so Rust's) thread count;
``MOERUST_BENCH_SIZES=small`` keeps only T <= 8192 for a quick pass."""

from __future__ import annotations

import os

import pytest
import torch

import moerust

from .timing import warm_process

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
    """About a second of parallel torch and moerust work before the first benchmark
    (:func:`benches.timing.warm_process` says why)."""
    warm_process()
