"""The expert kernels on each GEMM library: MKL and the `gemm` crate agree, and the crate's
column layout (which MKL runs only for d >= 512) agrees with the torch twin. Each test picks its
libraries itself, so this module runs once (tests/test_expert_mlp.py runs its tests once per
library)."""

from __future__ import annotations

from typing import List

import pytest
import torch

import moerust
from moerust import _backend, ops

from .conftest import available_gemms
from .test_expert_mlp import _assert_backends_agree, _make, _run


def test_column_layout_agrees() -> None:
    """A wide model on several threads with short row tiles runs the crate's kernel by column
    blocks (``rust/expert_columns.rs``): 1303 rows over 4 threads give tiles of 112 rows, d = 128."""
    xs, w1, w2, offsets = _make([600, 3, 0, 700], 128, 40, "swiglu", torch.float32, seed=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with _backend.use_gemm("crate"):  # with MKL d = 128 runs by rows
            _assert_backends_agree(xs, w1, w2, offsets, torch.randn(xs.shape), tol=1e-4)
            for activation in ("swiglu", "gelu"):
                x64, a64, b64, off = _make([600, 3, 0, 700], 128, 40, activation, torch.float64, seed=6)
                leaves = [t.requires_grad_(True) for t in (x64, a64, b64)]
                out = ops.expert_mlp(*leaves, off, activation)
                grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
                with moerust.use_backend("torch"):
                    out_t = ops.expert_mlp(*leaves, off, activation)
                    grads_t = torch.autograd.grad(out_t, leaves, torch.ones_like(out_t))
                for got, want in zip([out, *grads], [out_t, *grads_t]):
                    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(len(available_gemms()) < 2, reason="this torch build carries no MKL to compare the crate with")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("counts, d, f", [([700, 3, 0, 1300, 257], 48, 40), ([1, 1], 1, 1), ([0, 90], 3, 1), ([2000], 130, 70)])
def test_gemm_libraries_agree(counts: List[int], d: int, f: int, dtype: torch.dtype) -> None:
    """The expert kernels give the same values (to rounding) on MKL and on the `gemm` crate, on
    four threads (short row tiles, the column layout for the crate) and on one."""
    xs, w1, w2, offsets = _make(counts, d, f, "swiglu", dtype, seed=5)
    grad = torch.randn(xs.shape, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    threads = torch.get_num_threads()
    try:
        for n in (4, 1):
            torch.set_num_threads(n)
            res = {}
            for gemm in ("mkl", "crate"):
                with _backend.use_gemm(gemm), moerust.use_backend("rust"):
                    assert _backend.get_gemm() == gemm
                    res[gemm] = _run(xs, w1, w2, offsets, "swiglu", grad)
            for a, b in zip(res["mkl"], res["crate"]):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    finally:
        torch.set_num_threads(threads)
