"""A router's whole backward in one call (``rust/router_backward.rs``), for the MoE layer's
one-node path (:mod:`moerust.nn.fused`).

From the gradients of the routing weights ``[T, K]`` (and, when they were used elsewhere, of the
probabilities and logits ``[T, E]``) and of the balance loss: the routing weights' backward, the
balance loss's gradient, the softmax backward, the temperature and the router's linear layer,
giving ``dx`` (added to the gradient already there) and the router weight's gradient ``[E, d]``.
Rust for CPU float32/float64 under the "rust" backend; otherwise the torch twin below, which is
the same computation as the composed router's ops (same values up to rounding).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from .. import _backend
from .._backend import numpy_view as _np
from .topk_router import _router_backward_op


def native_args(
    grad_probs: Optional[torch.Tensor],
    grad_logits: Optional[torch.Tensor],
    grad_balance: Optional[torch.Tensor],
    saved: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    renormalize: bool,
    temperature: float,
) -> Tuple[Tuple[Any, ...], torch.Tensor]:
    """The Rust kernel's router arguments (``RouterArgs`` in ``rust/python.rs``) and the
    ``[E, d]`` tensor it writes the router weight's gradient into (contiguous CPU tensors)."""
    x, weight, probs, idx, share = saved
    dweight = torch.empty(weight.shape, dtype=weight.dtype)
    balance = None if grad_balance is None else (float(grad_balance), _np(share))
    args = (
        None if grad_probs is None else _np(grad_probs),
        None if grad_logits is None else _np(grad_logits),
        balance, (_np(x), _np(weight), _np(probs), _np(idx)), renormalize, float(temperature), dweight.numpy(),
    )  # fmt: skip
    return args, dweight


def router_backward(
    grad_weights: torch.Tensor,
    grad_probs: Optional[torch.Tensor],
    grad_logits: Optional[torch.Tensor],
    grad_balance: Optional[torch.Tensor],
    saved: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    renormalize: bool,
    temperature: float,
    softmax_op: bool,
    dx: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dx, d_router_weight)``; ``saved = (x [T, d], router_weight [E, d], probs, idx, share)``;
    ``dx`` (``[T, d]`` or None for zeros) is added to in place. ``softmax_op`` is the forward's
    softmax path (the twin's backward follows it)."""
    x, weight, probs, idx, share = saved
    grads = [g.contiguous() if g is not None else None for g in (grad_weights, grad_probs, grad_logits)]
    tensors = [t for t in (x, weight, probs, idx, share, dx, *grads) if t is not None]
    if _backend.rust_handles(*tensors):
        if dx is None:
            dx = torch.zeros(x.shape, dtype=x.dtype)
        args, dweight = native_args(grads[1], grads[2], grad_balance, saved, renormalize, temperature)
        _backend.native_fn("router_backward", x.dtype)(_np(grads[0]), args, dx.numpy(), _backend.num_threads())
        return dx, dweight
    dlogits = _router_backward_op(grads[1], grads[0], grad_balance, probs, idx, share, renormalize, softmax_op)
    if grads[2] is not None:
        dlogits = dlogits + grads[2]
    if temperature != 1.0:
        dlogits = dlogits / temperature
    # mm then add (not addmm): the composed layer's autograd sums the two the same way.
    through = dlogits.mm(weight)
    return (through if dx is None else dx.add_(through)), dlogits.t().mm(x)
