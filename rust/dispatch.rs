//! Token <-> expert reordering: `dispatch_plan` (a stable counting sort of (token, slot) pairs by
//! expert), `gather` (tokens into expert-sorted rows) and `combine` (weighted sum of a token's
//! rows), each with its backward.
//!
//! Shapes: T tokens, K slots per token, E experts, R kept rows, d features.

use crate::error::{check_len, value_err, KResult};
use crate::isa::with_best_isa;
use crate::omp_team::try_for_each_part;
use crate::real::Real;
use crate::stream;
use crate::threads::{rows_per_task, team_size};

/// The result of `dispatch_plan`. All vectors are int64 so they map straight onto torch tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Rows kept per expert, `[E]`.
    pub counts: Vec<i64>,
    /// Exclusive scan of `counts`, `[E + 1]`.
    pub offsets: Vec<i64>,
    /// Token of each expert-sorted row, `[R]`.
    pub row_token: Vec<i64>,
    /// Flat slot (t * K + j) of each row, `[R]`.
    pub row_slot: Vec<i64>,
    /// Row of each slot, -1 for empty or dropped slots, `[T * K]`.
    pub slot_row: Vec<i64>,
    /// Slots dropped by the capacity limit.
    pub dropped: i64,
}

/// Shares a mutable buffer between rayon tasks that write provably disjoint indices.
struct DisjointWriter<'a> {
    ptr: *mut i64,
    len: usize,
    _life: std::marker::PhantomData<&'a mut [i64]>,
}

// SAFETY: the writer is only used by `dispatch_plan`, whose tasks write pairwise distinct indices
// (each kept slot owns one row of the counting sort), so no two threads touch the same element.
unsafe impl Sync for DisjointWriter<'_> {}

impl<'a> DisjointWriter<'a> {
    fn new(buf: &'a mut [i64]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _life: std::marker::PhantomData,
        }
    }

    /// Writes `v` at `i`; callers guarantee no other task writes `i` concurrently.
    #[inline(always)]
    fn write(&self, i: usize, v: i64) {
        assert!(i < self.len, "row index out of range");
        // SAFETY: `i` is in bounds (checked above) and, by the caller's contract, owned by this task.
        unsafe { *self.ptr.add(i) = v }
    }
}

