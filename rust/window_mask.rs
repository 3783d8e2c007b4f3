//! Sliding-window causal masks and their block-sparse tile summary.
//!
//! Query i sits at key position pos(i) = i + k_len - q_len. Key j is visible iff j <= pos(i) and
//! pos(i) - j < window (the window counts the query's own key), and, with document ids, iff
//! doc[j] == doc[pos(i)].

use crate::error::{check_len, value_err, KResult};
use crate::omp_team::for_each_part;
use crate::threads::{rows_per_task, team_size};

/// Tile with no visible entry.
pub const TILE_EMPTY: i8 = 0;
/// Tile with some visible entries.
pub const TILE_PARTIAL: i8 = 1;
/// Tile whose every entry is visible.
pub const TILE_FULL: i8 = 2;

fn check(q_len: usize, k_len: usize, window: usize) -> KResult<()> {
    if window < 1 {
        return value_err(format!("window must be >= 1, got {window}"));
    }
    if q_len > k_len {
        return value_err(format!("q_len ({q_len}) must be <= k_len ({k_len})"));
    }
    Ok(())
}

/// Number of sequences: 1 without documents, else the rows of `doc_ids [B, k_len]` (with
/// `k_len == 0` there is nothing to fill, so 0).
fn batch(docs: Option<&[i64]>, k_len: usize) -> KResult<usize> {
    match docs {
        None => Ok(1),
        Some(_) if k_len == 0 => Ok(0),
        Some(d) => {
            let b = d.len() / k_len;
            check_len("doc_ids", d.len(), b * k_len)?;
            Ok(b)
        }
    }
}

/// Visible key range [lo, hi) of query i before document masking.
#[inline(always)]
fn key_range(i: usize, q_len: usize, k_len: usize, window: usize) -> (usize, usize) {
    let pos = i + k_len - q_len;
    (pos.saturating_sub(window - 1), pos + 1)
}

/// Fills `out[b, q_len, k_len]` (b = 1 without documents, else `docs.len() / k_len`).
pub fn window_mask(
    q_len: usize,
    k_len: usize,
    window: usize,
    docs: Option<&[i64]>,
    out: &mut [bool],
) -> KResult<()> {
    check(q_len, k_len, window)?;
    let b = batch(docs, k_len)?;
    check_len("out", out.len(), b * q_len * k_len)?;
    if q_len == 0 || k_len == 0 {
        return Ok(());
    }
    // Blocks of whole rows per task (on the caller's team, see `omp_team`).
    let rows = rows_per_task(b * q_len, k_len, 1 << 16);
    let parts: Vec<_> = out.chunks_mut(rows * k_len).collect();
    for_each_part(team_size(), parts, |block, part| {
        for (r, dst) in part.chunks_exact_mut(k_len).enumerate() {
            let row = block * rows + r;
            let (bi, i) = (row / q_len, row % q_len);
            let (lo, hi) = key_range(i, q_len, k_len, window);
            dst[..lo].fill(false);
            dst[hi..].fill(false);
            match docs {
                None => dst[lo..hi].fill(true),
                Some(d) => {
                    let doc = &d[bi * k_len..(bi + 1) * k_len];
                    let own = doc[hi - 1];
                    for (m, &dj) in dst[lo..hi].iter_mut().zip(&doc[lo..hi]) {
                        *m = dj == own;
                    }
                }
            }
        }
    });
    Ok(())
}

/// Fills `out[b, ceil(q_len/block_q), ceil(k_len/block_k)]` with TILE_EMPTY / TILE_PARTIAL /
/// TILE_FULL for the mask of `window_mask` (edge tiles count only their real entries). Work is
/// O(q_len * window): tiles outside the band are never visited entry by entry.
#[allow(clippy::too_many_arguments)]
pub fn window_tiles(
    q_len: usize,
    k_len: usize,
    window: usize,
    docs: Option<&[i64]>,
    block_q: usize,
    block_k: usize,
    out: &mut [i8],
) -> KResult<()> {
    check(q_len, k_len, window)?;
    if block_q < 1 || block_k < 1 {
        return value_err(format!(
            "block sizes must be >= 1, got block_q={block_q}, block_k={block_k}"
        ));
    }
    let (nq, nk) = (q_len.div_ceil(block_q), k_len.div_ceil(block_k));
    let b = batch(docs, k_len)?;
    check_len("out", out.len(), b * nq * nk)?;
    if nq == 0 || nk == 0 {
        return Ok(());
    }
    // Tiles of one row of query blocks cost O(block_q * window) to count.
    let rows = rows_per_task(b * nq, block_q * window.min(k_len), 1 << 16);
    let parts: Vec<_> = out.chunks_mut(rows * nk).collect();
    for_each_part(team_size(), parts, |block, part| {
        let mut visible = vec![0usize; nk];
        for (r, tiles) in part.chunks_exact_mut(nk).enumerate() {
            let row = block * rows + r;
            let (bi, qb) = (row / nq, row % nq);
            let doc = docs.map(|d| &d[bi * k_len..(bi + 1) * k_len]);
            let (q0, q1) = (qb * block_q, ((qb + 1) * block_q).min(q_len));
            // visible[kb]: visible entries counted per key block.
            tiles.fill(TILE_EMPTY);
            visible.fill(0);
            for i in q0..q1 {
                let (lo, hi) = key_range(i, q_len, k_len, window);
                let own = doc.map(|d| d[hi - 1]);
                let mut j = lo;
                while j < hi {
                    let kb = j / block_k;
                    let end = ((kb + 1) * block_k).min(hi);
                    visible[kb] += match (doc, own) {
                        (Some(d), Some(o)) => d[j..end].iter().filter(|&&x| x == o).count(),
                        _ => end - j,
                    };
                    j = end;
                }
            }
            for (kb, (tile, &v)) in tiles.iter_mut().zip(&visible).enumerate() {
                let cols = ((kb + 1) * block_k).min(k_len) - kb * block_k;
                let area = (q1 - q0) * cols;
                *tile = if v == 0 {
                    TILE_EMPTY
                } else if v == area {
                    TILE_FULL
                } else {
                    TILE_PARTIAL
                };
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_counts_the_query_itself() {
        let mut m = vec![false; 9];
        window_mask(3, 3, 2, None, &mut m).unwrap();
        #[rustfmt::skip]
        let expected = vec![true, false, false,
                            true, true, false,
                            false, true, true];
        assert_eq!(m, expected);
    }

    #[test]
    fn queries_align_to_the_end_and_documents_split() {
        let mut m = vec![false; 4];
        window_mask(1, 4, 10, Some(&[0, 1, 1, 1]), &mut m).unwrap();
        assert_eq!(m, vec![false, true, true, true]);
    }

    #[test]
    fn tiles_summarise_the_band() {
        let mut t = vec![0i8; 4];
        window_tiles(4, 4, 1, None, 2, 2, &mut t).unwrap();
        assert_eq!(t, vec![TILE_PARTIAL, TILE_EMPTY, TILE_EMPTY, TILE_PARTIAL]);
        window_tiles(4, 4, 4, None, 2, 2, &mut t).unwrap();
        assert_eq!(t, vec![TILE_PARTIAL, TILE_EMPTY, TILE_FULL, TILE_PARTIAL]);
    }

    #[test]
    fn bad_window_is_an_error() {
        assert!(window_mask(2, 2, 0, None, &mut [false; 4]).is_err());
        assert!(window_mask(3, 2, 1, None, &mut [false; 6]).is_err());
    }
}
