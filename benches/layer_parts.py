"""Where one MoE layer step spends its wall time, per part, without the profiler's own overhead.

Wraps the public ops (``moerust.ops.softmax``, ``topk_route``, ``route_weights``, ``topk_router``,
``dispatch_plan``, ``gather``, ``combine``, ``expert_mlp``), the backward kernels, every native
call, the layer's losses and its statistics in wall-clock timers, then times 100 steps of a
``test_bench_moe.py`` variant. "op X" is the Python entry point with its checks and autograd
wrapping, "native X" the Rust call inside it, "bw X" a backward kernel with its wrapping; the
rest of a step (torch ops such as the router's matmuls, the autograd engine) is the step time
minus the listed parts.

Usage: ``python -m benches.layer_parts THREADS [VARIANT [d ff E k T]]`` (default: moerust, the
d=64 config). The layer's one-node path shows as "one-node forward/backward" with the kernels
inside; ``moerust-composed`` times the composed ops instead.
"""

from __future__ import annotations

import collections
import importlib
import sys
import time
from typing import Any, Callable, Dict, List


from .timing import layer_step_args

PUBLIC_OPS = ["softmax", "topk_route", "topp_route", "route_weights", "topk_router", "topp_router", "dispatch_plan", "gather", "combine", "expert_mlp", "routed_experts"]
BACKWARD_KERNELS = [
    ("dispatch", "_gather_backward_op"),
    ("dispatch", "_combine_backward_op"),
    ("experts", "_expert_mlp_backward_op"),
    ("route_weights", "_route_weights_backward_op"),
    ("router_softmax", "_softmax_backward_op"),
    ("topk_router", "_router_backward_op"),
    ("routed_experts", "_routed_experts_backward_op"),
]


def instrument(total: Dict[str, float], calls: Dict[str, int]) -> None:
    """Replaces the timed functions by wrappers adding their wall time to ``total``."""
    from moerust import _backend, ops
    from moerust.nn import moe

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            total[name] += time.perf_counter() - start
            calls[name] += 1
            return out

        return run

    native_fn = _backend.native_fn
    _backend.native_fn = lambda name, dtype: timed(f"  native {name}", native_fn(name, dtype))  # type: ignore[assignment]
    for name in PUBLIC_OPS:
        if hasattr(ops, name):  # (older versions lack some; the script also times those)
            setattr(ops, name, timed(f"op {name}", getattr(ops, name)))
    for module, attr in BACKWARD_KERNELS:
        try:
            mod = importlib.import_module(f"moerust.ops.{module}")
        except ImportError:
            continue
        setattr(mod, attr, timed(f"bw {attr.strip('_').removesuffix('_op')}", getattr(mod, attr)))
    try:  # the layer's one-node path: its forward and backward, and the kernels its backward calls
        from moerust.nn import fused
    except ImportError:
        fused = None
    if fused is not None:
        layer_fn = fused.RoutedLayer
        layer_fn.forward = staticmethod(timed("one-node forward", layer_fn.forward))  # type: ignore[method-assign]
        layer_fn.backward = staticmethod(timed("one-node backward", layer_fn.backward))  # type: ignore[method-assign]
        for attr in ("_routed_experts_backward_op", "router_backward"):
            if hasattr(fused, attr):
                setattr(fused, attr, timed(f"bw {attr.strip('_').removesuffix('_op')}", getattr(fused, attr)))
    moe.RouterStats.update = timed("stats update", moe.RouterStats.update)  # type: ignore[method-assign]
    moe.MoE._losses = timed("losses", moe.MoE._losses)  # type: ignore[method-assign]


def main(argv: List[str]) -> int:
    threads, variant, dims = layer_step_args(argv)
    from .test_bench_moe import build

    step, _ = build(variant, *dims)
    total: Dict[str, float] = collections.defaultdict(float)
    calls: Dict[str, int] = collections.defaultdict(int)
    instrument(total, calls)
    for _ in range(10):
        step()
    total.clear()
    calls.clear()
    n = 100
    from moerust import _native

    regions = _native.parallel_regions() if hasattr(_native, "parallel_regions") else None
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    print(f"{variant} d/ff/E/k/T={'/'.join(map(str, dims))} threads={threads}: step median {times[n // 2] * 1e3:.3f} ms (instrumented)")
    for name in sorted(total, key=lambda k: -total[k]):
        print(f"{name:36s} {total[name] / n * 1e6:9.1f} us/step ({calls[name] / n:.0f} calls)")
    if regions is not None:  # the kernels' parallel regions on torch's OpenMP team
        count, ns = (b - a for a, b in zip(regions, _native.parallel_regions()))
        print(f"{'  OpenMP-team regions':36s} {ns / n / 1e3:9.1f} us/step ({count / n:.1f} regions)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
