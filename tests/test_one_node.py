"""The MoE layer's one-node path (``moerust.nn.fused``) gives the composed layer's values and
gradients for every option it takes, on both backends (bit for bit except the router's and
``x``'s gradients, whose router part is one native call); calls it cannot take fall back to the
composed ops."""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moerust
from moerust.nn import MoE, MoEConfig

from .conftest import BACKENDS


def _path(aux: Any) -> str:
    fn = aux.routing.weights.grad_fn
    return "one-node" if fn is not None and type(fn).__name__ == "RoutedLayerBackward" else "composed"


def _step(layer: MoE, x: torch.Tensor, seed: int, use_outside: bool) -> Tuple[List[torch.Tensor], Dict[str, Any], str]:
    """Forward + backward (with the aux loss and, optionally, the router's outputs used outside
    the layer); returns the output, losses and every gradient."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y, aux = layer(x)
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + aux.weighted
    r = aux.routing
    if use_outside:
        loss = loss + (r.weights * 0.3).square().sum() + r.probs[:, 0].sum() + r.logits.square().mean()
    loss.backward()
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    values = [y.detach(), aux.weighted.detach(), r.probs.detach(), r.idx, r.weights.detach(), r.counts]
    losses = {k: v.detach() for k, v in aux.losses.items()}
    return values + grads, {"losses": losses, "stats": aux.stats.as_dict()}, _path(aux)


OPTIONS = [
    dict(),
    dict(k=3, renormalize=False, activation="gelu"),
    dict(routing="topp", p=0.5, max_k=3),
    dict(routing="topp", p=0.3, min_k=2, capacity_factor=0.75),
    dict(temperature=0.5, capacity_factor=1.0, shared_experts=1),
    dict(z_weight=0.01, entropy_weight=0.02, uniform_weight=0.5),
    dict(balance="global"),
    dict(balance="none"),
    dict(num_experts=1, k=1),
    dict(k=4),  # k = E
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("use_outside", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_bits_as_the_composed_layer(backend: str, options: Dict[str, Any], use_outside: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    cfg = dict(dim=8, hidden=6, num_experts=4, k=2)
    cfg.update(options)
    one = MoE(MoEConfig(**cfg)).to(dtype)
    composed = copy.deepcopy(one)
    composed.one_node = False
    x = torch.randn(3, 11, 8, dtype=dtype)
    for step in range(2):  # two steps: the statistics' EMA and the global counts carry over
        a, extra_a, path_a = _step(one, x, step, use_outside)
        b, extra_b, path_b = _step(composed, x, step, use_outside)
        assert (path_a, path_b) == ("one-node", "composed")
        for i, (u, v) in enumerate(zip(a, b)):
            assert (u is None) == (v is None), i
            if i in (6, 7):
                # x's and the router's gradients: the router's backward is one native call on
                # the Rust backend (its own summation order); and with shared experts autograd
                # adds x's three terms in another order. Rounding only.
                tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-13)
                torch.testing.assert_close(u, v, **tol)
                continue
            assert u is None or torch.equal(u, v), f"tensor {i}: max diff {(u - v).abs().max()}"
        for name in extra_b["losses"]:
            assert torch.equal(extra_a["losses"][name], extra_b["losses"][name]), name
        assert extra_a["stats"] == extra_b["stats"]
        one.after_optimizer_step()
        composed.after_optimizer_step()


@settings(max_examples=25, deadline=None)
@given(
    t=st.integers(0, 40),
    e=st.integers(1, 6),
    data=st.data(),
    topp=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_same_bits(t: int, e: int, data: Any, topp: bool, seed: int) -> None:
    k = data.draw(st.integers(1, e), label="k")
    cf = data.draw(st.sampled_from([None, 0.0, 0.5, 2.0]), label="capacity_factor")
    routing = dict(routing="topp", p=0.6, max_k=k) if topp else dict(k=k)
    torch.manual_seed(seed)
    one = MoE(MoEConfig(dim=5, hidden=3, num_experts=e, capacity_factor=cf, **routing))
    composed = copy.deepcopy(one)
    composed.one_node = False
    x = torch.randn(t, 5)
    for name in BACKENDS:
        with moerust.use_backend(name):
            a, extra_a, _ = _step(one, x, seed, False)
            b, extra_b, _ = _step(composed, x, seed, False)
        for i, (u, v) in enumerate(zip(a, b)):
            assert (u is None) == (v is None)
            if i in (6, 7):  # x's and the router's gradients (see above)
                torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
                continue
            assert u is None or torch.equal(u, v), name
        assert extra_a["stats"] == extra_b["stats"]


def test_eval_no_grad_and_frozen_parts(backend: str) -> None:
    layer = MoE(MoEConfig(dim=8, hidden=6, num_experts=4)).eval()
    composed = copy.deepcopy(layer)
    composed.one_node = False
    x = torch.randn(20, 8)
    with torch.no_grad():
        (y1, a1), (y2, a2) = layer(x), composed(x)
    assert torch.equal(y1, y2) and not y1.requires_grad and a1.stats == a2.stats
    # A frozen router (and x without gradient): the experts still learn, nothing else is asked.
    for m in (layer, composed):
        m.router.weight.requires_grad_(False)
        m(x)[0].sum().backward()
    assert layer.router.weight.grad is None
    assert torch.equal(layer.experts.w1.grad, composed.experts.w1.grad)
    # Only the balance loss backpropagates: the router learns from it alone.
    for m in (layer, composed):
        m.router.weight.requires_grad_(True)
        m.zero_grad(set_to_none=True)
        m(x)[1].weighted.backward()
    assert layer.experts.w1.grad is None
    torch.testing.assert_close(layer.router.weight.grad, composed.router.weight.grad, rtol=1e-5, atol=1e-7)


def test_retain_graph_twice_gives_the_same_gradients(backend: str) -> None:
    layer = MoE(MoEConfig(dim=8, hidden=6, num_experts=4))
    x = torch.randn(16, 8, requires_grad=True)
    y, aux = layer(x)
    loss = y.square().sum() + aux.weighted
    loss.backward(retain_graph=True)
    first = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    x.grad = None
    loss.backward()
    for a, b in zip(first, [x.grad] + [p.grad for p in layer.parameters()]):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: setattr(m.router, "noise_std", 0.1),
        lambda m: setattr(m.router, "jitter", 0.1),
        lambda m: m.router.register_forward_hook(lambda *a: None),
        lambda m: setattr(m, "one_node", False),
    ],
)
def test_calls_it_cannot_take_compose_the_ops(change: Any) -> None:
    layer = MoE(MoEConfig(dim=8, hidden=6, num_experts=4)).train()
    change(layer)
    _, aux = layer(torch.randn(10, 8))
    assert _path(aux) == "composed"
    for kw in (dict(routing="topk_softmax"), dict(bias_balance=True), dict(routing="topp", learned_threshold=True)):
        _, aux = MoE(MoEConfig(dim=8, hidden=6, num_experts=4, **kw))(torch.randn(10, 8))
        assert _path(aux) == "composed", kw


def test_compiled_layer_composes_and_matches() -> None:
    layer = MoE(MoEConfig(dim=8, hidden=6, num_experts=4, k=2))
    x = torch.randn(12, 8)
    out = []
    for fn in (layer, torch.compile(layer, backend="aot_eager")):
        layer.zero_grad(set_to_none=True)
        y, aux = fn(x)
        (y.square().sum() + aux.weighted).backward()
        out.append((y.detach(), layer.router.weight.grad.clone(), layer.experts.w2.grad.clone()))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
