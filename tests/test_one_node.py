"""The MoE layer's one-node path (``moerust.nn.fused``) routes as the composed layer does and
gives its values and gradients up to rounding, for every option it takes, on both backends;
calls it cannot take fall back to the composed ops."""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Tuple

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import moerust
from moerust.nn import MoE, MoEConfig

from .conftest import BACKENDS
from .test_router_forward import near_tie_flip


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


def _tol(dtype: torch.dtype) -> Dict[str, float]:
    # The router's forward and backward are one native call each on the Rust backend (their own
    # summation order), and with shared experts autograd adds x's three gradient terms in another
    # order: rounding only.
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-13)


def _assert_same(a: List[Any], b: List[Any], dtype: torch.dtype) -> None:
    """Same routing (indices, counts: equal) and the same values and gradients up to rounding."""
    for i, (u, v) in enumerate(zip(a, b)):
        assert (u is None) == (v is None), i
        if u is None:
            continue
        if u.is_floating_point():
            torch.testing.assert_close(u, v, **_tol(dtype), msg=lambda m: f"tensor {i}: {m}")
        else:
            assert torch.equal(u, v), f"tensor {i}"


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
def test_same_values_as_the_composed_layer(backend: str, options: Dict[str, Any], use_outside: bool, dtype: torch.dtype) -> None:
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
        _assert_same(a, b, dtype)
        for name in extra_b["losses"]:
            torch.testing.assert_close(extra_a["losses"][name], extra_b["losses"][name], **_tol(dtype))
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
def test_random_shapes_same_values(t: int, e: int, data: Any, topp: bool, seed: int) -> None:
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
        # (probs, idx): the two paths may route a near-tie differently (rounding): skip those
        assume(not near_tie_flip(a[3], b[3], a[2].double()))
        _assert_same(a, b, torch.float32)
        assert extra_a["stats"] == extra_b["stats"]


def test_eval_no_grad_and_frozen_parts(backend: str) -> None:
    layer = MoE(MoEConfig(dim=8, hidden=6, num_experts=4)).eval()
    composed = copy.deepcopy(layer)
    composed.one_node = False
    x = torch.randn(20, 8)
    with torch.no_grad():
        (y1, a1), (y2, a2) = layer(x), composed(x)
    torch.testing.assert_close(y1, y2)
    assert not y1.requires_grad and a1.stats == a2.stats
    # A frozen router (and x without gradient): the experts still learn, nothing else is asked.
    for m in (layer, composed):
        m.router.weight.requires_grad_(False)
        m(x)[0].sum().backward()
    assert layer.router.weight.grad is None
    torch.testing.assert_close(layer.experts.w1.grad, composed.experts.w1.grad)
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


