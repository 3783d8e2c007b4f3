"""Sliding-window causal masks and their block-sparse tile summary.

Queries are aligned to the end of the keys: query i sits at key position
``pos(i) = i + k_len - q_len``. Key j is visible (True) iff ``j <= pos(i)`` and
``pos(i) - j < window``: the window counts the query's own key (the Hugging Face / GPT-Neo
convention; the Mistral paper's W is our W + 1). With ``doc_ids [B, k_len]`` keys of other
documents are hidden as well. ``window=None`` means plain causal attention.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _backend
from . import _checks

TILE_EMPTY = 0
"""Tile with no visible entry: attention can skip it."""
TILE_PARTIAL = 1
"""Tile with some visible entries: needs the element mask."""
TILE_FULL = 2
"""Tile whose every entry is visible: no mask needed."""


def _check(q_len: int, k_len: int, window: Optional[int], doc_ids: Optional[torch.Tensor]) -> Tuple[int, int, int, Optional[torch.Tensor]]:
    q_len = _checks.integer(q_len, "q_len", lo=0)
    k_len = _checks.integer(k_len, "k_len", lo=0)
    if q_len > k_len:
        raise ValueError(f"q_len must be <= k_len, got q_len={q_len}, k_len={k_len}")
    w = 0 if window is None else _checks.integer(window, "window", lo=1)
    if doc_ids is not None:
        doc_ids = _checks.tensor(doc_ids, "doc_ids", ndim=2, kind="index")
        if doc_ids.shape[1] != k_len:
            raise ValueError(f"doc_ids must have shape (B, k_len={k_len}), got {tuple(doc_ids.shape)}")
    return q_len, k_len, w, doc_ids


def _use_rust(doc_ids: Optional[torch.Tensor], device: Optional[torch.device]) -> bool:
    if device is not None and torch.device(device).type != "cpu":
        return False
    return _backend.get_backend() == "rust" and (doc_ids is None or doc_ids.device.type == "cpu")


def sliding_window_mask(
    q_len: int,
    k_len: int,
    window: Optional[int],
    *,
    doc_ids: Optional[torch.Tensor] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Boolean mask ``[q_len, k_len]`` (or ``[B, q_len, k_len]`` with ``doc_ids``); True = attend."""
    q_len, k_len, w, doc_ids = _check(q_len, k_len, window, doc_ids)
    if _use_rust(doc_ids, device):
        docs = None if doc_ids is None else doc_ids.to(torch.int64).contiguous().numpy()
        shape = (q_len, k_len) if doc_ids is None else (doc_ids.shape[0], q_len, k_len)
        out = torch.empty(shape, dtype=torch.bool)
        _backend.native().sliding_window_mask(q_len, k_len, w, docs, out.view(-1).numpy(), _backend.num_threads())
        return out
    dev = device if device is not None else (doc_ids.device if doc_ids is not None else None)
    return _mask_torch(q_len, k_len, w, doc_ids, dev)


def _mask_torch(q_len: int, k_len: int, w: int, doc_ids: Optional[torch.Tensor], device: Optional[torch.device]) -> torch.Tensor:
    """The torch twin of :func:`sliding_window_mask` (``w = 0``: no window)."""
    pos = torch.arange(q_len, device=device) + (k_len - q_len)
    keys = torch.arange(k_len, device=device)
    delta = pos[:, None] - keys[None, :]
    mask = delta >= 0
    if w:
        mask &= delta < w
    if doc_ids is None:
        return mask
    docs = doc_ids.to(device=mask.device, dtype=torch.int64)
    own = docs[:, pos]  # [B, q_len]: the document of each query
    return mask[None] & (own[:, :, None] == docs[:, None, :])


def sliding_window_tiles(
    q_len: int,
    k_len: int,
    window: Optional[int],
    *,
    block_q: int = 64,
    block_k: int = 64,
    doc_ids: Optional[torch.Tensor] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Tile summary of :func:`sliding_window_mask` for blocks of ``block_q x block_k``.

    Returns int8 ``[ceil(q_len/block_q), ceil(k_len/block_k)]`` (``[B, ...]`` with ``doc_ids``)
    holding ``TILE_EMPTY`` (skip), ``TILE_PARTIAL`` (apply the mask) or ``TILE_FULL``; edge tiles
    count only their real entries. The Rust kernel does O(q_len * window) work without
    materialising the mask, so attention can skip empty tiles and cost O(T * W).
    """
    q_len, k_len, w, doc_ids = _check(q_len, k_len, window, doc_ids)
    block_q = _checks.integer(block_q, "block_q", lo=1)
    block_k = _checks.integer(block_k, "block_k", lo=1)
    nq, nk = -(-q_len // block_q), -(-k_len // block_k)
    shape = (nq, nk) if doc_ids is None else (doc_ids.shape[0], nq, nk)
    if _use_rust(doc_ids, device):
        docs = None if doc_ids is None else doc_ids.to(torch.int64).contiguous().numpy()
        out = torch.empty(shape, dtype=torch.int8)
        _backend.native().sliding_window_tiles(q_len, k_len, w, docs, block_q, block_k, out.view(-1).numpy(), _backend.num_threads())
        return out
    dev = device if device is not None else (doc_ids.device if doc_ids is not None else None)
    mask = _mask_torch(q_len, k_len, w, doc_ids, dev)
    if doc_ids is None:
        mask = mask[None]
    pad = (0, nk * block_k - k_len, 0, nq * block_q - q_len)
    b = mask.shape[0]

    def tiles(padded: torch.Tensor) -> torch.Tensor:
        return padded.view(b, nq, block_q, nk, block_k).transpose(2, 3).reshape(b, nq, nk, block_q * block_k)

    any_visible = tiles(torch.nn.functional.pad(mask, pad, value=False)).any(-1)
    all_visible = tiles(torch.nn.functional.pad(mask, pad, value=True)).all(-1)
    out = torch.where(all_visible, TILE_FULL, torch.where(any_visible, TILE_PARTIAL, TILE_EMPTY)).to(torch.int8)
    return out.view(shape)
