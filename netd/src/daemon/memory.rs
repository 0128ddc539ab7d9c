//! Giving freed memory back to the kernel after the large, short-lived allocations of a full
//! lease list and a full reconcile (the parsed list, the dump, 3 entries per peer twice):
//! glibc keeps freed heap pages in the process unless asked, so the resident size would stay
//! at that peak between re-lists.

/// Returns the free pages of the heap to the kernel (`malloc_trim(0)`). Cheap next to the
/// full reconcile it follows; never called per lease event.
pub fn release_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own heap; no pointer is handed over.
    unsafe {
        libc::malloc_trim(0);
    }
}
