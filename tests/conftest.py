"""Shared fixtures. The suite refuses to run without the Rust extension: a missing build must fail
loudly, never turn into skipped tests."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterator

import pytest
import torch

import moerust


def pytest_configure(config: Any) -> None:
    if not moerust.native_available() and os.environ.get("MOERUST_ALLOW_NO_NATIVE") != "1":
        from moerust import _backend

        raise pytest.UsageError(
            f"moerust._native did not import ({_backend._IMPORT_ERROR}); build it with `pip install .` "
            "(set MOERUST_ALLOW_NO_NATIVE=1 to run the torch-only tests deliberately)"
        )


BACKENDS = ["rust", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request: Any) -> Iterator[str]:
    """Runs the test once per backend."""
    with moerust.use_backend(request.param):
        yield request.param


def on_both(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Dict[str, Any]:
    """Calls ``fn`` under each backend; returns {backend: result or the raised exception}."""
    out: Dict[str, Any] = {}
    for name in BACKENDS:
        with moerust.use_backend(name):
            try:
                out[name] = fn(*args, **kwargs)
            except (ValueError, TypeError) as exc:
                out[name] = exc
    return out


def available_gemms() -> "list[str]":
    """The libraries the expert kernels' products can run on here: the crate always, MKL when
    this torch carries it (the x86-64 Linux wheels do)."""
    from moerust import _backend

    return ["crate"] + (["mkl"] if all(_backend._mkl_entries()) else [])


@pytest.fixture(scope="module", params=available_gemms())
def each_gemm(request: Any) -> Iterator[str]:
    """Runs a module's tests once per GEMM library (module scope: hypothesis allows it)."""
    from moerust import _backend

    with _backend.use_gemm(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
