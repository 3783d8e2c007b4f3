"""Markdown tables from ``test_bench_moe.py`` JSON runs: median ms per variant, the ratio of
moerust to the dense-active bound, the speed-up over the best transformers path and the top-p /
top-2 ratio. Usage: ``python benches/summarize_moe.py run_t1.json [run_t2.json ...]``."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Dict

COLUMNS = ["bound", "moerust", "moerust-torch", "moerust-topp", "hf-eager", "hf-grouped_mm", "hf-moerust"]


def main(paths: list) -> int:
    rows: Dict[str, Dict[str, float]] = defaultdict(dict)
    for path in paths:
        with open(path) as fh:
            for b in json.load(fh)["benchmarks"]:
                if b["group"].startswith("moe "):
                    rows[b["group"]][b["extra_info"]["variant"]] = b["stats"]["median"] * 1e3
    head = " | ".join(f"{c} (ms)" for c in COLUMNS)
    print(f"| config | {head} | moerust / bound | best HF / moerust | top-p / top-2 |")
    print("|---|" + "---:|" * (len(COLUMNS) + 3))

    def order(group: str) -> tuple:
        threads = int(group.rsplit("threads=", 1)[1])
        return (threads, group)

    for group in sorted(rows, key=order):
        r = rows[group]
        cells = " | ".join(f"{r[c]:.2f}" if c in r else "-" for c in COLUMNS)
        ours = r.get("moerust")
        hf = [r[c] for c in ("hf-eager", "hf-grouped_mm") if c in r]
        bound = f"{ours / r['bound']:.2f}x" if ours and "bound" in r else "-"
        speedup = f"{min(hf) / ours:.2f}x" if ours and hf else "-"
        topp = f"{r['moerust-topp'] / ours:.2f}x" if ours and "moerust-topp" in r else "-"
        print(f"| {group[4:]} | {cells} | {bound} | {speedup} | {topp} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
