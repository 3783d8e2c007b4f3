//! The expert MLP by column blocks: the layout [`crate::expert_mlp`] uses when its row tiles
//! would be short.
//!
//! Why: the `gemm` crate packs the weight operand again on every call, one copy per weight
//! against `rows` multiply-adds. With many threads the row tiles of the fused layout get short
//! (96 rows for 4096 rows over 16 threads), and re-packing an expert's weights for every tile
//! cost about a quarter of the forward at d = 512. Here a task takes up to [`TILE_ROWS`] rows of
//! one expert and a block of *columns* of the weights, so each weight is packed about once per
//! tile of 512 rows; the price is that `a` (the forward) and `dh` (the backward) go through memory
//! between the two GEMMs, with one more barrier, instead of staying in the core's cache. (The
//! backward's `dxs = dh W1_e` pays no barrier of its own: its tasks share a region with the
//! weight gradients, which read the same `dh`.)
//!
//! Every output element is a sum over the same depth as in the row layout's GEMM, but the GEMMs
//! have other shapes, so results may differ in the last bits between the two layouts, and, where
//! the GEMM library blocks the depth by the product's width, between thread counts or waves of
//! one layout (never between runs of one configuration).

use std::marker::PhantomData;

use crate::expert_mlp::{
    act_backward_parts, act_forward_parts, matmul, matmul_raw, row_tiles, Activation, MlpReal,
    MlpShape, Strides,
};
use crate::isa::with_best_isa;
use crate::omp_team::for_each_task;

/// Most rows of one expert in a tile (an expert with more is cut into equal tiles).
pub(crate) const TILE_ROWS: usize = 512;

/// A row-major buffer that tasks write in disjoint blocks of rows x columns, which safe slices
/// cannot express (a column block of many rows is not a contiguous range).
struct Blocks<'a, T> {
    ptr: *mut T,
    len: usize,
    width: usize,
    _buf: PhantomData<&'a mut [T]>,
}

// SAFETY: `Blocks` stands for a `&mut [T]` shared among tasks; moving or sharing it across threads
// is as safe as for the slice, and element access goes through `row` / `block`, whose contracts
// require each task to touch only its own elements.
unsafe impl<T: Send> Send for Blocks<'_, T> {}
unsafe impl<T: Send> Sync for Blocks<'_, T> {}

impl<'a, T> Blocks<'a, T> {
    fn new(buf: &'a mut [T], width: usize) -> Self {
        Blocks {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            width,
            _buf: PhantomData,
        }
    }

    /// Columns `c0..c1` of row `r`.
    ///
    /// # Safety
    /// No other reference to these elements may be live while the slice is (each task uses only
    /// its own block, and a task holds one slice per element at a time).
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, r: usize, c0: usize, c1: usize) -> &mut [T] {
        assert!(c0 <= c1 && c1 <= self.width && r * self.width + c1 <= self.len);
        // SAFETY: in bounds (asserted) of the buffer borrowed for 'a; exclusive by the contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r * self.width + c0), c1 - c0) }
    }

    /// Pointer to element `(r, c0)` of an `m x n` block that lies inside the buffer (asserted).
    fn block(&self, r: usize, c0: usize, m: usize, n: usize) -> *mut T {
        if m > 0 && n > 0 {
            assert!(c0 + n <= self.width && (r + m - 1) * self.width + c0 + n <= self.len);
        }
        self.ptr.wrapping_add(r * self.width + c0)
    }
}

/// Cuts `0..width` into blocks, 16 columns wide or a multiple of 16 where the width allows,
/// so that `tiles` row tiles give about three tasks per thread.
fn column_blocks(width: usize, tiles: usize, threads: usize) -> Vec<(usize, usize)> {
    if width == 0 {
        return Vec::new();
    }
    let parts = (3 * threads)
        .div_ceil(tiles.max(1))
        .clamp(1, width.div_ceil(16));
    let step = width.div_ceil(parts).next_multiple_of(16).min(width);
    (0..width)
        .step_by(step)
        .map(|c| (c, (c + step).min(width)))
        .collect()
}

/// Every (tile, column block) pair, largest first (longest-processing-time order, as the row
/// layout hands out its tiles), ties in tile order.
fn tasks(tiles: &[(usize, usize, usize)], blocks: &[(usize, usize)]) -> Vec<(usize, usize, usize)> {
    let mut tasks: Vec<(usize, usize, usize)> = (0..tiles.len())
        .flat_map(|t| blocks.iter().map(move |&(c0, c1)| (t, c0, c1)))
        .collect();
    tasks.sort_by_key(|&(t, c0, c1)| std::cmp::Reverse((tiles[t].2 - tiles[t].1) * (c1 - c0)));
    tasks
}

/// The columns of `h` that hold the up projection matching columns `c0..c1` of `a`: `f + c0..f +
/// c1` for SwiGLU, an empty range for GELU (whose `h` columns are `a`'s own).
fn up_columns(act: Activation, f: usize, c0: usize, c1: usize) -> (usize, usize) {
    match act {
        Activation::SwiGlu => (f + c0, f + c1),
        Activation::Gelu => (c0, c0),
    }
}

