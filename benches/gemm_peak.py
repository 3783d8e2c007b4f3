"""What this machine's BLAS reaches: ``torch.mm`` GFLOP/s on a large square product and on the
expert shapes of the MoE configs, at 1 thread and at N threads (the ceiling the expert kernels are
compared with in BENCHMARKS.md). Usage: ``python -m benches.gemm_peak [N]``."""

from __future__ import annotations

import sys

import torch

from .timing import times_ms, warm_process

SHAPES = [(4096, 4096, 4096), (512, 256, 2048), (512, 1024, 256), (4096, 256, 2048), (2048, 512, 4096), (512, 512, 4096)]


def main(argv: "list[str]") -> int:
    threads = int(argv[0]) if argv else torch.get_num_threads()
    warm_process()
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        for m, k, cols in SHAPES:
            a, b = torch.randn(m, k), torch.randn(k, cols)
            s = times_ms(lambda: torch.mm(a, b), reps=5, warmup=1)[0] / 1e3  # the fastest call
            print(f"threads={n} {m}x{k}x{cols}: {s * 1e3:.2f} ms, {2 * m * k * cols / s / 1e9:.0f} GFLOP/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
