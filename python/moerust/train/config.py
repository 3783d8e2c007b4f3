"""``TrainConfig``: every option of the training loop, as one dataclass."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

from ..ops import _checks

OPTIMIZERS = ("adamw", "muon", "sgd")
SCHEDULES = ("cosine", "constant", "restarts")
GRAD_SCALING = ("none", "lars", "bidirectional")


@dataclasses.dataclass
class TrainConfig:
    """How to train.

    Attributes:
        steps: optimizer steps; ``grad_accum`` micro-batches each.
        optimizer: "adamw"; "muon" (Muon for matrices: torch's ``torch.optim.Muon`` for 2-D
            weights, its batched twin for stacked expert weights; AdamW for embeddings, norms,
            routers' vectors and the rest); "sgd" (momentum, e.g. with LARS).
        lr, min_lr_ratio, warmup, schedule, restart_period: the learning-rate schedule: linear
            warmup, then cosine to ``lr * min_lr_ratio``, constant, or cosine warm restarts of
            ``restart_period`` steps.
        weight_decay, betas, momentum: AdamW / SGD settings.
        muon_lr, muon_momentum, muon_weight_decay, ns_steps: Muon settings.
        grad_scaling: "none", "lars" or "bidirectional" (:func:`moerust.ops.lars_` before the
            step), with ``lars_eta`` and ``bidir_target``.
        clip: global gradient-norm clip (0 = off).
        eval_every, eval_tokens: validation cadence and how many held-out tokens it reads.
        log_every, checkpoint_every: metrics cadence; checkpoint cadence (0 = only at the end).
        seed: seeds initialisation, router noise and batch order.
    """

    steps: int = 200
    grad_accum: int = 1
    optimizer: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    schedule: str = "cosine"
    restart_period: int = 100
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    momentum: float = 0.9
    muon_lr: float = 0.01
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.1
    ns_steps: int = 5
    grad_scaling: str = "none"
    lars_eta: float = 1e-3
    bidir_target: float = 3.0
    clip: float = 1.0
    eval_every: int = 100
    eval_tokens: int = 65536
    log_every: int = 10
    checkpoint_every: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        _checks.one_of(self.optimizer, "optimizer", OPTIMIZERS)
        _checks.one_of(self.schedule, "schedule", SCHEDULES)
        _checks.one_of(self.grad_scaling, "grad_scaling", GRAD_SCALING)
        _checks.fields_at_least(self, ("steps", "grad_accum", "eval_every", "log_every", "restart_period", "eval_tokens"), 1)
        _checks.fields_at_least(self, ("warmup", "checkpoint_every"), 0)
        if not self.lr > 0 or not self.muon_lr > 0:
            raise ValueError(f"lr and muon_lr must be > 0, got {self.lr}, {self.muon_lr}")
        self.betas = tuple(self.betas)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d
