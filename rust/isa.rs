//! Runtime instruction-set selection. Wheels target baseline x86-64 (SSE2) so they run anywhere;
//! hot loops are re-compiled for AVX-512 or AVX2+FMA and picked at run time when the CPU has them. Rust never
//! contracts `a * b + c` into an FMA on its own, so both versions give bit-identical results.

/// Runs `f` compiled with AVX-512F (or else AVX2) and FMA enabled when the CPU supports them, else as is.
///
/// Pass the closure as `with_best_isa(#[inline(always)] || ...)`: only code inlined into the
/// `target_feature` functions below is compiled for the wider instruction set, and LLVM leaves a
/// closure of any size out of line unless told otherwise (it then runs on the SSE2 baseline;
/// measured 2-4x slower on the activation, softmax and routing loops).
#[inline(always)]
pub fn with_best_isa<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: `avx512` only requires the AVX-512F, AVX2 and FMA features, detected just above.
            return unsafe { avx512(f) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: `avx2` only requires the AVX2 and FMA features, detected just above.
            return unsafe { avx2(f) };
        }
    }
    f()
}
