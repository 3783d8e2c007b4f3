"""Router probabilities: ``softmax`` over the last axis (differentiable).

torch's CPU softmax over a short last axis (E = 8..64 experts) runs about 20x slower than the
exponentials it computes; the Rust kernel does each row in one pass over registers. Semantics are
``torch.softmax(logits, dim=-1)``'s, including special values: a row with NaN or +inf, or only
-inf, is all NaN, and a -inf logit gets probability 0. float32 results agree with torch within a
few ulp (entries below ~1e-38 are 0 where torch keeps a denormal). Like the other ops, it runs in
Rust for CPU float32/float64 under the "rust" backend and as ``torch.softmax`` otherwise; it is a
``torch.library`` custom op with a fake kernel and an autograd formula (``torch.compile`` works).
"""

from __future__ import annotations

from typing import Any, Tuple

import torch

from .. import _backend
from .._backend import numpy_view as _np
from . import _checks, _eager


def _softmax_impl(logits: torch.Tensor) -> torch.Tensor:
    if _backend.rust_handles(logits):
        out = _backend.empty(*logits.shape, dtype=logits.dtype)
        _backend.native_fn("softmax", logits.dtype)(_np(logits), out.numpy(), _backend.num_threads())
        return out
    return torch.softmax(logits, dim=-1)


_softmax_op = torch.library.custom_op("moerust::softmax", mutates_args=())(_softmax_impl)


@_softmax_op.register_fake
def _(logits: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(logits)


@_eager.backward_op("moerust::softmax_backward")
def _softmax_backward_op(grad: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    if _backend.rust_handles(grad, probs):
        out = _backend.empty(*probs.shape, dtype=probs.dtype)
        _backend.native_fn("softmax_backward", probs.dtype)(_np(grad), _np(probs), out.numpy(), _backend.num_threads())
        return out
    return probs * (grad - (grad * probs).sum(dim=-1, keepdim=True))


@_softmax_backward_op.register_fake
def _(grad: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(probs)


def _setup(ctx: Any, inputs: Tuple[torch.Tensor], output: torch.Tensor) -> None:
    ctx.save_for_backward(output)


def _backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    (probs,) = ctx.saved_tensors
    return _softmax_backward_op(grad.contiguous(), probs)


_softmax = _eager.differentiable(_softmax_op, _softmax_impl, _backward, _setup)


@torch.compiler.assume_constant_result
def _threads() -> int:
    # A constant for torch.compile (torch.get_num_threads() would break the graph): a compiled
    # graph keeps the path chosen for the thread count it was traced with; both compute the same.
    return _backend.num_threads()


def kernel_min_rows(num_experts: int, threads: int) -> int:
    """Fewest rows for which :func:`softmax` runs the Rust kernel; smaller batches use
    ``torch.softmax`` itself (same semantics).

    Measured forward + backward against ``torch.softmax`` on the lent 16-core Xeon (2026-12-01,
    eager path): at 1-2 threads and few experts the kernel wins from 1024 rows (T=1024, E=8, 2
    threads: 1.3-2.3x; a row of 8 is torch's slow case, and torch has no threads to spread it
    over); with 16 threads, or E=64, torch's own softmax is faster up to a few thousand rows
    (T=2048: 0.41-0.50x at 16 threads, 0.51-0.60x for E=64 at 2 threads), and the kernel wins
    from 8192 rows (1.3-5.2x at 1-16 threads in the benchmark runs; one 16-thread run of E=8
    measured 0.78x). The balance is machine- and torch-dependent: on the 2-core development box
    (AMD EPYC, torch 2.15, whose softmax over rows of 8 is 3.5x faster than torch 2.11's on the
    Xeon) the kernel path lost up to 8192 rows of 8 experts at 2 threads (0.41-0.56x) and won 3x
    at 8192 rows of 64 (``python -m benches.softmax_paths 2``). The semantics are the same on
    both paths; only the last bits of float32 results may differ.
    """
    return 1024 if num_experts <= 16 and threads <= 2 else 8192


def _takes_kernel_op(rows: torch.Tensor) -> bool:
    """Whether :func:`softmax` sends these ``[T, E]`` rows through its own op (the Rust kernel on
    the Rust backend; ``torch.softmax`` forward and a formula backward on the torch one) rather
    than to ``torch.softmax`` itself. ``topk_router`` asks the same, so its bits match."""
    return rows.shape[0] >= kernel_min_rows(rows.shape[1], _threads())


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(logits, dim=-1)`` for logits of any rank >= 1 (differentiable).

    A fast path for router probabilities ``[T, E]``: the rows are independent and short. Batches
    of fewer than :func:`kernel_min_rows` rows use ``torch.softmax`` itself (same semantics).
    """
    logits = _checks.tensor(logits, "logits")
    if logits.dim() < 1:
        raise ValueError(f"logits must have at least 1 dimension, got shape {tuple(logits.shape)}")
    shape = logits.shape
    rows = logits.reshape(-1, shape[-1]) if logits.dim() != 2 else logits
    if not _takes_kernel_op(rows):
        return torch.softmax(logits, dim=-1)
    return _softmax(rows.contiguous()).reshape(shape)
