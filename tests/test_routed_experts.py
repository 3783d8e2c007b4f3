"""routed_experts: exactly gather -> expert_mlp -> combine (values and gradients) on both
backends, including empty slots, capacity drops, E = 1, k = E and huge/NaN values; the backends
agree; gradcheck; errors; torch.compile; the MoE layer and the transformers integration run it."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moerust
from moerust import ops
from moerust.nn import MoE, MoEConfig

from .conftest import BACKENDS, on_both
from .strategies import slot_indices

# Every test once with the `gemm` crate and once with MKL (when torch carries it).
pytestmark = pytest.mark.usefixtures("each_gemm")


def _weights(e: int, d: int, f: int, activation: str, dtype: torch.dtype, g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    h1 = 2 * f if activation == "swiglu" else f
    return torch.randn(e, h1, d, generator=g, dtype=dtype) * 0.5, torch.randn(e, d, f, generator=g, dtype=dtype) * 0.5


def _composed(x: torch.Tensor, w: torch.Tensor, plan: ops.Plan, w1: torch.Tensor, w2: torch.Tensor, activation: str) -> torch.Tensor:
    return ops.combine(ops.expert_mlp(ops.gather(x, plan), w1, w2, plan.offsets, activation), w, plan)


def _run(fn: Any, tensors: Tuple[torch.Tensor, ...], plan: ops.Plan, activation: str, up: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    leaves = tuple(t.clone().requires_grad_(True) for t in tensors)
    x, w, w1, w2 = leaves
    y = fn(x, w, plan, w1, w2, activation)
    (y * up).sum().backward()
    return (y.detach(),) + tuple(t.grad for t in leaves)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


@settings(max_examples=60, deadline=None)
@given(
    case=slot_indices(max_t=20, max_k=4, max_e=6),
    d=st.integers(1, 9),
    f=st.integers(1, 7),
    capacity=st.sampled_from([None, 0, 1, 3]),
    activation=st.sampled_from(["swiglu", "gelu"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    kind=st.sampled_from(["normal", "huge"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_same_as_the_composed_ops(case: Any, d: int, f: int, capacity: Optional[int], activation: str, dtype: torch.dtype, kind: str, seed: int) -> None:
    idx, e = case
    t, k = idx.shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g, dtype=dtype)
    if kind == "huge" and x.numel():  # inf/NaN must flow exactly as through the separate ops
        x.view(-1)[torch.randint(x.numel(), (3,), generator=g)] = torch.tensor([3e38, float("nan"), -1e30], dtype=dtype)
    w = torch.rand(t, k, generator=g, dtype=dtype)
    w1, w2 = _weights(e, d, f, activation, dtype, g)
    up = torch.randn(t, d, generator=g, dtype=dtype)
    for name in BACKENDS:
        with moerust.use_backend(name):
            plan = ops.dispatch_plan(idx, e, capacity)
            fused = _run(ops.routed_experts, (x, w, w1, w2), plan, activation, up)
            composed = _run(_composed, (x, w, w1, w2), plan, activation, up)
        for a, b, what in zip(fused, composed, ("y", "dx", "dweights", "dw1", "dw2")):
            assert _same(a, b), f"{name} {what}: {a} vs {b}"


@pytest.mark.parametrize("tokens, e, k, capacity", [(3000, 8, 2, None), (2000, 16, 4, 300), (500, 1, 1, None), (400, 6, 6, None)])
def test_backends_agree(tokens: int, e: int, k: int, capacity: Optional[int]) -> None:
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(tokens, e, generator=g), -1)
    idx = ops.topk_route(probs, k)
    x, up = torch.randn(tokens, 48, generator=g), torch.randn(tokens, 48, generator=g)
    w1, w2 = _weights(e, 48, 40, "swiglu", torch.float32, g)
    out = {}
    for name in BACKENDS:
        with moerust.use_backend(name):
            out[name] = _run(ops.routed_experts, (x, probs.gather(1, idx), w1, w2), ops.dispatch_plan(idx, e, capacity), "swiglu", up)
    for a, b in zip(out["rust"], out["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_gradcheck(backend: str, activation: str) -> None:
    g = torch.Generator().manual_seed(2)
    idx = torch.tensor([[0, 2], [2, -1], [1, 0], [0, 2], [2, 1]])
    plan = ops.dispatch_plan(idx, 3, capacity=2)  # one slot dropped, one empty
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    w = torch.rand(5, 2, generator=g, dtype=torch.float64)
    w1, w2 = _weights(3, 4, 3, activation, torch.float64, g)
    leaves = tuple(t.requires_grad_(True) for t in (x, w, w1, w2))
    assert torch.autograd.gradcheck(lambda a, b, c, e: ops.routed_experts(a, b, plan, c, e, activation), leaves)


def test_retained_and_double_backward(backend: str) -> None:
    """The backward writes the expert outputs' gradient over the saved ys only when they die with
    the graph: a retained graph gives the same gradients twice, also when the first backward
    builds a graph (create_graph=True)."""
    g = torch.Generator().manual_seed(4)
    idx = torch.tensor([[0, 2], [2, -1], [1, 0], [0, 2], [2, 1], [1, 1]])
    plan = ops.dispatch_plan(idx, 3)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w1, w2 = (t.requires_grad_(True) for t in _weights(3, 4, 3, "gelu", torch.float64, g))
    y = ops.routed_experts(x, w, plan, w1, w2, "gelu")
    first = torch.autograd.grad(y.square().sum(), (x, w, w1, w2), retain_graph=True)
    again = torch.autograd.grad(y.square().sum(), (x, w, w1, w2), create_graph=True)
    second = torch.autograd.grad(y.square().sum(), (x, w, w1, w2))
    for a, b, c in zip(first, again, second):
        assert torch.equal(a, b) and torch.equal(a, c)
    fresh = _run(ops.routed_experts, (x.detach(), w.detach(), w1.detach(), w2.detach()), plan, "gelu", 2 * y.detach())
    for a, b in zip(first, fresh[1:]):
        assert torch.equal(a, b)


def test_plain_backward_reuses_the_saved_ys(monkeypatch: Any) -> None:
    from moerust import _backend

    scratch = []
    real = _backend.native_fn

    def spy(name: str, dtype: torch.dtype) -> Any:
        fn = real(name, dtype)
        if name != "routed_experts_backward":
            return fn
        return lambda *args: (scratch.append(args[3] is None), fn(*args))[1]

    monkeypatch.setattr(_backend, "native_fn", spy)
    plan = ops.dispatch_plan(torch.tensor([[0, 1], [1, 0], [1, 1]]), 2)
    w1 = torch.randn(2, 6, 4, requires_grad=True)
    with moerust.use_backend("rust"):
        y = ops.routed_experts(torch.randn(3, 4), torch.rand(3, 2), plan, w1, torch.randn(2, 4, 3))
        y.sum().backward(retain_graph=True)  # kept: a scratch buffer
        y.sum().backward()  # last use: over ys
    assert scratch == [False, True]


def test_frozen_inputs_get_no_gradient(backend: str) -> None:
    idx = torch.tensor([[0, 1], [1, 0], [1, 1]])
    plan = ops.dispatch_plan(idx, 2)
    x = torch.randn(3, 4)
    w1, w2 = torch.randn(2, 6, 4, requires_grad=True), torch.randn(2, 4, 3)
    ops.routed_experts(x, torch.rand(3, 2), plan, w1, w2).sum().backward()
    assert w1.grad is not None and x.grad is None and w2.grad is None


def _bad_cases() -> Any:
    idx = torch.tensor([[0, 1], [1, -1], [0, 0]])
    plan = ops.dispatch_plan(idx, 2)
    x, w = torch.randn(3, 4), torch.rand(3, 2)
    w1, w2 = torch.randn(2, 6, 4), torch.randn(2, 4, 3)
    forged = ops.Plan(plan.counts, plan.offsets.flip(0), plan.row_token, plan.row_slot, plan.slot_row, 0, 2)
    return [
        ((x, w, "plan", w1, w2), TypeError, "plan"),
        ((x[:2], w, plan, w1, w2), ValueError, "x"),
        ((x, w[:, :1], plan, w1, w2), ValueError, "weights"),
        ((x, w.double(), plan, w1, w2), TypeError, "weights"),
        ((x, w, plan, w1.double(), w2), TypeError, "w1"),
        ((x, w, plan, w1[:, :5], w2), ValueError, "w1"),
        ((x, w, plan, w1[:1], w2[:1]), ValueError, "experts"),
        ((x[:, :3], w, plan, w1, w2), ValueError, "x"),
        ((x, w, plan, w1, w2, "relu"), ValueError, "activation"),
        ((x, w, forged, w1, w2), ValueError, "plan.offsets"),
        ((x.long(), w, plan, w1, w2), TypeError, "x"),
    ]


@pytest.mark.parametrize("args, exc, needle", _bad_cases())
def test_bad_input_same_on_both_backends(args: Tuple[Any, ...], exc: type, needle: str) -> None:
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    out = on_both(ops.routed_experts, *args)
    for name, result in out.items():
        assert isinstance(result, exc), f"{name}: {result!r}"
        assert needle in str(result), f"{name}: {result}"
    for a, b in zip([a for a in args if isinstance(a, torch.Tensor)], before):
        assert torch.equal(a, b)  # left unmodified


def test_compile_fullgraph_and_opcheck() -> None:
    idx = torch.tensor([[0, 1], [1, -1], [0, 0], [1, 0]])
    plan = ops.dispatch_plan(idx, 2)
    x, w = torch.randn(4, 4), torch.rand(4, 2)
    w1, w2 = torch.randn(2, 6, 4), torch.randn(2, 4, 3)

    def f(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return ops.routed_experts(a, b, plan, c, w2).square().sum()

    got = [t.clone().requires_grad_(True) for t in (x, w, w1)]
    torch.compile(f, fullgraph=True, backend="aot_eager")(*got).backward()
    ref = [t.clone().requires_grad_(True) for t in (x, w, w1)]
    f(*ref).backward()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.grad, b.grad)
    args = (x.requires_grad_(True), w, w1.requires_grad_(True), w2, plan.row_token, plan.row_slot, plan.slot_row, plan.offsets, "swiglu")
    torch.library.opcheck(torch.ops.moerust.routed_experts.default, args)


def test_the_layer_runs_it_once(backend: str, monkeypatch: Any) -> None:
    calls = []
    real = ops.routed_experts

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(args[2].num_rows)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "routed_experts", spy)
    layer = MoE(MoEConfig(dim=8, hidden=6, num_experts=4, k=2))
    layer.one_node = False  # the composed layer (the one-node path runs the op's implementation)
    x = torch.randn(2, 5, 8)
    y, _ = layer(x)
    composed = _composed(x.reshape(10, 8), layer.router(x.reshape(10, 8)).weights, ops.dispatch_plan(layer.router(x.reshape(10, 8)).idx, 4), layer.experts.w1, layer.experts.w2, "swiglu")
    assert calls == [20]
    assert torch.equal(y.reshape(10, 8), composed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
def test_runs_on_cuda_with_the_torch_fallbacks() -> None:
    idx = torch.tensor([[0, 2], [2, -1], [1, 0], [0, 2]])
    x, w = torch.randn(4, 5, dtype=torch.float64), torch.rand(4, 2, dtype=torch.float64)
    w1, w2 = _weights(3, 5, 4, "swiglu", torch.float64, torch.Generator().manual_seed(3))
    up = torch.randn(4, 5, dtype=torch.float64)
    cpu = _run(ops.routed_experts, (x, w, w1, w2), ops.dispatch_plan(idx, 3), "swiglu", up)
    gpu = _run(ops.routed_experts, tuple(t.cuda() for t in (x, w, w1, w2)), ops.dispatch_plan(idx.cuda(), 3), "swiglu", up.cuda())
    for a, b in zip(gpu, cpu):
        assert a.is_cuda
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)
