"""The default router's forward in one op: ``softmax -> topk_route -> route_weights``.

``topk_router(logits, k, renormalize)`` returns exactly what the three public ops return in
sequence — ``probs = softmax(logits)``, ``idx = topk_route(probs, k)``, ``weights =
route_weights(probs, idx, renormalize)`` — bit for bit, on either backend, with the gradients of
``probs`` and ``weights`` flowing back to ``logits``. Why one op: each public op is a Python
entry with checks, an autograd node and a native call; at the sizes of a small layer (1024 tokens
of 8 experts) that wrapping costs more than the kernels (40-75 us per op on the lent 16-core VM,
inside a layer step of ~2.5 ms), and the router's forward and backward had five of them. Here the
same kernels run behind one entry and one autograd node, and the backward adds the incoming
gradients before a single softmax backward. The op also returns the Switch balance loss of its
routing (``balance=True``; :mod:`moerust.ops.balance`), so the layer's default loss adds no torch
ops or autograd nodes of its own.

A ``torch.library`` custom op with a fake kernel and an autograd formula (``torch.compile``
works); plain eager calls take the same implementation through ``torch.autograd.Function``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from . import _checks, _eager
from .balance import _switch_balance_impl, add_balance_grad
from .route_weights import _route_weights_backward_op, _route_weights_impl
from .router_softmax import _softmax_backward_op, _softmax_impl, _takes_kernel_op
from .routing import _topk_route_impl


Outputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _topk_router_impl(logits: torch.Tensor, k: int, renormalize: bool) -> Outputs:
    # The three ops' own implementations (each picks the Rust kernel or its torch twin), and the
    # balance loss with the experts' shares of the slots.
    probs = _softmax_impl(logits) if _takes_kernel_op(logits) else torch.softmax(logits.detach(), dim=-1)
    idx = _topk_route_impl(probs, k)
    share, balance = _switch_balance_impl(probs, idx)
    return probs, idx, _route_weights_impl(probs, idx, renormalize), share, balance


_topk_router_op = torch.library.custom_op("moerust::topk_router", mutates_args=())(_topk_router_impl)


@_topk_router_op.register_fake
def _(logits: torch.Tensor, k: int, renormalize: bool) -> Outputs:
    rows, num_experts = logits.shape
    return (
        torch.empty_like(logits),
        logits.new_empty(rows, k, dtype=torch.int64),
        logits.new_empty(rows, k),
        logits.new_empty(num_experts),
        logits.new_empty(()),
    )


@_eager.backward_op("moerust::topk_router_backward")
def _router_backward_op(
    grad_probs: Optional[torch.Tensor],
    grad_weights: torch.Tensor,
    grad_balance: Optional[torch.Tensor],
    probs: torch.Tensor,
    idx: torch.Tensor,
    share: torch.Tensor,
    renormalize: bool,
    softmax_op: bool,
) -> torch.Tensor:
    # The backward kernels themselves (.fn: this already is a backward op, one op for compile).
    dp = _route_weights_backward_op.fn(grad_weights, probs, idx, renormalize)
    if grad_probs is not None:
        dp = dp.add_(grad_probs)
    if grad_balance is not None:
        dp = add_balance_grad(dp, grad_balance, share)
    # The softmax backward of the path the forward took, as the composed ops would run it.
    if softmax_op:
        return _softmax_backward_op.fn(dp, probs)
    return torch._softmax_backward_data(dp, probs, -1, probs.dtype)


@_router_backward_op.register_fake
def _(grad_probs, grad_weights, grad_balance, probs, idx, share, renormalize, softmax_op):  # type: ignore[no-untyped-def]
    return torch.empty_like(probs)


def router_setup(
    ctx: Any, logits: torch.Tensor, renormalize: bool, probs: torch.Tensor, idx: torch.Tensor, share: torch.Tensor, *selection: torch.Tensor
) -> None:
    """What a router op's backward needs (shared with ``topp_router``); ``idx``, ``share`` and
    the other ``selection`` outputs (e.g. counts) get no gradient."""
    ctx.renormalize = renormalize
    ctx.softmax_op = _takes_kernel_op(logits)  # the forward's choice, for its backward
    ctx.mark_non_differentiable(idx, share, *selection)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(probs, idx, share)


def router_backward(
    ctx: Any, grad_probs: Optional[torch.Tensor], grad_weights: Optional[torch.Tensor], grad_balance: Optional[torch.Tensor]
) -> Optional[torch.Tensor]:
    """The gradient of a router op's logits from those of its probabilities, weights and balance
    loss (shared with ``topp_router``)."""
    if grad_probs is None and grad_weights is None and grad_balance is None:
        return None
    probs, idx, share = ctx.saved_tensors
    if grad_weights is None:
        grad_weights = torch.zeros(idx.shape, dtype=probs.dtype, device=probs.device)
    if grad_probs is not None:
        grad_probs = grad_probs.contiguous()
    return _router_backward_op(grad_probs, grad_weights.contiguous(), grad_balance, probs, idx, share, ctx.renormalize, ctx.softmax_op)


def _setup(ctx: Any, inputs: Tuple[Any, ...], output: Outputs) -> None:
    logits, _, renormalize = inputs
    probs, idx, _, share, _ = output
    router_setup(ctx, logits, renormalize, probs, idx, share)


def _backward(
    ctx: Any,
    grad_probs: Optional[torch.Tensor],
    grad_idx: Optional[torch.Tensor],
    grad_weights: Optional[torch.Tensor],
    grad_share: Optional[torch.Tensor],
    grad_balance: Optional[torch.Tensor],
) -> Tuple[Optional[torch.Tensor], None, None]:
    return router_backward(ctx, grad_probs, grad_weights, grad_balance), None, None


_topk_router = _eager.differentiable(_topk_router_op, _topk_router_impl, _backward, _setup)


def topk_router(logits: torch.Tensor, k: int, renormalize: bool = True, balance: bool = False) -> Tuple[torch.Tensor, ...]:
    """``(probs [T, E], idx [T, k], weights [T, k])`` of a softmax-then-top-k router.

    The same values as ``probs = softmax(logits)``, ``idx = topk_route(probs, k)``,
    ``weights = route_weights(probs, idx, renormalize)``, computed in one op (see the module
    docstring); ``probs`` and ``weights`` are differentiable in ``logits``, ``idx`` is not.
    With ``balance=True`` it returns ``(probs, idx, weights, share, loss)``: ``share [E]``,
    each expert's share of the slots, and the Switch balance loss of this routing
    (:mod:`moerust.ops.balance`), differentiable in ``logits`` through the probabilities.
    Raises ValueError if ``k`` is outside [1, E] or the probabilities contain NaN.
    """
    logits = _checks.tensor(logits, "logits", ndim=2)
    num_experts = logits.shape[1]
    if num_experts == 0:
        raise ValueError("logits must have at least one expert column, got shape (T, 0)")
    k = _checks.integer(k, "k", lo=1, hi=num_experts)
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__}")
    if not isinstance(balance, bool):
        raise TypeError(f"balance must be a bool, got {type(balance).__name__}")
    outputs = _topk_router(logits.contiguous(), k, renormalize)
    return outputs if balance else outputs[:3]
