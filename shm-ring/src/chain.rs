//! A descriptor chain the device side has walked and validated: its segments are already
//! translated to host memory, readable ones first, then writable ones.

use crate::{memory::GuestMemory, RingError};
use std::ptr::NonNull;
use std::sync::Arc;

/// How many leading readable bytes [`Chain::prefetch_readable`] asks the cache for.
pub const PREFETCH_READ: usize = 256;

#[derive(Clone, Copy)]
struct Seg {
    ptr: NonNull<u8>,
    len: u32,
}

/// A validated chain, reused from pop to pop to avoid allocation.
///
/// The chain keeps the memory it points into alive, so its segments stay valid however
/// long it is held.
#[derive(Default)]
pub struct Chain {
    mem: Option<Arc<GuestMemory>>,
    head: u16,
    segs: Vec<Seg>,
    readable: usize,
    readable_len: u32,
    writable_len: u32,
}

// SAFETY: the segments point into mappings owned by the Arc<GuestMemory> held in `mem`,
// which is Send + Sync; the chain itself is plain data.
unsafe impl Send for Chain {}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("head", &self.head)
            .field("segments", &self.segs.len())
            .field("readable_len", &self.readable_len)
            .field("writable_len", &self.writable_len)
            .finish()
    }
}

impl Chain {
    /// An empty chain buffer.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn reset(&mut self, mem: &Arc<GuestMemory>, head: u16) {
        if !self.mem.as_ref().is_some_and(|m| Arc::ptr_eq(m, mem)) {
            self.mem = Some(Arc::clone(mem));
        }
        self.head = head;
        self.segs.clear();
        self.readable = 0;
        self.readable_len = 0;
        self.writable_len = 0;
    }

    /// Sets the id the chain is returned under (a packed ring learns it from the chain's
    /// last descriptor, after walking it).
    pub(crate) fn set_head(&mut self, head: u16) {
        self.head = head;
    }

    /// Appends a segment that `mem` translated; readable segments must come first.
    pub(crate) fn push(
        &mut self,
        ptr: NonNull<u8>,
        len: u32,
        writable: bool,
    ) -> Result<(), RingError> {
        if writable {
            self.writable_len = self
                .writable_len
                .checked_add(len)
                .ok_or(RingError::ChainLength)?;
        } else {
            if self.readable != self.segs.len() {
                return Err(RingError::ReadableAfterWritable);
            }
            self.readable_len = self
                .readable_len
                .checked_add(len)
                .ok_or(RingError::ChainLength)?;
            self.readable += 1;
        }
        self.segs.push(Seg { ptr, len });
        Ok(())
    }

    /// Logs a device write into this chain's memory (when dirty logging is on).
    fn mark(&self, ptr: *const u8, len: usize) {
        if let Some(m) = &self.mem {
            m.mark_host(ptr, len);
        }
    }

    /// The head descriptor index (split ring) or the buffer id (packed ring): what goes
    /// into the used ring.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Total bytes the device may read.
    pub fn readable_len(&self) -> u32 {
        self.readable_len
    }

    /// Total bytes the device may write.
    pub fn writable_len(&self) -> u32 {
        self.writable_len
    }

    /// Number of descriptors (after resolving indirect tables).
    pub fn num_segments(&self) -> usize {
        self.segs.len()
    }

    /// Asks the cache for every line of the chain's first [`PREFETCH_READ`] readable bytes
    /// (the 12-byte virtio-net header and the start of the frame, in one buffer or two), so
    /// that a batch's misses overlap instead of stalling one copy after another.
    #[inline]
    pub fn prefetch_readable(&self) {
        let mut left = PREFETCH_READ;
        for s in &self.segs[..self.readable] {
            let n = (s.len as usize).min(left);
            crate::prefetch::lines(s.ptr.as_ptr(), n, false);
            left -= n;
            if left == 0 {
                break;
            }
        }
    }

    /// Asks the cache for the lines of the first writable buffer that a device is about to
    /// fill with `len` bytes, of which it first reads the leading `keep` (to store them
    /// only where they changed). A line holding only those is fetched for reading, so a
    /// line the driver also reads stays shared by both cores; the rest (up to 256 bytes)
    /// for writing.
    #[inline]
    pub fn prefetch_writable(&self, keep: u32, len: u32) {
        let Some(s) = self.segs.get(self.readable) else {
            return;
        };
        let p = s.ptr.as_ptr();
        let end = len.min(s.len).min(256) as usize;
        // A kept line that is also written is fetched for writing only: a read first would
        // take a second transaction to upgrade it.
        let line = |at: usize| (p as usize).wrapping_add(at) / 64;
        if keep > 0 && line(0) != line(keep as usize) {
            crate::prefetch::read(p);
        }
        let mut at = keep as usize;
        while at < end {
            crate::prefetch::write(p.wrapping_add(at));
            // On to the first byte of the next line.
            at += 64 - (p as usize).wrapping_add(at) % 64;
        }
    }

    /// Copies readable bytes starting at `offset` into `buf`; returns the count copied.
    pub fn read_at(&self, mut offset: usize, buf: &mut [u8]) -> usize {
        let mut done = 0;
        for s in &self.segs[..self.readable] {
            let len = s.len as usize;
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = (len - offset).min(buf.len() - done);
            // SAFETY: the segment was translated within a live mapping (kept alive by
            // `self.mem`) and `offset + n <= len`; `buf` is a distinct Rust buffer.
            unsafe { std::ptr::copy(s.ptr.as_ptr().add(offset), buf.as_mut_ptr().add(done), n) };
            done += n;
            offset = 0;
            if done == buf.len() {
                break;
            }
        }
        done
    }

    /// Copies `data` into the writable segments starting at `offset`; returns the count copied.
    pub fn write_at(&self, mut offset: usize, data: &[u8]) -> usize {
        let mut done = 0;
        for s in &self.segs[self.readable..] {
            let len = s.len as usize;
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = (len - offset).min(data.len() - done);
            // SAFETY: as in `read_at`, in the other direction.
            unsafe { std::ptr::copy(data.as_ptr().add(done), s.ptr.as_ptr().add(offset), n) };
            // SAFETY: pointer arithmetic inside the segment (no dereference).
            self.mark(unsafe { s.ptr.as_ptr().add(offset) }, n);
            done += n;
            offset = 0;
            if done == data.len() {
                break;
            }
        }
        done
    }

    /// As [`Chain::write_at`], but leaves the bytes alone when they already hold `data`
    /// (checked when `data`, at most 64 bytes, lies in one segment). A store moves the cache
    /// line to this core even when it changes nothing; a virtio-net header is the same
    /// frame after frame, and the driver reads it from its own cache when nobody wrote it.
    pub fn write_at_if_changed(&self, offset: usize, data: &[u8]) -> usize {
        let mut off = offset;
        for s in &self.segs[self.readable..] {
            let len = s.len as usize;
            if off >= len {
                off -= len;
                continue;
            }
            if data.len() <= 64 && data.len() <= len - off {
                let mut old = [0u8; 64];
                // SAFETY: `off + data.len() <= len` inside a segment translated within a
                // live mapping (kept alive by `self.mem`), copied out as bytes.
                unsafe { std::ptr::copy(s.ptr.as_ptr().add(off), old.as_mut_ptr(), data.len()) };
                if old[..data.len()] == *data {
                    return data.len();
                }
            }
            break;
        }
        self.write_at(offset, data)
    }

    /// Copies all readable bytes of `self` into the writable segments of `dst`, segment to
    /// segment with no bounce buffer. Returns the bytes copied, or `None` (copying nothing)
    /// when they do not fit.
    pub fn copy_to(&self, dst: &Chain) -> Option<u32> {
        if self.readable_len > dst.writable_len {
            return None;
        }
        Some(self.copy_part_to(0, dst))
    }

    /// Copies readable bytes of `self` from `offset` on into the writable segments of
    /// `dst`, as many as fit; returns the count (for frames spread over several buffers).
    pub fn copy_part_to(&self, offset: u32, dst: &Chain) -> u32 {
        self.copy_part_to_at(offset, dst, 0)
    }

    /// As [`Chain::copy_part_to`], into the writable part of `dst` from byte `dst_offset`
    /// on.
    pub fn copy_part_to_at(&self, offset: u32, dst: &Chain, dst_offset: u32) -> u32 {
        let mut skip = offset as usize;
        let mut dsegs = dst.segs[dst.readable..].iter();
        let mut d = dsegs.next().copied();
        let mut d_off = dst_offset as usize;
        let mut done = 0usize;
        for s in &self.segs[..self.readable] {
            let s_len = s.len as usize;
            if skip >= s_len {
                skip -= s_len;
                continue;
            }
            let mut s_off = skip;
            skip = 0;
            while s_off < s_len {
                let Some(cur) = d else {
                    return done as u32;
                };
                if d_off >= cur.len as usize {
                    d_off -= cur.len as usize;
                    d = dsegs.next().copied();
                    continue;
                }
                let room = cur.len as usize - d_off;
                let n = room.min(s_len - s_off);
                // SAFETY: both ranges were translated within live mappings kept alive by
                // the chains' `mem`, and `s_off + n <= s.len`, `d_off + n <= cur.len`;
                // `ptr::copy` tolerates overlap a hostile driver may arrange between a TX
                // buffer and an RX buffer.
                unsafe {
                    std::ptr::copy(s.ptr.as_ptr().add(s_off), cur.ptr.as_ptr().add(d_off), n)
                };
                // SAFETY: pointer arithmetic inside the segment (no dereference).
                dst.mark(unsafe { cur.ptr.as_ptr().add(d_off) }, n);
                s_off += n;
                d_off += n;
                done += n;
            }
        }
        done as u32
    }
}
