//! Guest addresses as a newtype, so they never mix with host pointers or lengths.

use std::fmt;

/// An address in the driver's (guest's) address space, as written in rings and descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestAddr(pub u64);

impl GuestAddr {
    /// The raw value.
    pub fn raw(self) -> u64 {
        self.0
    }

    /// `self + n`, or `None` on overflow past 2^64.
    pub fn checked_add(self, n: u64) -> Option<GuestAddr> {
        self.0.checked_add(n).map(GuestAddr)
    }

    /// Whether the address is a multiple of `align` (a power of two).
    pub fn is_aligned(self, align: u64) -> bool {
        self.0 & (align - 1) == 0
    }
}

impl fmt::Display for GuestAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}