/// Builds the dispatch plan for `idx[t, k]` (-1 = empty slot) over `num_experts` experts. With a
/// capacity, each expert keeps its first `capacity` slots in token order and drops the rest.
pub fn dispatch_plan(
    idx: &[i64],
    t: usize,
    k: usize,
    num_experts: usize,
    capacity: Option<usize>,
) -> KResult<Plan> {
    check_len("idx", idx.len(), t * k)?;
    if num_experts < 1 {
        return value_err(format!("num_experts must be >= 1, got {num_experts}"));
    }
    let e = num_experts;
    let n = t * k;
    // Chunks of whole tokens, each counted and placed by one task; results do not depend on it.
    let tokens_per_chunk = rows_per_task(t.max(1), k.max(1), 1 << 15);
    let chunk_slots = (tokens_per_chunk * k).max(1);
    let n_chunks = n.div_ceil(chunk_slots);

    // Pass 1: per-chunk histograms (and validation of the indices).
    let mut hist = vec![vec![0i64; e]; n_chunks];
    let parts: Vec<_> = idx.chunks(chunk_slots).zip(hist.iter_mut()).collect();
    try_for_each_part(team_size(), parts, |_, (slots, h)| {
        for &x in slots {
            if x >= 0 && (x as usize) < e {
                h[x as usize] += 1;
            } else if x != -1 {
                return value_err(format!(
                    "idx holds expert {x}, outside [-1, {e}) (num_experts = {e})"
                ));
            }
        }
        Ok(())
    })?;

    // Where each chunk's slots start inside each expert, the kept counts and the row offsets.
    let cap = capacity.map(|c| c as i64).unwrap_or(i64::MAX);
    let mut base = vec![vec![0i64; e]; n_chunks];
    let mut totals = vec![0i64; e];
    for (c, h) in hist.iter().enumerate() {
        base[c].copy_from_slice(&totals);
        for (tot, &x) in totals.iter_mut().zip(h) {
            *tot += x;
        }
    }
    let counts: Vec<i64> = totals.iter().map(|&x| x.min(cap)).collect();
    let mut offsets = vec![0i64; e + 1];
    for i in 0..e {
        offsets[i + 1] = offsets[i] + counts[i];
    }
    let dropped = totals.iter().zip(&counts).map(|(a, b)| a - b).sum();
    let r = offsets[e] as usize;

    // Pass 2: place every slot.
    let mut slot_row = vec![-1i64; n];
    let mut row_token = vec![0i64; r];
    let mut row_slot = vec![0i64; r];
    {
        let tok_w = DisjointWriter::new(&mut row_token);
        let slot_w = DisjointWriter::new(&mut row_slot);
        let parts: Vec<_> = slot_row
            .chunks_mut(chunk_slots)
            .zip(idx.chunks(chunk_slots))
            .zip(base.iter())
            .collect();
        try_for_each_part(
            team_size(),
            parts,
            |c, ((rows, slots), base)| -> KResult<()> {
                let mut cursor = base.clone();
                // Chunks hold whole tokens. The token of each slot is counted along, not
                // divided out: a 64-bit division per slot took most of the plan's time (tens
                // of cycles each on the lent Xeon).
                let (mut flat, mut tok, mut j) = (c * chunk_slots, (c * chunk_slots) / k, 0);
                for (&x, row) in slots.iter().zip(rows.iter_mut()) {
                    if x >= 0 {
                        let x = x as usize;
                        let pos = cursor[x];
                        cursor[x] += 1;
                        if pos < cap {
                            let dst = (offsets[x] + pos) as usize;
                            *row = dst as i64;
                            tok_w.write(dst, tok as i64);
                            slot_w.write(dst, flat as i64);
                        }
                    }
                    flat += 1;
                    j += 1;
                    if j == k {
                        j = 0;
                        tok += 1;
                    }
                }
                Ok(())
            },
        )?;
    }
    Ok(Plan {
        counts,
        offsets,
        row_token,
        row_slot,
        slot_row,
        dropped,
    })
}

pub(crate) fn row_index(arg: &str, x: i64, bound: usize) -> KResult<usize> {
    if x >= 0 && (x as usize) < bound {
        Ok(x as usize)
    } else {
        value_err(format!(
            "{arg} holds {x}, outside [0, {bound}): the plan does not match the tensors"
        ))
    }
}

/// `out[r] = x[row_token[r]]` for `x[t, d]`, `out[R, d]`.
pub fn gather<F: Real>(
    x: &[F],
    t: usize,
    d: usize,
    row_token: &[i64],
    out: &mut [F],
) -> KResult<()> {
    check_len("x", x.len(), t * d)?;
    check_len("out", out.len(), row_token.len() * d)?;
    if d == 0 || row_token.is_empty() {
        return Ok(());
    }
    let nt = stream::worth_streaming(std::mem::size_of_val(out));
    let rows = rows_per_task(row_token.len(), d, 1 << 14);
    let parts: Vec<_> = out
        .chunks_mut(rows * d)
        .zip(row_token.chunks(rows))
        .collect();
    try_for_each_part(team_size(), parts, |_, (out, toks)| {
        let writer = stream::RowWriter::new(nt, 0, F::ZERO);
        for (dst, &tok) in out.chunks_exact_mut(d).zip(toks) {
            let tok = row_index("plan.row_token", tok, t)?;
            writer.copy(dst, &x[tok * d..(tok + 1) * d]);
        }
        Ok(())
    })
}

/// Backward of `gather`: `out[t] = sum over slots j in order of grad[slot_row[t, j]]`.
pub fn gather_backward<F: Real>(
    grad: &[F],
    r: usize,
    d: usize,
    slot_row: &[i64],
    t: usize,
    out: &mut [F],
) -> KResult<()> {
    check_len("grad", grad.len(), r * d)?;
    slot_sum(grad, r, d, None, slot_row, t, out)
}

