//! Shared by the timing examples.

use std::time::Instant;

/// Runs `f` once to warm up, then `reps` times; prints and returns the median in milliseconds.
pub fn time<F: FnMut()>(name: &str, reps: usize, mut f: F) -> f64 {
    f();
    let mut v: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    let median = v[v.len() / 2];
    println!("{name:<48} {median:>10.3} ms");
    median
}
