"""The router ops' Switch balance loss (``balance=True``, ``moerust.ops.balance``): Rust and its
torch twin agree, both equal the formula of ``switch_loss``, the gradient equals the composed
formula's, edge cases, bad input, and the layer uses it with unchanged values and gradients."""

from __future__ import annotations

from typing import Any, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moerust
from moerust import nn as mnn
from moerust import ops
from moerust.ops.balance import _switch_balance_impl

from .conftest import on_both
from .strategies import prob_matrices


def _reference(probs: torch.Tensor, idx: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """Shares and loss by the formula, slot by slot, in float64 Python arithmetic."""
    t, e = probs.shape
    counts = [0] * e
    for i in idx.reshape(-1).tolist():
        if i >= 0:
            counts[i] += 1
    total = max(sum(counts), 1)
    p = probs.double()
    loss = sum(counts[i] / total * float(p[:, i].sum()) for i in range(e)) * e / max(t, 1)
    return torch.tensor([c / total for c in counts], dtype=torch.float64), loss


@settings(max_examples=80, deadline=None)
@given(probs=prob_matrices(), data=st.data())
def test_backends_agree_with_the_formula(probs: torch.Tensor, data: Any) -> None:
    t, e = probs.shape
    k = data.draw(st.integers(0, e + 1), label="k")  # k = E and duplicates included
    idx = torch.tensor(data.draw(st.lists(st.integers(-1, e - 1), min_size=t * k, max_size=t * k)), dtype=torch.int64).view(t, k)
    want_share, want_loss = _reference(probs, idx)
    out = on_both(_switch_balance_impl, probs, idx)
    for name, (share, loss) in out.items():
        assert share.dtype == loss.dtype == probs.dtype and share.shape == (e,) and loss.shape == ()
        torch.testing.assert_close(share.double(), want_share, rtol=1e-6, atol=0)
        want = torch.tensor(want_loss, dtype=probs.dtype).double()
        torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-12, equal_nan=True, msg=name)
    # Shares are exact in both; the losses differ at most in the last bit of float64 sums.
    assert torch.equal(out["rust"][0], out["torch"][0])


def test_edge_cases(backend: str) -> None:
    probs = torch.full((4, 4), 0.25)
    share, loss = _switch_balance_impl(probs, torch.arange(4).view(4, 1))
    assert float(loss) == pytest.approx(1.0) and torch.equal(share, torch.full((4,), 0.25))  # even: 1
    share, loss = _switch_balance_impl(torch.eye(3)[[0, 0, 0]], torch.zeros(3, 1, dtype=torch.int64))
    assert float(loss) == pytest.approx(3.0) and share.tolist() == [1.0, 0.0, 0.0]  # collapsed: E
    for p, i in [
        (torch.empty(0, 5), torch.empty(0, 2, dtype=torch.int64)),  # no tokens
        (probs, torch.full((4, 2), -1)),  # no kept slot
        (probs, torch.empty(4, 0, dtype=torch.int64)),  # no slots
    ]:
        share, loss = _switch_balance_impl(p, i)
        assert float(loss) == 0.0 and share.abs().sum() == 0
    share, loss = _switch_balance_impl(torch.tensor([[0.7]]), torch.tensor([[0]]))  # E = 1
    assert float(loss) == pytest.approx(0.7) and share.tolist() == [1.0]
    _, loss = _switch_balance_impl(torch.tensor([[float("nan"), 1.0]]), torch.tensor([[0]]))
    assert loss.isnan()


@pytest.mark.parametrize("bad", [2, -2])
def test_bad_slots_same_error_on_both_backends(bad: int) -> None:
    out = on_both(_switch_balance_impl, torch.full((2, 2), 0.5), torch.tensor([[0], [bad]]))
    for name, result in out.items():
        assert isinstance(result, ValueError) and "idx" in str(result), f"{name}: {result!r}"


