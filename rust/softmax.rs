//! Softmax over the last axis of `[T, E]` rows (router probabilities) and its backward.
//!
//! Why a kernel: torch's CPU softmax over a short last axis (E = 8..64 experts) works row by row
//! and measured ~150 ns per row of 8 on one core, 20x the cost of the exponentials themselves;
//! every MoE router pays it in the forward and again in the backward.
//!
//! Semantics are torch's: `p_i = exp(x_i - max) / sum_j exp(x_j - max)`; a row holding NaN or
//! +inf, or only -inf, is all NaN; a -inf entry gets exactly 0. The f32 exponential is the
//! branch-free one of the expert MLP (< 3e-7 relative error); it returns 0 below `EXP_MIN`,
//! where torch returns a denormal (< 2e-38).

use crate::error::{check_len, KResult};
use crate::expert_mlp::MlpReal;
use crate::isa::with_best_isa;
use crate::omp_team::for_each_part;
use crate::threads::{rows_per_task, team_size};

/// `exp(z)` for `z = x - max <= 0`, NaN kept, 0 below the type's `EXP_MIN`.
#[inline(always)]
fn exp_shifted<T: MlpReal>(z: T) -> T {
    let e = z.exp();
    // Written as selects so the row loop vectorises.
    let e = if z < T::EXP_MIN { T::ZERO } else { e };
    if z.is_nan() {
        z
    } else {
        e
    }
}

/// Lanes of the row reductions: independent partial results hide the add / compare latency
/// (a single running sum over 64 experts would wait on each add in turn).
const LANES: usize = 8;

/// Max of a row ignoring NaN, -inf for an empty or all-NaN row.
#[inline(always)]
fn row_max<T: MlpReal>(r: &[T]) -> T {
    let mut lanes = [T::NEG_INFINITY; LANES];
    let chunks = r.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    let m = rest
        .iter()
        .fold(T::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    lanes.iter().fold(m, |m, &v| if v > m { v } else { m })
}

/// Sum of a row in `LANES` partial sums.
#[inline(always)]
fn row_sum<T: MlpReal>(r: &[T]) -> T {
    let mut lanes = [T::ZERO; LANES];
    let chunks = r.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            lanes[i] += c[i];
        }
    }
    lanes.iter().chain(rest).fold(T::ZERO, |s, &v| s + v)
}

/// Softmax of the rows of one part. Three passes, so the exponentials run as one long vectorised
/// loop rather than E at a time: shift each row by its max, exponentiate, normalise.
#[inline(always)]
fn softmax_part<T: MlpReal>(x: &[T], e: usize, out: &mut [T]) {
    for (o, r) in out.chunks_exact_mut(e).zip(x.chunks_exact(e)) {
        // max ignoring NaN (a NaN entry then makes its own term, and the row, NaN)
        let m = row_max(r);
        for i in 0..e {
            o[i] = r[i] - m;
        }
    }
    for v in out.iter_mut() {
        *v = exp_shifted(*v);
    }
    for o in out.chunks_exact_mut(e) {
        let inv = T::ONE / row_sum(o);
        for v in o.iter_mut() {
            *v = *v * inv;
        }
    }
}

/// `out [T, E] = softmax(x [T, E])` along each row, split over the calling thread's team.
pub fn softmax_rows<T: MlpReal>(x: &[T], t: usize, e: usize, out: &mut [T]) -> KResult<()> {
    check_len("logits", x.len(), t * e)?;
    check_len("out", out.len(), t * e)?;
    if t == 0 || e == 0 {
        return Ok(());
    }
    let rows = rows_per_task(t, 4 * e, 1 << 14);
    let parts: Vec<_> = out.chunks_mut(rows * e).zip(x.chunks(rows * e)).collect();
    for_each_part(team_size(), parts, |_, (out, x)| {
        with_best_isa(
            #[inline(always)]
            || softmax_part(x, e, out),
        )
    });
    Ok(())
}

