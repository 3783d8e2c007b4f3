"""Token <-> expert reordering: ``dispatch_plan`` -> ``Plan``, then ``gather`` and ``combine``.

Shapes: T tokens, K slots per token, E experts, R kept rows (expert-sorted), d features.

``gather`` and ``combine`` are ``torch.library.custom_op``s with registered fake kernels and
autograd formulas, so they work under autograd, ``torch.compile(fullgraph=True)`` and gradcheck.
Inside each op the Rust kernel runs for CPU float32/float64 tensors under the "rust" backend; every
other case runs the torch twin below it, which has the same semantics.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import torch

from .. import _backend
from .._backend import numpy_view as _np
from . import _checks, _eager


@dataclasses.dataclass(frozen=True)
class Plan:
    """The result of :func:`dispatch_plan`: where every (token, slot) pair goes.

    Attributes:
        counts: ``[E]`` rows kept per expert.
        offsets: ``[E + 1]`` exclusive scan of ``counts``; expert e owns rows
            ``offsets[e]:offsets[e + 1]`` of the expert-sorted buffer.
        row_token: ``[R]`` token of each row.
        row_slot: ``[R]`` flat slot ``t * K + j`` of each row.
        slot_row: ``[T, K]`` row of each slot, -1 if the slot is empty or was dropped.
        dropped: slots dropped by the capacity limit.
        num_experts: E.
        capacity: the capacity used, or None (dropless).
    """

    counts: torch.Tensor
    offsets: torch.Tensor
    row_token: torch.Tensor
    row_slot: torch.Tensor
    slot_row: torch.Tensor
    dropped: int
    num_experts: int
    capacity: Optional[int] = None

    @property
    def num_tokens(self) -> int:
        """T, the number of tokens."""
        return int(self.slot_row.shape[0])

    @property
    def num_slots(self) -> int:
        """K, the number of slots per token."""
        return int(self.slot_row.shape[1])

    @property
    def num_rows(self) -> int:
        """R, the number of rows of the expert-sorted buffer."""
        return int(self.row_token.shape[0])


# The plan's row count depends on the data and the result is a Python dataclass: under
# torch.compile the plan is built eagerly, between graphs (a clean graph break rather than
# dynamo's warning about an untraceable extension function).
@torch.compiler.disable
def dispatch_plan(idx: torch.Tensor, num_experts: int, capacity: Optional[int] = None) -> Plan:
    """Stable counting sort of the (token, slot) pairs of ``idx [T, K]`` (-1 = empty) by expert.

    Rows inside one expert are in token order. With ``capacity=C`` each expert keeps its first C
    slots in token order and drops the rest (their ``slot_row`` is -1, counted in ``dropped``).
    """
    idx = _checks.tensor(idx, "idx", ndim=2, kind="index")
    num_experts = _checks.integer(num_experts, "num_experts", lo=1)
    if capacity is not None:
        capacity = _checks.integer(capacity, "capacity", lo=0)
    return _dispatch_plan_impl(idx, num_experts, capacity)


def _dispatch_plan_impl(idx: torch.Tensor, num_experts: int, capacity: Optional[int]) -> Plan:
    """:func:`dispatch_plan` without the argument checks, for callers whose ``idx`` comes from a
    router kernel (the Rust kernel still rejects experts outside [-1, E))."""
    if _backend.rust_handles(idx):
        arr = idx.to(torch.int64).contiguous().numpy()
        counts, offsets, row_token, row_slot, slot_row, dropped = _backend.native().dispatch_plan(
            arr, num_experts, capacity, _backend.num_threads()
        )
        return Plan(
            counts=torch.from_numpy(counts),
            offsets=torch.from_numpy(offsets),
            row_token=torch.from_numpy(row_token),
            row_slot=torch.from_numpy(row_slot),
            slot_row=torch.from_numpy(slot_row).view(idx.shape),
            dropped=int(dropped),
            num_experts=num_experts,
            capacity=capacity,
        )
    return dispatch_plan_torch(idx, num_experts, capacity)


def dispatch_plan_torch(idx: torch.Tensor, num_experts: int, capacity: Optional[int] = None) -> Plan:
    """The torch twin of :func:`dispatch_plan` (a stable argsort of the expert keys)."""
    idx = idx.to(torch.int64)
    flat = idx.reshape(-1)
    _checks.expert_indices(flat, num_experts, f"num_experts = {num_experts}")
    dev = idx.device
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))  # empty slots sort last
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    totals = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    starts = torch.cumsum(totals, 0) - totals
    start_of = torch.cat([starts, torch.zeros(1, dtype=torch.int64, device=dev)])
    position = torch.arange(flat.numel(), device=dev) - start_of[sorted_key]  # rank inside its expert
    cap = flat.numel() if capacity is None else capacity
    keep = (sorted_key < num_experts) & (position < cap)
    kept_slots = order[keep]
    counts = totals.clamp(max=cap)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), torch.cumsum(counts, 0)])
    slot_row = torch.full_like(flat, -1)
    slot_row[kept_slots] = torch.arange(kept_slots.numel(), device=dev)
    k = idx.shape[1]
    return Plan(
        counts=counts,
        offsets=offsets,
        row_token=kept_slots // max(k, 1),
        row_slot=kept_slots,
        slot_row=slot_row.view(idx.shape),
        dropped=int((totals - counts).sum()),
        num_experts=num_experts,
        capacity=capacity,
    )


# --- torch twins of the four dense kernels -------------------------------------------------------


def _gather_torch(x: torch.Tensor, row_token: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, row_token)


def _slot_sum_torch(rows: torch.Tensor, weights: Optional[torch.Tensor], slot_row: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * rows[slot_row[t, j]]`` in slot order, empty slots skipped."""
    t, k = slot_row.shape
    out = rows.new_zeros(t, rows.shape[1])
    if rows.shape[0] == 0:  # no rows at all (e.g. capacity 0): every slot is empty
        return out
    for j in range(k):
        valid = slot_row[:, j] >= 0
        picked = rows.index_select(0, slot_row[:, j].clamp(min=0))
        if weights is not None:
            picked = picked * weights[:, j : j + 1]
        # where() rather than a multiply by 0, so inf/NaN in unused rows cannot leak in.
        out = out + torch.where(valid[:, None], picked, torch.zeros((), dtype=rows.dtype, device=rows.device))
    return out


