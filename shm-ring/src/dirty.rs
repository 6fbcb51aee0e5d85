//! Dirty-page logging: a shared bitmap, one bit per 4 KiB page of every region of the
//! driver's memory (regions in guest-address order, each starting on a fresh bit), set with
//! atomic ORs whenever the device writes guest memory while logging is on.

use crate::MemError;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes per bit of the dirty bitmap.
pub const DIRTY_PAGE: u64 = 4096;

/// Bytes a bitmap needs for regions of these sizes (rounded up to whole u64 words).
pub fn bitmap_len(region_sizes: impl IntoIterator<Item = u64>) -> u64 {
    let bits: u64 = region_sizes
        .into_iter()
        .map(|s| s.div_ceil(DIRTY_PAGE))
        .sum();
    bits.div_ceil(64) * 8
}

/// A mapped dirty bitmap.
pub struct DirtyLog {
    words: NonNull<AtomicU64>,
    len: usize,
    _fd: OwnedFd,
}

// SAFETY: the bitmap is shared memory only ever touched through atomics.
unsafe impl Send for DirtyLog {}
// SAFETY: as above.
unsafe impl Sync for DirtyLog {}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `map`.
        unsafe {
            libc::munmap(self.words.as_ptr().cast(), self.len);
        }
    }
}

impl DirtyLog {
    /// Maps `len` bytes (a multiple of 8) of the bitmap memfd `fd`.
    pub fn map(fd: OwnedFd, len: u64) -> Result<Self, MemError> {
        if len == 0 || !len.is_multiple_of(8) {
            return Err(MemError::BadRegion(format!("dirty bitmap of {len} bytes")));
        }
        crate::memory::check_memfd(
            std::os::fd::AsFd::as_fd(&fd),
            0,
            len,
            crate::memory::SealPolicy::Required,
        )?;
        let l = usize::try_from(len).map_err(|_| MemError::BadRegion("bitmap too large".into()))?;
        // SAFETY: a fresh shared mapping of a sealed memfd at least `len` bytes long.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                l,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MemError::Map(std::io::Error::last_os_error().to_string()));
        }
        let words =
            NonNull::new(p.cast::<AtomicU64>()).ok_or_else(|| MemError::Map("null".into()))?;
        Ok(DirtyLog {
            words,
            len: l,
            _fd: fd,
        })
    }

    /// Takes the set bits and clears them (atomic swap per word): the pages written since
    /// the last call, as bit indices.
    pub fn harvest(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for w in 0..self.len / 8 {
            // SAFETY: w < len / 8, inside the mapping; accessed atomically only.
            let mut v = unsafe { (*self.words.as_ptr().add(w)).swap(0, Ordering::AcqRel) };
            while v != 0 {
                let b = v.trailing_zeros() as u64;
                out.push(w as u64 * 64 + b);
                v &= v - 1;
            }
        }
        out
    }

    /// Sets bits `first..=last` (clamped to the bitmap).
    pub fn set_bits(&self, first: u64, last: u64) {
        let nbits = self.len as u64 * 8;
        let last = last.min(nbits.saturating_sub(1));
        let mut bit = first;
        while bit <= last && bit < nbits {
            let word = bit / 64;
            let hi = last.min(word * 64 + 63);
            let width = hi - bit + 1;
            let mask = if width == 64 {
                u64::MAX
            } else {
                ((1u64 << width) - 1) << (bit % 64)
            };
            // SAFETY: word < len / 8, inside the mapping; the bitmap is only accessed atomically.
            unsafe { (*self.words.as_ptr().add(word as usize)).fetch_or(mask, Ordering::Relaxed) };
            bit = hi + 1;
        }
    }
}
