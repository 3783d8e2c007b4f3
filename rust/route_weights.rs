//! The routing weights of the selected experts: `w[t, j] = probs[t, idx[t, j]]` (0 for an empty
//! slot, `idx = -1`), optionally renormalised to sum to 1 per token, and the gradient back to
//! `probs`.
//!
//! Why a kernel: in torch this is a mask, a clamp, a gather, a multiply, a sum, a clamp and a
//! divide, each with its own autograd node; on a small MoE layer at 16 threads each of those tiny
//! ops costs tens of microseconds, more than the work itself.
//!
//! Renormalisation divides by `max(sum, 1e-20)` (the sum of the row's kept weights, summed in slot
//! order); as in torch, the gradient of the clamp is 0 below the bound.

use crate::error::{check_len, value_err, KResult};
use crate::expert_mlp::MlpReal;
use crate::omp_team::try_for_each_part;
use crate::threads::{rows_per_task, team_size};

/// The smallest divisor of a renormalised row.
pub const MIN_SUM: f64 = 1e-20;

/// The expert of slot `i`, or None for an empty slot; an error names `idx` otherwise.
fn expert_of(i: i64, e: usize) -> KResult<Option<usize>> {
    if i == -1 {
        Ok(None)
    } else if i >= 0 && (i as usize) < e {
        Ok(Some(i as usize))
    } else {
        value_err(format!(
            "idx holds expert {i}, outside [-1, {e}) (probs has {e} experts)"
        ))
    }
}

/// Weights `out [T, K]` of the slots `idx [T, K]` from `probs [T, E]`.
pub fn route_weights<T: MlpReal>(
    probs: &[T],
    t: usize,
    e: usize,
    idx: &[i64],
    k: usize,
    renormalize: bool,
    out: &mut [T],
) -> KResult<()> {
    check_len("probs", probs.len(), t * e)?;
    check_len("idx", idx.len(), t * k)?;
    check_len("out", out.len(), t * k)?;
    if t == 0 || k == 0 {
        return Ok(());
    }
    if e == 0 {
        // No experts: only empty slots are valid, and they weigh 0.
        for &i in idx {
            expert_of(i, e)?;
        }
        out.fill(T::ZERO);
        return Ok(());
    }
    let min_sum = T::from_f64(MIN_SUM);
    let rows = rows_per_task(t, k + e, 1 << 14);
    let parts: Vec<_> = out
        .chunks_mut(rows * k)
        .zip(idx.chunks(rows * k).zip(probs.chunks(rows * e)))
        .collect();
    try_for_each_part(team_size(), parts, |_, (out, (idx, probs))| {
        for ((w, slots), p) in out
            .chunks_exact_mut(k)
            .zip(idx.chunks_exact(k))
            .zip(probs.chunks_exact(e))
        {
            let mut sum = T::ZERO;
            for (wj, &i) in w.iter_mut().zip(slots) {
                *wj = match expert_of(i, e)? {
                    Some(x) => p[x],
                    None => T::ZERO,
                };
                sum += *wj;
            }
            if renormalize {
                // NaN stays NaN (a NaN sum is not below the bound), as with torch's clamp.
                let d = if sum < min_sum { min_sum } else { sum };
                for wj in w.iter_mut() {
                    *wj = *wj / d;
                }
            }
        }
        Ok(())
    })
}

