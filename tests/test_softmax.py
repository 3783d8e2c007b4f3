"""softmax: Rust == torch twin (torch.softmax) == a plain-Python reference; gradients; errors."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moerust
from moerust import ops
from moerust.ops import router_softmax as softmax_module

def _kernel(logits: torch.Tensor) -> torch.Tensor:
    """The custom op itself (``ops.softmax`` sends small batches straight to torch.softmax)."""
    return torch.ops.moerust.softmax(logits.reshape(-1, logits.shape[-1]).contiguous()).reshape(logits.shape)


SPECIAL = [0.0, -0.0, 1.0, 1.0, -3.5, 80.0, -80.0, 1e30, -1e30, math.inf, -math.inf, math.nan]


@st.composite
def logit_matrices(draw: Any) -> torch.Tensor:
    """``[T, E]`` logits: random normal rows, or rows drawn from special values (ties, +-inf,
    NaN, huge); T may be 0, E spans the short (unrolled) and long (lane) paths."""
    t = draw(st.integers(0, 20))
    e = draw(st.integers(1, 70))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    if draw(st.booleans()):
        vals = draw(st.lists(st.sampled_from(SPECIAL), min_size=t * e, max_size=t * e))
        return torch.tensor(vals, dtype=dtype).view(t, e)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return (torch.randn(t, e, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 3.0, 30.0]))).to(dtype)


def _reference(row: list) -> list:
    """Softmax of one row in plain Python (float64), torch's rules for special values."""
    if any(math.isnan(v) for v in row) or any(v == math.inf for v in row) or all(v == -math.inf for v in row):
        return [math.nan] * len(row)
    m = max(row)
    ex = [math.exp(v - m) for v in row]
    s = sum(ex)
    return [v / s for v in ex]


@settings(max_examples=80, deadline=None)
@given(logits=logit_matrices())
def test_backends_agree_with_each_other_and_the_reference(logits: torch.Tensor) -> None:
    with moerust.use_backend("rust"):
        rust = _kernel(logits)
    with moerust.use_backend("torch"):
        twin = _kernel(logits)
    torch.testing.assert_close(twin, torch.softmax(logits, dim=-1), equal_nan=True, rtol=0, atol=0)
    # float32: a few ulp apart (the kernel's exp); entries below ~1e-38 may be 0 against a denormal
    tol = dict(rtol=2e-6, atol=1e-37) if logits.dtype == torch.float32 else dict(rtol=1e-13, atol=1e-300)
    torch.testing.assert_close(rust, twin, equal_nan=True, **tol)
    # The reference works in float64; float32 rounds x - max to 24 bits, an error that exp scales
    # by |x - max|.
    eps = 6e-8 if logits.dtype == torch.float32 else 1e-15
    for got, row in zip(rust.double().tolist(), logits.double().tolist()):
        want = _reference(row)
        finite = [v for v in row if not math.isnan(v)]
        m = max(finite) if finite else 0.0
        for g, w, v in zip(got, want, row):
            spread = abs(v - m) if math.isfinite(v - m) else 0.0
            assert (math.isnan(g) and math.isnan(w)) or abs(g - w) <= 8 * eps * (1 + spread) * abs(w) + 1e-37, (g, w, v)


@settings(max_examples=40, deadline=None)
@given(t=st.integers(0, 12), e=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_gradients_agree(t: int, e: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g, dtype=torch.float64)
    up = torch.randn(t, e, generator=g, dtype=torch.float64)
    grads = {}
    for name in ("rust", "torch"):
        x = logits.clone().requires_grad_(True)
        with moerust.use_backend(name):
            _kernel(x).backward(up)
        grads[name] = x.grad
    ref = logits.clone().requires_grad_(True)
    torch.softmax(ref, dim=-1).backward(up)
    torch.testing.assert_close(grads["rust"], ref.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads["torch"], ref.grad, rtol=1e-12, atol=1e-14)


def test_gradcheck(backend: str) -> None:
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_kernel, (x,))
    assert torch.autograd.gradcheck(ops.softmax, (x,))


def test_any_rank_and_one_expert(backend: str) -> None:
    x = torch.randn(2, 3, 5)
    torch.testing.assert_close(ops.softmax(x), torch.softmax(x, -1))
    big = torch.randn(3, softmax_module.kernel_min_rows(7, torch.get_num_threads()), 7) * 4  # through the kernel
    torch.testing.assert_close(ops.softmax(big), torch.softmax(big, -1), rtol=2e-6, atol=1e-37)
    torch.testing.assert_close(_kernel(x), torch.softmax(x, -1))
    v = torch.randn(4)
    torch.testing.assert_close(ops.softmax(v), torch.softmax(v, -1))
    assert torch.equal(ops.softmax(torch.randn(6, 1)), torch.ones(6, 1))
    assert ops.softmax(torch.zeros(0, 3)).shape == (0, 3)
    assert ops.softmax(torch.zeros(3, 0)).shape == (3, 0)


@pytest.mark.parametrize(
    "logits,exc,needle",
    [([1.0, 2.0], TypeError, "logits"), (torch.tensor(1.0), ValueError, "logits"), (torch.ones(3, 2, dtype=torch.int64), TypeError, "logits")],
)
def test_bad_input(backend: str, logits: Any, exc: type, needle: str) -> None:
    with pytest.raises(exc, match=needle):
        ops.softmax(logits)


def test_non_contiguous_input_is_left_alone() -> None:
    base = torch.randn(8, 6)
    x = base.t()
    before = x.clone()
    torch.testing.assert_close(_kernel(x), torch.softmax(x, -1))
    assert torch.equal(x, before)


@pytest.mark.parametrize("rows", [100, 9000])
def test_public_softmax_under_torch_compile_fullgraph(rows: int) -> None:
    """Both paths of ops.softmax (torch.softmax below kernel_min_rows, the kernel above) trace
    without a graph break, and give torch's values and gradients."""
    x = torch.randn(rows, 8, requires_grad=True)
    compiled = torch.compile(lambda t: ops.softmax(t).square().sum(), fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.backward()
    ref = x.detach().clone().requires_grad_(True)
    want = torch.softmax(ref, -1).square().sum()
    want.backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-7)


def test_torch_compile_fullgraph() -> None:
    x = torch.randn(16, 8, requires_grad=True)
    compiled = torch.compile(lambda t: _kernel(t).square().sum(), fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.backward()
    ref = x.detach().clone().requires_grad_(True)
    torch.softmax(ref, -1).square().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)


def test_opcheck() -> None:
    x = torch.randn(6, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.moerust.softmax.default, (x,))
