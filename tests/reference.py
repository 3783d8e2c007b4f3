"""Plain-Python reference implementations of the kernel contracts (SPEC section 2), written
independently of both backends: loops over lists, no torch ops beyond reading values."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np


def order(row: List[float]) -> List[int]:
    """Expert indices by descending value, ties by lower index."""
    return sorted(range(len(row)), key=lambda j: (-row[j], j))


def topk(probs: List[List[float]], k: int) -> List[List[int]]:
    return [order(row)[:k] for row in probs]


def topp(probs: List[List[float]], p: float, min_k: int, max_k: int) -> Tuple[List[List[int]], List[int]]:
    idx, counts = [], []
    p32 = np.float32(p)
    for row in probs:
        ranked = order(row)
        acc = np.float32(0.0)
        kept = 0
        for j in ranked:
            if acc <= p32:
                kept += 1
            with np.errstate(over="ignore"):  # huge probabilities overflow to inf, as in float32
                acc = np.float32(acc + np.float32(row[j]))
        kept = min(max(kept, min_k), max_k)
        idx.append(ranked[:kept] + [-1] * (max_k - kept))
        counts.append(kept)
    return idx, counts


def plan(idx: List[List[int]], num_experts: int, capacity: Optional[int]):
    """(counts, offsets, row_token, row_slot, slot_row, dropped) by a direct per-expert scan."""
    t = len(idx)
    k = len(idx[0]) if t else 0
    slot_row = [[-1] * k for _ in range(t)]
    row_token: List[int] = []
    row_slot: List[int] = []
    counts, offsets, dropped = [], [0], 0
    for e in range(num_experts):
        kept = 0
        for tok in range(t):
            for j in range(k):
                if idx[tok][j] == e:
                    if capacity is None or kept < capacity:
                        slot_row[tok][j] = len(row_token)
                        row_token.append(tok)
                        row_slot.append(tok * k + j)
                        kept += 1
                    else:
                        dropped += 1
        counts.append(kept)
        offsets.append(offsets[-1] + kept)
    return counts, offsets, row_token, row_slot, slot_row, dropped


def combine(ys: np.ndarray, weights: np.ndarray, slot_row: List[List[int]]) -> np.ndarray:
    out = np.zeros((len(slot_row), ys.shape[1]), dtype=np.float64)
    for t, rows in enumerate(slot_row):
        for j, r in enumerate(rows):
            if r >= 0:
                out[t] += float(weights[t, j]) * ys[r].astype(np.float64)
    return out


def window_mask(q_len: int, k_len: int, window: Optional[int], docs: Optional[List[int]] = None) -> List[List[bool]]:
    out = []
    for i in range(q_len):
        pos = i + k_len - q_len
        row = []
        for j in range(k_len):
            ok = j <= pos and (window is None or pos - j < window)
            if docs is not None:
                ok = ok and docs[j] == docs[pos]
            row.append(ok)
        out.append(row)
    return out


def lars_ratio(w: np.ndarray, g: np.ndarray, eta: float, wd: float, eps: float) -> float:
    wn, gn = math.sqrt(float((w.astype(np.float64) ** 2).sum())), math.sqrt(float((g.astype(np.float64) ** 2).sum()))
    if wn == 0 or gn == 0:
        return 1.0
    return eta * wn / (gn + wd * wn + eps)


def bidirectional_scale(g: np.ndarray, target: float, lo: float, hi: float, eps: float) -> float:
    gn = math.sqrt(float((g.astype(np.float64) ** 2).sum()))
    if gn < 1e-6:
        return 1.0
    return min(max(math.sqrt(target / (gn + eps)), lo), hi)