def _combine_backward_torch(
    grad: torch.Tensor, ys: torch.Tensor, weights: torch.Tensor, row_token: torch.Tensor, row_slot: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    grad_rows = grad.index_select(0, row_token)
    grad_ys = grad_rows * weights.reshape(-1).index_select(0, row_slot)[:, None]
    dots = (grad_rows * ys).sum(dim=1)
    grad_w = weights.new_zeros(weights.numel()).index_copy_(0, row_slot, dots)
    return grad_ys, grad_w.view(weights.shape)


# --- the custom ops: Rust or torch inside, one op to autograd and torch.compile --------------------



def _gather_impl(x: torch.Tensor, row_token: torch.Tensor, slot_row: torch.Tensor) -> torch.Tensor:
    if _backend.rust_handles(x, row_token):
        out = _backend.empty(row_token.shape[0], x.shape[1], dtype=x.dtype)
        _backend.native_fn("gather", x.dtype)(_np(x), _np(row_token), out.numpy(), _backend.num_threads())
        return out
    return _gather_torch(x, row_token)


_gather_op = torch.library.custom_op("moerust::gather", mutates_args=())(_gather_impl)


@_gather_op.register_fake
def _(x: torch.Tensor, row_token: torch.Tensor, slot_row: torch.Tensor) -> torch.Tensor:
    return x.new_empty(row_token.shape[0], x.shape[1])


@_eager.backward_op("moerust::gather_backward")
def _gather_backward_op(grad: torch.Tensor, slot_row: torch.Tensor) -> torch.Tensor:
    if _backend.rust_handles(grad, slot_row):
        out = _backend.empty(slot_row.shape[0], grad.shape[1], dtype=grad.dtype)
        _backend.native_fn("gather_backward", grad.dtype)(_np(grad), _np(slot_row), out.numpy(), _backend.num_threads())
        return out
    return _slot_sum_torch(grad, None, slot_row)


@_gather_backward_op.register_fake
def _(grad: torch.Tensor, slot_row: torch.Tensor) -> torch.Tensor:
    return grad.new_empty(slot_row.shape[0], grad.shape[1])


def _gather_setup(ctx: Any, inputs: Tuple[Any, ...], output: torch.Tensor) -> None:
    _, _, slot_row = inputs
    ctx.save_for_backward(slot_row)


def _gather_backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None]:
    (slot_row,) = ctx.saved_tensors
    return _gather_backward_op(grad.contiguous(), slot_row), None, None


_gather = _eager.differentiable(_gather_op, _gather_impl, _gather_backward, _gather_setup)


def _combine_impl(
    ys: torch.Tensor, weights: torch.Tensor, slot_row: torch.Tensor, row_token: torch.Tensor, row_slot: torch.Tensor
) -> torch.Tensor:
    if _backend.rust_handles(ys, weights, slot_row):
        out = _backend.empty(slot_row.shape[0], ys.shape[1], dtype=ys.dtype)
        _backend.native_fn("combine", ys.dtype)(_np(ys), _np(weights), _np(slot_row), out.numpy(), _backend.num_threads())
        return out
    return _slot_sum_torch(ys, weights, slot_row)


