"""expert_mlp: Rust == torch twin == a per-row float64 reference, forward and backward."""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import moerust
from moerust import ops

from .conftest import BACKENDS

# Every test once with the `gemm` crate and once with MKL (when torch carries it).
pytestmark = pytest.mark.usefixtures("each_gemm")


def _reference(xs, w1, w2, counts: List[int], activation: str) -> torch.Tensor:
    """Row by row in float64: expert of row r is the e with offsets[e] <= r < offsets[e+1]."""
    rows = []
    r = 0
    for e, n in enumerate(counts):
        for _ in range(n):
            h = w1[e].double() @ xs[r].double()
            if activation == "swiglu":
                g, u = h.chunk(2)
                a = F.silu(g) * u
            else:
                a = F.gelu(h)
            rows.append(w2[e].double() @ a)
            r += 1
    return torch.stack(rows) if rows else torch.zeros(0, xs.shape[1], dtype=torch.float64)


def _make(counts: List[int], d: int, f: int, activation: str, dtype: torch.dtype, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    e, r = len(counts), sum(counts)
    h1 = 2 * f if activation == "swiglu" else f
    xs = torch.randn(r, d, generator=g, dtype=dtype)
    w1 = torch.randn(e, h1, d, generator=g, dtype=dtype) / d**0.5
    w2 = torch.randn(e, d, f, generator=g, dtype=dtype) / f**0.5
    offsets = torch.tensor([0] + torch.tensor(counts, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int64)
    return xs, w1, w2, offsets


def _run(xs, w1, w2, offsets, activation, grad):
    leaves = [t.detach().clone().requires_grad_(True) for t in (xs, w1, w2)]
    out = ops.expert_mlp(*leaves, offsets, activation)
    grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    return [out.detach()] + [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]


def _assert_backends_agree(xs, w1, w2, offsets, grad, tol: float) -> None:  # type: ignore[no-untyped-def]
    """Output and gradients (SwiGLU) of the Rust kernel equal the torch twin's within ``tol``."""
    res = {}
    for name in BACKENDS:
        with moerust.use_backend(name):
            res[name] = _run(xs, w1, w2, offsets, "swiglu", grad)
    for a, b in zip(res["rust"], res["torch"]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    d=st.integers(1, 12),
    f=st.integers(1, 12),
    activation=st.sampled_from(["swiglu", "gelu"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_backends_agree_with_reference(counts, d, f, activation, dtype) -> None:
    xs, w1, w2, offsets = _make(counts, d, f, activation, dtype)
    grad = torch.randn(xs.shape, dtype=dtype)
    ref = _reference(xs, w1, w2, counts, activation)
    results = {}
    for name in BACKENDS:
        with moerust.use_backend(name):
            results[name] = _run(xs, w1, w2, offsets, activation, grad)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for name, res in results.items():
        torch.testing.assert_close(res[0].double(), ref, **tol, msg=lambda m: f"{name}: {m}")
    for a, b in zip(results["rust"], results["torch"]):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_gradcheck(backend: str, activation: str) -> None:
    xs, w1, w2, offsets = _make([3, 0, 4, 1], 5, 3, activation, torch.float64)
    leaves = tuple(t.requires_grad_(True) for t in (xs, w1, w2))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.expert_mlp(a, b, c, offsets, activation), leaves)


def test_large_tiles_agree() -> None:
    """Enough rows that the Rust kernel splits experts into several tiles across threads."""
    xs, w1, w2, offsets = _make([700, 3, 0, 1300, 257], 48, 40, "swiglu", torch.float32, seed=3)
    _assert_backends_agree(xs, w1, w2, offsets, torch.randn(xs.shape), tol=1e-4)


def test_backward_in_waves_agrees() -> None:
    """A backward whose scratch (rows x (F + 2F) x 8 bytes, 63 MiB here) exceeds the kernel's
    24 MiB budget runs the experts in several waves; the gradients must not change."""
    counts = [1500, 0, 900, 1, 1400, 0]
    xs, w1, w2, offsets = _make(counts, 4, 1000, "swiglu", torch.float64, seed=5)
    _assert_backends_agree(xs, w1, w2, offsets, torch.randn(xs.shape, dtype=torch.float64), tol=1e-10)


def test_edge_cases(backend: str) -> None:
    # no rows at all (capacity 0 / empty batch): zero gradients for the weights
    xs, w1, w2, offsets = _make([0, 0], 4, 3, "swiglu", torch.float32)
    out, dxs, dw1, dw2 = _run(xs, w1, w2, offsets, "swiglu", torch.zeros(0, 4))
    assert out.shape == (0, 4) and dw1.abs().sum() == 0 and dw2.abs().sum() == 0
    # E = 1 is a dense MLP
    xs, w1, w2, offsets = _make([9], 6, 5, "swiglu", torch.float32)
    dense = F.linear(F.silu(F.linear(xs, w1[0][:5])) * F.linear(xs, w1[0][5:]), w2[0])
    torch.testing.assert_close(ops.expert_mlp(xs, w1, w2, offsets), dense, rtol=1e-5, atol=1e-5)
    # NaN / huge inputs propagate like torch (no crash, NaN stays in its row)
    xs[2, 0] = float("nan")
    xs[3, 1] = 3e38
    out = ops.expert_mlp(xs, w1, w2, offsets)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 4, 5, 6, 7, 8]]).all()


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        (dict(activation="relu"), ValueError, "activation"),
        (dict(offsets=torch.tensor([0, 2, 1])), ValueError, "offsets"),
        (dict(offsets=torch.tensor([0, 1])), ValueError, "offsets"),
        (dict(offsets=torch.tensor([0.0, 1.0, 3.0])), TypeError, "offsets"),
        (dict(w1=torch.zeros(2, 7, 4)), ValueError, "w1"),
        (dict(xs=torch.zeros(3, 5)), ValueError, "xs"),
        (dict(w2=torch.zeros(2, 4, 5)), ValueError, "w1"),
        (dict(xs=[[0.0]]), TypeError, "xs"),
    ],
)
def test_bad_input(backend: str, kwargs, exc, needle) -> None:
    args = dict(xs=torch.zeros(3, 4), w1=torch.zeros(2, 6, 4), w2=torch.zeros(2, 4, 3), offsets=torch.tensor([0, 1, 3]), activation="swiglu")
    args.update(kwargs)
    with pytest.raises(exc, match=needle):
        ops.expert_mlp(**args)


def test_dtype_mismatch_is_a_type_error(backend: str) -> None:
    with pytest.raises(TypeError, match="w1"):
        ops.expert_mlp(torch.zeros(3, 4), torch.zeros(2, 6, 4, dtype=torch.float64), torch.zeros(2, 4, 3), torch.tensor([0, 1, 3]))


def test_opcheck() -> None:
    xs, w1, w2, offsets = _make([2, 3], 4, 3, "swiglu", torch.float32)
    for name in BACKENDS:
        with moerust.use_backend(name):
            torch.library.opcheck(torch.ops.moerust.expert_mlp.default, (xs.requires_grad_(), w1, w2, offsets, "swiglu"))

