//! Runs a kernel's tasks on torch's own OpenMP threads when Python has registered them.
//!
//! Why: after every parallel torch op, torch's OpenMP workers spin for a while before they sleep.
//! A kernel that brings its own threads (rayon) then competes with spinning workers for the same
//! cores and can run at half speed. Running the tasks *on* the OpenMP team instead uses exactly
//! the threads torch would use, with no oversubscription. Python looks up `GOMP_parallel` in the
//! OpenMP runtime torch loaded and passes its address to `set_gomp_parallel`; without it (other
//! platforms, other runtimes) the tasks run on a rayon pool of the same size.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::threads::with_threads;

/// `void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags)`:
/// libgomp's (and LLVM libomp's GNU-compatible) entry point for `#pragma omp parallel`.
type GompParallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, u32, u32);

static GOMP_PARALLEL: AtomicUsize = AtomicUsize::new(0);

/// Parallel regions started on the OpenMP team, and their summed wall time in nanoseconds: a
/// diagnostic (`moerust._native.parallel_regions`) for the fork/join cost of small steps.
static REGIONS: AtomicU64 = AtomicU64::new(0);
static REGION_NS: AtomicU64 = AtomicU64::new(0);

/// `(regions, nanoseconds)` of the OpenMP-team regions run so far in this process.
pub fn regions() -> (u64, u64) {
    (
        REGIONS.load(Ordering::Relaxed),
        REGION_NS.load(Ordering::Relaxed),
    )
}

/// When on, each region's `(start, end, tasks)` is logged (start and end on [`clock_ns`]): a
/// diagnostic timeline, off by default.
static LOGGING: AtomicBool = AtomicBool::new(false);
static LOG: std::sync::Mutex<Vec<(u64, u64, usize)>> = std::sync::Mutex::new(Vec::new());

