"""Tables from ``benches/test_bench_lm.py`` JSON files: training tokens/s per backend and the
windowed-attention speedup. ``python benches/summarize_lm.py lm_t2.json lm_t16.json``."""

from __future__ import annotations

import json
import sys
from typing import Dict


def summarize(path: str) -> str:
    """The two tables of one run."""
    doc = json.load(open(path))
    threads = doc.get("moerust", {}).get("threads", "?")
    means: Dict[str, float] = {}
    for b in doc["benchmarks"]:
        means[b["extra_info"]["variant"]] = b["stats"]["mean"]
    lines = [f"threads = {threads}", "", "| training step, quick top-2 MoE (16 x 128 tokens) | ms/step | tokens/s | time / rust's |", "|---|---:|---:|---:|"]
    for v in ("rust", "torch", "hf-eager-experts"):
        if v in means:
            lines.append(f"| {v} | {means[v] * 1e3:.1f} | {2048 / means[v]:,.0f} | {means[v] / means['rust']:.2f}x |")
    if "windowed" in means:
        lines += ["", "| attention T=4096 W=256, fwd+bwd | ms |", "|---|---:|"]
        lines += [f"| {v} | {means[v] * 1e3:.1f} |" for v in ("windowed", "dense-masked")]
        lines.append(f"| speedup of windowed | {means['dense-masked'] / means['windowed']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(summarize(p))
        print()
