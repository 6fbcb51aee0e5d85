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

/// Hints every line of `[p, p + len)` for reading (`write` false) or for writing: a start
/// that is not line-aligned spans one line more than `len / 64`, and all of them are asked
/// for. Never faults, whatever the range.
#[inline]
pub fn lines(p: *const u8, len: usize, write: bool) {
    let start = p as usize;
    let end = start.saturating_add(len);
    let mut line = start & !63;
    while line < end {
        let q = p.wrapping_add(line.wrapping_sub(start));
        if write {
            self::write(q);
        } else {
            read(q);
        }
        line += 64;
    }
}