/// `out[t] = sum over slots j in order of weights[t, j] * ys[slot_row[t, j]]`; empty slots add 0.
pub fn combine<F: Real>(
    ys: &[F],
    r: usize,
    d: usize,
    weights: &[F],
    slot_row: &[i64],
    t: usize,
    out: &mut [F],
) -> KResult<()> {
    check_len("ys", ys.len(), r * d)?;
    check_len("weights", weights.len(), slot_row.len())?;
    slot_sum(ys, r, d, Some(weights), slot_row, t, out)
}

/// The shared body of `combine` and `gather_backward`: per token, the (weighted) sum of its rows
/// in slot order, skipping empty slots.
fn slot_sum<F: Real>(
    rows_in: &[F],
    r: usize,
    d: usize,
    weights: Option<&[F]>,
    slot_row: &[i64],
    t: usize,
    out: &mut [F],
) -> KResult<()> {
    check_len("out", out.len(), t * d)?;
    if d == 0 || t == 0 {
        return Ok(());
    }
    if slot_row.len() % t != 0 {
        return value_err(format!(
            "plan.slot_row has {} elements, not a multiple of {t} tokens",
            slot_row.len()
        ));
    }
    let k = slot_row.len() / t;
    if k == 0 {
        out.fill(F::ZERO);
        return Ok(());
    }
    // A large output is summed in a row buffer and streamed out (see `stream::RowWriter`).
    let nt = stream::worth_streaming(std::mem::size_of_val(out));
    let rows = rows_per_task(t, k * d, 1 << 14);
    let parts: Vec<_> = out
        .chunks_mut(rows * d)
        .zip(slot_row.chunks(rows * k))
        .collect();
    try_for_each_part(team_size(), parts, |chunk, (out, slots)| {
        let mut writer = stream::RowWriter::new(nt, d, F::ZERO);
        with_best_isa(
            #[inline(always)]
            || {
                for (i, (dst, slots)) in out
                    .chunks_exact_mut(d)
                    .zip(slots.chunks_exact(k))
                    .enumerate()
                {
                    let sum = writer.target(dst);
                    sum.fill(F::ZERO);
                    for (j, &row) in slots.iter().enumerate() {
                        if row == -1 {
                            continue;
                        }
                        let row = row_index("plan.slot_row", row, r)?;
                        let src = &rows_in[row * d..(row + 1) * d];
                        match weights {
                            Some(w) => {
                                let w = w[(chunk * rows + i) * k + j];
                                for (a, &y) in sum.iter_mut().zip(src) {
                                    *a += w * y;
                                }
                            }
                            None => {
                                for (a, &y) in sum.iter_mut().zip(src) {
                                    *a += y;
                                }
                            }
                        }
                    }
                    writer.flush(dst);
                }
                Ok(())
            },
        )
    })
}

/// Dot product with independent lanes so it vectorises without reassociation flags.
#[inline(always)]
fn dot<F: Real>(a: &[F], b: &[F]) -> F {
    const L: usize = 8;
    let mut lanes = [F::ZERO; L];
    let ca = a.chunks_exact(L);
    let cb = b.chunks_exact(L);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        let xa: &[F; L] = xa.try_into().expect("chunks_exact yields L elements");
        let xb: &[F; L] = xb.try_into().expect("chunks_exact yields L elements");
        for i in 0..L {
            lanes[i] += xa[i] * xb[i];
        }
    }
    let mut s = F::ZERO;
    for (&x, &y) in ra.iter().zip(rb) {
        s += x * y;
    }
    let mut total = F::ZERO;
    for l in lanes {
        total += l;
    }
    total + s
}

