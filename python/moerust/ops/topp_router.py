"""The top-p router's forward in one op: ``softmax -> topp_route -> route_weights``.

``topp_router(logits, p, min_k, max_k, renormalize)`` returns exactly what the three public ops
return in sequence — ``probs = softmax(logits)``, ``idx, counts = topp_route(probs, p, min_k,
max_k)``, ``weights = route_weights(probs, idx, renormalize)`` — bit for bit, on either backend,
with the gradients of ``probs`` and ``weights`` flowing back to ``logits``. It is the top-p
counterpart of :func:`~moerust.ops.topk_router` (see there why one op: one Python entry and
one autograd node instead of three around small kernels) and shares its backward.

A ``torch.library`` custom op with a fake kernel and an autograd formula (``torch.compile``
works); plain eager calls take the same implementation through ``torch.autograd.Function``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch

from . import _checks, _eager
from .balance import _switch_balance_impl
from .route_weights import _route_weights_impl
from .router_softmax import _softmax_impl, _takes_kernel_op
from .routing import _check_p, _topp_route_impl
from .topk_router import router_backward, router_setup

Outputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _topp_router_impl(logits: torch.Tensor, p: torch.Tensor, min_k: int, max_k: int, renormalize: bool) -> Outputs:
    # The three ops' own implementations (each picks the Rust kernel or its torch twin), and the
    # balance loss with the experts' shares of the slots; ``p`` holds one threshold or one per row (float32).
    probs = _softmax_impl(logits) if _takes_kernel_op(logits) else torch.softmax(logits.detach(), dim=-1)
    idx, counts = _topp_route_impl(probs, p, min_k, max_k)
    share, balance = _switch_balance_impl(probs, idx)
    return probs, idx, counts, _route_weights_impl(probs, idx, renormalize), share, balance


_topp_router_op = torch.library.custom_op("moerust::topp_router", mutates_args=())(_topp_router_impl)


@_topp_router_op.register_fake
def _(logits: torch.Tensor, p: torch.Tensor, min_k: int, max_k: int, renormalize: bool) -> Outputs:
    rows, num_experts = logits.shape
    return (
        torch.empty_like(logits),
        logits.new_empty(rows, max_k, dtype=torch.int64),
        logits.new_empty(rows, dtype=torch.int64),
        logits.new_empty(rows, max_k),
        logits.new_empty(num_experts),
        logits.new_empty(()),
    )


def _setup(ctx: Any, inputs: Tuple[Any, ...], output: Outputs) -> None:
    logits, _, _, _, renormalize = inputs
    probs, idx, counts, _, share, _ = output
    router_setup(ctx, logits, renormalize, probs, idx, share, counts)


def _backward(
    ctx: Any,
    grad_probs: Optional[torch.Tensor],
    grad_idx: Optional[torch.Tensor],
    grad_counts: Optional[torch.Tensor],
    grad_weights: Optional[torch.Tensor],
    grad_share: Optional[torch.Tensor],
    grad_balance: Optional[torch.Tensor],
) -> Tuple[Optional[torch.Tensor], None, None, None, None]:
    return router_backward(ctx, grad_probs, grad_weights, grad_balance), None, None, None, None


_topp_router = _eager.differentiable(_topp_router_op, _topp_router_impl, _backward, _setup)


def topp_router(
    logits: torch.Tensor,
    p: Union[float, torch.Tensor],
    min_k: int = 1,
    max_k: Optional[int] = None,
    renormalize: bool = True,
    balance: bool = False,
) -> Tuple[torch.Tensor, ...]:
    """``(probs [T, E], idx [T, max_k], counts [T], weights [T, max_k])`` of a top-p router.

    The same values as ``probs = softmax(logits)``, ``idx, counts = topp_route(probs, p, min_k,
    max_k)``, ``weights = route_weights(probs, idx, renormalize)``, computed in one op (see the
    module docstring); ``probs`` and ``weights`` are differentiable in ``logits``, ``idx`` and
    ``counts`` are not. ``p`` is one threshold in [0, 1] or a ``[T]`` tensor of them (used as
    constants: no gradient reaches a tensor ``p``). With ``balance=True`` it returns ``(probs,
    idx, counts, weights, share, loss)``, as :func:`~moerust.ops.topk_router` does. Raises
    ValueError for thresholds outside [0, 1], ``min_k``/``max_k`` outside 1 <= min_k <= max_k <= E, or NaN logits.
    """
    logits = _checks.tensor(logits, "logits", ndim=2)
    rows, num_experts = logits.shape
    if num_experts == 0:
        raise ValueError("logits must have at least one expert column, got shape (T, 0)")
    threshold = _check_p(p, rows)
    max_k = num_experts if max_k is None else _checks.integer(max_k, "max_k", lo=1, hi=num_experts)
    min_k = _checks.integer(min_k, "min_k", lo=1, hi=max_k)
    for name, flag in (("renormalize", renormalize), ("balance", balance)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if isinstance(threshold, torch.Tensor):
        _checks.same_device("p", threshold, logits, "logits")
        thresholds = threshold.contiguous()
    else:
        thresholds = torch.tensor([threshold], dtype=torch.float32, device=logits.device)
    outputs = _topp_router(logits.contiguous(), thresholds, min_k, max_k, renormalize)
    return outputs if balance else outputs[:4]
