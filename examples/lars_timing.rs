//! Timing of the LARS kernel without Python: `cargo run --release --example lars_timing`.
use std::time::Instant;

use _native::lars::{scale_grads, sum_squares, Mode};
use _native::threads::with_team;

fn main() {
    let n = 1 << 20;
    let ws: Vec<Vec<f32>> = (0..10)
        .map(|i| (0..n).map(|j| ((i * 7 + j) % 13) as f32 * 0.01).collect())
        .collect();
    let mut gs: Vec<Vec<f32>> = ws.clone();
    for threads in [1, 2] {
        let t = Instant::now();
        let s: f64 = with_team(threads, usize::MAX, || {
            ws.iter().map(|w| sum_squares(w)).sum()
        });
        println!(
            "sum_squares 10 x 1M, {threads} threads: {:.2} ms ({s})",
            t.elapsed().as_secs_f64() * 1e3
        );
        let wr: Vec<&[f32]> = ws.iter().map(|w| w.as_slice()).collect();
        let mut gr: Vec<&mut [f32]> = gs.iter_mut().map(|g| g.as_mut_slice()).collect();
        let unit: Vec<usize> = (0..10).collect();
        let mode = Mode::Lars {
            eta: 0.001,
            weight_decay: 0.0,
            eps: 1e-8,
            clip: None,
        };
        for _ in 0..3 {
            let t = Instant::now();
            with_team(threads, usize::MAX, || {
                scale_grads(&wr, &mut gr, &unit, 10, mode)
            })
            .unwrap();
            println!(
                "scale_grads 10 x 1M, {threads} threads: {:.2} ms",
                t.elapsed().as_secs_f64() * 1e3
            );
        }
    }
}
