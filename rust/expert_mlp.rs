//! The experts' MLPs over the expert-sorted rows of a dispatch plan.
//!
//! Expert e owns rows `offsets[e]..offsets[e+1]` of `xs [R, d]` and computes
//! `h = x W1_e^T` (`W1 [E, H1, d]`), `a = act(h)`, `y = a W2_e^T` (`W2 [E, d, F]`).
//! With SwiGLU, `H1 = 2F` and the first F rows of `W1_e` are the gate (`a = silu(g) * u`);
//! with GELU, `H1 = F` and `a = gelu(h)` (the exact, erf form).
//!
//! Why a kernel and not one `mm` per expert: at high thread counts each expert's GEMM is small,
//! and spreading every small GEMM (and every elementwise pass) over all cores costs more in
//! synchronisation than it gains. Here the unit of parallel work is a tile of rows of one expert:
//! one core runs both GEMMs of the tile and the activation between them while the tile is still
//! in its cache, and tiles of all experts are scheduled together, so experts with few rows still
//! keep every core busy. The weight gradients are tiled the same way, by blocks of output rows.
//! GEMMs are the `gemm` crate's single-threaded kernels (runtime-selected SIMD, AVX-512 included).

use crate::dispatch::CombineRows;
use crate::error::{check_len, value_err, KResult};
use crate::isa::with_best_isa;
use crate::omp_team::{run_parts_then, try_for_each_index, try_for_each_part, IndexTask};
use crate::real::Real;
use crate::threads::team_size;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The expert MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) * up`, gate rows first in `W1` (the Mixtral / Qwen / HF concatenated layout).
    SwiGlu,
    /// `gelu(h)` with the exact erf formula (torch's default GELU).
    Gelu,
}

impl Activation {
    /// Parses "swiglu" / "gelu".
    pub fn parse(name: &str) -> KResult<Self> {
        match name {
            "swiglu" => Ok(Activation::SwiGlu),
            "gelu" => Ok(Activation::Gelu),
            other => value_err(format!(
                "activation must be 'swiglu' or 'gelu', got {other:?}"
            )),
        }
    }

    /// Rows of `W1` per expert for an MLP of hidden size `f`.
    pub fn h1(self, f: usize) -> usize {
        match self {
            Activation::SwiGlu => 2 * f,
            Activation::Gelu => f,
        }
    }
}

/// Float types the expert kernels run on: what `Real` has, plus the few functions the
/// activations need and reusable scratch buffers.
///
/// Why scratch is reused: a fresh multi-megabyte buffer is a fresh mapping, and touching it costs a
/// page fault per 4 KiB, which measured *more* than the activation arithmetic itself.
pub trait MlpReal:
    Real + crate::blas::BlasScalar + std::ops::Sub<Output = Self> + std::ops::Div<Output = Self>
{
    /// 1.
    const ONE: Self;
    /// -inf.
    const NEG_INFINITY: Self;
    /// Below this, [`MlpReal::exp`] is not accurate (the f32 one saturates); callers that need
    /// `e^x` there use 0.
    const EXP_MIN: Self;
    /// `e^x`.
    fn exp(self) -> Self;
    /// The error function.
    fn erf(self) -> Self;
    /// Runs `f` with this thread's tile scratch, at least `len` long (contents unspecified).
    fn with_tile_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
    /// The process-wide cached scratch buffer of this type.
    fn shared_slot() -> &'static std::sync::Mutex<Vec<Self>>;

    /// A process-wide scratch buffer of at least `len` elements (contents unspecified; callers
    /// slice off what they use); hand it back with [`MlpReal::give_back`]. A concurrent caller
    /// simply gets a fresh one.
    ///
    /// Why never shrunk: calls that need different sizes share the buffer (the column layout's
    /// forward takes `R x F`, the backward `rows x (F + H1)`), and a buffer truncated by one call
    /// was zero-filled again, on one thread, by the next: 1.85 ms of the d = 512 step at 16
    /// threads on the lent Xeon, outside any parallel region.
    fn take_shared(len: usize) -> Vec<Self> {
        let mut buf = std::mem::take(
            &mut *Self::shared_slot()
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        if buf.len() < len {
            buf.resize(len, Self::ZERO);
        }
        buf
    }

    /// Returns a buffer from [`MlpReal::take_shared`] for the next call to reuse.
    fn give_back(buf: Vec<Self>) {
        if buf.len() <= KEEP_SHARED {
            let mut slot = Self::shared_slot()
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // Keep the larger one, so a small call does not evict a big buffer.
            if buf.len() > slot.len() {
                *slot = buf;
            }
        }
    }
}

/// Largest shared scratch kept between calls (elements); bigger ones are freed.
const KEEP_SHARED: usize = 1 << 28;

macro_rules! scratch_impl {
    ($t:ty) => {
        fn with_tile_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
            thread_local! {
                static TILE: std::cell::RefCell<Vec<$t>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            TILE.with(|cell| match cell.try_borrow_mut() {
                Ok(mut buf) => {
                    if buf.len() < len {
                        buf.resize(len, 0.0);
                    }
                    f(&mut buf[..len])
                }
                // Re-entered on this thread (not expected): use a fresh buffer.
                Err(_) => f(&mut vec![0.0; len]),
            })
        }

        fn shared_slot() -> &'static std::sync::Mutex<Vec<Self>> {
            static SLOT: std::sync::Mutex<Vec<$t>> = std::sync::Mutex::new(Vec::new());
            &SLOT
        }
    };
}

impl MlpReal for f32 {
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    const EXP_MIN: Self = -87.0;
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        libm::erff(self)
    }
    scratch_impl!(f32);
}

impl MlpReal for f64 {
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    const EXP_MIN: Self = -746.0;
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        libm::erf(self)
    }
    scratch_impl!(f64);
}

/// `e^x` in f32 within 2 ulp, written branch-free so the activation loops vectorise (the
/// library `expf` is a scalar call, which would cost more than the GEMMs when d is small).
/// Cephes' range reduction `x = n ln2 + r` and polynomial for `e^r` on |r| <= ln2/2.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
                                     // e^88 and e^-87 are within the normal range; beyond them the result saturates to a finite
                                     // huge / tiny value (callers only use it in 1 / (1 + e^x), where that is exact enough).
                                     // max/min rather than clamp: clamp's NaN rules keep the loop from vectorising. NaN still
                                     // propagates through the arithmetic below.
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.0).min(88.0);
    let shifted = x * LOG2E + MAGIC;
    let n = shifted - MAGIC;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    // The low mantissa bits of `shifted` hold n (in [-126, 127]) added to MAGIC's; adding the
    // exponent bias and shifting by 23 leaves exactly the bits of 2^n (the high bits fall off).
    let scale = f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
    y * scale
}

#[inline(always)]
fn sigmoid<T: MlpReal>(x: T) -> T {
    T::ONE / (T::ONE + (T::ZERO - x).exp())
}

/// `a = act(h)` for one row (`h` has `H1` entries, `a` has F).
#[inline(always)]
pub fn act_forward<T: MlpReal>(act: Activation, h: &[T], a: &mut [T]) {
    let f = a.len();
    let (first, up) = h[..act.h1(f)].split_at(f);
    act_forward_parts(act, first, up, a)
}

/// `a = act(h)` over columns of a row given as its parts: the gate and up columns for SwiGLU
/// (`first`, `up`), or the pre-activations for GELU (`first`; `up` unused). A column block of a
/// row is computed the same way as the whole row.
#[inline(always)]
pub fn act_forward_parts<T: MlpReal>(act: Activation, first: &[T], up: &[T], a: &mut [T]) {
    // Indexed loops over slices cut to length: long zip chains kept these loops from vectorising.
    let f = a.len();
    match act {
        Activation::SwiGlu => {
            let (g, u) = (&first[..f], &up[..f]);
            for i in 0..f {
                a[i] = g[i] * sigmoid(g[i]) * u[i];
            }
        }
        Activation::Gelu => {
            let h = &first[..f];
            for i in 0..f {
                a[i] = gelu(h[i]);
            }
        }
    }
}

#[inline(always)]
fn gelu<T: MlpReal>(h: T) -> T {
    let half = T::from_f64(0.5);
    h * half * (T::ONE + (h * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

/// For one row: `a = act(h)` (kept for the weight gradient) and `dh = da * act'(h)`.
#[inline(always)]
pub fn act_backward<T: MlpReal>(act: Activation, h: &[T], da: &[T], a: &mut [T], dh: &mut [T]) {
    let f = a.len();
    let (first, up) = h[..act.h1(f)].split_at(f);
    let (dfirst, dup) = dh[..act.h1(f)].split_at_mut(f);
    act_backward_parts(act, first, up, da, a, dfirst, dup)
}

