"""An MoE layer's routed experts in one op: ``gather -> expert_mlp -> combine``.

``routed_experts(x, weights, plan, w1, w2, activation)`` returns exactly
``combine(expert_mlp(gather(x, plan), w1, w2, plan.offsets, activation), weights, plan)`` — bit
for bit, on either backend — with the gradients of ``x``, ``weights``, ``w1`` and ``w2``. Why one
op: in a small layer each of the three kernels runs for tens of microseconds, and the Python
entry, checks and autograd node around each of them (and around each backward kernel) cost as
much again; here the Rust kernels run back to back in one native call each way, on one thread
team, behind one autograd node.

A ``torch.library`` custom op with a fake kernel and an autograd formula (``torch.compile``
works); plain eager calls take the same implementation through ``torch.autograd.Function``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from .. import _backend
from .._backend import numpy_view as _np
from . import _eager
from .dispatch import (
    Plan,
    _combine_backward_op,
    _combine_impl,
    _gather_backward_op,
    _gather_impl,
    check_slot_weights,
    check_tokens,
)
from .experts import _expert_mlp_backward_op, _expert_mlp_impl, check_offsets, check_weights

Tensors4 = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _routed_experts_impl(
    x: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    row_token: torch.Tensor,
    row_slot: torch.Tensor,
    slot_row: torch.Tensor,
    offsets: torch.Tensor,
    activation: str,
) -> Tensors4:
    """``(y, xs, h, ys)``: the output and what the backward needs (gathered rows,
    pre-activations, expert outputs)."""
    if _backend.rust_handles(x, weights, w1, w2, row_token, slot_row):
        rows, d = row_token.shape[0], x.shape[1]
        xs = _backend.empty(rows, d, dtype=x.dtype)
        h = _backend.empty(rows, w1.shape[1], dtype=x.dtype)
        ys = _backend.empty(rows, d, dtype=x.dtype)
        y = _backend.empty(x.shape[0], d, dtype=x.dtype)
        plan = (_np(row_token), _np(row_slot), _np(slot_row), _np(offsets))
        _backend.native_fn("routed_experts_forward", x.dtype)(
            _np(x), _np(weights), plan, _np(w1), _np(w2), activation,
            xs.numpy(), h.numpy(), ys.numpy(), y.numpy(), _backend.num_threads(),
        )  # fmt: skip
        return y, xs, h, ys
    # The three ops' own implementations (each picks its Rust kernel or its torch twin).
    xs = _gather_impl(x, row_token, slot_row)
    ys, h = _expert_mlp_impl(xs, w1, w2, offsets, activation)
    return _combine_impl(ys, weights, slot_row, row_token, row_slot), xs, h, ys


_routed_experts_op = torch.library.custom_op("moerust::routed_experts", mutates_args=())(_routed_experts_impl)


@_routed_experts_op.register_fake
def _(x, weights, w1, w2, row_token, row_slot, slot_row, offsets, activation):  # type: ignore[no-untyped-def]
    rows = row_token.shape[0]
    return x.new_empty(x.shape), x.new_empty(rows, x.shape[1]), x.new_empty(rows, w1.shape[1]), x.new_empty(rows, x.shape[1])


@_eager.backward_op("moerust::routed_experts_backward")
def _routed_experts_backward_op(
    grad: torch.Tensor,
    xs: torch.Tensor,
    h: torch.Tensor,
    ys: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    row_token: torch.Tensor,
    row_slot: torch.Tensor,
    slot_row: torch.Tensor,
    offsets: torch.Tensor,
    activation: str,
    overwrite_ys: bool,
) -> Tensors4:
    """``(dx, dweights, dw1, dw2)`` from the gradient of ``y``; with ``overwrite_ys`` (eager
    calls only, when the saved ``ys`` are dead after this) the Rust kernel writes the gradient of
    the expert outputs over ``ys`` instead of into a fresh ``[R, d]`` buffer."""
    if _backend.rust_handles(grad, xs, h, ys, weights, w1, w2, row_token, slot_row):
        plan = (row_token, row_slot, slot_row, offsets)
        return native_backward(grad, xs, h, ys, weights, w1, w2, plan, activation, overwrite_ys)
    # The backward kernels themselves (.fn: this already is a backward op).
    grad_ys, dweights = _combine_backward_op.fn(grad, ys, weights, slot_row, row_token, row_slot)
    dxs, dw1, dw2 = _expert_mlp_backward_op.fn(grad_ys, xs, h, w1, w2, offsets, activation)
    return _gather_backward_op.fn(dxs, slot_row), dweights, dw1, dw2


def native_backward(
    grad: torch.Tensor,
    xs: torch.Tensor,
    h: torch.Tensor,
    ys: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    plan: Tensors4,
    activation: str,
    overwrite_ys: bool,
) -> Tensors4:
    """The Rust backward of :func:`_routed_experts_backward_op` (CPU tensors it handles)."""
    rows, d = xs.shape
    grad_ys = None if overwrite_ys else _backend.empty(rows, d, dtype=xs.dtype).numpy()
    outputs = (
        _backend.empty(*grad.shape, dtype=grad.dtype),
        _backend.empty(*weights.shape, dtype=weights.dtype),
        _backend.empty(*w1.shape, dtype=w1.dtype),
        _backend.empty(*w2.shape, dtype=w2.dtype),
    )
    _backend.native_fn("routed_experts_backward", xs.dtype)(
        _np(grad), (_np(xs), _np(h)), _np(ys), grad_ys, _np(weights), tuple(_np(p) for p in plan),
        _np(w1), _np(w2), activation, _backend.empty(rows, d, dtype=xs.dtype).numpy(),
        tuple(o.numpy() for o in outputs), _backend.num_threads(),
    )  # fmt: skip
    return outputs


@_routed_experts_backward_op.register_fake
def _(grad, xs, h, ys, weights, w1, w2, row_token, row_slot, slot_row, offsets, activation, overwrite_ys):  # type: ignore[no-untyped-def]
    return grad.new_empty(grad.shape), weights.new_empty(weights.shape), w1.new_empty(w1.shape), w2.new_empty(w2.shape)


def _setup(ctx: Any, inputs: Tuple[Any, ...], output: Tensors4) -> None:
    _, weights, w1, w2, row_token, row_slot, slot_row, offsets, activation = inputs
    _, xs, h, ys = output
    ctx.activation = activation
    # xs, h and ys are internal (never used outside): no zero gradients built for them.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(xs, h, ys, weights, w1, w2, row_token, row_slot, slot_row, offsets)


def _backward(ctx: Any, grad: Optional[torch.Tensor], *internal: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    none = (None,) * 5  # the plan's tensors and the activation
    if grad is None:  # only an internal output had a gradient: nothing flows back
        return (None,) * 4 + none
    saved = ctx.saved_tensors
    grad = grad.contiguous()
    # Without retain_graph the saved ys die with this node: their buffer takes their gradient
    # (the backward's peak, inside the expert kernels, then holds one [R, d] buffer less).
    overwrite = _eager.saved_tensors_die(ctx, grad, *saved)
    grads = _routed_experts_backward_op(grad, *saved, ctx.activation, overwrite)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad)) + none


_routed_experts = _eager.differentiable(_routed_experts_op, _routed_experts_impl, _backward, _setup)


def routed_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    plan: Plan,
    w1: torch.Tensor,
    w2: torch.Tensor,
    activation: str = "swiglu",
) -> torch.Tensor:
    """``y [T, d]``: the tokens ``x [T, d]`` through their routed experts, weighted per slot.

    The same values as ``combine(expert_mlp(gather(x, plan), w1, w2, plan.offsets, activation),
    weights, plan)``, computed in one op (see the module docstring); differentiable in ``x``,
    ``weights [T, K]``, ``w1 [E, H1, d]`` and ``w2 [E, d, F]`` (layouts as in :func:`expert_mlp`).
    Empty or dropped slots add 0, whatever their weight.
    """
    x, plan = check_tokens(x, plan)
    weights = check_slot_weights(weights, plan, x, "x")
    w1, w2 = check_weights(w1, w2, activation, x, "x")
    if plan.num_experts != w2.shape[0]:
        raise ValueError(f"w1 and w2 hold {w2.shape[0]} experts but the plan has {plan.num_experts}")
    offsets = plan.offsets
    if not torch.compiler.is_compiling():  # (reading values would break the graph; Rust checks too)
        check_offsets(offsets, plan.num_rows, "plan.offsets")
    y, _, _, _ = _routed_experts(
        x.contiguous(), weights.contiguous(), w1, w2, plan.row_token, plan.row_slot, plan.slot_row, offsets, activation
    )
    return y
