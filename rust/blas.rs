//! Matrix products on the BLAS torch itself carries, when Python registers it.
//!
//! Why: the x86-64 torch wheels link MKL and export its Fortran `sgemm_` / `dgemm_`. On the lent
//! Xeon, one-thread MKL ran the expert kernels' tile products (64 rows) 1.1-1.8x faster than the
//! `gemm` crate (forward tiles of d = 256: 130-135 against 74-75 GFLOP/s). Python looks the
//! symbols up in the library torch loaded and passes their addresses ([`register`]); without them
//! (other platforms, `MOERUST_GEMM=crate`, `cargo test`) the `gemm` crate runs every product.
//!
//! Each call runs on the calling thread only: MKL's thread count is set to 1 for this thread
//! around it (`MKL_Set_Num_Threads_Local`), because the callers already split the work over the
//! team and a product that spawned its own threads inside a task would oversubscribe the cores.

use std::ffi::c_char;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Row and column strides of a matrix operand (elements).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Strides {
    /// Distance between consecutive rows.
    pub rs: usize,
    /// Distance between consecutive columns.
    pub cs: usize,
}

impl Strides {
    /// A row-major matrix with rows of `width` entries.
    pub fn row_major(width: usize) -> Self {
        Strides { rs: width, cs: 1 }
    }

    /// The transpose of a row-major matrix with rows of `width` entries.
    pub fn transposed(width: usize) -> Self {
        Strides { rs: 1, cs: width }
    }

    /// Offset of the last element of a `rows x cols` operand.
    pub fn last_index(self, rows: usize, cols: usize) -> usize {
        (rows - 1) * self.rs + (cols - 1) * self.cs
    }
}

/// `?gemm_(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)`, every argument by
/// pointer, column-major, 32-bit integers (the LP64 interface torch links).
type FortranGemm<T> = unsafe extern "C" fn(
    *const c_char,
    *const c_char,
    *const i32,
    *const i32,
    *const i32,
    *const T,
    *const T,
    *const i32,
    *const T,
    *const i32,
    *const T,
    *mut T,
    *const i32,
);

/// `int MKL_Set_Num_Threads_Local(int nt)` (the C interface, by value; the lower-case export of
/// libtorch_cpu is the Fortran one, by pointer): returns the previous value (0 = the global setting).
type SetThreadsLocal = unsafe extern "C" fn(i32) -> i32;

static SGEMM: AtomicUsize = AtomicUsize::new(0);
static DGEMM: AtomicUsize = AtomicUsize::new(0);
static SET_THREADS_LOCAL: AtomicUsize = AtomicUsize::new(0);

/// Registers MKL's `sgemm_`, `dgemm_` and `MKL_Set_Num_Threads_Local` (all three, or 0 for all
/// three to go back to the `gemm` crate).
///
/// # Safety
/// Each address must be 0 or point to the function of that name and signature in a library that
/// stays loaded for the life of the process (torch never unloads libtorch_cpu).
pub unsafe fn register(sgemm: usize, dgemm: usize, set_threads_local: usize) {
    let all = sgemm != 0 && dgemm != 0 && set_threads_local != 0;
    let (s, d, t) = if all {
        (sgemm, dgemm, set_threads_local)
    } else {
        (0, 0, 0)
    };
    SET_THREADS_LOCAL.store(t, Ordering::Release);
    SGEMM.store(s, Ordering::Release);
    DGEMM.store(d, Ordering::Release);
}

/// Whether products run on the registered BLAS.
pub fn active() -> bool {
    SGEMM.load(Ordering::Acquire) != 0
}

/// Float types with a registered BLAS product.
pub trait BlasScalar: Copy {
    /// The registered `?gemm_` address for this type, 0 when none.
    fn gemm_address() -> usize;
}

impl BlasScalar for f32 {
    fn gemm_address() -> usize {
        SGEMM.load(Ordering::Acquire)
    }
}

impl BlasScalar for f64 {
    fn gemm_address() -> usize {
        DGEMM.load(Ordering::Acquire)
    }
}