/// Backward of `combine` in one pass over the expert rows: for row r of slot s = row_slot[r] and
/// token t = row_token[r], `grad_ys[r] = weights[s] * grad[t]` and
/// `grad_w[s] = <grad[t], ys[r]>`; slots without a row get a zero weight gradient.
#[allow(clippy::too_many_arguments)]
pub fn combine_backward<F: Real>(
    grad: &[F],
    ys: &[F],
    weights: &[F],
    d: usize,
    row_token: &[i64],
    row_slot: &[i64],
    slot_row: &[i64],
    grad_ys: &mut [F],
    grad_w: &mut [F],
) -> KResult<()> {
    check_len("ys", ys.len(), row_token.len() * d)?;
    combine_backward_rows(
        grad,
        Some(ys),
        weights,
        d,
        row_token,
        row_slot,
        slot_row,
        grad_ys,
        grad_w,
    )
}

/// [`combine_backward`] with `grad_ys` written over `ys` (each row's dot product is taken before
/// the row is overwritten): for callers whose `ys` is dead after this, it saves an `[R, d]` buffer
/// at the backward's peak.
#[allow(clippy::too_many_arguments)]
pub fn combine_backward_in_place<F: Real>(
    grad: &[F],
    ys_then_grad_ys: &mut [F],
    weights: &[F],
    d: usize,
    row_token: &[i64],
    row_slot: &[i64],
    slot_row: &[i64],
    grad_w: &mut [F],
) -> KResult<()> {
    combine_backward_rows(
        grad,
        None,
        weights,
        d,
        row_token,
        row_slot,
        slot_row,
        ys_then_grad_ys,
        grad_w,
    )
}

/// The body of both: `ys` is `None` when its values are in `grad_ys`.
#[allow(clippy::too_many_arguments)]
fn combine_backward_rows<F: Real>(
    grad: &[F],
    ys: Option<&[F]>,
    weights: &[F],
    d: usize,
    row_token: &[i64],
    row_slot: &[i64],
    slot_row: &[i64],
    grad_ys: &mut [F],
    grad_w: &mut [F],
) -> KResult<()> {
    let r = row_token.len();
    let n = slot_row.len();
    check_len("plan.row_slot", row_slot.len(), r)?;
    check_len("weights", weights.len(), n)?;
    check_len("grad_ys", grad_ys.len(), r * d)?;
    check_len("grad_w", grad_w.len(), n)?;
    let t = grad.len().checked_div(d).unwrap_or(0);
    check_len("grad", grad.len(), t * d)?;
    // Dot products land per row (contiguous, safe to write in parallel), then move to their slots.
    let mut dots = vec![F::ZERO; r];
    let rows = CombineRows {
        grad,
        t,
        weights,
        d,
        ys,
        row_token,
        row_slot,
    };
    rows.backward_all(grad_ys, &mut dots)?;
    weight_grads_from_dots(&dots, slot_row, grad_w)
}

/// What the combine's backward reads, for any block of its rows: the output gradient, the slot
/// weights, the expert outputs and the plan's rows.
#[derive(Clone, Copy)]
pub struct CombineRows<'a, F> {
    /// Gradient of the combined output, `[t, d]`.
    pub grad: &'a [F],
    /// Tokens.
    pub t: usize,
    /// Slot weights, `[T * K]`.
    pub weights: &'a [F],
    /// Features.
    pub d: usize,
    /// The expert outputs `[R, d]`, or None when they are in `grad_ys` (overwritten row by row).
    pub ys: Option<&'a [F]>,
    /// `[R]` token of each row.
    pub row_token: &'a [i64],
    /// `[R]` flat slot of each row.
    pub row_slot: &'a [i64],
}

