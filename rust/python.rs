//! The binding layer: the only file that knows about Python. Each function checks contiguity,
//! borrows the numpy buffers (zero copy), runs the kernel with the GIL released inside a pool of
//! the requested size, and returns numpy arrays that torch wraps without copying.
//! Dtype dispatch is by name (`_f32` / `_f64`); the Python side picks the variant.

use numpy::ndarray::{ArrayViewD, IxDyn};
use numpy::{
    Element, PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyReadonlyArray3, PyReadonlyArrayDyn, PyReadwriteArray1, PyReadwriteArray2, PyReadwriteArray3,
    PyReadwriteArrayDyn, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyMemoryError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::balance;
use crate::dispatch;
use crate::error::KResult;
use crate::error::KernelError;
use crate::expert_mlp::{self, Activation, MlpShape};
use crate::lars;
use crate::pool;
use crate::route_weights;
use crate::routed_experts::{self, GradYs, PlanView, WeightGrads};
use crate::router_backward::{
    self, RouterAfterExperts, RouterBlocks, RouterGrads, RouterSaved, SlotGrads,
};
use crate::router_forward::{self, RouterOutputs, Selection};
use crate::routing::{self, ROUTE_COST};
use crate::softmax;
use crate::threads::with_team;
use crate::window_mask;

impl From<KernelError> for PyErr {
    fn from(e: KernelError) -> PyErr {
        match e {
            KernelError::Value(m) => PyValueError::new_err(m),
            KernelError::Type(m) => PyTypeError::new_err(m),
            // args = (message, unit, norm): the Python side names the parameter from the unit index.
            e @ KernelError::NonFinite { unit, norm } => {
                PyValueError::new_err((e.to_string(), unit, norm))
            }
        }
    }
}

/// Borrows a contiguous slice or raises ValueError naming `arg`.
macro_rules! slice {
    ($arr:expr, $arg:expr) => {
        $arr.as_slice()
            .map_err(|_| PyValueError::new_err(format!("{} must be C-contiguous", $arg)))?
    };
}

/// Borrows a contiguous mutable slice or raises ValueError naming `arg`.
macro_rules! slice_mut {
    ($arr:expr, $arg:expr) => {
        $arr.as_slice_mut()
            .map_err(|_| PyValueError::new_err(format!("{} must be C-contiguous", $arg)))?
    };
}

/// Runs a kernel of about `work` element operations with the GIL released. Kernels split their
/// tasks over torch's OpenMP team (`omp_team`), so they run on the calling thread, whose team is
/// the one torch uses, with at most `threads` threads (fewer for small work).
fn run_team<R: Send>(
    py: Python<'_>,
    threads: usize,
    work: usize,
    f: impl FnOnce() -> R + Send,
) -> R {
    py.detach(|| with_team(threads, work, f))
}

type Arr<'py> = Bound<'py, PyArray1<i64>>;

fn i64_array<'py>(py: Python<'py>, v: Vec<i64>) -> Arr<'py> {
    PyArray1::from_vec(py, v)
}

macro_rules! float_kernels {
    ($t:ty, $topk:ident, $topp:ident, $gather:ident, $gather_bw:ident, $combine:ident, $combine_bw:ident, $lars:ident) => {
        /// Top-k expert indices into `out [T, k]`.
        #[pyfunction]
        fn $topk<'py>(
            py: Python<'py>,
            probs: PyReadonlyArray2<'py, $t>,
            mut out: PyReadwriteArray2<'py, i64>,
            threads: usize,
        ) -> PyResult<()> {
            let (t, e, k) = (probs.shape()[0], probs.shape()[1], out.shape()[1]);
            let p = slice!(probs, "probs");
            let o = slice_mut!(out, "out");
            Ok(run_team(py, threads, t * e * ROUTE_COST, || {
                routing::topk_route(p, t, e, k, o)
            })?)
        }

        /// Top-p expert indices into `idx [T, max_k]` (-1 padded) and `counts [T]`; `p` holds one
        /// threshold or one per row.
        #[pyfunction]
        fn $topp<'py>(
            py: Python<'py>,
            probs: PyReadonlyArray2<'py, $t>,
            p: PyReadonlyArray1<'py, f32>,
            min_k: usize,
            mut idx: PyReadwriteArray2<'py, i64>,
            mut counts: PyReadwriteArray1<'py, i64>,
            threads: usize,
        ) -> PyResult<()> {
            let (t, e, max_k) = (probs.shape()[0], probs.shape()[1], idx.shape()[1]);
            let (pr, pv) = (slice!(probs, "probs"), slice!(p, "p"));
            let (ix, c) = (slice_mut!(idx, "idx"), slice_mut!(counts, "counts"));
            Ok(run_team(py, threads, t * e * ROUTE_COST, || {
                routing::topp_route(pr, t, e, pv, min_k, max_k, ix, c)
            })?)
        }

        /// `out[r] = x[row_token[r]]` into `out [R, d]`.
        #[pyfunction]
        fn $gather<'py>(
            py: Python<'py>,
            x: PyReadonlyArray2<'py, $t>,
            row_token: PyReadonlyArray1<'py, i64>,
            mut out: PyReadwriteArray2<'py, $t>,
            threads: usize,
        ) -> PyResult<()> {
            let (t, d) = (x.shape()[0], x.shape()[1]);
            let (xv, rt) = (slice!(x, "x"), slice!(row_token, "plan.row_token"));
            let o = slice_mut!(out, "out");
            Ok(run_team(py, threads, rt.len() * d, || {
                dispatch::gather(xv, t, d, rt, o)
            })?)
        }

        /// Backward of gather (per-token sum of its rows in slot order) into `out [T, d]`.
        #[pyfunction]
        fn $gather_bw<'py>(
            py: Python<'py>,
            grad: PyReadonlyArray2<'py, $t>,
            slot_row: PyReadonlyArray2<'py, i64>,
            mut out: PyReadwriteArray2<'py, $t>,
            threads: usize,
        ) -> PyResult<()> {
            let (r, d) = (grad.shape()[0], grad.shape()[1]);
            let t = slot_row.shape()[0];
            let (g, sr) = (slice!(grad, "grad"), slice!(slot_row, "plan.slot_row"));
            let o = slice_mut!(out, "out");
            Ok(run_team(py, threads, (sr.len() + t) * d, || {
                dispatch::gather_backward(g, r, d, sr, t, o)
            })?)
        }

        /// `out[t] = sum_j w[t,j] * ys[slot_row[t,j]]` into `out [T, d]`.
        #[pyfunction]
        fn $combine<'py>(
            py: Python<'py>,
            ys: PyReadonlyArray2<'py, $t>,
            weights: PyReadonlyArray2<'py, $t>,
            slot_row: PyReadonlyArray2<'py, i64>,
            mut out: PyReadwriteArray2<'py, $t>,
            threads: usize,
        ) -> PyResult<()> {
            let (r, d) = (ys.shape()[0], ys.shape()[1]);
            let t = slot_row.shape()[0];
            let (y, w, sr) = (
                slice!(ys, "ys"),
                slice!(weights, "weights"),
                slice!(slot_row, "plan.slot_row"),
            );
            let o = slice_mut!(out, "out");
            Ok(run_team(py, threads, (sr.len() + t) * d, || {
                dispatch::combine(y, r, d, w, sr, t, o)
            })?)
        }

        /// Backward of combine into `grad_ys [R, d]` and `grad_w [T, K]`.
        #[pyfunction]
        #[allow(clippy::too_many_arguments)]
        fn $combine_bw<'py>(
            py: Python<'py>,
            grad: PyReadonlyArray2<'py, $t>,
            ys: PyReadonlyArray2<'py, $t>,
            weights: PyReadonlyArray2<'py, $t>,
            row_token: PyReadonlyArray1<'py, i64>,
            row_slot: PyReadonlyArray1<'py, i64>,
            slot_row: PyReadonlyArray2<'py, i64>,
            mut grad_ys: PyReadwriteArray2<'py, $t>,
            mut grad_w: PyReadwriteArray2<'py, $t>,
            threads: usize,
        ) -> PyResult<()> {
            let d = ys.shape()[1];
            let (g, y, w) = (
                slice!(grad, "grad"),
                slice!(ys, "ys"),
                slice!(weights, "weights"),
            );
            let (rt, rs, sr) = (
                slice!(row_token, "plan.row_token"),
                slice!(row_slot, "plan.row_slot"),
                slice!(slot_row, "plan.slot_row"),
            );
            let (gys, gw) = (slice_mut!(grad_ys, "grad_ys"), slice_mut!(grad_w, "grad_w"));
            Ok(run_team(py, threads, 3 * y.len(), || {
                dispatch::combine_backward(g, y, w, d, rt, rs, sr, gys, gw)
            })?)
        }

        /// LARS / bidirectional scaling of contiguous gradient buffers (any shape) in place; returns
        /// unit ratios.
        #[pyfunction]
        #[allow(clippy::too_many_arguments)]
        fn $lars<'py>(
            py: Python<'py>,
            weights: &Bound<'py, PyList>,
            grads: &Bound<'py, PyList>,
            unit: Vec<usize>,
            n_units: usize,
            mode: &str,
            options: (f64, f64, f64, Option<(f64, f64)>, f64, f64, f64),
            threads: usize,
        ) -> PyResult<Vec<f64>> {
            let (eta, weight_decay, eps, clip, target, lo, hi) = options;
            let mode = match mode {
                "lars" => lars::Mode::Lars {
                    eta,
                    weight_decay,
                    eps,
                    clip,
                },
                "bidirectional" => lars::Mode::Bidirectional {
                    target,
                    lo,
                    hi,
                    eps,
                },
                other => {
                    return Err(PyValueError::new_err(format!(
                        "mode must be 'lars' or 'bidirectional', got {other:?}"
                    )))
                }
            };
            let ws: Vec<PyReadonlyArrayDyn<'py, $t>> = weights
                .iter()
                .map(|o| {
                    o.extract().map_err(|_| {
                        PyTypeError::new_err("params: each weight must be a contiguous float array")
                    })
                })
                .collect::<PyResult<_>>()?;
            // Borrowing each gradient mutably also rejects the same buffer listed twice.
            let mut gs: Vec<PyReadwriteArrayDyn<'py, $t>> = grads
                .iter()
                .map(|o| {
                    o.extract().map_err(|_| {
                        PyValueError::new_err(
                            "params: each gradient must be a distinct writable array",
                        )
                    })
                })
                .collect::<PyResult<_>>()?;
            let wsl: Vec<&[$t]> = ws
                .iter()
                .map(|a| Ok(slice!(a, "params (weight)")))
                .collect::<PyResult<_>>()?;
            let mut gsl: Vec<&mut [$t]> = gs
                .iter_mut()
                .map(|a| {
                    a.as_slice_mut().map_err(|_| {
                        PyValueError::new_err("params (gradient) must be C-contiguous")
                    })
                })
                .collect::<PyResult<_>>()?;
            let work = 3 * gsl.iter().map(|g| g.len()).sum::<usize>();
            Ok(run_team(py, threads, work, || {
                lars::scale_grads(&wsl, &mut gsl, &unit, n_units, mode)
            })?)
        }
    };
}

