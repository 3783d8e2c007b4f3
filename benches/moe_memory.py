"""Peak memory of one MoE forward + backward, per variant, each in a fresh process.

The peak is the process's high-water resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) over three steps, minus its resident set once the layer and its inputs
exist. A 16-token step of the same variant runs first (one-time initialisation is not the
layer's memory); counting from before the first full-size step then charges every buffer a
variant keeps between steps (moerust's reused kernel scratch and pooled outputs included) to that
variant: moerust's pool is emptied after the warm-up. glibc's mmap threshold is pinned low
so freed buffers really leave the process and the resident set follows live memory. Linux only.

Usage: ``python -m benches.moe_memory [--threads N] [--jobs J] > memory.json``; prints a Markdown
table on stderr. The measurements run ``J`` processes at a time (default: as many as fit the CPUs
at ``N`` threads each); each process measures only its own resident set.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
from typing import Dict

VARIANTS = ["bound", "moerust", "moerust-topp", "hf-eager", "hf-grouped_mm"]


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def one(variant: str, d: int, ff: int, e: int, k: int, t: int) -> int:
    from .test_bench_moe import build

    # One step of the same variant on 16 tokens first: one-time initialisation (lazy imports,
    # thread pools) is not memory of the layer, and this leaves the big buffers to the real steps.
    build(variant, d, ff, e, k, 16)[0]()
    step, _ = build(variant, d, ff, e, k, t)
    # The warm-up's full-size weight gradients may sit idle in moerust's buffer pool: release
    # them, so that every buffer of the measured steps counts against the variant.
    import moerust

    moerust.empty_cache()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current resident set
    before = _status("VmRSS")
    for _ in range(3):
        step()
    return _status("VmHWM") - before


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=0, help="processes at a time (0: CPUs / threads)")
    ap.add_argument("--one", nargs=6)
    args = ap.parse_args()
    if args.one:
        variant, *dims = args.one
        print(one(variant, *map(int, dims)))
        return 0
    from .test_bench_moe import CONFIGS

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MOERUST_BENCH_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    jobs = args.jobs or max(1, (os.cpu_count() or 1) // args.threads)

    def measure(variant: str, cfg: "tuple[int, ...]") -> int:
        cmd = [sys.executable, "-m", "benches.moe_memory", "--one", variant, *map(str, cfg)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    keys = {cfg: "d={} ff={} E={} k={} T={}".format(*cfg) for cfg in CONFIGS}
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {(cfg, v): pool.submit(measure, v, cfg) for cfg in CONFIGS for v in VARIANTS}
        results: Dict[str, Dict[str, int]] = {keys[cfg]: {v: futures[cfg, v].result() for v in VARIANTS} for cfg in CONFIGS}
    json.dump(results, sys.stdout, indent=1)
    print(file=sys.stderr)
    print("| config | " + " | ".join(f"{v} (MiB)" for v in VARIANTS) + " | moerust / bound | top-p / bound |", file=sys.stderr)
    print("|---|" + "---:|" * (len(VARIANTS) + 2), file=sys.stderr)
    for key, r in results.items():
        cells = " | ".join(f"{r[v] / 2**20:.1f}" for v in VARIANTS)
        print(f"| {key} | {cells} | {r['moerust'] / r['bound']:.2f}x | {r['moerust-topp'] / r['bound']:.2f}x |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