/// Gradient `dprobs [T, E]` of [`route_weights`] from the weights' gradient `grad [T, K]`.
#[allow(clippy::too_many_arguments)]
pub fn route_weights_backward<T: MlpReal>(
    grad: &[T],
    probs: &[T],
    t: usize,
    e: usize,
    idx: &[i64],
    k: usize,
    renormalize: bool,
    dprobs: &mut [T],
) -> KResult<()> {
    check_len("grad", grad.len(), t * k)?;
    check_len("probs", probs.len(), t * e)?;
    check_len("idx", idx.len(), t * k)?;
    check_len("out", dprobs.len(), t * e)?;
    if t == 0 || e == 0 {
        return Ok(());
    }
    if k == 0 {
        dprobs.fill(T::ZERO);
        return Ok(());
    }
    let min_sum = T::from_f64(MIN_SUM);
    let rows = rows_per_task(t, k + e, 1 << 14);
    let parts: Vec<_> = dprobs
        .chunks_mut(rows * e)
        .zip(
            grad.chunks(rows * k)
                .zip(idx.chunks(rows * k).zip(probs.chunks(rows * e))),
        )
        .collect();
    try_for_each_part(team_size(), parts, |_, (dp, (grad, (idx, probs)))| {
        for (((dp, g), slots), p) in dp
            .chunks_exact_mut(e)
            .zip(grad.chunks_exact(k))
            .zip(idx.chunks_exact(k))
            .zip(probs.chunks_exact(e))
        {
            dp.fill(T::ZERO);
            if !renormalize {
                for (&gj, &i) in g.iter().zip(slots) {
                    if let Some(x) = expert_of(i, e)? {
                        dp[x] += gj;
                    }
                }
                continue;
            }
            // w_j = p_j / D with D = max(S, 1e-20): dp_j = g_j / D - [S >= 1e-20] sum_i g_i p_i / D^2
            let mut sum = T::ZERO;
            let mut gp = T::ZERO;
            for (&gj, &i) in g.iter().zip(slots) {
                if let Some(x) = expert_of(i, e)? {
                    sum += p[x];
                    gp += gj * p[x];
                }
            }
            let clamped = sum < min_sum;
            let d = if clamped { min_sum } else { sum };
            let through_sum = if clamped { T::ZERO } else { gp / (d * d) };
            for (&gj, &i) in g.iter().zip(slots) {
                if let Some(x) = expert_of(i, e)? {
                    dp[x] += gj / d - through_sum;
                }
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_and_gradient_by_hand() {
        let probs = [0.5f64, 0.3, 0.2, 0.0, 0.0, 1.0];
        let idx = [0i64, 2, -1, 2];
        let mut w = [0.0; 4];
        route_weights(&probs, 2, 3, &idx, 2, true, &mut w).unwrap();
        assert!((w[0] - 0.5 / 0.7).abs() < 1e-15 && (w[1] - 0.2 / 0.7).abs() < 1e-15);
        assert_eq!(&w[2..], &[0.0, 1.0]);
        route_weights(&probs, 2, 3, &idx, 2, false, &mut w).unwrap();
        assert_eq!(w, [0.5, 0.2, 0.0, 1.0]);
        // d/dp of (w0 + 2 w1) with w = p_sel / (p0 + p2)
        let (g, mut dp) = ([1.0, 2.0, 5.0, 1.0], [9.0; 6]);
        route_weights_backward(&g, &probs, 2, 3, &idx, 2, true, &mut dp).unwrap();
        let s = 0.7f64;
        let gp = 0.5 + 2.0 * 0.2;
        assert!((dp[0] - (1.0 / s - gp / (s * s))).abs() < 1e-12);
        assert!((dp[2] - (2.0 / s - gp / (s * s))).abs() < 1e-12);
        assert_eq!(dp[1], 0.0);
        assert!((dp[5] - 0.0).abs() < 1e-12); // a single kept slot: w = 1 whatever p is
        assert!(route_weights(&probs, 2, 3, &[0, 3, 0, 0], 2, true, &mut w).is_err());
        assert!(route_weights(&probs, 2, 3, &[0, -2, 0, 0], 2, false, &mut w).is_err());
        let mut w0 = [7.0f64; 2];
        route_weights::<f64>(&[], 1, 0, &[-1, -1], 2, true, &mut w0).unwrap();
        assert_eq!(w0, [0.0, 0.0]);
        assert!(route_weights::<f64>(&[], 1, 0, &[0, -1], 2, true, &mut w0).is_err());
    }

    #[test]
    fn a_row_of_zeros_uses_the_bound() {
        let (probs, idx) = ([0.0f32, 0.0], [0i64, 1]);
        let mut w = [1.0f32; 2];
        route_weights(&probs, 1, 2, &idx, 2, true, &mut w).unwrap();
        assert_eq!(w, [0.0, 0.0]);
        let mut dp = [0.0f32; 2];
        route_weights_backward(&[1.0, 0.0], &probs, 1, 2, &idx, 2, true, &mut dp).unwrap();
        assert_eq!(dp, [1e20, 0.0]); // the clamp passes no gradient through the sum
    }
}