float_kernels!(
    f32,
    topk_route_f32,
    topp_route_f32,
    gather_f32,
    gather_backward_f32,
    combine_f32,
    combine_backward_f32,
    lars_f32
);
float_kernels!(
    f64,
    topk_route_f64,
    topp_route_f64,
    gather_f64,
    gather_backward_f64,
    combine_f64,
    combine_backward_f64,
    lars_f64
);

/// The shape of an expert-MLP call from `xs [R, d]` and `w2 [E, d, F]`.
fn mlp_shape(xs: &[usize], w2: &[usize], activation: &str) -> PyResult<MlpShape> {
    Ok(MlpShape {
        r: xs[0],
        d: xs[1],
        e: w2[0],
        f: w2[2],
        act: Activation::parse(activation)?,
    })
}

/// Multiply-adds of an expert-MLP forward, for sizing the team.
fn mlp_work(s: &MlpShape) -> usize {
    s.r.saturating_mul(s.d)
        .saturating_mul(s.f)
        .saturating_mul(3)
}

macro_rules! mlp_kernels {
    ($t:ty, $fwd:ident, $bwd:ident) => {
        /// Expert MLP forward into `h [R, H1]` and `out [R, d]`.
        #[pyfunction]
        #[allow(clippy::too_many_arguments)]
        fn $fwd<'py>(
            py: Python<'py>,
            xs: PyReadonlyArray2<'py, $t>,
            w1: PyReadonlyArray3<'py, $t>,
            w2: PyReadonlyArray3<'py, $t>,
            offsets: PyReadonlyArray1<'py, i64>,
            activation: &str,
            mut h: PyReadwriteArray2<'py, $t>,
            mut out: PyReadwriteArray2<'py, $t>,
            threads: usize,
        ) -> PyResult<()> {
            let s = mlp_shape(xs.shape(), w2.shape(), activation)?;
            let (x, a, b, off) = (
                slice!(xs, "xs"),
                slice!(w1, "w1"),
                slice!(w2, "w2"),
                slice!(offsets, "offsets"),
            );
            let (hv, o) = (slice_mut!(h, "h"), slice_mut!(out, "out"));
            Ok(run_team(py, threads, mlp_work(&s), || {
                expert_mlp::expert_mlp_forward(&s, x, a, b, off, hv, o)
            })?)
        }

        /// Expert MLP backward into `dxs [R, d]`, `dw1 [E, H1, d]` and `dw2 [E, d, F]`.
        #[pyfunction]
        #[allow(clippy::too_many_arguments)]
        fn $bwd<'py>(
            py: Python<'py>,
            grad: PyReadonlyArray2<'py, $t>,
            xs: PyReadonlyArray2<'py, $t>,
            h: PyReadonlyArray2<'py, $t>,
            w1: PyReadonlyArray3<'py, $t>,
            w2: PyReadonlyArray3<'py, $t>,
            offsets: PyReadonlyArray1<'py, i64>,
            activation: &str,
            mut dxs: PyReadwriteArray2<'py, $t>,
            mut dw1: PyReadwriteArray3<'py, $t>,
            mut dw2: PyReadwriteArray3<'py, $t>,
            threads: usize,
        ) -> PyResult<()> {
            let s = mlp_shape(xs.shape(), w2.shape(), activation)?;
            let (g, x, hv) = (slice!(grad, "grad"), slice!(xs, "xs"), slice!(h, "h"));
            let (a, b, off) = (
                slice!(w1, "w1"),
                slice!(w2, "w2"),
                slice!(offsets, "offsets"),
            );
            let (dx, da, db) = (
                slice_mut!(dxs, "dxs"),
                slice_mut!(dw1, "dw1"),
                slice_mut!(dw2, "dw2"),
            );
            Ok(run_team(py, threads, 2 * mlp_work(&s), || {
                expert_mlp::expert_mlp_backward(&s, g, x, hv, a, b, off, dx, da, db)
            })?)
        }
    };
}

