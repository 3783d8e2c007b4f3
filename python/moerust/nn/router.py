"""Routers: which experts each token goes to, and with what weights.

Modes:

* ``"softmax_topk"``: softmax over all experts, keep the k largest; weights renormalised to sum
  to 1 (``renormalize=True``) or the raw probabilities.
* ``"topk_softmax"``: keep the k largest logits, softmax over those k only (Mixtral).
* ``"topp"``: dynamic k (Huang et al. 2024): keep experts, largest first, until their summed
  probability exceeds ``p`` (the expert that crosses ``p`` is kept), clamped to
  ``[min_k, max_k]``. ``p`` is fixed (give each layer its own with :func:`layerwise_thresholds`)
  or learned per token: ``p(x) = 0.1 + 0.6 * sigmoid(w . x)``.

Options: temperature (logits / T), training noise (Gaussian noise on logits; multiplicative
uniform jitter of the router input), and aux-loss-free balancing (DeepSeek-V3): a per-expert bias
added to the scores used for *selection only*; after each optimizer step
:meth:`Router.update_bias` moves it by ``u * sign(mean_load - load_i)``.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import _checks
from ..ops.route_weights import MIN_SUM
from ..ops.router_forward import router_forward

ROUTINGS = ("softmax_topk", "topk_softmax", "topp")


def layerwise_thresholds(num_layers: int, bottom: float = 0.6, top: float = 0.2) -> List[float]:
    """Top-p thresholds interpolated linearly from the bottom layer to the top one."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_layers == 1:
        return [bottom]
    return [bottom + (top - bottom) * i / (num_layers - 1) for i in range(num_layers)]


