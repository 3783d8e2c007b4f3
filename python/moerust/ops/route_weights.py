"""The routing weights of the selected experts: ``route_weights`` (differentiable in ``probs``).

``w[t, j] = probs[t, idx[t, j]]`` for a kept slot and 0 for an empty one (``idx = -1``); with
``renormalize=True`` each row is divided by ``max(sum of its weights, 1e-20)``. In torch that is
a mask, a clamp, a gather, a multiply, a sum, a clamp and a divide, each with an autograd node;
here it is one op forward and one backward, which matters on small layers at high thread counts.
It runs in Rust for CPU float32/float64 under the "rust" backend and as the torch twin below
otherwise; a ``torch.library`` custom op with a fake kernel and an autograd formula.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from .. import _backend
from .._backend import numpy_view as _np
from . import _checks, _eager

MIN_SUM = 1e-20


def _check_idx_range(idx: torch.Tensor, num_experts: int) -> None:
    _checks.expert_indices(idx, num_experts, f"probs has {num_experts} experts")


def _forward_torch(probs: torch.Tensor, idx: torch.Tensor, renormalize: bool) -> torch.Tensor:
    _check_idx_range(idx, probs.shape[1])
    if probs.shape[1] == 0:  # no experts: every slot is empty
        return probs.new_zeros(idx.shape)
    used = idx >= 0
    w = torch.where(used, probs.gather(1, idx.clamp(min=0)), torch.zeros((), dtype=probs.dtype, device=probs.device))
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True).clamp(min=MIN_SUM)
    return w


def _backward_torch(grad: torch.Tensor, probs: torch.Tensor, idx: torch.Tensor, renormalize: bool) -> torch.Tensor:
    _check_idx_range(idx, probs.shape[1])
    used = idx >= 0
    zero = torch.zeros((), dtype=probs.dtype, device=probs.device)
    dp = torch.zeros_like(probs)
    if idx.numel() == 0 or probs.shape[1] == 0:
        return dp
    p = torch.where(used, probs.gather(1, idx.clamp(min=0)), zero)
    g = torch.where(used, grad, zero)
    if renormalize:
        s = p.sum(dim=-1, keepdim=True)
        d = s.clamp(min=MIN_SUM)
        through_sum = torch.where(s < MIN_SUM, zero, (g * p).sum(dim=-1, keepdim=True) / (d * d))
        g = torch.where(used, g / d - through_sum, zero)
    return dp.scatter_add_(1, idx.clamp(min=0), g)


def _route_weights_impl(probs: torch.Tensor, idx: torch.Tensor, renormalize: bool) -> torch.Tensor:
    if _backend.rust_handles(probs, idx):
        out = _backend.empty(*idx.shape, dtype=probs.dtype)
        _backend.native_fn("route_weights", probs.dtype)(_np(probs), _np(idx), renormalize, out.numpy(), _backend.num_threads())
        return out
    return _forward_torch(probs, idx, renormalize)


_route_weights_op = torch.library.custom_op("moerust::route_weights", mutates_args=())(_route_weights_impl)


@_route_weights_op.register_fake
def _(probs: torch.Tensor, idx: torch.Tensor, renormalize: bool) -> torch.Tensor:
    return probs.new_empty(idx.shape)


@_eager.backward_op("moerust::route_weights_backward")
def _route_weights_backward_op(grad: torch.Tensor, probs: torch.Tensor, idx: torch.Tensor, renormalize: bool) -> torch.Tensor:
    if _backend.rust_handles(grad, probs, idx):
        out = _backend.empty(*probs.shape, dtype=probs.dtype)
        _backend.native_fn("route_weights_backward", probs.dtype)(
            _np(grad), _np(probs), _np(idx), renormalize, out.numpy(), _backend.num_threads()
        )
        return out
    return _backward_torch(grad, probs, idx, renormalize)


@_route_weights_backward_op.register_fake
def _(grad: torch.Tensor, probs: torch.Tensor, idx: torch.Tensor, renormalize: bool) -> torch.Tensor:
    return torch.empty_like(probs)


def _setup(ctx: Any, inputs: Tuple[Any, ...], output: torch.Tensor) -> None:
    probs, idx, renormalize = inputs
    ctx.renormalize = renormalize
    ctx.save_for_backward(probs, idx)


def _backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None]:
    probs, idx = ctx.saved_tensors
    return _route_weights_backward_op(grad.contiguous(), probs, idx, ctx.renormalize), None, None


_route_weights = _eager.differentiable(_route_weights_op, _route_weights_impl, _backward, _setup)


def route_weights(probs: torch.Tensor, idx: torch.Tensor, renormalize: bool = True) -> torch.Tensor:
    """Weights ``[T, K]`` of the selected experts ``idx [T, K]`` (-1 = empty slot, weight 0) from
    ``probs [T, E]``; with ``renormalize`` each row is divided by ``max(its sum, 1e-20)``.

    Differentiable in ``probs`` (gradients of duplicate slots add up). Raises ValueError if ``idx``
    holds an expert outside [-1, E) or the shapes do not match.
    """
    probs = _checks.tensor(probs, "probs", ndim=2)
    idx = _checks.tensor(idx, "idx", ndim=2, kind="index")
    if idx.shape[0] != probs.shape[0]:
        raise ValueError(f"idx must have {probs.shape[0]} rows (the rows of probs), got shape {tuple(idx.shape)}")
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__}")
    _checks.same_device("idx", idx, probs, "probs")
    return _route_weights(probs.contiguous(), idx.to(torch.int64).contiguous(), renormalize)