impl<F: Real> CombineRows<'_, F> {
    /// Every row, over the team of [`crate::threads::with_team`]: `gys [R, d]` and `dots [R]`
    /// (see [`CombineRows::backward_block`]); a large `gys` is written with streaming stores.
    pub fn backward_all(&self, gys: &mut [F], dots: &mut [F]) -> KResult<()> {
        let (r, d) = (dots.len(), self.d);
        if r == 0 || d == 0 {
            return Ok(());
        }
        let rows = rows_per_task(r, 2 * d, 1 << 14);
        // A large `grad_ys` is scaled into a row buffer and streamed out (`stream::RowWriter`).
        let nt = stream::worth_streaming(std::mem::size_of_val(gys));
        let parts: Vec<_> = gys
            .chunks_mut(rows * d)
            .zip(dots.chunks_mut(rows))
            .collect();
        try_for_each_part(team_size(), parts, |b, (gys, dots)| {
            self.backward_block(b * rows, gys, dots, nt)
        })
    }

    /// The combine's backward for the rows from `lo` (as many as `dots` holds): for row `r` of
    /// token `t` and slot `s`, `dots[r - lo] = <grad[t], ys[r]>` and `gys[r - lo] = weights[s] *
    /// grad[t]`, where without `ys` the row of `ys` is the one in `gys`, read before it is
    /// overwritten. `stream`: write `gys` with streaming stores. Every block computes each row
    /// the same way, so the blocking does not change the bits.
    pub fn backward_block(
        &self,
        lo: usize,
        gys: &mut [F],
        dots: &mut [F],
        stream: bool,
    ) -> KResult<()> {
        let (d, t, n) = (self.d, self.t, self.weights.len());
        let hi = lo + dots.len();
        let ys = self.ys.map(|ys| &ys[lo * d..hi * d]);
        let (toks, slots) = (&self.row_token[lo..hi], &self.row_slot[lo..hi]);
        let mut writer = stream::RowWriter::new(stream, d, F::ZERO);
        with_best_isa(
            #[inline(always)]
            || {
                for (i, ((gy, dot_out), (&tok, &slot))) in gys
                    .chunks_exact_mut(d)
                    .zip(dots.iter_mut())
                    .zip(toks.iter().zip(slots))
                    .enumerate()
                {
                    let tok = row_index("plan.row_token", tok, t)?;
                    let slot = row_index("plan.row_slot", slot, n)?;
                    let g = &self.grad[tok * d..(tok + 1) * d];
                    // The dot first: in place, `gy` still holds the row of ys.
                    *dot_out = match ys {
                        Some(ys) => dot(g, &ys[i * d..(i + 1) * d]),
                        None => dot(g, gy),
                    };
                    let w = self.weights[slot];
                    for (o, &gv) in writer.target(gy).iter_mut().zip(g) {
                        *o = w * gv;
                    }
                    writer.flush(gy);
                }
                Ok(())
            },
        )
    }
}