macro_rules! routed_expert_kernels {
    ($t:ty, $fwd:ident, $bwd:ident) => {
        /// Gather -> expert MLPs -> combine into `xs [R, d]`, `h [R, H1]`, `ys [R, d]` (kept for
        /// the backward) and `y [T, d]`.
        #[pyfunction]
        #[allow(clippy::too_many_arguments)]
        fn $fwd<'py>(
            py: Python<'py>,
            x: PyReadonlyArray2<'py, $t>,
            weights: PyReadonlyArray2<'py, $t>,
            plan: PlanArrays<'py>,
            w1: PyReadonlyArray3<'py, $t>,
            w2: PyReadonlyArray3<'py, $t>,
            activation: &str,
            mut xs: PyReadwriteArray2<'py, $t>,
            mut h: PyReadwriteArray2<'py, $t>,
            mut ys: PyReadwriteArray2<'py, $t>,
            mut y: PyReadwriteArray2<'py, $t>,
            threads: usize,
        ) -> PyResult<()> {
            let s = mlp_shape(xs.shape(), w2.shape(), activation)?;
            let t = x.shape()[0];
            let (xv, wv, a, b) = (
                slice!(x, "x"),
                slice!(weights, "weights"),
                slice!(w1, "w1"),
                slice!(w2, "w2"),
            );
            let view = plan_view(&plan)?;
            let (xsv, hv, ysv, yv) = (
                slice_mut!(xs, "xs"),
                slice_mut!(h, "h"),
                slice_mut!(ys, "ys"),
                slice_mut!(y, "y"),
            );
            // The expert kernel's work sizes the team, as in `expert_mlp_forward`: same team,
            // same bits as the separate ops.
            Ok(run_team(py, threads, mlp_work(&s), || {
                routed_experts::routed_experts_forward(&s, xv, t, wv, view, a, b, xsv, hv, ysv, yv)
            })?)
        }

        /// Backward of the routed experts from `grad [T, d]` into `dx [T, d]`, `dweights [T, K]`,
        /// `dw1` and `dw2`. `grad_ys` (`[R, d]` scratch) may be None: the gradient of the expert
        /// outputs then overwrites `ys`. `grad_xs` (`[R, d]`) is scratch.
        #[pyfunction]
        #[allow(clippy::too_many_arguments, clippy::type_complexity)]
        fn $bwd<'py>(
            py: Python<'py>,
            grad: PyReadonlyArray2<'py, $t>,
            saved: (PyReadonlyArray2<'py, $t>, PyReadonlyArray2<'py, $t>),
            mut ys: PyReadwriteArray2<'py, $t>,
            grad_ys: Option<PyReadwriteArray2<'py, $t>>,
            weights: PyReadonlyArray2<'py, $t>,
            plan: PlanArrays<'py>,
            w1: PyReadonlyArray3<'py, $t>,
            w2: PyReadonlyArray3<'py, $t>,
            activation: &str,
            mut grad_xs: PyReadwriteArray2<'py, $t>,
            outputs: (
                PyReadwriteArray2<'py, $t>,
                PyReadwriteArray2<'py, $t>,
                PyReadwriteArray3<'py, $t>,
                PyReadwriteArray3<'py, $t>,
            ),
            threads: usize,
        ) -> PyResult<()> {
            let (xs, h) = saved;
            let s = mlp_shape(xs.shape(), w2.shape(), activation)?;
            let t = grad.shape()[0];
            let saved = (slice!(xs, "xs"), slice!(h, "h"));
            let (g, wv, a, b) = (
                slice!(grad, "grad"),
                slice!(weights, "weights"),
                slice!(w1, "w1"),
                slice!(w2, "w2"),
            );
            let view = plan_view(&plan)?;
            let mut grad_ys = grad_ys;
            let target = match grad_ys.as_mut() {
                Some(scratch) => GradYs::Scratch {
                    ys: slice!(ys, "ys"),
                    grad_ys: slice_mut!(scratch, "grad_ys"),
                },
                None => GradYs::OverYs(slice_mut!(ys, "ys")),
            };
            let gxs = slice_mut!(grad_xs, "grad_xs");
            let (mut dx, mut dw, mut dw1, mut dw2) = outputs;
            let (dxv, dwv, da, db) = (
                slice_mut!(dx, "dx"),
                slice_mut!(dw, "dweights"),
                slice_mut!(dw1, "dw1"),
                slice_mut!(dw2, "dw2"),
            );
            let experts_work = 2 * mlp_work(&s);
            Ok(run_team(py, threads, experts_work, || {
                routed_experts::routed_experts_backward(
                    &s, g, t, saved, target, wv, view, a, b, gxs, dxv, dwv, da, db,
                )
            })?)
        }
    };
}

/// A dispatch plan's arrays as Python passes them: `(row_token, row_slot, slot_row, offsets)`.
type PlanArrays<'py> = (
    PyReadonlyArray1<'py, i64>,
    PyReadonlyArray1<'py, i64>,
    PyReadonlyArray2<'py, i64>,
    PyReadonlyArray1<'py, i64>,
);

fn plan_view<'a>(plan: &'a PlanArrays<'_>) -> PyResult<PlanView<'a>> {
    Ok(PlanView {
        row_token: slice!(plan.0, "plan.row_token"),
        row_slot: slice!(plan.1, "plan.row_slot"),
        slot_row: slice!(plan.2, "plan.slot_row"),
        offsets: slice!(plan.3, "plan.offsets"),
    })
}

routed_expert_kernels!(f32, routed_experts_forward_f32, routed_experts_backward_f32);
routed_expert_kernels!(f64, routed_experts_forward_f64, routed_experts_backward_f64);

macro_rules! softmax_kernels {
    ($t:ty, $fwd:ident, $bwd:ident) => {
        /// Softmax of each row of `logits [T, E]` into `out [T, E]`.
        #[pyfunction]
        fn $fwd<'py>(
            py: Python<'py>,
            logits: PyReadonlyArray2<'py, $t>,
            mut out: PyReadwriteArray2<'py, $t>,
            threads: usize,
        ) -> PyResult<()> {
            let (t, e) = (logits.shape()[0], logits.shape()[1]);
            let x = slice!(logits, "logits");
            let o = slice_mut!(out, "out");
            Ok(run_team(py, threads, t * e * ROUTE_COST, || {
                softmax::softmax_rows(x, t, e, o)
            })?)
        }

        /// Backward of the row softmax from its output `probs` into `out [T, E]`.
        #[pyfunction]
        fn $bwd<'py>(
            py: Python<'py>,
            grad: PyReadonlyArray2<'py, $t>,
            probs: PyReadonlyArray2<'py, $t>,
            mut out: PyReadwriteArray2<'py, $t>,
            threads: usize,
        ) -> PyResult<()> {
            let (t, e) = (probs.shape()[0], probs.shape()[1]);
            let (g, p) = (slice!(grad, "grad"), slice!(probs, "probs"));
            let o = slice_mut!(out, "out");
            Ok(run_team(py, threads, t * e * 3, || {
                softmax::softmax_backward_rows(g, p, t, e, o)
            })?)
        }
    };
}

macro_rules! route_weight_kernels {
    ($t:ty, $fwd:ident, $bwd:ident) => {
        /// Weights `out [T, K]` of the slots `idx [T, K]` from `probs [T, E]`.
        #[pyfunction]
        fn $fwd<'py>(
            py: Python<'py>,
            probs: PyReadonlyArray2<'py, $t>,
            idx: PyReadonlyArray2<'py, i64>,
            renormalize: bool,
            mut out: PyReadwriteArray2<'py, $t>,
            threads: usize,
        ) -> PyResult<()> {
            let (t, e, k) = (probs.shape()[0], probs.shape()[1], idx.shape()[1]);
            let (p, ix) = (slice!(probs, "probs"), slice!(idx, "idx"));
            let o = slice_mut!(out, "out");
            Ok(run_team(py, threads, t * (k + e), || {
                route_weights::route_weights(p, t, e, ix, k, renormalize, o)
            })?)
        }

        /// Gradient `out [T, E]` of the routing weights from their gradient `grad [T, K]`.
        #[pyfunction]
        #[allow(clippy::too_many_arguments)]
        fn $bwd<'py>(
            py: Python<'py>,
            grad: PyReadonlyArray2<'py, $t>,
            probs: PyReadonlyArray2<'py, $t>,
            idx: PyReadonlyArray2<'py, i64>,
            renormalize: bool,
            mut out: PyReadwriteArray2<'py, $t>,
            threads: usize,
        ) -> PyResult<()> {
            let (t, e, k) = (probs.shape()[0], probs.shape()[1], idx.shape()[1]);
            let (g, p, ix) = (
                slice!(grad, "grad"),
                slice!(probs, "probs"),
                slice!(idx, "idx"),
            );
            let o = slice_mut!(out, "out");
            Ok(run_team(py, threads, t * (k + e), || {
                route_weights::route_weights_backward(g, p, t, e, ix, k, renormalize, o)
            })?)
        }
    };
}

