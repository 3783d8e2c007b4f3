//! The routed experts' backward without Python, the combine's backward computed first (its own
//! parallel region) against inside the expert tiles (`routed_experts_backward_rows`), the two
//! alternating call by call: `cargo run --release --example routed_backward_timing [threads]`
//! (on one thread both compute the combine's rows first: with no region to save, rows in order
//! measured faster there).
//! The d = 64 benchmark layer (ff 256, E 8, k 2, T 1024); medians of 300 calls each.
use std::time::Instant;

use _native::dispatch::{combine_backward_in_place, dispatch_plan};
use _native::expert_mlp::{expert_mlp_backward, Activation, MlpShape};
use _native::routed_experts::{routed_experts_backward_rows, GradYs, PlanView, WeightGrads};
use _native::threads::with_team;

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2);
    let (t, k, e, d, f) = (1024usize, 2usize, 8usize, 64usize, 256usize);
    let idx: Vec<i64> = (0..t * k)
        .map(|i| ((i * 2654435761usize) >> 7) as i64 % e as i64)
        .collect();
    let plan = dispatch_plan(&idx, t, k, e, None).expect("a valid routing");
    let r = plan.row_token.len();
    let s = MlpShape {
        r,
        d,
        e,
        f,
        act: Activation::SwiGlu,
    };
    let fill = |n: usize, seed: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 31 + seed) % 17) as f32 * 0.01 - 0.08)
            .collect()
    };
    let (xs, h, ys) = (fill(r * d, 1), fill(r * 2 * f, 2), fill(r * d, 3));
    let (w1, w2) = (fill(e * 2 * f * d, 4), fill(e * d * f, 5));
    let (grad, weights) = (fill(t * d, 6), fill(t * k, 7));
    let (mut gys, mut gxs, mut dw) = (ys.clone(), vec![0.0; r * d], vec![0.0; t * k]);
    let (mut dw1, mut dw2) = (vec![0.0; w1.len()], vec![0.0; w2.len()]);
    let view = PlanView::from(&plan);
    let mut times = [Vec::new(), Vec::new()];
    for call in 0..620 {
        let fused = call % 2 == 1;
        gys.copy_from_slice(&ys);
        let start = Instant::now();
        with_team(threads, usize::MAX, || {
            if fused {
                routed_experts_backward_rows(
                    &s,
                    &grad,
                    (&xs, &h),
                    GradYs::OverYs(&mut gys),
                    &weights,
                    view,
                    &w1,
                    &w2,
                    &mut gxs,
                    WeightGrads::Into(&mut dw),
                    &mut dw1,
                    &mut dw2,
                )
            } else {
                let (rt, rs, sr) = (&plan.row_token, &plan.row_slot, &plan.slot_row);
                combine_backward_in_place(&grad, &mut gys, &weights, d, rt, rs, sr, &mut dw)
                    .and_then(|_| {
                        expert_mlp_backward(
                            &s,
                            &gys,
                            &xs,
                            &h,
                            &w1,
                            &w2,
                            &plan.offsets,
                            &mut gxs,
                            &mut dw1,
                            &mut dw2,
                        )
                    })
            }
        })
        .expect("valid inputs");
        if call >= 20 {
            times[fused as usize].push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    for (name, v) in ["combine first", "combine in the tiles"]
        .iter()
        .zip(&mut times)
    {
        v.sort_by(f64::total_cmp);
        println!(
            "{name:<24} {:.3} ms (median of {})",
            v[v.len() / 2],
            v.len()
        );
    }
}
