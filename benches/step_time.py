"""Median wall time of one layer step (a ``test_bench_moe.py`` variant) over many steps, after a
warm-up, with the collector's long-lived objects frozen (so a full collection, rare but ~0.2 s in
a process holding torch and transformers, does not land in the timed steps). For A/B runs of two
checkouts, process by process: the small configs measure the per-step fixed costs.

Usage: ``python -m benches.step_time THREADS [VARIANT [d ff E k T]] [--steps N]`` (default:
moerust, the d=64 config, 3000 steps); prints the median step in microseconds.
"""

from __future__ import annotations

import gc
import sys
from typing import List


from .timing import layer_step_args, times_ms


def main(argv: List[str]) -> int:
    steps = 3000
    if "--steps" in argv:
        at = argv.index("--steps")
        steps = int(argv[at + 1])
        argv = argv[:at] + argv[at + 2 :]
    threads, variant, dims = layer_step_args(argv)
    from .test_bench_moe import build

    step, _ = build(variant, *dims)
    for _ in range(200):
        step()
    gc.collect()
    gc.freeze()
    times = times_ms(step, steps, 0)
    print(f"{variant} d/ff/E/k/T={'/'.join(map(str, dims))} threads={threads}: median step {times[len(times) // 2] * 1e3:.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
