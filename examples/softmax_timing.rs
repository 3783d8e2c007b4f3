//! Timings of the row softmax without Python: `cargo run --release --example softmax_timing`.

mod common;
use common::time;

use _native::softmax::{softmax_backward_rows, softmax_rows};
use _native::threads::with_team;

fn main() {
    for &(t, e) in &[(8192usize, 8usize), (8192, 64), (65536, 8)] {
        let x: Vec<f32> = (0..t * e)
            .map(|i| ((i * 7919 % 1000) as f32) / 250.0 - 2.0)
            .collect();
        let mut out = vec![0.0f32; t * e];
        let mut dx = vec![0.0f32; t * e];
        let ms = time(&format!("softmax T={t} E={e}"), 50, || {
            with_team(1, usize::MAX, || softmax_rows(&x, t, e, &mut out).unwrap())
        });
        println!("  {:.2} ns/element", ms * 1e6 / (t * e) as f64);
        let ms = time(&format!("softmax backward T={t} E={e}"), 50, || {
            with_team(1, usize::MAX, || {
                softmax_backward_rows(&x, &out, t, e, &mut dx).unwrap()
            })
        });
        println!("  {:.2} ns/element", ms * 1e6 / (t * e) as f64);
    }
}