/// One column-major call computing a row-major product (see [`fortran_call`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FortranCall {
    /// `b'N'` or `b'T'` for the first operand (`rhs^T`).
    pub transa: u8,
    /// `b'N'` or `b'T'` for the second operand (`lhs^T`).
    pub transb: u8,
    /// Rows of the column-major result (the row-major product's columns).
    pub m: i32,
    /// Columns of the column-major result (the row-major product's rows).
    pub n: i32,
    /// The inner dimension.
    pub k: i32,
    /// Leading dimension of the first operand as stored.
    pub lda: i32,
    /// Leading dimension of the second operand as stored.
    pub ldb: i32,
    /// Leading dimension of the result (the row-major destination's row stride).
    pub ldc: i32,
}

/// How one operand of the column-major call reads a matrix stored with strides `s`: as stored
/// (`N`, unit stride down its columns) or transposed (`T`), with its leading dimension, for a
/// `rows x cols` column-major operand. None when neither stride is 1 or the leading dimension is
/// too small for BLAS (it must be at least the stored matrix's row count, and at least 1).
fn operand(rows: usize, cols: usize, s: Strides) -> Option<(u8, usize)> {
    // As stored: element (i, j) at i + j*ld.
    if s.rs == 1 && (cols <= 1 || s.cs >= rows.max(1)) {
        return Some((b'N', s.cs.max(rows).max(1)));
    }
    // Transposed: the stored matrix is `cols x rows`, element (j, i) at j + i*ld.
    if s.cs == 1 && (rows <= 1 || s.rs >= cols.max(1)) {
        return Some((b'T', s.rs.max(cols).max(1)));
    }
    None
}

/// The column-major call for row-major `dst [m, n]` (rows `dst_rs` apart) `= lhs [m, k] · rhs
/// [k, n]`: column-major `dst^T [n, m] = rhs^T [n, k] · lhs^T [k, m]`. None when a layout or a size
/// does not fit BLAS (the caller then uses the `gemm` crate).
pub fn fortran_call(
    m: usize,
    n: usize,
    k: usize,
    dst_rs: usize,
    ls: Strides,
    rs: Strides,
) -> Option<FortranCall> {
    // rhs^T [n, k]: element (j, p) at j*rs.cs + p*rs.rs.
    let (transa, lda) = operand(
        n,
        k,
        Strides {
            rs: rs.cs,
            cs: rs.rs,
        },
    )?;
    // lhs^T [k, m]: element (p, i) at p*ls.cs + i*ls.rs.
    let (transb, ldb) = operand(
        k,
        m,
        Strides {
            rs: ls.cs,
            cs: ls.rs,
        },
    )?;
    if m > 1 && dst_rs < n {
        return None;
    }
    let int = |v: usize| i32::try_from(v).ok();
    Some(FortranCall {
        transa,
        transb,
        m: int(n)?,
        n: int(m)?,
        k: int(k)?,
        lda: int(lda)?,
        ldb: int(ldb)?,
        ldc: int(dst_rs.max(n).max(1))?,
    })
}