/// [`act_backward`] over columns given as parts (see [`act_forward_parts`]): `dfirst` and `dup`
/// receive the gradients of `first` and `up` (`up` and `dup` unused for GELU).
#[inline(always)]
pub fn act_backward_parts<T: MlpReal>(
    act: Activation,
    first: &[T],
    up: &[T],
    da: &[T],
    a: &mut [T],
    dfirst: &mut [T],
    dup: &mut [T],
) {
    let f = a.len();
    match act {
        Activation::SwiGlu => {
            let (g, u) = (&first[..f], &up[..f]);
            let (dg, du) = (&mut dfirst[..f], &mut dup[..f]);
            let (a, da) = (&mut a[..f], &da[..f]);
            for i in 0..f {
                let (g, u, da) = (g[i], u[i], da[i]);
                let s = sigmoid(g);
                let silu = g * s;
                a[i] = silu * u;
                du[i] = da * silu;
                // d silu / dg = s * (1 + g * (1 - s))
                dg[i] = da * u * (s * (T::ONE + g * (T::ONE - s)));
            }
        }
        Activation::Gelu => {
            let inv_sqrt_2pi = T::from_f64(0.398_942_280_401_432_7);
            let half = T::from_f64(0.5);
            let (h, da, dh) = (&first[..f], &da[..f], &mut dfirst[..f]);
            for i in 0..f {
                let x = h[i];
                let cdf =
                    half * (T::ONE + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf());
                a[i] = x * cdf;
                let pdf = inv_sqrt_2pi * (T::ZERO - half * x * x).exp();
                dh[i] = da[i] * (cdf + x * pdf);
            }
        }
    }
}

pub(crate) use crate::blas::Strides;

/// `dst [m, n]` (row-major, rows `dst_rs` apart) `= lhs [m, k] · rhs [k, n]` on one thread.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul<T: MlpReal>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_rs: usize,
    lhs: &[T],
    ls: Strides,
    rhs: &[T],
    rs: Strides,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        Strides::row_major(dst_rs).last_index(m, n) < dst.len(),
        "matmul: dst too small"
    );
    // SAFETY: the assert proves the m x n block lies inside `dst`, which is borrowed mutably, so
    // nothing else reads or writes it and it cannot alias `lhs` or `rhs`.
    unsafe { matmul_raw(m, n, k, dst.as_mut_ptr(), dst_rs, lhs, ls, rhs, rs) }
}

/// [`matmul`] into a destination block given by pointer (for tasks that write disjoint column
/// blocks of one buffer, which cannot be cut into disjoint slices).
///
/// # Safety
/// `dst` must be valid for writes of the `m x n` block with rows `dst_rs` apart, nothing else may
/// read or write that block during the call, and it must not overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_raw<T: MlpReal>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    lhs: &[T],
    ls: Strides,
    rhs: &[T],
    rs: Strides,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                // SAFETY: inside the block the caller vouches for.
                unsafe { *dst.add(i * dst_rs + j) = T::ZERO };
            }
        }
        return;
    }
    assert!(ls.last_index(m, k) < lhs.len(), "matmul: lhs too small");
    assert!(rs.last_index(k, n) < rhs.len(), "matmul: rhs too small");
    // SAFETY: as for the `gemm` crate below (the asserts cover the operands, the caller the
    // destination block).
    if unsafe { crate::blas::gemm(m, n, k, dst, dst_rs, lhs.as_ptr(), ls, rhs.as_ptr(), rs) } {
        return;
    }
    // SAFETY: the asserts prove every element gemm reads lies inside `lhs` and `rhs`; the caller
    // vouches for the destination block (valid, exclusive, not overlapping the operands);
    // read_dst = false, so dst's old contents are not read.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            false,
            lhs.as_ptr(),
            ls.cs as isize,
            ls.rs as isize,
            rhs.as_ptr(),
            rs.cs as isize,
            rs.rs as isize,
            T::ZERO,
            T::ONE,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Shapes of one expert-MLP call.
#[derive(Debug, Clone, Copy)]
pub struct MlpShape {
    /// Rows of the expert-sorted buffer.
    pub r: usize,
    /// Model width.
    pub d: usize,
    /// Experts.
    pub e: usize,
    /// Hidden width of one expert.
    pub f: usize,
    /// Activation.
    pub act: Activation,
}

impl MlpShape {
    fn h1(&self) -> usize {
        self.act.h1(self.f)
    }
}

/// Checks the offsets (an exclusive scan ending at R) and turns them into row ranges.
fn expert_ranges(offsets: &[i64], s: &MlpShape) -> KResult<Vec<(usize, usize)>> {
    check_len("offsets", offsets.len(), s.e + 1)?;
    if offsets[0] != 0 || offsets[s.e] != s.r as i64 {
        return value_err(format!(
            "offsets must start at 0 and end at {} (the rows of xs), got {} .. {}",
            s.r, offsets[0], offsets[s.e]
        ));
    }
    let mut ranges = Vec::with_capacity(s.e);
    for w in offsets.windows(2) {
        if w[1] < w[0] {
            return value_err(format!(
                "offsets must be non-decreasing, got {} then {}",
                w[0], w[1]
            ));
        }
        ranges.push((w[0] as usize, w[1] as usize));
    }
    Ok(ranges)
}

/// Scratch budget of the backward's `a` and `dh` (bytes): experts are processed in waves whose
/// rows fit it (or, with many threads, at least two minimum-size tiles per thread). 24 MiB keeps
/// small layers in one wave (no extra barrier) and the large ones' extra memory small next to the
/// pre-activations the forward saves.
const WAVE_SCRATCH_BYTES: usize = 24 << 20;

/// Fewest rows in a tile: the `gemm` crate packs the expert's weights again for every tile, a
/// cost of about 1/rows of the tile's arithmetic.
const MIN_TILE_ROWS: usize = 64;

/// Groups consecutive experts into waves `(first, end)` (expert indices), each expert whole;
/// every expert belongs to exactly one wave, and experts without rows join a neighbour's wave.
///
/// The waves aim at the fewest that `budget_rows` allows, of about equal rows: each is closed
/// near an equal share of the rows, exceeding it by at most an eighth of the budget (and by less
/// than it would fall short without its last expert); an expert larger than that is a wave of
/// its own. Routed experts are never exactly equal, and filling
/// waves greedily up to the budget would make a small third wave out of 4096 rows of 8 experts
/// (495 + 561 + 501 + 524 > 2048): two more barriers and a wave too small for 16 threads (the
/// d = 256 backward took 17.0 ms instead of 13.9 ms with equal experts on the lent Xeon).
fn expert_waves(ranges: &[(usize, usize)], budget_rows: usize) -> Vec<(usize, usize)> {
    let total = match (ranges.first(), ranges.last()) {
        (Some(a), Some(b)) => b.1 - a.0,
        _ => 0,
    };
    let budget = budget_rows.max(1);
    let share = total.div_ceil(total.div_ceil(budget).max(1)).max(1);
    let slack = budget / 8;
    let mut waves = Vec::new();
    let mut first = 0;
    for e in 0..ranges.len() {
        let before = ranges[e].0 - ranges[first].0;
        let with_e = ranges[e].1 - ranges[first].0;
        let over = with_e.saturating_sub(share);
        let under = share.saturating_sub(before);
        if e > first && ranges[e].1 > ranges[e].0 && over > slack.min(under) {
            waves.push((first, e));
            first = e;
        }
    }
    if first < ranges.len() {
        waves.push((first, ranges.len()));
    }
    waves
}

