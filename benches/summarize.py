"""Turns pytest-benchmark JSON files into one Markdown table: median time per backend and the
torch/rust ratio for every group. Usage: ``python benches/summarize.py run1.json [run2.json ...]``."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Dict


def main(paths: list) -> int:
    rows: Dict[str, Dict[str, float]] = defaultdict(dict)
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        for b in data["benchmarks"]:
            rows[b["group"]][b["extra_info"]["backend"]] = b["stats"]["median"]
    print("| benchmark | rust (ms) | torch (ms) | torch / rust |")
    print("|---|---:|---:|---:|")
    for group in sorted(rows, key=lambda g: (g.split(" threads=")[1] if " threads=" in g else "", g)):
        r, t = rows[group].get("rust"), rows[group].get("torch")
        ratio = f"{t / r:.2f}x" if r and t else "-"
        fmt = lambda v: f"{v * 1e3:.3f}" if v is not None else "-"  # noqa: E731
        print(f"| {group} | {fmt(r)} | {fmt(t)} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
