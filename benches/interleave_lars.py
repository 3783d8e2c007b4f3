"""``lars_`` on the 10.5M-parameter benchmark model, Rust and the torch twin alternating round by
round in one process (pytest-benchmark runs all of one backend's rounds first, so the second
backend meets a different cache and machine state). Every round refills the same gradient
buffers first, as the pytest case does.

Usage: ``python -m benches.interleave_lars THREADS MODE [WEIGHT_DECAY] [--rounds N]``, MODE
``lars``, ``bidirectional`` or ``all`` (the benchmark's three cases, bidirectional, lars and lars
with weight decay 0.01, in one process); prints each backend's median time (ms) and torch / rust.
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
    ap.add_argument("mode", choices=["lars", "bidirectional", "all"])
    ap.add_argument("weight_decay", type=float, nargs="?", default=0.0)
    ap.add_argument("--rounds", type=int, default=80)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import moerust
    from moerust import ops

    from .test_bench_ops import _model_10m

    warm_process()
    params = list(_model_10m().parameters())
    grads = [torch.randn_like(p) for p in params]
    for p in params:
        p.grad = torch.empty_like(p)
    cases = [("bidirectional", 0.0), ("lars", 0.0), ("lars", 0.01)] if args.mode == "all" else [(args.mode, args.weight_decay)]
    for mode, wd in cases:
        times: Dict[str, List[float]] = {"rust": [], "torch": []}
        for r in range(args.rounds):
            for backend in ("rust", "torch") if r % 2 == 0 else ("torch", "rust"):
                for p, g in zip(params, grads):
                    p.grad.copy_(g)
                with moerust.use_backend(backend):
                    start = time.perf_counter()
                    ops.lars_(params, mode=mode, weight_decay=wd, eta=0.02)
                    times[backend].append((time.perf_counter() - start) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{mode} wd={wd} threads={args.threads}: rust {med['rust']:.3f} ms, torch {med['torch']:.3f} ms, torch / rust {med['torch'] / med['rust']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
