//! Expert selection: `topk_route` (the k largest probabilities per row) and `topp_route`
//! (the smallest prefix of the descending order whose mass reaches p, Huang et al. 2024).
//!
//! Order used everywhere: larger value first, ties broken by the lower expert index.

use crate::error::{check_len, value_err, KResult};
use crate::isa::with_best_isa;
use crate::omp_team::try_for_each_part;
use crate::real::Real;
use crate::threads::{rows_per_task, team_size};

fn nan_error<T>(row: usize) -> KResult<T> {
    value_err(format!("probs contains NaN (row {row})"))
}

/// Work units per probability in routing (a key, compares and selects), against 1 per element
/// copied: sizes the team for routing calls.
pub const ROUTE_COST: usize = 8;

/// Writes the indices of the `k` largest entries of each row of `probs[t, e]` into `out[t, k]`,
/// ordered by descending value, ties by lower index. NaN anywhere is an error.
pub fn topk_route<F: RankKey>(
    probs: &[F],
    t: usize,
    e: usize,
    k: usize,
    out: &mut [i64],
) -> KResult<()> {
    topk_route_from(probs, t, e, k, out, 0)
}

/// [`topk_route`] of rows numbered from `first_row` (for error messages: a block of a larger batch).
pub(crate) fn topk_route_from<F: RankKey>(
    probs: &[F],
    t: usize,
    e: usize,
    k: usize,
    out: &mut [i64],
    first_row: usize,
) -> KResult<()> {
    check_len("probs", probs.len(), t * e)?;
    check_len("out", out.len(), t * k)?;
    if k < 1 || k > e {
        return value_err(format!(
            "k must be in [1, {e}] (the number of experts), got {k}"
        ));
    }
    if t == 0 {
        return Ok(());
    }
    let rows = rows_per_task(t, e, 1 << 14);
    let parts: Vec<_> = out
        .chunks_mut(rows * k)
        .zip(probs.chunks(rows * e))
        .collect();
    try_for_each_part(team_size(), parts, |chunk, (out, probs)| {
        let first = first_row + chunk * rows;
        // Small k (the common case) and short rows get a fixed-size buffer the compiler unrolls;
        // longer rows take k max scans, or a selection and a sort for large k.
        match (k, e) {
            (1, _) => topk_rows_fixed::<F, 1>(probs, e, out, first),
            (2, _) => topk_rows_fixed::<F, 2>(probs, e, out, first),
            (3, _) => topk_rows_fixed::<F, 3>(probs, e, out, first),
            (4, _) => topk_rows_fixed::<F, 4>(probs, e, out, first),
            (5, ..=8) => topk_rows_fixed::<F, 5>(probs, e, out, first),
            (6, ..=8) => topk_rows_fixed::<F, 6>(probs, e, out, first),
            (7, ..=8) => topk_rows_fixed::<F, 7>(probs, e, out, first),
            (8, ..=8) => topk_rows_fixed::<F, 8>(probs, e, out, first),
            _ => topk_rows_keys(probs, e, k, out, first),
        }
    })
}

/// Top-`K` of each row with a branch-free compare-exchange down a `K`-key buffer: no
/// data-dependent branches, so random rows cost no mispredictions. `K <= e`, so every place fills.
fn topk_rows_fixed<F: RankKey, const K: usize>(
    probs: &[F],
    e: usize,
    out: &mut [i64],
    first_row: usize,
) -> KResult<()> {
    for (r, (row, dst)) in probs
        .chunks_exact(e)
        .zip(out.chunks_exact_mut(K))
        .enumerate()
    {
        let mut best = [F::MIN_KEY; K];
        let mut nan = false;
        for (j, &v) in row.iter().enumerate() {
            nan |= v.is_nan();
            let mut key = F::key(v, j);
            for b in best.iter_mut() {
                let hi = (*b).max(key);
                key = (*b).min(key);
                *b = hi;
            }
        }
        if nan {
            return nan_error(first_row + r);
        }
        for (d, &key) in dst.iter_mut().zip(&best) {
            *d = F::index(key) as i64;
        }
    }
    Ok(())
}

/// Top-`k` of each row from its (value, index) keys: `k` max scans while k is small, else a
/// selection of the k largest and a sort of just those.
fn topk_rows_keys<F: RankKey>(
    probs: &[F],
    e: usize,
    k: usize,
    out: &mut [i64],
    first_row: usize,
) -> KResult<()> {
    with_best_isa(
        #[inline(always)]
        || {
            let mut keys: Vec<F::Key> = Vec::with_capacity(e);
            for (r, (row, dst)) in probs
                .chunks_exact(e)
                .zip(out.chunks_exact_mut(k))
                .enumerate()
            {
                if fill_keys(&mut keys, row, |v| v.is_nan()) {
                    return nan_error(first_row + r);
                }
                if k <= MAX_SCANS {
                    for d in dst.iter_mut() {
                        *d = take_max::<F>(&mut keys) as i64;
                    }
                } else {
                    keys.select_nth_unstable(e - k);
                    let top = &mut keys[e - k..];
                    top.sort_unstable();
                    for (d, &key) in dst.iter_mut().zip(top.iter().rev()) {
                        *d = F::index(key) as i64;
                    }
                }
            }
            Ok(())
        },
    )
}