/// Splits each expert's rows into tiles of about `rows_per_tile` rows: `(expert, start, end)`.
/// The tiles partition `0..R` in order.
pub(crate) fn row_tiles(
    ranges: &[(usize, usize)],
    rows_per_tile: usize,
) -> Vec<(usize, usize, usize)> {
    let mut tiles = Vec::new();
    for (e, &(lo, hi)) in ranges.iter().enumerate() {
        let n = hi - lo;
        if n == 0 {
            continue;
        }
        // Equal tiles rather than full tiles plus a sliver.
        let parts = n.div_ceil(rows_per_tile);
        let step = n.div_ceil(parts);
        let mut start = lo;
        while start < hi {
            let end = (start + step).min(hi);
            tiles.push((e, start, end));
            start = end;
        }
    }
    tiles
}

/// Tiles per thread and fewest rows per tile of [`tile_rows`]: 3 and [`MIN_TILE_ROWS`] unless
/// set otherwise for a measurement ([`set_tile_rows`]).
static TILES_PER_THREAD: AtomicUsize = AtomicUsize::new(3);
static TILE_FLOOR: AtomicUsize = AtomicUsize::new(MIN_TILE_ROWS);

/// Sets the row tiles' size rule (a diagnostic, so that tile sizes can be compared in one
/// process): about `per_thread` tiles per thread, at least `min_rows` rows each (at most 512).
pub fn set_tile_rows(per_thread: usize, min_rows: usize) -> KResult<()> {
    if per_thread == 0 || min_rows == 0 {
        return value_err(format!(
            "per_thread and min_rows must be at least 1, got {per_thread} and {min_rows}"
        ));
    }
    TILES_PER_THREAD.store(per_thread, Ordering::Relaxed);
    TILE_FLOOR.store(min_rows, Ordering::Relaxed);
    Ok(())
}

/// Rows per tile: about three tiles per thread (uneven experts still balance), but at least
/// [`MIN_TILE_ROWS`] (the rule [`set_tile_rows`] changes).
fn tile_rows(total_rows: usize, threads: usize) -> usize {
    let floor = TILE_FLOOR.load(Ordering::Relaxed).min(512);
    total_rows
        .div_ceil(TILES_PER_THREAD.load(Ordering::Relaxed) * threads.max(1))
        .next_multiple_of(16)
        .clamp(floor, 512)
}

/// Whether a call runs by column blocks ([`crate::expert_columns`]) instead of by row tiles:
/// when the row tiles would be short (each re-packs its expert's weights, a cost of about
/// 1/rows of its arithmetic) and the model is wide enough that `a` making a round trip through
/// memory costs less than that. On the lent 16-core Xeon at 16 threads the column layout took
/// the forward of d = 512 from 33-37 to 22.5 ms and of d = 256 from 7.3-9.2 to 6.1-6.4 ms.
/// MKL packs faster than the crate, so with MKL running the products ([`crate::blas`]) the
/// column layout pays off only for wider models: on the same Xeon at 16 threads (layouts
/// alternated in one process, `benches/tiling_ab.py`) the d = 512 layer step took 0.956x as long
/// by columns as by rows, the d = 256 step 1.046x; after the column layout's backward lost a
/// region per wave, 0.868x (d = 512, 8 threads) and 1.073x (d = 256, 16 threads; 0.976x for its
/// 64 experts of 8 per token, too small a gain for a rule of its own).
/// `MOERUST_EXPERT_LAYOUT=rows|columns` (read at the first call) or [`set_expert_layout`] forces
/// either layout, for measurements.
pub(crate) fn by_columns(s: &MlpShape, threads: usize) -> bool {
    match layout_setting() {
        LAYOUT_ROWS => false,
        LAYOUT_COLUMNS => true,
        _ => {
            let min_d = if crate::blas::active() {
                COLUMN_LAYOUT_MIN_D_MKL
            } else {
                COLUMN_LAYOUT_MIN_D
            };
            tile_rows(s.r, threads) < COLUMN_LAYOUT_BELOW_ROWS && s.d >= min_d
        }
    }
}

/// The layout in force: the last [`set_expert_layout`], else `MOERUST_EXPERT_LAYOUT` (read once).
fn layout_setting() -> usize {
    static FROM_ENV: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    match LAYOUT.load(Ordering::Relaxed) {
        LAYOUT_UNSET => {
            *FROM_ENV.get_or_init(|| match std::env::var("MOERUST_EXPERT_LAYOUT").as_deref() {
                Ok("rows") => LAYOUT_ROWS,
                Ok("columns") => LAYOUT_COLUMNS,
                _ => LAYOUT_AUTO,
            })
        }
        set => set,
    }
}

/// The layout set by [`set_expert_layout`]: one of the `LAYOUT_*` values.
static LAYOUT: AtomicUsize = AtomicUsize::new(LAYOUT_UNSET);
const LAYOUT_UNSET: usize = 0;
const LAYOUT_AUTO: usize = 1;
const LAYOUT_ROWS: usize = 2;
const LAYOUT_COLUMNS: usize = 3;

/// Sets the expert kernels' layout (a diagnostic, so that the layouts can be compared in one
/// process): `"auto"` (the rule of [`by_columns`]), `"rows"` or `"columns"`. Both layouts compute
/// the same products, so either is correct for any shape.
pub fn set_expert_layout(layout: &str) -> KResult<()> {
    let value = match layout {
        "auto" => LAYOUT_AUTO,
        "rows" => LAYOUT_ROWS,
        "columns" => LAYOUT_COLUMNS,
        other => {
            return value_err(format!(
                "layout must be 'auto', 'rows' or 'columns', got {other:?}"
            ))
        }
    };
    LAYOUT.store(value, Ordering::Relaxed);
    Ok(())
}

/// Row tiles shorter than this switch to the column layout (see [`by_columns`]).
const COLUMN_LAYOUT_BELOW_ROWS: usize = 256;

/// Narrowest model for the column layout (see [`by_columns`]).
const COLUMN_LAYOUT_MIN_D: usize = 128;

/// Narrowest model for the column layout when MKL runs the products (see [`by_columns`]).
const COLUMN_LAYOUT_MIN_D_MKL: usize = 512;

/// Pairs each tile's part with the tile's index and orders them by decreasing rows: the team takes
/// tasks in order, and handing out the largest first keeps the last tasks small, so threads
/// finish together when experts (and so tiles) differ in size (longest-processing-time order).
fn largest_first<P>(tiles: &[(usize, usize, usize)], parts: Vec<P>) -> Vec<(usize, P)> {
    let mut indexed: Vec<(usize, P)> = parts.into_iter().enumerate().collect();
    // Stable: equal tiles keep their order (and their cache-friendly expert grouping).
    indexed.sort_by_key(|&(i, _)| std::cmp::Reverse(tiles[i].2 - tiles[i].1));
    indexed
}

/// Cuts `buf` (rows of `width` entries) into the row ranges of `tiles`, which partition it in order.
fn split_by_tiles<'a, T>(
    mut buf: &'a mut [T],
    width: usize,
    tiles: &[(usize, usize, usize)],
) -> Vec<&'a mut [T]> {
    tiles
        .iter()
        .map(|&(_, start, end)| take_front(&mut buf, (end - start) * width))
        .collect()
}

/// Cuts the first `n` entries off `rest` and returns them; `rest` keeps the remainder.
fn take_front<'a, T>(rest: &mut &'a mut [T], n: usize) -> &'a mut [T] {
    let (head, tail) = std::mem::take(rest).split_at_mut(n);
    *rest = tail;
    head
}

fn check_sizes<T>(s: &MlpShape, xs: &[T], w1: &[T], w2: &[T]) -> KResult<()> {
    check_len("xs", xs.len(), s.r * s.d)?;
    check_len("w1", w1.len(), s.e * s.h1() * s.d)?;
    check_len("w2", w2.len(), s.e * s.d * s.f)
}

/// Forward: fills `h [R, H1]` (pre-activations, kept for the backward) and `out [R, d]`, split
/// over the team of [`crate::threads::with_team`].
pub fn expert_mlp_forward<T: MlpReal>(
    s: &MlpShape,
    xs: &[T],
    w1: &[T],
    w2: &[T],
    offsets: &[i64],
    h: &mut [T],
    out: &mut [T],
) -> KResult<()> {
    let columns = by_columns(s, team_size());
    forward_in(s, Rows::Given(xs), w1, w2, offsets, h, out, columns)
}

