//! The forward of a whole router in one call: `logits = x Wr^T / τ`, the softmax, the top-k or
//! top-p selection, the routing weights and the Switch balance loss (the kernels of `softmax`,
//! `routing`, `route_weights` and `balance`, run back to back).
//!
//! Why: in the MoE layer's one-node path this replaces a torch linear, a division and four
//! kernel calls, each with its Python entry and thread-team hand-over, by one call; the
//! backward's counterpart is `router_backward`.

use crate::balance::{balance_finish, balance_partial};
use crate::error::{check_len, KResult};
use crate::expert_mlp::{matmul, MlpReal, Strides};
use crate::omp_team::{for_each_part, try_for_each_part};
use crate::route_weights::route_weights;
use crate::routing::{
    check_threshold_count, topk_route_from, topp_route_from, RankKey, ROUTE_COST,
};
use crate::softmax::softmax_rows;
use crate::threads::{resolve_threads, rows_per_task, split, split_mut, team_size, with_team};

/// Which experts each token keeps.
pub enum Selection<'a> {
    /// The `k` most probable.
    TopK(usize),
    /// Top-p with one threshold (or one per row) and `min_k..=max_k` experts; writes the count
    /// of kept experts per row into `counts [T]`.
    TopP {
        /// Thresholds, one or one per row.
        p: &'a [f32],
        /// Fewest experts per row.
        min_k: usize,
        /// Most experts per row (the slots of `idx`).
        max_k: usize,
        /// `[T]` experts kept per row.
        counts: &'a mut [i64],
    },
}

/// What the router's forward writes.
pub struct RouterOutputs<'a, T> {
    /// `[T, E]` logits after temperature.
    pub logits: &'a mut [T],
    /// `[T, E]` probabilities.
    pub probs: &'a mut [T],
    /// `[T, K]` selected experts (-1 = empty slot).
    pub idx: &'a mut [i64],
    /// `[T, K]` routing weights.
    pub weights: &'a mut [T],
    /// `[E]` each expert's share of the kept slots.
    pub share: &'a mut [T],
}

/// Routes `x [T, d]` with `weight [E, d]`; returns the balance loss (module docs). Blocks of
/// rows each run every stage on one thread, in one parallel region for the whole router (on the
/// lent 16-core VM one thread took 120-170 us for T = 1024, E = 8, d = 64 inside the layer, and
/// a region per stage would cost ~12 us each to start); the balance loss's sums are then added
/// over the blocks in order.
#[allow(clippy::too_many_arguments)]
pub fn router_forward<T: MlpReal + RankKey>(
    x: &[T],
    t: usize,
    d: usize,
    weight: &[T],
    e: usize,
    temperature: T,
    renormalize: bool,
    selection: Selection<'_>,
    out: RouterOutputs<'_, T>,
    threads: usize,
) -> KResult<f64> {
    check_len("x", x.len(), t * d)?;
    check_len("router_weight", weight.len(), e * d)?;
    check_len("logits", out.logits.len(), t * e)?;
    check_len("probs", out.probs.len(), t * e)?;
    check_len("share", out.share.len(), e)?;
    let k = out.idx.len() / t.max(1);
    check_len("idx", out.idx.len(), t * k)?;
    check_len("weights", out.weights.len(), t * k)?;
    let (topk, p, limits, counts) = match selection {
        Selection::TopK(k) => (Some(k), &[][..], (0, 0), None),
        Selection::TopP {
            p,
            min_k,
            max_k,
            counts,
        } => {
            check_len("counts", counts.len(), t)?;
            // (before the thresholds are cut into blocks)
            check_threshold_count(p, t)?;
            (None, p, (min_k, max_k), Some(counts))
        }
    };
    let (team, rows, blocks) = router_blocks(threads, t, e, d);
    let mut partial: Vec<(Vec<f64>, Vec<u64>)> =
        (0..blocks).map(|_| (vec![0.0; e], vec![0; e])).collect();
    let counts = match counts {
        Some(c) => split_mut(c, blocks, rows).into_iter().map(Some).collect(),
        None => (0..blocks).map(|_| None).collect::<Vec<_>>(),
    };
    let parts: Vec<_> = partial
        .iter_mut()
        .zip(counts)
        .zip(split(x, blocks, rows * d))
        .zip(split_mut(out.logits, blocks, rows * e))
        .zip(split_mut(out.probs, blocks, rows * e))
        .zip(split_mut(out.idx, blocks, rows * k))
        .zip(split_mut(out.weights, blocks, rows * k))
        .collect();
    with_team(threads, usize::MAX, || {
        try_for_each_part(team, parts, |b, part| {
            let ((((((balance, counts), x), logits_b), probs), idx), weights) = part;
            let first = b * rows;
            let m = rows.min(t.saturating_sub(first));
            // Every stage of the block on this thread (a kernel called inside a task runs inline).
            with_team(1, 0, || -> KResult<()> {
                logits(x, m, d, weight, e, temperature, logits_b);
                softmax_rows(logits_b, m, e, probs)?;
                match (topk, counts) {
                    (Some(k), _) => topk_route_from(probs, m, e, k, idx, first)?,
                    (None, Some(counts)) => {
                        let p = if p.len() == 1 {
                            p
                        } else {
                            &p[first..first + m]
                        };
                        topp_route_from(probs, m, e, p, limits.0, limits.1, idx, counts, first)?
                    }
                    (None, None) => unreachable!("top-p blocks carry their counts"),
                }
                route_weights(probs, m, e, idx, k, renormalize, weights)?;
                balance_partial(probs, e, idx, &mut balance.0, &mut balance.1)
            })
        })
    })?;
    Ok(balance_finish(&partial, t, e, out.share))
}

