//! glibc malloc settings for a process that moves whole batches between threads.
//!
//! Batches are filled on the runtime's threads and freed on the worker's. With glibc's
//! defaults (an arena per thread, up to 8 per core; a mmap threshold that rises to 32 MiB
//! after the first large free) the memory of freed batches stays mapped: on the 1 M-record
//! backlog sluice peaked at 473 MiB with ~130 MiB of live heap (docs/benchmarks.md, ninth
//! round). Elsewhere (musl, macOS) these are no-ops.

/// Two arenas, and allocations of 1 MiB and more (encoded batches, record vectors) mapped and
/// unmapped on their own. Call first thing in `main`, before any thread exists. A user's
/// `GLIBC_TUNABLES` replaces this tuning.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn tune_allocator() {
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    // SAFETY: `mallopt` only sets allocator parameters, and runs before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Hands the free pages inside the arenas back to the kernel (a batch's records are freed in
/// an order that leaves holes the arenas would otherwise keep). Costs a walk of the free
/// lists: call once per batch, not per record.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_freed() {
    // SAFETY: `malloc_trim` takes no pointers and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() {}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_freed() {}
