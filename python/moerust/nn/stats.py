"""Router statistics, cheap enough to leave on: they reuse the dispatch plan's per-expert counts."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn


class RoutingStats:
    """One forward pass's routing, as plain numbers.

    Attributes:
        load: assignments per expert in this pass (``[E]``).
        usage: bias-corrected EMA of each expert's share of assignments (``[E]``, sums to 1).
        usage_entropy: entropy of ``usage`` divided by ln E (1 = perfectly even, 0 = one expert).
        experts_per_token: mean number of experts a token was routed to (before capacity drops).
        dropped_fraction: share of assignments dropped by the capacity limit.

    ``usage`` and ``usage_entropy`` are worked out from the EMA as it was after this pass when
    first read: a layer's forward only records the numbers (it runs on every step of every layer,
    and most steps nobody reads them).
    """

    __slots__ = ("load", "experts_per_token", "dropped_fraction", "_ema", "_correction", "_usage", "_entropy")
    FIELDS = ("load", "usage", "usage_entropy", "experts_per_token", "dropped_fraction")

    def __init__(
        self,
        load: List[int],
        usage: Optional[List[float]] = None,
        usage_entropy: Optional[float] = None,
        experts_per_token: float = 0.0,
        dropped_fraction: float = 0.0,
        *,
        ema: "Optional[Sequence[float]]" = None,
        correction: float = 1.0,
    ) -> None:
        """``load`` as a list; either ``usage`` (and optionally ``usage_entropy``) or the EMA
        after this pass, ``ema`` (None before any training step: uniform usage), with its bias
        ``correction`` (usage = ema / correction)."""
        self.load = load
        self.experts_per_token = experts_per_token
        self.dropped_fraction = dropped_fraction
        self._ema, self._correction = ema, correction
        self._usage, self._entropy = usage, usage_entropy

    @property
    def usage(self) -> List[float]:
        """Bias-corrected EMA of each expert's share of assignments."""
        if self._usage is None:
            ema = self._ema
            if ema is None:
                e = len(self.load)
                self._usage = [1.0 / e] * e
            else:
                self._usage = [a / self._correction for a in ema]
        return self._usage

    @property
    def usage_entropy(self) -> float:
        """Entropy of :attr:`usage` divided by ln E."""
        if self._entropy is None:
            self._entropy = _entropy_of(self.usage)
        return self._entropy

    def as_dict(self) -> Dict[str, object]:
        """The stats as a JSON-ready dict (lists copied)."""
        values = {name: getattr(self, name) for name in self.FIELDS}
        return {name: list(v) if isinstance(v, list) else v for name, v in values.items()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RoutingStats) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return "RoutingStats(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"


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
        self._views: Optional[tuple] = None  # (see native_buffers)

    def usage(self) -> torch.Tensor:
        """The bias-corrected EMA of usage shares (uniform before the first update)."""
        return torch.tensor(self._usage_of(self.ema.tolist()), dtype=torch.float64)

    def _usage_of(self, ema: List[float]) -> List[float]:
        """``ema`` (this module's EMA values) bias-corrected for the steps taken so far."""
        n = int(self.steps)
        if n == 0:
            return [1.0 / self.num_experts] * self.num_experts
        return [a / (1.0 - self.beta**n) for a in ema]

    def update(self, load: "torch.Tensor | List[int]", tokens: int, assigned: int, dropped: int) -> RoutingStats:
        """Folds in one pass: ``load`` kept rows per expert (a tensor or a list), ``tokens`` T,
        ``assigned`` routed slots before capacity, ``dropped`` slots dropped by it."""
        # E numbers: plain Python (one transfer each way) is cheaper than a dozen tiny torch ops,
        # and this runs on every forward of every layer; usage and entropy are left to the
        # RoutingStats, computed if read.
        # (No autograd: the load is detached and the buffers never require grad.)
        counts = load if isinstance(load, list) else load.detach().cpu().tolist()
        steps = int(self.steps)
        if self.training:
            total = sum(counts)
            e, beta = self.num_experts, self.beta
            share = [c / total for c in counts] if total > 0 else [1.0 / e] * e
            ema = [beta * a + (1.0 - beta) * s for a, s in zip(self.ema.tolist(), share)]
            steps += 1
            _assign(self.ema, ema)
            _assign(self.steps, steps)
        else:
            ema = self.ema.tolist()
        return self.record(counts, ema, steps, tokens, assigned, dropped)

    def record(self, load: List[int], ema: "Sequence[float]", steps: int, tokens: int, assigned: int, dropped: int) -> RoutingStats:
        """The stats of a pass whose EMA and step count were already updated in place (by
        :meth:`update`, or by the layer's native forward with its formula): ``ema`` is the EMA
        after the update, ``steps`` the step count; the other arguments as for :meth:`update`."""
        return RoutingStats(
            load,
            experts_per_token=assigned / tokens if tokens else 0.0,
            dropped_fraction=dropped / assigned if assigned else 0.0,
            ema=ema if steps else None,
            correction=1.0 - self.beta**steps,
        )

    def native_buffers(self) -> "Optional[tuple]":
        """``(ema, steps, beta, training)`` for the layer's native forward to update in place:
        numpy views of the two buffers when they are CPU float64 / int64 tensors (else None:
        :meth:`update` runs instead)."""
        buffers = self._buffers
        ema, steps = buffers["ema"], buffers["steps"]
        views = self._views
        # The views are made once and kept while the buffers are the same tensors on the same
        # memory (``.to()`` replaces a buffer, ``.data =`` moves it): this runs on every forward.
        if (
            views is None
            or views[0] is not ema
            or views[1] is not steps
            or (views[2] is not None and views[2] != (ema.data_ptr(), steps.data_ptr()))
        ):
            native = ema.dtype == torch.float64 and steps.dtype == torch.int64 and ema.is_cpu and steps.is_cpu
            native = native and ema.is_contiguous()
            arrays = (ema.numpy(), steps.numpy()) if native else None
            views = self._views = (ema, steps, (ema.data_ptr(), steps.data_ptr()) if native else None, arrays)
        return None if views[3] is None else views[3] + (self.beta, self.training)

    def __setstate__(self, state: Dict[str, object]) -> None:
        # A copy or an unpickled module starts without views (they belonged to the buffers of the
        # module it was made from; a module pickled before they existed has none).
        super().__setstate__(state)
        self._views = None


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
