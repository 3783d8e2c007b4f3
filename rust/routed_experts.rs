//! The routed experts of an MoE layer in one call: gather the tokens into expert order, run every
//! expert's MLP over its rows, combine the weighted rows back per token; and the backward of the
//! three.
//!
//! Why one call: in a small layer (d = 64, a thousand tokens) each of these kernels runs for tens
//! of microseconds, and around each one the Python entry, the autograd node and the hand-over of
//! the thread team cost as much again. Composed here, the three kernels run back to back on one
//! team with the GIL released once. They are the same kernels as the separate ops, run with the
//! same team sizes, so the results are the separate ops' bits; two of them run inside the expert
//! tiles' parallel regions (the gather in the forward's tiles, the combine's backward in the
//! backward's tiles: each tile its own rows, one fork/join fewer each).

use crate::dispatch::{self, CombineRows};
use crate::error::{check_len, KResult};
use crate::expert_mlp::{
    expert_mlp_backward_from, expert_mlp_forward_gathered, AfterRows, CombineGrad, GradRows,
    MlpReal, MlpShape,
};

/// A dispatch plan's index arrays (see `dispatch::dispatch_plan`).
#[derive(Clone, Copy)]
pub struct PlanView<'a> {
    /// `[R]` token of each expert-sorted row.
    pub row_token: &'a [i64],
    /// `[R]` flat slot `t * K + j` of each row.
    pub row_slot: &'a [i64],
    /// `[T, K]` row of each slot, -1 if empty or dropped.
    pub slot_row: &'a [i64],
    /// `[E + 1]` exclusive scan of the rows per expert.
    pub offsets: &'a [i64],
}

impl<'a> From<&'a dispatch::Plan> for PlanView<'a> {
    fn from(plan: &'a dispatch::Plan) -> Self {
        Self {
            row_token: &plan.row_token,
            row_slot: &plan.row_slot,
            slot_row: &plan.slot_row,
            offsets: &plan.offsets,
        }
    }
}

/// Forward for `x [T, d]` and slot weights `weights [T, K]`: `xs [R, d]` (gathered rows), `h [R, H1]`
/// (pre-activations), `ys [R, d]` (expert outputs) — kept for the backward — and `y [T, d]`.
#[allow(clippy::too_many_arguments)]
pub fn routed_experts_forward<T: MlpReal>(
    s: &MlpShape,
    x: &[T],
    t: usize,
    weights: &[T],
    plan: PlanView<'_>,
    w1: &[T],
    w2: &[T],
    xs: &mut [T],
    h: &mut [T],
    ys: &mut [T],
    y: &mut [T],
) -> KResult<()> {
    // The gather runs inside the expert tiles' parallel region (each tile its own rows).
    expert_mlp_forward_gathered(s, x, t, plan.row_token, xs, w1, w2, plan.offsets, h, ys)?;
    dispatch::combine(ys, s.r, s.d, weights, plan.slot_row, t, y)
}

/// Where the backward puts the gradient of the expert outputs (`[R, d]`).
pub enum GradYs<'a, T> {
    /// Into a scratch buffer, leaving the saved `ys` intact.
    Scratch {
        /// The forward's expert outputs.
        ys: &'a [T],
        /// Scratch for their gradient.
        grad_ys: &'a mut [T],
    },
    /// Over the saved `ys` itself, for a caller that will not need them again: one `[R, d]`
    /// buffer less at the backward's peak (the expert backward, with both gradients alive).
    OverYs(&'a mut [T]),
}

/// Backward from `grad [T, d]` (the gradient of `y`) into `dx [T, d]`, `dweights [T, K]`,
/// `dw1 [E, H1, d]` and `dw2 [E, d, F]`, given what the forward kept (`xs`, `h` and, in
/// `grad_ys`, `ys`); `grad_xs [R, d]` is scratch.
#[allow(clippy::too_many_arguments)]
pub fn routed_experts_backward<T: MlpReal>(
    s: &MlpShape,
    grad: &[T],
    t: usize,
    saved: (&[T], &[T]),
    grad_ys: GradYs<'_, T>,
    weights: &[T],
    plan: PlanView<'_>,
    w1: &[T],
    w2: &[T],
    grad_xs: &mut [T],
    dx: &mut [T],
    dweights: &mut [T],
    dw1: &mut [T],
    dw2: &mut [T],
) -> KResult<()> {
    let into = WeightGrads::Into(dweights);
    routed_experts_backward_rows(
        s, grad, saved, grad_ys, weights, plan, w1, w2, grad_xs, into, dw1, dw2,
    )?;
    dispatch::gather_backward(grad_xs, s.r, s.d, plan.slot_row, t, dx)
}

