//! Cache prefetch hints: a datapath that learns a batch's addresses first and touches them
//! after overlaps the cross-core cache misses instead of taking them one by one.

/// Hints that the line holding `p` will be read soon. Never faults, whatever `p` is.
#[inline(always)]
pub fn read(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it does not fault or change memory for any address,
    // and SSE is part of the x86_64 baseline.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Hints that the line holding `p` will be written soon (fetched for ownership, so the
/// write does not need a second cross-core transaction to upgrade a shared line). Never
/// faults, whatever `p` is.
///
/// Emitted as `PREFETCHW` by hand: `_mm_prefetch::<_MM_HINT_ET0>` compiles to a plain
/// `PREFETCHT0` unless the crate is built with the `prfchw` target feature, which release
/// builds for generic x86_64 are not.
#[inline(always)]
pub fn write(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHW (0F 0D /1) is a hint: it does not fault or change memory for any
    // address, and CPUs without it execute it as a NOP (the 0F 0D opcode is reserved as a
    // NOP hint).
    unsafe {
        std::arch::asm!("prefetchw [{0}]", in(reg) p, options(nostack, preserves_flags, readonly));
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The most bytes one [`lines`] call covers: a hint for a buffer's first lines, not a copy.
pub const MAX_LINES_BYTES: usize = 4096;

/// Hints every line of `[p, p + len)` (at most [`MAX_LINES_BYTES`]) for reading (`write`
/// false) or for writing: a start that is not line-aligned spans one line more than
/// `len / 64`, and all of them are asked for. Never faults, whatever the range.
#[inline]
pub fn lines(p: *const u8, len: usize, write: bool) {
    let len = len.min(MAX_LINES_BYTES);
    if len == 0 {
        return;
    }
    // From the start of p's line, as many lines as the range touches.
    let first = p.wrapping_sub(p as usize % 64);
    let count = (p as usize % 64 + len).div_ceil(64);
    for i in 0..count {
        let q = first.wrapping_add(64 * i);
        if write {
            self::write(q);
        } else {
            read(q);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_returns_for_any_range() {
        let buf = [0u8; 300];
        for off in [0, 1, 52, 63, 64] {
            lines(buf.as_ptr().wrapping_add(off), 200, false);
            lines(buf.as_ptr().wrapping_add(off), 200, true);
        }
        lines(std::ptr::null(), usize::MAX, false);
        lines(usize::MAX as *const u8, usize::MAX, true);
        lines(buf.as_ptr(), 0, false);
    }
}
