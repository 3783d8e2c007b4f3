//! A pool of large, reusable output buffers.
//!
//! Why: the first write to a fresh multi-megabyte buffer takes one page fault per 4 KiB page, and
//! on a virtual machine that costs more than the copy that fills it (measured on the lent 16-core
//! VM: ~2000 faults, ~1.2 ms of a 5 ms dispatch step). Kernel outputs of at least `MIN_POOLED`
//! bytes come from here; when the last tensor using one is freed its block comes back (while the
//! idle blocks stay under a cap) and the next request of the same size class reuses its pages,
//! already mapped. It is the CPU counterpart of a CUDA caching allocator, for our outputs only.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::{BTreeMap, HashMap};
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Alignment of every block: a cache line, more than any element type needs.
pub const ALIGN: usize = 64;

/// Outputs smaller than this come from the system allocator (its small bins do not fault).
pub const MIN_POOLED: usize = 1 << 16;

/// An aligned heap block of `size` bytes, exclusively owned (like `Box<[u8]>`).
pub struct Block {
    ptr: NonNull<u8>,
    size: usize,
}

// SAFETY: a Block is the only handle to its allocation and offers no shared mutation through
// `&Block`, so moving it to or sharing it with another thread is sound (as for `Box<[u8]>`).
unsafe impl Send for Block {}
// SAFETY: see above; `&Block` only exposes the pointer value and the size.
unsafe impl Sync for Block {}

impl Block {
    /// Start of the block (aligned to `ALIGN`).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Size of the block in bytes (its size class, at least what was asked for).
    pub fn size(&self) -> usize {
        self.size
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout (see `take`).
        unsafe {
            dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.size, ALIGN),
            )
        }
    }
}

/// The size class of a request: 4 KiB steps up to 64 KiB, then 8 classes per doubling (steps of
/// 1/16 of the next power of two), so a block is under 12.5 % larger than the request and similar
/// sizes share blocks.
pub fn size_class(bytes: usize) -> usize {
    let bytes = bytes.max(1);
    let step = if bytes <= MIN_POOLED {
        4096
    } else {
        (bytes.next_power_of_two() / 16).max(4096)
    };
    bytes.div_ceil(step) * step
}

/// The idle blocks by size class, each class's blocks in the order they came back, plus that
/// order across classes, so that a full pool makes room by freeing the blocks idle the longest.
///
/// Why evict rather than refuse: a workload that moves to new shapes (the next benchmark case, a
/// larger batch) would otherwise find the pool full of blocks it no longer asks for, and every one
/// of its outputs would fault in fresh pages again.
#[derive(Default)]
struct Idle {
    blocks: HashMap<usize, Vec<(u64, Block)>>,
    /// `return tick -> size class` of every idle block, oldest first.
    order: BTreeMap<u64, usize>,
    tick: u64,
    bytes: usize,
}

impl Idle {
    /// The most recently returned idle block of size class `size`.
    fn pop(&mut self, size: usize) -> Option<Block> {
        let (tick, block) = self.blocks.get_mut(&size)?.pop()?;
        self.order.remove(&tick);
        self.bytes -= block.size;
        Some(block)
    }

    /// Keeps `block`, freeing the longest-idle blocks while the total would exceed `cap`; a block
    /// larger than `cap` itself is freed.
    fn push(&mut self, block: Block, cap: usize) {
        if block.size > cap {
            return;
        }
        while self.bytes + block.size > cap {
            let Some((_, size)) = self.order.pop_first() else {
                break;
            };
            // Each class's blocks are in return order, so the oldest overall is its class's first.
            let class = self.blocks.get_mut(&size).expect("ordered blocks are idle");
            let (_, old) = class.remove(0);
            self.bytes -= old.size;
        }
        self.tick += 1;
        self.order.insert(self.tick, block.size);
        self.bytes += block.size;
        self.blocks
            .entry(block.size)
            .or_default()
            .push((self.tick, block));
    }
}

fn idle_map() -> &'static Mutex<Idle> {
    static IDLE: OnceLock<Mutex<Idle>> = OnceLock::new();
    IDLE.get_or_init(|| Mutex::new(Idle::default()))
}

