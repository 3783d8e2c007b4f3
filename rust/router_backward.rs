//! The backward of a whole router in one call: from the gradients of its weights (and, when
//! they were used elsewhere, of its probabilities and logits) and of its balance loss, through
//! the routing weights, the softmax, the temperature and the linear layer `logits = x Wr^T / τ`,
//! into `dx` (added to what is there) and `dWr`.
//!
//! Why: in the MoE layer's one-node path this runs right after the routed experts' backward.
//! As torch ops plus the separate kernels it was about ten calls of a few microseconds of work
//! each, every one paying Python and thread-team costs, with caches cold from the experts'
//! backward; here it is one call.
//!
//! Per row: `dp = route_weights_backward(g_w) + g_p + c * share` (the balance loss's gradient,
//! `c = g_loss * E / T`), `dl = (softmax_backward(dp) + g_l) / τ`; then `dx += dl Wr` and
//! `dWr = dl^T x` (summed over row blocks in order, so the result does not depend on how the
//! blocks were spread over threads).

use crate::dispatch::weight_grads_from_dots;
use crate::error::{check_len, value_err, KResult};
use crate::expert_mlp::{matmul, AfterRows, MlpReal, MlpShape, Strides};
use crate::isa::with_best_isa;
use crate::omp_team::{try_for_each_index, IndexTask, TaskParts};
use crate::route_weights::route_weights_backward;
use crate::routed_experts::sum_rows_of_tokens;
use crate::router_forward::router_blocks;
use crate::softmax::softmax_backward_rows;
use crate::threads::{full_team, split_mut, with_team};

/// The gradient of a router's weights `[T, K]`.
#[derive(Clone, Copy)]
pub enum SlotGrads<'a, T> {
    /// Given.
    Given(&'a [T]),
    /// From the routed experts' backward (the MoE layer's): slot `s` gets the combine's dot
    /// product of its row, `dots[slot_row[s]]` (0 for an empty or dropped slot), plus `extra[s]`
    /// (the weights' gradient from outside the layer), each block computing its own slots in
    /// its task: done serially, the reads of rows other threads just wrote cost 20-50 us at 16
    /// threads (`benches.region_timeline`).
    FromRows {
        /// `[R]` the rows' dot products.
        dots: &'a [T],
        /// `[T, K]` the plan's row of each slot, -1 if none.
        slot_row: &'a [i64],
        /// `[T, K]` gradient from outside the layer, if any.
        extra: Option<&'a [T]>,
    },
}

/// The incoming gradients of a router's outputs.
#[derive(Clone, Copy)]
pub struct RouterGrads<'a, T> {
    /// `[T, K]` gradient of the routing weights.
    pub weights: SlotGrads<'a, T>,
    /// `[T, E]` gradient of the probabilities, when they were used outside the router.
    pub probs: Option<&'a [T]>,
    /// `[T, E]` gradient of the logits (after temperature), when they were used outside.
    pub logits: Option<&'a [T]>,
    /// The balance loss's gradient and the experts' shares `[E]` of the forward, if any.
    pub balance: Option<(T, &'a [T])>,
}

/// What the router's forward saw and produced.
pub struct RouterSaved<'a, T> {
    /// `[T, d]` router input.
    pub x: &'a [T],
    /// `[E, d]` router weight.
    pub weight: &'a [T],
    /// `[T, E]` probabilities.
    pub probs: &'a [T],
    /// `[T, K]` selected experts (-1 = empty slot).
    pub idx: &'a [i64],
    /// Whether the weights were renormalised.
    pub renormalize: bool,
    /// The softmax temperature τ.
    pub temperature: T,
}

/// Adds the router's gradient of `x` to `dx [T, d]` and writes `dweight [E, d]` (module docs).
#[allow(clippy::too_many_arguments)]
pub fn router_backward<'a, T: MlpReal>(
    s: &RouterSaved<'a, T>,
    t: usize,
    e: usize,
    k: usize,
    d: usize,
    g: &RouterGrads<'a, T>,
    dx: &mut [T],
    dweight: &mut [T],
) -> KResult<()> {
    router_backward_filling(s, t, e, k, d, g, None, dx, dweight)
}

