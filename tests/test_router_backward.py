"""ops.router_backward (the router's whole backward in one native call): Rust and its torch twin
agree, both equal autograd through the composed router, edge cases and bad input."""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moerust import ops
from moerust.ops.balance import _switch_balance_impl
from moerust.ops.router_backward import router_backward

from .conftest import on_both


def _case(t: int, e: int, k: int, d: int, seed: int, dtype: torch.dtype, scale: float = 1.0) -> Dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g, dtype=dtype) * scale
    weight = torch.randn(e, d, generator=g, dtype=dtype)
    probs = torch.softmax(F.linear(x, weight), dim=-1)
    idx = torch.randint(-1, e, (t, k), generator=g)  # duplicates and empty slots included
    share, _ = _switch_balance_impl(probs, idx)
    grads = {
        "weights": torch.randn(t, k, generator=g, dtype=dtype),
        "probs": torch.randn(t, e, generator=g, dtype=dtype),
        "logits": torch.randn(t, e, generator=g, dtype=dtype),
        "balance": torch.randn((), generator=g, dtype=dtype),
        "dx": torch.randn(t, d, generator=g, dtype=dtype),
    }
    return dict(x=x, weight=weight, probs=probs, idx=idx, share=share, grads=grads)


def _run(c: Dict[str, Any], use: Dict[str, bool], renormalize: bool, temperature: float) -> Any:
    g = c["grads"]
    return router_backward(
        g["weights"], g["probs"] if use["probs"] else None, g["logits"] if use["logits"] else None,
        g["balance"] if use["balance"] else None, (c["x"], c["weight"], c["probs"], c["idx"], c["share"]),
        renormalize, temperature, False, g["dx"].clone() if use["dx"] else None,
    )  # fmt: skip


@settings(max_examples=80, deadline=None)
@given(
    t=st.integers(0, 30),
    e=st.integers(1, 9),
    d=st.integers(1, 6),
    data=st.data(),
    use=st.fixed_dictionaries({n: st.booleans() for n in ("probs", "logits", "balance", "dx")}),
    renormalize=st.booleans(),
    temperature=st.sampled_from([1.0, 0.5, 3.0]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    scale=st.sampled_from([1.0, 1e3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_backends_agree(t: int, e: int, d: int, data: Any, use: Dict[str, bool], renormalize: bool, temperature: float, dtype: torch.dtype, scale: float, seed: int) -> None:
    k = data.draw(st.integers(1, e + 1), label="k")
    c = _case(t, e, k, d, seed, dtype, scale)
    out = on_both(_run, c, use, renormalize, temperature)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    # dweight = dlogits^T x sums t products of size ~scale that can cancel to ~1: in float32 its
    # rounding is ~1e-7 * scale per term whatever the result (seen: 5e-4 at scale 1e3, t = 27).
    wtol = dict(tol, atol=tol["atol"] * scale)
    for a, b, what in zip(out["rust"], out["torch"], (tol, wtol)):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, equal_nan=True, **what)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("renormalize", [True, False])
def test_equals_autograd_through_the_composed_router(backend: str, temperature: float, renormalize: bool) -> None:
    c = _case(23, 5, 2, 4, 7, torch.float64)
    g = c["grads"]
    x = c["x"].clone().requires_grad_(True)
    weight = c["weight"].clone().requires_grad_(True)
    logits = F.linear(x, weight) / temperature
    probs = torch.softmax(logits, dim=-1)
    w = ops.route_weights(probs, c["idx"], renormalize)
    counts = torch.bincount(c["idx"][c["idx"] >= 0], minlength=5).double()
    balance = 5 * (counts / counts.sum() * probs.mean(0)).sum()
    loss = (w * g["weights"]).sum() + (probs * g["probs"]).sum() + (logits * g["logits"]).sum() + g["balance"] * balance
    loss.backward()
    c["probs"] = probs.detach()  # the forward's probabilities at this temperature
    use = dict(probs=True, logits=True, balance=True, dx=True)
    dx, dweight = _run(c, use, renormalize, temperature)
    torch.testing.assert_close(dx, g["dx"] + x.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dweight, weight.grad, rtol=1e-10, atol=1e-12)


def test_only_the_balance_or_nothing_but_weights(backend: str) -> None:
    c = _case(10, 4, 2, 3, 1, torch.float64)
    c["grads"]["weights"] = torch.zeros(10, 2, dtype=torch.float64)
    none = dict(probs=False, logits=False, balance=False, dx=False)
    dx, dweight = _run(c, none, True, 1.0)
    assert dx.abs().sum() == 0 and dweight.abs().sum() == 0
    dx, dweight = _run(c, dict(none, balance=True), True, 1.0)
    assert dweight.abs().sum() > 0


def test_bad_slots_same_error_on_both_backends() -> None:
    c = _case(4, 3, 2, 2, 0, torch.float32)
    c["idx"][1, 0] = 3
    out = on_both(_run, c, dict(probs=False, logits=False, balance=False, dx=False), True, 1.0)
    for name, result in out.items():
        assert isinstance(result, ValueError) and "idx" in str(result), f"{name}: {result!r}"


def test_backends_agree_on_a_large_router() -> None:
    c = _case(3000, 8, 2, 16, 3, torch.float32)  # large enough to split over threads
    use = dict(probs=False, logits=False, balance=True, dx=True)
    out = on_both(_run, c, use, True, 1.0)
    for a, b in zip(out["rust"], out["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
