//! Timing of the LARS kernel without Python: `cargo run --release --example lars_timing [threads]`.
//! Ten 1M-element tensors (the benchmark's 10.5M-parameter model); the norm pass alone and the
//! whole call in both modes, median of 15 runs each, gradients refilled before every run.
use std::time::Instant;

use _native::lars::{scale_grads, sum_squares_of, Mode};
use _native::threads::with_team;

fn median_ms(mut f: impl FnMut() -> f64) -> f64 {
    let mut ts: Vec<f64> = (0..15).map(|_| f()).collect();
    ts.sort_by(f64::total_cmp);
    ts[ts.len() / 2]
}

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let n = 1 << 20;
    let ws: Vec<Vec<f32>> = (0..10)
        .map(|i| (0..n).map(|j| ((i * 7 + j) % 13) as f32 * 0.01).collect())
        .collect();
    let fresh: Vec<Vec<f32>> = ws.clone();
    let mut gs: Vec<Vec<f32>> = ws.clone();
    let unit: Vec<usize> = (0..10).collect();
    let lars = Mode::Lars {
        eta: 0.001,
        weight_decay: 0.0,
        eps: 1e-8,
        clip: None,
    };
    let bidir = Mode::Bidirectional {
        target: 3.0,
        lo: 0.3,
        hi: 3.0,
        eps: 1e-8,
    };
    let norms = |both: bool| {
        median_ms(|| {
            let t = Instant::now();
            let s: f64 = ws
                .iter()
                .zip(&fresh)
                .map(|(w, g)| {
                    if both {
                        sum_squares_of([w.as_slice(), g.as_slice()])[1]
                    } else {
                        sum_squares_of([g.as_slice()])[0]
                    }
                })
                .sum();
            std::hint::black_box(s);
            t.elapsed().as_secs_f64() * 1e3
        })
    };
    println!("norms of g, 10 x 1M, 1 thread: {:.2} ms", norms(false));
    println!("norms of w and g, 10 x 1M, 1 thread: {:.2} ms", norms(true));
    for (name, mode) in [("lars", lars), ("bidirectional", bidir)] {
        let ms = median_ms(|| {
            for (g, f) in gs.iter_mut().zip(&fresh) {
                g.copy_from_slice(f);
            }
            let wr: Vec<&[f32]> = ws.iter().map(|w| w.as_slice()).collect();
            let mut gr: Vec<&mut [f32]> = gs.iter_mut().map(|g| g.as_mut_slice()).collect();
            let t = Instant::now();
            with_team(threads, usize::MAX, || {
                scale_grads(&wr, &mut gr, &unit, 10, mode)
            })
            .unwrap();
            t.elapsed().as_secs_f64() * 1e3
        });
        println!("scale_grads {name}, 10 x 1M, {threads} threads: {ms:.2} ms");
    }
}
