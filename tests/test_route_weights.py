"""route_weights: Rust == torch twin == autograd of the plain formula; gradients; errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moerust
from moerust import ops

from .strategies import slot_indices


def _formula(probs: torch.Tensor, idx: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """The weights as plain torch ops (autograd gives the reference gradient)."""
    used = idx >= 0
    w = torch.where(used, probs.gather(1, idx.clamp(min=0)), torch.zeros((), dtype=probs.dtype))
    return w / w.sum(dim=-1, keepdim=True).clamp(min=1e-20) if renormalize else w


@settings(max_examples=80, deadline=None)
@given(
    case=slot_indices(max_t=20, max_k=6, max_e=9),
    renormalize=st.booleans(),
    kind=st.sampled_from(["softmax", "zeros", "ties"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_backends_agree_with_the_formula(case: Any, renormalize: bool, kind: str, dtype: torch.dtype, seed: int) -> None:
    idx, e = case
    t, k = idx.shape
    g = torch.Generator().manual_seed(seed)
    if kind == "softmax":
        probs = torch.softmax(torch.randn(t, e, generator=g, dtype=torch.float64), -1).to(dtype)
    elif kind == "zeros":
        probs = torch.zeros(t, e, dtype=dtype)
    else:
        probs = torch.full((t, e), 0.25, dtype=dtype)
    up = torch.randn(t, k, generator=g, dtype=dtype)
    ref_p = probs.clone().requires_grad_(True)
    ref = _formula(ref_p, idx, renormalize)
    ref.backward(up)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for name in ("rust", "torch"):
        p = probs.clone().requires_grad_(True)
        with moerust.use_backend(name):
            w = ops.route_weights(p, idx, renormalize)
            w.backward(up)
        torch.testing.assert_close(w.detach(), ref.detach(), **tol, msg=lambda m: f"{name} weights: {m}")
        # float32 with a zero row divides by 1e-20: compare relative to the scale
        gtol = tol if kind != "zeros" else dict(rtol=1e-5, atol=1e-6 * 1e20)
        if kind == "softmax" and renormalize and dtype == torch.float32:
            # The renormalised gradient is a difference of terms of size |up| / sum, rounded in
            # float32 (with k = 1 it is exactly 0 in theory and ~1e-6 * |up| / sum in practice):
            # scale the absolute tolerance with the largest such term.
            sums = _formula(probs, idx, renormalize=False).sum(-1)
            scale = (up.abs().sum(-1) / sums.clamp(min=1e-20)).max().item() if t else 1.0
            gtol = dict(rtol=1e-5, atol=1e-6 * max(1.0, scale))
        torch.testing.assert_close(p.grad, ref_p.grad, **gtol, msg=lambda m: f"{name} grad: {m}")


def test_gradcheck(backend: str) -> None:
    probs = torch.softmax(torch.randn(6, 5, dtype=torch.float64), -1).requires_grad_(True)
    idx = torch.tensor([[0, 2], [1, -1], [4, 4], [-1, -1], [3, 0], [2, 1]])
    for renormalize in (True, False):
        assert torch.autograd.gradcheck(lambda p: ops.route_weights(p, idx, renormalize), (probs,))


def test_edge_cases(backend: str) -> None:
    assert ops.route_weights(torch.zeros(0, 3), torch.zeros(0, 2, dtype=torch.int64)).shape == (0, 2)
    w = ops.route_weights(torch.tensor([[0.2, 0.8]]), torch.tensor([[1, 0]]))  # k = E
    torch.testing.assert_close(w, torch.tensor([[0.8, 0.2]]))
    assert torch.equal(ops.route_weights(torch.tensor([[0.3]]), torch.tensor([[0]])), torch.tensor([[1.0]]))  # E = 1
    assert torch.equal(ops.route_weights(torch.tensor([[0.3, 0.7]]), torch.tensor([[-1, -1]])), torch.zeros(1, 2))
    assert torch.equal(ops.route_weights(torch.rand(3, 4), torch.zeros(3, 0, dtype=torch.int64)), torch.zeros(3, 0))
    p0 = torch.zeros(2, 0, requires_grad=True)  # no experts: only empty slots
    w0 = ops.route_weights(p0, torch.full((2, 2), -1))
    assert torch.equal(w0, torch.zeros(2, 2))
    w0.sum().backward()
    assert p0.grad.shape == (2, 0)


@pytest.mark.parametrize(
    "probs,idx,kwargs,exc,needle",
    [
        (torch.rand(2, 3), torch.tensor([[0], [3]]), {}, ValueError, "idx"),
        (torch.rand(2, 3), torch.tensor([[0], [-2]]), {}, ValueError, "idx"),
        (torch.rand(2, 3), torch.tensor([[0]]), {}, ValueError, "idx"),
        (torch.rand(2, 3), torch.tensor([[0.0], [1.0]]), {}, TypeError, "idx"),
        (torch.ones(2, 3, dtype=torch.int64), torch.tensor([[0], [1]]), {}, TypeError, "probs"),
        (torch.rand(3), torch.tensor([[0], [1]]), {}, ValueError, "probs"),
        (torch.rand(2, 3), torch.tensor([[0], [1]]), {"renormalize": 1}, TypeError, "renormalize"),
    ],
)
def test_bad_input(backend: str, probs: Any, idx: Any, kwargs: Any, exc: type, needle: str) -> None:
    before = probs.clone()
    with pytest.raises(exc, match=needle):
        ops.route_weights(probs, idx, **kwargs)
    assert torch.equal(probs, before)


def test_int32_index_and_compile() -> None:
    probs = torch.softmax(torch.randn(8, 4), -1).requires_grad_(True)
    idx = torch.tensor([[0, 1], [2, 3]] * 4, dtype=torch.int32)
    torch.testing.assert_close(ops.route_weights(probs, idx), _formula(probs, idx.long(), True))
    compiled = torch.compile(lambda p: ops.route_weights(p, idx.long()).square().sum(), fullgraph=True, backend="aot_eager")
    compiled(probs).backward()
    ref = probs.detach().clone().requires_grad_(True)
    _formula(ref, idx.long(), True).square().sum().backward()
    torch.testing.assert_close(probs.grad, ref.grad)


def test_opcheck() -> None:
    probs = torch.softmax(torch.randn(6, 5), -1).requires_grad_(True)
    idx = torch.tensor([[0, 2], [1, -1], [4, 4], [-1, -1], [3, 0], [2, 1]])
    torch.library.opcheck(torch.ops.moerust.route_weights.default, (probs, idx, True))
