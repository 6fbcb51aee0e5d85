//! GuestMemory, sealed memfds, GuestAddr, SplitLayout and RingFeatures.

mod common;

use proptest::collection::vec;
use proptest::prelude::*;
use std::fs::File;
use std::os::fd::AsFd;
use vmdev_shm_ring::memory::{
    check_memfd, check_region_shape, SealPolicy, MAX_REGIONS, REGION_ALIGN,
};
use vmdev_shm_ring::split::{RingFeatures, SplitLayout};
use vmdev_shm_ring::{create_sealed_memfd, GuestAddr, GuestMemory, MemError};

#[test]
fn sealed_memfd_cannot_change_size() {
    let fd = create_sealed_memfd("seal", 8192).unwrap();
    check_memfd(fd.as_fd(), 0, 8192, SealPolicy::Required).unwrap();
    check_memfd(fd.as_fd(), 4096, 4096, SealPolicy::Required).unwrap();
    assert_eq!(
        check_memfd(fd.as_fd(), 4096, 8192, SealPolicy::Required),
        Err(MemError::TooSmall {
            file_len: 8192,
            needed: 12288
        })
    );
    assert!(matches!(
        check_memfd(fd.as_fd(), u64::MAX, 2, SealPolicy::Required),
        Err(MemError::BadRegion(_))
    ));
    let f = File::from(fd);
    assert!(f.set_len(4096).is_err(), "sealed against shrinking");
    assert!(f.set_len(16384).is_err(), "sealed against growing");
    assert_eq!(f.metadata().unwrap().len(), 8192);
}

#[test]
fn region_shapes() {
    assert!(check_region_shape(0, 4096, 0).is_ok());
    assert!(
        check_region_shape(0x10000, 1, 4096).is_ok(),
        "size need not be aligned"
    );
    for (g, s, o) in [
        (0u64, 0u64, 0u64),
        (1, 4096, 0),
        (0, 4096, 1),
        (REGION_ALIGN / 2, 4096, 0),
        (!4095, 4096, 0),
    ] {
        assert!(
            matches!(check_region_shape(g, s, o), Err(MemError::BadRegion(_))),
            "{g:#x} {s} {o}"
        );
    }
}

/// A region mapped at an offset into the memfd sees the same bytes as a mapping of the
/// whole file, shifted by that offset.
#[test]
fn regions_at_offsets() {
    let fd = create_sealed_memfd("off", 3 * 4096).unwrap();
    let mut whole = GuestMemory::new();
    whole
        .add_region(fd.try_clone().unwrap(), GuestAddr(0x100000), 3 * 4096, 0)
        .unwrap();
    let mut part = GuestMemory::new();
    part.add_region(fd.try_clone().unwrap(), GuestAddr(0), 4096, 4096)
        .unwrap();
    part.add_region(fd, GuestAddr(0x8000), 4096, 2 * 4096)
        .unwrap();
    part.write(GuestAddr(0x10), b"second page").unwrap();
    part.write(GuestAddr(0x8ff0), b"third page end!!").unwrap();
    let mut b = [0u8; 11];
    whole.read(GuestAddr(0x101010), &mut b).unwrap();
    assert_eq!(&b, b"second page");
    let mut b = [0u8; 16];
    whole.read(GuestAddr(0x102ff0), &mut b).unwrap();
    assert_eq!(&b, b"third page end!!");
    whole.zero(GuestAddr(0x101010), 6).unwrap();
    let mut b = [0xffu8; 11];
    part.read(GuestAddr(0x10), &mut b).unwrap();
    assert_eq!(&b, b"\0\0\0\0\0\0 page");
    // Regions are kept sorted and printed by guest address.
    assert_eq!(format!("{part:?}"), "[0x0+0x1000, 0x8000+0x1000]");
    // Mapping past the end of the file is refused.
    let fd = create_sealed_memfd("short", 8192).unwrap();
    assert!(matches!(
        part.add_region(fd, GuestAddr(0x20000), 8192, 4096),
        Err(MemError::TooSmall { .. })
    ));
    assert_eq!(part.num_regions(), 2);
}