/// Fills one block of `dx`: `(first row, rows [m, d])`, before the router adds to it.
pub type FillRows<'f, T> = &'f (dyn Fn(usize, &mut [T]) -> KResult<()> + Sync);

/// [`router_backward`] whose `dx` rows are first filled block by block by `fill` (when given),
/// inside the same parallel region and task as the router's work on those rows: for a layer
/// whose `dx` starts as another kernel's per-row result (the routed experts' gather backward),
/// one fork/join fewer, and each block of `dx` is still in cache when the router adds to it.
#[allow(clippy::too_many_arguments)]
pub fn router_backward_filling<'a, T: MlpReal>(
    s: &RouterSaved<'a, T>,
    t: usize,
    e: usize,
    k: usize,
    d: usize,
    g: &RouterGrads<'a, T>,
    fill: Option<FillRows<'_, T>>,
    dx: &mut [T],
    dweight: &mut [T],
) -> KResult<()> {
    check_len("dweight", dweight.len(), e * d)?;
    let mut blocks = RouterBlocks::new(t, e, d);
    let team = blocks.team;
    blocks.run_with(s, k, *g, fill, dx, &mut |n, task| {
        try_for_each_index(team, n, task)
    })?;
    blocks.finish(dweight)
}

/// The router's backward as one task per block of rows, for a parallel region of the caller's
/// ([`router_backward_filling`] runs them in one of their own; the MoE layer's backward runs them
/// with the experts' weight gradients, [`RouterAfterExperts`]). Each block takes every step on
/// one thread and writes its part of `dWr`; [`RouterBlocks::finish`] sums the parts in block
/// order, so the result does not depend on where the tasks ran.
pub struct RouterBlocks<T> {
    t: usize,
    e: usize,
    d: usize,
    /// The router's team (sized like its forward) and its blocks: `rows` rows each.
    team: usize,
    rows: usize,
    blocks: usize,
    /// `[blocks, E, d]` each block's part of `dWr`.
    partial: Vec<T>,
}

impl<T: MlpReal> RouterBlocks<T> {
    /// The blocks of `t` rows for a router of `e` experts over `d` features, on the team asked
    /// for by the enclosing `with_team`.
    pub fn new(t: usize, e: usize, d: usize) -> Self {
        let (team, rows, blocks) = router_blocks(full_team(), t, e, d);
        Self {
            t,
            e,
            d,
            team,
            rows,
            blocks,
            partial: vec![T::ZERO; blocks * e * d],
        }
    }

