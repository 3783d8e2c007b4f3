"""Tiling rules of the expert kernels compared in one process: blocks of MoE-layer steps cycle
through the rules (``moerust._native.set_tile_rows`` and ``set_expert_layout``) and the
dense-active bound, so that slow drift of a shared machine hits every rule alike; each rule's
median step and its block-by-block ratio to the first rule are printed.

Usage: ``python -m benches.tiling_ab THREADS d ff E k T RULE[,RULE...] [--blocks N] [--steps M]``,
a rule ``PER_THREAD:MIN_ROWS[@LAYOUT]`` (about ``PER_THREAD`` tiles per thread of at least
``MIN_ROWS`` rows, the default being ``3:64``; ``LAYOUT`` is ``auto`` (the default), ``rows`` or
``columns``), e.g. ``python -m benches.tiling_ab 16 64 256 8 2 1024 3:64,1:16,3:32`` or
``python -m benches.tiling_ab 16 512 2048 8 2 2048 3:64@rows,3:64@columns``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List

import torch

from .timing import warm_process


def main(argv: "List[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("threads", type=int)
    ap.add_argument("dims", type=int, nargs=5, metavar="d ff E k T")
    ap.add_argument("rules")
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from moerust import _backend

    from .test_bench_moe import build

    native = _backend.native()
    rules = args.rules.split(",")
    parsed = {}
    for r in rules:
        tiles, _, layout = r.partition("@")
        per_thread, min_rows = (int(v) for v in tiles.split(":"))
        parsed[r] = (per_thread, min_rows, layout or "auto")
    warm_process()
    layer, _ = build("moerust", *args.dims)
    bound, _ = build("bound", *args.dims)
    for _ in range(5):
        layer()
        bound()
    names = rules + ["bound"]
    steps: Dict[str, List[float]] = {n: [] for n in names}
    blocks: Dict[str, List[float]] = {n: [] for n in names}
    try:
        for b in range(args.blocks):
            for name in names if b % 2 == 0 else names[::-1]:
                if name != "bound":
                    per_thread, min_rows, layout = parsed[name]
                    native.set_tile_rows(per_thread, min_rows)
                    native.set_expert_layout(layout)
                fn = bound if name == "bound" else layer
                fn()  # the first step after a change is not timed
                times = []
                for _ in range(args.steps):
                    start = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - start) * 1e3)
                steps[name] += times
                blocks[name].append(statistics.median(times))
    finally:
        native.set_tile_rows(3, 64)
        native.set_expert_layout("auto")
    print(f"threads={args.threads} d/ff/E/k/T={'/'.join(map(str, args.dims))} {args.blocks} blocks x {args.steps} steps")
    first, bound_ms = rules[0], statistics.median(steps["bound"])
    for name in names:
        ratios = [a / b for a, b in zip(blocks[name], blocks[first])]
        faster = sum(r < 1 for r in ratios)
        print(
            f"  {name:14s} median {statistics.median(steps[name]):8.3f} ms, / {first}: {statistics.median(ratios):.3f}"
            f" (faster in {faster} of {args.blocks} blocks), / bound: {statistics.median(steps[name]) / bound_ms:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
