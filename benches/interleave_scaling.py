"""Thread scaling of gather + combine forward + backward (issue 2: T=65536, k=2, d=512, 16 threads
against 1), the two thread counts alternating round by round in one process, so a VM's slow
stretches hit both alike (pytest runs one thread count per process, minutes apart).

Usage: ``python -m benches.interleave_scaling THREADS [--t T --k K --d D --rounds N]``; prints the
median step at 1 and THREADS threads and their ratio.
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
    ap.add_argument("--t", type=int, default=65536)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    from moerust import ops

    warm_process()
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(args.t, 8, generator=g), -1)
    idx = ops.topk_route(probs, args.k)
    plan = ops.dispatch_plan(idx, 8)
    x = torch.randn(args.t, args.d, generator=g, requires_grad=True)
    w = probs.gather(1, idx).requires_grad_()
    up = torch.randn(args.t, args.d, generator=g)

    def step() -> None:
        x.grad = None
        w.grad = None
        ops.combine(ops.gather(x, plan), w, plan).backward(up)

    times: Dict[int, List[float]] = {1: [], args.threads: []}
    for r in range(args.rounds):
        for n in (1, args.threads) if r % 2 == 0 else (args.threads, 1):
            torch.set_num_threads(n)
            step()  # the first step at a new thread count wakes the team
            start = time.perf_counter()
            step()
            times[n].append((time.perf_counter() - start) * 1e3)
    one, many = statistics.median(times[1]), statistics.median(times[args.threads])
    print(f"gather+combine fwd+bwd T={args.t} k={args.k} d={args.d}: 1 thread {one:.1f} ms, "
          f"{args.threads} threads {many:.1f} ms, scaling {one / many:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