/// [`expert_mlp_forward`] whose rows are first gathered into `xs [R, d]` from `x [T, d]`
/// (`xs[r] = x[row_token[r]]`, as [`crate::dispatch::gather`]) — by each row tile for its own
/// rows, in the same parallel region, so the rows are still in cache for the tile's first
/// product (one fork/join and one pass over `xs` fewer than gathering first).
#[allow(clippy::too_many_arguments)]
pub fn expert_mlp_forward_gathered<T: MlpReal>(
    s: &MlpShape,
    x: &[T],
    t: usize,
    row_token: &[i64],
    xs: &mut [T],
    w1: &[T],
    w2: &[T],
    offsets: &[i64],
    h: &mut [T],
    out: &mut [T],
) -> KResult<()> {
    let columns = by_columns(s, team_size());
    let rows = Rows::Gather {
        x,
        t,
        row_token,
        xs,
    };
    forward_in(s, rows, w1, w2, offsets, h, out, columns)
}

/// Where a forward's rows `xs [R, d]` come from.
enum Rows<'a, T> {
    /// Already in `xs`.
    Given(&'a [T]),
    /// Gathered into `xs` from `x [T, d]` by `row_token`, each tile its own rows.
    Gather {
        x: &'a [T],
        t: usize,
        row_token: &'a [i64],
        xs: &'a mut [T],
    },
}

/// [`expert_mlp_forward`] in the column layout or not, as `columns` says (`rows`: see
/// [`Rows`]; the column layout gathers first, its blocks sharing rows between tasks).
#[allow(clippy::too_many_arguments)]
fn forward_in<T: MlpReal>(
    s: &MlpShape,
    rows: Rows<'_, T>,
    w1: &[T],
    w2: &[T],
    offsets: &[i64],
    h: &mut [T],
    out: &mut [T],
    columns: bool,
) -> KResult<()> {
    let (d, f, h1) = (s.d, s.f, s.h1());
    match &rows {
        Rows::Given(xs) => check_sizes(s, xs, w1, w2)?,
        Rows::Gather {
            x,
            t,
            row_token,
            xs,
        } => {
            check_len("x", x.len(), t * d)?;
            check_len("plan.row_token", row_token.len(), s.r)?;
            check_sizes(s, xs, w1, w2)?
        }
    }
    check_len("h", h.len(), s.r * h1)?;
    check_len("out", out.len(), s.r * d)?;
    let ranges = expert_ranges(offsets, s)?;
    if s.r == 0 {
        return Ok(());
    }
    let threads = team_size();
    let tiles = row_tiles(&ranges, tile_rows(s.r, threads));
    // Each tile's rows: a part of `xs` to gather into, or none (read from `given`).
    let (given, gather, xs_parts): (&[T], _, Vec<Option<&mut [T]>>) = match rows {
        Rows::Given(xs) => {
            if columns {
                crate::expert_columns::forward(s, xs, w1, w2, &ranges, h, out, threads);
                return Ok(());
            }
            (xs, None, tiles.iter().map(|_| None).collect())
        }
        Rows::Gather {
            x,
            t,
            row_token,
            xs,
        } => {
            if columns {
                // Column blocks share rows between tasks: gather first.
                crate::dispatch::gather(x, t, d, row_token, xs)?;
                crate::expert_columns::forward(s, xs, w1, w2, &ranges, h, out, threads);
                return Ok(());
            }
            let parts = split_by_tiles(xs, d, &tiles)
                .into_iter()
                .map(Some)
                .collect();
            (&[], Some((x, t, row_token)), parts)
        }
    };
    let parts = largest_first(
        &tiles,
        split_by_tiles(h, h1, &tiles)
            .into_iter()
            .zip(split_by_tiles(out, d, &tiles))
            .zip(xs_parts)
            .collect(),
    );
    try_for_each_part(
        threads,
        parts,
        |_, (i, ((h, out), xs_part))| -> KResult<()> {
            let (e, lo, hi) = tiles[i];
            let n = hi - lo;
            let rows: &[T] = match (xs_part, gather) {
                (Some(part), Some((x, t, row_token))) => {
                    for (dst, &tok) in part.chunks_exact_mut(d).zip(&row_token[lo..hi]) {
                        let tok = crate::dispatch::row_index("plan.row_token", tok, t)?;
                        dst.copy_from_slice(&x[tok * d..(tok + 1) * d]);
                    }
                    part
                }
                _ => &given[lo * d..hi * d],
            };
            let w1e = &w1[e * h1 * d..(e + 1) * h1 * d];
            let w2e = &w2[e * d * f..(e + 1) * d * f];
            matmul(
                n,
                h1,
                d,
                h,
                h1,
                rows,
                Strides::row_major(d),
                w1e,
                Strides::transposed(d),
            );
            T::with_tile_scratch(n * f, |a| {
                with_best_isa(
                    #[inline(always)]
                    || {
                        for (hr, ar) in h.chunks_exact(h1).zip(a.chunks_exact_mut(f)) {
                            act_forward(s.act, hr, ar);
                        }
                    },
                );
                matmul(
                    n,
                    d,
                    f,
                    out,
                    d,
                    a,
                    Strides::row_major(f),
                    w2e,
                    Strides::transposed(f),
                );
            });
            Ok(())
        },
    )
}

/// Gradients of the forward: `dxs [R, d]`, `dw1 [E, H1, d]`, `dw2 [E, d, F]` from the output
/// gradient `grad [R, d]` and the saved `xs` and `h`, split over the team of
/// [`crate::threads::with_team`].
#[allow(clippy::too_many_arguments)]
pub fn expert_mlp_backward<T: MlpReal>(
    s: &MlpShape,
    grad: &[T],
    xs: &[T],
    h: &[T],
    w1: &[T],
    w2: &[T],
    offsets: &[i64],
    dxs: &mut [T],
    dw1: &mut [T],
    dw2: &mut [T],
) -> KResult<()> {
    let grad = GradRows::Given(grad);
    expert_mlp_backward_from(s, grad, xs, h, w1, w2, offsets, dxs, dw1, dw2, None)
}

/// Where the expert backward's output gradient `grad [R, d]` comes from.
pub enum GradRows<'a, T> {
    /// Given.
    Given(&'a [T]),
    /// The combine's backward ([`crate::dispatch::combine_backward`]), each row tile computing
    /// its own rows in the tiles' parallel region (one fork/join fewer than computing them
    /// first, and the rows are in cache for the tile's first product).
    Combine(CombineGrad<'a, T>),
}

/// The combine's backward computed by the expert backward's tiles: `gys [R, d]` (the rows of
/// `grad`) and `dots [R]` (each row's dot product, for the weights' gradient:
/// [`crate::dispatch::weight_grads_from_dots`]).
pub struct CombineGrad<'a, T> {
    /// What the combine's backward reads (with `ys` None, the expert outputs are in `gys`).
    pub rows: CombineRows<'a, T>,
    /// `[R, d]` the rows of `grad`, filled by the backward.
    pub gys: &'a mut [T],
    /// `[R]` the rows' dot products, filled by the backward.
    pub dots: &'a mut [T],
}

impl<T: MlpReal> CombineGrad<'_, T> {
    fn check(&self, r: usize, d: usize) -> KResult<()> {
        check_len("grad_ys", self.gys.len(), r * d)?;
        check_len("plan.row_token", self.rows.row_token.len(), r)?;
        check_len("plan.row_slot", self.rows.row_slot.len(), r)?;
        check_len("dots", self.dots.len(), r)?;
        match self.rows.ys {
            Some(ys) => check_len("ys", ys.len(), r * d),
            None => Ok(()),
        }
    }
}