macro_rules! balance_kernels {
    ($t:ty, $name:ident) => {
        /// Each expert's share of the kept slots into `share [E]`; returns the Switch balance
        /// loss of `probs [T, E]` and `idx [T, K]`.
        #[pyfunction]
        fn $name<'py>(
            py: Python<'py>,
            probs: PyReadonlyArray2<'py, $t>,
            idx: PyReadonlyArray2<'py, i64>,
            mut share: PyReadwriteArray1<'py, $t>,
            threads: usize,
        ) -> PyResult<f64> {
            let (t, e, k) = (probs.shape()[0], probs.shape()[1], idx.shape()[1]);
            let (p, ix) = (slice!(probs, "probs"), slice!(idx, "idx"));
            let l = slice_mut!(share, "share");
            Ok(run_team(py, threads, t * (k + e), || {
                balance::switch_balance(p, t, e, ix, k, l)
            })?)
        }
    };
}

balance_kernels!(f32, switch_balance_f32);
balance_kernels!(f64, switch_balance_f64);

/// A router's backward arguments as Python passes them (`ops/router_backward.py`): the
/// gradients of its probabilities and logits (when used elsewhere), of its balance loss with the
/// experts' shares, the saved `(x, router_weight, probs, idx)`, `renormalize`, the temperature,
/// and `dweight [E, d]` to write.
type RouterArgs<'py, T> = (
    Option<PyReadonlyArray2<'py, T>>,
    Option<PyReadonlyArray2<'py, T>>,
    Option<(T, PyReadonlyArray1<'py, T>)>,
    (
        PyReadonlyArray2<'py, T>,
        PyReadonlyArray2<'py, T>,
        PyReadonlyArray2<'py, T>,
        PyReadonlyArray2<'py, i64>,
    ),
    bool,
    T,
    PyReadwriteArray2<'py, T>,
);

/// Borrows `RouterArgs` as the kernel's views: `(saved, grads without the weights' gradient,
/// [T, E, K, d], dweight)`.
#[allow(clippy::type_complexity)]
fn router_views<'a, T: Element + Copy>(
    args: &'a mut RouterArgs<'_, T>,
) -> PyResult<(
    RouterSaved<'a, T>,
    RouterGrads<'a, T>,
    [usize; 4],
    &'a mut [T],
)> {
    let (grad_probs, grad_logits, balance, saved, renormalize, temperature, dweight) = args;
    let (x, weight, probs, idx) = &*saved;
    let dims = [x.shape()[0], probs.shape()[1], idx.shape()[1], x.shape()[1]];
    let s = RouterSaved {
        x: slice!(x, "x"),
        weight: slice!(weight, "router_weight"),
        probs: slice!(probs, "probs"),
        idx: slice!(idx, "idx"),
        renormalize: *renormalize,
        temperature: *temperature,
    };
    let g = RouterGrads {
        weights: SlotGrads::Given(&[]),
        probs: match &*grad_probs {
            Some(a) => Some(slice!(a, "grad_probs")),
            None => None,
        },
        logits: match &*grad_logits {
            Some(a) => Some(slice!(a, "grad_logits")),
            None => None,
        },
        balance: match &*balance {
            Some((c, share)) => Some((*c, slice!(share, "share"))),
            None => None,
        },
    };
    Ok((s, g, dims, slice_mut!(dweight, "dweight")))
}

macro_rules! router_backward_kernels {
    ($t:ty, $name:ident) => {
        /// A router's whole backward: adds its gradient of `x` to `dx [T, d]` and writes
        /// `dweight [E, d]` from the gradient of its weights and `router` (`RouterArgs`).
        #[pyfunction]
        fn $name<'py>(
            py: Python<'py>,
            grad_weights: PyReadonlyArray2<'py, $t>,
            mut router: RouterArgs<'py, $t>,
            mut dx: PyReadwriteArray2<'py, $t>,
            threads: usize,
        ) -> PyResult<()> {
            let (s, mut g, dims, dwv) = router_views(&mut router)?;
            g.weights = SlotGrads::Given(slice!(grad_weights, "grad_weights"));
            let dxv = slice_mut!(dx, "dx");
            let [t, e, k, d] = dims;
            Ok(run_team(py, threads, 0, || {
                router_backward::router_backward(&s, t, e, k, d, &g, dxv, dwv)
            })?)
        }
    };
}

router_backward_kernels!(f32, router_backward_f32);
router_backward_kernels!(f64, router_backward_f64);

macro_rules! router_forward_kernels {
    ($t:ty, $name:ident) => {
        /// A router's whole forward from `x [T, d]` and `weight [E, d]` into `outputs = (logits,
        /// probs, idx, weights, share)`; top-k with `k`, or top-p with `topp = (p, min_k, max_k,
        /// counts [T])`. Returns the balance loss.
        #[pyfunction]
        #[allow(clippy::too_many_arguments, clippy::type_complexity)]
        fn $name<'py>(
            py: Python<'py>,
            x: PyReadonlyArray2<'py, $t>,
            weight: PyReadonlyArray2<'py, $t>,
            temperature: $t,
            renormalize: bool,
            k: usize,
            topp: Option<(
                PyReadonlyArray1<'py, f32>,
                usize,
                usize,
                PyReadwriteArray1<'py, i64>,
            )>,
            outputs: (
                PyReadwriteArray2<'py, $t>,
                PyReadwriteArray2<'py, $t>,
                PyReadwriteArray2<'py, i64>,
                PyReadwriteArray2<'py, $t>,
                PyReadwriteArray1<'py, $t>,
            ),
            threads: usize,
        ) -> PyResult<f64> {
            let (t, d, e) = (x.shape()[0], x.shape()[1], weight.shape()[0]);
            if weight.shape()[1] != d {
                return Err(PyValueError::new_err(format!(
                    "router_weight must have {d} columns (x's features), got shape {:?}",
                    weight.shape()
                )));
            }
            let (xv, wv) = (slice!(x, "x"), slice!(weight, "router_weight"));
            let (mut logits, mut probs, mut idx, mut weights, mut share) = outputs;
            let out = RouterOutputs {
                logits: slice_mut!(logits, "logits"),
                probs: slice_mut!(probs, "probs"),
                idx: slice_mut!(idx, "idx"),
                weights: slice_mut!(weights, "weights"),
                share: slice_mut!(share, "share"),
            };
            let mut topp = topp;
            let selection = match topp.as_mut() {
                Some((p, min_k, max_k, counts)) => Selection::TopP {
                    p: slice!(p, "p"),
                    min_k: *min_k,
                    max_k: *max_k,
                    counts: slice_mut!(counts, "counts"),
                },
                None => Selection::TopK(k),
            };
            Ok(py.detach(|| {
                router_forward::router_forward(
                    xv,
                    t,
                    d,
                    wv,
                    e,
                    temperature,
                    renormalize,
                    selection,
                    out,
                    threads,
                )
            })?)
        }
    };
}

router_forward_kernels!(f32, router_forward_f32);
router_forward_kernels!(f64, router_forward_f64);

/// An uninitialised pooled output array (see `pooled_array`), typed.
fn pooled<'py, T: Element>(
    py: Python<'py>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    Ok(pooled_array::<T>(py, shape)?.cast_into::<PyArrayDyn<T>>()?)
}

