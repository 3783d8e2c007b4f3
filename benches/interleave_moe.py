"""MoE-layer variants of ``test_bench_moe.py`` timed round-robin in one process, so slow drift of a
shared machine hits every variant alike (pytest-benchmark runs one variant's rounds after another).

Usage: ``python -m benches.interleave_moe THREADS d ff E k T [VARIANT,VARIANT,...] [--passes N]``;
prints each variant's median step time (ms) per pass and as JSON on the last line. A variant
``NAME@GEMM`` runs ``NAME`` with the expert kernels' products on ``GEMM`` (``mkl`` or ``crate``,
see ``moerust._backend.set_gemm``), e.g. ``moerust@mkl,moerust@crate``; ``moerust-composed`` is
the layer with its composed ops instead of its one-node path.
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, List

import torch

from .timing import median_ms, warm_process

DEFAULT = "moerust,hf-eager,hf-grouped_mm,bound,hf-moerust"


def main(argv: "List[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("threads", type=int)
    ap.add_argument("dims", type=int, nargs=5, metavar="d ff E k T")
    ap.add_argument("variants", nargs="?", default=DEFAULT)
    ap.add_argument("--passes", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from moerust import _backend

    from .test_bench_moe import build

    default_gemm = _backend.get_gemm()
    warm_process()

    results: Dict[str, List[float]] = {}
    for p in range(args.passes):
        for variant in args.variants.split(","):
            name, _, gemm = variant.partition("@")
            _backend.set_gemm(gemm or default_gemm)
            step, _ = build(name, *args.dims)
            ms = median_ms(step)
            results.setdefault(variant, []).append(ms)
            print(f"pass {p + 1} {variant}: {ms:.2f} ms", flush=True)
    print(json.dumps({"threads": args.threads, "dims": args.dims, "ms": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