#[test]
fn at_most_max_regions() {
    let mut mem = GuestMemory::new();
    for i in 0..MAX_REGIONS as u64 {
        mem.add_region(
            create_sealed_memfd("r", 4096).unwrap(),
            GuestAddr(i * 8192),
            4096,
            0,
        )
        .unwrap();
    }
    assert!(matches!(
        mem.add_region(
            create_sealed_memfd("r", 4096).unwrap(),
            GuestAddr(1 << 30),
            4096,
            0
        ),
        Err(MemError::BadRegion(_))
    ));
    assert_eq!(mem.num_regions(), MAX_REGIONS);
    assert!(mem.contains(GuestAddr(63 * 8192 + 4095), 1));
    assert!(!mem.contains(GuestAddr(63 * 8192 + 4096), 1));
}

#[test]
fn overlaps_in_every_arrangement() {
    let mut mem = GuestMemory::new();
    mem.add_region(
        create_sealed_memfd("a", 0x4000).unwrap(),
        GuestAddr(0x10000),
        0x4000,
        0,
    )
    .unwrap();
    for (g, s) in [
        (0xf000u64, 0x2000u64),
        (0x13000, 0x2000),
        (0x11000, 0x1000),
        (0xf000, 0x8000),
        (0x10000, 0x4000),
    ] {
        assert_eq!(
            mem.add_region(create_sealed_memfd("b", s).unwrap(), GuestAddr(g), s, 0),
            Err(MemError::Overlap(GuestAddr(g))),
            "{g:#x}+{s:#x}"
        );
    }
    // Touching is not overlapping.
    mem.add_region(
        create_sealed_memfd("c", 0x1000).unwrap(),
        GuestAddr(0xf000),
        0x1000,
        0,
    )
    .unwrap();
    mem.add_region(
        create_sealed_memfd("d", 0x1000).unwrap(),
        GuestAddr(0x14000),
        0x1000,
        0,
    )
    .unwrap();
    assert_eq!(mem.num_regions(), 3);
}