/// The idle blocks, blocking (for bookkeeping calls).
fn idle() -> MutexGuard<'static, Idle> {
    // A poisoned lock only means a panic elsewhere while holding it; the map is still consistent.
    idle_map().lock().unwrap_or_else(|e| e.into_inner())
}

/// The idle blocks if nobody else holds them. `take` and `give` never wait: under contention
/// they allocate or free directly, so a lock held by a thread that does not exist in a forked
/// child (fork copies a locked mutex) cannot deadlock the child.
fn try_idle() -> Option<MutexGuard<'static, Idle>> {
    match idle_map().try_lock() {
        Ok(guard) => Some(guard),
        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// Most idle bytes kept: `MOERUST_POOL_MB` MiB (read once; 0 turns pooling off), default 1024.
pub fn cap_bytes() -> usize {
    static CAP: OnceLock<usize> = OnceLock::new();
    *CAP.get_or_init(|| {
        let mb = std::env::var("MOERUST_POOL_MB")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(1024);
        mb.saturating_mul(1 << 20)
    })
}

/// A block of at least `bytes` bytes: an idle one of the same size class if there is one (and no
/// other thread is using the pool right now), else a new zeroed one (zeroed, so every byte is
/// initialised; fresh pages cost nothing until written). `None` if the system is out of memory.
pub fn take(bytes: usize) -> Option<Block> {
    let size = size_class(bytes);
    if let Some(mut idle) = try_idle() {
        if let Some(block) = idle.pop(size) {
            return Some(block);
        }
    }
    let layout = Layout::from_size_align(size, ALIGN).ok()?;
    // SAFETY: `layout` has a non-zero size (size_class returns at least 4096).
    let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })?;
    Some(Block { ptr, size })
}

/// Returns a block to the pool, freeing the longest-idle blocks if the idle bytes would exceed the
/// cap; frees `block` itself if it is larger than the cap (or another thread is using the pool).
pub fn give(block: Block) {
    if let Some(mut idle) = try_idle() {
        let cap = cap_bytes();
        idle.push(block, cap);
    }
    // Otherwise `block` drops here and goes back to the system allocator.
}

/// Bytes held by idle blocks.
pub fn idle_bytes() -> usize {
    idle().bytes
}

/// Frees every idle block; returns the bytes released.
pub fn clear() -> usize {
    let mut idle = idle();
    let freed = idle.bytes;
    idle.blocks.clear();
    idle.order.clear();
    idle.bytes = 0;
    freed
}

/// Bytes of `len` elements of `T`, if that is a size a block can have (room left for the size
/// class to round up, <= 12.5 %, within a valid allocation size).
pub fn bytes_for<T>(len: usize) -> Option<usize> {
    len.checked_mul(std::mem::size_of::<T>())
        .filter(|&b| b <= isize::MAX as usize / 2)
}

/// Element types for which every bit pattern is a valid value (a pooled block's contents are
/// zeroes or whatever its last user wrote).
///
/// # Safety
/// Implement only for types without invalid bit patterns, padding or drop glue.
pub unsafe trait Plain: Copy + Send + Sync + 'static {}
// SAFETY: plain numbers: every bit pattern is a value, no padding, no drop glue.
unsafe impl Plain for f32 {}
// SAFETY: as above.
unsafe impl Plain for f64 {}
// SAFETY: as above.
unsafe impl Plain for i64 {}

/// A buffer of `len` elements on a pooled block, owned by Rust code (kernel scratch, or buffers a
/// layer keeps between its forward and backward calls); the block goes back to the pool on drop.
/// Contents are unspecified until written.
pub struct PoolVec<T: Plain> {
    block: Option<Block>,
    len: usize,
    _elem: std::marker::PhantomData<T>,
}

