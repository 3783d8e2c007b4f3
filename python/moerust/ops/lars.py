"""Layer-wise gradient scaling, in place: LARS and "bidirectional" scaling.

* ``"lars"`` (You et al. 2017): ``ratio = eta*||w|| / (||g|| + wd*||w|| + eps)``, 1 when either
  norm is 0, optionally clipped to ``clip=(lo, hi)``; then ``g <- (g + wd*w) * ratio``.
* ``"bidirectional"``: ``scale = clamp(sqrt(target/(||g|| + eps)), lo, hi)``, 1 when
  ``||g|| < 1e-6``; then ``g <- g * scale``. Small gradients grow, large ones shrink.

Tensors with ndim <= 1 (biases, norm gains) are left alone unless ``include_1d=True``. With
``per="group"`` the norms are taken over each parameter group as a whole and its tensors share one
ratio. A non-finite gradient norm raises ValueError naming the parameter before any gradient is
modified.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .. import _backend
from . import _checks

ParamsLike = Union[Iterable[torch.Tensor], Iterable[Tuple[str, torch.Tensor]], Iterable[Dict[str, Any]]]

MODES = ("lars", "bidirectional")


class _Names:
    """Error-message names of the flattened parameters, built only when an error needs one (a
    call's fixed cost matters: ``lars_`` runs every optimizer step)."""

    def __init__(self, groups: List[int], given: Dict[int, str], group_start: Dict[int, int]) -> None:
        self.groups, self.given, self.group_start = groups, given, group_start

    def __call__(self, i: int) -> str:
        if i in self.given:
            return self.given[i]
        gi = self.groups[i]
        if gi in self.group_start:
            return f"params[{gi}]['params'][{i - self.group_start[gi]}]"
        return f"params[{gi}]"


def _flatten_params(params: ParamsLike) -> Tuple[List[torch.Tensor], List[int], _Names]:
    """(tensors, group index of each tensor, their names) from tensors, named pairs or groups."""
    if isinstance(params, torch.Tensor):
        params = [params]
    tensors: List[torch.Tensor] = []
    groups: List[int] = []
    given: Dict[int, str] = {}
    group_start: Dict[int, int] = {}
    unchecked = False  # whether some entry still needs its type checked
    for gi, item in enumerate(params):
        if isinstance(item, torch.Tensor):  # model.parameters(): the common case first
            tensors.append(item)
            groups.append(gi)
        elif isinstance(item, dict):
            members = item.get("params")
            if members is None:
                raise ValueError(f"params[{gi}]: a parameter group needs a 'params' entry")
            members = [members] if isinstance(members, torch.Tensor) else list(members)
            group_start[gi] = len(tensors)
            tensors.extend(members)
            groups.extend([gi] * len(members))
            unchecked = True
        else:
            if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
                given[len(tensors)] = item[0]
                item = item[1]
            tensors.append(item)
            groups.append(gi)
            unchecked = True
    names = _Names(groups, given, group_start)
    if unchecked:
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{names(i)} must be a torch.Tensor, got {type(t).__name__}")
    return tensors, groups, names


def lars_(
    params: ParamsLike,
    *,
    mode: str = "lars",
    eta: float = 1e-3,
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    clip: Optional[Tuple[float, float]] = None,
    target: float = 3.0,
    lo: float = 0.3,
    hi: float = 3.0,
    include_1d: bool = False,
    per: str = "tensor",
) -> torch.Tensor:
    """Scales the ``.grad`` of every parameter in place and returns the ratios.

    Args:
        params: tensors, ``(name, tensor)`` pairs (e.g. ``model.named_parameters()``) or optimizer
            parameter groups (dicts with ``"params"``).
        mode: ``"lars"`` or ``"bidirectional"`` (see the module docstring).
        eta, weight_decay, eps, clip: LARS trust coefficient, weight decay folded into the
            gradient, denominator epsilon, optional ``(lo, hi)`` clip of the ratio.
        target, lo, hi: bidirectional target gradient norm and the clamp of the scale.
        include_1d: also scale tensors with ndim <= 1.
        per: ``"tensor"`` (one ratio per tensor) or ``"group"`` (one per parameter group).

    Returns:
        float64 tensor with one ratio per parameter, in order; 1.0 for parameters left alone
        (no gradient, or ndim <= 1 without ``include_1d``).
    """
    _checks.one_of(mode, "mode", MODES)
    _checks.one_of(per, "per", ("tensor", "group"))
    eta = _checks.real(eta, "eta", lo=0.0)
    weight_decay = _checks.real(weight_decay, "weight_decay", lo=0.0)
    eps = _checks.real(eps, "eps", lo=0.0)
    target = _checks.real(target, "target", lo=0.0)
    lo = _checks.real(lo, "lo", lo=0.0)
    hi = _checks.real(hi, "hi", lo=lo)
    if clip is not None:
        if not isinstance(clip, (tuple, list)) or len(clip) != 2:
            raise TypeError(f"clip must be a (lo, hi) pair or None, got {clip!r}")
        c_lo = _checks.real(clip[0], "clip[0]", lo=0.0)
        clip = (c_lo, _checks.real(clip[1], "clip[1]", lo=c_lo))
    tensors, groups, names = _flatten_params(params)

    # The tensors scaled ("active"), with their weights and gradients, in one pass.
    active: List[int] = []
    weights: List[torch.Tensor] = []
    grads: List[torch.Tensor] = []
    for i, t in enumerate(tensors):
        g = t.grad
        if g is None:
            continue
        if g.shape != t.shape:
            raise ValueError(f"{names(i)}: gradient shape {tuple(g.shape)} differs from {tuple(t.shape)}")
        if include_1d or t.dim() > 1:
            active.append(i)
            weights.append(t.detach())
            grads.append(g)
    ratios = [1.0] * len(tensors)
    if not active:
        return torch.tensor(ratios, dtype=torch.float64)
    # Units: the tensors (or groups) that share one ratio, numbered 0..n-1 in order.
    if per == "tensor":
        unit = list(range(len(active)))
    else:
        unit_ids: Dict[int, int] = {}
        unit = [unit_ids.setdefault(groups[i], len(unit_ids)) for i in active]
    n_units = unit[-1] + 1
    options = (eta, weight_decay, eps, clip, target, lo, hi)

    def non_finite(u: int, norm: float) -> ValueError:
        name = names(active[unit.index(u)])  # the unit's first tensor
        return ValueError(f"{name}: gradient norm is not finite ({norm}); no gradient was modified")

    if _backend.rust_handles(*weights, *grads) and all(g.is_contiguous() for g in grads):
        fn = _backend.native_fn("lars", grads[0].dtype)
        view = _backend.numpy_view
        try:
            unit_ratios = fn([view(w) for w in weights], [view(g) for g in grads], unit, n_units, mode, options, _backend.num_threads())
        except ValueError as exc:
            if len(exc.args) == 3 and isinstance(exc.args[1], int):  # (message, unit, norm)
                raise non_finite(exc.args[1], exc.args[2]) from None
            raise
    else:
        unit_ratios = _lars_torch(weights, grads, unit, n_units, mode, options, non_finite)
    for j, i in enumerate(active):
        ratios[i] = unit_ratios[unit[j]]
    return torch.tensor(ratios, dtype=torch.float64)


def _unit_ratio(mode: str, options: Sequence[Any], w_norm: float, g_norm: float) -> float:
    eta, wd, eps, clip, target, lo, hi = options
    if mode == "lars":
        if w_norm == 0.0 or g_norm == 0.0:
            return 1.0
        r = eta * w_norm / (g_norm + wd * w_norm + eps)
        return min(max(r, clip[0]), clip[1]) if clip is not None else r
    if g_norm < 1e-6:
        return 1.0
    return min(max(math.sqrt(target / (g_norm + eps)), lo), hi)


def _lars_torch(
    weights: List[torch.Tensor],
    grads: List[torch.Tensor],
    unit: List[int],
    n_units: int,
    mode: str,
    options: Sequence[Any],
    non_finite: Any,
) -> List[float]:
    """The torch twin: ``torch._foreach_norm`` for the norms, ``_foreach_add_``/``_foreach_mul_``."""
    g_sq = [0.0] * n_units
    w_sq = [0.0] * n_units
    g_norms = torch.stack(torch._foreach_norm(grads)).double().cpu().tolist()
    w_norms = torch.stack(torch._foreach_norm(weights)).double().cpu().tolist() if mode == "lars" else [0.0] * len(grads)
    for u, gn, wn in zip(unit, g_norms, w_norms):
        g_sq[u] += gn * gn
        w_sq[u] += wn * wn
    unit_ratios = []
    for u in range(n_units):
        gn = math.sqrt(g_sq[u])
        if not math.isfinite(gn):
            raise non_finite(u, gn)
        unit_ratios.append(_unit_ratio(mode, options, math.sqrt(w_sq[u]), gn))
    wd = options[1]
    with torch.no_grad():
        if mode == "lars" and wd != 0.0:
            torch._foreach_add_(grads, weights, alpha=wd)
        torch._foreach_mul_(grads, [unit_ratios[u] for u in unit])
    return unit_ratios
