"""Torch modules for Mixture-of-Experts models.

* :class:`MoE` / :class:`MoEConfig`: the MoE feed-forward layer (returns ``(y, MoEAux)``;
  ``MoEAux.losses`` is a :class:`Losses` mapping).
* :class:`Router`, :func:`layerwise_thresholds`: top-k, Mixtral-style and top-p routing.
* :class:`GroupedExperts`, :class:`MLP`: stacked-weight experts and the dense MLP.
* Losses: :func:`switch_loss`, :class:`GlobalBatchBalance`, :func:`z_loss`, :func:`entropy_loss`,
  :func:`uniform_mse_loss`.
* :class:`RouterStats` / :class:`RoutingStats`: load, bias-corrected EMA usage, entropy.
* :func:`after_optimizer_step`: per-step router bookkeeping for every MoE layer of a model.
"""

from .losses import GlobalBatchBalance, entropy_loss, expert_counts, switch_loss, uniform_mse_loss, z_loss
from .moe import MLP, GroupedExperts, Losses, MoE, MoEAux, MoEConfig, after_optimizer_step
from .router import Router, RouterOutput, layerwise_thresholds
from .stats import RouterStats, RoutingStats, normalized_entropy

__all__ = [
    "GlobalBatchBalance",
    "GroupedExperts",
    "Losses",
    "MLP",
    "MoE",
    "MoEAux",
    "MoEConfig",
    "Router",
    "RouterOutput",
    "RouterStats",
    "RoutingStats",
    "after_optimizer_step",
    "entropy_loss",
    "expert_counts",
    "layerwise_thresholds",
    "normalized_entropy",
    "switch_loss",
    "uniform_mse_loss",
    "z_loss",
]
