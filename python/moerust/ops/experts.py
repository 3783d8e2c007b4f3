"""The experts' MLPs over expert-sorted rows: ``expert_mlp``.

Expert e owns rows ``offsets[e]:offsets[e + 1]`` of ``xs [R, d]`` (the output of :func:`gather`)
and computes ``act(xs_e @ w1[e].T) @ w2[e].T``. Weights use the ``nn.Linear`` / Hugging Face
layout: ``w1 [E, H1, d]``, ``w2 [E, d, F]``; with ``activation="swiglu"`` ``H1 = 2F`` and the first
F rows of ``w1[e]`` are the gate (``silu(gate) * up``), with ``"gelu"`` ``H1 = F`` (exact GELU).

The Rust kernel runs tiles of rows of one expert on one core each (both GEMMs and the activation
fused, tiles of every expert scheduled together); the torch twin runs one ``mm`` per expert.
Only the pre-activation ``h [R, H1]`` is kept for the backward, which recomputes the activation.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _backend
from .._backend import numpy_view as _np
from . import _checks, _eager

ACTIVATIONS = ("swiglu", "gelu")



def hidden_rows(activation: str, hidden: int) -> int:
    """Rows of the first-layer weight (``H1``) of an MLP of hidden width ``hidden``."""
    return 2 * hidden if activation == "swiglu" else hidden


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The MLP activation of pre-activations ``h [..., H1]``: ``silu(gate) * up`` or ``gelu(h)``."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


def _act_backward(h: torch.Tensor, da: torch.Tensor, activation: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(a, dh)``: the activation recomputed from ``h`` and the gradient reaching ``h``."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        s = torch.sigmoid(gate)
        silu = gate * s
        return silu * up, torch.cat([da * up * (s * (1 + gate * (1 - s))), da * silu], dim=-1)
    cdf = 0.5 * (1 + torch.erf(h * 0.7071067811865476))
    pdf = torch.exp(-0.5 * h * h) * 0.3989422804014327
    return h * cdf, da * (cdf + h * pdf)


def _bounds(offsets: torch.Tensor) -> List[Tuple[int, int, int]]:
    """(expert, start, end) of every expert with rows."""
    o = offsets.tolist()
    return [(e, o[e], o[e + 1]) for e in range(len(o) - 1) if o[e + 1] > o[e]]


def _forward_torch(
    xs: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor, activation: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    h = xs.new_empty(xs.shape[0], w1.shape[1])
    out = xs.new_empty(xs.shape[0], w2.shape[1])
    for e, lo, hi in _bounds(offsets):
        torch.mm(xs[lo:hi], w1[e].t(), out=h[lo:hi])
        torch.mm(activate(h[lo:hi], activation), w2[e].t(), out=out[lo:hi])
    return out, h


def _backward_torch(
    grad: torch.Tensor,
    xs: torch.Tensor,
    h: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    offsets: torch.Tensor,
    activation: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dxs = torch.zeros_like(xs)
    dw1 = torch.zeros_like(w1)
    dw2 = torch.zeros_like(w2)
    for e, lo, hi in _bounds(offsets):
        a, dh = _act_backward(h[lo:hi], grad[lo:hi] @ w2[e], activation)
        torch.mm(grad[lo:hi].t(), a, out=dw2[e])
        torch.mm(dh.t(), xs[lo:hi], out=dw1[e])
        torch.mm(dh, w1[e], out=dxs[lo:hi])
    return dxs, dw1, dw2


def _expert_mlp_impl(
    xs: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor, activation: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    if _backend.rust_handles(xs, w1, w2, offsets):
        h = _backend.empty(xs.shape[0], w1.shape[1], dtype=xs.dtype)
        out = _backend.empty(xs.shape[0], w2.shape[1], dtype=xs.dtype)
        _backend.native_fn("expert_mlp_forward", xs.dtype)(
            _np(xs), _np(w1), _np(w2), _np(offsets), activation, h.numpy(), out.numpy(), _backend.num_threads()
        )
        return out, h
    return _forward_torch(xs, w1, w2, offsets, activation)


_expert_mlp_op = torch.library.custom_op("moerust::expert_mlp", mutates_args=())(_expert_mlp_impl)


@_expert_mlp_op.register_fake
def _(xs, w1, w2, offsets, activation):  # type: ignore[no-untyped-def]
    return xs.new_empty(xs.shape[0], w2.shape[1]), xs.new_empty(xs.shape[0], w1.shape[1])


@_eager.backward_op("moerust::expert_mlp_backward")
def _expert_mlp_backward_op(
    grad: torch.Tensor,
    xs: torch.Tensor,
    h: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    offsets: torch.Tensor,
    activation: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _backend.rust_handles(grad, xs, h, w1, w2, offsets):
        dxs, dw1, dw2 = (_backend.empty(*t.shape, dtype=t.dtype) for t in (xs, w1, w2))
        _backend.native_fn("expert_mlp_backward", xs.dtype)(
            _np(grad), _np(xs), _np(h), _np(w1), _np(w2), _np(offsets), activation,
            dxs.numpy(), dw1.numpy(), dw2.numpy(), _backend.num_threads(),
        )
        return dxs, dw1, dw2
    return _backward_torch(grad, xs, h, w1, w2, offsets, activation)


@_expert_mlp_backward_op.register_fake
def _(grad, xs, h, w1, w2, offsets, activation):  # type: ignore[no-untyped-def]
    return xs.new_empty(xs.shape), w1.new_empty(w1.shape), w2.new_empty(w2.shape)


def _setup(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[torch.Tensor, torch.Tensor]) -> None:
    xs, w1, w2, offsets, activation = inputs
    ctx.activation = activation
    # h is internal (never used outside): do not let autograd build a zero gradient for it.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(xs, output[1], w1, w2, offsets)


def _backward(ctx: Any, grad_out: torch.Tensor, grad_h: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    if grad_out is None:  # only h (internal) had a gradient: nothing flows back
        return None, None, None, None, None
    xs, h, w1, w2, offsets = ctx.saved_tensors
    dxs, dw1, dw2 = _expert_mlp_backward_op(grad_out.contiguous(), xs, h, w1, w2, offsets, ctx.activation)
    need = ctx.needs_input_grad
    return (dxs if need[0] else None, dw1 if need[1] else None, dw2 if need[2] else None, None, None)


_expert_mlp = _eager.differentiable(_expert_mlp_op, _expert_mlp_impl, _backward, _setup)


def expert_mlp(
    xs: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor, activation: str = "swiglu"
) -> torch.Tensor:
    """``out [R, d]``: each expert's MLP applied to its rows of ``xs [R, d]`` (differentiable).

    Args:
        xs: expert-sorted rows, e.g. ``gather(x, plan)``.
        w1: ``[E, H1, d]`` first-layer weights (``H1 = 2F`` for SwiGLU: gate rows, then up rows).
        w2: ``[E, d, F]`` second-layer weights.
        offsets: ``[E + 1]`` int64 row offsets (``plan.offsets``): expert e owns
            ``xs[offsets[e]:offsets[e + 1]]``.
        activation: ``"swiglu"`` or ``"gelu"``.
    """
    xs = _checks.tensor(xs, "xs", ndim=2)
    offsets = _checks.tensor(offsets, "offsets", ndim=1, kind="index")
    w1, w2 = check_weights(w1, w2, activation, xs, "xs")
    num_experts = w2.shape[0]
    if offsets.shape[0] != num_experts + 1:
        raise ValueError(f"offsets must have {num_experts + 1} entries (E + 1), got {offsets.shape[0]}")
    offsets = offsets.to(torch.int64)
    if _backend.rust_handles(xs):
        offsets = offsets.cpu()
    check_offsets(offsets, xs.shape[0], "offsets")
    out, _ = _expert_mlp(xs.contiguous(), w1, w2, offsets, activation)
    return out


def check_weights(
    w1: torch.Tensor, w2: torch.Tensor, activation: str, x: torch.Tensor, x_name: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Checks the experts' weights (shapes, dtype and device against the input ``x``) and the
    activation; returns the weights contiguous."""
    w1 = _checks.tensor(w1, "w1", ndim=3)
    w2 = _checks.tensor(w2, "w2", ndim=3)
    _checks.one_of(activation, "activation", ACTIVATIONS)
    num_experts, d, hidden = w2.shape
    h1 = hidden_rows(activation, hidden)
    if tuple(w1.shape) != (num_experts, h1, d):
        raise ValueError(f"w1 must have shape {(num_experts, h1, d)} for w2 of shape {tuple(w2.shape)} and {activation}, got {tuple(w1.shape)}")
    if x.shape[1] != d:
        raise ValueError(f"{x_name} must have {d} features (w2 has d = {d}), got {x.shape[1]}")
    for name, t in (("w1", w1), ("w2", w2)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of {x_name} ({x.dtype}), got {t.dtype}")
        _checks.same_device(name, t, x, x_name)
    return w1.contiguous(), w2.contiguous()


def check_offsets(offsets: torch.Tensor, rows: int, name: str) -> None:
    """Checks that the int64 ``offsets`` rise from 0 to ``rows`` without decreasing."""
    o = offsets.tolist()
    if o[0] != 0 or o[-1] != rows or any(b < a for a, b in zip(o, o[1:])):
        raise ValueError(f"{name} must be non-decreasing from 0 to {rows} (the number of rows), got {o[0]} .. {o[-1]}")
