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
temperature and linear) in one native call. On the torch backend the same steps run as the
composed layer's own ops.

:meth:`moerust.nn.MoE.forward` takes this path for plain eager calls whose router selects in one
op (:attr:`moerust.nn.Router.one_op`) and adds no training noise (see ``MoE._one_node``). The
router's logits, probabilities and weights stay differentiable outputs, so the z, entropy,
uniform and global-batch losses, and any use of them outside the layer, backpropagate as on the
composed path. ``torch.compile``, hooks on the router and the other router modes compose the ops,
which route the same way and give the same values up to rounding (``tests/test_one_node.py``; a
token whose top experts are within rounding of each other may be routed differently).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .. import _backend
from .._backend import numpy_view as _np
from ..ops import _eager
from ..ops.dispatch import Plan
from ..ops.routed_experts import _routed_experts_backward_op, _routed_experts_impl, native_backward
from ..ops.router_backward import native_args, router_backward
from ..ops.router_softmax import _takes_kernel_op

# (logits, probs, idx, counts, weights, share, balance) of routing x with a router weight.
Route = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, ...]]


class RoutedLayer(torch.autograd.Function):
    """``(y, balance, logits, probs, weights) = RoutedLayer.apply(x, router_weight, w1, w2,
    temperature, renormalize, route, plan_of, activation, out)``, all five differentiable as on
    the composed path; ``out`` (a dict) receives ``"selection"`` = ``(idx, counts, share)`` and
    ``"plan"``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        router_weight: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor,
        temperature: float,
        renormalize: bool,
        route: Route,
        plan_of: Callable[[torch.Tensor, torch.Tensor], Plan],
        activation: str,
        out: Dict[str, Any],
    ) -> Tuple[torch.Tensor, ...]:
        # The router's whole forward (one native call on the Rust backend).
        logits, probs, idx, counts, weights, share, balance = route(x, router_weight)
        plan = plan_of(idx, counts)
        y, xs, h, ys = _routed_experts_impl(
            x, weights, w1, w2, plan.row_token, plan.row_slot, plan.slot_row, plan.offsets, activation
        )  # fmt: skip
        out["selection"] = (idx, counts, share)
        out["plan"] = plan
        ctx.temperature, ctx.renormalize, ctx.activation = temperature, renormalize, activation
        ctx.softmax_op = _takes_kernel_op(logits)  # the router's softmax path, for its backward
        ctx.eager_call = True  # (see _eager.saved_tensors_die: ys is never handed out)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            x, router_weight, w1, w2, probs, idx, share, weights, xs, h, ys,
            plan.row_token, plan.row_slot, plan.slot_row, plan.offsets,
        )  # fmt: skip
        return y, balance, logits, probs, weights

    @staticmethod
    @once_differentiable  # the native backward builds no graph: differentiating it again raises
    def backward(  # type: ignore[override]
        ctx: Any,
        grad_y: Optional[torch.Tensor],
        grad_balance: Optional[torch.Tensor],
        grad_logits: Optional[torch.Tensor],
        grad_probs: Optional[torch.Tensor],
        grad_weights: Optional[torch.Tensor],
    ) -> Tuple[Optional[torch.Tensor], ...]:
        saved = ctx.saved_tensors
        x, router_weight, w1, w2, probs, idx, share, weights, xs, h, ys = saved[:11]
        plan = saved[11:]
        need_x, need_router, need_w1, need_w2 = ctx.needs_input_grad[:4]
        need_router_grads = need_x or need_router
        grad_weights, grad_probs, grad_logits = (
            None if g is None else g.contiguous() for g in (grad_weights, grad_probs, grad_logits)
        )
        router_saved = (x, router_weight, probs, idx, share)
        dx = dweights = dw1 = dw2 = drouter = None
        if grad_y is not None:
            grad_y = grad_y.contiguous()
            overwrite = _eager.saved_tensors_die(ctx, grad_y, *saved)
            outside = [g for g in (grad_weights, grad_probs, grad_logits) if g is not None]
            if need_router_grads and _backend.rust_handles(grad_y, *saved, *outside):
                # The experts' and the router's backward in one native call (the router's
                # arguments are prepared now, while Python's own state is still in cache).
                args, drouter = native_args(
                    grad_probs, grad_logits, grad_balance, router_saved, ctx.renormalize, ctx.temperature
                )  # fmt: skip
                extra = None if grad_weights is None else _np(grad_weights)
                dx, _, dw1, dw2 = native_backward(
                    grad_y, xs, h, ys, weights, w1, w2, plan, ctx.activation, overwrite, (extra, args)
                )  # fmt: skip
                return _grads(ctx, dx, drouter, dw1, dw2)
            dx, dweights, dw1, dw2 = _routed_experts_backward_op(
                grad_y, xs, h, ys, weights, w1, w2, *plan, ctx.activation, overwrite
            )  # fmt: skip
        if grad_weights is not None:  # the weights were also used outside the layer
            dweights = grad_weights if dweights is None else dweights.add_(grad_weights)
        if need_router_grads and any(g is not None for g in (dweights, grad_balance, grad_probs, grad_logits)):
            if dweights is None:
                dweights = torch.zeros_like(weights)
            dx, drouter = router_backward(
                dweights, grad_probs, grad_logits, grad_balance, router_saved,
                ctx.renormalize, ctx.temperature, ctx.softmax_op, dx,
            )  # fmt: skip
        return _grads(ctx, dx, drouter, dw1, dw2)


def _grads(ctx: Any, *grads: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """The backward's return: the four tensor inputs' gradients where asked for, then None for
    the six non-tensor arguments."""
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad)) + (None,) * 6