    /// Checks the arguments, then calls `run(n, task)` once with the blocks' tasks: task `b`
    /// fills block `b`'s rows of `dx [T, d]` with `fill` (when given), then adds the router's
    /// gradient of `x` to them and writes the block's part of `dWr`.
    #[allow(clippy::too_many_arguments)]
    pub fn run_with<F>(
        &mut self,
        s: &RouterSaved<'_, T>,
        k: usize,
        g: RouterGrads<'_, T>,
        fill: Option<F>,
        dx: &mut [T],
        run: &mut dyn FnMut(usize, IndexTask<'_>) -> KResult<()>,
    ) -> KResult<()>
    where
        F: Fn(usize, &mut [T]) -> KResult<()> + Sync,
    {
        let (t, e, d, rows, blocks) = (self.t, self.e, self.d, self.rows, self.blocks);
        check_len("x", s.x.len(), t * d)?;
        check_len("router_weight", s.weight.len(), e * d)?;
        check_len("dx", dx.len(), t * d)?;
        for (name, grad) in [("grad_probs", g.probs), ("grad_logits", g.logits)] {
            if let Some(v) = grad {
                check_len(name, v.len(), t * e)?;
            }
        }
        if let Some((_, share)) = g.balance {
            check_len("share", share.len(), e)?;
        }
        match g.weights {
            SlotGrads::Given(w) => check_len("grad_weights", w.len(), t * k)?,
            SlotGrads::FromRows {
                slot_row, extra, ..
            } => {
                check_len("plan.slot_row", slot_row.len(), t * k)?;
                if let Some(extra) = extra {
                    check_len("grad_weights", extra.len(), t * k)?;
                }
            }
        }
        check_len("probs", s.probs.len(), t * e)?;
        check_len("idx", s.idx.len(), t * k)?;
        let coef = g
            .balance
            .map(|(c, share)| (c * T::from_f64(e as f64 / t.max(1) as f64), share));
        // Each block's rows of dx and its part of dWr, taken by its task.
        let parts = TaskParts::new(split_mut(dx, blocks, rows * d).into_iter().zip(split_mut(
            &mut self.partial,
            blocks,
            e * d,
        )));
        let block = |b: usize| -> KResult<()> {
            let (dx, part) = parts.take(b);
            let (first, m) = (b * rows, rows.min(t.saturating_sub(b * rows)));
            let (lo, hi) = (first.min(t), first.min(t) + m);
            let (x, probs, idx) = (
                &s.x[lo * d..hi * d],
                &s.probs[lo * e..hi * e],
                &s.idx[lo * k..hi * k],
            );
            // (a kernel called inside a task runs inline)
            with_team(1, 0, || -> KResult<()> {
                if let Some(fill) = &fill {
                    fill(first, &mut dx[..m * d])?;
                }
                let from_rows;
                let gw = match g.weights {
                    SlotGrads::Given(w) => &w[lo * k..hi * k],
                    SlotGrads::FromRows {
                        dots,
                        slot_row,
                        extra,
                    } => {
                        let mut gw = vec![T::ZERO; m * k];
                        weight_grads_from_dots(dots, &slot_row[lo * k..hi * k], &mut gw)?;
                        if let Some(extra) = extra {
                            for (v, &u) in gw.iter_mut().zip(&extra[lo * k..hi * k]) {
                                *v += u;
                            }
                        }
                        from_rows = gw;
                        &from_rows[..]
                    }
                };
                let mut dp = vec![T::ZERO; m * e];
                route_weights_backward(gw, probs, m, e, idx, k, s.renormalize, &mut dp)?;
                let (gp, gl) = (
                    g.probs.map(|v| &v[lo * e..hi * e]),
                    g.logits.map(|v| &v[lo * e..hi * e]),
                );
                if gp.is_some() || coef.is_some() {
                    for (r, row) in dp.chunks_exact_mut(e.max(1)).enumerate() {
                        if let Some(gp) = gp {
                            for (v, &u) in row.iter_mut().zip(&gp[r * e..(r + 1) * e]) {
                                *v += u;
                            }
                        }
                        if let Some((c, share)) = coef {
                            for (v, &f) in row.iter_mut().zip(share) {
                                *v += c * f;
                            }
                        }
                    }
                }
                let mut dl = vec![T::ZERO; m * e];
                softmax_backward_rows(&dp, probs, m, e, &mut dl)?;
                let inv_t = T::ONE / s.temperature;
                if gl.is_some() || s.temperature != T::ONE {
                    for (i, v) in dl.iter_mut().enumerate() {
                        let extra = gl.map_or(T::ZERO, |gl| gl[i]);
                        *v = (*v + extra) * inv_t;
                    }
                }
                linear_backward_rows(&dl, x, s.weight, m, e, d, dx, part);
                Ok(())
            })
        };
        run(blocks, &block)
    }

    /// `dweight [E, d]` = the blocks' parts summed in block order (after their tasks ran).
    pub fn finish(&self, dweight: &mut [T]) -> KResult<()> {
        let size = self.e * self.d;
        check_len("dweight", dweight.len(), size)?;
        dweight.fill(T::ZERO);
        for part in self.partial.chunks_exact(size.max(1)) {
            for (v, &u) in dweight.iter_mut().zip(part) {
                *v += u;
            }
        }
        Ok(())
    }
}

/// The router's backward as the routed experts' after-work ([`AfterRows`]): in the MoE layer's
/// backward its blocks run in the experts' weight-gradient region. Each block first sums its
/// tokens' rows of `grad_xs` into `dx` (the gather's backward) and makes its slots' weights
/// gradient from the combine's dot products ([`SlotGrads::FromRows`]), then adds the router's
/// part to `dx`. [`RouterBlocks::finish`] on `blocks` writes `dWr` after.
pub struct RouterAfterExperts<'x, T> {
    /// The router's blocks (their parts of `dWr`).
    pub blocks: RouterBlocks<T>,
    /// What the router's forward saw and produced.
    pub saved: &'x RouterSaved<'x, T>,
    /// The other incoming gradients (`weights` is replaced by the one from the experts).
    pub grads: RouterGrads<'x, T>,
    /// `[T, K]` the routing weights' gradient from outside the layer.
    pub grad_weights: Option<&'x [T]>,
    /// The experts' shape.
    pub shape: &'x MlpShape,
    /// The plan's `[T, K]` row of each slot.
    pub slot_row: &'x [i64],
    /// Slots per token.
    pub k: usize,
    /// `[T, d]` written by the blocks.
    pub dx: &'x mut [T],
}