/// The router forward's team: one thread per 16K units of work, a row counting `E*d/4` for its
/// logits (multiply-adds run many to an instruction) and `2*E*ROUTE_COST` for the softmax,
/// selection and weights, so that each thread's share (~10 us) outweighs its part in starting
/// the region.
pub(crate) fn router_team(threads: usize, t: usize, e: usize, d: usize) -> usize {
    let work = t.saturating_mul(e * d / 4 + 2 * e * ROUTE_COST);
    resolve_threads(threads).min(work >> 14).max(1)
}

/// The router's team (see [`router_team`]) and its blocks of rows: `(team, rows per block,
/// blocks)`, shared by the forward and the backward. Two blocks per thread (threads that wake
/// late still find work); at least one block, so that the stages check their arguments even
/// without rows.
pub(crate) fn router_blocks(threads: usize, t: usize, e: usize, d: usize) -> (usize, usize, usize) {
    let team = router_team(threads, t, e, d);
    let rows = t.div_ceil(2 * team).max(1);
    (team, rows, t.div_ceil(rows).max(1))
}

/// `logits [T, E] = x [T, d] · weight [E, d]^T`, divided by `temperature` unless it is 1.
fn logits<T: MlpReal>(
    x: &[T],
    t: usize,
    d: usize,
    weight: &[T],
    e: usize,
    temperature: T,
    out: &mut [T],
) {
    if t == 0 || e == 0 {
        return;
    }
    let rows = rows_per_task(t, e * d, 1 << 16);
    let parts: Vec<_> = out
        .chunks_mut(rows * e)
        .zip(x.chunks(rows * d.max(1)))
        .collect();
    for_each_part(team_size(), parts, |_, (out, x)| {
        let m = out.len() / e;
        matmul(
            m,
            e,
            d,
            out,
            e,
            x,
            Strides::row_major(d),
            weight,
            Strides::transposed(d),
        );
        if temperature != T::ONE {
            for v in out.iter_mut() {
                *v = *v / temperature;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::switch_balance;
    use crate::routing::{topk_route, topp_route};
    use crate::testing::values;

    #[test]
    fn composes_the_kernels() {
        let (t, d, e, k) = (6usize, 3usize, 4usize, 2usize);
        let x: Vec<f64> = (0..t * d)
            .map(|i| ((i * 7 % 11) as f64 - 5.0) / 4.0)
            .collect();
        let w: Vec<f64> = (0..e * d)
            .map(|i| ((i * 5 % 7) as f64 - 3.0) / 3.0)
            .collect();
        let (mut logits, mut probs, mut idx) =
            (vec![0.0; t * e], vec![0.0; t * e], vec![0i64; t * k]);
        let (mut weights, mut share) = (vec![0.0; t * k], vec![0.0; e]);
        let out = RouterOutputs {
            logits: &mut logits,
            probs: &mut probs,
            idx: &mut idx,
            weights: &mut weights,
            share: &mut share,
        };
        let loss = router_forward(&x, t, d, &w, e, 0.5, true, Selection::TopK(k), out, 2).unwrap();
        // against the separate kernels
        let mut l2 = vec![0.0; t * e];
        for r in 0..t {
            for j in 0..e {
                l2[r * e + j] = (0..d).map(|c| x[r * d + c] * w[j * d + c]).sum::<f64>() / 0.5;
            }
        }
        for (a, b) in logits.iter().zip(&l2) {
            assert!((a - b).abs() < 1e-12);
        }
        let (mut p2, mut i2, mut w2, mut s2) = (
            vec![0.0; t * e],
            vec![0i64; t * k],
            vec![0.0; t * k],
            vec![0.0; e],
        );
        softmax_rows(&logits, t, e, &mut p2).unwrap();
        topk_route(&p2, t, e, k, &mut i2).unwrap();
        route_weights(&p2, t, e, &i2, k, true, &mut w2).unwrap();
        let loss2 = switch_balance(&p2, t, e, &i2, k, &mut s2).unwrap();
        assert_eq!(
            (&probs, &idx, &weights, &share, loss),
            (&p2, &i2, &w2, &s2, loss2)
        );
        // top-p: counts written, NaN logits an error
        let mut counts = vec![0i64; t];
        let (mut idx, mut weights) = (vec![0i64; t * e], vec![0.0; t * e]);
        let out = RouterOutputs {
            logits: &mut logits,
            probs: &mut vec![0.0; t * e],
            idx: &mut idx,
            weights: &mut weights,
            share: &mut share,
        };
        let sel = Selection::TopP {
            p: &[0.5],
            min_k: 1,
            max_k: e,
            counts: &mut counts,
        };
        router_forward(&x, t, d, &w, e, 1.0, true, sel, out, 1).unwrap();
        assert!(counts.iter().all(|&c| (1..=e as i64).contains(&c)));
        let bad = vec![f64::NAN; t * d];
        let out = RouterOutputs {
            logits: &mut logits,
            probs: &mut vec![0.0; t * e],
            idx: &mut vec![0; t * k],
            weights: &mut vec![0.0; t * k],
            share: &mut share,
        };
        assert!(router_forward(&bad, t, d, &w, e, 1.0, true, Selection::TopK(k), out, 1).is_err());
    }

    /// Many rows over a team of threads (blocks of rows, each on one thread): the same routing,
    /// weights, shares and (to f64 rounding) loss as the kernels run one after another; a NaN
    /// row is reported by its number in the whole batch.
    #[test]
    fn blocks_of_rows_agree_with_the_kernels() {
        let (t, d, e, k) = (3001usize, 16usize, 8usize, 2usize);
        let (x, w) = (values(t * d, 7), values(e * d, 8));
        assert!(router_team(4, t, e, d) == 4);
        let run = |x: &[f64], topp: Option<&[f32]>| {
            let slots = if topp.is_some() { e } else { k };
            let (mut logits, mut probs) = (vec![0.0; t * e], vec![0.0; t * e]);
            let (mut idx, mut weights) = (vec![0i64; t * slots], vec![0.0; t * slots]);
            let (mut share, mut counts) = (vec![0.0; e], vec![0i64; t]);
            let sel = match topp {
                Some(p) => Selection::TopP {
                    p,
                    min_k: 1,
                    max_k: e,
                    counts: &mut counts,
                },
                None => Selection::TopK(k),
            };
            let out = RouterOutputs {
                logits: &mut logits,
                probs: &mut probs,
                idx: &mut idx,
                weights: &mut weights,
                share: &mut share,
            };
            let loss = router_forward(x, t, d, &w, e, 0.7, true, sel, out, 4);
            (loss, logits, probs, idx, weights, share, counts)
        };
        let per_row: Vec<f32> = (0..t).map(|r| 0.2 + 0.6 * (r % 7) as f32 / 7.0).collect();
        for topp in [None, Some(&[0.5f32][..]), Some(&per_row[..])] {
            let (loss, logits, probs, idx, weights, share, counts) = run(&x, topp);
            let slots = idx.len() / t;
            let mut p2 = vec![0.0; t * e];
            softmax_rows(&logits, t, e, &mut p2).unwrap();
            let (mut i2, mut c2) = (vec![0i64; t * slots], vec![0i64; t]);
            match topp {
                Some(p) => topp_route(&p2, t, e, p, 1, e, &mut i2, &mut c2).unwrap(),
                None => topk_route(&p2, t, e, k, &mut i2).unwrap(),
            }
            let (mut w2, mut s2) = (vec![0.0; t * slots], vec![0.0; e]);
            route_weights(&p2, t, e, &i2, slots, true, &mut w2).unwrap();
            let loss2 = switch_balance(&p2, t, e, &i2, slots, &mut s2).unwrap();
            assert_eq!((&probs, &idx, &weights, &share), (&p2, &i2, &w2, &s2));
            if topp.is_some() {
                assert_eq!(counts, c2);
            }
            assert!((loss.unwrap() - loss2).abs() < 1e-12);
        }
        let mut bad = x.clone();
        bad[2500 * d] = f64::NAN;
        let err = run(&bad, None).0.unwrap_err().to_string();
        assert!(err.contains("row 2500"), "{err}");
    }
}
