//! moerust's native kernels: router softmax, expert routing, dispatch/combine, LARS-style gradient scaling and
//! sliding-window masks. Each module is plain Rust over slices; `python.rs` (feature `python`)
//! is the only file that knows about Python.

pub mod balance;
pub mod blas;
pub mod dispatch;
pub mod error;
pub mod expert_columns;
pub mod expert_mlp;
pub mod isa;
pub mod lars;
pub mod omp_team;
pub mod pool;
pub mod real;
pub mod route_weights;
pub mod routed_experts;
pub mod router_backward;
pub mod router_forward;
pub mod routing;
pub mod softmax;
pub mod stream;
#[cfg(test)]
mod testing;
pub mod threads;
pub mod usage;
pub mod window_mask;

#[cfg(feature = "python")]
mod python;
