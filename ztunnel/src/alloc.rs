//! Allocator tuning for the data path.
//!
//! Bulk flows allocate and free buffers of up to a few hundred KiB per
//! chunk. With glibc's defaults such buffers are mmapped and unmapped, or
//! the arena's top is trimmed with `madvise(MADV_DONTNEED)` after each
//! free, and the next chunk faults its pages back in: measured at about a
//! tenth of ztunnel's CPU under bulk load. Raising both thresholds keeps
//! that memory in the arena for reuse. Idle memory is unchanged; peak RSS
//! under load grows by at most the trim threshold per arena.

const MMAP_THRESHOLD: libc::c_int = 4 * 1024 * 1024;
const TRIM_THRESHOLD: libc::c_int = 16 * 1024 * 1024;

/// Applies the thresholds. Call once, before other threads start.
#[allow(unsafe_code)]
pub fn tune() {
    // SAFETY: mallopt only sets allocator parameters; it is called before
    // any other thread exists, and both values are in glibc's valid ranges.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
