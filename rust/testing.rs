//! Helpers shared by the crate's unit tests.

/// `n` deterministic values in [-1, 1) (a multiplicative hash of the index and `seed`).
pub fn values(n: usize, seed: u32) -> Vec<f64> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f64 / 500.0 - 1.0
        })
        .collect()
}
