//! The forward of a whole router in one call: `logits = x Wr^T / τ`, the softmax, the top-k or
//! top-p selection, the routing weights and the Switch balance loss (the kernels of `softmax`,
//! `routing`, `route_weights` and `balance`, run back to back).
//!
//! Why: in the MoE layer's one-node path this replaces a torch linear, a division and four
//! kernel calls, each with its Python entry and thread-team hand-over, by one call; the
//! backward's counterpart is `router_backward`.

use crate::balance::switch_balance;
use crate::error::{check_len, KResult};
use crate::expert_mlp::{matmul, MlpReal, Strides};
use crate::omp_team::for_each_part;
use crate::route_weights::route_weights;
use crate::routing::{topk_route, topp_route, RankKey, ROUTE_COST};
use crate::softmax::softmax_rows;
use crate::threads::{rows_per_task, team_size, with_team};

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

/// Routes `x [T, d]` with `weight [E, d]`; returns the balance loss (module docs). Each stage
/// runs on a team sized by its own work, as the separate kernels would (`threads` asked for).
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
    // The product's multiply-adds run 16 to a vector instruction: count them as 1/16 of the
    // element operations that size teams (a 1024 x 8 x 64 product stays on one thread; on the
    // lent 16-core VM a 4-thread team took longer to wake than the product).
    with_team(threads, t * e * d / 16, || {
        logits(x, t, d, weight, e, temperature, out.logits)
    });
    with_team(threads, t * e * ROUTE_COST, || {
        softmax_rows(out.logits, t, e, out.probs)
    })?;
    let k = out.idx.len() / t.max(1);
    with_team(threads, t * e * ROUTE_COST, || match selection {
        Selection::TopK(k) => topk_route(&*out.probs, t, e, k, out.idx),
        Selection::TopP {
            p,
            min_k,
            max_k,
            counts,
        } => topp_route(&*out.probs, t, e, p, min_k, max_k, out.idx, counts),
    })?;
    with_team(threads, t * (k + e), || {
        route_weights(&*out.probs, t, e, out.idx, k, renormalize, out.weights)?;
        switch_balance(&*out.probs, t, e, out.idx, k, out.share)
    })
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
}
