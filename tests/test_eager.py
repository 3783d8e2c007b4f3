"""The eager fast path (moerust/ops/_eager.py) equals the custom ops it stands in for."""

from __future__ import annotations

import importlib

import torch

from moerust import ops
from moerust.ops import _eager

# The modules (``moerust.ops`` re-exports functions of the same names).
dispatch, experts, route_weights, router_softmax = (
    importlib.import_module(f"moerust.ops.{m}") for m in ("dispatch", "experts", "route_weights", "router_softmax")
)


def _grads(fn, inputs):  # type: ignore[no-untyped-def]
    leaves = [t.detach().clone().requires_grad_(t.dtype.is_floating_point) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(1)
    outs[0].backward(torch.randn(outs[0].shape, generator=g, dtype=outs[0].dtype))
    return [o.detach() for o in outs], [t.grad for t in leaves if t.requires_grad]


def test_each_fast_path_equals_its_custom_op_bit_for_bit() -> None:
    torch.manual_seed(0)
    t, e, k, d, ff = 2500, 6, 2, 12, 20
    logits = torch.randn(t, e, dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    idx = ops.topk_route(probs, k)
    plan = ops.dispatch_plan(idx, e)
    x = torch.randn(t, d, dtype=torch.float64)
    rows = torch.randn(plan.num_rows, d, dtype=torch.float64)
    w = torch.rand(t, k, dtype=torch.float64)
    w1 = torch.randn(e, 2 * ff, d, dtype=torch.float64) * 0.1
    w2 = torch.randn(e, d, ff, dtype=torch.float64) * 0.1
    cases = [
        (router_softmax._softmax, router_softmax._softmax_op, (logits,)),
        (route_weights._route_weights, route_weights._route_weights_op, (probs, idx, True)),
        (dispatch._gather, dispatch._gather_op, (x, plan.row_token, plan.slot_row)),
        (dispatch._combine, dispatch._combine_op, (rows, w, plan.slot_row, plan.row_token, plan.row_slot)),
        (experts._expert_mlp, experts._expert_mlp_op, (rows, w1, w2, plan.offsets, "swiglu")),
    ]
    for fast, op, args in cases:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]

        def call(f, *ts):  # type: ignore[no-untyped-def]
            it = iter(ts)
            return f(*[next(it) if isinstance(a, torch.Tensor) else a for a in args])

        got = _grads(lambda *ts: call(fast, *ts), tensors)
        want = _grads(lambda *ts: call(op, *ts), tensors)
        for a, b in zip(got[0] + got[1], want[0] + want[1]):
            assert torch.equal(a, b), op
        # The fast path really is the autograd.Function, not the op.
        out = call(fast, *[t.detach().requires_grad_(t.dtype.is_floating_point) for t in tensors])
        out = out[0] if isinstance(out, tuple) else out
        assert type(out.grad_fn).__name__.endswith("_eagerBackward"), type(out.grad_fn).__name__


def test_meta_and_subclass_inputs_take_the_custom_op() -> None:
    assert _eager._plain_eager((torch.ones(2), 3, "swiglu"))
    assert _eager._plain_eager((torch.nn.Parameter(torch.ones(2)),))
    assert not _eager._plain_eager((torch.empty(2, device="meta"),))
    out = ops.softmax(torch.empty(4096, 8, device="meta"))
    assert out.device.type == "meta" and out.shape == (4096, 8)


def test_backward_kernels_run_directly_only_in_a_plain_eager_backward() -> None:
    calls = []
    bop = _eager.BackwardOp(lambda g: calls.append("fn") or g, lambda g: calls.append("op") or g)
    with torch.no_grad():  # how the autograd engine runs a backward (create_graph=False)
        bop(torch.ones(3))
        bop(torch.empty(3, device="meta"))
    bop(torch.ones(3))  # grad mode: a create_graph=True backward keeps the op (and its checks)
    assert calls == ["fn", "op", "op"]
    for module, name in [(router_softmax, "softmax"), (route_weights, "route_weights"), (dispatch, "gather"),
                         (dispatch, "combine"), (experts, "expert_mlp")]:  # fmt: skip
        bop = getattr(module, f"_{name}_backward_op")
        assert isinstance(bop, _eager.BackwardOp)
        assert getattr(torch.ops.moerust, f"{name}_backward").default is not None
