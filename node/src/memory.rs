//! How the process hands freed memory back to the OS.
//!
//! glibc's malloc serves blocks of 128 KiB and more with `mmap`, and gives them back with
//! `munmap` when freed, until the first such block is freed: then it raises that threshold to
//! the freed block's size (up to 32 MiB), so that later blocks of that size come from the
//! heap, whose free space it seldom returns. RocksDB's memtables are arenas of such blocks,
//! allocated and freed whole at every flush. With the threshold raised, each flush left its
//! arena in the heap, and resident memory climbed a few MiB at every other flush (the soak,
//! `scripts/soak`: 56 to 79 MiB in ten minutes, flat between flushes). A fixed threshold
//! turns the adjustment off, and the soak's memory stays flat.

/// Fixes glibc's mmap threshold at its default (128 KiB), unless the operator set one
/// (`MALLOC_MMAP_THRESHOLD_`). Call it once, before the runtime starts its threads.
pub fn return_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        use std::os::raw::c_int;
        extern "C" {
            fn mallopt(param: c_int, value: c_int) -> c_int;
        }
        const M_MMAP_THRESHOLD: c_int = -3;
        // SAFETY: mallopt only sets one of glibc malloc's tunables; it takes plain integers
        // and touches no memory of ours. A failure (0) leaves the default behaviour.
        let _ = unsafe { mallopt(M_MMAP_THRESHOLD, 128 * 1024) };
    }
}