/// Backward: `dx_i = p_i * (g_i - sum_j g_j p_j)` per row, from the softmax output `p`.
pub fn softmax_backward_rows<T: MlpReal>(
    grad: &[T],
    p: &[T],
    t: usize,
    e: usize,
    dx: &mut [T],
) -> KResult<()> {
    check_len("grad", grad.len(), t * e)?;
    check_len("probs", p.len(), t * e)?;
    check_len("out", dx.len(), t * e)?;
    if t == 0 || e == 0 {
        return Ok(());
    }
    let rows = rows_per_task(t, 3 * e, 1 << 14);
    let parts: Vec<_> = dx
        .chunks_mut(rows * e)
        .zip(grad.chunks(rows * e).zip(p.chunks(rows * e)))
        .collect();
    for_each_part(team_size(), parts, |_, (dx, (g, p))| {
        with_best_isa(
            #[inline(always)]
            || {
                for ((d, g), p) in dx
                    .chunks_exact_mut(e)
                    .zip(g.chunks_exact(e))
                    .zip(p.chunks_exact(e))
                {
                    let mut lanes = [T::ZERO; LANES];
                    let whole = e - e % LANES;
                    for j in (0..whole).step_by(LANES) {
                        for i in 0..LANES {
                            lanes[i] += g[j + i] * p[j + i];
                        }
                    }
                    let dot = (whole..e).fold(lanes.iter().fold(T::ZERO, |s, &v| s + v), |s, i| {
                        s + g[i] * p[i]
                    });
                    for i in 0..e {
                        d[i] = p[i] * (g[i] - dot);
                    }
                }
            },
        )
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::threads::with_team;

    fn reference(x: &[f64]) -> Vec<f64> {
        let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    #[test]
    fn matches_the_formula_and_sums_to_one() {
        let (t, e) = (37, 9);
        let x: Vec<f32> = (0..t * e)
            .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 7.0)
            .collect();
        let mut out = vec![0.0f32; t * e];
        with_team(3, usize::MAX, || softmax_rows(&x, t, e, &mut out)).unwrap();
        for r in 0..t {
            let want = reference(
                &x[r * e..(r + 1) * e]
                    .iter()
                    .map(|&v| v as f64)
                    .collect::<Vec<_>>(),
            );
            let row = &out[r * e..(r + 1) * e];
            for (g, w) in row.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 1e-6, "{g} vs {w}");
            }
            assert!((row.iter().map(|&v| v as f64).sum::<f64>() - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn special_values_follow_torch() {
        let (inf, nan) = (f32::INFINITY, f32::NAN);
        let rows: [[f32; 2]; 6] = [
            [1.0, inf],
            [-inf, -inf],
            [1.0, -inf],
            [nan, 1.0],
            [1e30, -1e30],
            [-100.0, 0.0],
        ];
        let x: Vec<f32> = rows.iter().flatten().cloned().collect();
        let mut out = vec![0.0f32; x.len()];
        softmax_rows(&x, rows.len(), 2, &mut out).unwrap();
        for r in [0, 1, 3] {
            assert!(
                out[2 * r].is_nan() && out[2 * r + 1].is_nan(),
                "row {r}: {:?}",
                &out[2 * r..2 * r + 2]
            );
        }
        assert_eq!(&out[4..6], &[1.0, 0.0]);
        assert_eq!(&out[8..10], &[1.0, 0.0]);
        assert_eq!(out[11], 1.0);
        assert!(out[10] < 1e-37);
    }

    #[test]
    fn backward_matches_the_jacobian() {
        let (t, e) = (3, 5);
        let x: Vec<f64> = (0..t * e).map(|i| (i as f64 * 0.37).sin()).collect();
        let g: Vec<f64> = (0..t * e).map(|i| (i as f64 * 0.11).cos()).collect();
        let mut p = vec![0.0; t * e];
        softmax_rows(&x, t, e, &mut p).unwrap();
        let mut dx = vec![0.0; t * e];
        softmax_backward_rows(&g, &p, t, e, &mut dx).unwrap();
        for r in 0..t {
            for i in 0..e {
                // sum_j g_j dp_j/dx_i with dp_j/dx_i = p_j (delta_ij - p_i)
                let want: f64 = (0..e)
                    .map(|j| {
                        g[r * e + j] * p[r * e + j] * (f64::from(u8::from(i == j)) - p[r * e + i])
                    })
                    .sum();
                assert!((dx[r * e + i] - want).abs() < 1e-12);
            }
        }
        assert!(softmax_rows::<f32>(&[], 0, 4, &mut []).is_ok());
        assert!(softmax_rows(&[1.0f32], 1, 2, &mut [0.0; 2]).is_err());
    }
}
