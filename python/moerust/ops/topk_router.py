"""The default router's forward in one op: ``softmax -> topk_route -> route_weights``.

``topk_router(logits, k, renormalize)`` returns exactly what the three public ops return in
sequence — ``probs = softmax(logits)``, ``idx = topk_route(probs, k)``, ``weights =
route_weights(probs, idx, renormalize)`` — bit for bit, on either backend, with the gradients of
``probs`` and ``weights`` flowing back to ``logits``. Why one op: each public op is a Python
entry with checks, an autograd node and a native call; at the sizes of a small layer (1024 tokens
of 8 experts) that wrapping costs more than the kernels (40-75 us per op on the lent 16-core VM,
inside a layer step of ~2.5 ms), and the router's forward and backward had five of them. Here the
same kernels run behind one entry and one autograd node, and the backward adds the two incoming
gradients before a single softmax backward.

A ``torch.library`` custom op with a fake kernel and an autograd formula (``torch.compile``
works); plain eager calls take the same implementation through ``torch.autograd.Function``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from . import _checks, _eager
from .route_weights import _route_weights_backward_op, _route_weights_impl
from .router_softmax import _softmax_backward_op, _softmax_impl, _takes_kernel_op
from .routing import _topk_route_impl


def _topk_router_impl(logits: torch.Tensor, k: int, renormalize: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The three ops' own implementations (each picks the Rust kernel or its torch twin).
    probs = _softmax_impl(logits) if _takes_kernel_op(logits) else torch.softmax(logits.detach(), dim=-1)
    idx = _topk_route_impl(probs, k)
    return probs, idx, _route_weights_impl(probs, idx, renormalize)


_topk_router_op = torch.library.custom_op("moerust::topk_router", mutates_args=())(_topk_router_impl)


@_topk_router_op.register_fake
def _(logits: torch.Tensor, k: int, renormalize: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = logits.shape[0]
    return torch.empty_like(logits), logits.new_empty(rows, k, dtype=torch.int64), logits.new_empty(rows, k)


@_eager.backward_op("moerust::topk_router_backward")
def _router_backward_op(
    grad_probs: Optional[torch.Tensor],
    grad_weights: torch.Tensor,
    probs: torch.Tensor,
    idx: torch.Tensor,
    renormalize: bool,
    softmax_op: bool,
) -> torch.Tensor:
    # The backward kernels themselves (.fn: this already is a backward op, one op for compile).
    dp = _route_weights_backward_op.fn(grad_weights, probs, idx, renormalize)
    if grad_probs is not None:
        dp = dp.add_(grad_probs)
    # The softmax backward of the path the forward took, as the composed ops would run it.
    if softmax_op:
        return _softmax_backward_op.fn(dp, probs)
    return torch._softmax_backward_data(dp, probs, -1, probs.dtype)


@_router_backward_op.register_fake
def _(grad_probs, grad_weights, probs, idx, renormalize, softmax_op):  # type: ignore[no-untyped-def]
    return torch.empty_like(probs)


def router_setup(ctx: Any, logits: torch.Tensor, renormalize: bool, probs: torch.Tensor, idx: torch.Tensor, *selection: torch.Tensor) -> None:
    """What a router op's backward needs (shared with ``topp_router``); ``idx`` and the other
    ``selection`` outputs (e.g. counts) get no gradient."""
    ctx.renormalize = renormalize
    ctx.softmax_op = _takes_kernel_op(logits)  # the forward's choice, for its backward
    ctx.mark_non_differentiable(idx, *selection)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(probs, idx)


def router_backward(ctx: Any, grad_probs: Optional[torch.Tensor], grad_weights: Optional[torch.Tensor]) -> torch.Tensor:
    """The gradient of a router op's logits from those of its probabilities and weights (shared
    with ``topp_router``)."""
    probs, idx = ctx.saved_tensors
    if grad_weights is None:
        grad_weights = torch.zeros(idx.shape, dtype=probs.dtype, device=probs.device)
    if grad_probs is not None:
        grad_probs = grad_probs.contiguous()
    return _router_backward_op(grad_probs, grad_weights.contiguous(), probs, idx, ctx.renormalize, ctx.softmax_op)


def _setup(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    logits, _, renormalize = inputs
    probs, idx, _ = output
    router_setup(ctx, logits, renormalize, probs, idx)


def _backward(
    ctx: Any, grad_probs: Optional[torch.Tensor], grad_idx: Optional[torch.Tensor], grad_weights: Optional[torch.Tensor]
) -> Tuple[Optional[torch.Tensor], None, None]:
    return router_backward(ctx, grad_probs, grad_weights), None, None


_topk_router = _eager.differentiable(_topk_router_op, _topk_router_impl, _backward, _setup)


def topk_router(logits: torch.Tensor, k: int, renormalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(probs [T, E], idx [T, k], weights [T, k])`` of a softmax-then-top-k router.

    The same values as ``probs = softmax(logits)``, ``idx = topk_route(probs, k)``,
    ``weights = route_weights(probs, idx, renormalize)``, computed in one op (see the module
    docstring); ``probs`` and ``weights`` are differentiable in ``logits``, ``idx`` is not.
    Raises ValueError if ``k`` is outside [1, E] or the probabilities contain NaN.
    """
    logits = _checks.tensor(logits, "logits", ndim=2)
    num_experts = logits.shape[1]
    if num_experts == 0:
        raise ValueError("logits must have at least one expert column, got shape (T, 0)")
    k = _checks.integer(k, "k", lo=1, hi=num_experts)
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__}")
    return _topk_router(logits.contiguous(), k, renormalize)
