//! One error type for every kernel. The binding layer turns it into Python's ValueError or
//! TypeError in a single place (`python.rs`), so a bad argument never surfaces as a panic.

use std::fmt;

/// A kernel refused its input. The message names the offending argument.
#[derive(Debug, Clone, PartialEq)]
pub enum KernelError {
    /// The argument has the right type but a bad value (shape, range, NaN, ...).
    Value(String),
    /// The argument has the wrong type or dtype.
    Type(String),
    /// A gradient norm is NaN or infinite; `unit` is the tensor (or group) it belongs to.
    NonFinite { unit: usize, norm: f64 },
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::Value(m) | KernelError::Type(m) => f.write_str(m),
            KernelError::NonFinite { unit, norm } => {
                write!(f, "unit {unit}: gradient norm is not finite ({norm})")
            }
        }
    }
}

impl std::error::Error for KernelError {}

/// Result of a kernel.
pub type KResult<T> = Result<T, KernelError>;

/// Shorthand for a `KernelError::Value`.
pub fn value_err<T>(msg: impl Into<String>) -> KResult<T> {
    Err(KernelError::Value(msg.into()))
}

/// Fails with a message naming `arg` unless `got == expected`.
pub fn check_len(arg: &str, got: usize, expected: usize) -> KResult<()> {
    if got == expected {
        Ok(())
    } else {
        value_err(format!("{arg}: expected {expected} elements, got {got}"))
    }
}