/// Forward of [`crate::expert_mlp::expert_mlp_forward`] by column blocks (arguments checked
/// there): `h` and `a` by blocks of F columns, then `out` by blocks of d columns.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<T: MlpReal>(
    s: &MlpShape,
    xs: &[T],
    w1: &[T],
    w2: &[T],
    ranges: &[(usize, usize)],
    h: &mut [T],
    out: &mut [T],
    threads: usize,
) {
    let (d, f, h1) = (s.d, s.f, s.act.h1(s.f));
    let tiles = row_tiles(ranges, TILE_ROWS);
    let mut a_buf = T::take_shared(s.r * f);
    {
        let (hb, ab) = (Blocks::new(h, h1), Blocks::new(&mut a_buf[..s.r * f], f));
        let work = tasks(&tiles, &column_blocks(f, tiles.len(), threads));
        for_each_task(threads, work.len(), &|i| {
            let (t, c0, c1) = work[i];
            let (e, lo, hi) = tiles[t];
            let w1e = &w1[e * h1 * d..(e + 1) * h1 * d];
            let (u0, u1) = up_columns(s.act, f, c0, c1);
            // The block's own columns, then (SwiGLU) its up columns; an empty range does nothing.
            for (k0, k1) in [(c0, c1), (u0, u1)] {
                // h[lo..hi, k0..k1] = xs[lo..hi] W1_e[k0..k1]^T
                // SAFETY: this task alone writes rows lo..hi, columns k0..k1 of h (the tasks'
                // (tile, column block) pairs are disjoint); h is not an operand.
                unsafe {
                    matmul_raw(
                        hi - lo,
                        k1 - k0,
                        d,
                        hb.block(lo, k0, hi - lo, k1 - k0),
                        h1,
                        &xs[lo * d..hi * d],
                        Strides::row_major(d),
                        &w1e[k0 * d..k1 * d],
                        Strides::transposed(d),
                    )
                };
            }
            with_best_isa(
                #[inline(always)]
                || {
                    for r in lo..hi {
                        // SAFETY: this task's own block of h (read; for GELU `up` is empty) and
                        // of a (written), one slice per element.
                        let (first, up, a) = unsafe {
                            (&*hb.row(r, c0, c1), &*hb.row(r, u0, u1), ab.row(r, c0, c1))
                        };
                        act_forward_parts(s.act, first, up, a);
                    }
                },
            );
        });
    }
    let a = &a_buf[..s.r * f];
    let ob = Blocks::new(out, d);
    let work = tasks(&tiles, &column_blocks(d, tiles.len(), threads));
    for_each_task(threads, work.len(), &|i| {
        let (t, c0, c1) = work[i];
        let (e, lo, hi) = tiles[t];
        let w2e = &w2[e * d * f..(e + 1) * d * f];
        // out[lo..hi, c0..c1] = a[lo..hi] W2_e[c0..c1]^T
        // SAFETY: this task alone writes rows lo..hi, columns c0..c1 of out; out is not an operand.
        unsafe {
            matmul_raw(
                hi - lo,
                c1 - c0,
                f,
                ob.block(lo, c0, hi - lo, c1 - c0),
                d,
                &a[lo * f..hi * f],
                Strides::row_major(f),
                &w2e[c0 * f..c1 * f],
                Strides::transposed(f),
            )
        };
    });
    T::give_back(a_buf);
}

/// The backward's first region for one wave by column blocks: `da = grad W2_e` and from it `a`
/// and `dh` for the wave's rows (`a_wave`, `dh_wave` start at row `row0`; `ranges` are the wave's
/// experts, the first of which is expert `e0`). The column blocks follow the wave's own tiles,
/// so that a wave of a few experts still gives every thread about three tasks (with the whole
/// call's blocks, a wave of 4 of 8 experts at d = 512 made 24 tasks for 16 threads).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_act<T: MlpReal>(
    s: &MlpShape,
    grad: &[T],
    h: &[T],
    w2: &[T],
    ranges: &[(usize, usize)],
    e0: usize,
    row0: usize,
    a_wave: &mut [T],
    dh_wave: &mut [T],
    threads: usize,
) {
    let (d, f, h1) = (s.d, s.f, s.act.h1(s.f));
    let tiles = row_tiles(ranges, TILE_ROWS);
    let (ab, dhb) = (Blocks::new(a_wave, f), Blocks::new(dh_wave, h1));
    let work = tasks(&tiles, &column_blocks(f, tiles.len(), threads));
    for_each_task(threads, work.len(), &|i| {
        let (t, c0, c1) = work[i];
        let (el, lo, hi) = tiles[t];
        let (e, n, cb) = (e0 + el, hi - lo, c1 - c0);
        let w2e = &w2[e * d * f..(e + 1) * d * f];
        let (u0, u1) = up_columns(s.act, f, c0, c1);
        T::with_tile_scratch(n * cb, |da| {
            // da = grad[lo..hi] W2_e[:, c0..c1]
            matmul(
                n,
                cb,
                d,
                da,
                cb,
                &grad[lo * d..hi * d],
                Strides::row_major(d),
                &w2e[c0..],
                Strides { rs: f, cs: 1 },
            );
            with_best_isa(
                #[inline(always)]
                || {
                    for (r, dar) in (lo..hi).zip(da.chunks_exact(cb.max(1))) {
                        let hr = &h[r * h1..(r + 1) * h1];
                        let l = r - row0;
                        // SAFETY: this task's own block of a and of dh (gate and up column
                        // ranges are disjoint for SwiGLU; for GELU `dup` is empty).
                        let (a, dfirst, dup) =
                            unsafe { (ab.row(l, c0, c1), dhb.row(l, c0, c1), dhb.row(l, u0, u1)) };
                        let (first, up) = (&hr[c0..c1], &hr[u0..u1]);
                        act_backward_parts(s.act, first, up, dar, a, dfirst, dup);
                    }
                },
            );
        });
    });
}