/// Each expert's capacity for `routed` slots: `ceil(factor * routed / E)`, in the same f64
/// operations as the Python layer's `MoE.capacity`; None (dropless) without a factor.
fn expert_capacity(factor: Option<f64>, routed: usize, e: usize) -> Option<usize> {
    factor.map(|f| (f * routed as f64 / e as f64).ceil() as usize)
}

/// What the one-node forward keeps for its backward besides the layer's inputs and router
/// outputs: the expert buffers `xs [R, d]`, `h [R, H1]`, `ys [R, d]` and the dispatch plan.
struct Kept<T: pool::Plain> {
    xs: pool::PoolVec<T>,
    h: pool::PoolVec<T>,
    ys: pool::PoolVec<T>,
    plan: dispatch::Plan,
}

/// The one-node layer's kept buffers ([`Kept`]) as one opaque Python object, held by the
/// autograd node between the forward and backward calls. Why not numpy arrays: nothing outside
/// the node reads them, and seven arrays (each with its owner object, and borrow checks when
/// passed back) cost more per step than a small layer's kernels.
#[pyclass(module = "moerust._native")]
struct LayerBuffers {
    kept: KeptOf,
}

/// [`Kept`] of either float type.
enum KeptOf {
    F32(Kept<f32>),
    F64(Kept<f64>),
}

/// Wraps and unwraps [`Kept`] of one float type in [`KeptOf`].
trait KeptFloat: pool::Plain + Sized {
    fn wrap(kept: Kept<Self>) -> KeptOf;
    fn unwrap(kept: &mut KeptOf) -> Option<&mut Kept<Self>>;
}

impl KeptFloat for f32 {
    fn wrap(kept: Kept<f32>) -> KeptOf {
        KeptOf::F32(kept)
    }
    fn unwrap(kept: &mut KeptOf) -> Option<&mut Kept<f32>> {
        match kept {
            KeptOf::F32(k) => Some(k),
            KeptOf::F64(_) => None,
        }
    }
}

impl KeptFloat for f64 {
    fn wrap(kept: Kept<f64>) -> KeptOf {
        KeptOf::F64(kept)
    }
    fn unwrap(kept: &mut KeptOf) -> Option<&mut Kept<f64>> {
        match kept {
            KeptOf::F64(k) => Some(k),
            KeptOf::F32(_) => None,
        }
    }
}

/// A pooled buffer of `len` elements, or MemoryError.
fn pool_vec<T: pool::Plain>(len: usize) -> PyResult<pool::PoolVec<T>> {
    pool::PoolVec::new(len).ok_or_else(|| {
        PyMemoryError::new_err(format!(
            "cannot allocate {len} elements of {} bytes",
            std::mem::size_of::<T>()
        ))
    })
}

/// The layer's saved inputs and router outputs: `(x, router_weight, w1, w2, probs, idx, share,
/// weights)`.
type LayerSaved<'py, T> = (
    PyReadonlyArray2<'py, T>,
    PyReadonlyArray2<'py, T>,
    PyReadonlyArray3<'py, T>,
    PyReadonlyArray3<'py, T>,
    PyReadonlyArray2<'py, T>,
    PyReadonlyArray2<'py, i64>,
    PyReadonlyArray1<'py, T>,
    PyReadonlyArray2<'py, T>,
);

/// Gradients of the layer's router outputs used outside it: `(weights [T, K], probs [T, E],
/// logits [T, E], balance loss)`, each optional.
type OutsideGrads<'py, T> = (
    Option<PyReadonlyArray2<'py, T>>,
    Option<PyReadonlyArray2<'py, T>>,
    Option<PyReadonlyArray2<'py, T>>,
    Option<T>,
);