_combine_op = torch.library.custom_op("moerust::combine", mutates_args=())(_combine_impl)


@_combine_op.register_fake
def _(ys: torch.Tensor, weights: torch.Tensor, slot_row: torch.Tensor, row_token: torch.Tensor, row_slot: torch.Tensor) -> torch.Tensor:
    return ys.new_empty(slot_row.shape[0], ys.shape[1])


@_eager.backward_op("moerust::combine_backward")
def _combine_backward_op(
    grad: torch.Tensor,
    ys: torch.Tensor,
    weights: torch.Tensor,
    slot_row: torch.Tensor,
    row_token: torch.Tensor,
    row_slot: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    if _backend.rust_handles(grad, ys, weights, slot_row):
        grad_ys = _backend.empty(*ys.shape, dtype=ys.dtype)
        grad_w = _backend.empty(*weights.shape, dtype=weights.dtype)
        _backend.native_fn("combine_backward", ys.dtype)(
            _np(grad), _np(ys), _np(weights), _np(row_token), _np(row_slot), _np(slot_row),
            grad_ys.numpy(), grad_w.numpy(), _backend.num_threads(),
        )
        return grad_ys, grad_w
    return _combine_backward_torch(grad, ys, weights, row_token, row_slot)


@_combine_backward_op.register_fake
def _(grad, ys, weights, slot_row, row_token, row_slot):  # type: ignore[no-untyped-def]
    return ys.new_empty(ys.shape), weights.new_empty(weights.shape)


def _combine_setup(ctx: Any, inputs: Tuple[Any, ...], output: torch.Tensor) -> None:
    ys, weights, slot_row, row_token, row_slot = inputs
    ctx.save_for_backward(ys, weights, slot_row, row_token, row_slot)


def _combine_backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
    ys, weights, slot_row, row_token, row_slot = ctx.saved_tensors
    grad_ys, grad_w = _combine_backward_op(grad.contiguous(), ys, weights, slot_row, row_token, row_slot)
    return (
        grad_ys if ctx.needs_input_grad[0] else None,
        grad_w if ctx.needs_input_grad[1] else None,
        None,
        None,
        None,
    )


_combine = _eager.differentiable(_combine_op, _combine_impl, _combine_backward, _combine_setup)


# --- public entry points -------------------------------------------------------------------------


def _check_plan(plan: object) -> Plan:
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a moerust.ops.Plan, got {type(plan).__name__}")
    return plan


def gather(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Expert-sorted rows ``xs [R, d]`` with ``xs[r] = x[plan.row_token[r]]`` (differentiable).

    Its backward sums the gradients of a token's rows in slot order (deterministic, no atomics).
    """
    x, plan = check_tokens(x, plan)
    return _gather(x, plan.row_token, plan.slot_row)


def check_tokens(x: torch.Tensor, plan: Plan) -> Tuple[torch.Tensor, Plan]:
    """Checks the plan and the tokens ``x [T, d]`` it was built for (count and device)."""
    plan = _check_plan(plan)
    x = _checks.tensor(x, "x", ndim=2)
    if x.shape[0] != plan.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens but the plan was built for {plan.num_tokens}")
    _checks.same_device("x", x, plan.row_token, "plan")
    return x, plan


def combine(ys: torch.Tensor, weights: torch.Tensor, plan: Plan) -> torch.Tensor:
    """``y [T, d]`` with ``y[t] = sum over slots j of weights[t, j] * ys[plan.slot_row[t, j]]``.

    Slots are summed in order; empty or dropped slots add 0 (whatever their weight). Differentiable
    in ``ys`` and ``weights``.
    """
    plan = _check_plan(plan)
    ys = _checks.tensor(ys, "ys", ndim=2)
    if ys.shape[0] != plan.num_rows:
        raise ValueError(f"ys has {ys.shape[0]} rows but the plan has {plan.num_rows}")
    _checks.same_device("ys", ys, plan.row_token, "plan")
    weights = check_slot_weights(weights, plan, ys, "ys")
    return _combine(ys, weights.contiguous(), plan.slot_row, plan.row_token, plan.row_slot)


def check_slot_weights(weights: torch.Tensor, plan: Plan, values: torch.Tensor, values_name: str) -> torch.Tensor:
    """Checks the per-slot ``weights [T, K]`` of ``plan`` against the tensor they weight."""
    weights = _checks.tensor(weights, "weights", ndim=2)
    if tuple(weights.shape) != tuple(plan.slot_row.shape):
        raise ValueError(f"weights must have shape {tuple(plan.slot_row.shape)} (T, K), got {tuple(weights.shape)}")
    if weights.dtype != values.dtype:
        raise TypeError(f"weights must have the dtype of {values_name} ({values.dtype}), got {weights.dtype}")
    _checks.same_device("weights", weights, values, values_name)
    return weights
