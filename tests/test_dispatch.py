"""dispatch_plan, gather and combine: Rust == torch twin == reference; gradients; torch.compile."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moerust
from moerust import ops

from . import reference
from .conftest import on_both
from .strategies import slot_indices


def plan_tuple(p: ops.Plan):
    return (p.counts.tolist(), p.offsets.tolist(), p.row_token.tolist(), p.row_slot.tolist(), p.slot_row.tolist(), p.dropped)


@settings(max_examples=200, deadline=None)
@given(case=slot_indices(), capacity=st.one_of(st.none(), st.integers(0, 6)), int32=st.booleans())
def test_plan_backends_agree_with_reference(case, capacity: Optional[int], int32: bool) -> None:
    idx, e = case
    if int32:
        idx = idx.to(torch.int32)
    got = on_both(ops.dispatch_plan, idx, e, capacity)
    expected = reference.plan(idx.tolist(), e, capacity)
    for name, plan in got.items():
        assert plan_tuple(plan) == tuple(expected), name
        assert plan.num_experts == e and plan.capacity == capacity
        for t in (plan.counts, plan.offsets, plan.row_token, plan.row_slot, plan.slot_row):
            assert t.dtype == torch.int64


@settings(max_examples=120, deadline=None)
@given(case=slot_indices(), capacity=st.one_of(st.none(), st.integers(0, 4)), d=st.integers(1, 9),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 1000))
def test_gather_combine_values_and_grads_agree(case, capacity, d, dtype, seed) -> None:
    idx, e = case
    t, k = idx.shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g, dtype=dtype)
    w = torch.randn(t, k, generator=g, dtype=dtype)
    # Garbage in the weights of empty slots must not matter.
    w = torch.where(idx < 0, torch.full_like(w, float("nan")), w)
    upstream = torch.randn(t, d, generator=g, dtype=dtype)
    results = {}
    for name in ("rust", "torch"):
        with moerust.use_backend(name):
            plan = ops.dispatch_plan(idx, e, capacity)
            xr = x.clone().requires_grad_()
            wr = w.clone().requires_grad_()
            xs = ops.gather(xr, plan)
            y = ops.combine(xs * 1.5, wr, plan)
            y.backward(upstream)
            results[name] = (xs.detach(), y.detach(), xr.grad, wr.grad, plan)
    xs_r, y_r, gx_r, gw_r, plan = results["rust"]
    xs_t, y_t, gx_t, gw_t, _ = results["torch"]
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert torch.equal(xs_r, xs_t)
    assert torch.equal(xs_r, x[plan.row_token])
    torch.testing.assert_close(y_r, y_t, **tol)
    ref = reference.combine(xs_r.numpy() * 1.5, w.numpy(), plan.slot_row.tolist())
    np.testing.assert_allclose(y_r.double().numpy(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_r, gx_t, **tol)
    torch.testing.assert_close(gw_r, gw_t, **tol)
    # Empty or dropped slots get a zero weight gradient, never NaN.
    assert torch.all(gw_r[plan.slot_row < 0] == 0)


@pytest.mark.parametrize("name", ["rust", "torch"])
def test_gradcheck_float64(name: str) -> None:
    idx = torch.tensor([[0, 2], [1, -1], [2, 2], [0, 1], [1, 0]])
    with moerust.use_backend(name):
        plan = ops.dispatch_plan(idx, 3, capacity=3)
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        w = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a: ops.gather(a, plan), (x,))
        ys = torch.randn(plan.num_rows, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b: ops.combine(a, b, plan), (ys, w))
        assert torch.autograd.gradcheck(lambda a, b: ops.combine(ops.gather(a, plan).tanh(), b, plan), (x, w))


def test_opcheck_custom_ops() -> None:
    """torch.library.opcheck validates schemas, fake kernels and autograd registration."""
    idx = torch.tensor([[0, 1], [1, -1], [0, 0]])
    plan = ops.dispatch_plan(idx, 2)
    x = torch.randn(3, 4, requires_grad=True)
    ys = torch.randn(plan.num_rows, 4, requires_grad=True)
    w = torch.randn(3, 2, requires_grad=True)
    torch.library.opcheck(torch.ops.moerust.gather.default, (x, plan.row_token, plan.slot_row))
    torch.library.opcheck(torch.ops.moerust.combine.default, (ys, w, plan.slot_row, plan.row_token, plan.row_slot))


@pytest.mark.parametrize("name", ["rust", "torch"])
def test_torch_compile_fullgraph(name: str) -> None:
    torch._dynamo.reset()

    def layer(x: torch.Tensor, w: torch.Tensor, row_token, row_slot, slot_row, counts, offsets) -> torch.Tensor:
        plan = ops.Plan(counts, offsets, row_token, row_slot, slot_row, 0, 4)
        xs = ops.gather(x, plan)
        return ops.combine(torch.relu(xs) * 2.0, w, plan)

    with moerust.use_backend(name):
        probs = torch.softmax(torch.randn(32, 4), -1)
        idx = ops.topk_route(probs, 2)
        plan = ops.dispatch_plan(idx, 4)
        args = (plan.row_token, plan.row_slot, plan.slot_row, plan.counts, plan.offsets)
        x = torch.randn(32, 8, requires_grad=True)
        w = probs.gather(1, idx).requires_grad_()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        out = compiled(x, w, *args)
        out.sum().backward()
        gx, gw = x.grad.clone(), w.grad.clone()
        x.grad = None
        w.grad = None
        ref = layer(x, w, *args)
        ref.sum().backward()
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(gx, x.grad)
        torch.testing.assert_close(gw, w.grad)


def test_torch_compile_inductor() -> None:
    torch._dynamo.reset()
    probs = torch.softmax(torch.randn(16, 4), -1)
    idx = ops.topk_route(probs, 2)
    plan = ops.dispatch_plan(idx, 4)

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return ops.combine(ops.gather(x, plan).sin(), w, plan)

    x = torch.randn(16, 8)
    w = probs.gather(1, idx)
    out = torch.compile(f, fullgraph=True)(x, w)
    torch.testing.assert_close(out, f(x, w))


def test_capacity_zero_and_empty_inputs(backend: str) -> None:
    idx = torch.tensor([[0, 1], [1, 0]])
    plan = ops.dispatch_plan(idx, 2, capacity=0)
    assert plan.num_rows == 0 and plan.dropped == 4 and plan.slot_row.eq(-1).all()
    x = torch.randn(2, 3, requires_grad=True)
    w = torch.ones(2, 2, requires_grad=True)
    y = ops.combine(ops.gather(x, plan), w, plan)
    assert torch.equal(y, torch.zeros(2, 3))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(2, 3)) and torch.equal(w.grad, torch.zeros(2, 2))
    empty = ops.dispatch_plan(torch.empty(0, 2, dtype=torch.int64), 3)
    assert empty.num_rows == 0 and empty.counts.tolist() == [0, 0, 0]
    assert ops.combine(torch.empty(0, 5), torch.empty(0, 2), empty).shape == (0, 5)


def test_single_expert_and_k_equals_e(backend: str) -> None:
    plan = ops.dispatch_plan(torch.zeros(4, 1, dtype=torch.int64), 1)
    assert plan.row_token.tolist() == [0, 1, 2, 3]
    idx = ops.topk_route(torch.softmax(torch.randn(6, 3), -1), 3)
    plan = ops.dispatch_plan(idx, 3)
    assert plan.counts.tolist() == [6, 6, 6]


def test_huge_and_nan_values_flow_like_torch() -> None:
    idx = torch.tensor([[0, 1], [1, -1]])
    x = torch.tensor([[1e38, float("inf")], [float("nan"), -1e38]])
    w = torch.tensor([[2.0, 1.0], [1.0, 5.0]])
    got = on_both(lambda: ops.combine(ops.gather(x, ops.dispatch_plan(idx, 2)), w, ops.dispatch_plan(idx, 2)))
    torch.testing.assert_close(got["rust"], got["torch"], equal_nan=True)


def test_large_plan_and_threads_agree() -> None:
    idx = ops.topk_route(torch.softmax(torch.randn(70000, 16), -1), 2)
    got = on_both(ops.dispatch_plan, idx, 16, 9000)
    assert plan_tuple(got["rust"]) == plan_tuple(got["torch"])
    x = torch.randn(70000, 64)
    with moerust.use_backend("rust"):
        plan = got["rust"]
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = ops.gather(x, plan)
            torch.set_num_threads(max(2, before))
            many = ops.gather(x, plan)
        finally:
            torch.set_num_threads(before)
    assert torch.equal(one, many)
