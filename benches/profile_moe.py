"""Where one MoE forward + backward spends its time: torch profiler table for a variant of
``test_bench_moe.py``. Usage: ``python -m benches.profile_moe VARIANT d ff E k T [threads]``."""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from .timing import median_ms, warm_process


def main(argv: list) -> int:
    variant, *dims = argv[:6]
    threads = int(argv[6]) if len(argv) > 6 else torch.get_num_threads()
    torch.set_num_threads(threads)
    from .test_bench_moe import build

    warm_process()
    step, _ = build(variant, *map(int, dims))
    print(f"median step without the profiler: {median_ms(step, reps=20):.3f} ms")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            step()
    print(f"{variant} d/ff/E/k/T={'/'.join(dims)} threads={threads} (10 steps)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