macro_rules! moe_layer_kernels {
    ($t:ty, $fwd:ident, $bwd:ident) => {
        /// The MoE layer's one-node forward (`nn/fused.py`) in one call: the router's whole
        /// forward (top-k with `k`, or top-p with `topp = (p, min_k, max_k)`), the dispatch plan
        /// (capacity `ceil(capacity_factor * routed / E)`, or dropless) and the routed experts —
        /// the kernels of the separate calls, in their order — with every output allocated here.
        /// With `stats = (ema [E], steps (0-d), beta, training)` the usage EMA and step count
        /// are updated in place from the plan's counts (`usage::ema_update`, when training).
        /// Returns `(dropped, capacity, steps, ema after the update (a list, with stats), plan
        /// counts (a list), [balance loss (0-d), balance_weight * loss (0-d), y, logits, probs,
        /// idx, counts, weights, share], kept)`: `kept` (a [`LayerBuffers`]) holds the expert
        /// buffers and the plan for the backward.
        #[pyfunction]
        #[allow(clippy::too_many_arguments, clippy::type_complexity)]
        fn $fwd<'py>(
            py: Python<'py>,
            x: PyReadonlyArray2<'py, $t>,
            router_weight: PyReadonlyArray2<'py, $t>,
            w1: PyReadonlyArray3<'py, $t>,
            w2: PyReadonlyArray3<'py, $t>,
            temperature: $t,
            renormalize: bool,
            k: usize,
            topp: Option<(f32, usize, usize)>,
            capacity_factor: Option<f64>,
            activation: &str,
            balance_weight: f64,
            stats: Option<(
                PyReadwriteArray1<'py, f64>,
                PyReadwriteArrayDyn<'py, i64>,
                f64,
                bool,
            )>,
            threads: usize,
        ) -> PyResult<(
            i64,
            Option<usize>,
            Option<i64>,
            Option<Vec<f64>>,
            Vec<i64>,
            Vec<Bound<'py, PyAny>>,
            Bound<'py, LayerBuffers>,
        )> {
            let (t, d, e) = (x.shape()[0], x.shape()[1], router_weight.shape()[0]);
            let (s1, s2) = (w1.shape(), w2.shape());
            if router_weight.shape()[1] != d || s1[0] != e || s2[0] != e || s1[2] != d || s2[1] != d
            {
                return Err(PyValueError::new_err(format!(
                    "x {:?}, router_weight {:?}, w1 {s1:?} and w2 {s2:?} do not make one layer",
                    x.shape(),
                    router_weight.shape()
                )));
            }
            let slots = topp.map_or(k, |(_, _, max_k)| max_k);
            crate::omp_team::mark("forward: arguments read");
            let (xv, rv, a, b) = (
                slice!(x, "x"),
                slice!(router_weight, "router_weight"),
                slice!(w1, "w1"),
                slice!(w2, "w2"),
            );
            // The router.
            let logits = pooled::<$t>(py, &[t, e])?;
            let probs = pooled::<$t>(py, &[t, e])?;
            let idx = pooled::<i64>(py, &[t, slots])?;
            let weights = pooled::<$t>(py, &[t, slots])?;
            let share = pooled::<$t>(py, &[e])?;
            let counts = pooled::<i64>(py, &[t])?;
            crate::omp_team::mark("forward: router outputs allocated");
            let (loss, routed) = {
                let (mut lg, mut pr, mut ix, mut wt, mut sh, mut ct) = (
                    logits.readwrite(),
                    probs.readwrite(),
                    idx.readwrite(),
                    weights.readwrite(),
                    share.readwrite(),
                    counts.readwrite(),
                );
                let out = RouterOutputs {
                    logits: slice_mut!(lg, "logits"),
                    probs: slice_mut!(pr, "probs"),
                    idx: slice_mut!(ix, "idx"),
                    weights: slice_mut!(wt, "weights"),
                    share: slice_mut!(sh, "share"),
                };
                let cv = slice_mut!(ct, "counts");
                py.detach(|| -> KResult<(f64, usize)> {
                    let p = [topp.map_or(0.0, |(p, _, _)| p)];
                    let selection = match topp {
                        Some((_, min_k, max_k)) => Selection::TopP {
                            p: &p,
                            min_k,
                            max_k,
                            counts: &mut *cv,
                        },
                        None => {
                            cv.fill(k as i64);
                            Selection::TopK(k)
                        }
                    };
                    let loss = router_forward::router_forward(
                        xv,
                        t,
                        d,
                        rv,
                        e,
                        temperature,
                        renormalize,
                        selection,
                        out,
                        threads,
                    )?;
                    Ok((loss, cv.iter().map(|&c| c.max(0) as usize).sum()))
                })?
            };
            crate::omp_team::mark("forward: router done");
            // The dispatch plan.
            let capacity = expert_capacity(capacity_factor, routed, e);
            let plan = {
                let ix = idx.readonly();
                let ixv = slice!(ix, "idx");
                run_team(py, threads, 4 * ixv.len(), || {
                    dispatch::dispatch_plan(ixv, t, slots, e, capacity)
                })?
            };
            crate::omp_team::mark("forward: plan done");
            // The routed experts.
            let s = mlp_shape(&[plan.row_token.len(), d], s2, activation)?;
            let mut xs = pool_vec::<$t>(s.r * d)?;
            let mut h = pool_vec::<$t>(s.r * s1[1])?;
            let mut ys = pool_vec::<$t>(s.r * d)?;
            let y = pooled::<$t>(py, &[t, d])?;
            {
                let wt = weights.readonly();
                let mut yw = y.readwrite();
                let wv = slice!(wt, "weights");
                let (xsv, hv, ysv, yv) = (
                    xs.as_mut_slice(),
                    h.as_mut_slice(),
                    ys.as_mut_slice(),
                    slice_mut!(yw, "y"),
                );
                let view = PlanView::from(&plan);
                crate::omp_team::mark("forward: expert buffers ready");
                run_team(py, threads, mlp_work(&s), || {
                    routed_experts::routed_experts_forward(
                        &s, xv, t, wv, view, a, b, xsv, hv, ysv, yv,
                    )
                })?;
            }
            crate::omp_team::mark("forward: experts done");
            // The usage statistics.
            let mut steps = None;
            let mut ema_now = None;
            if let Some((mut ema, mut step, beta, training)) = stats {
                let (ev, sv) = (slice_mut!(ema, "ema"), slice_mut!(step, "steps"));
                if ev.len() != e || sv.len() != 1 {
                    return Err(PyValueError::new_err(format!(
                        "stats buffers must hold {e} and 1 values, got {} and {}",
                        ev.len(),
                        sv.len()
                    )));
                }
                if training {
                    crate::usage::ema_update(ev, &plan.counts, beta);
                    sv[0] += 1;
                }
                steps = Some(sv[0]);
                ema_now = Some(ev.to_vec());
            }
            let dropped = plan.dropped;
            let plan_counts = plan.counts.clone();
            let loss = loss as $t;
            let scalar =
                |v: $t| numpy::PyArray::from_owned_array(py, numpy::ndarray::arr0(v)).into_any();
            let arrays = vec![
                scalar(loss),
                scalar(balance_weight as $t * loss),
                y.into_any(),
                logits.into_any(),
                probs.into_any(),
                idx.into_any(),
                counts.into_any(),
                weights.into_any(),
                share.into_any(),
            ];
            let kept = LayerBuffers {
                kept: <$t>::wrap(Kept { xs, h, ys, plan }),
            };
            crate::omp_team::mark("forward: outputs made");
            Ok((
                dropped,
                capacity,
                steps,
                ema_now,
                plan_counts,
                arrays,
                Bound::new(py, kept)?,
            ))
        }

        /// The one-node layer's backward in one call, from `grad [T, d]` (the gradient of `y`),
        /// what the forward saved and kept, and the gradients of the router outputs used
        /// outside the layer: the routed experts' backward and (with `router`) the router's
        /// whole backward, whose blocks run in the experts' weight-gradient region, each making
        /// its slots' weight gradient from the combine's dot products. With
        /// `overwrite_ys` the expert outputs' gradient is written over `ys`. Returns `(dx,
        /// d_router_weight or None, dw1, dw2)`.
        #[pyfunction]
        #[allow(clippy::too_many_arguments, clippy::type_complexity)]
        fn $bwd<'py>(
            py: Python<'py>,
            grad: PyReadonlyArray2<'py, $t>,
            saved: LayerSaved<'py, $t>,
            kept: &Bound<'py, LayerBuffers>,
            outside: OutsideGrads<'py, $t>,
            renormalize: bool,
            temperature: $t,
            activation: &str,
            overwrite_ys: bool,
            router: bool,
            threads: usize,
        ) -> PyResult<(
            Bound<'py, PyAny>,
            Option<Bound<'py, PyAny>>,
            Bound<'py, PyAny>,
            Bound<'py, PyAny>,
        )> {
            crate::omp_team::mark("backward: arguments read");
            let (x, router_weight, w1, w2, probs, idx, share, weights) = saved;
            let mut kept = kept.try_borrow_mut()?;
            let Kept { xs, h, ys, plan } = <$t>::unwrap(&mut kept.kept)
                .ok_or_else(|| PyTypeError::new_err("kept: buffers of another dtype"))?;
            let (grad_weights, grad_probs, grad_logits, grad_balance) = outside;
            let (t, e, k, d) = (x.shape()[0], probs.shape()[1], idx.shape()[1], x.shape()[1]);
            let s = mlp_shape(&[plan.row_token.len(), d], w2.shape(), activation)?;
            let dx = pooled::<$t>(py, &[t, d])?;
            let dw1 = pooled::<$t>(py, w1.shape())?;
            let dw2 = pooled::<$t>(py, w2.shape())?;
            let dwr = if router {
                Some(pooled::<$t>(py, &[e, d])?)
            } else {
                None
            };
            let mut grad_xs = pool_vec::<$t>(s.r * d)?;
            let mut grad_ys = if overwrite_ys {
                None
            } else {
                Some(pool_vec::<$t>(s.r * d)?)
            };
            {
                let (mut dxw, mut dw1w, mut dw2w) =
                    (dx.readwrite(), dw1.readwrite(), dw2.readwrite());
                let mut dwrw = dwr.as_ref().map(|a| a.readwrite());
                let target = match grad_ys.as_mut() {
                    Some(scratch) => GradYs::Scratch {
                        ys: ys.as_slice(),
                        grad_ys: scratch.as_mut_slice(),
                    },
                    None => GradYs::OverYs(ys.as_mut_slice()),
                };
                let (dxv, da, db, gxs) = (
                    slice_mut!(dxw, "dx"),
                    slice_mut!(dw1w, "dw1"),
                    slice_mut!(dw2w, "dw2"),
                    grad_xs.as_mut_slice(),
                );
                let dwrv = match dwrw.as_mut() {
                    Some(a) => Some(slice_mut!(a, "d_router_weight")),
                    None => None,
                };
                let (g, a, b, wv) = (
                    slice!(grad, "grad"),
                    slice!(w1, "w1"),
                    slice!(w2, "w2"),
                    slice!(weights, "weights"),
                );
                let kept = (xs.as_slice(), h.as_slice());
                let view = PlanView::from(&*plan);
                let rs = RouterSaved {
                    x: slice!(x, "x"),
                    weight: slice!(router_weight, "router_weight"),
                    probs: slice!(probs, "probs"),
                    idx: slice!(idx, "idx"),
                    renormalize,
                    temperature,
                };
                let extra = match &grad_weights {
                    Some(a) => Some(slice!(a, "grad_weights")),
                    None => None,
                };
                let rg = RouterGrads {
                    weights: SlotGrads::Given(&[]),
                    probs: match &grad_probs {
                        Some(a) => Some(slice!(a, "grad_probs")),
                        None => None,
                    },
                    logits: match &grad_logits {
                        Some(a) => Some(slice!(a, "grad_logits")),
                        None => None,
                    },
                    balance: match grad_balance {
                        Some(c) => Some((c, slice!(share, "share"))),
                        None => None,
                    },
                };
                crate::omp_team::mark("backward: buffers ready");
                py.detach(|| -> KResult<()> {
                    let Some(dwrv) = dwrv else {
                        // (the routing weights' gradient is of no use without the router's)
                        let dw = &mut vec![<$t>::default(); t * k][..];
                        return with_team(threads, 2 * mlp_work(&s), || {
                            routed_experts::routed_experts_backward(
                                &s, g, t, kept, target, wv, view, a, b, gxs, dxv, dw, da, db,
                            )
                        });
                    };
                    // With the router's gradients, the router's blocks run in the experts'
                    // weight-gradient region, each first summing its tokens' rows into dx.
                    with_team(threads, 2 * mlp_work(&s), || {
                        let mut router = RouterAfterExperts {
                            blocks: RouterBlocks::new(t, e, d),
                            saved: &rs,
                            grads: rg,
                            grad_weights: extra,
                            shape: &s,
                            slot_row: view.slot_row,
                            k,
                            dx: dxv,
                        };
                        let after = WeightGrads::After(&mut router);
                        routed_experts::routed_experts_backward_rows(
                            &s, g, kept, target, wv, view, a, b, gxs, after, da, db,
                        )?;
                        crate::omp_team::mark("backward: experts and router done");
                        router.blocks.finish(dwrv)
                    })
                })?;
            }
            crate::omp_team::mark("backward: done");
            Ok((
                dx.into_any(),
                dwr.map(|a| a.into_any()),
                dw1.into_any(),
                dw2.into_any(),
            ))
        }
    };
}

