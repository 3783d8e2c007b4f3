"""Exact parameter counts: total, active per token, inactive (expert weights a token skips)."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

from torch import nn

from ..nn.moe import MoE

# Row names of the report, in the order they are printed.
PARTS = ("embedding", "attention", "head router (MoH)", "norms", "dense FFN", "router", "experts", "shared experts", "output head")


@dataclasses.dataclass
class ParamReport:
    """Parameter counts of a model; ``rows`` holds ``(part, total, active)`` per part.

    ``active`` counts what one token's forward pass uses: every dense weight (the whole
    embedding matrix included, as it is the output head when tied) plus, in each MoE layer,
    ``experts_per_token`` of its E experts. ``inactive = total - active``. SwiGLU experts count
    three matrices (two in the stacked ``w1``, one in ``w2``).
    """

    total: int
    active: float
    rows: List[Tuple[str, int, float]]
    experts_per_token: Dict[int, float]

    @property
    def inactive(self) -> float:
        """Parameters a token does not use."""
        return self.total - self.active

    def as_dict(self) -> Dict[str, object]:
        """JSON-ready counts."""
        return {
            "total": self.total,
            "active": self.active,
            "inactive": self.inactive,
            "parts": {name: {"total": t, "active": a} for name, t, a in self.rows},
            "experts_per_token": {str(k): v for k, v in self.experts_per_token.items()},
        }

    def table(self) -> str:
        """The counts as a plain-text table."""
        lines = [f"{'part':<20} {'total':>14} {'active/token':>14}"]
        for name, total, active in self.rows:
            lines.append(f"{name:<20} {total:>14,} {_fmt(active):>14}")
        lines.append(f"{'all':<20} {self.total:>14,} {_fmt(self.active):>14}")
        lines.append(f"{'inactive':<20} {'':>14} {_fmt(self.inactive):>14}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _fmt(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,.1f}"


def _part(name: str) -> str:
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("head."):
        return "output head"
    if ".attn.heads." in name:
        return "head router (MoH)"
    if ".attn." in name:
        return "attention"
    if "norm" in name.split(".")[-2]:
        return "norms"
    if ".ffn.experts." in name:
        return "experts"
    if ".ffn.router." in name:
        return "router"
    if ".ffn.shared." in name:
        return "shared experts"
    if ".ffn." in name:
        return "dense FFN"
    return "norms" if name.startswith("norm.") else "attention"


def param_report(model: nn.Module, experts_per_token: Optional[Dict[int, float]] = None) -> ParamReport:
    """Counts the parameters of an :class:`~moerust.models.LM` (works on the meta device)."""
    used: Dict[int, float] = {}
    for i, block in enumerate(model.blocks):  # type: ignore[attr-defined]
        if isinstance(block.ffn, MoE):
            router = block.ffn.router
            default = router.max_k if router.routing == "topp" else router.k
            used[i] = float((experts_per_token or {}).get(i, default))
    totals: Dict[str, int] = {p: 0 for p in PARTS}
    actives: Dict[str, float] = {p: 0.0 for p in PARTS}
    for name, param in model.named_parameters():  # shared (tied) tensors are listed once
        part = _part(name)
        n = param.numel()
        totals[part] += n
        if part == "experts":
            layer = int(name.split(".")[1])
            actives[part] += n * used[layer] / model.blocks[layer].ffn.config.num_experts  # type: ignore[attr-defined]
        else:
            actives[part] += n
    rows = [(p, totals[p], actives[p]) for p in PARTS if totals[p]]
    return ParamReport(sum(totals.values()), sum(actives.values()), rows, used)
