//! The daemon's heap across reloads. Parsing and compiling a million-entry rule set allocates
//! a few hundred MB for a moment; glibc's allocator would keep most of it mapped once freed
//! (its mmap threshold grows with every large block freed, after which large blocks come from
//! the heap, which it trims only at the top). The daemon lives for months: what a reload
//! needed for a moment goes back to the kernel. musl (the installed static build) maps large
//! blocks and returns them by itself.

/// Large blocks (a million-entry vector, a big hash table) are mapped on their own and
/// unmapped when freed: a fixed threshold turns off glibc's growing one.
pub(super) fn map_large_blocks() {
    #[cfg(target_env = "gnu")]
    {
        const THRESHOLD: libc::c_int = 256 << 10;
        // SAFETY: mallopt takes no pointers.
        if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD) } != 1 {
            log::debug!("mallopt(M_MMAP_THRESHOLD) refused");
        }
    }
}

/// Returns freed heap pages to the kernel, after a reload dropped what it needed.
pub(super) fn release_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}