/// Turns the region log on or off and returns (and clears) what it holds.
pub fn take_log(on: bool) -> Vec<(u64, u64, usize)> {
    LOGGING.store(on, Ordering::Relaxed);
    std::mem::take(&mut *LOG.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Named instants inside the native calls, logged while the region log is on (see [`mark`]).
static MARKS: std::sync::Mutex<Vec<(u64, &'static str)>> = std::sync::Mutex::new(Vec::new());

/// Logs `label` at this instant when the region log is on (a diagnostic: where the serial work
/// between a call's regions goes); costs one relaxed load when it is off.
pub fn mark(label: &'static str) {
    if LOGGING.load(Ordering::Relaxed) {
        let now = clock_ns();
        MARKS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((now, label));
    }
}

/// Returns (and clears) the instants logged by [`mark`].
pub fn take_marks() -> Vec<(u64, &'static str)> {
    std::mem::take(&mut *MARKS.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Nanoseconds since the first use of this clock (the region log's time base).
pub fn clock_ns() -> u64 {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

/// Registers the address of `GOMP_parallel` (0 unregisters).
///
/// # Safety
/// `addr` must be 0 or the address of a function with the `GOMP_parallel` signature that stays
/// loaded for the life of the process (torch never unloads its OpenMP runtime).
pub unsafe fn set_gomp_parallel(addr: usize) {
    GOMP_PARALLEL.store(addr, Ordering::Release);
}

struct Shared<'a> {
    next: AtomicUsize,
    n: usize,
    task: &'a (dyn Fn(usize) + Sync),
    panicked: AtomicBool,
}

thread_local! {
    /// Whether this thread is running a task of a parallel region (see [`for_each_task`]).
    static IN_TASK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` marked as inside a task, so that kernels it calls run their own tasks inline.
fn as_task<R>(f: impl FnOnce() -> R) -> R {
    let before = IN_TASK.with(|c| c.replace(true));
    let out = f();
    IN_TASK.with(|c| c.set(before));
    out
}

extern "C" fn worker(data: *mut c_void) {
    // SAFETY: `data` is the `&Shared` that `for_each_task` passed to GOMP_parallel, which returns
    // only after every thread has left this function, so the reference is live throughout.
    let shared = unsafe { &*(data as *const Shared<'_>) };
    as_task(|| worker_loop(shared));
}

fn worker_loop(shared: &Shared<'_>) {
    loop {
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        if i >= shared.n {
            break;
        }
        // A panic must not unwind into C frames; record it and re-raise on the calling thread.
        if catch_unwind(AssertUnwindSafe(|| (shared.task)(i))).is_err() {
            shared.panicked.store(true, Ordering::Relaxed);
        }
    }
}

/// Runs `task(i)` for every `i < n` on up to `threads` threads, each thread taking the next
/// unclaimed task (dynamic scheduling, so uneven tasks balance). Returns when all are done.
/// Called from inside another call's task (a kernel composed of kernels, each block of rows on
/// one thread), it runs the tasks inline: the enclosing region already uses the team.
pub fn for_each_task(threads: usize, n: usize, task: &(dyn Fn(usize) + Sync)) {
    let threads = crate::threads::resolve_threads(threads).min(n).max(1);
    if n == 0 {
        return;
    }
    let addr = GOMP_PARALLEL.load(Ordering::Acquire);
    if threads == 1 || IN_TASK.with(|c| c.get()) {
        (0..n).for_each(task);
        return;
    }
    if addr == 0 {
        use rayon::prelude::*;
        with_threads(threads, usize::MAX, || {
            (0..n)
                .into_par_iter()
                .with_max_len(1)
                .for_each(|i| as_task(|| task(i)))
        });
        return;
    }
    // The whole team torch uses, even when the work needs fewer threads (those find no task and
    // return at once): a team of another size makes libgomp re-form its team, twice per kernel
    // between torch ops. On the lent 16-core VM gather+combine steps whose kernels were sized to
    // 4-12 of 16 threads took 1.3-10 ms this way, 0.6-1.1 ms on the full team.
    let threads = threads.max(crate::threads::full_team());
    let shared = Shared {
        next: AtomicUsize::new(0),
        n,
        task,
        panicked: AtomicBool::new(false),
    };
    let start = std::time::Instant::now();
    // SAFETY: `addr` was registered through `set_gomp_parallel`, whose contract is that it is
    // GOMP_parallel; `worker` matches the callback type and `shared` outlives the call, which
    // blocks until the whole team is done.
    unsafe {
        let gomp: GompParallel = std::mem::transmute::<usize, GompParallel>(addr);
        gomp(
            worker,
            &shared as *const Shared<'_> as *mut c_void,
            threads as u32,
            0,
        );
    }
    REGIONS.fetch_add(1, Ordering::Relaxed);
    let took = start.elapsed().as_nanos() as u64;
    REGION_NS.fetch_add(took, Ordering::Relaxed);
    if LOGGING.load(Ordering::Relaxed) {
        let end = clock_ns();
        LOG.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((end - took, end, n));
    }
    if shared.panicked.load(Ordering::Relaxed) {
        panic!("a kernel task panicked on an OpenMP thread");
    }
}

/// Per-task mutable parts handed out once each: a task takes its own part by index, so tasks
/// share `&TaskParts` while each still gets exclusive (`&mut`) access to its own buffers (also
/// for a caller whose tasks run in a region of another function's making, see
/// [`run_parts_then`]).
pub struct TaskParts<P>(Vec<std::sync::Mutex<Option<P>>>);

impl<P> TaskParts<P> {
    /// Wraps `parts`.
    pub fn new(parts: impl IntoIterator<Item = P>) -> Self {
        Self(
            parts
                .into_iter()
                .map(|p| std::sync::Mutex::new(Some(p)))
                .collect(),
        )
    }

    /// Takes part `i`; each part can be taken once.
    pub fn take(&self, i: usize) -> P {
        self.0[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("each task part is taken once")
    }
}

/// Runs `f(i, part)` for each of `parts` on up to `threads` threads (see [`for_each_task`]).
pub fn for_each_part<P: Send>(threads: usize, parts: Vec<P>, f: impl Fn(usize, P) + Sync) {
    let n = parts.len();
    let parts = TaskParts::new(parts);
    for_each_task(threads, n, &|i| f(i, parts.take(i)));
}

/// A task of a region run by index, fallible (see [`run_parts_then`]).
pub type IndexTask<'f> = &'f (dyn Fn(usize) -> crate::error::KResult<()> + Sync);

/// Runs `f(part)` for each of `parts`, then `then(i)` for each `i < n_then`, in one region
/// (tasks claimed in that order, see [`for_each_task`]): two kinds of work behind one fork/join,
/// the second filling the first's tail. Returns the first error any task reported. (Nothing is
/// boxed per task: with boxed tasks, made on the calling thread and freed on the workers, the
/// serial time before such a region measured 26-39 us on the lent 16-core VM, 9 us without.)
pub fn run_parts_then<P: Send>(
    threads: usize,
    parts: Vec<P>,
    f: impl Fn(P) -> crate::error::KResult<()> + Sync,
    n_then: usize,
    then: IndexTask<'_>,
) -> crate::error::KResult<()> {
    let n = parts.len();
    let parts: Vec<Option<P>> = parts
        .into_iter()
        .map(Some)
        .chain((0..n_then).map(|_| None))
        .collect();
    try_for_each_part(threads, parts, |i, part| match part {
        Some(part) => f(part),
        None => then(i - n),
    })
}

/// Runs `task(i)` for each `i < n` in one region (see [`for_each_task`]); returns the first error
/// any task reported.
pub fn try_for_each_index(
    threads: usize,
    n: usize,
    task: IndexTask<'_>,
) -> crate::error::KResult<()> {
    run_parts_then(threads, Vec::<()>::new(), |_| Ok(()), n, task)
}

/// Like [`for_each_part`] for fallible tasks: returns the first error any task reported.
pub fn try_for_each_part<P: Send, E: Send>(
    threads: usize,
    parts: Vec<P>,
    f: impl Fn(usize, P) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let first_err = std::sync::Mutex::new(None);
    for_each_part(threads, parts, |i, part| {
        if let Err(e) = f(i, part) {
            first_err
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(e);
        }
    });
    first_err
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_on_the_rayon_fallback() {
        let hits: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        for threads in [1, 3] {
            for_each_task(threads, hits.len(), &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
        }
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 2));
        for_each_task(4, 0, &|_| unreachable!());
    }

    #[test]
    fn parts_then_indices_each_run_once_and_errors_come_back() {
        let hits: Vec<AtomicUsize> = (0..50).map(|_| AtomicUsize::new(0)).collect();
        for threads in [1, 3] {
            let parts: Vec<usize> = (0..20).collect();
            let run_part = |p: usize| {
                hits[p].fetch_add(1, Ordering::Relaxed);
                Ok(())
            };
            run_parts_then(threads, parts, run_part, 30, &|i| {
                hits[20 + i].fetch_add(1, Ordering::Relaxed);
                Ok(())
            })
            .unwrap();
        }
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 2));
        let fails = |i: usize| match i {
            7 => crate::error::value_err("seven"),
            _ => Ok(()),
        };
        let err = run_parts_then(3, vec![1, 2], |_| Ok(()), 10, &fails).unwrap_err();
        assert!(err.to_string().contains("seven"), "{err}");
    }
}
