"""Fixed cost of one ``lars_`` call: ten ``Linear(8, 8)`` layers (20 tensors, the 10 weights
scaled), so the arithmetic is negligible and what is left is the Python around the kernel.

Usage: ``python -m benches.lars_overhead [--calls N]``; prints the median call per mode and
backend, in microseconds, at 1 thread.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import List

import torch


def main(argv: "List[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import moerust
    from moerust import ops

    torch.manual_seed(0)
    params = [p for _ in range(10) for p in torch.nn.Linear(8, 8).parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    for mode in ("bidirectional", "lars"):
        for backend in ("rust", "torch"):
            with moerust.use_backend(backend):
                times = []
                for _ in range(args.calls):
                    start = time.perf_counter()
                    ops.lars_(params, mode=mode)
                    times.append(time.perf_counter() - start)
            print(f"{mode} {backend}: median {statistics.median(times) * 1e6:.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
