"""The Switch / GShard balance loss of one routing, computed inside the router ops.

``switch_balance(probs, idx) -> (share, loss)``: ``share [E]`` is each expert's share ``f_i`` of
the kept slots of ``idx [T, K]`` (empty slots, -1, are not counted; it sums to 1, or is all 0
when no slot is kept; the dtype of ``probs``) and ``loss = E * sum_i f_i * mean_t probs[t, i]``:
1 for perfectly even routing, E when every slot goes to one expert, 0 for no tokens or no kept
slot (the value :func:`moerust.nn.losses.switch_loss` gives, up to rounding). Sums run in
float64.

Why here: :func:`~moerust.ops.topk_router` and :func:`~moerust.ops.topp_router` return this next
to their other outputs (``balance=True``), so the layer's default balance loss costs one native
pass over ``probs`` instead of four torch ops and their autograd nodes. Its gradient,
``d loss / d probs[t, i] = E * f_i / T`` for every row t, is one fused multiply-add in the
router's backward (:func:`add_balance_grad`), which is why the shares and not the counts are
returned. Rust for CPU float32/float64 under the "rust" backend, the torch twin below otherwise.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .. import _backend
from .._backend import numpy_view as _np
from . import _checks


def _forward_torch(probs: torch.Tensor, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    rows, num_experts = probs.shape
    _checks.expert_indices(idx, num_experts, f"probs has {num_experts} experts")
    flat = idx.reshape(-1)
    wide = torch.float32 if probs.device.type == "mps" else torch.float64  # (MPS has no float64)
    counts = torch.bincount(flat[flat >= 0], minlength=num_experts).to(wide)
    share = counts / counts.sum().clamp(min=1)
    loss = num_experts * torch.dot(share, probs.sum(dim=0, dtype=wide)) / max(rows, 1)
    return share.to(probs.dtype), loss.to(probs.dtype)


def _switch_balance_impl(probs: torch.Tensor, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(share [E], loss [])`` of ``probs [T, E]`` (contiguous) and ``idx [T, K]`` int64; Rust or
    the torch twin. Raises ValueError for experts outside [-1, E)."""
    if _backend.rust_handles(probs, idx):
        share = torch.empty(probs.shape[1], dtype=probs.dtype)
        loss = _backend.native_fn("switch_balance", probs.dtype)(_np(probs), _np(idx), share.numpy(), _backend.num_threads())
        return share, torch.tensor(loss, dtype=probs.dtype)
    return _forward_torch(probs, idx)


def add_balance_grad(dprobs: torch.Tensor, grad_loss: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """Adds the balance loss's gradient ``grad_loss * E * share_i / T`` to every row of
    ``dprobs [T, E]`` in place (one op, no host sync) and returns it."""
    rows, num_experts = dprobs.shape
    return dprobs.addcmul_(share, grad_loss.to(share.dtype), value=num_experts / max(rows, 1))
