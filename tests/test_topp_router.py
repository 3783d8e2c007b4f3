"""topp_router: the same values and gradients as softmax -> topp_route -> route_weights, on both
backends (scalar and per-row thresholds, p = 0 and 1, min_k/max_k, ties, T = 0, E = 1);
gradcheck; errors; torch.compile; the Router's top-p mode goes through it."""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moerust
from moerust import nn as mnn
from moerust import ops

from .conftest import BACKENDS, on_both
from .strategies import TIE_VALUES

P = Union[float, torch.Tensor]


def _composed(logits: torch.Tensor, p: P, min_k: int, max_k: Optional[int], renormalize: bool) -> Tuple[torch.Tensor, ...]:
    probs = ops.softmax(logits)
    idx, counts = ops.topp_route(probs, p, min_k, max_k)
    return probs, idx, counts, ops.route_weights(probs, idx, renormalize)


def _run(fn: Any, logits: torch.Tensor, args: Tuple[Any, ...], up_p: torch.Tensor, up_w: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    x = logits.clone().requires_grad_(True)
    probs, idx, counts, w = fn(x, *args)
    ((probs * up_p).sum() + (w * up_w[:, : w.shape[1]]).sum()).backward()
    return probs.detach(), idx, counts, w.detach(), x.grad


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(0, 30),
    e=st.integers(1, 10),
    data=st.data(),
    renormalize=st.booleans(),
    kind=st.sampled_from(["normal", "ties", "wide"]),
    per_row=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_same_as_the_composed_ops(t: int, e: int, data: Any, renormalize: bool, kind: str, per_row: bool, dtype: torch.dtype, seed: int) -> None:
    max_k = data.draw(st.sampled_from([None, *range(1, e + 1)]), label="max_k")
    min_k = data.draw(st.integers(1, e if max_k is None else max_k), label="min_k")
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        values = torch.tensor(TIE_VALUES, dtype=dtype)
        logits = values[torch.randint(len(TIE_VALUES), (t, e), generator=g)]
    else:
        logits = torch.randn(t, e, generator=g, dtype=dtype) * (30.0 if kind == "wide" else 1.0)
    p: P = torch.rand(t, generator=g) if per_row else data.draw(st.sampled_from([0.0, 0.25, 0.4, 0.9, 1.0]), label="p")
    up_p = torch.randn(t, e, generator=g, dtype=dtype)
    up_w = torch.randn(t, e, generator=g, dtype=dtype)
    args = (p, min_k, max_k, renormalize)
    for name in BACKENDS:
        with moerust.use_backend(name):
            fused = _run(ops.topp_router, logits, args, up_p, up_w)
            composed = _run(_composed, logits, args, up_p, up_w)
        for a, b, what in zip(fused, composed, ("probs", "idx", "counts", "weights", "grad")):
            assert torch.equal(a, b), f"{name} {what}: {a} vs {b}"


@pytest.mark.parametrize("rows", [3000, 9000])  # below and above the softmax kernel's switch
def test_backends_agree(rows: int) -> None:
    logits = torch.randn(rows, 16) * 2
    up_p, up_w = torch.randn(rows, 16), torch.randn(rows, 16)
    out = {}
    for name in BACKENDS:
        with moerust.use_backend(name):
            out[name] = _run(ops.topp_router, logits, (0.5, 1, None, True), up_p, up_w)
            composed = _run(_composed, logits, (0.5, 1, None, True), up_p, up_w)
            assert all(torch.equal(a, b) for a, b in zip(out[name], composed)), name
    rust, twin = out["rust"], out["torch"]
    assert torch.equal(rust[1], twin[1]) and torch.equal(rust[2], twin[2])
    for a, b in ((rust[0], twin[0]), (rust[3], twin[3]), (rust[4], twin[4])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("renormalize", [True, False])
def test_gradcheck(backend: str, renormalize: bool) -> None:
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        probs, _, _, w = ops.topp_router(x, 0.5, 1, 4, renormalize)
        return probs, w

    assert torch.autograd.gradcheck(f, (logits,))


@pytest.mark.parametrize(
    "logits, kwargs, exc, needle",
    [
        (torch.randn(4, 3), {"p": 1.5}, ValueError, "p"),
        (torch.randn(4, 3), {"p": -0.1}, ValueError, "p"),
        (torch.randn(4, 3), {"p": torch.rand(3)}, ValueError, "p"),
        (torch.randn(4, 3), {"p": torch.ones(4, dtype=torch.int64)}, TypeError, "p"),
        (torch.randn(4, 3), {"p": 0.5, "max_k": 4}, ValueError, "max_k"),
        (torch.randn(4, 3), {"p": 0.5, "min_k": 3, "max_k": 2}, ValueError, "min_k"),
        (torch.tensor([[0.0, float("nan")]]), {"p": 0.5}, ValueError, "NaN"),
        (torch.randn(4, 0), {"p": 0.5}, ValueError, "logits"),
        (torch.randn(3), {"p": 0.5}, ValueError, "logits"),
        (torch.ones(2, 3, dtype=torch.int64), {"p": 0.5}, TypeError, "logits"),
        (torch.randn(2, 3), {"p": 0.5, "renormalize": 1}, TypeError, "renormalize"),
    ],
)
def test_bad_input_same_on_both_backends(logits: Any, kwargs: Any, exc: type, needle: str) -> None:
    before = logits.clone()
    out = on_both(ops.topp_router, logits, **kwargs)
    for name, result in out.items():
        assert isinstance(result, exc), f"{name}: {result!r}"
        assert needle in str(result), f"{name}: {result}"
    torch.testing.assert_close(logits, before, rtol=0, atol=0, equal_nan=True)  # left unmodified


def test_compile_fullgraph_and_opcheck() -> None:
    logits = torch.randn(12, 6)

    def f(x: torch.Tensor) -> torch.Tensor:
        probs, _, _, w = ops.topp_router(x, 0.6, 1, 4)
        return w.square().sum() + probs.mean(0).square().sum()

    x = logits.clone().requires_grad_(True)
    torch.compile(f, fullgraph=True, backend="aot_eager")(x).backward()
    ref = logits.clone().requires_grad_(True)
    f(ref).backward()
    torch.testing.assert_close(x.grad, ref.grad)
    thresholds = torch.tensor([0.6])
    torch.library.opcheck(torch.ops.moerust.topp_router.default, (logits.clone().requires_grad_(True), thresholds, 1, 4, True))


def test_router_topp_mode_matches_the_composed_ops(backend: str) -> None:
    router = mnn.Router(16, 8, routing="topp", p=0.5, min_k=1, max_k=4)
    x = torch.randn(50, 16)
    out = router(x)
    probs, idx, counts, w = _composed(torch.nn.functional.linear(x, router.weight), 0.5, 1, 4, True)
    assert torch.equal(out.probs, probs) and torch.equal(out.idx, idx) and torch.equal(out.weights, w)
    assert torch.equal(out.counts, counts) and out.threshold is None
