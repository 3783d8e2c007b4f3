//! Thread pools sized per call. Python passes `torch.get_num_threads()`; `RAYON_NUM_THREADS`, when
//! set, overrides it. Pools are built once per size and kept, so a call costs no thread start-up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use rayon::{ThreadPool, ThreadPoolBuilder};

fn pools() -> &'static Mutex<HashMap<usize, Arc<ThreadPool>>> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<ThreadPool>>>> = OnceLock::new();
    POOLS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The number of threads a call asking for `requested` threads gets.
pub fn resolve_threads(requested: usize) -> usize {
    let from_env = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0);
    from_env.unwrap_or(requested).max(1)
}

/// Element operations below which one more thread costs more (wake-up, and competition with
/// torch's OpenMP workers, which spin for a while after every torch op) than it saves.
pub const MIN_WORK_PER_THREAD: usize = 1 << 17;

/// Threads for a call of `work` element operations asking for `requested` threads.
pub fn threads_for(requested: usize, work: usize) -> usize {
    resolve_threads(requested)
        .min(work / MIN_WORK_PER_THREAD)
        .max(1)
}

/// Runs `f` inside a rayon pool of `threads_for(requested, work)` threads.
pub fn with_threads<R: Send>(requested: usize, work: usize, f: impl FnOnce() -> R + Send) -> R {
    let n = threads_for(requested, work);
    let pool = {
        // A poisoned lock only means another thread panicked while inserting; the map is still valid.
        let mut map = pools().lock().unwrap_or_else(|e| e.into_inner());
        map.entry(n)
            .or_insert_with(|| {
                Arc::new(
                    ThreadPoolBuilder::new()
                        .num_threads(n)
                        .thread_name(|i| format!("moerust-{i}"))
                        .build()
                        .expect("failed to start a rayon thread pool"),
                )
            })
            .clone()
    };
    pool.install(f)
}

thread_local! {
    static TEAM: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    static FULL: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The thread count asked for by the enclosing [`with_team`] (before sizing by work), or 0.
pub fn full_team() -> usize {
    FULL.with(|t| t.get())
}

/// Runs `f` on this thread with `threads_for(requested, work)` as the team size that
/// `omp_team` kernels split their tasks over (see [`team_size`]).
pub fn with_team<R>(requested: usize, work: usize, f: impl FnOnce() -> R) -> R {
    let n = threads_for(requested, work);
    let before = TEAM.with(|t| t.replace(n));
    let before_full = FULL.with(|t| t.replace(resolve_threads(requested)));
    let out = f();
    TEAM.with(|t| t.set(before));
    FULL.with(|t| t.set(before_full));
    out
}

/// The team size set by [`with_team`], or 1 outside of it.
pub fn team_size() -> usize {
    TEAM.with(|t| t.get()).max(1)
}

/// Rows per parallel task so that each task does at least `min_work` element operations.
pub fn rows_per_task(rows: usize, work_per_row: usize, min_work: usize) -> usize {
    let by_work = min_work.div_ceil(work_per_row.max(1));
    // Inside a team (omp_team kernels) split for the team; else for the current rayon pool.
    let team = TEAM.with(|t| t.get());
    let threads = if team > 0 {
        team
    } else {
        rayon::current_num_threads().max(1)
    };
    // Several tasks per thread so uneven rows still balance.
    let by_balance = rows.div_ceil(threads * 4);
    by_work.max(by_balance).max(1)
}

/// `v` cut into `blocks` consecutive pieces of `size` (the last ones shorter or empty).
pub fn split<U>(v: &[U], blocks: usize, size: usize) -> Vec<&[U]> {
    (0..blocks)
        .map(|b| &v[(b * size).min(v.len())..((b + 1) * size).min(v.len())])
        .collect()
}

/// [`split`] for a mutable slice.
pub fn split_mut<U>(mut v: &mut [U], blocks: usize, size: usize) -> Vec<&mut [U]> {
    let mut out = Vec::with_capacity(blocks);
    for _ in 0..blocks {
        let n = size.min(v.len());
        let (head, rest) = std::mem::take(&mut v).split_at_mut(n);
        out.push(head);
        v = rest;
    }
    out
}
