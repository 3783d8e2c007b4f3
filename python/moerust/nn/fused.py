"""The MoE layer's one-node path: router logits -> routing and balance loss -> dispatch plan ->
routed experts, as a single autograd node.

Why: on a small layer (d = 64, a thousand tokens) at 16 threads, every autograd node and every
Python op entry costs tens of microseconds, and the composed layer has three nodes around its
kernels (the router's linear, the router op, the routed experts) plus their entries and checks.
Here the layer runs behind one node: the router's whole forward in one native call
(:mod:`moerust.ops.router_forward`: linear, temperature, softmax, selection, weights, balance
loss), the dispatch plan, the routed experts; its backward runs the routed experts' backward and
then the router's whole backward (:mod:`moerust.ops.router_backward`: the routing weights'
gradient comes out of the experts' backward, the balance loss's is added, then the softmax,
temperature and linear) in one native call. With the Rust kernels the forward is itself one
native call (router, dispatch plan, routed experts and the usage statistics' update, outputs
allocated in Rust; ``moe_forward`` in ``rust/python.rs``), and so is the backward
(``moe_backward``): on a small layer the Python between the kernels, run with its state pushed
out of cache by them, cost more than the router's arithmetic. On the torch backend the same
steps run as the composed layer's own ops.

:meth:`moerust.nn.MoE.forward` takes this path for plain eager calls whose router selects in one
op (:attr:`moerust.nn.Router.one_op`) and adds no training noise (see ``MoE._one_node``). The
router's logits, probabilities and weights stay differentiable outputs, so the z, entropy,
uniform and global-batch losses, and any use of them outside the layer, backpropagate as on the
composed path. ``torch.compile``, hooks on the router and the other router modes compose the ops,
which route the same way and give the same values up to rounding (``tests/test_one_node.py``; a
token whose top experts are within rounding of each other may be routed differently).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .. import _backend
from .._backend import numpy_view as _np
from ..ops import _eager
from ..ops.dispatch import Plan
from ..ops.routed_experts import _routed_experts_backward_op, _routed_experts_impl
from ..ops.router_backward import router_backward
from ..ops.router_softmax import _takes_kernel_op

# (logits, probs, idx, counts, weights, share, balance) of routing x with a router weight.
Route = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, ...]]


class LayerCall(NamedTuple):
    """What one call of :class:`RoutedLayer` needs besides its four tensors.

    ``route`` and ``plan_of`` run the router and the dispatch plan on the composed path (each on
    its backend); ``k``, ``topp`` (``(p, min_k, max_k)`` or None for top-k) and
    ``capacity_factor`` (None: dropless) describe the same to the native forward. ``stats`` is
    ``(ema, steps, beta, training)`` of the layer's :class:`~moerust.nn.RouterStats` (numpy views
    of its CPU float64 / int64 buffers, :meth:`~moerust.nn.RouterStats.native_buffers`) for the
    native forward to update, or None.
    """

    temperature: float
    renormalize: bool
    activation: str
    balance_weight: float
    route: Route
    plan_of: Callable[[torch.Tensor, torch.Tensor], Plan]
    k: int
    topp: Optional[Tuple[float, int, int]]
    capacity_factor: Optional[float]
    stats: Optional[Tuple[Any, Any, float, bool]]


class RoutedLayer(torch.autograd.Function):
    """``(y, balance, weighted_balance, logits, probs, weights) = RoutedLayer.apply(x,
    router_weight, w1, w2, call, out)`` for ``x [..., d]`` (``y`` of its shape, the router's
    outputs ``[T, ...]`` over its rows) with ``call`` a :class:`LayerCall`; all six are
    differentiable as on the composed path (``weighted_balance = call.balance_weight *
    balance``, computed here so that the layer's weighted loss needs no op of its own). ``out``
    (a dict) receives ``"selection"`` = ``(idx, counts, share)``, ``"plan"`` (the
    :class:`~moerust.ops.Plan`, or after the native forward a :class:`PlanSummary`) and, when the
    native forward updated the statistics, ``"usage"`` = ``(ema after the update, steps)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        router_weight: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor,
        call: LayerCall,
        out: Dict[str, Any],
    ) -> Tuple[torch.Tensor, ...]:
        ctx.call = call
        ctx.x_shape = x.shape
        ctx.eager_call = True  # (see _eager.saved_tensors_die: ys is never handed out)
        ctx.set_materialize_grads(False)
        if _backend.rust_handles(x, router_weight, w1, w2):
            return _native_forward(ctx, x, router_weight, w1, w2, call, out)
        ctx.kept = None
        x = x.reshape(-1, x.shape[-1])
        # The router's whole forward (one call of its kernels or of the torch twin).
        logits, probs, idx, counts, weights, share, balance = call.route(x, router_weight)
        plan = call.plan_of(idx, counts)
        y, xs, h, ys = _routed_experts_impl(
            x, weights, w1, w2, plan.row_token, plan.row_slot, plan.slot_row, plan.offsets, call.activation
        )  # fmt: skip
        out["selection"] = (idx, counts, share)
        out["plan"] = plan
        ctx.softmax_op = _takes_kernel_op(logits)  # the router's softmax path, for its backward
        ctx.save_for_backward(
            x, router_weight, w1, w2, probs, idx, share, weights, xs, h, ys,
            plan.row_token, plan.row_slot, plan.slot_row, plan.offsets,
        )  # fmt: skip
        return y.reshape(ctx.x_shape), balance, call.balance_weight * balance, logits, probs, weights

    @staticmethod
    def backward(ctx: Any, *grads: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        # The backward builds no graph: under create_graph=True (grad mode on) it runs through
        # once_differentiable, so that differentiating it again raises; otherwise grad mode is
        # already off and it runs directly (once_differentiable's no_grad block costs more than
        # a small layer's kernels).
        if torch.is_grad_enabled():
            return _backward_once(ctx, *grads)
        return _backward(ctx, *grads)


def _backward(
    ctx: Any,
    grad_y: Optional[torch.Tensor],
    grad_balance: Optional[torch.Tensor],
    grad_weighted: Optional[torch.Tensor],
    grad_logits: Optional[torch.Tensor],
    grad_probs: Optional[torch.Tensor],
    grad_weights: Optional[torch.Tensor],
) -> Tuple[Optional[torch.Tensor], ...]:
    """:meth:`RoutedLayer.backward`'s work: one native call after the native forward, else the
    composed ops' backward kernels (torch backend, CUDA)."""
    call: LayerCall = ctx.call
    saved = ctx.saved_tensors  # (also checks that no saved tensor was modified in place)
    need_router_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
    if grad_y is not None and ctx.kept is not None:  # the native forward's: one native call back
        balance = _balance_grad(grad_balance, grad_weighted, call.balance_weight)
        grads = (grad_weights, grad_probs, grad_logits, balance)
        return _grads(ctx, *_native_backward(ctx, grad_y.contiguous(), grads, need_router_grads))
    x, router_weight, w1, w2, probs, idx, share, weights = saved[:8]
    grad_weights, grad_probs, grad_logits = [
        None if g is None else g.contiguous() for g in (grad_weights, grad_probs, grad_logits)
    ]
    x = x.reshape(-1, x.shape[-1])  # (the native forward saves x in its own shape)
    if grad_weighted is not None:  # the weighted loss's gradient reaches the loss scaled
        scaled = grad_weighted * call.balance_weight
        grad_balance = scaled if grad_balance is None else grad_balance + scaled
    dx = dweights = dw1 = dw2 = drouter = None
    if grad_y is not None:
        grad_y = grad_y.reshape(-1, grad_y.shape[-1]).contiguous()
        overwrite = _eager.saved_tensors_die(ctx, grad_y, *saved)
        dx, dweights, dw1, dw2 = _routed_experts_backward_op(
            grad_y, *saved[8:11], weights, w1, w2, *saved[11:], call.activation, overwrite
        )  # fmt: skip
    if grad_weights is not None:  # the weights were also used outside the layer
        dweights = grad_weights if dweights is None else dweights.add_(grad_weights)
    if need_router_grads and any(g is not None for g in (dweights, grad_balance, grad_probs, grad_logits)):
        if dweights is None:
            dweights = torch.zeros_like(weights)
        softmax_op = getattr(ctx, "softmax_op", None)
        dx, drouter = router_backward(
            dweights, grad_probs, grad_logits, grad_balance, (x, router_weight, probs, idx, share),
            call.renormalize, call.temperature, _takes_kernel_op(probs) if softmax_op is None else softmax_op, dx,
        )  # fmt: skip
    return _grads(ctx, None if dx is None else dx.reshape(ctx.x_shape), drouter, dw1, dw2)


_backward_once = once_differentiable(_backward)


def _native_forward(
    ctx: Any,
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    call: LayerCall,
    out: Dict[str, Any],
) -> Tuple[torch.Tensor, ...]:
    """The forward as one native call (``moe_forward`` in ``rust/python.rs``). The expert
    buffers and the plan's arrays stay in Rust, in one opaque object on ``ctx`` (nothing outside
    sees them); the tensors handed out are saved as usual, so in-place changes to them are
    caught."""
    arrays = (_np(x).reshape(-1, x.shape[-1]), _np(router_weight), _np(w1), _np(w2))
    dropped, capacity, steps, ema, plan_counts, outputs, kept = _backend.native_fn("moe_forward", x.dtype)(
        *arrays, float(call.temperature), call.renormalize, call.k, call.topp, call.capacity_factor,
        call.activation, float(call.balance_weight), call.stats, _backend.num_threads(),
    )  # fmt: skip
    outputs[2] = outputs[2].reshape(ctx.x_shape)  # y, in x's shape
    balance, weighted, y, logits, probs, idx, counts, weights, share = (torch.from_numpy(a) for a in outputs)
    out["selection"] = (idx, counts, share)
    out["plan"] = PlanSummary(plan_counts, sum(plan_counts), dropped, capacity)
    if steps is not None:
        out["usage"] = (ema, steps)
    ctx.save_for_backward(x, router_weight, w1, w2, probs, idx, share, weights)
    # The numpy arrays of the saved tensors (already made), and the buffers kept in Rust.
    ctx.saved_arrays = arrays + (outputs[4], outputs[5], outputs[8], outputs[7])
    ctx.kept = kept
    return y, balance, weighted, logits, probs, weights


def _native_backward(
    ctx: Any, grad_y: torch.Tensor, outside_grads: Tuple[Any, ...], router: bool
) -> Tuple[Optional[torch.Tensor], ...]:
    """``(dx, d_router_weight, dw1, dw2)`` in one native call (``moe_backward``), given the
    gradients of the router's outputs used outside the layer, ``(weights, probs, logits,
    balance loss as a number)`` (each None if unused); ``router``: whether the router's
    backward is needed (``dx`` or its weight's gradient)."""
    call: LayerCall = ctx.call
    grad_weights, grad_probs, grad_logits, grad_balance = outside_grads
    outside = [g for g in (grad_weights, grad_probs, grad_logits) if g is not None]  # (usually none)
    overwrite = _eager.saved_tensors_die(ctx, grad_y, *outside)
    grads = (
        None if grad_weights is None else _np(grad_weights),
        None if grad_probs is None else _np(grad_probs),
        None if grad_logits is None else _np(grad_logits),
        grad_balance,
    )
    dx, drouter, dw1, dw2 = _backend.native_fn("moe_backward", grad_y.dtype)(
        _np(grad_y).reshape(-1, grad_y.shape[-1]), ctx.saved_arrays, ctx.kept, grads, call.renormalize,
        float(call.temperature), call.activation, overwrite, router, _backend.num_threads(),
    )  # fmt: skip
    if overwrite or not _eager.graph_kept():  # free the buffers now (the node may outlive its graph)
        ctx.kept = ctx.saved_arrays = None
    return (
        torch.from_numpy(dx.reshape(ctx.x_shape)), None if drouter is None else torch.from_numpy(drouter),
        torch.from_numpy(dw1), torch.from_numpy(dw2),
    )  # fmt: skip


def _balance_grad(grad_balance: Optional[torch.Tensor], grad_weighted: Optional[torch.Tensor], weight: float) -> Optional[float]:
    """The balance loss's whole gradient as a number (its own, plus the weighted copy's times
    the weight), or None when neither was used."""
    if grad_balance is None and grad_weighted is None:
        return None
    total = 0.0 if grad_balance is None else float(grad_balance)
    return total if grad_weighted is None else total + float(grad_weighted) * weight


class PlanSummary(NamedTuple):
    """What the layer reads of the dispatch plan after the native forward (the plan's index
    arrays stay with the node): ``counts`` rows kept per expert (a list of E ints), the rows,
    the dropped slots and the capacity used (None: dropless)."""

    counts: List[int]
    num_rows: int
    dropped: int
    capacity: Optional[int]


def _grads(ctx: Any, *grads: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """The backward's return: the four tensor inputs' gradients where asked for, then None for
    the two non-tensor arguments."""
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad)) + (None, None)