/// A sort key that orders (value, index) pairs: a larger key ranks first (larger value, then
/// lower index). Defined for every non-NaN value: the IEEE bits are mapped to an unsigned integer
/// that is monotone in the value (negative values have all bits flipped, others the sign bit set),
/// after `+ 0.0` has turned -0.0 into +0.0 so both zeros tie.
pub trait RankKey: Real {
    /// The integer key type.
    type Key: Copy + Ord + Send;
    /// A key below every real key.
    const MIN_KEY: Self::Key;
    /// Key of value `v` (>= 0, not NaN) at index `j`.
    fn key(v: Self, j: usize) -> Self::Key;
    /// The index stored in a key.
    fn index(k: Self::Key) -> usize;
}

impl RankKey for f32 {
    type Key = u64;
    const MIN_KEY: u64 = 0;
    #[inline(always)]
    fn key(v: f32, j: usize) -> u64 {
        let b = (v + 0.0).to_bits();
        let m = if b >> 31 == 1 { !b } else { b | (1 << 31) };
        ((m as u64) << 32) | (u32::MAX - j as u32) as u64
    }
    #[inline(always)]
    fn index(k: u64) -> usize {
        (u32::MAX - (k & 0xffff_ffff) as u32) as usize
    }
}

impl RankKey for f64 {
    type Key = u128;
    const MIN_KEY: u128 = 0;
    #[inline(always)]
    fn key(v: f64, j: usize) -> u128 {
        let b = (v + 0.0).to_bits();
        let m = if b >> 63 == 1 { !b } else { b | (1 << 63) };
        ((m as u128) << 64) | (u64::MAX - j as u64) as u128
    }
    #[inline(always)]
    fn index(k: u128) -> usize {
        (u64::MAX - (k & 0xffff_ffff_ffff_ffff) as u64) as usize
    }
}

/// Experts picked by vectorised max scans before the rest of the row is sorted instead (top-p
/// rows usually keep few experts; a flat row that keeps many is cheaper to sort).
const MAX_SCANS: usize = 20;

/// Lanes of the max scan over keys: one AVX-512 vector of u64 (or two AVX2 ones).
const LANES: usize = 8;

/// The largest key of `keys`: independent lanes, then a tree reduction, so the compares pipeline
/// and vectorise (AVX-512 has an unsigned 64-bit max).
#[inline(always)]
fn max_key<K: Ord + Copy>(keys: &[K], floor: K) -> K {
    let mut lanes = [floor; LANES];
    let chunks = keys.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        let c: &[K; LANES] = c.try_into().expect("chunks_exact yields LANES elements");
        for i in 0..LANES {
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            lanes[i] = if lanes[i + width] > lanes[i] {
                lanes[i + width]
            } else {
                lanes[i]
            };
        }
        width /= 2;
    }
    rest.iter()
        .fold(lanes[0], |m, &x| if x > m { x } else { m })
}

/// Fills `keys` with the (value, index) keys of `row` and, in the same pass and without
/// branches, reports whether any value is `bad`.
#[inline(always)]
fn fill_keys<F: RankKey>(keys: &mut Vec<F::Key>, row: &[F], bad: impl Fn(F) -> bool) -> bool {
    keys.clear();
    let mut any = false;
    keys.extend(row.iter().enumerate().map(|(j, &v)| {
        any |= bad(v);
        F::key(v, j)
    }));
    any
}

/// The index of the largest key not yet taken; marks it taken (the minimum key).
#[inline(always)]
fn take_max<F: RankKey>(keys: &mut [F::Key]) -> usize {
    let j = F::index(max_key(keys, F::MIN_KEY));
    keys[j] = F::MIN_KEY;
    j
}

/// NaN or negative (without branches, so the validity pass vectorises).
#[inline(always)]
fn invalid_prob<F: Real>(v: F) -> bool {
    v.is_nan() | (v < F::ZERO)
}

/// Top-p selection. For each row of `probs[t, e]` (non-negative, no NaN), walk the experts in
/// descending order and keep the one at rank r iff the float32 sum of the probabilities ranked
/// before it is <= p (as float32); then clamp the count to [min_k, max_k]. Writes the kept experts
/// to `idx[t, max_k]` (unused slots -1) and their number to `counts[t]`.
///
/// The first experts come from max scans over the row's keys (a key holds the value and the
/// index, so the lowest index wins ties and the index comes with the maximum; a taken key is set
/// to the minimum); a row that keeps more than `MAX_SCANS` sorts its remaining keys. O(E) per
/// row when few experts are kept.
#[allow(clippy::too_many_arguments)]
pub fn topp_route<F: RankKey>(
    probs: &[F],
    t: usize,
    e: usize,
    p: &[f32],
    min_k: usize,
    max_k: usize,
    idx: &mut [i64],
    counts: &mut [i64],
) -> KResult<()> {
    topp_route_from(probs, t, e, p, min_k, max_k, idx, counts, 0)
}

