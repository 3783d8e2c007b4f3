//! The float types the kernels are generic over (f32 and f64).

use std::ops::{Add, AddAssign, Mul};

/// A float element type supported by the kernels.
pub trait Real:
    Copy + Send + Sync + PartialOrd + Add<Output = Self> + AddAssign + Mul<Output = Self> + 'static
{
    /// Additive identity.
    const ZERO: Self;
    /// Whether the value is NaN.
    fn is_nan(self) -> bool;
    /// Whether the value is finite.
    fn is_finite(self) -> bool;
    /// Rounds to f32 (round to nearest).
    fn to_f32(self) -> f32;
    /// Widens to f64.
    fn to_f64(self) -> f64;
    /// Rounds an f64 to this type.
    fn from_f64(v: f64) -> Self;
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            #[inline(always)]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            #[inline(always)]
            fn to_f32(self) -> f32 {
                self as f32
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);