impl<T: Plain> PoolVec<T> {
    /// A buffer of `len` elements; None if the size overflows or memory is exhausted.
    pub fn new(len: usize) -> Option<Self> {
        Some(Self {
            block: Some(take(bytes_for::<T>(len)?)?),
            len,
            _elem: std::marker::PhantomData,
        })
    }

    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        let block = self
            .block
            .as_ref()
            .expect("a PoolVec holds its block until dropped");
        // SAFETY: the block is aligned to ALIGN (>= align_of::<T>()), at least
        // len * size_of::<T>() bytes long and initialised (zeroed when allocated, written since),
        // T is Plain (any bits are a value), and `&self` keeps the block alive and unaliased by
        // writers for the borrow's life.
        unsafe { std::slice::from_raw_parts(block.as_ptr() as *const T, self.len) }
    }

    /// The elements, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        let block = self
            .block
            .as_mut()
            .expect("a PoolVec holds its block until dropped");
        // SAFETY: as in `as_slice`; `&mut self` makes this the only access for the borrow's life.
        unsafe { std::slice::from_raw_parts_mut(block.as_ptr() as *mut T, self.len) }
    }
}

impl<T: Plain> Drop for PoolVec<T> {
    fn drop(&mut self) {
        if let Some(block) = self.block.take() {
            give(block);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_vec_round_trips_through_the_pool() {
        let mut v = PoolVec::<f64>::new(1000).unwrap();
        assert_eq!(v.as_slice().len(), 1000);
        v.as_mut_slice().fill(2.5);
        assert!(v.as_slice().iter().all(|&x| x == 2.5));
        assert!(PoolVec::<i64>::new(usize::MAX / 4).is_none());
        let empty = PoolVec::<f32>::new(0).unwrap();
        assert!(empty.as_slice().is_empty());
    }

    #[test]
    fn size_classes_bound_the_slack() {
        assert_eq!(size_class(0), 4096);
        assert_eq!(size_class(4097), 8192);
        assert_eq!(size_class(MIN_POOLED), MIN_POOLED);
        for bytes in [70_000usize, 1 << 20, (1 << 20) + 1, 3_000_000, 123_456_789] {
            let c = size_class(bytes);
            assert!(c >= bytes && (c - bytes) * 8 <= bytes, "{bytes} -> {c}");
        }
    }

    #[test]
    fn blocks_are_aligned_zeroed_and_reused() {
        // Sizes used only by this test, so other tests' blocks cannot interfere.
        let b = take(777_777).unwrap();
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert!(b.size() >= 777_777);
        // SAFETY: the block holds `size` initialised (zeroed) bytes and is exclusively ours.
        let bytes = unsafe { std::slice::from_raw_parts_mut(b.as_ptr(), b.size()) };
        assert!(bytes.iter().all(|&x| x == 0));
        bytes[0] = 7;
        let ptr = b.as_ptr();
        give(b);
        let again = take(777_000).unwrap();
        assert_eq!(again.as_ptr(), ptr, "same size class reuses the idle block");
        give(again);
        assert!(idle_bytes() >= 777_777);
    }

    #[test]
    fn a_full_pool_frees_the_longest_idle_blocks() {
        let mut idle = Idle::default();
        let cap = 3 * 8192;
        let first = take(8192).unwrap();
        let first_ptr = first.as_ptr();
        idle.push(first, cap);
        idle.push(take(8192).unwrap(), cap);
        idle.push(take(4096).unwrap(), cap);
        assert_eq!(idle.bytes, 20480);
        // A new class that does not fit evicts the oldest 8 KiB block, not the new one.
        idle.push(take(12288).unwrap(), cap);
        assert_eq!(idle.bytes, 8192 + 4096 + 12288);
        assert!(idle.pop(12288).is_some());
        let kept = idle.pop(8192).unwrap();
        assert_ne!(
            kept.as_ptr(),
            first_ptr,
            "the longest-idle block went first"
        );
        assert!(idle.pop(8192).is_none());
        assert_eq!(idle.order.len(), 1);
        // A block larger than the cap is not kept and evicts nothing.
        idle.push(take(cap + 4096).unwrap(), cap);
        assert_eq!(idle.bytes, 4096);
        assert!(idle.pop(4096).is_some());
        assert_eq!((idle.bytes, idle.order.len()), (0, 0));
    }
}