def _router(kind: str, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    if kind == "topk":
        probs, idx, w, share, loss = ops.topk_router(x, 2, True, balance=True)
    else:
        probs, idx, _, w, share, loss = ops.topp_router(x, 0.5, 1, 3, True, balance=True)
    return probs, idx, w, share, loss


@pytest.mark.parametrize("kind", ["topk", "topp"])
@pytest.mark.parametrize("rows", [0, 1, 37, 3000])
def test_loss_and_gradient_match_the_composed_formula(backend: str, kind: str, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, 6, generator=g, dtype=torch.float64)
    up_w = torch.randn(rows, 2 if kind == "topk" else 3, generator=g, dtype=torch.float64)
    x = logits.clone().requires_grad_(True)
    probs, idx, w, share, loss = _router(kind, x)
    assert not share.requires_grad and loss.requires_grad
    (3.0 * loss + (w * up_w).sum()).backward()
    ref = logits.clone().requires_grad_(True)
    p = torch.softmax(ref, dim=-1)
    want = mnn.switch_loss(p, idx) if rows else torch.zeros((), dtype=torch.float64)
    (3.0 * want + (ops.route_weights(p, idx, True) * up_w).sum()).backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["topk", "topp"])
def test_gradcheck(backend: str, kind: str) -> None:
    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        probs, _, w, _, loss = _router(kind, x)
        return w, loss

    assert torch.autograd.gradcheck(f, (logits,))


def test_balance_flag_is_checked() -> None:
    for fn, args in ((ops.topk_router, (2,)), (ops.topp_router, (0.5,))):
        with pytest.raises(TypeError, match="balance"):
            fn(torch.randn(4, 3), *args, balance=1)
    assert len(ops.topk_router(torch.randn(4, 3), 2)) == 3 and len(ops.topp_router(torch.randn(4, 3), 0.5)) == 4


@pytest.mark.parametrize("routing", ["softmax_topk", "topp"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_layer_loss_and_router_gradient_unchanged(backend: str, routing: str, capacity_factor: Any) -> None:
    """The layer's balance loss (now from the router op) equals ``switch_loss`` on its routing
    (counts before capacity drops), and its gradient reaches the router as the formula's does."""
    torch.manual_seed(0)
    cfg = mnn.MoEConfig(dim=8, hidden=6, num_experts=5, k=2, routing=routing, balance_weight=0.3, capacity_factor=capacity_factor)
    layer = mnn.MoE(cfg).double()
    x = torch.randn(30, 8, dtype=torch.float64)
    _, aux = layer(x)
    r = aux.routing
    assert r.balance is not None and r.share is not None
    aux.weighted.backward()
    got = layer.router.weight.grad.clone()
    weight = layer.router.weight.detach().clone().requires_grad_(True)
    probs = torch.softmax(torch.nn.functional.linear(x, weight), dim=-1)
    want = mnn.switch_loss(probs, r.idx)
    torch.testing.assert_close(aux.losses["balance"], want.detach(), rtol=1e-12, atol=0)
    (0.3 * want).backward()
    torch.testing.assert_close(got, weight.grad, rtol=1e-10, atol=1e-12)


def test_modes_without_the_op_still_report_the_formula() -> None:
    """Routings that do not go through a router op (bias balancing, Mixtral style) compute the
    Switch loss from its formula, as before."""
    for kw in (dict(bias_balance=True), dict(routing="topk_softmax")):
        layer = mnn.MoE(mnn.MoEConfig(dim=8, hidden=6, num_experts=4, **kw))
        _, aux = layer(torch.randn(12, 8))
        assert aux.routing.balance is None
        torch.testing.assert_close(aux.losses["balance"], mnn.switch_loss(aux.routing.probs, aux.routing.idx))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
def test_torch_twin_on_cuda() -> None:
    probs = torch.softmax(torch.randn(64, 6, dtype=torch.float64), dim=-1)
    idx = torch.randint(-1, 6, (64, 2))
    with moerust.use_backend("rust"):  # CUDA tensors take the twin under either backend
        share, loss = _switch_balance_impl(probs.cuda(), idx.cuda())
    want_share, want_loss = _reference(probs, idx)
    assert share.is_cuda
    torch.testing.assert_close(share.cpu(), want_share)
    assert float(loss) == pytest.approx(want_loss, rel=1e-12)
    x = torch.randn(64, 6, device="cuda", requires_grad=True)
    _, _, _, _, loss = ops.topk_router(x, 2, balance=True)
    loss.backward()
    assert x.grad is not None and x.grad.is_cuda