/// `dst [m, n] = lhs [m, k] · rhs [k, n]` on the registered BLAS, on this thread only. Returns
/// false (and writes nothing) when no BLAS is registered or the layout does not fit it.
///
/// # Safety
/// `lhs` and `rhs` must be valid for reads of every element their strides address for these
/// sizes, `dst` valid for writes of the `m x n` block with rows `dst_rs` apart, and nothing else
/// may touch that block during the call; it must not overlap the operands.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm<T: BlasScalar + crate::real::Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    lhs: *const T,
    ls: Strides,
    rhs: *const T,
    rs: Strides,
) -> bool {
    let addr = T::gemm_address();
    let set_local = SET_THREADS_LOCAL.load(Ordering::Acquire);
    if addr == 0 || set_local == 0 || m == 0 || n == 0 || k == 0 {
        return false;
    }
    let Some(c) = fortran_call(m, n, k, dst_rs, ls, rs) else {
        return false;
    };
    let (alpha, beta) = (T::from_f64(1.0), T::ZERO);
    let (ta, tb) = (c.transa as c_char, c.transb as c_char);
    // SAFETY: `register` guarantees the addresses are MKL's `?gemm_` for this `T` and
    // `MKL_Set_Num_Threads_Local`; `fortran_call` checked every leading dimension against the
    // sizes (BLAS would otherwise print an error and return without computing), so BLAS reads
    // exactly the operand elements the caller vouches for and writes only the `m x n` block
    // (beta = 0: `dst` is not read).
    unsafe {
        let f: FortranGemm<T> = std::mem::transmute::<usize, FortranGemm<T>>(addr);
        let set: SetThreadsLocal = std::mem::transmute::<usize, SetThreadsLocal>(set_local);
        let previous = set(1);
        f(
            &ta, &tb, &c.m, &c.n, &c.k, &alpha, rhs, &c.lda, lhs, &c.ldb, &beta, dst, &c.ldc,
        );
        set(previous);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference column-major `?gemm` (alpha = 1, beta = 0), as the BLAS standard defines it.
    fn reference(c: &FortranCall, a: &[f64], b: &[f64], out: &mut [f64]) {
        let (m, n, k) = (c.m as usize, c.n as usize, c.k as usize);
        let (lda, ldb, ldc) = (c.lda as usize, c.ldb as usize, c.ldc as usize);
        let op_a = |i: usize, p: usize| {
            if c.transa == b'N' {
                a[i + p * lda]
            } else {
                a[p + i * lda]
            }
        };
        let op_b = |p: usize, j: usize| {
            if c.transb == b'N' {
                b[p + j * ldb]
            } else {
                b[j + p * ldb]
            }
        };
        for i in 0..m {
            for j in 0..n {
                out[i + j * ldc] = (0..k).map(|p| op_a(i, p) * op_b(p, j)).sum();
            }
        }
    }

    #[test]
    fn fortran_call_computes_the_row_major_product() {
        for (m, n, k) in [
            (3, 4, 5),
            (1, 4, 5),
            (3, 1, 5),
            (3, 4, 1),
            (1, 1, 1),
            (7, 2, 9),
        ] {
            for (l_t, r_t) in [(false, false), (false, true), (true, false), (true, true)] {
                let ls = if l_t {
                    Strides::transposed(m)
                } else {
                    Strides::row_major(k)
                };
                let rs = if r_t {
                    Strides::transposed(k)
                } else {
                    Strides::row_major(n)
                };
                let dst_rs = n + 2;
                let lhs: Vec<f64> = (0..m * k).map(|i| (i as f64) * 0.5 - 1.0).collect();
                let rhs: Vec<f64> = (0..k * n).map(|i| 2.0 - (i as f64) * 0.25).collect();
                let c = fortran_call(m, n, k, dst_rs, ls, rs).expect("plain layouts fit BLAS");
                let mut out = vec![0.0; (m - 1) * dst_rs + n];
                reference(&c, &rhs, &lhs, &mut out);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|p| lhs[i * ls.rs + p * ls.cs] * rhs[p * rs.rs + j * rs.cs])
                            .sum();
                        assert_eq!(out[i * dst_rs + j], want, "m{m} n{n} k{k} {l_t} {r_t}");
                    }
                }
            }
        }
    }

    #[test]
    fn layouts_blas_cannot_take_are_refused() {
        // Neither stride 1.
        assert!(
            fortran_call(3, 4, 5, 4, Strides { rs: 10, cs: 2 }, Strides::row_major(4)).is_none()
        );
        // Destination rows overlap.
        assert!(fortran_call(3, 4, 5, 3, Strides::row_major(5), Strides::row_major(4)).is_none());
        // Sizes beyond 32-bit integers.
        let big = 1usize << 31;
        assert!(fortran_call(
            1,
            big,
            1,
            big,
            Strides::row_major(1),
            Strides::row_major(big)
        )
        .is_none());
    }

    #[test]
    fn without_registration_nothing_runs() {
        let mut dst = [7.0f32];
        // SAFETY: 1 x 1 operands and destination, all valid.
        let ran = unsafe {
            gemm(
                1,
                1,
                1,
                dst.as_mut_ptr(),
                1,
                [2.0f32].as_ptr(),
                Strides::row_major(1),
                [3.0f32].as_ptr(),
                Strides::row_major(1),
            )
        };
        assert!(!ran || dst[0] == 6.0);
    }
}
