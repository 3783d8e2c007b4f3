"""Training: :func:`train` (the loop), :class:`TrainConfig`, optimizers and schedules,
checkpoints with exact resume, reports (specialisation, plots, tables) and the run recipes
behind the CLI (:mod:`moerust.train.runs`)."""

from .checkpoint import load_model
from .config import TrainConfig
from .loop import evaluate, train
from .optim import Optimizers, StackedMuon, lr_factor, orthogonalize
from .report import plot_run, specialisation, table

__all__ = [
    "Optimizers",
    "StackedMuon",
    "TrainConfig",
    "evaluate",
    "load_model",
    "lr_factor",
    "orthogonalize",
    "plot_run",
    "specialisation",
    "table",
    "train",
]
