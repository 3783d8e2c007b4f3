"""Markdown tables from ``test_bench_moe.py`` JSON runs: median ms per variant, the ratio of
moerust to the dense-active bound, the speed-up over the best transformers path and the top-p /
top-2 ratio; one table for the per-variant tests and one for the round-robin test
(``test_moe_interleaved``). Usage: ``python benches/summarize_moe.py run_t1.json [run_t2.json ...]``."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Dict, List

COLUMNS = ["bound", "moerust", "moerust-torch", "moerust-topp", "hf-eager", "hf-grouped_mm", "hf-moerust"]
INTERLEAVED = ["bound", "moerust", "moerust-topp", "hf-eager", "hf-grouped_mm"]


def table(rows: Dict[str, Dict[str, float]], columns: List[str]) -> None:
    """Prints one table: a row per benchmark group (``<kind> d=... threads=N``), by thread count."""
    head = " | ".join(f"{c} (ms)" for c in columns)
    print(f"| config | {head} | moerust / bound | best HF / moerust | top-p / top-2 |")
    print("|---|" + "---:|" * (len(columns) + 3))

    def order(group: str) -> tuple:
        threads = int(group.rsplit("threads=", 1)[1])
        return (threads, group)

    for group in sorted(rows, key=order):
        r = rows[group]
        cells = " | ".join(f"{r[c]:.2f}" if c in r else "-" for c in columns)
        ours = r.get("moerust")
        hf = [r[c] for c in ("hf-eager", "hf-grouped_mm") if c in r]
        bound = f"{ours / r['bound']:.2f}x" if ours and "bound" in r else "-"
        speedup = f"{min(hf) / ours:.2f}x" if ours and hf else "-"
        topp = f"{r['moerust-topp'] / ours:.2f}x" if ours and "moerust-topp" in r else "-"
        print(f"| {group.split(' ', 1)[1]} | {cells} | {bound} | {speedup} | {topp} |")


def main(paths: List[str]) -> int:
    per_variant: Dict[str, Dict[str, float]] = defaultdict(dict)
    interleaved: Dict[str, Dict[str, float]] = {}
    for path in paths:
        with open(path) as fh:
            for b in json.load(fh)["benchmarks"]:
                if b["group"].startswith("moe "):
                    per_variant[b["group"]][b["extra_info"]["variant"]] = b["stats"]["median"] * 1e3
                elif b["group"].startswith("interleaved "):
                    interleaved[b["group"]] = b["extra_info"]["ms"]
    if per_variant:
        table(per_variant, COLUMNS)
    if interleaved:
        print("\nRound-robin (test_moe_interleaved; medians over rounds):\n")
        table(interleaved, INTERLEAVED)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
