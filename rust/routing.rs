//! Expert selection: `topk_route` (the k largest probabilities per row) and `topp_route`
//! (the smallest prefix of the descending order whose mass reaches p, Huang et al. 2024).
//!
//! Order used everywhere: larger value first, ties broken by the lower expert index.

use rayon::prelude::*;

use crate::error::{check_len, value_err, KResult};
use crate::real::Real;
use crate::threads::rows_per_task;

/// Whether (va, ia) ranks before (vb, ib): larger value first, then lower index.
#[inline(always)]
fn ranks_before<F: Real>(va: F, ia: usize, vb: F, ib: usize) -> bool {
    va > vb || (va == vb && ia < ib)
}

fn nan_error<T>(row: usize) -> KResult<T> {
    value_err(format!("probs contains NaN (row {row})"))
}

/// Writes the indices of the `k` largest entries of each row of `probs[t, e]` into `out[t, k]`,
/// ordered by descending value, ties by lower index. NaN anywhere is an error.
pub fn topk_route<F: Real>(probs: &[F], t: usize, e: usize, k: usize, out: &mut [i64]) -> KResult<()> {
    check_len("probs", probs.len(), t * e)?;
    check_len("out", out.len(), t * k)?;
    if k < 1 || k > e {
        return value_err(format!("k must be in [1, {e}] (the number of experts), got {k}"));
    }
    if t == 0 {
        return Ok(());
    }
    let rows = rows_per_task(t, e, 1 << 14);
    out.par_chunks_mut(rows * k)
        .zip(probs.par_chunks(rows * e))
        .enumerate()
        .try_for_each(|(chunk, (out, probs))| {
            // Sorted buffer of the best k seen so far: (value, index).
            let mut best: Vec<(F, usize)> = Vec::with_capacity(k);
            for (r, (row, dst)) in probs.chunks_exact(e).zip(out.chunks_exact_mut(k)).enumerate() {
                best.clear();
                for (j, &v) in row.iter().enumerate() {
                    if v.is_nan() {
                        return nan_error(chunk * rows + r);
                    }
                    if best.len() == k {
                        let (lv, li) = best[k - 1];
                        if !ranks_before(v, j, lv, li) {
                            continue;
                        }
                        best.pop();
                    }
                    // Insertion point: after every element that ranks before (v, j).
                    let pos = best.partition_point(|&(bv, bi)| ranks_before(bv, bi, v, j));
                    best.insert(pos, (v, j));
                }
                for (d, &(_, j)) in dst.iter_mut().zip(best.iter()) {
                    *d = j as i64;
                }
            }
            Ok(())
        })
}

/// Steps done by linear scans before the rest of a row is sorted (top-p usually keeps few experts).
const SCAN_STEPS: usize = 8;