impl<T: MlpReal> AfterRows<T> for RouterAfterExperts<'_, T> {
    fn run_with(
        &mut self,
        grad_xs: &[T],
        dots: Option<&[T]>,
        run: &mut dyn FnMut(usize, IndexTask<'_>) -> KResult<()>,
    ) -> KResult<()> {
        let Some(dots) = dots else {
            return value_err("the router's backward needs the combine's dot products");
        };
        let grads = RouterGrads {
            weights: SlotGrads::FromRows {
                dots,
                slot_row: self.slot_row,
                extra: self.grad_weights,
            },
            ..self.grads
        };
        let (shape, slot_row, k) = (self.shape, self.slot_row, self.k);
        let fill = |first: usize, rows: &mut [T]| {
            sum_rows_of_tokens(shape, grad_xs, slot_row, k, first, rows)
        };
        let saved = self.saved;
        self.blocks
            .run_with(saved, k, grads, Some(fill), &mut *self.dx, run)
    }
}

/// For the rows `dl [m, E]` of `x [m, d]`: `dx [m, d] += dl Wr` and `part [E, d] = dl^T x`.
#[allow(clippy::too_many_arguments)]
fn linear_backward_rows<T: MlpReal>(
    dl: &[T],
    x: &[T],
    weight: &[T],
    m: usize,
    e: usize,
    d: usize,
    dx: &mut [T],
    part: &mut [T],
) {
    if m == 0 || e == 0 || d == 0 {
        part.fill(T::ZERO);
        return;
    }
    // dx rows += dl row · Wr: E scaled rows of Wr added in place (no temporary: a product buffer
    // of this size would be a fresh allocation, and its page faults, every call).
    with_best_isa(
        #[inline(always)]
        || {
            for (dx, dl) in dx.chunks_exact_mut(d).zip(dl.chunks_exact(e)) {
                for (&c, w) in dl.iter().zip(weight.chunks_exact(d)) {
                    for (v, &u) in dx.iter_mut().zip(w) {
                        *v += c * u;
                    }
                }
            }
        },
    );
    matmul(
        e,
        d,
        m,
        part,
        d,
        dl,
        Strides::transposed(e),
        x,
        Strides::row_major(d),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route_weights::route_weights;
    use crate::router_forward::router_team;
    use crate::testing::values;

    /// Loss = sum(gw * w) + sum(gp * p) + sum(gl * l) + gb * balance, by finite differences on
    /// x and Wr (f64), against the analytic kernel.
    #[test]
    fn matches_finite_differences() {
        let (t, e, k, d) = (5usize, 4usize, 2usize, 3usize);
        let x = values(t * d, 1);
        let w = values(e * d, 2);
        let (gw, gp, gl) = (values(t * k, 3), values(t * e, 4), values(t * e, 5));
        let (gb, temp) = (0.7, 0.5);
        let idx: Vec<i64> = vec![0, 2, 1, -1, 3, 0, 2, 2, 1, 3];
        // (logits, probs) of the router by hand
        let route = |x: &[f64], w: &[f64]| -> (Vec<f64>, Vec<f64>) {
            let (mut logits, mut probs) = (vec![0.0; t * e], vec![0.0; t * e]);
            for r in 0..t {
                let l = &mut logits[r * e..(r + 1) * e];
                for (j, v) in l.iter_mut().enumerate() {
                    *v = (0..d).map(|c| x[r * d + c] * w[j * d + c]).sum::<f64>() / temp;
                }
                let m = l.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = l.iter().map(|v| (v - m).exp()).sum();
                for j in 0..e {
                    probs[r * e + j] = (l[j] - m).exp() / z;
                }
            }
            (logits, probs)
        };
        let forward = |x: &[f64], w: &[f64]| -> f64 {
            let (logits, probs) = route(x, w);
            let mut loss = 0.0;
            for i in 0..t * e {
                loss += gp[i] * probs[i] + gl[i] * logits[i];
            }
            let mut wts = vec![0.0; t * k];
            route_weights(&probs, t, e, &idx, k, true, &mut wts).unwrap();
            loss += wts.iter().zip(&gw).map(|(a, b)| a * b).sum::<f64>();
            // balance with the (fixed) slot shares
            let mut counts = vec![0.0; e];
            idx.iter()
                .filter(|&&i| i >= 0)
                .for_each(|&i| counts[i as usize] += 1.0);
            let total: f64 = counts.iter().sum();
            for j in 0..e {
                let p_mean: f64 = (0..t).map(|r| probs[r * e + j]).sum::<f64>() / t as f64;
                loss += gb * e as f64 * counts[j] / total * p_mean;
            }
            loss
        };
        // the forward's probabilities and shares
        let probs = route(&x, &w).1;
        let share = [2.0 / 9.0, 2.0 / 9.0, 3.0 / 9.0, 2.0 / 9.0];
        let saved = RouterSaved {
            x: &x,
            weight: &w,
            probs: &probs,
            idx: &idx,
            renormalize: true,
            temperature: temp,
        };
        let grads = RouterGrads {
            weights: SlotGrads::Given(&gw),
            probs: Some(&gp),
            logits: Some(&gl),
            balance: Some((gb, &share[..])),
        };
        let mut dx = vec![1.0; t * d]; // accumulated into
        let mut dw = vec![9.0; e * d]; // overwritten
        router_backward(&saved, t, e, k, d, &grads, &mut dx, &mut dw).unwrap();
        let h = 1e-6;
        for i in 0..t * d {
            let (mut a, mut b) = (x.clone(), x.clone());
            a[i] += h;
            b[i] -= h;
            let num = (forward(&a, &w) - forward(&b, &w)) / (2.0 * h);
            assert!(
                (dx[i] - 1.0 - num).abs() < 1e-6,
                "dx[{i}]: {} vs {num}",
                dx[i] - 1.0
            );
        }
        for i in 0..e * d {
            let (mut a, mut b) = (w.clone(), w.clone());
            a[i] += h;
            b[i] -= h;
            let num = (forward(&x, &a) - forward(&x, &b)) / (2.0 * h);
            assert!((dw[i] - num).abs() < 1e-6, "dw[{i}]: {} vs {num}", dw[i]);
        }
    }

    #[test]
    fn empty_and_bad_inputs() {
        let saved = RouterSaved::<f32> {
            x: &[],
            weight: &[0.0; 6],
            probs: &[],
            idx: &[],
            renormalize: true,
            temperature: 1.0,
        };
        let grads = RouterGrads {
            weights: SlotGrads::Given(&[]),
            probs: None,
            logits: None,
            balance: None,
        };
        let mut dw = [5.0f32; 6];
        router_backward(&saved, 0, 2, 1, 3, &grads, &mut [], &mut dw).unwrap();
        assert_eq!(dw, [0.0; 6]);
        let saved = RouterSaved::<f32> {
            x: &[0.0; 3],
            weight: &[0.0; 6],
            probs: &[0.5, 0.5],
            idx: &[2],
            renormalize: true,
            temperature: 1.0,
        };
        let grads = RouterGrads {
            weights: SlotGrads::Given(&[1.0]),
            probs: None,
            logits: None,
            balance: None,
        };
        assert!(router_backward(&saved, 1, 2, 1, 3, &grads, &mut [0.0; 3], &mut dw).is_err()); // expert 2 of 2
        assert!(router_backward(&saved, 1, 2, 1, 3, &grads, &mut [0.0; 2], &mut dw).is_err());
        // dx size
    }

    /// The router's blocks run in the experts' weight-gradient region (the MoE layer's backward)
    /// give what the experts' backward followed by the router's own region gives, bit for bit,
    /// on one thread and on a team, with and without gradients from outside the layer.
    #[test]
    fn router_after_experts_equals_router_after_the_experts_region() {
        use crate::expert_mlp::Activation;
        use crate::routed_experts::{routed_experts_backward_rows, GradYs, PlanView, WeightGrads};
        let (t, e, k, d, f) = (301usize, 4usize, 2usize, 6usize, 5usize);
        let idx: Vec<i64> = (0..t * k).map(|i| ((i * 7 + i / k) % e) as i64).collect();
        let plan = crate::dispatch::dispatch_plan(&idx, t, k, e, Some(140)).unwrap();
        let r = plan.row_token.len();
        let s = MlpShape {
            r,
            d,
            e,
            f,
            act: Activation::SwiGlu,
        };
        let h1 = s.act.h1(f);
        let (xs, h, ys) = (values(r * d, 1), values(r * h1, 2), values(r * d, 3));
        let (w1, w2) = (values(e * h1 * d, 4), values(e * d * f, 5));
        let (grad, weights) = (values(t * d, 6), values(t * k, 7));
        let (x, wr) = (values(t * d, 8), values(e * d, 9));
        let probs: Vec<f64> = values(t * e, 10).iter().map(|v| v.abs() + 0.01).collect();
        let (gp, extra) = (values(t * e, 11), values(t * k, 12));
        let share = vec![1.0 / e as f64; e];
        let saved = RouterSaved {
            x: &x,
            weight: &wr,
            probs: &probs,
            idx: &idx,
            renormalize: true,
            temperature: 0.7,
        };
        let view = PlanView::from(&plan);
        for threads in [1, 4] {
            for outside in [false, true] {
                let grads = RouterGrads {
                    weights: SlotGrads::Given(&[]),
                    probs: outside.then_some(&gp[..]),
                    logits: None,
                    balance: Some((0.3, &share[..])),
                };
                let extra = outside.then_some(&extra[..]);
                let run = |fused: bool| {
                    let (mut gys, mut gxs) = (vec![0.0; r * d], vec![0.0; r * d]);
                    let (mut dw, mut dw1, mut dw2) =
                        (vec![0.0; t * k], vec![0.0; w1.len()], vec![0.0; w2.len()]);
                    let (mut dx, mut dwr) = (vec![f64::NAN; t * d], vec![0.0; e * d]);
                    with_team(threads, usize::MAX, || {
                        let target = GradYs::Scratch {
                            ys: &ys,
                            grad_ys: &mut gys,
                        };
                        let mut router = fused.then(|| RouterAfterExperts {
                            blocks: RouterBlocks::new(t, e, d),
                            saved: &saved,
                            grads,
                            grad_weights: extra,
                            shape: &s,
                            slot_row: &plan.slot_row,
                            k,
                            dx: &mut dx,
                        });
                        let into = match router.as_mut() {
                            Some(router) => WeightGrads::After(router),
                            None => WeightGrads::Into(&mut dw),
                        };
                        routed_experts_backward_rows(
                            &s,
                            &grad,
                            (&xs, &h),
                            target,
                            &weights,
                            view,
                            &w1,
                            &w2,
                            &mut gxs,
                            into,
                            &mut dw1,
                            &mut dw2,
                        )
                        .unwrap();
                        if let Some(router) = router {
                            return router.blocks.finish(&mut dwr).unwrap();
                        }
                        if let Some(extra) = extra {
                            dw.iter_mut().zip(extra).for_each(|(v, u)| *v += u);
                        }
                        let fill = |first: usize, rows: &mut [f64]| {
                            sum_rows_of_tokens(&s, &gxs, &plan.slot_row, k, first, rows)
                        };
                        let g = RouterGrads {
                            weights: SlotGrads::Given(&dw),
                            ..grads
                        };
                        let (fill, dx) = (Some(&fill as FillRows<f64>), &mut dx);
                        router_backward_filling(&saved, t, e, k, d, &g, fill, dx, &mut dwr)
                            .unwrap();
                    });
                    (dx, dwr, dw1, dw2)
                };
                let want = run(false);
                assert!(want.0.iter().all(|v| v.is_finite()));
                assert_eq!(run(true), want, "threads {threads}, outside {outside}");
            }
        }
        // A slot_row that does not match the tokens is an error, not a panic.
        let (mut gys, mut gxs) = (vec![0.0; r * d], vec![0.0; r * d]);
        let (mut dw1, mut dw2, mut dx) =
            (vec![0.0; w1.len()], vec![0.0; w2.len()], vec![0.0; t * d]);
        let grads = RouterGrads {
            weights: SlotGrads::Given(&[]),
            probs: None,
            logits: None,
            balance: None,
        };
        let mut router = RouterAfterExperts {
            blocks: RouterBlocks::new(t, e, d),
            saved: &saved,
            grads,
            grad_weights: None,
            shape: &s,
            slot_row: &plan.slot_row[1..],
            k,
            dx: &mut dx,
        };
        let target = GradYs::Scratch {
            ys: &ys,
            grad_ys: &mut gys,
        };
        let after = WeightGrads::After(&mut router);
        let res = routed_experts_backward_rows(
            &s,
            &grad,
            (&xs, &h),
            target,
            &weights,
            view,
            &w1,
            &w2,
            &mut gxs,
            after,
            &mut dw1,
            &mut dw2,
        );
        assert!(res.is_err());
    }

    /// Many rows over a team (blocks of rows on their threads) give the same `dx` as one thread,
    /// and `dWr` up to the order of its block sums.
    #[test]
    fn blocks_of_rows_agree_with_one_thread() {
        let (t, e, k, d) = (3001usize, 8usize, 2usize, 16usize);
        let x = values(t * d, 11);
        let w = values(e * d, 12);
        let probs: Vec<f64> = values(t * e, 13).iter().map(|v| v.abs() + 0.01).collect();
        let idx: Vec<i64> = (0..t * k).map(|i| ((i * 5 + i / k) % e) as i64).collect();
        let (gw, gp, gl) = (values(t * k, 14), values(t * e, 15), values(t * e, 16));
        let share = vec![1.0 / e as f64; e];
        let saved = RouterSaved {
            x: &x,
            weight: &w,
            probs: &probs,
            idx: &idx,
            renormalize: true,
            temperature: 0.8,
        };
        let grads = RouterGrads {
            weights: SlotGrads::Given(&gw),
            probs: Some(&gp),
            logits: Some(&gl),
            balance: Some((0.3, &share[..])),
        };
        let run = |threads: usize| {
            let (mut dx, mut dw) = (values(t * d, 17), vec![0.0; e * d]);
            with_team(threads, 0, || {
                router_backward(&saved, t, e, k, d, &grads, &mut dx, &mut dw).unwrap()
            });
            (dx, dw)
        };
        assert_eq!(router_team(4, t, e, d), 4);
        let ((dx1, dw1), (dx4, dw4)) = (run(1), run(4));
        assert_eq!(dx1, dx4);
        for (a, b) in dw1.iter().zip(&dw4) {
            assert!((a - b).abs() < 1e-9 * (1.0 + a.abs()), "{a} vs {b}");
        }
        // Filling each block's dx rows inside the region (here with rows that depend on the
        // row number) equals filling dx first, bit for bit, on a team or on one thread; a
        // failing fill is the call's error.
        let start = values(t * d, 17);
        let fill = |first: usize, rows: &mut [f64]| -> KResult<()> {
            rows.copy_from_slice(&start[first * d..first * d + rows.len()]);
            Ok(())
        };
        for threads in [1, 4] {
            let (mut dx, mut dw) = (vec![f64::NAN; t * d], vec![0.0; e * d]);
            with_team(threads, 0, || {
                router_backward_filling(&saved, t, e, k, d, &grads, Some(&fill), &mut dx, &mut dw)
            })
            .unwrap();
            assert_eq!((&dx, &dw), (&dx4, if threads == 1 { &dw1 } else { &dw4 }));
        }
        let fails = |_: usize, _: &mut [f64]| -> KResult<()> { crate::error::value_err("no") };
        let (mut dx, mut dw) = (vec![0.0; t * d], vec![0.0; e * d]);
        let res = with_team(4, 0, || {
            router_backward_filling(&saved, t, e, k, d, &grads, Some(&fails), &mut dx, &mut dw)
        });
        assert!(res.is_err());
    }
}
