"""Optimizers and learning-rate schedules for :func:`moerust.train.train`."""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
from torch import nn

from .config import TrainConfig

# Muon's quintic Newton-Schulz coefficients (Keller Jordan's; torch.optim.Muon's defaults).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warmup, then cosine
    decay to ``min_lr_ratio``, constant, or cosine warm restarts."""
    c = config
    if step < c.warmup:
        return (step + 1) / c.warmup
    if c.schedule == "constant":
        return 1.0
    if c.schedule == "cosine":
        span = max(1, c.steps - c.warmup)
        t = min(1.0, (step - c.warmup) / span)
    else:
        t = ((step - c.warmup) % c.restart_period) / c.restart_period
    return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Muon's Newton-Schulz orthogonalisation of each matrix of ``g [..., m, n]`` (bfloat16, as
    torch.optim.Muon does)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.transpose(-1, -2)
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.transpose(-1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.transpose(-1, -2)
    return x.to(g.dtype)


class StackedMuon(torch.optim.Optimizer):
    """Muon for stacked matrices ``[E, m, n]`` (MoE experts): each ``[m, n]`` slice gets the
    update ``torch.optim.Muon`` would give a 2-D weight (Nesterov momentum, Newton-Schulz,
    decoupled weight decay, the ``sqrt(max(1, m/n))`` learning-rate ratio)."""

    def __init__(self, params, lr: float = 0.01, weight_decay: float = 0.1, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5) -> None:  # fmt: skip
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One update of every parameter with a gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_steps"])
                m, n = p.shape[-2:]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * math.sqrt(max(1.0, m / n)))
        return None


def _is_matrix(name: str, p: nn.Parameter) -> bool:
    """Hidden-layer matrices get Muon; embeddings and the output head do not (as in Muon's recipe)."""
    return p.ndim >= 2 and not name.startswith(("embed.", "head."))


class Optimizers:
    """The optimizer(s) of a run, stepped and scheduled together; checkpointable."""

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        c = config
        self.config = c
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if p.ndim >= 2]
        no_decay = [p for n, p in named if p.ndim < 2]
        self.opts: List[Tuple[torch.optim.Optimizer, float]] = []
        if c.optimizer == "muon":
            if not hasattr(torch.optim, "Muon"):
                raise RuntimeError(f"optimizer 'muon' needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}")
            flat = [p for n, p in named if _is_matrix(n, p) and p.ndim == 2]
            stacked = [p for n, p in named if _is_matrix(n, p) and p.ndim > 2]
            rest_decay = [p for n, p in named if p.ndim >= 2 and not _is_matrix(n, p)]
            if flat:
                self.opts.append((torch.optim.Muon(flat, lr=c.muon_lr, weight_decay=c.muon_weight_decay, momentum=c.muon_momentum,
                                                   nesterov=True, ns_steps=c.ns_steps), c.muon_lr))  # fmt: skip
            if stacked:
                self.opts.append((StackedMuon(stacked, lr=c.muon_lr, weight_decay=c.muon_weight_decay, momentum=c.muon_momentum,
                                              ns_steps=c.ns_steps), c.muon_lr))  # fmt: skip
            decay = rest_decay
        groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if c.optimizer == "sgd":
            self.opts.append((torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum), c.lr))
        elif groups:
            self.opts.append((torch.optim.AdamW(groups, lr=c.lr, betas=c.betas), c.lr))

    def set_step(self, step: int) -> float:
        """Sets every learning rate for ``step``; returns the schedule's factor."""
        f = lr_factor(step, self.config)
        for opt, base in self.opts:
            for g in opt.param_groups:
                g["lr"] = base * f
        return f

    def step(self) -> None:
        """Steps every optimizer and clears the gradients."""
        for opt, _ in self.opts:
            opt.step()
        for opt, _ in self.opts:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> Dict[str, object]:
        """States of every optimizer, in order."""
        return {"optimizers": [opt.state_dict() for opt, _ in self.opts]}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restores :meth:`state_dict`."""
        states = state["optimizers"]
        if len(states) != len(self.opts):  # type: ignore[arg-type]
            raise ValueError("checkpoint holds a different set of optimizers than this config builds")
        for (opt, _), s in zip(self.opts, states):  # type: ignore[arg-type]
            opt.load_state_dict(s)
