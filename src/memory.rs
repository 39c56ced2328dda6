//! Giving freed memory back to the OS. glibc's malloc keeps what is freed in its arenas
//! (one per thread that allocated: the blocking pool's threads come and go) and returns
//! only the top of each heap, so a daemon whose heap stays small still creeps up in
//! resident memory over thousands of transitions (the soak, tests/soak.rs, saw 1.2 MB
//! of anonymous memory over 1,000). After each transition, what is free is handed back.

/// Caps glibc's arenas at two, before any thread starts: with one arena per thread
/// that ever allocated, freed memory scatters over many heaps and little of it can be
/// returned. The daemon's allocations are small and few; contention is not a concern.
pub fn fewer_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes no pointers; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Returns the allocator's free memory to the OS, on the blocking pool (it walks every
/// arena). Elsewhere than glibc, nothing to do.
pub fn give_back_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::task::spawn_blocking(|| {
        // SAFETY: malloc_trim takes no pointers; it only releases memory that is free.
        unsafe { libc::malloc_trim(0) };
    });
}
