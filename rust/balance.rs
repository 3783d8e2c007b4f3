//! The Switch / GShard balance loss of one routing, in the same pass as the per-expert load.
//!
//! `f_i = load_i / total` is the share of the kept slots of `idx [T, K]` that chose expert i
//! (empty slots, `-1`, are not counted; all shares are 0 when no slot is kept) and
//! `P_i = sum_t probs[t, i] / T`; the loss is `E * sum_i f_i * P_i` (1 for perfectly even
//! routing, E when everything goes to one expert). A routing with no tokens or no kept slot has
//! loss 0.
//!
//! Why a kernel: the router ops return this next to their other outputs, so the layer's balance
//! loss needs no torch ops of its own (a mean, a bincount, a dot and a scale, each with an autograd
//! node, cost more than the routing itself on a small layer at 16 threads). Its gradient,
//! `d loss / d probs[t, i] = E * f_i / T` for every t, is added by the router's backward from
//! the shares, which is why they (and not the counts) are the kernel's output.

use crate::error::{check_len, value_err, KResult};
use crate::expert_mlp::MlpReal;
use crate::omp_team::try_for_each_part;
use crate::threads::{rows_per_task, team_size};

/// Writes `share [E]` (the `f_i` of the module docs) and returns the balance loss.
/// Sums are taken in f64, per block of rows and then over the blocks in order, so the result does
/// not depend on how the blocks were spread over threads.
pub fn switch_balance<T: MlpReal>(
    probs: &[T],
    t: usize,
    e: usize,
    idx: &[i64],
    k: usize,
    share: &mut [T],
) -> KResult<f64> {
    check_len("probs", probs.len(), t * e)?;
    check_len("idx", idx.len(), t * k)?;
    check_len("share", share.len(), e)?;
    let rows = rows_per_task(t, k + e, 1 << 14).max(1);
    let blocks = t.div_ceil(rows);
    // One (column sums, counts) pair per block, filled by whichever thread runs it.
    let mut partial: Vec<(Vec<f64>, Vec<u64>)> =
        (0..blocks).map(|_| (vec![0.0; e], vec![0; e])).collect();
    let parts: Vec<_> = partial
        .iter_mut()
        .zip(
            probs
                .chunks(rows * e.max(1))
                .zip(idx.chunks(rows * k.max(1))),
        )
        .collect();
    try_for_each_part(team_size(), parts, |_, ((sums, counts), (probs, idx))| {
        balance_partial(probs, e, idx, sums, counts)
    })?;
    Ok(balance_finish(&partial, t, e, share))
}

/// Adds the rows of `probs [R, E]` into `sums [E]` (f64) and the kept slots of `idx [R, K]`
/// into `counts [E]`: one block's part of [`switch_balance`].
pub(crate) fn balance_partial<T: MlpReal>(
    probs: &[T],
    e: usize,
    idx: &[i64],
    sums: &mut [f64],
    counts: &mut [u64],
) -> KResult<()> {
    if e > 0 {
        for row in probs.chunks_exact(e) {
            for (s, &p) in sums.iter_mut().zip(row) {
                *s += p.to_f64();
            }
        }
    }
    for &i in idx {
        if i >= 0 && (i as usize) < e {
            counts[i as usize] += 1;
        } else if i != -1 {
            return value_err(format!(
                "idx holds expert {i}, outside [-1, {e}) (probs has {e} experts)"
            ));
        }
    }
    Ok(())
}

/// Sums the blocks' `(sums, counts)` in order into `share [E]`; returns the loss of `t` rows.
pub(crate) fn balance_finish<T: MlpReal>(
    partial: &[(Vec<f64>, Vec<u64>)],
    t: usize,
    e: usize,
    share: &mut [T],
) -> f64 {
    let mut sums = vec![0.0f64; e];
    let mut counts = vec![0u64; e];
    for (s, c) in partial {
        for i in 0..e {
            sums[i] += s[i];
            counts[i] += c[i];
        }
    }
    let total = counts.iter().sum::<u64>().max(1) as f64;
    for (f, &c) in share.iter_mut().zip(&counts) {
        *f = T::from_f64(c as f64 / total);
    }
    if t == 0 {
        return 0.0;
    }
    let dot: f64 = counts.iter().zip(&sums).map(|(&c, &s)| c as f64 * s).sum();
    e as f64 * dot / (total * t as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_and_shares_by_hand() {
        // T = 2, E = 3, K = 2; slots: (0, 2), (2, -1) -> counts [1, 0, 2], total 3
        let probs = [0.5f64, 0.3, 0.2, 0.1, 0.1, 0.8];
        let mut share = [9.0; 3];
        let loss = switch_balance(&probs, 2, 3, &[0, 2, 2, -1], 2, &mut share).unwrap();
        assert_eq!(share, [1.0 / 3.0, 0.0, 2.0 / 3.0]);
        let p_mean = [0.3, 0.2, 0.5];
        let want = 3.0 * (1.0 * p_mean[0] + 2.0 * p_mean[2]) / 3.0;
        assert!((loss - want).abs() < 1e-15);
    }

    #[test]
    fn uniform_routing_gives_one_and_edge_cases_zero() {
        let (t, e) = (4, 4);
        let probs = vec![0.25f32; t * e];
        let mut share = [0.0f32; 4];
        let loss = switch_balance(&probs, t, e, &[0, 1, 2, 3], 1, &mut share).unwrap();
        assert!((loss - 1.0).abs() < 1e-12);
        assert_eq!(share, [0.25; 4]);
        // no tokens, no kept slots, no slots at all
        assert_eq!(
            switch_balance::<f32>(&[], 0, 4, &[], 2, &mut share).unwrap(),
            0.0
        );
        assert_eq!(share, [0.0; 4]);
        assert_eq!(
            switch_balance(&probs, t, e, &[-1; 4], 1, &mut share).unwrap(),
            0.0
        );
        assert_eq!(
            switch_balance(&probs, t, e, &[], 0, &mut share).unwrap(),
            0.0
        );
        let mut none: [f32; 0] = [];
        assert_eq!(
            switch_balance::<f32>(&[], 2, 0, &[-1, -1], 1, &mut none).unwrap(),
            0.0
        );
    }

    #[test]
    fn bad_slots_and_sizes_are_errors() {
        let probs = [0.5f64, 0.5];
        let mut share = [0.0; 2];
        assert!(switch_balance(&probs, 1, 2, &[2], 1, &mut share).is_err());
        assert!(switch_balance(&probs, 1, 2, &[-2], 1, &mut share).is_err());
        assert!(switch_balance(&probs, 1, 2, &[0, 1], 1, &mut share).is_err());
        assert!(switch_balance(&probs, 1, 2, &[0], 1, &mut [0.0; 3]).is_err());
    }
}
