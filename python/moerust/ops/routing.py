"""Expert selection: ``topk_route`` and ``topp_route``.

Order everywhere: larger probability first, ties broken by the lower expert index. Both return
indices only; gather the weights from ``probs`` in torch so autograd stays in torch.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import _backend
from . import _checks


def _check_probs(probs: object) -> torch.Tensor:
    return _checks.tensor(probs, "probs", ndim=2)


def _raise_nan(probs: torch.Tensor) -> None:
    if bool(torch.isnan(probs).any()):
        raise ValueError("probs contains NaN")


def topk_route(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[T, k]`` (int64) of the k largest entries of each row of ``probs [T, E]``.

    Rows are ordered by descending value, ties broken by the lower expert index. Raises ValueError
    if ``k`` is outside [1, E] or ``probs`` contains NaN.
    """
    probs = _check_probs(probs)
    num_experts = probs.shape[1]
    k = _checks.integer(k, "k", lo=1, hi=max(num_experts, 1))
    if num_experts == 0:
        raise ValueError("probs must have at least one expert column, got shape (T, 0)")
    return _topk_route_impl(probs, k)


def _topk_route_impl(probs: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`topk_route` after its checks: the Rust kernel or the torch twin."""
    if _backend.rust_handles(probs):
        out = _backend.empty(probs.shape[0], k, dtype=torch.int64)
        _backend.native_fn("topk_route", probs.dtype)(_backend.numpy_view(probs), out.numpy(), _backend.num_threads())
        return out
    return topk_route_torch(probs, k)


def topk_route_torch(probs: torch.Tensor, k: int) -> torch.Tensor:
    """The torch twin of :func:`topk_route` (a stable descending sort keeps ties in index order)."""
    _raise_nan(probs)
    return torch.sort(probs.detach(), dim=1, descending=True, stable=True).indices[:, :k].contiguous()


def _check_p(p: object, rows: int) -> Union[float, torch.Tensor]:
    """A float in [0, 1], or a ``[T]`` tensor of thresholds in [0, 1] (one per row)."""
    if not isinstance(p, torch.Tensor):
        return _checks.real(p, "p", lo=0.0, hi=1.0)
    if p.dim() != 1 or p.shape[0] != rows:
        raise ValueError(f"p must be a number or a tensor of shape ({rows},) (one per row), got shape {tuple(p.shape)}")
    if not p.is_floating_point():
        raise TypeError(f"p must have a floating-point dtype, got {p.dtype}")
    p = p.detach().to(torch.float32)
    if bool(((p < 0) | (p > 1) | torch.isnan(p)).any()):
        raise ValueError("p must be in [0.0, 1.0] in every row")
    return p


def topp_route(
    probs: torch.Tensor, p: Union[float, torch.Tensor], min_k: int = 1, max_k: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dynamic top-p routing (Huang et al. 2024): ``(idx [T, max_k] int64, counts [T] int64)``.

    Each row is sorted descending (ties: lower index first); the expert at rank r is kept iff the
    float32 sum of the probabilities ranked above it, summed in rank order, is <= p (compared as
    float32), so the expert that crosses p is kept. The count is then clamped to
    [min_k, max_k]. Unused slots hold -1. ``probs`` must be non-negative and free of NaN.
    ``p`` is one threshold, or a ``[T]`` tensor of per-row thresholds (e.g. a learned one).
    """
    probs = _check_probs(probs)
    num_experts = probs.shape[1]
    if num_experts == 0:
        raise ValueError("probs must have at least one expert column, got shape (T, 0)")
    p = _check_p(p, probs.shape[0])
    max_k = num_experts if max_k is None else _checks.integer(max_k, "max_k", lo=1, hi=num_experts)
    min_k = _checks.integer(min_k, "min_k", lo=1, hi=max_k)
    return _topp_route_impl(probs, p, min_k, max_k)


def _topp_route_impl(probs: torch.Tensor, p: Union[float, torch.Tensor], min_k: int, max_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`topp_route` after its checks (``p``: a float, or a float32 tensor of one threshold
    or one per row): the Rust kernel or the torch twin."""
    if _backend.rust_handles(probs):
        x = probs.detach().contiguous()
        idx = _backend.empty(probs.shape[0], max_k, dtype=torch.int64)
        counts = _backend.empty(probs.shape[0], dtype=torch.int64)
        fn = _backend.native_fn("topp_route", x.dtype)
        thresholds = p.contiguous() if isinstance(p, torch.Tensor) else torch.tensor([p], dtype=torch.float32)
        fn(x.numpy(), thresholds.cpu().numpy(), min_k, idx.numpy(), counts.numpy(), _backend.num_threads())
        return idx, counts
    return topp_route_torch(probs, p, min_k, max_k)


def topp_route_torch(probs: torch.Tensor, p: Union[float, torch.Tensor], min_k: int, max_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The torch twin of :func:`topp_route` (float32 running sum, one rank at a time)."""
    probs = probs.detach()
    _raise_nan(probs)
    if bool((probs < 0).any()):
        raise ValueError("probs must be non-negative")
    values, order = torch.sort(probs, dim=1, descending=True, stable=True)
    values = values[:, :max_k].to(torch.float32)
    threshold = torch.as_tensor(p, dtype=torch.float32, device=probs.device)
    acc = torch.zeros(probs.shape[0], dtype=torch.float32, device=probs.device)
    counts = torch.zeros(probs.shape[0], dtype=torch.int64, device=probs.device)
    # torch.cumsum accumulates float32 in double on CPU; the contract is a float32 running sum.
    for r in range(max_k):
        counts += acc <= threshold
        acc = acc + values[:, r]
    counts = counts.clamp(min_k, max_k)
    ranks = torch.arange(max_k, device=probs.device)
    idx = torch.where(ranks[None, :] < counts[:, None], order[:, :max_k], torch.full_like(order[:, :max_k], -1))
    return idx.contiguous(), counts
