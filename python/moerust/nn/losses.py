"""Router balancing losses, each returned on its own so a training loop can weight and log them.

Notation: T tokens, E experts, ``probs [T, E]`` router probabilities, ``idx [T, K]`` selected
experts (-1 = empty slot). ``f_i`` is the fraction of routed (token, slot) assignments that went to
expert i (it sums to 1); ``P_i`` is the mean router probability of expert i over tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def expert_counts(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E]`` float32 number of assignments per expert (empty slots ignored); no gradient."""
    flat = idx.reshape(-1)
    flat = flat[flat >= 0]
    return torch.bincount(flat, minlength=num_experts).to(torch.float32)


def switch_loss(
    probs: torch.Tensor,
    idx: torch.Tensor,
    counts: Optional[torch.Tensor] = None,
    p_mean: Optional[torch.Tensor] = None,
    total: Optional[int] = None,
) -> torch.Tensor:
    """Switch Transformer / GShard balance loss ``E * sum_i f_i * P_i``.

    Normalised so that perfectly uniform routing gives exactly 1 (its minimum when f and P agree);
    everything on one expert gives E. Differentiable through ``P`` only (``f`` counts hard
    choices). ``counts`` (``[E]`` assignments) replaces the counts of ``idx`` when given, which is
    how :class:`GlobalBatchBalance` feeds in counts gathered over micro-steps and ranks;
    ``p_mean`` (``probs`` averaged over tokens) may be passed when already computed, and so may
    ``total``, the number of assignments (``counts.sum()``) as a Python number: the layer knows
    it from its dispatch plan, and then the loss takes three small ops instead of six.
    """
    num_experts = probs.shape[-1]
    if counts is None:
        counts = expert_counts(idx, num_experts)
    if p_mean is None:
        p_mean = probs.reshape(-1, num_experts).mean(dim=0)
    if total is not None:
        return torch.dot(counts.to(p_mean.dtype), p_mean) * (num_experts / max(total, 1))
    f = counts.to(probs.dtype)
    f = f / f.sum().clamp(min=1)
    return num_experts * torch.dot(f, p_mean)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): ``mean over tokens of logsumexp(logits)^2``; keeps logits small."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def entropy_loss(probs: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Routing-entropy ("dynamic") loss for top-p: mean over tokens of ``-sum_i P_i log P_i``.

    Minimising it sharpens each token's distribution, so top-p keeps fewer experts (Huang et al.).
    """
    return -(probs * torch.log(probs + eps)).sum(dim=-1).mean()


def uniform_mse_loss(probs: torch.Tensor, p_mean: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared distance of the mean router probabilities from uniform ``1/E`` (``p_mean``:
    the mean, when already computed)."""
    num_experts = probs.shape[-1]
    if p_mean is None:
        p_mean = probs.reshape(-1, num_experts).mean(dim=0)
    return (p_mean - 1.0 / num_experts).pow(2).mean()


class GlobalBatchBalance:
    """Global-batch balance loss (Qiu et al. 2025, "Demons in the detail").

    The counts ``f`` are accumulated over the gradient-accumulation micro-steps of one optimizer
    step and all-reduced (summed) over the data-parallel ranks of ``group`` when
    ``torch.distributed`` is initialised; ``P`` stays local and differentiable. Call
    :meth:`loss` once per micro-step and :meth:`reset` after each optimizer step.

    A micro-step's loss uses the counts gathered *so far* (its own included), the only counts
    known when its backward runs; at the last micro-step they are the whole batch's counts, and
    :meth:`batch_loss` is then exactly the Switch loss of the concatenated batch.
    """

    def __init__(self, num_experts: int, group: Optional[object] = None) -> None:
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts = num_experts
        self.group = group
        self.counts = torch.zeros(num_experts, dtype=torch.float32)
        self._p_sum = torch.zeros(num_experts, dtype=torch.float64)
        self._tokens = 0

    def reset(self) -> None:
        """Starts a new optimizer step."""
        self.counts = torch.zeros(self.num_experts, dtype=torch.float32)
        self._p_sum = torch.zeros(self.num_experts, dtype=torch.float64)
        self._tokens = 0

    def loss(self, probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Adds this micro-step's counts (summed over ranks) and returns its balance loss."""
        local = expert_counts(idx, self.num_experts).to(probs.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(local, group=self.group)  # type: ignore[arg-type]
        self.counts = self.counts.to(local.device) + local
        flat = probs.detach().reshape(-1, self.num_experts)
        self._p_sum = self._p_sum.to(flat.device) + flat.sum(dim=0).double()
        self._tokens += flat.shape[0]
        return switch_loss(probs, idx, counts=self.counts)

    def batch_loss(self) -> float:
        """The loss of the whole accumulated batch: ``E * sum_i f_i * mean P_i`` (for logging)."""
        if self._tokens == 0:
            return 0.0
        f = self.counts.double() / self.counts.sum().clamp(min=1).double()
        p = self._p_sum / self._tokens
        return float(self.num_experts * (f * p).sum())