/// Where the routed experts' backward puts the routing weights' gradient.
pub enum WeightGrads<'a, T> {
    /// Into `[T, K]`, after the experts' backward.
    Into(&'a mut [T]),
    /// Nowhere: `after` gets the combine's per-row dot products it comes from
    /// ([`dispatch::weight_grads_from_dots`]), with `grad_xs`, in the experts' last parallel
    /// region ([`AfterRows`]); the MoE layer's router backward does this
    /// (`router_backward::RouterAfterExperts`).
    After(&'a mut dyn AfterRows<T>),
}

/// [`routed_experts_backward`] up to the gradient of the gathered rows, `grad_xs [R, d]`,
/// without summing them per token into `dx` (for a caller that does it elsewhere, as the MoE
/// layer's backward does in the router's backward blocks: [`sum_rows_of_tokens`]); the routing
/// weights' gradient goes where `weight_grads` says.
#[allow(clippy::too_many_arguments)]
pub fn routed_experts_backward_rows<T: MlpReal>(
    s: &MlpShape,
    grad: &[T],
    saved: (&[T], &[T]),
    grad_ys: GradYs<'_, T>,
    weights: &[T],
    plan: PlanView<'_>,
    w1: &[T],
    w2: &[T],
    grad_xs: &mut [T],
    weight_grads: WeightGrads<'_, T>,
    dw1: &mut [T],
    dw2: &mut [T],
) -> KResult<()> {
    let (xs, h) = saved;
    let d = s.d;
    let slots = plan.slot_row.len();
    let t = grad.len().checked_div(d).unwrap_or(0);
    check_len("grad", grad.len(), t * d)?;
    check_len("weights", weights.len(), slots)?;
    if let WeightGrads::Into(dweights) = &weight_grads {
        check_len("dweights", dweights.len(), slots)?;
    }
    // The combine's backward runs inside the expert backward's row tiles, each tile its own
    // rows (one parallel region fewer); the dot products become the weights' gradient after
    // (or in the after-work's tasks: `WeightGrads::After`).
    let (ys, gys) = match grad_ys {
        GradYs::Scratch { ys, grad_ys } => (Some(ys), grad_ys),
        GradYs::OverYs(ys) => (None, ys),
    };
    let mut dots = vec![T::ZERO; s.r];
    let combine = CombineGrad {
        rows: CombineRows {
            grad,
            t,
            weights,
            d,
            ys,
            row_token: plan.row_token,
            row_slot: plan.row_slot,
        },
        gys,
        dots: &mut dots,
    };
    let grad_rows = GradRows::Combine(combine);
    let (offsets, gxs) = (plan.offsets, grad_xs);
    match weight_grads {
        WeightGrads::Into(dweights) => {
            expert_mlp_backward_from(s, grad_rows, xs, h, w1, w2, offsets, gxs, dw1, dw2, None)?;
            dispatch::weight_grads_from_dots(&dots, plan.slot_row, dweights)
        }
        WeightGrads::After(after) => {
            let after = Some(after);
            expert_mlp_backward_from(s, grad_rows, xs, h, w1, w2, offsets, gxs, dw1, dw2, after)
        }
    }
}

/// `dx [m, d]` for the `m` tokens from `first`: each token's rows of `grad_xs [R, d]` summed in
/// slot order (the gather backward of those tokens alone; `k` slots per token).
pub fn sum_rows_of_tokens<T: MlpReal>(
    s: &MlpShape,
    grad_xs: &[T],
    slot_row: &[i64],
    k: usize,
    first: usize,
    dx: &mut [T],
) -> KResult<()> {
    let m = dx.len() / s.d.max(1);
    match slot_row.get(first * k..(first + m) * k) {
        Some(slots) => dispatch::gather_backward(grad_xs, s.r, s.d, slots, m, dx),
        None => crate::error::value_err("plan.slot_row: fewer slots than the tokens of dx"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{combine, combine_backward, dispatch_plan, gather, gather_backward};
    use crate::expert_mlp::{expert_mlp_backward, expert_mlp_forward, Activation};
    use crate::testing::values;

    /// Blocks of tokens summed apart give gather_backward's rows; a block past the plan's slots
    /// is an error.
    #[test]
    fn sums_by_blocks_of_tokens_equal_the_gather_backward() {
        let (t, k, e, d) = (7usize, 2usize, 3usize, 5usize);
        let idx: Vec<i64> = vec![0, 2, 2, 0, 0, -1, 2, 0, 0, 2, 2, 0, 0, 2];
        let p = dispatch_plan(&idx, t, k, e, Some(4)).unwrap();
        let r = p.row_token.len();
        let s = MlpShape {
            r,
            d,
            e,
            f: 3,
            act: Activation::Gelu,
        };
        let grad_xs = values(r * d, 9);
        let mut want = vec![0.0; t * d];
        gather_backward(&grad_xs, r, d, &p.slot_row, t, &mut want).unwrap();
        let mut got = vec![f64::NAN; t * d];
        for (b, rows) in got.chunks_mut(3 * d).enumerate() {
            sum_rows_of_tokens(&s, &grad_xs, &p.slot_row, k, 3 * b, rows).unwrap();
        }
        assert_eq!(got, want);
        let mut past = vec![0.0; 2 * d];
        assert!(sum_rows_of_tokens(&s, &grad_xs, &p.slot_row, k, 6, &mut past).is_err());
    }

    /// The fused call equals gather -> expert MLPs -> combine (and their backwards) called apart,
    /// including a dropped slot and an expert without rows.
    #[test]
    fn equals_the_separate_kernels() {
        let (t, k, e, d, f) = (7usize, 2usize, 3usize, 5usize, 4usize);
        let idx: Vec<i64> = vec![0, 2, 2, 0, 0, -1, 2, 0, 0, 2, 2, 0, 0, 2];
        let p = dispatch_plan(&idx, t, k, e, Some(4)).unwrap();
        let view = PlanView::from(&p);
        let r = p.row_token.len();
        for act in [Activation::SwiGlu, Activation::Gelu] {
            let s = MlpShape { r, d, e, f, act };
            let h1 = act.h1(f);
            let (x, w) = (values(t * d, 1), values(t * k, 2));
            let (w1, w2) = (values(e * h1 * d, 3), values(e * d * f, 4));
            let (mut xs, mut h, mut ys, mut y) = (
                vec![0.0; r * d],
                vec![0.0; r * h1],
                vec![0.0; r * d],
                vec![0.0; t * d],
            );
            routed_experts_forward(
                &s, &x, t, &w, view, &w1, &w2, &mut xs, &mut h, &mut ys, &mut y,
            )
            .unwrap();
            let (mut xs2, mut h2, mut ys2, mut y2) = (xs.clone(), h.clone(), ys.clone(), y.clone());
            gather(&x, t, d, &p.row_token, &mut xs2).unwrap();
            expert_mlp_forward(&s, &xs2, &w1, &w2, &p.offsets, &mut h2, &mut ys2).unwrap();
            combine(&ys2, r, d, &w, &p.slot_row, t, &mut y2).unwrap();
            assert_eq!((&xs, &h, &ys, &y), (&xs2, &h2, &ys2, &y2));

            let g = values(t * d, 5);
            let expected = {
                let (mut gys, mut gxs) = (vec![0.0; r * d], vec![0.0; r * d]);
                let (mut dx, mut dw) = (vec![0.0; t * d], vec![0.0; t * k]);
                let (mut dw1, mut dw2) = (vec![0.0; w1.len()], vec![0.0; w2.len()]);
                combine_backward(
                    &g,
                    &ys,
                    &w,
                    d,
                    &p.row_token,
                    &p.row_slot,
                    &p.slot_row,
                    &mut gys,
                    &mut dw,
                )
                .unwrap();
                expert_mlp_backward(
                    &s, &gys, &xs, &h, &w1, &w2, &p.offsets, &mut gxs, &mut dw1, &mut dw2,
                )
                .unwrap();
                gather_backward(&gxs, r, d, &p.slot_row, t, &mut dx).unwrap();
                (dx, dw, dw1, dw2)
            };
            for in_place in [false, true] {
                let (mut gys, mut gxs, mut ys_copy) =
                    (vec![0.0; r * d], vec![0.0; r * d], ys.clone());
                let (mut dx, mut dw) = (vec![0.0; t * d], vec![0.0; t * k]);
                let (mut dw1, mut dw2) = (vec![0.0; w1.len()], vec![0.0; w2.len()]);
                let grad_ys = if in_place {
                    GradYs::OverYs(&mut ys_copy)
                } else {
                    GradYs::Scratch {
                        ys: &ys,
                        grad_ys: &mut gys,
                    }
                };
                routed_experts_backward(
                    &s,
                    &g,
                    t,
                    (&xs, &h),
                    grad_ys,
                    &w,
                    view,
                    &w1,
                    &w2,
                    &mut gxs,
                    &mut dx,
                    &mut dw,
                    &mut dw1,
                    &mut dw2,
                )
                .unwrap();
                assert_eq!(
                    (&dx, &dw, &dw1, &dw2),
                    (&expected.0, &expected.1, &expected.2, &expected.3)
                );
            }
            let dw = expected.1;
            assert_eq!(dw[5], 0.0, "the empty slot gets no weight gradient");
        }
    }

    #[test]
    fn a_plan_that_does_not_match_is_an_error() {
        let (t, d, e, f) = (2usize, 3usize, 2usize, 2usize);
        let s = MlpShape {
            r: 2,
            d,
            e,
            f,
            act: Activation::Gelu,
        };
        let bad_tokens = [0i64, 5];
        let view = PlanView {
            row_token: &bad_tokens,
            row_slot: &[0, 1],
            slot_row: &[0, 1],
            offsets: &[0, 1, 2],
        };
        let (x, w, w1, w2) = (
            vec![1.0f32; t * d],
            vec![1.0f32; t],
            vec![1.0f32; e * f * d],
            vec![1.0f32; e * d * f],
        );
        let (mut xs, mut h, mut ys, mut y) = (
            vec![0.0; 2 * d],
            vec![0.0; 2 * f],
            vec![0.0; 2 * d],
            vec![0.0; t * d],
        );
        let err = routed_experts_forward(
            &s, &x, t, &w, view, &w1, &w2, &mut xs, &mut h, &mut ys, &mut y,
        );
        assert!(err.is_err());
    }
}