/// Work for the expert backward's last parallel region: tasks that need every row of its first
/// phase (`grad_xs [R, d]` and, when the combine's backward ran in it, the rows' dot products
/// `[R]`) but not the weight gradients. In the row layout they run after the last wave's
/// weight-gradient blocks, in the same region: one fork/join fewer than a region of their own,
/// and small tasks fill the region's tail. (In the column layout that region computes the last
/// rows of `grad_xs` too, so they run in a region of their own after it.)
pub trait AfterRows<T> {
    /// Makes the tasks for `grad_xs` and the dot products (None when the output gradient was
    /// given) and calls `run(n, task)` once: `task(i)` runs each `i < n` once, on any thread.
    /// Called on the calling thread between the two phases.
    fn run_with(
        &mut self,
        grad_xs: &[T],
        dots: Option<&[T]>,
        run: &mut dyn FnMut(usize, IndexTask<'_>) -> KResult<()>,
    ) -> KResult<()>;
}

/// [`expert_mlp_backward`] whose output gradient comes from `grad` ([`GradRows`]), with `after`'s
/// tasks (if any) run with the weight gradients.
#[allow(clippy::too_many_arguments)]
pub fn expert_mlp_backward_from<T: MlpReal>(
    s: &MlpShape,
    grad: GradRows<'_, T>,
    xs: &[T],
    h: &[T],
    w1: &[T],
    w2: &[T],
    offsets: &[i64],
    dxs: &mut [T],
    dw1: &mut [T],
    dw2: &mut [T],
    after: Option<&mut dyn AfterRows<T>>,
) -> KResult<()> {
    // The floor keeps every wave at least two minimum-size tiles per thread, so a wave still
    // spreads over the whole team.
    let row_bytes = std::mem::size_of::<T>() * (s.f + s.act.h1(s.f));
    let threads = team_size();
    let budget_rows = (WAVE_SCRATCH_BYTES / row_bytes.max(1)).max(2 * MIN_TILE_ROWS * threads);
    let columns = by_columns(s, threads);
    backward_in_waves(
        s,
        grad,
        xs,
        h,
        w1,
        w2,
        offsets,
        dxs,
        dw1,
        dw2,
        budget_rows,
        columns,
        after,
    )
}

/// A block of output rows of one expert's weight gradient: `(expert, of dW1 (else dW2), first
/// row, the rows)`.
type GradBlock<'b, T> = (usize, bool, usize, &'b mut [T]);

/// A task of a wave's second region in the column layout: a weight-gradient block or a block
/// of `dxs` ([`crate::expert_columns::DxBlocks`]).
enum WaveTask<'b, T> {
    Grad(GradBlock<'b, T>),
    Dx(usize),
}

/// Multiply-adds of a weight-gradient block (its outputs times its expert's rows).
fn grad_block_cost<T>(b: &GradBlock<'_, T>, ranges: &[(usize, usize)]) -> usize {
    (ranges[b.0].1 - ranges[b.0].0) * b.3.len()
}

/// Phase 2 of a wave of the expert backward, cut into blocks of output rows of each expert's
/// weight gradients ([`weight_grad_block`] computes one). Blocks of equal output size (dW1 rows
/// hold d entries, dW2 rows F), about three per thread, so the tasks balance; each still spans
/// at least 16 rows. Largest first (a block's cost grows with its expert's rows), so the tail
/// balances.
fn weight_grad_blocks<'b, T: MlpReal>(
    s: &MlpShape,
    (e_lo, e_hi): (usize, usize),
    ranges: &[(usize, usize)],
    (dw1_wave, dw2_wave): (&'b mut [T], &'b mut [T]),
    threads: usize,
) -> Vec<GradBlock<'b, T>> {
    let (d, f, h1) = (s.d, s.f, s.h1());
    let target = ((h1 + f) * d * (e_hi - e_lo)).div_ceil(3 * threads).max(1);
    let rows = |width: usize, limit: usize| target.div_ceil(width.max(1)).max(16).min(limit).max(1);
    let (block1, block2) = (rows(d, h1), rows(f, d));
    let mut blocks = Vec::new();
    for (el, (g1, g2)) in dw1_wave
        .chunks_mut(h1 * d)
        .zip(dw2_wave.chunks_mut(d * f))
        .enumerate()
    {
        for (i, c) in g1.chunks_mut(block1 * d).enumerate() {
            blocks.push((e_lo + el, true, i * block1, c));
        }
        for (i, c) in g2.chunks_mut(block2 * f).enumerate() {
            blocks.push((e_lo + el, false, i * block2, c));
        }
    }
    blocks.sort_by_key(|b| std::cmp::Reverse(grad_block_cost(b, ranges)));
    blocks
}

/// One block of [`weight_grad_blocks`]: `dW1_e = dh_e^T xs_e` or `dW2_e = grad_e^T a_e` (a sum
/// over the expert's rows, in row order); `a` and `dh` hold the wave's rows, from `row0`.
#[allow(clippy::too_many_arguments)]
fn weight_grad_block<T: MlpReal>(
    s: &MlpShape,
    (e, is_w1, i0, out): GradBlock<'_, T>,
    ranges: &[(usize, usize)],
    row0: usize,
    (a_all, dh_all): (&[T], &[T]),
    xs: &[T],
    grad: &[T],
) {
    let (d, f, h1) = (s.d, s.f, s.h1());
    let (lo, hi) = ranges[e];
    let n = hi - lo;
    if n == 0 {
        out.fill(T::ZERO); // an expert without rows has zero gradient
        return;
    }
    let (llo, lhi) = (lo - row0, hi - row0); // rows within the wave's scratch
    let (width, lhs, lhs_row, rhs) = if is_w1 {
        (d, &dh_all[llo * h1 + i0..lhi * h1], h1, &xs[lo * d..hi * d])
    } else {
        (f, &grad[lo * d + i0..hi * d], d, &a_all[llo * f..lhi * f])
    };
    matmul(
        out.len() / width,
        width,
        n,
        out,
        width,
        lhs,
        Strides::transposed(lhs_row),
        rhs,
        Strides::row_major(width),
    );
}