def test_second_order_gradients_raise_instead_of_being_wrong(backend: str) -> None:
    layer = MoE(MoEConfig(dim=4, hidden=3, num_experts=3))
    x = torch.randn(6, 4, requires_grad=True)
    y, aux = layer(x)
    (gx,) = torch.autograd.grad(y.square().sum() + aux.weighted, x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.square().sum().backward()


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


def test_kept_buffers_live_in_rust_until_the_backward() -> None:
    # The native forward keeps the expert buffers and the plan in one Rust object on the node,
    # freed by the backward that frees the graph; a backward of another dtype refuses it.
    from moerust import _native

    layer = MoE(MoEConfig(dim=8, hidden=6, num_experts=4))
    x = torch.randn(10, 8, requires_grad=True)
    with moerust.use_backend("rust"):
        y, aux = layer(x)
        node = y.grad_fn
        assert isinstance(node.kept, _native.LayerBuffers)
        y64, _ = copy.deepcopy(layer).double()(x.detach().double())
        args = (torch.ones(10, 8).numpy(), node.saved_arrays, y64.grad_fn.kept, (None, None, None, None))
        with pytest.raises(TypeError, match="kept"):
            _native.moe_backward_f32(*args, True, 1.0, "swiglu", False, True, 1)
        (y.sum() + aux.weighted).backward()
    assert node.kept is None
    assert x.grad is not None and layer.experts.w1.grad is not None


def test_native_statistics_update_matches_the_python_one() -> None:
    # The one-node forward updates the usage EMA and step count in Rust (float64 buffers); the
    # composed layer in Python: the same buffers bit for bit, and the same reported stats, in
    # training and in eval mode (no update), with a capacity that drops rows.
    torch.manual_seed(3)
    one = MoE(MoEConfig(dim=8, hidden=6, num_experts=5, k=2, capacity_factor=0.6, stats_beta=0.9))
    composed = copy.deepcopy(one)
    composed.one_node = False
    assert one.stats.native_buffers() is not None
    for step in range(4):
        one.train(step < 3)
        composed.train(step < 3)
        x = torch.randn(2, 13, 8)
        (_, a), (_, b) = one(x), composed(x)
        assert _path(a) == "one-node" and _path(b) == "composed"
        assert a.stats == b.stats and a.stats.as_dict() == b.stats.as_dict()
        assert torch.equal(one.stats.ema, composed.stats.ema)
        assert int(one.stats.steps) == int(composed.stats.steps) == min(step + 1, 3)
    # float32 buffers (a layer cast with .float()) take the Python update on both paths
    assert one.float().stats.native_buffers() is None


def test_native_statistics_follow_replaced_buffers() -> None:
    # The native forward writes the EMA through numpy views kept between calls: a copy of the
    # layer, a buffer assigned anew and one whose data moved must each get the update, and the
    # buffers they replaced must not.
    torch.manual_seed(5)
    layer = MoE(MoEConfig(dim=8, hidden=6, num_experts=4, k=2)).train()
    x = torch.randn(16, 8)
    layer(x)
    first = layer.stats.ema.clone()
    assert int(layer.stats.steps) == 1 and float(first.sum()) > 0
    copied = copy.deepcopy(layer)
    copied(x)
    assert torch.equal(layer.stats.ema, first) and int(layer.stats.steps) == 1
    assert not torch.equal(copied.stats.ema, first) and int(copied.stats.steps) == 2
    old = layer.stats.ema
    layer.stats.ema = first.clone()  # a new buffer tensor
    layer(x)
    assert torch.equal(old, first) and torch.equal(layer.stats.ema, copied.stats.ema)
    moved = layer.stats.ema.clone()
    layer.stats.ema.data = moved  # the same tensor object on other memory
    layer(x)
    assert int(layer.stats.steps) == 3 and layer.stats.ema.data_ptr() == moved.data_ptr()
    reference = copy.deepcopy(copied)
    reference.one_node = False  # (the composed path updates the buffers in Python)
    reference(x)
    assert torch.equal(layer.stats.ema, reference.stats.ema)


def test_parametrized_weights_take_the_one_node_path() -> None:
    # The one-node path reads the weights from the modules' parameter dicts; a parametrized
    # weight (no longer in that dict) is read through its property instead: the same values and
    # gradients as the composed layer.
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2.0 * w

    torch.manual_seed(6)
    one = MoE(MoEConfig(dim=8, hidden=6, num_experts=4, k=2))
    parametrize.register_parametrization(one.router, "weight", Double())
    parametrize.register_parametrization(one.experts, "w2", Double())
    composed = copy.deepcopy(one)
    composed.one_node = False
    x = torch.randn(12, 8)
    grads = []
    for layer, path in ((one, "one-node"), (composed, "composed")):
        y, aux = layer(x)
        assert _path(aux) == path
        (y.square().sum() + aux.weighted).backward()
        originals = (layer.router.parametrizations.weight.original, layer.experts.parametrizations.w2.original)
        grads.append([y.detach()] + [w.grad for w in originals] + [layer.experts.w1.grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_inputs_of_any_rank_and_layout(backend: str) -> None:
    # The one node takes x in its own shape (no view nodes around it): 1-D batches of one token,
    # 4-D and non-contiguous inputs give the composed layer's values and gradients.
    torch.manual_seed(4)
    one = MoE(MoEConfig(dim=8, hidden=6, num_experts=4, shared_experts=1))
    composed = copy.deepcopy(one)
    composed.one_node = False
    for x in (torch.randn(8), torch.randn(2, 3, 4, 8), torch.randn(2, 8, 5).transpose(1, 2)):
        with moerust.use_backend(backend):
            a, _, path_a = _step(one, x, 0, True)
            b, _, path_b = _step(composed, x, 0, True)
        assert (path_a, path_b) == ("one-node", "composed")
        assert a[0].shape == x.shape and a[6].shape == x.shape  # y and x.grad
        _assert_same(a, b, torch.float32)
