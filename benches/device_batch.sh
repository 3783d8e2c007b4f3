#!/usr/bin/env bash
# One batch of the issue-level measurements for a lent machine (its time is scarce, and each call
# may land on a different VM, so everything compared must run in the same call):
#   1. the MoE layer suite at the given thread counts (test_bench_moe.py + summarize_moe.py),
#   2. the kernel suite (run_matrix.sh: full suite at the "full" counts, key cases at the others),
#   3. the fused routed experts against the three ops, round-robin, at 16 threads.
# Usage: benches/device_batch.sh OUT_DIR ["16 2 1"] ["16 2"]   (run from the repository root)
set -euo pipefail
out=${1:?output folder}
threads=${2:-"16 2 1"}
full=${3:-"16 2"}
mkdir -p "$out"
for n in $threads; do
  MOERUST_BENCH_THREADS=$n OMP_NUM_THREADS=$n python3 -m pytest benches/test_bench_moe.py -q -p no:cacheprovider \
    --benchmark-only --benchmark-json "$out/moe_t$n.json" | tail -n 1 || echo "some MoE benchmarks failed at $n threads"
done
python3 benches/summarize_moe.py "$out"/moe_t*.json > "$out/moe_summary.md"
benches/run_matrix.sh "$out/kernels" "$threads" "$full"
python3 -m benches.routed_experts_ab kernel 16 64 256 8 2 1024 --rounds 20 > "$out/routed_ab.txt"
cat "$out/moe_summary.md" "$out/kernels/summary.md" "$out/routed_ab.txt"
