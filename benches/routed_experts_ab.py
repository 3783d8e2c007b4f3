"""``ops.routed_experts`` (one op) against ``gather -> expert_mlp -> combine`` (three ops), timed
round-robin in one process so drift of a shared machine hits every variant alike.

``kernel`` mode times the ops alone (forward + backward): ``fused``, ``fused-scratch`` (the fused
op with its backward's gradient of the expert outputs in a scratch buffer instead of over the
saved outputs, as under ``retain_graph``) and ``composed``. ``layer`` mode times a whole
``test_bench_moe.py`` moerust layer step with :meth:`GroupedExperts.routed` as the fused op or as
the three ops.

Usage: ``python -m benches.routed_experts_ab {kernel,layer} THREADS d ff E k T [--rounds N]``;
prints each variant's median and minimum step time (ms).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
from typing import Callable, Dict, List

import torch

from .timing import times_ms, warm_process


def _kernel_variants(d: int, ff: int, e: int, k: int, t: int) -> Dict[str, Callable[[], Callable[[], None]]]:
    from moerust.ops import _eager

    from .test_bench_ops import routed_experts_step

    re_mod = importlib.import_module("moerust.ops.routed_experts")
    fused, composed = routed_experts_step(True, t, e, k, d, ff), routed_experts_step(False, t, e, k, d, ff)

    def variant(name: str) -> Callable[[], Callable[[], None]]:
        def select() -> Callable[[], None]:
            # fused-scratch: the backward is told the saved outputs stay alive (as with retain_graph).
            re_mod._eager = _NoOverwrite if name == "fused-scratch" else _eager
            return composed if name == "composed" else fused

        return select

    return {name: variant(name) for name in ("fused", "fused-scratch", "composed")}


class _NoOverwrite:
    """Stands in for ``moerust.ops._eager`` inside ``routed_experts``: never overwrite saved ys."""

    @staticmethod
    def saved_tensors_die(*args: object) -> bool:
        return False


def _layer_variants(d: int, ff: int, e: int, k: int, t: int) -> Dict[str, Callable[[], Callable[[], None]]]:
    from moerust import ops
    from moerust.nn.moe import GroupedExperts

    from .test_bench_moe import build

    fused = GroupedExperts.routed

    def composed(self: GroupedExperts, x: torch.Tensor, weights: torch.Tensor, plan: ops.Plan) -> torch.Tensor:
        return ops.combine(self(ops.gather(x, plan), plan.offsets), weights, plan)

    step, _ = build("moerust", d, ff, e, k, t)

    def variant(fn: Callable[..., torch.Tensor]) -> Callable[[], Callable[[], None]]:
        def select() -> Callable[[], None]:
            GroupedExperts.routed = fn  # type: ignore[method-assign]
            return step

        return select

    return {"fused": variant(fused), "composed": variant(composed)}


def main(argv: "List[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["kernel", "layer"])
    ap.add_argument("threads", type=int)
    ap.add_argument("dims", type=int, nargs=5, metavar="d ff E k T")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warm_process()
    variants = (_kernel_variants if args.mode == "kernel" else _layer_variants)(*args.dims)
    names = list(variants)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name] += times_ms(variants[name](), reps=5, warmup=1)
    for name, v in times.items():
        print(f"{name}: median {statistics.median(v):.3f} ms, min {min(v):.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
