//! Volatile loads and stores of the little-endian words the rings are made of, one
//! instruction per word.
//!
//! Guest memory is shared with a peer that may change it at any time, so each field is read
//! once with a volatile access and never re-read. A volatile read of a byte array compiles
//! to one load per byte (a 16-byte descriptor was 16 `movzbl` and the shifts to join them);
//! a volatile read of an aligned `u64` is one `mov`. Every accessor here takes the word
//! path when the address is aligned, which ring fields always are (the layouts are checked
//! at setup), and falls back to bytes otherwise (an indirect table may sit anywhere).
//! The host is little-endian (see the crate root), so a word read is the ring's value.

/// Defines `load_*` and `store_*` for one word type.
macro_rules! word {
    ($t:ty, $load:ident, $store:ident) => {
        #[doc = concat!("Reads the `", stringify!($t), "` at `p` once.")]
        ///
        /// # Safety
        /// `p` must be valid for reads of the word's size (no alignment needed).
        #[inline(always)]
        pub(crate) unsafe fn $load(p: *const u8) -> $t {
            let w = p.cast::<$t>();
            if w.is_aligned() {
                // SAFETY: valid per the caller's contract and aligned as just checked.
                unsafe { std::ptr::read_volatile(w) }
            } else {
                // SAFETY: valid per the caller's contract; a byte array needs no alignment.
                let b = unsafe { std::ptr::read_volatile(p.cast::<[u8; size_of::<$t>()]>()) };
                <$t>::from_le_bytes(b)
            }
        }

        #[doc = concat!("Writes the `", stringify!($t), "` `v` at `p`.")]
        ///
        /// # Safety
        /// `p` must be valid for writes of the word's size (no alignment needed).
        #[inline(always)]
        pub(crate) unsafe fn $store(p: *mut u8, v: $t) {
            let w = p.cast::<$t>();
            if w.is_aligned() {
                // SAFETY: valid per the caller's contract and aligned as just checked.
                unsafe { std::ptr::write_volatile(w, v) }
            } else {
                // SAFETY: valid per the caller's contract; a byte array needs no alignment.
                unsafe { std::ptr::write_volatile(p.cast(), v.to_le_bytes()) }
            }
        }
    };
}

/// Defines `store_*_if_changed` for a word type that `word!` covers.
macro_rules! word_if_changed {
    ($t:ty, $load:ident, $store:ident, $store_if_changed:ident) => {
        #[doc = concat!("Writes the `", stringify!($t), "` `v` at `p` unless it is there already.")]
        /// A store moves the line to the writer's core even when it changes nothing;
        /// skipping it leaves a line both sides read shared in both caches.
        ///
        /// # Safety
        /// `p` must be valid for reads and writes of the word's size (no alignment needed).
        #[inline(always)]
        pub(crate) unsafe fn $store_if_changed(p: *mut u8, v: $t) {
            // SAFETY: the caller's contract, passed on.
            unsafe {
                if $load(p) != v {
                    $store(p, v)
                }
            }
        }
    };
}

word!(u16, load_u16, store_u16);
word!(u32, load_u32, store_u32);
word!(u64, load_u64, store_u64);
word_if_changed!(u32, load_u32, store_u32, store_u32_if_changed);
word_if_changed!(u64, load_u64, store_u64, store_u64_if_changed);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every offset of a buffer, so that both the word path and the byte path run.
    #[test]
    fn words_round_trip_at_every_alignment() {
        let mut buf = [0u64; 4];
        let base = buf.as_mut_ptr().cast::<u8>();
        for off in 0..8 {
            // SAFETY: off + 16 <= 32 bytes of `buf`.
            unsafe {
                let p = base.add(off);
                store_u64(p, 0x0807_0605_0403_0201);
                store_u32(p.add(8), 0x0c0b_0a09);
                store_u16(p.add(12), 0x0e0d);
                assert_eq!(load_u64(p), 0x0807_0605_0403_0201, "offset {off}");
                assert_eq!(load_u32(p.add(8)), 0x0c0b_0a09, "offset {off}");
                assert_eq!(load_u16(p.add(12)), 0x0e0d, "offset {off}");
                // Little-endian in memory, whichever path wrote it.
                let bytes = std::slice::from_raw_parts(p, 14);
                assert_eq!(
                    bytes,
                    (1..=14).collect::<Vec<u8>>().as_slice(),
                    "offset {off}"
                );
            }
        }
    }

    #[test]
    fn store_if_changed_stores_only_a_new_value() {
        let mut w = 5u32;
        let p = (&raw mut w).cast::<u8>();
        // SAFETY: `p` points at a live u32.
        unsafe {
            store_u32_if_changed(p, 5);
            assert_eq!(load_u32(p), 5);
            store_u32_if_changed(p, 7);
            assert_eq!(load_u32(p), 7);
        }
    }
}
