//! Layer-wise gradient scaling: LARS (You et al. 2017) and "bidirectional" scaling toward a target
//! gradient norm. One native call handles every tensor: squared norms for all of them first (so a
//! non-finite gradient is reported before anything is modified), then the in-place scaling.
//!
//! Both passes run in one parallel region on the calling thread's team (`omp_team`) over fixed
//! pieces of at most `PIECE` elements, so the norms do not depend on the thread count; in the
//! second pass each thread first scales the pieces it read in the first, last first, so that its
//! first pieces are the ones still in its own cache.

use crate::error::{value_err, KResult, KernelError};
use crate::isa::with_best_isa;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::omp_team::for_each_task;
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

/// One piece of one tensor: its gradient (scaled in place) and weight, taken by exactly one
/// task in the scaling pass.
struct Piece<'a, F> {
    g: &'a mut [F],
    w: &'a [F],
}

/// Ratios of every unit from the per-piece squared norms (summed in piece order, so the result
/// does not depend on the thread count); an error names the first unit whose gradient norm is
/// not finite.
fn unit_ratios(
    piece_sums: impl Iterator<Item = (usize, f64, f64)>,
    unit: &[usize],
    n_units: usize,
    mode: Mode,
) -> KResult<Vec<f64>> {
    let mut unit_sq = vec![(0.0f64, 0.0f64); n_units];
    for (i, ws, gs) in piece_sums {
        unit_sq[unit[i]].0 += ws;
        unit_sq[unit[i]].1 += gs;
    }
    unit_sq
        .iter()
        .enumerate()
        .map(|(u, &(ws, gs))| {
            let (wn, gn) = (ws.sqrt(), gs.sqrt());
            if !gn.is_finite() {
                return Err(KernelError::NonFinite { unit: u, norm: gn });
            }
            Ok(ratio(mode, wn, gn))
        })
        .collect()
}

/// State shared by the workers of [`scale_grads`]' one parallel region.
struct Region<'a, F> {
    pieces: Vec<Mutex<Option<Piece<'a, F>>>>,
    /// The tensor each piece belongs to.
    tensor: Vec<usize>,
    /// Squared norms (weight, gradient) of each piece, as f64 bits.
    sums: Vec<[AtomicU64; 2]>,
    /// The worker that took each piece in the norm pass.
    owner: Vec<AtomicUsize>,
    next: AtomicUsize,
    done: AtomicUsize,
    ratios: OnceLock<KResult<Vec<f64>>>,
    /// Set when a worker panicked: the others stop waiting (the region re-raises the panic).
    abandoned: AtomicBool,
}

/// Marks the region abandoned if the worker holding it unwinds.
struct AbandonOnPanic<'r>(&'r AtomicBool);

impl Drop for AbandonOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Release);
        }
    }
}

/// Scales gradients in place. `weights[i]`/`grads[i]` belong to unit `unit[i]` (a tensor, or a
/// group of tensors sharing one ratio). Returns the ratio of every unit; on a non-finite gradient
/// norm returns an error naming the unit (`"unit {u}"`) and leaves every gradient untouched.
///
/// One parallel region on the calling thread's team: each worker takes pieces for the norm pass;
/// the worker finishing the last piece computes the ratios; then each worker scales the pieces
/// it read itself, last first (they are still in its own cache), before helping with the rest.
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
    let wd = match mode {
        Mode::Lars { weight_decay, .. } => weight_decay,
        Mode::Bidirectional { .. } => 0.0,
    };
    let (tensor, pieces): (Vec<usize>, Vec<_>) = grads
        .iter_mut()
        .zip(weights.iter())
        .enumerate()
        .flat_map(|(t, (g, w))| {
            g.chunks_mut(PIECE)
                .zip(w.chunks(PIECE))
                .map(move |(g, w)| (t, Mutex::new(Some(Piece { g, w }))))
        })
        .unzip();
    let n = pieces.len();
    if n == 0 {
        return unit_ratios(std::iter::empty(), unit, n_units, mode);
    }
    let region = Region {
        sums: (0..n)
            .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
            .collect(),
        owner: (0..n).map(|_| AtomicUsize::new(usize::MAX)).collect(),
        pieces,
        tensor,
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        ratios: OnceLock::new(),
        abandoned: AtomicBool::new(false),
    };
    let workers = team_size().min(n);
    for_each_task(workers, workers, &|me| {
        let _guard = AbandonOnPanic(&region.abandoned);
        norm_pass(&region, me, needs_w, unit, n_units, mode);
        while region.ratios.get().is_none() {
            if region.abandoned.load(Ordering::Acquire) {
                return;
            }
            std::hint::spin_loop();
            std::thread::yield_now();
        }
        if let Some(Ok(ratios)) = region.ratios.get() {
            scale_pass(&region, me, ratios, unit, wd);
        }
    });
    region
        .ratios
        .into_inner()
        .expect("the region computes the ratios before it returns")
}

