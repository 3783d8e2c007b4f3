//! Timings of the expert MLP kernel without Python:
//! `cargo run --release --example mlp_timing [threads] [skewed]`.

mod common;
use common::time;

use _native::expert_mlp::{
    act_backward, act_forward, expert_mlp_backward, expert_mlp_forward, Activation, MlpShape,
};
use _native::isa::with_best_isa;
use _native::threads::with_team;

fn activations() {
    let (rows, f) = (2048usize, 256usize);
    let h = vec![0.3f32; rows * 2 * f];
    let mut a = vec![0.0f32; rows * f];
    let mut dh = vec![0.0f32; rows * 2 * f];
    let da = vec![0.1f32; rows * f];
    let per = |ms: f64| ms * 1e6 / (rows * f) as f64;
    let t = time("swiglu forward (2048 x 256)", 7, || {
        with_best_isa(
            #[inline(always)]
            || {
                // A loop, not for_each: a nested closure would be compiled out of line.
                for (h, a) in h.chunks_exact(2 * f).zip(a.chunks_exact_mut(f)) {
                    act_forward(Activation::SwiGlu, h, a)
                }
            },
        )
    });
    println!("  {:.2} ns/element", per(t));
    let t = time("swiglu backward (2048 x 256)", 7, || {
        with_best_isa(
            #[inline(always)]
            || {
                for ((h, da), (a, dh)) in h
                    .chunks_exact(2 * f)
                    .zip(da.chunks_exact(f))
                    .zip(a.chunks_exact_mut(f).zip(dh.chunks_exact_mut(2 * f)))
                {
                    act_backward(Activation::SwiGlu, h, da, a, dh)
                }
            },
        )
    });
    println!("  {:.2} ns/element", per(t));
}

fn main() {
    activations();
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    // `skewed` as the second argument: experts of uneven sizes.
    let skewed = std::env::args().nth(2).is_some_and(|a| a == "skewed");
    for &(d, f, e, k, t) in &[
        (1usize, 256usize, 8usize, 2usize, 1024usize),
        (64, 256, 8, 2, 1024),
        (256, 1024, 8, 2, 2048),
        (512, 2048, 8, 2, 2048),
        (256, 512, 64, 8, 2048),
    ] {
        let r = k * t;
        let s = MlpShape {
            r,
            d,
            e,
            f,
            act: Activation::SwiGlu,
        };
        let per = r / e;
        let offsets: Vec<i64> = (0..=e).map(|i| (i * per).min(r) as i64).collect();
        let mut offsets = offsets;
        offsets[e] = r as i64;
        if skewed {
            // Uneven experts, as top-p routing gives: shares falling from 22 % to 6 % (E = 8).
            let weights: Vec<f64> = (0..e).map(|i| 1.0 / (1.0 + 0.35 * i as f64)).collect();
            let total: f64 = weights.iter().sum();
            let mut acc = 0.0;
            for i in 0..e {
                offsets[i] = ((acc / total) * r as f64) as i64;
                acc += weights[i];
            }
        }
        let xs = vec![0.01f32; r * d];
        let w1 = vec![0.02f32; e * 2 * f * d];
        let w2 = vec![0.03f32; e * d * f];
        let mut h = vec![0.0f32; r * 2 * f];
        let mut out = vec![0.0f32; r * d];
        let (mut dxs, mut dw1, mut dw2) = (
            vec![0.0f32; r * d],
            vec![0.0f32; w1.len()],
            vec![0.0f32; w2.len()],
        );
        let gflop = 2.0 * 3.0 * (r * d * 2 * f + r * f * d) as f64 / 1e9;
        let name = format!(
            "d={d} f={f} E={e} k={k} T={t} thr={threads}{}",
            if skewed { " skewed" } else { "" }
        );
        let fw = time(&format!("{name} fwd"), 7, || {
            with_team(threads, usize::MAX, || {
                expert_mlp_forward(&s, &xs, &w1, &w2, &offsets, &mut h, &mut out).unwrap()
            })
        });
        let bw = time(&format!("{name} bwd"), 7, || {
            with_team(threads, usize::MAX, || {
                expert_mlp_backward(
                    &s, &out, &xs, &h, &w1, &w2, &offsets, &mut dxs, &mut dw1, &mut dw2,
                )
                .unwrap()
            })
        });
        println!("  {:.1} GFLOP/s", gflop / ((fw + bw) / 1e3));
    }
}