moe_layer_kernels!(f32, moe_forward_f32, moe_backward_f32);
moe_layer_kernels!(f64, moe_forward_f64, moe_backward_f64);

route_weight_kernels!(f32, route_weights_f32, route_weights_backward_f32);
route_weight_kernels!(f64, route_weights_f64, route_weights_backward_f64);

softmax_kernels!(f32, softmax_f32, softmax_backward_f32);
softmax_kernels!(f64, softmax_f64, softmax_backward_f64);

mlp_kernels!(f32, expert_mlp_forward_f32, expert_mlp_backward_f32);
mlp_kernels!(f64, expert_mlp_forward_f64, expert_mlp_backward_f64);

/// Dispatch plan: (counts, offsets, row_token, row_slot, slot_row flat `[T*K]`, dropped).
#[pyfunction]
#[pyo3(signature = (idx, num_experts, capacity, threads))]
#[allow(clippy::type_complexity)]
fn dispatch_plan<'py>(
    py: Python<'py>,
    idx: PyReadonlyArray2<'py, i64>,
    num_experts: usize,
    capacity: Option<usize>,
    threads: usize,
) -> PyResult<(Arr<'py>, Arr<'py>, Arr<'py>, Arr<'py>, Arr<'py>, i64)> {
    let (t, k) = (idx.shape()[0], idx.shape()[1]);
    let ix = slice!(idx, "idx");
    let p = run_team(py, threads, 4 * ix.len(), || {
        dispatch::dispatch_plan(ix, t, k, num_experts, capacity)
    })?;
    Ok((
        i64_array(py, p.counts),
        i64_array(py, p.offsets),
        i64_array(py, p.row_token),
        i64_array(py, p.row_slot),
        i64_array(py, p.slot_row),
        p.dropped,
    ))
}

/// The kernels' window: Python passes 0 for "no window".
fn window_limit(window: usize) -> usize {
    if window == 0 {
        usize::MAX
    } else {
        window
    }
}

/// Sliding-window mask into `out [B*q_len, k_len]` (bool); `window = 0` means unbounded.
#[pyfunction]
#[pyo3(signature = (q_len, k_len, window, doc_ids, out, threads))]
fn sliding_window_mask<'py>(
    py: Python<'py>,
    q_len: usize,
    k_len: usize,
    window: usize,
    doc_ids: Option<PyReadonlyArray2<'py, i64>>,
    mut out: PyReadwriteArray1<'py, bool>,
    threads: usize,
) -> PyResult<()> {
    let w = window_limit(window);
    let docs = match &doc_ids {
        Some(a) => Some(slice!(a, "doc_ids")),
        None => None,
    };
    let o = slice_mut!(out, "out");
    Ok(run_team(py, threads, o.len() / 8, || {
        window_mask::window_mask(q_len, k_len, w, docs, o)
    })?)
}

/// Tile summary into `out [B*nq*nk]` (int8 TILE_*); `window = 0` means unbounded.
#[pyfunction]
#[pyo3(signature = (q_len, k_len, window, doc_ids, block_q, block_k, out, threads))]
#[allow(clippy::too_many_arguments)]
fn sliding_window_tiles<'py>(
    py: Python<'py>,
    q_len: usize,
    k_len: usize,
    window: usize,
    doc_ids: Option<PyReadonlyArray2<'py, i64>>,
    block_q: usize,
    block_k: usize,
    mut out: PyReadwriteArray1<'py, i8>,
    threads: usize,
) -> PyResult<()> {
    let w = window_limit(window);
    let docs = match &doc_ids {
        Some(a) => Some(slice!(a, "doc_ids")),
        None => None,
    };
    let o = slice_mut!(out, "out");
    Ok(run_team(
        py,
        threads,
        q_len.saturating_mul(w.min(k_len)),
        || window_mask::window_tiles(q_len, k_len, w, docs, block_q, block_k, o),
    )?)
}

/// Owner of a pooled block, kept alive as the base of the numpy array (and so of the torch tensor)
/// that views it; when the last view goes, the block returns to the pool.
#[pyclass(frozen, module = "moerust._native")]
struct PooledBuffer {
    block: Option<pool::Block>,
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(block) = self.block.take() {
            pool::give(block);
        }
    }
}

/// A C-contiguous array of `shape` viewing a pooled block (contents unspecified).
fn pooled_array<'py, T: Element>(py: Python<'py>, shape: &[usize]) -> PyResult<Bound<'py, PyAny>> {
    let bytes = shape
        .iter()
        .try_fold(1usize, |n, &s| n.checked_mul(s))
        .and_then(pool::bytes_for::<T>)
        .ok_or_else(|| PyValueError::new_err(format!("shape {shape:?} is too large")))?;
    let block = pool::take(bytes)
        .ok_or_else(|| PyMemoryError::new_err(format!("cannot allocate {bytes} bytes")))?;
    let ptr = block.as_ptr() as *const T;
    // SAFETY: the block is aligned to pool::ALIGN (>= the alignment of T), holds at least `bytes`
    // = prod(shape) * size_of::<T>() bytes, all initialised (zeroed when allocated, or written
    // since), and only element types valid for every bit pattern (f32, f64, i64) are used.
    let view = unsafe { ArrayViewD::from_shape_ptr(IxDyn(shape), ptr) };
    let owner = Bound::new(py, PooledBuffer { block: Some(block) })?;
    // SAFETY: `owner` owns the block and becomes the array's base, so the memory outlives the
    // array; the block is never reallocated.
    Ok(unsafe { PyArrayDyn::<T>::borrow_from_array(&view, owner.into_any()) }.into_any())
}

/// An uninitialised output array of `shape` from the buffer pool (`dtype`: float32, float64, int64).
#[pyfunction]
fn pooled_empty<'py>(
    py: Python<'py>,
    shape: Vec<usize>,
    dtype: &str,
) -> PyResult<Bound<'py, PyAny>> {
    match dtype {
        "float32" => pooled_array::<f32>(py, &shape),
        "float64" => pooled_array::<f64>(py, &shape),
        "int64" => pooled_array::<i64>(py, &shape),
        other => Err(PyTypeError::new_err(format!(
            "dtype must be float32, float64 or int64, got {other:?}"
        ))),
    }
}

/// (idle bytes held by the pool, the cap on idle bytes, the smallest pooled request).
#[pyfunction]
fn pool_info() -> (usize, usize, usize) {
    (pool::idle_bytes(), pool::cap_bytes(), pool::MIN_POOLED)
}

