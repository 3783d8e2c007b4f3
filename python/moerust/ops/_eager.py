"""Eager calls of moerust's differentiable custom ops, without the dispatcher's round trips.

Why: a ``torch.library`` custom op with an autograd formula passes through torch's dispatcher
several times per call (autograd key, then the CPU kernel, each through Python), which costs
~25 us per op each way on the dev box, more than the kernels of a small MoE layer. Outside of
``torch.compile`` and functorch transforms, and for plain tensors, :func:`differentiable` runs the
same implementation and the same autograd formula as a ``torch.autograd.Function``; everything
else (compiling, fake or meta tensors, tensor subclasses, vmap/grad) goes through the custom op.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(args: tuple) -> bool:
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return all(type(a) in _PLAIN and a.device.type != "meta" for a in args if isinstance(a, torch.Tensor))


def differentiable(
    op: Any, impl: Callable[..., Any], backward: Callable[..., Any], setup_context: Callable[..., None]
) -> Callable[..., Any]:
    """Registers ``backward``/``setup_context`` as the autograd formula of the custom op ``op``
    (whose implementation is ``impl``) and returns a function that calls ``op``, or, for plain
    eager calls, an equivalent ``torch.autograd.Function`` with the same formula."""
    op.register_autograd(backward, setup_context=setup_context)

    # Built with type() so that its backward node is named after the op (e.g. softmax_eagerBackward).
    name = f"{impl.__name__.strip('_').removesuffix('_impl')}_eager"
    Eager: Any = type(
        name,
        (torch.autograd.Function,),
        {
            "forward": staticmethod(impl),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        },
    )

    def call(*args: Any) -> Any:
        return Eager.apply(*args) if _plain_eager(args) else op(*args)

    call.__name__ = impl.__name__
    return call
