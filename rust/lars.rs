//! Layer-wise gradient scaling: LARS (You et al. 2017) and "bidirectional" scaling toward a target
//! gradient norm. One native call handles every tensor: squared norms for all of them first (so a
//! non-finite gradient is reported before anything is modified), then the in-place scaling.
//!
//! Both passes run on the calling thread's team (`omp_team`) over fixed pieces of at most
//! `PIECE` elements, so the norms do not depend on the thread count, and the second pass walks the
//! pieces in reverse so that its first pieces are the ones the first pass left in cache.

use crate::error::{value_err, KResult, KernelError};
use crate::isa::with_best_isa;
use crate::omp_team::for_each_part;
use crate::real::Real;
use crate::threads::team_size;

/// Elements per parallel piece (256 KiB of f32): large enough to amortise a task, small enough
/// that a 10M-parameter model splits into ~160 pieces that balance over the team.
const PIECE: usize = 1 << 16;

/// How the per-unit ratio is computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// `ratio = eta*||w|| / (||g|| + wd*||w|| + eps)`, 1 when either norm is 0; `g <- (g + wd*w)*ratio`.
    Lars {
        eta: f64,
        weight_decay: f64,
        eps: f64,
        clip: Option<(f64, f64)>,
    },
    /// `scale = clamp(sqrt(target/(||g|| + eps)), lo, hi)`, 1 when ||g|| < 1e-6; `g <- g*scale`.
    Bidirectional {
        target: f64,
        lo: f64,
        hi: f64,
        eps: f64,
    },
}

/// Sum of squares in f64, computed blockwise in f32/f64 lanes so the loop vectorises.
pub fn sum_squares<F: Real>(x: &[F]) -> f64 {
    sum_squares_of([x])[0]
}

/// Sums of squares of `N` slices of equal length, walked together: the slices stream from memory
/// at the same time, which keeps more loads in flight than one slice after another (the weights
/// are usually cold when LARS reads them).
pub fn sum_squares_of<F: Real, const N: usize>(xs: [&[F]; N]) -> [f64; N] {
    // 32 lanes (four AVX2 vectors of f32) per slice hide the add latency; 32 terms per lane in
    // the element type, then f64: accurate to ~1e-7 and still vectorised.
    const BLOCK: usize = 1024;
    const L: usize = 32;
    let n = xs.iter().map(|x| x.len()).min().unwrap_or(0);
    with_best_isa(
        #[inline(always)]
        || {
            let mut total = [0.0f64; N];
            for start in (0..n).step_by(BLOCK) {
                let end = (start + BLOCK).min(n);
                for (x, tot) in xs.iter().zip(total.iter_mut()) {
                    let b = &x[start..end];
                    let mut lanes = [F::ZERO; L];
                    let chunks = b.chunks_exact(L);
                    let rest = chunks.remainder();
                    for c in chunks {
                        // A fixed-size view lets the compiler drop bounds checks and vectorise.
                        let c: &[F; L] = c.try_into().expect("chunks_exact yields L elements");
                        for i in 0..L {
                            lanes[i] += c[i] * c[i];
                        }
                    }
                    *tot += lanes.iter().map(|v| v.to_f64()).sum::<f64>()
                        + rest.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>();
                }
            }
            total
        },
    )
}

/// The ratio for one unit from its weight and gradient norms.
pub fn ratio(mode: Mode, w_norm: f64, g_norm: f64) -> f64 {
    match mode {
        Mode::Lars {
            eta,
            weight_decay,
            eps,
            clip,
        } => {
            if w_norm == 0.0 || g_norm == 0.0 {
                1.0
            } else {
                let r = eta * w_norm / (g_norm + weight_decay * w_norm + eps);
                match clip {
                    Some((lo, hi)) => r.clamp(lo, hi),
                    None => r,
                }
            }
        }
        Mode::Bidirectional {
            target,
            lo,
            hi,
            eps,
        } => {
            if g_norm < 1e-6 {
                1.0
            } else {
                (target / (g_norm + eps)).sqrt().clamp(lo, hi)
            }
        }
    }
}

