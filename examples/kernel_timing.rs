//! Quick single-process timings of the kernels without Python: `cargo run --release --example kernel_timing`.

mod common;
use common::time;

use _native::{dispatch, routing, threads::with_team};

fn main() {
    let mut seed = 12345u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32
    };
    for &(t, e, k) in &[
        (8192usize, 8usize, 2usize),
        (8192, 64, 8),
        (65536, 8, 8),
        (65536, 64, 8),
    ] {
        let probs: Vec<f32> = (0..t * e).map(|_| rnd()).collect();
        let mut out = vec![0i64; t * k];
        for threads in [1, 2] {
            time(
                &format!("topk t={t} e={e} k={k} threads={threads}"),
                20,
                || {
                    with_team(threads, usize::MAX, || {
                        routing::topk_route(&probs, t, e, k, &mut out)
                    })
                    .unwrap()
                },
            );
        }
        let mut idx = vec![0i64; t * e];
        let mut counts = vec![0i64; t];
        let norm: Vec<f32> = probs
            .chunks(e)
            .flat_map(|r| {
                let s: f32 = r.iter().sum();
                r.iter().map(move |v| v / s).collect::<Vec<_>>()
            })
            .collect();
        for threads in [1, 2] {
            time(
                &format!("topp t={t} e={e} p=0.4 threads={threads}"),
                20,
                || {
                    with_team(threads, usize::MAX, || {
                        routing::topp_route(&norm, t, e, &[0.4], 1, e, &mut idx, &mut counts)
                    })
                    .unwrap()
                },
            );
        }
        let ids: Vec<i64> = out.clone();
        for threads in [1, 2] {
            time(
                &format!("plan t={t} e={e} k={k} threads={threads}"),
                20,
                || {
                    with_team(threads, usize::MAX, || {
                        dispatch::dispatch_plan(&ids, t, k, e, None)
                    })
                    .unwrap();
                },
            );
        }
    }
}
