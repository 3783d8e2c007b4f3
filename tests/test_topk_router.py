"""topk_router: the same values and gradients as softmax -> topk_route -> route_weights, on both
backends; gradcheck; errors; torch.compile; the Router's default mode goes through it."""

from __future__ import annotations

from typing import Any, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moerust
from moerust import nn as mnn
from moerust import ops

from .conftest import BACKENDS, on_both
from .strategies import TIE_VALUES


def _composed(logits: torch.Tensor, k: int, renormalize: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    probs = ops.softmax(logits)
    idx = ops.topk_route(probs, k)
    return probs, idx, ops.route_weights(probs, idx, renormalize)


def _run(fn: Any, logits: torch.Tensor, k: int, renormalize: bool, up_p: torch.Tensor, up_w: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    x = logits.clone().requires_grad_(True)
    probs, idx, w = fn(x, k, renormalize)
    ((probs * up_p).sum() + (w * up_w).sum()).backward()
    return probs.detach(), idx, w.detach(), x.grad


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(0, 40),
    e=st.integers(1, 12),
    data=st.data(),
    renormalize=st.booleans(),
    kind=st.sampled_from(["normal", "ties", "wide"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_same_as_the_composed_ops(t: int, e: int, data: Any, renormalize: bool, kind: str, dtype: torch.dtype, seed: int) -> None:
    k = data.draw(st.integers(1, e), label="k")
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # equal logits in a row: top-k order falls back to the expert index
        values = torch.tensor(TIE_VALUES, dtype=dtype)
        logits = values[torch.randint(len(TIE_VALUES), (t, e), generator=g)]
    else:
        logits = torch.randn(t, e, generator=g, dtype=dtype) * (30.0 if kind == "wide" else 1.0)
    up_p = torch.randn(t, e, generator=g, dtype=dtype)
    up_w = torch.randn(t, k, generator=g, dtype=dtype)
    for name in BACKENDS:
        with moerust.use_backend(name):
            fused = _run(ops.topk_router, logits, k, renormalize, up_p, up_w)
            composed = _run(_composed, logits, k, renormalize, up_p, up_w)
        for a, b, what in zip(fused, composed, ("probs", "idx", "weights", "grad")):
            assert torch.equal(a, b), f"{name} {what}: {a} vs {b}"


@pytest.mark.parametrize("rows", [3000, 9000])  # below and above the softmax kernel's switch
def test_backends_agree(rows: int) -> None:
    logits = torch.randn(rows, 16)
    up_p, up_w = torch.randn(rows, 16), torch.randn(rows, 4)
    out = {}
    for name in BACKENDS:
        with moerust.use_backend(name):
            out[name] = _run(ops.topk_router, logits, 4, True, up_p, up_w)
            # at 9000 rows the Rust backend takes the softmax kernel: still the composed ops' bits
            composed = _run(_composed, logits, 4, True, up_p, up_w)
            assert all(torch.equal(a, b) for a, b in zip(out[name], composed)), name
    rust, twin = out["rust"], out["torch"]
    assert torch.equal(rust[1], twin[1])
    for a, b in ((rust[0], twin[0]), (rust[2], twin[2]), (rust[3], twin[3])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("renormalize", [True, False])
def test_gradcheck(backend: str, renormalize: bool) -> None:
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        probs, _, w = ops.topk_router(x, 3, renormalize)
        return probs, w

    assert torch.autograd.gradcheck(f, (logits,))


def test_only_weights_or_only_probs_used(backend: str) -> None:
    logits = torch.randn(10, 6, requires_grad=True)
    ref = logits.detach().clone().requires_grad_(True)
    ops.topk_router(logits, 2)[2].sum().backward()  # no gradient reaches probs
    _composed(ref, 2, True)[2].sum().backward()
    assert torch.equal(logits.grad, ref.grad)
    logits.grad = ref.grad = None
    ops.topk_router(logits, 2)[0].square().sum().backward()  # none reaches the weights
    _composed(ref, 2, True)[0].square().sum().backward()
    assert torch.equal(logits.grad, ref.grad)


@pytest.mark.parametrize(
    "logits, k, kwargs, exc, needle",
    [
        (torch.randn(4, 3), 4, {}, ValueError, "k"),
        (torch.randn(4, 3), 0, {}, ValueError, "k"),
        (torch.randn(4, 3), 1.5, {}, TypeError, "k"),
        (torch.tensor([[0.0, float("nan")]]), 1, {}, ValueError, "NaN"),
        (torch.randn(4, 0), 1, {}, ValueError, "logits"),
        (torch.randn(3), 1, {}, ValueError, "logits"),
        (torch.ones(2, 3, dtype=torch.int64), 1, {}, TypeError, "logits"),
        ([[0.0, 1.0]], 1, {}, TypeError, "logits"),
        (torch.randn(2, 3), 1, {"renormalize": 1}, TypeError, "renormalize"),
    ],
)
def test_bad_input_same_on_both_backends(logits: Any, k: Any, kwargs: Any, exc: type, needle: str) -> None:
    before = logits.clone() if isinstance(logits, torch.Tensor) else None
    out = on_both(ops.topk_router, logits, k, **kwargs)
    for name, result in out.items():
        assert isinstance(result, exc), f"{name}: {result!r}"
        assert needle in str(result), f"{name}: {result}"
    if before is not None:
        torch.testing.assert_close(logits, before, rtol=0, atol=0, equal_nan=True)  # left unmodified


def test_compile_fullgraph_and_opcheck() -> None:
    logits = torch.randn(12, 6)

    def f(x: torch.Tensor) -> torch.Tensor:
        probs, _, w = ops.topk_router(x, 2)
        return w.square().sum() + probs.mean(0).square().sum()

    x = logits.clone().requires_grad_(True)
    torch.compile(f, fullgraph=True, backend="aot_eager")(x).backward()
    ref = logits.clone().requires_grad_(True)
    f(ref).backward()
    torch.testing.assert_close(x.grad, ref.grad)
    torch.library.opcheck(torch.ops.moerust.topk_router.default, (logits.clone().requires_grad_(True), 2, True))


def test_router_default_mode_matches_the_composed_ops(backend: str) -> None:
    router = mnn.Router(16, 8, k=2)
    x = torch.randn(50, 16)
    out = router(x)
    probs, idx, w = _composed(torch.nn.functional.linear(x, router.weight), 2, True)
    assert torch.equal(out.probs, probs) and torch.equal(out.idx, idx) and torch.equal(out.weights, w)
    assert out.counts.tolist() == [2] * 50