/// `grad_w[s]` = the dot product of slot `s`'s row (`dots [R]`, per row), 0 for slots without a
/// row. T*K scalars: not worth a parallel pass.
pub fn weight_grads_from_dots<F: Real>(
    dots: &[F],
    slot_row: &[i64],
    grad_w: &mut [F],
) -> KResult<()> {
    check_len("grad_w", grad_w.len(), slot_row.len())?;
    for (gw, &row) in grad_w.iter_mut().zip(slot_row) {
        *gw = if row == -1 {
            F::ZERO
        } else {
            dots[row_index("plan.slot_row", row, dots.len())?]
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_is_a_stable_counting_sort() {
        // 3 tokens, 2 slots, 3 experts; token 1 has an empty slot.
        let idx = [2, 0, 0, -1, 2, 1];
        let p = dispatch_plan(&idx, 3, 2, 3, None).unwrap();
        assert_eq!(p.counts, vec![2, 1, 2]);
        assert_eq!(p.offsets, vec![0, 2, 3, 5]);
        assert_eq!(p.row_token, vec![0, 1, 2, 0, 2]);
        assert_eq!(p.row_slot, vec![1, 2, 5, 0, 4]);
        assert_eq!(p.slot_row, vec![3, 0, 1, -1, 4, 2]);
        assert_eq!(p.dropped, 0);
    }

    #[test]
    fn capacity_keeps_first_slots_in_token_order() {
        let idx = [0, 0, 0, 1];
        let p = dispatch_plan(&idx, 4, 1, 2, Some(2)).unwrap();
        assert_eq!(p.counts, vec![2, 1]);
        assert_eq!(p.slot_row, vec![0, 1, -1, 2]);
        assert_eq!(p.dropped, 1);
        let p0 = dispatch_plan(&idx, 4, 1, 2, Some(0)).unwrap();
        assert_eq!(p0.slot_row, vec![-1; 4]);
        assert_eq!(p0.dropped, 4);
        assert!(p0.row_token.is_empty());
    }

    #[test]
    fn plan_rejects_out_of_range_experts() {
        assert!(dispatch_plan(&[0, 3], 2, 1, 3, None).is_err());
        assert!(dispatch_plan(&[0, -2], 2, 1, 3, None).is_err());
        assert!(dispatch_plan(&[0], 1, 1, 0, None).is_err());
    }

    #[test]
    fn large_plans_match_a_sequential_sort() {
        let (t, k, e) = (50_000usize, 2usize, 7usize);
        let idx: Vec<i64> = (0..t * k)
            .map(|i| ((i * 2654435761) % (e + 1)) as i64 - 1)
            .collect();
        let p = dispatch_plan(&idx, t, k, e, Some(5000)).unwrap();
        let mut expected_tokens = Vec::new();
        for x in 0..e as i64 {
            let toks: Vec<i64> = (0..t * k)
                .filter(|&i| idx[i] == x)
                .map(|i| (i / k) as i64)
                .take(5000)
                .collect();
            expected_tokens.extend(toks);
        }
        assert_eq!(p.row_token, expected_tokens);
    }

    #[test]
    fn gather_combine_and_backwards() {
        let idx = [1, 0, 1, -1];
        let p = dispatch_plan(&idx, 2, 2, 2, None).unwrap();
        let x = [1.0f64, 2.0, 3.0, 4.0];
        let mut xs = vec![0.0; 6];
        gather(&x, 2, 2, &p.row_token, &mut xs).unwrap();
        assert_eq!(xs, vec![1.0, 2.0, 1.0, 2.0, 3.0, 4.0]);
        let mut gx = vec![0.0; 4];
        gather_backward(&xs, 3, 2, &p.slot_row, 2, &mut gx).unwrap();
        assert_eq!(gx, vec![2.0, 4.0, 3.0, 4.0]);
        let w = [0.5, 0.25, 2.0, 100.0];
        let mut y = vec![0.0; 4];
        combine(&xs, 3, 2, &w, &p.slot_row, 2, &mut y).unwrap();
        assert_eq!(y, vec![0.75, 1.5, 6.0, 8.0]);
        let g = [1.0, 1.0, 1.0, 0.0];
        let (mut gys, mut gw) = (vec![0.0; 6], vec![0.0; 4]);
        combine_backward(
            &g,
            &xs,
            &w,
            2,
            &p.row_token,
            &p.row_slot,
            &p.slot_row,
            &mut gys,
            &mut gw,
        )
        .unwrap();
        assert_eq!(gys, vec![0.25, 0.25, 0.5, 0.5, 2.0, 0.0]);
        assert_eq!(gw, vec![3.0, 3.0, 3.0, 0.0]);
    }

    #[test]
    fn a_team_of_threads_gives_the_same_results() {
        use crate::threads::with_team;
        let (t, k, e, d) = (3000usize, 2usize, 5usize, 48usize);
        let idx: Vec<i64> = (0..t * k)
            .map(|i| ((i * 7919) % (e + 1)) as i64 - 1)
            .collect();
        let p = dispatch_plan(&idx, t, k, e, Some(900)).unwrap();
        assert_eq!(
            with_team(4, usize::MAX, || dispatch_plan(&idx, t, k, e, Some(900))
                .unwrap()),
            p
        );
        let r = p.row_token.len();
        let x: Vec<f32> = (0..t * d).map(|i| (i % 97) as f32 * 0.01).collect();
        let w: Vec<f32> = (0..t * k).map(|i| (i % 13) as f32 * 0.1).collect();
        let run = |team: usize| {
            with_team(team, usize::MAX, || {
                let mut xs = vec![0.0f32; r * d];
                gather(&x, t, d, &p.row_token, &mut xs).unwrap();
                let mut y = vec![0.0f32; t * d];
                combine(&xs, r, d, &w, &p.slot_row, t, &mut y).unwrap();
                let mut gx = vec![0.0f32; t * d];
                gather_backward(&xs, r, d, &p.slot_row, t, &mut gx).unwrap();
                let (mut gys, mut gw) = (vec![0.0f32; r * d], vec![0.0f32; t * k]);
                combine_backward(
                    &y,
                    &xs,
                    &w,
                    d,
                    &p.row_token,
                    &p.row_slot,
                    &p.slot_row,
                    &mut gys,
                    &mut gw,
                )
                .unwrap();
                (xs, y, gx, gys, gw)
            })
        };
        assert_eq!(run(1), run(4));
    }

    #[test]
    fn outputs_large_enough_to_stream_hold_the_same_values() {
        // Rows of an odd width (misaligned starts and tails), outputs just over the threshold.
        let d = 4099usize;
        let t = crate::stream::STREAM_MIN_BYTES / (4 * d) * 5 / 4 + 8; // a fifth of the slots empty
        let idx: Vec<i64> = (0..t)
            .map(|i| if i % 5 == 3 { -1 } else { (i % 3) as i64 })
            .collect();
        let p = dispatch_plan(&idx, t, 1, 3, None).unwrap();
        let r = p.row_token.len();
        // Streamed unless MOERUST_STREAM_MB raises the threshold.
        assert!(4 * r * d >= crate::stream::STREAM_MIN_BYTES);
        let x: Vec<f32> = (0..t * d).map(|i| (i % 101) as f32 - 50.0).collect();
        let w: Vec<f32> = (0..t).map(|i| (i % 7) as f32 * 0.5).collect();
        let mut xs = vec![0.0f32; r * d];
        gather(&x, t, d, &p.row_token, &mut xs).unwrap();
        for (row, &tok) in p.row_token.iter().enumerate() {
            let tok = tok as usize;
            assert_eq!(xs[row * d..(row + 1) * d], x[tok * d..(tok + 1) * d]);
        }
        let mut y = vec![1.0f32; t * d];
        combine(&xs, r, d, &w, &p.slot_row, t, &mut y).unwrap();
        for (tok, &row) in p.slot_row.iter().enumerate() {
            for c in [0, 1, d / 2, d - 1] {
                let want = if row < 0 {
                    0.0
                } else {
                    w[tok] * xs[row as usize * d + c]
                };
                assert_eq!(y[tok * d + c], want);
            }
        }
        let mut gx = vec![1.0f32; t * d];
        gather_backward(&xs, r, d, &p.slot_row, t, &mut gx).unwrap();
        for (tok, &row) in p.slot_row.iter().enumerate() {
            for c in [0, 2, d - 1] {
                let want = if row < 0 {
                    0.0
                } else {
                    xs[row as usize * d + c]
                };
                assert_eq!(gx[tok * d + c], want);
            }
        }
        let (mut gys, mut gw) = (vec![0.0f32; r * d], vec![0.0f32; t]);
        combine_backward(
            &x,
            &xs,
            &w,
            d,
            &p.row_token,
            &p.row_slot,
            &p.slot_row,
            &mut gys,
            &mut gw,
        )
        .unwrap();
        for (row, (&tok, &slot)) in p.row_token.iter().zip(&p.row_slot).enumerate() {
            for c in [0, 3, d - 2, d - 1] {
                assert_eq!(gys[row * d + c], w[slot as usize] * x[tok as usize * d + c]);
            }
        }
    }

    #[test]
    fn inconsistent_plans_are_errors_not_panics() {
        let mut out = vec![0.0f32; 2];
        assert!(gather(&[1.0f32, 2.0], 1, 2, &[5], &mut out).is_err());
        assert!(combine(&[1.0f32, 2.0], 1, 2, &[1.0], &[3], 1, &mut out).is_err());
    }
}