/// [`expert_mlp_backward`] with waves of at most `budget_rows` rows (an expert with more rows
/// is a wave of its own), in the column layout or not, as `columns` says.
#[allow(clippy::too_many_arguments)]
fn backward_in_waves<T: MlpReal>(
    s: &MlpShape,
    grad: GradRows<'_, T>,
    xs: &[T],
    h: &[T],
    w1: &[T],
    w2: &[T],
    offsets: &[i64],
    dxs: &mut [T],
    dw1: &mut [T],
    dw2: &mut [T],
    budget_rows: usize,
    columns: bool,
    mut after: Option<&mut dyn AfterRows<T>>,
) -> KResult<()> {
    check_sizes(s, xs, w1, w2)?;
    let (d, f, h1) = (s.d, s.f, s.h1());
    match &grad {
        GradRows::Given(g) => check_len("grad", g.len(), s.r * d)?,
        GradRows::Combine(c) => c.check(s.r, d)?,
    }
    check_len("h", h.len(), s.r * h1)?;
    check_len("dxs", dxs.len(), s.r * d)?;
    check_len("dw1", dw1.len(), w1.len())?;
    check_len("dw2", dw2.len(), w2.len())?;
    let ranges = expert_ranges(offsets, s)?;
    let threads = team_size();
    // `given`: the rows of `grad` when they exist before phase 1; else `fill` computes them,
    // each tile its own rows.
    // `dots_first`: the dot products when the combine's rows were computed first.
    type Fill<'c, T> = Option<CombineGrad<'c, T>>;
    let (given, mut fill, dots_first): (&[T], Fill<'_, T>, Option<&[T]>) = match grad {
        GradRows::Given(g) => (g, None, None),
        // The column layout's tasks share rows: every row of `grad` first. So on one thread,
        // where there is no region to save: the rows in order measured 1-2 % faster there
        // (`cargo run --release --example routed_backward_timing 1`).
        GradRows::Combine(c) if columns || threads == 1 => {
            c.rows.backward_all(c.gys, c.dots)?;
            (c.gys, None, Some(c.dots))
        }
        GradRows::Combine(c) => (&[], Some(c), None),
    };
    // Experts go through both phases in waves of consecutive experts whose rows fit the scratch
    // budget (an expert with more rows forms a wave of its own): the scratch for `a` and `dh` is
    // then one wave's rows rather than all R, which keeps the backward's peak memory near the
    // dense-active bound's for large layers. Each expert's sums are computed the same way in any
    // wave, so the waves do not change the results.
    let waves = expert_waves(&ranges, budget_rows);
    // The column layout's blocks of `dxs` follow the whole call's tiles (the region they share
    // with the weight gradients has tasks enough); those of `a` and `dh` follow each wave's.
    let call_tiles = if columns {
        crate::expert_columns::call_tiles(&ranges)
    } else {
        0
    };
    let wave_rows = waves
        .iter()
        .map(|&(lo, hi)| ranges[hi - 1].1 - ranges[lo].0)
        .max()
        .unwrap_or(0);
    let mut scratch = T::take_shared(wave_rows * (f + h1));
    // Each wave's experts of dw1 / dw2, cut off the front as the waves advance.
    let (mut dw1_rest, mut dw2_rest) = (dw1, dw2);
    for (wave, &(e_lo, e_hi)) in waves.iter().enumerate() {
        let (row0, row1) = (ranges[e_lo].0, ranges[e_hi - 1].1);
        let n_rows = row1 - row0;
        let dx_wave = &mut dxs[row0 * d..row1 * d];
        let dw1_wave = take_front(&mut dw1_rest, (e_hi - e_lo) * h1 * d);
        let dw2_wave = take_front(&mut dw2_rest, (e_hi - e_lo) * d * f);
        let (a_all, dh_all) = scratch[..n_rows * (f + h1)].split_at_mut(n_rows * f);

        // The column layout's first region: `a` and `dh` of the wave's rows (`dxs` joins the
        // weight gradients' region below).
        if columns && n_rows > 0 {
            crate::expert_columns::backward_act(
                s,
                given,
                h,
                w2,
                &ranges[e_lo..e_hi],
                e_lo,
                row0,
                a_all,
                dh_all,
                threads,
            );
        }
        // Phase 1, per row tile: da = grad W2_e, then a and dh from h, then dxs = dh W1_e.
        // `a` and `dh` are kept for the wave: the weight gradients need them summed over all of
        // an expert's rows. Tiles are placed relative to the wave's first row.
        if !columns && n_rows > 0 {
            let local: Vec<(usize, usize)> = ranges[e_lo..e_hi]
                .iter()
                .map(|&(lo, hi)| (lo - row0, hi - row0))
                .collect();
            // The tiles of the whole call where a wave still gives each thread one of them: a
            // small wave does not shrink the tiles (each tile packs its expert's weights again).
            let rows_per_tile = tile_rows(n_rows, threads)
                .max(tile_rows(s.r, threads).min(n_rows.div_ceil(threads)));
            let tiles = row_tiles(&local, rows_per_tile);
            let a_parts = split_by_tiles(&mut *a_all, f, &tiles);
            let dh_parts = split_by_tiles(&mut *dh_all, h1, &tiles);
            let dx_parts = split_by_tiles(&mut *dx_wave, d, &tiles);
            // With `fill`, each tile's rows of gys and dots, computed by the tile first.
            let fill_rows = fill.as_ref().map(|c| c.rows);
            let fill_parts: Vec<Option<(&mut [T], &mut [T])>> = match &mut fill {
                Some(c) => {
                    let gys = split_by_tiles(&mut c.gys[row0 * d..row1 * d], d, &tiles);
                    let dots = split_by_tiles(&mut c.dots[row0..row1], 1, &tiles);
                    gys.into_iter().zip(dots).map(Some).collect()
                }
                None => tiles.iter().map(|_| None).collect(),
            };
            let parts = largest_first(
                &tiles,
                a_parts
                    .into_iter()
                    .zip(dh_parts)
                    .zip(dx_parts)
                    .zip(fill_parts)
                    .collect(),
            );
            try_for_each_part(threads, parts, |_, (i, (((a, dh), dx), filled))| {
                let (el, lo, hi) = tiles[i];
                let (e, lo, hi) = (e_lo + el, lo + row0, hi + row0);
                let n = hi - lo;
                let grad_rows: &[T] = match (filled, fill_rows) {
                    // (ordinary stores: the tile reads its rows right away)
                    (Some((gys, dots)), Some(rows)) => {
                        rows.backward_block(lo, gys, dots, false)?;
                        gys
                    }
                    _ => &given[lo * d..hi * d],
                };
                let w1e = &w1[e * h1 * d..(e + 1) * h1 * d];
                let w2e = &w2[e * d * f..(e + 1) * d * f];
                T::with_tile_scratch(n * f, |da| {
                    matmul(
                        n,
                        f,
                        d,
                        da,
                        f,
                        grad_rows,
                        Strides::row_major(d),
                        w2e,
                        Strides::row_major(f),
                    );
                    with_best_isa(
                        #[inline(always)]
                        || {
                            let rows = h[lo * h1..hi * h1].chunks_exact(h1).zip(da.chunks_exact(f));
                            for ((hr, dar), (ar, dhr)) in
                                rows.zip(a.chunks_exact_mut(f).zip(dh.chunks_exact_mut(h1)))
                            {
                                act_backward(s.act, hr, dar, ar, dhr);
                            }
                        },
                    );
                });
                matmul(
                    n,
                    d,
                    h1,
                    dx,
                    d,
                    dh,
                    Strides::row_major(h1),
                    w1e,
                    Strides::row_major(d),
                );
                Ok(())
            })?;
        }
        // Every row of this wave's `grad` exists now.
        let grad: &[T] = match &fill {
            Some(c) => c.gys,
            None => given,
        };
        let blocks = weight_grad_blocks(s, (e_lo, e_hi), &ranges, (dw1_wave, dw2_wave), threads);
        let (ranges, scratch) = (&ranges[..], (&a_all[..], &dh_all[..]));
        let last = wave + 1 == waves.len();
        if columns {
            // The column layout's `dxs = dh W1_e` joins the weight gradients' region (both read
            // only `a` and `dh`); `after` needs every row of `dxs`, so it runs after the last
            // wave's region, in a region of its own.
            let dx = crate::expert_columns::DxBlocks::new(
                s,
                &ranges[e_lo..e_hi],
                e_lo,
                row0,
                scratch.1,
                w1,
                &mut *dx_wave,
                call_tiles,
                threads,
            );
            let mut tasks: Vec<(usize, WaveTask<'_, T>)> = (0..dx.len())
                .map(|i| (dx.cost(i), WaveTask::Dx(i)))
                .chain(
                    blocks
                        .into_iter()
                        .map(|b| (grad_block_cost(&b, ranges), WaveTask::Grad(b))),
                )
                .collect();
            // Largest first (stable: equal tasks keep their order).
            tasks.sort_by_key(|&(cost, _)| std::cmp::Reverse(cost));
            let tasks: Vec<WaveTask<'_, T>> = tasks.into_iter().map(|(_, t)| t).collect();
            let run = |task: WaveTask<'_, T>| {
                match task {
                    WaveTask::Grad(b) => weight_grad_block(s, b, ranges, row0, scratch, xs, grad),
                    WaveTask::Dx(i) => dx.run(i),
                }
                Ok(())
            };
            run_parts_then(threads, tasks, run, 0, &|_| Ok(()))?;
            if let Some(after) = after.as_deref_mut().filter(|_| last) {
                let dots = dots_first.or(fill.as_ref().map(|c| &*c.dots));
                after.run_with(&*dxs, dots, &mut |n, task| {
                    try_for_each_index(threads, n, task)
                })?;
            }
            continue;
        }
        let block = |b| {
            weight_grad_block(s, b, ranges, row0, scratch, xs, grad);
            Ok(())
        };
        // After the last wave's phase 1 every row of `dxs` (and of the dot products) exists:
        // `after`'s tasks join this region, after the weight gradients' blocks.
        let mut blocks = Some(blocks);
        if let Some(after) = after.as_deref_mut().filter(|_| last) {
            let dots = dots_first.or(fill.as_ref().map(|c| &*c.dots));
            after.run_with(&*dxs, dots, &mut |n, task| {
                let blocks = blocks.take().unwrap_or_default();
                run_parts_then(threads, blocks, block, n, task)
            })?;
        }
        if let Some(blocks) = blocks {
            // No after-work in this wave (or it ran no tasks): the weight gradients alone.
            run_parts_then(threads, blocks, block, 0, &|_| Ok(()))?;
        }
    }
    if let (Some(after), true) = (after, waves.is_empty()) {
        // No wave (no experts): the tasks run alone.
        let dots = dots_first.or(fill.as_ref().map(|c| &*c.dots));
        after.run_with(&*dxs, dots, &mut |n, task| {
            try_for_each_index(threads, n, task)
        })?;
    }
    T::give_back(scratch);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::threads::with_team;

    /// Plain triple loops in f64: the reference the kernels are checked against.
    fn reference(
        s: &MlpShape,
        xs: &[f64],
        w1: &[f64],
        w2: &[f64],
        offsets: &[i64],
        grad: &[f64],
    ) -> [Vec<f64>; 4] {
        let (d, f, h1) = (s.d, s.f, s.h1());
        let mut out = vec![0.0; s.r * d];
        let (mut dxs, mut dw1, mut dw2) =
            (vec![0.0; s.r * d], vec![0.0; w1.len()], vec![0.0; w2.len()]);
        for e in 0..s.e {
            for r in offsets[e] as usize..offsets[e + 1] as usize {
                let x = &xs[r * d..(r + 1) * d];
                let hrow: Vec<f64> = (0..h1)
                    .map(|i| (0..d).map(|j| w1[(e * h1 + i) * d + j] * x[j]).sum())
                    .collect();
                let mut a = vec![0.0; f];
                act_forward(s.act, &hrow, &mut a);
                for i in 0..d {
                    out[r * d + i] = (0..f).map(|j| w2[(e * d + i) * f + j] * a[j]).sum();
                }
                let g = &grad[r * d..(r + 1) * d];
                let da: Vec<f64> = (0..f)
                    .map(|j| (0..d).map(|i| g[i] * w2[(e * d + i) * f + j]).sum())
                    .collect();
                let (mut a2, mut dh) = (vec![0.0; f], vec![0.0; h1]);
                act_backward(s.act, &hrow, &da, &mut a2, &mut dh);
                for j in 0..d {
                    dxs[r * d + j] = (0..h1).map(|i| dh[i] * w1[(e * h1 + i) * d + j]).sum();
                }
                for i in 0..h1 {
                    for j in 0..d {
                        dw1[(e * h1 + i) * d + j] += dh[i] * x[j];
                    }
                }
                for i in 0..d {
                    for j in 0..f {
                        dw2[(e * d + i) * f + j] += g[i] * a2[j];
                    }
                }
            }
        }
        [out, dxs, dw1, dw2]
    }

    fn lcg(n: usize, seed: u64) -> Vec<f64> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 11) as f64 / (1u64 << 53) as f64) - 0.5
            })
            .collect()
    }

    /// The shape and offsets of experts with `counts` rows each.
    fn shape_of(counts: &[usize], d: usize, f: usize, act: Activation) -> (MlpShape, Vec<i64>) {
        let mut offsets = vec![0i64];
        for &c in counts {
            offsets.push(offsets.last().unwrap() + c as i64);
        }
        let r = counts.iter().sum();
        let s = MlpShape {
            r,
            d,
            e: counts.len(),
            f,
            act,
        };
        (s, offsets)
    }

    fn check(act: Activation, counts: &[usize], d: usize, f: usize) {
        let (s, offsets) = shape_of(counts, d, f, act);
        let r = s.r;
        let (xs, w1, w2, grad) = (
            lcg(r * d, 1),
            lcg(s.e * s.h1() * d, 2),
            lcg(s.e * d * f, 3),
            lcg(r * d, 4),
        );
        let want = reference(&s, &xs, &w1, &w2, &offsets, &grad);
        for columns in [false, true] {
            let got = run_layout(&s, &xs, &w1, &w2, &offsets, &grad, r, columns, r);
            compare(
                &got,
                &want,
                &format!("{act:?}, {counts:?}, columns {columns}"),
            );
        }
    }

    /// Forward and backward on a team of 3 in one layout: `[out, dxs, dw1, dw2]`.
    #[allow(clippy::too_many_arguments)]
    fn run_layout(
        s: &MlpShape,
        xs: &[f64],
        w1: &[f64],
        w2: &[f64],
        offsets: &[i64],
        grad: &[f64],
        r: usize,
        columns: bool,
        budget_rows: usize,
    ) -> [Vec<f64>; 4] {
        let d = s.d;
        let mut h = vec![0.0; r * s.h1()];
        let mut out = vec![7.0; r * d];
        with_team(3, usize::MAX, || {
            forward_in(
                s,
                Rows::Given(xs),
                w1,
                w2,
                offsets,
                &mut h,
                &mut out,
                columns,
            )
        })
        .unwrap();
        let (mut dxs, mut dw1, mut dw2) =
            (vec![7.0; r * d], vec![7.0; w1.len()], vec![7.0; w2.len()]);
        with_team(3, usize::MAX, || {
            backward_in_waves(
                s,
                GradRows::Given(grad),
                xs,
                &h,
                w1,
                w2,
                offsets,
                &mut dxs,
                &mut dw1,
                &mut dw2,
                budget_rows.max(1),
                columns,
                None,
            )
        })
        .unwrap();
        [out, dxs, dw1, dw2]
    }

    fn compare(got: &[Vec<f64>; 4], want: &[Vec<f64>; 4], what: &str) {
        let [out, dxs, dw1, dw2] = got;
        for (name, got, want) in [
            ("out", &out, &want[0]),
            ("dxs", &dxs, &want[1]),
            ("dw1", &dw1, &want[2]),
            ("dw2", &dw2, &want[3]),
        ] {
            for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-12 * (1.0 + w.abs()),
                    "{name}[{i}]: {g} vs {w} ({what})"
                );
            }
        }
    }

    #[test]
    fn matches_the_reference() {
        for act in [Activation::SwiGlu, Activation::Gelu] {
            check(act, &[3, 0, 5], 4, 6);
            check(act, &[1], 1, 1);
            check(act, &[0, 0], 3, 2);
            check(act, &[300, 7, 0, 129], 8, 5); // several tiles per expert
            check(act, &[1100, 0, 3, 520], 5, 37); // several column-layout tiles, odd blocks
        }
    }

    /// `(grad_xs, dots)` as an after-work task saw them.
    type Seen = (Vec<f64>, Option<Vec<f64>>);

    /// After-work whose one task copies what it was given (`grad_xs`, the dot products).
    #[derive(Default)]
    struct Snapshot(std::sync::Mutex<Option<Seen>>);

    impl AfterRows<f64> for Snapshot {
        fn run_with(
            &mut self,
            grad_xs: &[f64],
            dots: Option<&[f64]>,
            run: &mut dyn FnMut(usize, IndexTask<'_>) -> KResult<()>,
        ) -> KResult<()> {
            let seen = &self.0;
            run(1, &|_| {
                let copy = (grad_xs.to_vec(), dots.map(<[f64]>::to_vec));
                assert!(seen.lock().unwrap().replace(copy).is_none(), "one call");
                Ok(())
            })
        }
    }

    #[test]
    fn combine_in_the_tiles_equals_combine_first() {
        // The combine's backward computed by each phase-1 tile (or first, in the column layout)
        // gives the separate kernels' grad_ys, weight gradients and expert gradients bit for
        // bit, on a team, in waves or not, over ys or in its place; a bad token is an error.
        // After-work (`AfterRows`) gets every row of grad_xs and of the dot products.
        let (t, k, e, d, f) = (230usize, 3usize, 4usize, 5usize, 7usize);
        let idx: Vec<i64> = (0..t * k)
            .map(|i| ((i * 7919 + i / 3) % (e + 1)) as i64 - 1)
            .collect();
        let plan = crate::dispatch::dispatch_plan(&idx, t, k, e, None).unwrap();
        let r = plan.row_token.len();
        let s = MlpShape {
            r,
            d,
            e,
            f,
            act: Activation::SwiGlu,
        };
        let (xs, h, ys) = (lcg(r * d, 1), lcg(r * s.h1(), 2), lcg(r * d, 3));
        let (w1, w2) = (lcg(e * s.h1() * d, 4), lcg(e * d * f, 5));
        let (grad, weights) = (lcg(t * d, 6), lcg(t * k, 7));
        let (rt, rs, sr) = (&plan.row_token, &plan.row_slot, &plan.slot_row);
        for columns in [false, true] {
            for budget in [r, 60] {
                let run = |fused: bool, in_place: bool, tokens: &[i64]| {
                    let mut gys = if in_place {
                        ys.clone()
                    } else {
                        vec![7.0; r * d]
                    };
                    let mut dweights = vec![7.0; t * k];
                    let mut dots = vec![7.0; r];
                    let mut outs = (vec![7.0; r * d], vec![7.0; w1.len()], vec![7.0; w2.len()]);
                    let mut snapshot = Snapshot::default();
                    let res = with_team(3, usize::MAX, || -> KResult<()> {
                        let given;
                        let grad_rows = if fused {
                            GradRows::Combine(CombineGrad {
                                rows: CombineRows {
                                    grad: &grad,
                                    t,
                                    weights: &weights,
                                    d,
                                    ys: if in_place { None } else { Some(&ys[..]) },
                                    row_token: tokens,
                                    row_slot: rs,
                                },
                                gys: &mut gys,
                                dots: &mut dots,
                            })
                        } else {
                            let (g, w) = (&grad[..], &weights[..]);
                            if in_place {
                                crate::dispatch::combine_backward_in_place(
                                    g,
                                    &mut gys,
                                    w,
                                    d,
                                    tokens,
                                    rs,
                                    sr,
                                    &mut dweights,
                                )?;
                            } else {
                                crate::dispatch::combine_backward(
                                    g,
                                    &ys,
                                    w,
                                    d,
                                    tokens,
                                    rs,
                                    sr,
                                    &mut gys,
                                    &mut dweights,
                                )?;
                            }
                            given = gys.clone();
                            GradRows::Given(&given[..])
                        };
                        let (dxs, dw1, dw2) = (&mut outs.0, &mut outs.1, &mut outs.2);
                        backward_in_waves(
                            &s,
                            grad_rows,
                            &xs,
                            &h,
                            &w1,
                            &w2,
                            &plan.offsets,
                            dxs,
                            dw1,
                            dw2,
                            budget,
                            columns,
                            Some(&mut snapshot),
                        )
                    });
                    res.map(|_| {
                        // The after-work ran once, in the last region, with every row.
                        let seen = snapshot.0.into_inner().unwrap().expect("after's task ran");
                        assert_eq!(seen.0, outs.0, "grad_xs given to the after-work");
                        assert_eq!(seen.1, fused.then(|| dots.clone()), "dots given to it");
                        if fused {
                            crate::dispatch::weight_grads_from_dots(&dots, sr, &mut dweights)
                                .unwrap();
                        }
                        (gys, dweights, outs)
                    })
                };
                for in_place in [false, true] {
                    let what = format!("columns {columns}, budget {budget}, in place {in_place}");
                    let want = run(false, in_place, rt).unwrap();
                    assert_eq!(run(true, in_place, rt).unwrap(), want, "{what}");
                    let mut bad = rt.clone();
                    bad[r / 2] = t as i64;
                    assert!(run(true, in_place, &bad).is_err(), "{what}");
                }
            }
        }
    }

    #[test]
    fn gathering_in_the_tiles_equals_gathering_first() {
        // Rows gathered by each tile (or first, in the column layout) give the same xs, h and
        // out as dispatch::gather followed by the forward, bit for bit; a token out of range
        // is an error in either layout.
        let (t, d, f) = (50usize, 5usize, 7usize);
        let (s, offsets) = shape_of(&[300, 0, 41, 129], d, f, Activation::SwiGlu);
        let r = s.r;
        let x = lcg(t * d, 5);
        let row_token: Vec<i64> = (0..r).map(|i| ((i * 7919) % t) as i64).collect();
        let (w1, w2) = (lcg(s.e * s.h1() * d, 2), lcg(s.e * d * f, 3));
        let mut want_xs = vec![0.0; r * d];
        crate::dispatch::gather(&x, t, d, &row_token, &mut want_xs).unwrap();
        for columns in [false, true] {
            let run = |gathered: bool, tokens: &[i64]| {
                let (mut xs, mut h, mut out) =
                    (vec![7.0; r * d], vec![0.0; r * s.h1()], vec![0.0; r * d]);
                let res = with_team(3, usize::MAX, || {
                    if gathered {
                        let rows = Rows::Gather {
                            x: &x,
                            t,
                            row_token: tokens,
                            xs: &mut xs,
                        };
                        forward_in(&s, rows, &w1, &w2, &offsets, &mut h, &mut out, columns)
                    } else {
                        xs.copy_from_slice(&want_xs);
                        let rows = Rows::Given(&want_xs);
                        forward_in(&s, rows, &w1, &w2, &offsets, &mut h, &mut out, columns)
                    }
                });
                res.map(|_| (xs, h, out))
            };
            let got = run(true, &row_token).unwrap();
            assert_eq!(got, run(false, &row_token).unwrap(), "columns {columns}");
            assert_eq!(got.0, want_xs);
            let mut bad = row_token.clone();
            bad[r - 1] = t as i64;
            assert!(run(true, &bad).is_err(), "columns {columns}");
        }
    }

    #[test]
    fn waves_partition_the_experts() {
        let ranges = [(0, 3), (3, 3), (3, 10), (10, 11), (11, 11)];
        assert_eq!(expert_waves(&ranges, 4), vec![(0, 2), (2, 3), (3, 5)]);
        assert_eq!(expert_waves(&ranges, 100), vec![(0, 5)]);
        assert_eq!(expert_waves(&ranges, 1), vec![(0, 2), (2, 3), (3, 5)]);
        assert_eq!(expert_waves(&[(0, 0)], 1), vec![(0, 1)]);
        assert_eq!(expert_waves(&[], 8), vec![]);
        // Routed (uneven) experts: two waves of about half the rows, not 3 + 4 + 1 experts.
        let counts = [495usize, 561, 501, 524, 517, 488, 522, 488];
        let mut ranges = Vec::new();
        let mut row = 0;
        for c in counts {
            ranges.push((row, row + c));
            row += c;
        }
        assert_eq!(expert_waves(&ranges, 2048), vec![(0, 4), (4, 8)]);
        // The slack is bounded: a wave never exceeds its share by more than budget / 8.
        for budget in [100usize, 700, 1000, 1500, 2048, 3000] {
            let waves = expert_waves(&ranges, budget);
            let share = 4096usize.div_ceil(4096usize.div_ceil(budget));
            for &(a, b) in &waves {
                let rows = ranges[b - 1].1 - ranges[a].0;
                assert!(
                    b - a == 1 || rows <= share + budget / 8,
                    "{budget}: {rows} rows"
                );
            }
            assert_eq!(waves.first().unwrap().0, 0);
            assert_eq!(waves.last().unwrap().1, 8);
            assert!(waves.windows(2).all(|w| w[0].1 == w[1].0));
        }
    }

    #[test]
    fn waves_do_not_change_the_gradients() {
        let (d, f) = (5, 6);
        let (s, offsets) = shape_of(&[40, 0, 7, 90, 1, 0, 600], d, f, Activation::SwiGlu);
        let r = s.r;
        let (xs, w1, w2, grad) = (
            lcg(r * d, 5),
            lcg(s.e * s.h1() * d, 6),
            lcg(s.e * d * f, 7),
            lcg(r * d, 8),
        );
        for columns in [false, true] {
            let whole = run_layout(&s, &xs, &w1, &w2, &offsets, &grad, r, columns, r);
            for budget in [1, 8, 50, 100] {
                let waves = run_layout(&s, &xs, &w1, &w2, &offsets, &grad, r, columns, budget);
                assert_eq!(waves, whole, "budget {budget} rows, columns {columns}");
            }
        }
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64) - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), exp_f32(-87.0));
        // NaN inputs saturate inside exp, but the activations still return NaN (g multiplies in)
        let (mut a, mut dh) = ([0.0f32], [0.0f32; 2]);
        act_forward(Activation::SwiGlu, &[f32::NAN, 1.0], &mut a);
        assert!(a[0].is_nan());
        act_backward(
            Activation::SwiGlu,
            &[f32::NAN, 1.0],
            &[1.0],
            &mut a,
            &mut dh,
        );
        assert!(a[0].is_nan() && dh[0].is_nan());
    }

    #[test]
    fn bad_offsets_are_errors() {
        let s = MlpShape {
            r: 2,
            d: 1,
            e: 2,
            f: 1,
            act: Activation::Gelu,
        };
        let (xs, w1, w2) = (vec![0.0f32; 2], vec![0.0f32; 2], vec![0.0f32; 2]);
        let (mut h, mut out) = (vec![0.0f32; 2], vec![0.0f32; 2]);
        for offsets in [vec![0i64, 2], vec![0, 3, 2], vec![1, 1, 2], vec![0, 1, 3]] {
            assert!(
                expert_mlp_forward(&s, &xs, &w1, &w2, &offsets, &mut h, &mut out).is_err(),
                "{offsets:?}"
            );
        }
        assert!(Activation::parse("relu").is_err());
    }
}
