#!/usr/bin/env bash
# Runs the kernel benchmark suite (benches/test_bench_ops.py) at several thread counts and writes
# one JSON per count plus a Markdown summary; the other thread counts run the key cases only.
# Usage: benches/run_matrix.sh OUT_DIR "1 2 4 8 16" [full-suite thread counts, e.g. "2 16"]
set -euo pipefail
out=${1:?output folder}
threads=${2:-"1 2 4 8 16"}
full=${3:-"2 16"}
mkdir -p "$out"
for n in $threads; do
  if [[ " $full " == *" $n "* ]]; then sel=(); else sel=(-k "gather_combine and 65536-2-512 or full_dispatch_path or lars or topp_route and 8192-64 or softmax and 8192"); fi
  MOERUST_BENCH_THREADS=$n OMP_NUM_THREADS=$n python3 -m pytest benches/test_bench_ops.py -q -p no:cacheprovider --benchmark-only \
    --benchmark-json "$out/bench_t$n.json" "${sel[@]}" | tail -n 2 || echo "some benchmarks failed at $n threads"
done
python3 benches/summarize.py "$out"/bench_t*.json > "$out/summary.md"
