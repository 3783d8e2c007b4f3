//! How the expert kernels cut their expert-sorted rows into parallel tasks.
//!
//! A tile is a run of rows of one expert, `(expert, start, end)`: one call of each product on
//! the expert's weights, which the GEMM packs again for every call. A task is one or more
//! consecutive tiles run one after another on one thread.
//!
//! Why two plans: cutting each expert into tiles of about the target size keeps every tile
//! inside one expert (one weight packing each), but when the tiles number a little more than a
//! multiple of the team, some threads run one tile more than the rest. The d = 64 layer at
//! 16 threads (8 experts of 221-284 rows, 64-row tiles) makes 37 tiles: on 16 threads the
//! longest thread runs 163 rows where an equal share is 128 (79 % of the team busy). Cutting
//! the rows into equal consecutive chunks instead balances the team to a row, at the price of
//! an extra tile wherever a chunk crosses an expert boundary. Each call takes the plan whose
//! estimated finishing time is shorter.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// A task boundary this close to an expert boundary moves onto it: a tile this short would
/// cost its weight packing for little work.
const SNAP_ROWS: usize = 8;

/// What one tile costs beyond its rows, in rows (the packing of the expert's weights and the
/// product's set-up), for the plans' estimates.
const TILE_COST_ROWS: usize = 8;

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
        let parts = n.div_ceil(rows_per_tile.max(1));
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

/// The tasks of one parallel region over expert-sorted rows: `tiles` partition the rows in
/// order; task `j` runs the tiles `order[starts[j]..starts[j + 1]]` one after another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RowTasks {
    /// `(expert, start, end)`, partitioning the rows in order.
    pub tiles: Vec<(usize, usize, usize)>,
    /// Tile indices in the order the tasks hand them out.
    order: Vec<usize>,
    /// Where each task's tiles begin in `order`, plus the end.
    starts: Vec<usize>,
}

impl RowTasks {
    /// Plans the tasks for the rows of `ranges` (per expert, in order) on `threads` threads with
    /// tiles of about `rows_per_tile` rows: whole-expert tiles largest first, or equal chunks of
    /// rows in order, whichever is estimated to finish first.
    pub(crate) fn plan(ranges: &[(usize, usize)], rows_per_tile: usize, threads: usize) -> Self {
        let by_expert = Self::by_expert(ranges, rows_per_tile);
        let threads = threads.max(1);
        if threads == 1 {
            return by_expert;
        }
        let chunks = Self::by_chunks(ranges, rows_per_tile, threads);
        if chunks.finish_estimate(threads) < by_expert.finish_estimate(threads) {
            chunks
        } else {
            by_expert
        }
    }

    /// One task per tile of [`row_tiles`], the largest first: the team takes tasks in order, and
    /// handing out the largest first keeps the last tasks small, so threads finish together
    /// when experts (and so tiles) differ in size (longest-processing-time order).
    fn by_expert(ranges: &[(usize, usize)], rows_per_tile: usize) -> Self {
        let tiles = row_tiles(ranges, rows_per_tile);
        let mut order: Vec<usize> = (0..tiles.len()).collect();
        // Stable: equal tiles keep their order (and their cache-friendly expert grouping).
        order.sort_by_key(|&i| Reverse(tiles[i].2 - tiles[i].1));
        let starts = (0..=tiles.len()).collect();
        Self {
            tiles,
            order,
            starts,
        }
    }

    /// The rows cut into chunks of equal rows (a multiple of `threads` of them once there are
    /// more chunks than threads), each chunk cut again at expert boundaries; a chunk boundary
    /// within [`SNAP_ROWS`] (and an eighth of a chunk) of an expert boundary moves onto it.
    fn by_chunks(ranges: &[(usize, usize)], rows_per_tile: usize, threads: usize) -> Self {
        let (first, total) = match (ranges.first(), ranges.last()) {
            (Some(a), Some(b)) => (a.0, b.1 - a.0),
            _ => (0, 0),
        };
        let mut chunks = total.div_ceil(rows_per_tile.max(1)).max(1);
        if chunks > threads {
            // The nearest multiple of the team: every thread runs as many chunks.
            chunks = ((chunks + threads / 2) / threads).max(1) * threads;
        }
        let chunks = chunks.min(total.max(1));
        // Snapping moves at most an eighth of a chunk, so the chunks stay about equal.
        let snap = SNAP_ROWS.min(total / chunks / 8);
        // Chunk ends (absolute rows), snapped to expert boundaries, strictly increasing.
        let mut ends: Vec<usize> = Vec::with_capacity(chunks);
        for j in 1..=chunks {
            let mut end = first + j * total / chunks;
            if j < chunks {
                if let Some(b) = nearest_boundary(ranges, end) {
                    if b.abs_diff(end) <= snap {
                        end = b;
                    }
                }
            }
            if end > ends.last().copied().unwrap_or(first) {
                ends.push(end);
            }
        }
        let mut tiles = Vec::new();
        let mut starts = vec![0];
        let mut lo = first;
        let mut e = 0;
        for &hi in &ends {
            // Experts overlapping lo..hi, each contributing the rows it shares with the chunk.
            while e < ranges.len() && ranges[e].1 <= lo {
                e += 1;
            }
            let mut k = e;
            while k < ranges.len() && ranges[k].0 < hi {
                let (a, b) = (ranges[k].0.max(lo), ranges[k].1.min(hi));
                if a < b {
                    tiles.push((k, a, b));
                }
                k += 1;
            }
            starts.push(tiles.len());
            lo = hi;
        }
        let order = (0..tiles.len()).collect();
        Self {
            tiles,
            order,
            starts,
        }
    }