/// Scales gradients in place. `weights[i]`/`grads[i]` belong to unit `unit[i]` (a tensor, or a
/// group of tensors sharing one ratio). Returns the ratio of every unit; on a non-finite gradient
/// norm returns an error naming the unit (`"unit {u}"`) and leaves every gradient untouched.
pub fn scale_grads<F: Real>(
    weights: &[&[F]],
    grads: &mut [&mut [F]],
    unit: &[usize],
    n_units: usize,
    mode: Mode,
) -> KResult<Vec<f64>> {
    if weights.len() != grads.len() || unit.len() != grads.len() {
        return value_err("params: weights, grads and units must have the same length");
    }
    for (i, (w, g)) in weights.iter().zip(grads.iter()).enumerate() {
        if w.len() != g.len() {
            return value_err(format!(
                "params[{i}]: gradient has {} elements, weight has {}",
                g.len(),
                w.len()
            ));
        }
        if unit[i] >= n_units {
            return value_err(format!("params[{i}]: unit {} out of range", unit[i]));
        }
    }
    let needs_w = matches!(mode, Mode::Lars { .. });
    let threads = team_size();
    // Phase 1: squared norms per piece, summed per tensor and unit in piece order.
    let mut sq = Vec::new();
    {
        let pieces: Vec<(usize, &[F], &[F])> = weights
            .iter()
            .zip(grads.iter())
            .enumerate()
            .flat_map(|(i, (w, g))| {
                w.chunks(PIECE)
                    .zip(g.chunks(PIECE))
                    .map(move |(w, g)| (i, w, g))
            })
            .collect();
        sq.resize(pieces.len(), (0usize, 0.0f64, 0.0f64));
        let parts: Vec<_> = sq.iter_mut().zip(pieces).collect();
        for_each_part(threads, parts, |_, (out, (i, w, g))| {
            *out = if needs_w {
                let [ws, gs] = sum_squares_of([w, g]);
                (i, ws, gs)
            } else {
                (i, 0.0, sum_squares(g))
            };
        });
    }
    let mut unit_sq = vec![(0.0f64, 0.0f64); n_units];
    for &(i, ws, gs) in &sq {
        unit_sq[unit[i]].0 += ws;
        unit_sq[unit[i]].1 += gs;
    }
    let mut ratios = Vec::with_capacity(n_units);
    for (u, &(ws, gs)) in unit_sq.iter().enumerate() {
        let (wn, gn) = (ws.sqrt(), gs.sqrt());
        if !gn.is_finite() {
            return Err(KernelError::NonFinite { unit: u, norm: gn });
        }
        ratios.push(ratio(mode, wn, gn));
    }
    // Phase 2: scale in place, last piece first (still in cache from phase 1).
    let wd = match mode {
        Mode::Lars { weight_decay, .. } => weight_decay,
        Mode::Bidirectional { .. } => 0.0,
    };
    let wd_f = F::from_f64(wd);
    let mut pieces: Vec<(F, &mut [F], &[F])> = grads
        .iter_mut()
        .zip(weights.iter())
        .zip(unit)
        .flat_map(|((g, w), &u)| {
            let r = F::from_f64(ratios[u]);
            g.chunks_mut(PIECE)
                .zip(w.chunks(PIECE))
                .map(move |(g, w)| (r, g, w))
        })
        .collect();
    pieces.reverse();
    for_each_part(threads, pieces, |_, (r, g, w)| {
        with_best_isa(
            #[inline(always)]
            || {
                if wd != 0.0 {
                    for (gv, &wv) in g.iter_mut().zip(w) {
                        *gv = (*gv + wd_f * wv) * r;
                    }
                } else {
                    for gv in g.iter_mut() {
                        *gv = *gv * r;
                    }
                }
            },
        )
    });
    Ok(ratios)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LARS: Mode = Mode::Lars {
        eta: 0.5,
        weight_decay: 0.0,
        eps: 0.0,
        clip: None,
    };

    #[test]
    fn lars_ratio_formula_and_zero_norms() {
        assert_eq!(ratio(LARS, 2.0, 4.0), 0.25);
        assert_eq!(ratio(LARS, 0.0, 4.0), 1.0);
        assert_eq!(ratio(LARS, 2.0, 0.0), 1.0);
        let clipped = Mode::Lars {
            eta: 0.5,
            weight_decay: 0.0,
            eps: 0.0,
            clip: Some((0.5, 2.0)),
        };
        assert_eq!(ratio(clipped, 2.0, 4.0), 0.5);
    }

    #[test]
    fn bidirectional_pulls_toward_target() {
        let m = Mode::Bidirectional {
            target: 3.0,
            lo: 0.3,
            hi: 3.0,
            eps: 0.0,
        };
        assert!((ratio(m, 0.0, 0.75) - 2.0).abs() < 1e-12);
        assert_eq!(ratio(m, 0.0, 1e-7), 1.0);
        assert_eq!(ratio(m, 0.0, 1e6), 0.3);
    }

    #[test]
    fn scales_in_place_and_refuses_non_finite() {
        let w = vec![3.0f32, 4.0];
        let mut g = vec![0.0f32, 10.0];
        let ratios = scale_grads(&[&w], &mut [&mut g], &[0], 1, LARS).unwrap();
        assert_eq!(ratios, vec![0.25]);
        assert_eq!(g, vec![0.0, 2.5]);
        let mut bad = vec![1.0f32, f32::NAN];
        let mut good = vec![1.0f32, 1.0];
        let err = scale_grads(&[&w, &w], &mut [&mut good, &mut bad], &[0, 1], 2, LARS);
        assert!(err.is_err());
        assert_eq!(good, vec![1.0, 1.0]);
    }

    #[test]
    fn large_sums_match_naive() {
        let x: Vec<f32> = (0..100_003).map(|i| ((i % 97) as f32) * 0.01).collect();
        let naive: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        assert!((sum_squares(&x) - naive).abs() / naive < 1e-6);
    }
}