@dataclasses.dataclass
class RouterOutput:
    """What a router decided for ``T`` tokens.

    Attributes:
        logits: ``[T, E]`` router logits (after temperature and noise).
        probs: ``[T, E]`` softmax of the logits (what balancing losses see).
        idx: ``[T, K]`` int64 experts per token, -1 for unused top-p slots.
        weights: ``[T, K]`` combine weights (0 in unused slots), differentiable.
        counts: ``[T]`` experts per token.
        threshold: ``[T]`` learned top-p thresholds, or None.
        share: ``[E]`` each expert's share of the slots, when the router op counted them, else None.
        balance: the Switch balance loss of this routing (differentiable), when the router op
            computed it (the one-op modes: see :meth:`Router.forward`), else None.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    idx: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    threshold: Optional[torch.Tensor] = None
    share: Optional[torch.Tensor] = None
    balance: Optional[torch.Tensor] = None


class Router(nn.Module):
    """A linear router over ``num_experts`` experts; see the module docstring for the modes."""

    expert_bias: torch.Tensor

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        routing: str = "softmax_topk",
        k: int = 2,
        renormalize: bool = True,
        p: float = 0.4,
        min_k: int = 1,
        max_k: Optional[int] = None,
        learned_threshold: bool = False,
        temperature: float = 1.0,
        noise_std: float = 0.0,
        jitter: float = 0.0,
        bias_balance: bool = False,
        bias_rate: float = 1e-3,
    ) -> None:
        super().__init__()
        _checks.one_of(routing, "routing", ROUTINGS)
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if routing != "topp" and not 1 <= k <= num_experts:
            raise ValueError(f"k must be in [1, num_experts = {num_experts}], got {k}")
        max_k = num_experts if max_k is None else max_k
        if routing == "topp":
            if not 0.0 < p <= 1.0:
                raise ValueError(f"p must be in (0, 1], got {p}")
            if not 1 <= min_k <= max_k <= num_experts:
                raise ValueError(f"need 1 <= min_k <= max_k <= num_experts = {num_experts}, got min_k={min_k}, max_k={max_k}")
            if bias_balance:
                raise ValueError("bias_balance works with top-k routing only (a bias would distort the top-p sums)")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if noise_std < 0 or not 0 <= jitter < 1:
            raise ValueError(f"noise_std must be >= 0 and jitter in [0, 1), got {noise_std}, {jitter}")
        self.dim, self.num_experts, self.routing = dim, num_experts, routing
        self.k, self.renormalize = k, renormalize
        self.p, self.min_k, self.max_k = p, min_k, max_k
        self.temperature, self.noise_std, self.jitter = temperature, noise_std, jitter
        self.bias_balance, self.bias_rate = bias_balance, bias_rate
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=dim**-0.5)
        self.threshold = nn.Linear(dim, 1) if learned_threshold else None
        if self.threshold is not None:
            nn.init.zeros_(self.threshold.weight)
            # sigmoid(b) = (p - 0.1) / 0.6 starts the learned threshold at p
            b = torch.logit(torch.tensor(min(max((p - 0.1) / 0.6, 1e-3), 1 - 1e-3)))
            nn.init.constant_(self.threshold.bias, float(b))
        self.register_buffer("expert_bias", torch.zeros(num_experts))

    @property
    def slots(self) -> int:
        """K, the number of slots per token in ``idx``."""
        return self.max_k if self.routing == "topp" else self.k

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Routes ``x [T, dim]``."""
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = F.linear(x, self.weight.to(x.dtype))
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        if self.one_op and self.routing == "softmax_topk":
            # softmax -> topk_route -> route_weights as one op (same values, one autograd node),
            # which also returns the Switch balance loss.
            probs, idx, weights, share, balance = ops.topk_router(logits, self.k, self.renormalize, balance=True)
            return RouterOutput(logits, probs, idx, weights, self._topk_counts(x), share=share, balance=balance)
        if self.one_op:
            # The same for top-p: softmax -> topp_route -> route_weights, and the balance loss.
            probs, idx, counts, weights, share, balance = ops.topp_router(
                logits, self.p, self.min_k, self.max_k, self.renormalize, balance=True
            )
            return RouterOutput(logits, probs, idx, weights, counts, share=share, balance=balance)
        probs = ops.softmax(logits)
        if self.routing == "topp" and self.threshold is not None:  # a learned per-token threshold
            threshold = 0.1 + 0.6 * torch.sigmoid(self.threshold(x).squeeze(-1))
            idx, counts = ops.topp_route(probs, threshold, min_k=self.min_k, max_k=self.max_k)
            # The learned threshold's gate multiplies in before the renormalisation.
            weights = ops.route_weights(probs, idx, renormalize=False) * _threshold_gate(probs, idx, threshold)
            if self.renormalize:
                weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=MIN_SUM)
            return RouterOutput(logits, probs, idx, weights, counts, threshold)
        scores = logits if self.routing == "topk_softmax" else probs
        if self.bias_balance:
            scores = scores + self.expert_bias.to(scores.dtype)
        idx = ops.topk_route(scores, self.k)
        if self.routing == "topk_softmax":
            weights = ops.softmax(logits.gather(1, idx))
        else:
            weights = ops.route_weights(probs, idx, self.renormalize)
        return RouterOutput(logits, probs, idx, weights, self._topk_counts(x))

    @property
    def one_op(self) -> bool:
        """Whether this router's selection runs as one router op (softmax-then-top-k without bias
        balancing, or top-p with a fixed threshold); those modes also return the balance loss."""
        if self.routing == "topp":
            return self.threshold is None
        return self.routing == "softmax_topk" and not self.bias_balance

    def route_without_graph(self, x: torch.Tensor, weight: torch.Tensor) -> "tuple[torch.Tensor, ...]":
        """``(logits, probs, idx, counts, weights, share, balance)`` of routing ``x`` with
        ``weight`` (this router's, in ``x``'s dtype), without autograd and without training
        noise: the one-op modes (see :attr:`one_op`) in one call
        (:func:`moerust.ops.router_forward.router_forward`), for the layer's one-node path
        (:class:`moerust.nn.fused.RoutedLayer`), whose backward differentiates it."""
        topp = (self.p, self.min_k, self.max_k) if self.routing == "topp" else None
        return router_forward(x.contiguous(), weight, self.temperature, self.renormalize, self.k, topp)

    def _topk_counts(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), self.k, dtype=torch.int64, device=x.device)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Aux-loss-free balancing step: ``b_i += u * sign(mean_load - load_i)``.

        Call after each optimizer step with the per-expert loads of that step (the layer does
        this for you through :meth:`moerust.nn.MoE.update_bias`).
        """
        load = load.to(self.expert_bias.device, torch.float32)
        self.expert_bias += self.bias_rate * torch.sign(load.mean() - load)


def _threshold_gate(probs: torch.Tensor, idx: torch.Tensor, threshold: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """A straight-through gate that lets the learned threshold receive gradients.

    Forward value is exactly 1 (the hard top-p choice stands); the backward sees
    ``sigmoid((threshold - mass_above) / tau)`` per slot, so raising the threshold favours keeping
    more experts where that lowers the loss.
    """
    ranked = probs.gather(1, idx.clamp(min=0)) * (idx >= 0)
    mass_above = torch.cumsum(ranked, dim=1) - ranked
    soft = torch.sigmoid((threshold[:, None] - mass_above.detach()) / tau)
    return 1.0 + soft - soft.detach()