    /// Tasks in this plan.
    pub(crate) fn len(&self) -> usize {
        self.starts.len() - 1
    }

    /// The tiles of task `j`, in the order it runs them.
    pub(crate) fn tiles_of(&self, j: usize) -> &[usize] {
        &self.order[self.starts[j]..self.starts[j + 1]]
    }

    /// When the last of `threads` equal threads would finish, taking the tasks in order as they
    /// become free, with each tile costing its rows plus [`TILE_COST_ROWS`].
    fn finish_estimate(&self, threads: usize) -> usize {
        let mut free: BinaryHeap<Reverse<usize>> = (0..threads).map(|_| Reverse(0)).collect();
        let mut last = 0;
        for j in 0..self.len() {
            let cost: usize = self
                .tiles_of(j)
                .iter()
                .map(|&i| self.tiles[i].2 - self.tiles[i].1 + TILE_COST_ROWS)
                .sum();
            let Reverse(at) = free.pop().unwrap_or(Reverse(0));
            last = last.max(at + cost);
            free.push(Reverse(at + cost));
        }
        last
    }

    /// Groups per-tile parts (`parts[i]` belongs to tile `i`) into per-task lists, each part
    /// paired with its tile's index, in the order the task runs them.
    pub(crate) fn group<P>(&self, parts: Vec<P>) -> Vec<Vec<(usize, P)>> {
        assert_eq!(parts.len(), self.tiles.len(), "one part per tile");
        let mut slots: Vec<Option<P>> = parts.into_iter().map(Some).collect();
        (0..self.len())
            .map(|j| {
                self.tiles_of(j)
                    .iter()
                    .map(|&i| (i, slots[i].take().expect("each tile is in one task")))
                    .collect()
            })
            .collect()
    }
}