/// Frees the pool's idle blocks; returns the bytes released.
#[pyfunction]
fn pool_clear() -> usize {
    pool::clear()
}

/// `(regions, nanoseconds)`: the parallel regions the kernels have run on torch's OpenMP team in
/// this process and their summed wall time (a diagnostic for small steps' fork/join costs).
#[pyfunction]
fn parallel_regions() -> (u64, u64) {
    crate::omp_team::regions()
}

/// Turns the log of parallel regions on or off; returns (and clears) the regions logged so far
/// as `(start_ns, end_ns, tasks)` on the clock of `region_clock_ns`. A diagnostic.
#[pyfunction]
fn region_log(on: bool) -> Vec<(u64, u64, usize)> {
    crate::omp_team::take_log(on)
}

/// Returns (and clears) the named instants the native calls logged while the region log was on,
/// as `(ns, label)` on the clock of `region_clock_ns`. A diagnostic.
#[pyfunction]
fn region_marks() -> Vec<(u64, &'static str)> {
    crate::omp_team::take_marks()
}

/// Sets the expert kernels' row-tile rule: about `per_thread` tiles per thread, at least
/// `min_rows` rows each (the default is 3 and 64). A diagnostic, for measurements.
#[pyfunction]
fn set_tile_rows(per_thread: usize, min_rows: usize) -> PyResult<()> {
    crate::expert_mlp::set_tile_rows(per_thread, min_rows).map_err(Into::into)
}

/// Sets the expert kernels' layout: "auto" (the default rule), "rows" or "columns". A diagnostic,
/// for measurements.
#[pyfunction]
fn set_expert_layout(layout: &str) -> PyResult<()> {
    crate::expert_mlp::set_expert_layout(layout).map_err(Into::into)
}

/// Now, in nanoseconds on the region log's clock.
#[pyfunction]
fn region_clock_ns() -> u64 {
    crate::omp_team::clock_ns()
}

/// Runs the expert kernels' tasks on the OpenMP team whose `GOMP_parallel` is at `addr` (0: rayon).
#[pyfunction]
fn use_openmp_team(addr: usize) {
    // SAFETY: the Python side passes 0 or the address of `GOMP_parallel` in the OpenMP runtime
    // torch has loaded, which stays loaded for the life of the process.
    unsafe { crate::omp_team::set_gomp_parallel(addr) }
}

/// Runs the expert kernels' matrix products on MKL (addresses of `sgemm_`, `dgemm_` and
/// `MKL_Set_Num_Threads_Local` in the library torch loaded; zeros: the `gemm` crate).
#[pyfunction]
fn use_blas(sgemm: usize, dgemm: usize, set_threads_local: usize) {
    // SAFETY: the Python side passes zeros or the addresses of these three MKL functions in
    // libtorch_cpu, which stays loaded for the life of the process.
    unsafe { crate::blas::register(sgemm, dgemm, set_threads_local) }
}

/// Whether the expert kernels' products run on the registered BLAS.
#[pyfunction]
fn blas_active() -> bool {
    crate::blas::active()
}

/// The number of threads a call asking for `requested` gets (RAYON_NUM_THREADS overrides).
#[pyfunction]
fn resolve_threads(requested: usize) -> usize {
    crate::threads::resolve_threads(requested)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("TILE_EMPTY", window_mask::TILE_EMPTY)?;
    m.add("TILE_PARTIAL", window_mask::TILE_PARTIAL)?;
    m.add("TILE_FULL", window_mask::TILE_FULL)?;
    m.add_class::<LayerBuffers>()?;
    m.add_function(wrap_pyfunction!(switch_balance_f32, m)?)?;
    m.add_function(wrap_pyfunction!(switch_balance_f64, m)?)?;
    m.add_function(wrap_pyfunction!(router_backward_f32, m)?)?;
    m.add_function(wrap_pyfunction!(router_backward_f64, m)?)?;
    m.add_function(wrap_pyfunction!(router_forward_f32, m)?)?;
    m.add_function(wrap_pyfunction!(router_forward_f64, m)?)?;
    m.add_function(wrap_pyfunction!(route_weights_f32, m)?)?;
    m.add_function(wrap_pyfunction!(route_weights_f64, m)?)?;
    m.add_function(wrap_pyfunction!(route_weights_backward_f32, m)?)?;
    m.add_function(wrap_pyfunction!(route_weights_backward_f64, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_f32, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_f64, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_backward_f32, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_backward_f64, m)?)?;
    m.add_function(wrap_pyfunction!(topk_route_f32, m)?)?;
    m.add_function(wrap_pyfunction!(topk_route_f64, m)?)?;
    m.add_function(wrap_pyfunction!(topp_route_f32, m)?)?;
    m.add_function(wrap_pyfunction!(topp_route_f64, m)?)?;
    m.add_function(wrap_pyfunction!(dispatch_plan, m)?)?;
    m.add_function(wrap_pyfunction!(gather_f32, m)?)?;
    m.add_function(wrap_pyfunction!(gather_f64, m)?)?;
    m.add_function(wrap_pyfunction!(gather_backward_f32, m)?)?;
    m.add_function(wrap_pyfunction!(gather_backward_f64, m)?)?;
    m.add_function(wrap_pyfunction!(combine_f32, m)?)?;
    m.add_function(wrap_pyfunction!(combine_f64, m)?)?;
    m.add_function(wrap_pyfunction!(combine_backward_f32, m)?)?;
    m.add_function(wrap_pyfunction!(combine_backward_f64, m)?)?;
    m.add_function(wrap_pyfunction!(lars_f32, m)?)?;
    m.add_function(wrap_pyfunction!(lars_f64, m)?)?;
    m.add_function(wrap_pyfunction!(sliding_window_mask, m)?)?;
    m.add_function(wrap_pyfunction!(sliding_window_tiles, m)?)?;
    m.add_function(wrap_pyfunction!(expert_mlp_forward_f32, m)?)?;
    m.add_function(wrap_pyfunction!(expert_mlp_forward_f64, m)?)?;
    m.add_function(wrap_pyfunction!(expert_mlp_backward_f32, m)?)?;
    m.add_function(wrap_pyfunction!(expert_mlp_backward_f64, m)?)?;
    m.add_function(wrap_pyfunction!(routed_experts_forward_f32, m)?)?;
    m.add_function(wrap_pyfunction!(routed_experts_forward_f64, m)?)?;
    m.add_function(wrap_pyfunction!(routed_experts_backward_f32, m)?)?;
    m.add_function(wrap_pyfunction!(routed_experts_backward_f64, m)?)?;
    m.add_function(wrap_pyfunction!(use_openmp_team, m)?)?;
    m.add_function(wrap_pyfunction!(use_blas, m)?)?;
    m.add_function(wrap_pyfunction!(blas_active, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_threads, m)?)?;
    m.add_function(wrap_pyfunction!(pooled_empty, m)?)?;
    m.add_function(wrap_pyfunction!(pool_info, m)?)?;
    m.add_function(wrap_pyfunction!(parallel_regions, m)?)?;
    for f in [
        wrap_pyfunction!(moe_forward_f32, m)?,
        wrap_pyfunction!(moe_forward_f64, m)?,
        wrap_pyfunction!(moe_backward_f32, m)?,
        wrap_pyfunction!(moe_backward_f64, m)?,
    ] {
        m.add_function(f)?;
    }
    m.add_function(wrap_pyfunction!(region_log, m)?)?;
    m.add_function(wrap_pyfunction!(region_marks, m)?)?;
    m.add_function(wrap_pyfunction!(set_tile_rows, m)?)?;
    m.add_function(wrap_pyfunction!(set_expert_layout, m)?)?;
    m.add_function(wrap_pyfunction!(region_clock_ns, m)?)?;
    m.add_function(wrap_pyfunction!(pool_clear, m)?)?;
    Ok(())
}
