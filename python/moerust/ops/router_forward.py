"""A router's whole forward in one call (``rust/router_forward.rs``), for the MoE layer's
one-node path (:mod:`moerust.nn.fused`): ``logits = x Wr^T / temperature``, the softmax, the
top-k or top-p selection, the routing weights and the balance loss, without autograd (the
one-node path differentiates it with :mod:`moerust.ops.router_backward`).

Rust for CPU float32/float64 under the "rust" backend; otherwise the torch twin below, the
composed router's own ops in its order (``F.linear``, the division, the router op's
implementation). The two agree up to rounding (the products and the softmax are summed in
another order), so a token whose top experts are within rounding of each other may be routed
differently by the two.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .. import _backend
from .._backend import numpy_view as _np
from .topk_router import _topk_router_impl
from .topp_router import _topp_router_impl

Outputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def router_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
    renormalize: bool,
    k: int,
    topp: Optional[Tuple[float, int, int]] = None,
) -> Outputs:
    """``(logits, probs, idx, counts, weights, share, balance)`` of routing ``x [T, d]`` (contiguous)
    with ``weight [E, d]``: top-``k``, or top-p with ``topp = (p, min_k, max_k)``. Arguments are
    the router's own, already checked. Raises ValueError for NaN logits."""
    rows, num_experts = x.shape[0], weight.shape[0]
    slots = k if topp is None else topp[2]
    # Top-k keeps k experts per token; top-p writes its counts below.
    counts = torch.full((rows,), k, dtype=torch.int64, device=x.device) if topp is None else None
    if _backend.rust_handles(x, weight):
        dtype = x.dtype
        logits = _backend.empty(rows, num_experts, dtype=dtype)
        probs = _backend.empty(rows, num_experts, dtype=dtype)
        idx = _backend.empty(rows, slots, dtype=torch.int64)
        weights = _backend.empty(rows, slots, dtype=dtype)
        share = torch.empty(num_experts, dtype=dtype)
        selection = None
        if topp is not None:
            counts = torch.empty(rows, dtype=torch.int64)
            selection = (np.array([topp[0]], dtype=np.float32), topp[1], topp[2], counts.numpy())
        loss = _backend.native_fn("router_forward", dtype)(
            _np(x), _np(weight), float(temperature), renormalize, k, selection,
            (logits.numpy(), probs.numpy(), idx.numpy(), weights.numpy(), share.numpy()), _backend.num_threads(),
        )  # fmt: skip
        return logits, probs, idx, counts, weights, share, torch.tensor(loss, dtype=dtype)
    logits = F.linear(x, weight)
    if temperature != 1.0:
        logits = logits / temperature
    if topp is None:
        probs, idx, weights, share, balance = _topk_router_impl(logits, k, renormalize)
    else:
        thresholds = torch.tensor([topp[0]], dtype=torch.float32, device=x.device)
        probs, idx, counts, weights, share, balance = _topp_router_impl(logits, thresholds, topp[1], topp[2], renormalize)
    return logits, probs, idx, counts, weights, share, balance