/// The norm pass of one worker: pieces in order, as they come; the worker that finishes the
/// last one computes the ratios.
fn norm_pass<F: Real>(
    region: &Region<'_, F>,
    me: usize,
    needs_w: bool,
    unit: &[usize],
    n_units: usize,
    mode: Mode,
) {
    let n = region.pieces.len();
    loop {
        let i = region.next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            return;
        }
        {
            let slot = region.pieces[i].lock().unwrap_or_else(|e| e.into_inner());
            let p = slot
                .as_ref()
                .expect("no piece is scaled before every norm is known");
            let (ws, gs) = if needs_w {
                let [ws, gs] = sum_squares_of([p.w, &*p.g]);
                (ws, gs)
            } else {
                (0.0, sum_squares(&*p.g))
            };
            region.sums[i][0].store(ws.to_bits(), Ordering::Relaxed);
            region.sums[i][1].store(gs.to_bits(), Ordering::Relaxed);
            region.owner[i].store(me, Ordering::Relaxed);
        }
        // AcqRel: the last worker sees every piece's sums.
        if region.done.fetch_add(1, Ordering::AcqRel) + 1 == n {
            let sums = region.tensor.iter().zip(&region.sums).map(|(&t, s)| {
                let [ws, gs] = s
                    .each_ref()
                    .map(|v| f64::from_bits(v.load(Ordering::Relaxed)));
                (t, ws, gs)
            });
            // OnceLock::set publishes the ratios to the waiting workers (release/acquire).
            let _ = region.ratios.set(unit_ratios(sums, unit, n_units, mode));
            return;
        }
    }
}

/// The scaling pass of one worker: its own pieces last first, then any piece still untaken.
fn scale_pass<F: Real>(region: &Region<'_, F>, me: usize, ratios: &[f64], unit: &[usize], wd: f64) {
    let n = region.pieces.len();
    let own = (0..n)
        .rev()
        .filter(|&i| region.owner[i].load(Ordering::Relaxed) == me);
    for i in own.chain((0..n).rev()) {
        let taken = region.pieces[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(Piece { g, w }) = taken {
            scale_piece(g, w, F::from_f64(ratios[unit[region.tensor[i]]]), wd);
        }
    }
}

/// `g <- (g + wd*w) * r` (or `g*r` without weight decay), vectorised.
fn scale_piece<F: Real>(g: &mut [F], w: &[F], r: F, wd: f64) {
    let wd_f = F::from_f64(wd);
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

    /// Many pieces over a team: the same ratios and gradients as one thread, bit for bit, in
    /// both modes and for grouped units; a non-finite gradient found on a team leaves every
    /// gradient untouched; empty tensors are fine.
    #[test]
    fn a_team_gives_the_one_thread_result() {
        use crate::threads::with_team;
        let sizes = [3 * PIECE + 17, 5, 0, PIECE, 2 * PIECE - 1];
        let make = |seed: usize| -> Vec<Vec<f32>> {
            sizes
                .iter()
                .enumerate()
                .map(|(t, &n)| {
                    (0..n)
                        .map(|j| (((j * 31 + t * 7 + seed) % 101) as f32 - 50.0) * 0.01)
                        .collect()
                })
                .collect()
        };
        let ws = make(1);
        let modes = [
            Mode::Lars {
                eta: 0.02,
                weight_decay: 0.01,
                eps: 1e-8,
                clip: None,
            },
            Mode::Bidirectional {
                target: 3.0,
                lo: 0.3,
                hi: 3.0,
                eps: 1e-8,
            },
        ];
        for mode in modes {
            for (unit, n_units) in [(vec![0, 1, 2, 3, 4], 5), (vec![0, 0, 1, 1, 1], 2)] {
                let run = |threads: usize, bad: Option<usize>| {
                    let mut gs = make(2);
                    if let Some(t) = bad {
                        let last = gs[t].len() - 1;
                        gs[t][last] = f32::INFINITY;
                    }
                    let wr: Vec<&[f32]> = ws.iter().map(|w| w.as_slice()).collect();
                    let mut gr: Vec<&mut [f32]> = gs.iter_mut().map(|g| g.as_mut_slice()).collect();
                    let out = with_team(threads, usize::MAX, || {
                        scale_grads(&wr, &mut gr, &unit, n_units, mode)
                    });
                    (out.map_err(|e| format!("{e:?}")), gs)
                };
                let (r1, g1) = run(1, None);
                for threads in [2, 4, 7] {
                    let (r, g) = run(threads, None);
                    assert_eq!((&r, &g), (&r1, &g1), "{threads} threads");
                    let (err, g) = run(threads, Some(4));
                    assert!(err.is_err());
                    let mut untouched = make(2);
                    untouched[4][2 * PIECE - 2] = f32::INFINITY;
                    assert_eq!(g, untouched);
                }
            }
        }
        let none: [&[f32]; 0] = [];
        assert_eq!(
            scale_grads(&none, &mut [], &[], 0, modes[0]).unwrap(),
            Vec::<f64>::new()
        );
    }
}