/// The backward's `dxs = dh W1_e` for one wave by column blocks of d, as tasks: the caller runs
/// them in one region with the wave's weight gradients, which read the same `dh` (one fork/join
/// fewer per wave, and the two kinds of task balance each other's tails).
pub(crate) struct DxBlocks<'a, T> {
    d: usize,
    h1: usize,
    tiles: Vec<(usize, usize, usize)>,
    work: Vec<(usize, usize, usize)>,
    dh: &'a [T],
    w1: &'a [T],
    e0: usize,
    row0: usize,
    dx: Blocks<'a, T>,
}

impl<'a, T: MlpReal> DxBlocks<'a, T> {
    /// The tasks of one wave (arguments as for [`backward_act`]; `dx_wave` starts at row
    /// `row0`). `call_tiles` (the whole call's tile count) sets the column blocks: the region's
    /// weight gradients already give each thread several tasks, so these stay as wide as the
    /// whole call allows (each re-packs its rows of `dh`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        s: &MlpShape,
        ranges: &[(usize, usize)],
        e0: usize,
        row0: usize,
        dh: &'a [T],
        w1: &'a [T],
        dx_wave: &'a mut [T],
        call_tiles: usize,
        threads: usize,
    ) -> Self {
        let tiles = row_tiles(ranges, TILE_ROWS);
        let work = tasks(&tiles, &column_blocks(s.d, call_tiles, threads));
        DxBlocks {
            d: s.d,
            h1: s.act.h1(s.f),
            tiles,
            work,
            dh,
            w1,
            e0,
            row0,
            dx: Blocks::new(dx_wave, s.d),
        }
    }

    /// Number of tasks.
    pub(crate) fn len(&self) -> usize {
        self.work.len()
    }

    /// Multiply-adds of task `i` (to order it among other tasks, largest first).
    pub(crate) fn cost(&self, i: usize) -> usize {
        let (t, c0, c1) = self.work[i];
        (self.tiles[t].2 - self.tiles[t].1) * (c1 - c0) * self.h1
    }

    /// Runs task `i`; each task runs once.
    pub(crate) fn run(&self, i: usize) {
        let (d, h1, row0) = (self.d, self.h1, self.row0);
        let (t, c0, c1) = self.work[i];
        let (el, lo, hi) = self.tiles[t];
        let e = self.e0 + el;
        let w1e = &self.w1[e * h1 * d..(e + 1) * h1 * d];
        // dx[lo..hi, c0..c1] = dh[lo..hi] W1_e[:, c0..c1]
        // SAFETY: task i alone writes rows lo..hi, columns c0..c1 of the wave's dxs (the tasks'
        // (tile, column block) pairs are disjoint), which is not an operand.
        unsafe {
            matmul_raw(
                hi - lo,
                c1 - c0,
                h1,
                self.dx.block(lo - row0, c0, hi - lo, c1 - c0),
                d,
                &self.dh[(lo - row0) * h1..(hi - row0) * h1],
                Strides::row_major(h1),
                &w1e[c0..],
                Strides { rs: d, cs: 1 },
            )
        };
    }
}

/// Tiles of the whole call in this layout (sets the forward's column blocks and the backward's
/// [`DxBlocks`] in every wave).
pub(crate) fn call_tiles(ranges: &[(usize, usize)]) -> usize {
    row_tiles(ranges, TILE_ROWS).len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_blocks_cover_the_width() {
        for (width, tiles, threads) in [
            (1, 1, 1),
            (17, 2, 16),
            (2048, 8, 16),
            (100, 100, 2),
            (64, 1, 64),
        ] {
            let blocks = column_blocks(width, tiles, threads);
            assert_eq!(blocks[0].0, 0);
            assert_eq!(blocks.last().unwrap().1, width);
            assert!(blocks
                .windows(2)
                .all(|w| w[0].1 == w[1].0 && w[0].0 < w[0].1));
        }
        assert!(column_blocks(0, 3, 4).is_empty());
        // 8 tiles on 16 threads: 6 blocks of F = 2048 (352 columns, the last 288)
        assert_eq!(column_blocks(2048, 8, 16).len(), 6);
    }
}