/// Top-p selection. For each row of `probs[t, e]` (non-negative, no NaN), walk the experts in
/// descending order and keep the one at rank r iff the float32 sum of the probabilities ranked
/// before it is <= p (as float32); then clamp the count to [min_k, max_k]. Writes the kept experts
/// to `idx[t, max_k]` (unused slots -1) and their number to `counts[t]`.
#[allow(clippy::too_many_arguments)]
pub fn topp_route<F: Real>(
    probs: &[F],
    t: usize,
    e: usize,
    p: f32,
    min_k: usize,
    max_k: usize,
    idx: &mut [i64],
    counts: &mut [i64],
) -> KResult<()> {
    check_len("probs", probs.len(), t * e)?;
    check_len("idx", idx.len(), t * max_k)?;
    check_len("counts", counts.len(), t)?;
    if !(0.0..=1.0).contains(&p) {
        return value_err(format!("p must be in [0, 1], got {p}"));
    }
    if min_k < 1 || min_k > max_k || max_k > e {
        return value_err(format!(
            "min_k and max_k must satisfy 1 <= min_k <= max_k <= {e} (the number of experts), got min_k={min_k}, max_k={max_k}"
        ));
    }
    if t == 0 {
        return Ok(());
    }
    let rows = rows_per_task(t, e, 1 << 14);
    idx.par_chunks_mut(rows * max_k)
        .zip(counts.par_chunks_mut(rows))
        .zip(probs.par_chunks(rows * e))
        .enumerate()
        .try_for_each(|(chunk, ((idx, counts), probs))| {
            let mut tail: Vec<(F, usize)> = Vec::with_capacity(e);
            for (r, ((row, dst), count)) in probs
                .chunks_exact(e)
                .zip(idx.chunks_exact_mut(max_k))
                .zip(counts.iter_mut())
                .enumerate()
            {
                for &v in row {
                    if v.is_nan() {
                        return nan_error(chunk * rows + r);
                    }
                    if v < F::ZERO {
                        return value_err(format!(
                            "probs must be non-negative, got {} (row {})",
                            v.to_f64(),
                            chunk * rows + r
                        ));
                    }
                }
                let mut acc = 0.0f32;
                let mut last: Option<(F, usize)> = None;
                let mut kept = 0usize;
                let mut tail_pos = usize::MAX; // usize::MAX: tail not sorted yet
                while kept < max_k && (kept < min_k || acc <= p) {
                    let (v, j) = if kept < SCAN_STEPS {
                        // Best element strictly after `last` in the order.
                        let mut best: Option<(F, usize)> = None;
                        for (j, &v) in row.iter().enumerate() {
                            let after_last = last.is_none_or(|(lv, li)| ranks_before(lv, li, v, j));
                            if after_last && best.is_none_or(|(bv, bi)| ranks_before(v, j, bv, bi)) {
                                best = Some((v, j));
                            }
                        }
                        best.expect("max_k <= e leaves an element to select")
                    } else {
                        if tail_pos == usize::MAX {
                            let (lv, li) = last.expect("SCAN_STEPS >= 1");
                            tail.clear();
                            tail.extend(
                                row.iter()
                                    .enumerate()
                                    .filter(|&(j, &v)| ranks_before(lv, li, v, j))
                                    .map(|(j, &v)| (v, j)),
                            );
                            tail.sort_unstable_by(|a, b| {
                                if ranks_before(a.0, a.1, b.0, b.1) {
                                    std::cmp::Ordering::Less
                                } else {
                                    std::cmp::Ordering::Greater
                                }
                            });
                            tail_pos = 0;
                        }
                        tail_pos += 1;
                        tail[tail_pos - 1]
                    };
                    dst[kept] = j as i64;
                    acc += v.to_f32();
                    last = Some((v, j));
                    kept += 1;
                }
                dst[kept..].fill(-1);
                *count = kept as i64;
            }
            Ok(())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topk(p: &[f32], e: usize, k: usize) -> Vec<i64> {
        let t = p.len() / e;
        let mut out = vec![0; t * k];
        topk_route(p, t, e, k, &mut out).unwrap();
        out
    }

    fn topp(p: &[f64], e: usize, pp: f32, min_k: usize, max_k: usize) -> (Vec<i64>, Vec<i64>) {
        let t = p.len() / e;
        let mut idx = vec![0; t * max_k];
        let mut counts = vec![0; t];
        topp_route(p, t, e, pp, min_k, max_k, &mut idx, &mut counts).unwrap();
        (idx, counts)
    }

    #[test]
    fn topk_orders_and_breaks_ties_by_index() {
        assert_eq!(topk(&[0.1, 0.5, 0.2, 0.5], 4, 3), vec![1, 3, 2]);
        assert_eq!(topk(&[1.0, 1.0, 1.0], 3, 3), vec![0, 1, 2]);
        assert_eq!(topk(&[0.3], 1, 1), vec![0]);
    }

    #[test]
    fn topk_rejects_nan_and_bad_k() {
        let mut out = vec![0; 2];
        assert!(topk_route(&[0.1f32, f32::NAN], 1, 2, 2, &mut out).is_err());
        assert!(topk_route(&[0.1f32, 0.2], 1, 2, 3, &mut vec![0; 3]).is_err());
        assert!(topk_route(&[0.1f32, 0.2], 1, 2, 0, &mut []).is_err());
    }

    #[test]
    fn topp_keeps_the_expert_that_crosses_p() {
        let (idx, counts) = topp(&[0.1, 0.4, 0.2, 0.3], 4, 0.4, 1, 4);
        assert_eq!(counts, vec![2]);
        assert_eq!(idx, vec![1, 3, -1, -1]);
        // p = 0 keeps exactly one; p = 1 keeps all (sums stay <= 1).
        assert_eq!(topp(&[0.25; 4], 4, 0.0, 1, 4).1, vec![1]);
        assert_eq!(topp(&[0.25; 4], 4, 1.0, 1, 4), (vec![0, 1, 2, 3], vec![4]));
        // Clamping to [min_k, max_k].
        assert_eq!(topp(&[0.9, 0.05, 0.05], 3, 0.1, 2, 3).1, vec![2]);
        assert_eq!(topp(&[0.25; 4], 4, 1.0, 1, 2).0, vec![0, 1]);
    }

    #[test]
    fn topp_sorts_long_tails() {
        let e = 20;
        let row: Vec<f64> = (0..e).map(|j| ((j * 7) % e) as f64 / 1000.0).collect();
        let (idx, counts) = topp(&row, e, 1.0, 1, e);
        assert_eq!(counts, vec![e as i64]);
        let mut expected: Vec<usize> = (0..e).collect();
        expected.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
        assert_eq!(idx, expected.iter().map(|&j| j as i64).collect::<Vec<_>>());
    }

    #[test]
    fn topp_rejects_negative_probs() {
        let mut idx = vec![0; 2];
        let mut counts = vec![0; 1];
        assert!(topp_route(&[-0.1f32, 0.2], 1, 2, 0.5, 1, 2, &mut idx, &mut counts).is_err());
    }
}
