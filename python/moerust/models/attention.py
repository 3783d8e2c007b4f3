"""Causal self-attention: MHA or GQA, RoPE or CoPE, full or sliding-window, optional MoH.

The windowed path really skips work outside the window: queries are cut into tiles of
``block`` rows, :func:`moerust.ops.sliding_window_tiles` says how many key tiles a query tile can
see, and each query tile attends to just that band of keys (O(T * W) instead of O(T^2)). It gives
the same result as dense attention with :func:`moerust.ops.sliding_window_mask`.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn.losses import switch_loss

KVCache = Dict[str, torch.Tensor]
"""One layer's cached keys and values, ``{"k": [B, Hkv, S, hd], "v": ...}``."""


def rope_tables(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[T, head_dim / 2]`` of rotary embeddings for integer ``positions``."""
    inv = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x [B, H, T, hd]`` pairwise (first half with second half) by the tables."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def default_block(window: Optional[int]) -> int:
    """Tile size for a window: half of it rounded up to a power of two, within 16..128 (measured:
    smaller tiles waste less work on the band's edges, larger ones cost less per tile)."""
    if window is None:
        return 64
    return int(min(128, max(16, 2 ** math.ceil(math.log2(max(window, 2) / 2)))))


class CoPE(nn.Module):
    """Contextual position encoding (Golovneva et al. 2024).

    A key's position relative to a query is the sum of gates ``sigmoid(q . k_j)`` over the keys
    from it up to the query, so positions count what the model deems relevant (words,
    sentences) rather than tokens. The position embedding at a fractional position is
    interpolated between its two integer neighbours; masked keys have gate 0.
    """

    def __init__(self, max_pos: int, head_dim: int) -> None:
        super().__init__()
        self.max_pos = max_pos
        self.pos_emb = nn.Parameter(torch.zeros(head_dim, max_pos))

    def forward(self, q: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Position logits to add to ``logits [..., Tq, Tk]`` (masked entries already -inf)."""
        gates = torch.sigmoid(logits)
        pos = gates.flip(-1).cumsum(-1).flip(-1).clamp(max=self.max_pos - 1)
        floor = pos.detach().floor().long()
        ceil = pos.detach().ceil().long()
        table = q @ self.pos_emb.to(q.dtype)  # [..., Tq, max_pos]
        frac = pos - floor
        return table.gather(-1, ceil) * frac + table.gather(-1, floor) * (1 - frac)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], cope: Optional[CoPE] = None, causal: bool = False) -> torch.Tensor:
    """Softmax attention of ``q [..., Tq, hd]`` over ``k, v [..., Tk, hd]``.

    ``mask`` is boolean (True = attend), broadcastable to ``[..., Tq, Tk]``; ``causal=True`` with
    ``mask=None`` means the plain causal mask (square only). With ``cope`` the logits are built
    explicitly; otherwise torch's fused ``scaled_dot_product_attention`` runs.
    """
    if cope is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    if mask is None and causal:
        tq, tk = q.shape[-2], k.shape[-2]
        mask = ops.sliding_window_mask(tq, tk, None, device=q.device)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    logits = logits + cope(q, logits)
    return torch.softmax(logits, dim=-1) @ v


class _KeyBands(torch.autograd.Function):
    """``[B, H, T, hd]`` -> ``[B * nq, H, band * block, hd]``: for each query tile, the ``band``
    key tiles ending at its own (zero tiles before the start). One copy forward; the backward
    adds the ``band`` shifted slices into one buffer (cheaper than ``unfold``'s backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, band: int, block: int) -> torch.Tensor:  # type: ignore[override]
        b, h, t, hd = x.shape
        nq = -(-t // block)
        ctx.shape, ctx.band, ctx.block = x.shape, band, block
        tiles = F.pad(x, (0, 0, (band - 1) * block, nq * block - t)).view(b, h, nq + band - 1, block, hd)
        out = x.new_empty(b, nq, h, band, block, hd)
        for j in range(band):
            out[:, :, :, j] = tiles[:, :, j : j + nq].transpose(1, 2)
        return out.view(b * nq, h, band * block, hd)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        b, h, t, hd = ctx.shape
        band, block = ctx.band, ctx.block
        nq = -(-t // block)
        g = grad.reshape(b, nq, h, band, block, hd)
        acc = grad.new_zeros(b, h, nq + band - 1, block, hd)
        for j in range(band):
            acc[:, :, j : j + nq] += g[:, :, :, j].transpose(1, 2)
        return acc.view(b, h, -1, hd)[:, :, (band - 1) * block : (band - 1) * block + t], None, None


def windowed_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    block: int,
    doc_ids: Optional[torch.Tensor] = None,
    cope: Optional[CoPE] = None,
) -> torch.Tensor:
    """Causal sliding-window self-attention of ``q, k, v [B, H, T, hd]`` in O(T * window).

    Each query tile of ``block`` rows attends only to the key tiles the window can reach (their
    number comes from the tile summary); the element mask inside that band also hides padding
    and, with ``doc_ids [B, T]``, keys of other documents.
    """
    b, h, t, hd = q.shape
    if t == 0:
        return q.new_zeros(q.shape)
    tiles = ops.sliding_window_tiles(t, t, window, block_q=block, block_k=block)
    band = int((tiles != ops.TILE_EMPTY).sum(dim=1).max())  # key tiles one query tile needs
    nq = tiles.shape[0]
    span = band * block
    right = nq * block - t
    front = (band - 1) * block

    qb = F.pad(q, (0, 0, 0, right)).view(b, h, nq, block, hd).transpose(1, 2).reshape(b * nq, h, block, hd)
    # Absolute positions: query (tile i, row a) is i*block + a; key (tile i, column r) is
    # i*block - front + r. Visible iff the key is real, not in the future and within the window.
    qpos = torch.arange(nq * block, device=q.device).view(nq, block, 1)
    kpos = (torch.arange(nq, device=q.device) * block - front).view(nq, 1, 1) + torch.arange(span, device=q.device).view(1, 1, span)
    delta = qpos - kpos
    mask = (delta >= 0) & (delta < window) & (kpos >= 0)  # [nq, block, span]
    if doc_ids is not None:
        docs = F.pad(doc_ids.to(torch.int64), (front, right), value=-1)
        kdocs = docs.unfold(1, span, block)  # [B, nq, span]
        qdocs = docs[:, front:].reshape(b, nq, block)
        mask = mask[None] & (qdocs[..., None] == kdocs[:, :, None, :])
        mask = mask.reshape(b * nq, 1, block, span)
    else:
        mask = mask.repeat(b, 1, 1).view(b * nq, 1, block, span)
    out = attend(qb, _KeyBands.apply(k, band, block), _KeyBands.apply(v, band, block), mask, cope)
    return out.view(b, nq, h, block, hd).transpose(1, 2).reshape(b, h, nq * block, hd)[:, :, :t]


class HeadRouter(nn.Module):
    """Mixture-of-head routing (MoH, Jin et al. 2024): per-token weights for every head.

    ``shared`` heads are always on, weighted by ``a1 * softmax(W_s x)``; of the other heads the
    top ``k`` by ``softmax(W_r x)`` are on, weighted by ``a2 * softmax(W_r x)_i``, where
    ``(a1, a2) = softmax(W_m x)``. Weights are scaled by the number of active heads so that an
    untrained router keeps the output's scale. Returns the weights and a Switch balance loss over
    the routed heads.
    """

    def __init__(self, dim: int, n_heads: int, shared: int, k: int) -> None:
        super().__init__()
        self.shared, self.routed, self.k = shared, n_heads - shared, k
        self.w_shared = nn.Linear(dim, shared, bias=False) if shared else None
        self.w_routed = nn.Linear(dim, self.routed, bias=False)
        self.w_mix = nn.Linear(dim, 2, bias=False)
        for lin in (self.w_shared, self.w_routed, self.w_mix):
            if lin is not None:
                nn.init.normal_(lin.weight, std=dim**-0.5)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [N, dim] -> (weights [N, H], balance loss, routed head indices [N, k])``."""
        mix = torch.softmax(self.w_mix(x), dim=-1)
        probs = torch.softmax(self.w_routed(x), dim=-1)
        idx = ops.topk_route(probs, self.k)
        routed = torch.zeros_like(probs).scatter(1, idx, probs.gather(1, idx)) * mix[:, 1:]
        parts = [routed]
        if self.w_shared is not None:
            parts.insert(0, torch.softmax(self.w_shared(x), dim=-1) * mix[:, :1])
        weights = torch.cat(parts, dim=-1) * (self.shared + self.k)
        return weights, switch_loss(probs, idx), idx


class Attention(nn.Module):
    """One causal self-attention layer (see the module docstring for its options)."""

    def __init__(self, dim: int, n_heads: int, kv_heads: int, *, position: str = "rope", rope_base: float = 10000.0,
                 cope_max: int = 64, window: Optional[int] = None, block: Optional[int] = None, moh_shared: int = 0,
                 moh_k: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = n_heads, kv_heads, dim // n_heads
        self.position, self.rope_base = position, rope_base
        self.window, self.block = window, default_block(window) if block is None else block
        self.qkv = nn.Linear(dim, (n_heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.cope = CoPE(cope_max, self.head_dim) if position == "cope" else None
        self.heads = HeadRouter(dim, n_heads, moh_shared, moh_k) if moh_k else None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        doc_ids: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``x [B, T, dim]`` at absolute ``positions [T]`` -> ``(y, aux)``.

        ``doc_ids [B, T]`` hides keys of other documents (packed sequences). ``cache`` (a dict,
        updated in place) holds earlier keys/values for generation. ``aux`` holds MoH's
        ``moh_balance`` loss and ``moh_heads`` (routed head indices) when MoH is on.
        """
        b, t, _ = x.shape
        h, kv, hd = self.n_heads, self.kv_heads, self.head_dim
        q, k, v = self.qkv(x).view(b, t, h + 2 * kv, hd).transpose(1, 2).split((h, kv, kv), dim=1)
        if self.position == "rope":
            cos, sin = rope_tables(positions, hd, self.rope_base, x.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat((cache["k"], k), dim=2), torch.cat((cache["v"], v), dim=2)
            cache["k"], cache["v"] = k, v
        if kv != h:
            k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
        tk = k.shape[2]
        if self.window is not None and tk == t and t > self.block:
            o = windowed_attend(q, k, v, self.window, self.block, doc_ids, self.cope)
        elif self.window is None and doc_ids is None and tk == t:
            o = attend(q, k, v, None, self.cope, causal=True)
        else:
            mask = ops.sliding_window_mask(t, tk, self.window, doc_ids=doc_ids, device=x.device)
            o = attend(q, k, v, mask if doc_ids is None else mask[:, None], self.cope)
        aux: Dict[str, torch.Tensor] = {}
        if self.heads is not None:
            weights, loss, idx = self.heads(x.reshape(b * t, -1))
            o = o * weights.view(b, t, h).transpose(1, 2)[..., None]
            aux = {"moh_balance": loss, "moh_heads": idx}
        return self.out(o.transpose(1, 2).reshape(b, t, h * hd)), aux