#[test]
fn aligned_translation_and_addr_helpers() {
    let mut mem = GuestMemory::new();
    mem.add_region(
        create_sealed_memfd("a", 8192).unwrap(),
        GuestAddr(0x10000),
        8192,
        0,
    )
    .unwrap();
    let p = mem.translate_aligned(GuestAddr(0x10010), 16, 16).unwrap();
    assert_eq!(
        p.as_ptr() as usize % 16,
        0,
        "host alignment follows guest alignment"
    );
    assert_eq!(
        mem.translate_aligned(GuestAddr(0x10008), 16, 16),
        Err(MemError::Misaligned {
            addr: GuestAddr(0x10008),
            align: 16
        })
    );
    assert!(matches!(
        mem.translate_aligned(GuestAddr(0x20000), 16, 16),
        Err(MemError::OutOfRange { .. })
    ));
    let a = GuestAddr(0x1000);
    assert_eq!(a.raw(), 0x1000);
    assert_eq!(a.checked_add(0x10), Some(GuestAddr(0x1010)));
    assert_eq!(GuestAddr(u64::MAX).checked_add(1), None);
    assert!(
        a.is_aligned(4096) && !GuestAddr(0x1008).is_aligned(16) && GuestAddr(0x1008).is_aligned(8)
    );
    assert_eq!(a.to_string(), "0x1000");
    assert_eq!(
        MemError::OutOfRange { addr: a, len: 4 }.to_string(),
        "guest range 0x1000+4 is outside the driver's memory"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Translation agrees with a model of the region table: a range is accepted exactly
    /// when it lies in one region (zero-length ranges must start inside one), and the host
    /// pointer is the region's base plus the offset.
    #[test]
    fn translate_matches_model(
        layout in vec((0u64..4, 1u64..4), 1..5),
        queries in vec((0u64..0x40000, prop_oneof![0u64..0x5000, Just(0u64), any::<u64>()]), 1..64),
        wild in vec((any::<u64>(), any::<u64>()), 0..16),
    ) {
        // Regions: gap pages, then size pages, one after the other (some adjacent).
        let mut regions = Vec::new();
        let mut at = 0x1000u64;
        for &(gap, pages) in &layout {
            at += gap * 4096;
            regions.push((at, pages * 4096));
            at += pages * 4096;
        }
        let mut mem = GuestMemory::new();
        for &(g, s) in regions.iter().rev() {
            mem.add_region(create_sealed_memfd("p", s).unwrap(), GuestAddr(g), s, 0).unwrap();
        }
        let base = |g: u64| mem.translate(GuestAddr(g), 0).unwrap().as_ptr() as usize;
        for (addr, len) in queries.into_iter().chain(wild) {
            let hit = regions.iter().find(|&&(g, s)| {
                let (a, l, g, s) = (addr as u128, len as u128, g as u128, s as u128);
                a >= g && a < g + s && a + l <= g + s
            });
            let got = mem.translate(GuestAddr(addr), len);
            match hit {
                Some(&(g, _)) => {
                    let p = got.unwrap().as_ptr() as usize;
                    prop_assert_eq!(p, base(g) + (addr - g) as usize);
                }
                None => prop_assert_eq!(got, Err(MemError::OutOfRange { addr: GuestAddr(addr), len })),
            }
            prop_assert_eq!(mem.contains(GuestAddr(addr), len), hit.is_some());
        }
        // Bytes written in one region never show up in another.
        for (i, &(g, s)) in regions.iter().enumerate() {
            mem.write(GuestAddr(g), &[i as u8 + 1; 8]).unwrap();
            mem.write(GuestAddr(g + s - 8), &[i as u8 + 1; 8]).unwrap();
        }
        for (i, &(g, s)) in regions.iter().enumerate() {
            let mut b = [0u8; 8];
            mem.read(GuestAddr(g), &mut b).unwrap();
            prop_assert_eq!(b, [i as u8 + 1; 8]);
            mem.read(GuestAddr(g + s - 8), &mut b).unwrap();
            prop_assert_eq!(b, [i as u8 + 1; 8]);
        }
    }

    /// The packed layout keeps every ring on its own 64-byte lines, in order, with the
    /// sizes virtio 1.x gives them.
    #[test]
    fn packed_layout(size_log in 0u32..=15) {
        let size = 1u16 << size_log;
        let l = SplitLayout::new(size);
        let n = size as u64;
        prop_assert_eq!((l.size, l.desc_len, l.avail_len, l.used_len), (size, 16 * n, 6 + 2 * n, 6 + 8 * n));
        let (d, a, u, total) = l.packed_offsets();
        prop_assert_eq!(d, 0);
        for x in [a, u, total] {
            prop_assert_eq!(x % 64, 0);
        }
        prop_assert!(a >= d + l.desc_len && a < d + l.desc_len + 64);
        prop_assert!(u >= a + l.avail_len && u < a + l.avail_len + 64);
        prop_assert!(total >= u + l.used_len && total < u + l.used_len + 64);
    }
}

#[test]
fn ring_features_from_bits() {
    assert_eq!(
        RingFeatures::from_bits(0),
        RingFeatures {
            event_idx: false,
            indirect: false,
            in_order: false
        }
    );
    assert_eq!(
        RingFeatures::from_bits(1 << 28),
        RingFeatures {
            event_idx: false,
            indirect: true,
            in_order: false
        }
    );
    assert_eq!(
        RingFeatures::from_bits(1 << 29),
        RingFeatures {
            event_idx: true,
            indirect: false,
            in_order: false
        }
    );
    assert_eq!(
        RingFeatures::from_bits(u64::MAX),
        RingFeatures {
            event_idx: true,
            indirect: true,
            in_order: true
        }
    );
    assert_eq!(
        RingFeatures::from_bits(1 << 35),
        RingFeatures {
            in_order: true,
            ..RingFeatures::default()
        }
    );
    assert_eq!(
        RingFeatures::from_bits(!((1 << 28) | (1 << 29) | (1 << 35))),
        RingFeatures::default(),
        "other bits do not matter"
    );
}
