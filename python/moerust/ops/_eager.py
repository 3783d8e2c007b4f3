"""Eager calls of moerust's differentiable custom ops, without the dispatcher's round trips.

Why: a ``torch.library`` custom op with an autograd formula passes through torch's dispatcher
several times per call (autograd key, then the CPU kernel, each through Python), which costs
~25 us per op each way on the dev box, more than the kernels of a small MoE layer. Outside of
``torch.compile`` and functorch transforms, and for plain tensors, :func:`differentiable` runs the
same implementation and the same autograd formula as a ``torch.autograd.Function``; everything
else (compiling, fake or meta tensors, tensor subclasses, vmap/grad) goes through the custom op.
The backward kernels, custom ops of their own (:func:`backward_op`), are called the same way.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(args: tuple) -> bool:
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    # A loop rather than all(<generator>): this runs for every op and backward of a layer.
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN or a.is_meta):
            return False
    return True


def graph_kept() -> bool:
    """Whether the backward running now keeps its graph (``retain_graph``); True when torch cannot
    tell (so callers keep what a later backward may need)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is None or bool(keep_graph())


def saved_tensors_die(ctx: Any, *args: Any) -> bool:
    """Whether a backward running now, eagerly on the plain tensors ``args``, is the last use of
    the saved tensors of ``ctx``: its forward ran through :func:`differentiable`'s eager path
    (whose callers keep only the outputs they return, never internal ones), and the backward
    frees the graph (no ``retain_graph``) and builds none (no ``create_graph``). A backward kernel
    may then overwrite an internal saved buffer it no longer needs."""
    return (
        getattr(ctx, "eager_call", False)
        and not torch.is_grad_enabled()
        and _plain_eager(args)
        and not graph_kept()
    )


def differentiable(
    op: Any, impl: Callable[..., Any], backward: Callable[..., Any], setup_context: Callable[..., None]
) -> Callable[..., Any]:
    """Registers ``backward``/``setup_context`` as the autograd formula of the custom op ``op``
    (whose implementation is ``impl``) and returns a function that calls ``op``, or, for plain
    eager calls, an equivalent ``torch.autograd.Function`` with the same formula."""
    op.register_autograd(backward, setup_context=setup_context)

    def forward(ctx: Any, *args: Any) -> Any:
        # The combined forward(ctx, ...) form: with a separate setup_context, Function.apply binds
        # the arguments through inspect.signature on every call (60-90 us on the dev box, more
        # than a small op's kernel).
        output = impl(*args)
        ctx.eager_call = True  # (the op's own calls leave it unset; see saved_tensors_die)
        setup_context(ctx, args, output)
        return output

    # Built with type() so that its backward node is named after the op (e.g. softmax_eagerBackward).
    name = f"{impl.__name__.strip('_').removesuffix('_impl')}_eager"
    Eager: Any = type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )

    def call(*args: Any) -> Any:
        return Eager.apply(*args) if _plain_eager(args) else op(*args)

    call.__name__ = impl.__name__
    return call


class BackwardOp:
    """A backward kernel registered as the custom op it wraps (``.op``, for ``torch.compile``):
    calling it runs the function directly for plain eager calls outside grad mode (the backward
    of an eager op), and through the op otherwise (compiling, subclasses, ``create_graph=True``)."""

    def __init__(self, fn: Callable[..., Any], op: Any) -> None:
        self.fn = fn
        self.op = op
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def __call__(self, *args: Any) -> Any:
        if not torch.is_grad_enabled() and _plain_eager(args):
            return self.fn(*args)
        return self.op(*args)

    def register_fake(self, fake: Callable[..., Any]) -> Callable[..., Any]:
        """Registers the op's fake (shape) kernel; usable as a decorator."""
        return self.op.register_fake(fake)


def backward_op(qualname: str) -> Callable[[Callable[..., Any]], BackwardOp]:
    """Decorator: registers ``fn`` as the custom op ``qualname`` (no mutated arguments) and returns
    a :class:`BackwardOp` calling it."""

    def wrap(fn: Callable[..., Any]) -> BackwardOp:
        return BackwardOp(fn, torch.library.custom_op(qualname, mutates_args=())(fn))

    return wrap