/// Top-p takes one threshold, or one per row of `t`.
pub(crate) fn check_threshold_count(p: &[f32], t: usize) -> KResult<()> {
    if p.len() != 1 && p.len() != t {
        return value_err(format!(
            "p must hold 1 threshold or one per row ({t}), got {}",
            p.len()
        ));
    }
    Ok(())
}

/// [`topp_route`] of rows numbered from `first_row` (for error messages: a block of a larger batch).
#[allow(clippy::too_many_arguments)]
pub(crate) fn topp_route_from<F: RankKey>(
    probs: &[F],
    t: usize,
    e: usize,
    p: &[f32],
    min_k: usize,
    max_k: usize,
    idx: &mut [i64],
    counts: &mut [i64],
    first_row: usize,
) -> KResult<()> {
    check_len("probs", probs.len(), t * e)?;
    check_len("idx", idx.len(), t * max_k)?;
    check_len("counts", counts.len(), t)?;
    check_threshold_count(p, t)?;
    if let Some(bad) = p.iter().find(|v| !(0.0..=1.0).contains(*v)) {
        return value_err(format!("p must be in [0, 1], got {bad}"));
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
    let parts: Vec<_> = idx
        .chunks_mut(rows * max_k)
        .zip(counts.chunks_mut(rows))
        .zip(probs.chunks(rows * e))
        .collect();
    try_for_each_part(team_size(), parts, |chunk, ((idx, counts), probs)| {
        with_best_isa(
            #[inline(always)]
            || {
                let mut keys: Vec<F::Key> = Vec::with_capacity(e);
                for (r, ((row, dst), count)) in probs
                    .chunks_exact(e)
                    .zip(idx.chunks_exact_mut(max_k))
                    .zip(counts.iter_mut())
                    .enumerate()
                {
                    if fill_keys(&mut keys, row, invalid_prob) {
                        let row_no = first_row + chunk * rows + r;
                        let v = row
                            .iter()
                            .copied()
                            .find(|&v| invalid_prob(v))
                            .expect("a bad value");
                        return if v.is_nan() {
                            nan_error(row_no)
                        } else {
                            value_err(format!(
                                "probs must be non-negative, got {} (row {row_no})",
                                v.to_f64()
                            ))
                        };
                    }
                    let p = if p.len() == 1 {
                        p[0]
                    } else {
                        p[chunk * rows + r]
                    };
                    let mut acc = 0.0f32;
                    let mut kept = 0usize;
                    while kept < max_k && (kept < min_k || acc <= p) {
                        let j = if kept < MAX_SCANS {
                            take_max::<F>(&mut keys)
                        } else {
                            if kept == MAX_SCANS {
                                // A flat row: sort the keys left once (ascending; pop from the end).
                                keys.retain(|&k| k != F::MIN_KEY);
                                keys.sort_unstable();
                            }
                            F::index(
                                keys.pop()
                                    .expect("a kept count below max_k <= E leaves keys"),
                            )
                        };
                        dst[kept] = j as i64;
                        acc += row[j].to_f32();
                        kept += 1;
                    }
                    dst[kept..].fill(-1);
                    *count = kept as i64;
                }
                Ok(())
            },
        )
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
        topp_route(p, t, e, &[pp], min_k, max_k, &mut idx, &mut counts).unwrap();
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
        assert!(topk_route(&[0.1f32, 0.2], 1, 2, 3, &mut [0; 3]).is_err());
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
    fn keys_order_every_value() {
        let vals = [
            f32::NEG_INFINITY,
            -3.0,
            -0.0,
            0.0,
            1e-30,
            2.0,
            f32::INFINITY,
        ];
        for w in vals.windows(2) {
            assert!(
                f32::key(w[0], 0) <= f32::key(w[1], 0),
                "{} vs {}",
                w[0],
                w[1]
            );
        }
        assert_eq!(f32::key(-0.0, 1), f32::key(0.0, 1));
        assert!(f32::key(1.0, 0) > f32::key(1.0, 1));
        assert_eq!(f64::index(f64::key(-2.5, 17)), 17);
        assert_eq!(
            topk(&[-1.0, -0.5, f32::NEG_INFINITY, -0.5], 4, 4),
            vec![1, 3, 0, 2]
        );
    }

    #[test]
    fn topp_rejects_negative_probs() {
        let mut idx = vec![0; 2];
        let mut counts = vec![0; 1];
        assert!(topp_route(&[-0.1f32, 0.2], 1, 2, &[0.5], 1, 2, &mut idx, &mut counts).is_err());
    }
}
