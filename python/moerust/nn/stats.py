"""Router statistics, cheap enough to leave on: they reuse the dispatch plan's per-expert counts."""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class RoutingStats:
    """One forward pass's routing, as plain numbers.

    Attributes:
        load: assignments per expert in this pass (``[E]``).
        usage: bias-corrected EMA of each expert's share of assignments (``[E]``, sums to 1).
        usage_entropy: entropy of ``usage`` divided by ln E (1 = perfectly even, 0 = one expert).
        experts_per_token: mean number of experts a token was routed to (before capacity drops).
        dropped_fraction: share of assignments dropped by the capacity limit.
    """

    load: List[int]
    usage: List[float]
    usage_entropy: float
    experts_per_token: float
    dropped_fraction: float

    def as_dict(self) -> Dict[str, object]:
        """The stats as a JSON-ready dict."""
        return dataclasses.asdict(self)


def normalized_entropy(shares: torch.Tensor) -> float:
    """Entropy of a distribution over E entries divided by ln E (1 for E = 1)."""
    return _entropy_of([float(v) for v in shares.detach().reshape(-1).tolist()])


class RouterStats(nn.Module):
    """Tracks per-expert usage with an exponential moving average, bias-corrected (Adam style:
    divided by ``1 - beta^steps``) so early values are not dragged toward zero.

    The EMA and step count are buffers, so they travel with ``state_dict`` checkpoints.
    """

    ema: torch.Tensor
    steps: torch.Tensor

    def __init__(self, num_experts: int, beta: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.num_experts = num_experts
        self.beta = beta
        self.register_buffer("ema", torch.zeros(num_experts, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def usage(self) -> torch.Tensor:
        """The bias-corrected EMA of usage shares (uniform before the first update)."""
        return torch.tensor(self._usage_of(self.ema.tolist()), dtype=torch.float64)

    def _usage_of(self, ema: List[float]) -> List[float]:
        """``ema`` (this module's EMA values) bias-corrected for the steps taken so far."""
        n = int(self.steps)
        if n == 0:
            return [1.0 / self.num_experts] * self.num_experts
        return [a / (1.0 - self.beta**n) for a in ema]

    def update(self, load: torch.Tensor, tokens: int, assigned: int, dropped: int) -> RoutingStats:
        """Folds in one pass: ``load`` kept rows per expert, ``tokens`` T, ``assigned`` routed
        slots before capacity, ``dropped`` slots dropped by it."""
        # E numbers: plain Python (one transfer each way) is cheaper than a dozen tiny torch ops,
        # and this runs on every forward of every layer.
        # (No autograd: the load is detached and the buffers never require grad.)
        counts = [int(v) for v in load.detach().cpu().tolist()]
        total = sum(counts)
        e = self.num_experts
        ema = self.ema.tolist()
        if self.training:
            share = [c / total for c in counts] if total > 0 else [1.0 / e] * e
            beta = self.beta
            ema = [beta * a + (1.0 - beta) * s for a, s in zip(ema, share)]
            _assign(self.ema, ema)
            _assign(self.steps, int(self.steps) + 1)
        usage = self._usage_of(ema)
        return RoutingStats(
            load=counts,
            usage=usage,
            usage_entropy=_entropy_of(usage),
            experts_per_token=assigned / tokens if tokens else 0.0,
            dropped_fraction=dropped / assigned if assigned else 0.0,
        )


def _assign(buffer: torch.Tensor, value: object) -> None:
    """Writes Python numbers into a buffer in place: through a numpy view on the CPU (no torch op
    to dispatch: this runs on every training forward of every layer), with ``copy_`` elsewhere."""
    if buffer.device.type == "cpu":
        buffer.numpy()[...] = value
    else:
        buffer.copy_(torch.tensor(value, dtype=buffer.dtype))


def _entropy_of(shares: List[float]) -> float:
    """:func:`normalized_entropy` of a list of shares (negative shares count as 0), in plain
    Python: for E numbers that is cheaper than a dozen tiny torch ops."""
    e = len(shares)
    if e <= 1:
        return 1.0
    clipped = [max(v, 0.0) for v in shares]
    total = max(sum(clipped), 1e-30)
    h = -sum((v / total) * math.log(max(v / total, 1e-30)) for v in clipped)
    return h / math.log(e)