/// The expert boundary (a row where one non-empty expert ends and another begins) nearest
/// `row`, if any lies strictly inside the rows.
fn nearest_boundary(ranges: &[(usize, usize)], row: usize) -> Option<usize> {
    let (first, last) = (ranges.first()?.0, ranges.last()?.1);
    // Boundaries are the ends of experts, excluding the last row; ranges are sorted by start.
    let i = ranges.partition_point(|&(_, hi)| hi < row);
    let below = ranges[..i.min(ranges.len())]
        .iter()
        .rev()
        .map(|&(_, hi)| hi)
        .find(|&hi| hi > first && hi < last);
    let above = ranges[i.min(ranges.len())..]
        .iter()
        .map(|&(_, hi)| hi)
        .find(|&hi| hi > first && hi < last);
    match (below, above) {
        (Some(b), Some(a)) => Some(if row - b <= a - row { b } else { a }),
        (b, a) => b.or(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges_of(counts: &[usize]) -> Vec<(usize, usize)> {
        let mut row = 0;
        counts
            .iter()
            .map(|&c| {
                row += c;
                (row - c, row)
            })
            .collect()
    }

    /// Every row in exactly one tile, tiles inside their expert and in row order, every tile in
    /// exactly one task.
    fn check_partition(plan: &RowTasks, ranges: &[(usize, usize)]) {
        let mut row = ranges.first().map_or(0, |r| r.0);
        for &(e, a, b) in &plan.tiles {
            assert_eq!(a, row, "{plan:?}");
            assert!(a < b && ranges[e].0 <= a && b <= ranges[e].1, "{plan:?}");
            row = b;
        }
        assert_eq!(row, ranges.last().map_or(0, |r| r.1));
        let mut seen: Vec<usize> = (0..plan.len())
            .flat_map(|j| plan.tiles_of(j).to_vec())
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..plan.tiles.len()).collect::<Vec<_>>());
    }

    #[test]
    fn plans_partition_the_rows() {
        let cases: [&[usize]; 7] = [
            &[284, 272, 223, 221, 237, 279, 272, 260],
            &[3, 0, 5],
            &[0, 0, 1],
            &[1],
            &[1000, 0, 0, 3, 7, 1],
            &[64; 16],
            &[],
        ];
        for counts in cases {
            let ranges = ranges_of(counts);
            for (rows, threads) in [(64, 16), (7, 3), (1, 2), (352, 2), (512, 1)] {
                for plan in [
                    RowTasks::plan(&ranges, rows, threads),
                    RowTasks::by_expert(&ranges, rows),
                    RowTasks::by_chunks(&ranges, rows, threads),
                ] {
                    check_partition(&plan, &ranges);
                }
            }
        }
        // Rows that start past 0 (a wave of the backward is planned on its own rows).
        let wave = [(100, 130), (130, 130), (130, 200)];
        check_partition(&RowTasks::by_chunks(&wave, 16, 4), &wave);
    }

    #[test]
    fn chunks_balance_the_layer_that_expert_tiles_do_not() {
        // The d = 64 benchmark layer's experts at 16 threads: whole-expert tiles leave the
        // longest thread 163 rows, equal chunks 128 plus a tile's cost.
        let ranges = ranges_of(&[284, 272, 223, 221, 237, 279, 272, 260]);
        let experts = RowTasks::by_expert(&ranges, 64);
        assert_eq!(experts.tiles.len(), 37);
        assert_eq!(experts.finish_estimate(16), 163 + 3 * TILE_COST_ROWS);
        let plan = RowTasks::plan(&ranges, 64, 16);
        assert_eq!(plan.len(), 32);
        // Two chunks per thread, each of at most two tiles.
        assert!(plan.finish_estimate(16) <= 128 + 4 * TILE_COST_ROWS);
        // Tiles of a chunk crossing an expert boundary; every task about 64 rows.
        for j in 0..plan.len() {
            let rows: usize = plan
                .tiles_of(j)
                .iter()
                .map(|&i| plan.tiles[i].2 - plan.tiles[i].1)
                .sum();
            assert!(rows.abs_diff(64) <= SNAP_ROWS, "task {j}: {rows} rows");
        }
    }

    #[test]
    fn whole_experts_stay_when_they_balance() {
        // Equal experts that split evenly over the team: no tile crosses an expert.
        let ranges = ranges_of(&[256; 8]);
        assert_eq!(
            RowTasks::plan(&ranges, 64, 16),
            RowTasks::by_expert(&ranges, 64)
        );
        // One thread: always whole-expert tiles.
        let ranges = ranges_of(&[300, 7, 0, 129]);
        assert_eq!(
            RowTasks::plan(&ranges, 64, 1),
            RowTasks::by_expert(&ranges, 64)
        );
    }

    #[test]
    fn boundaries_snap_to_nearby_experts() {
        // A chunk boundary at row 100 with an expert ending at 94: the chunk ends at 94; not
        // with chunks of 10 rows (more than an eighth of a chunk).
        let ranges = ranges_of(&[94, 106]);
        let plan = RowTasks::by_chunks(&ranges, 100, 2);
        assert_eq!(plan.tiles, vec![(0, 0, 94), (1, 94, 200)]);
        assert_eq!(plan.len(), 2);
        let plan = RowTasks::by_chunks(&ranges_of(&[8, 12]), 10, 2);
        assert_eq!(plan.tiles, vec![(0, 0, 8), (1, 8, 10), (1, 10, 20)]);
        assert_eq!(nearest_boundary(&ranges, 100), Some(94));
        assert_eq!(nearest_boundary(&ranges_of(&[10]), 5), None);
        assert_eq!(nearest_boundary(&ranges_of(&[0, 10, 0, 5]), 12), Some(10));
    }

    #[test]
    fn tasks_group_parts_in_run_order() {
        let ranges = ranges_of(&[3, 9]);
        let plan = RowTasks::by_expert(&ranges, 4);
        // Tiles: (0, 0..3), (1, 3..6), (1, 6..9), (1, 9..12); largest first (3 rows each).
        let grouped = plan.group(vec!['a', 'b', 'c', 'd']);
        assert_eq!(grouped.len(), 4);
        assert!(grouped.iter().all(|t| t.len() == 1));
        let chunks = RowTasks::by_chunks(&ranges, 6, 2);
        assert_eq!(chunks.tiles, vec![(0, 0, 3), (1, 3, 6), (1, 6, 12)]);
        assert_eq!(
            chunks.group(vec!['a', 'b', 'c']),
            vec![vec![(0, 'a'), (1, 'b')], vec![(2, 'c')]]
        );
    }
}
