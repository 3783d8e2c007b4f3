"""Argument checks shared by both backends, so Rust and torch raise the same exception types.

Wrong Python type or dtype -> TypeError; wrong rank, shape or value -> ValueError. Every message
starts with the argument's name.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

INDEX_DTYPES = (torch.int64, torch.int32)


def tensor(x: object, name: str, *, ndim: Optional[int] = None, kind: str = "float") -> torch.Tensor:
    """Checks that ``x`` is a tensor of rank ``ndim`` and of the dtype kind ``"float"`` or ``"index"``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if kind == "float" and not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if kind == "index" and x.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must have dtype int64 or int32, got {x.dtype}")
    return x


def integer(v: object, name: str, *, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """Checks that ``v`` is an integer (not a bool) within [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        lo_s = "-inf" if lo is None else str(lo)
        hi_s = "inf" if hi is None else str(hi)
        raise ValueError(f"{name} must be in [{lo_s}, {hi_s}], got {v}")
    return v


def real(v: object, name: str, *, lo: Optional[float] = None, hi: Optional[float] = None) -> float:
    """Checks that ``v`` is a finite real number within [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if v != v or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def same_device(name: str, x: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    """Checks that two tensors live on the same device."""
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def one_of(value: object, name: str, allowed: Sequence[object]) -> None:
    """Checks that an option ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def fields_at_least(config: object, names: Sequence[str], lo: int) -> None:
    """Checks that the integer fields ``names`` of a config object are all >= ``lo``."""
    for name in names:
        value = getattr(config, name)
        if int(value) < lo:
            raise ValueError(f"{name} must be >= {lo}, got {value}")


def expert_indices(idx: torch.Tensor, num_experts: int, detail: str) -> None:
    """Checks that every entry of ``idx`` is an expert in [0, E) or -1 (an empty slot);
    ``detail`` ends the message (where E comes from)."""
    bad = (idx < -1) | (idx >= num_experts)
    if bool(bad.any()):
        raise ValueError(f"idx holds expert {int(idx[bad][0])}, outside [-1, {num_experts}) ({detail})")
