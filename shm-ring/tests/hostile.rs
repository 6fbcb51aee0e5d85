//! Hostile rings: whatever a driver writes, the device side returns an error (never
//! panics, never touches memory outside the regions), and the same for a hostile device
//! seen from the driver side.

mod common;

use common::*;
use vmdev_shm_ring::split::{
    RingFeatures, Segment, SplitLayout, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, MAX_INDIRECT,
};
use vmdev_shm_ring::{Chain, DeviceQueue, DriverQueue, GuestAddr, MemError, RingError};

const N: u16 = DESC_F_NEXT;
const W: u16 = DESC_F_WRITE;
const I: u16 = DESC_F_INDIRECT;

/// Publishes `head` as the only avail entry and pops it with a fresh device queue.
fn pop_head(rig: &Rig, f: RingFeatures, head: u16) -> Result<Chain, RingError> {
    rig.set_avail_entry(0, head);
    rig.set_avail_idx(1);
    let mut dev = rig.device(f);
    let mut c = Chain::new();
    let got = dev.pop(&mut c)?;
    assert!(got);
    Ok(c)
}

fn pop0(rig: &Rig, f: RingFeatures) -> Result<Chain, RingError> {
    pop_head(rig, f, 0)
}

fn is_oor(e: &RingError) -> bool {
    matches!(e, RingError::Memory(MemError::OutOfRange { .. }))
}

#[test]
fn direct_descriptor_loops() {
    let rig = Rig::new(8);
    let d = rig.data;
    // 0 -> 1 -> 0
    rig.write_desc(0, d, 8, N, 1);
    rig.write_desc(1, d, 8, N, 0);
    assert_eq!(
        pop0(&rig, NO_FEATURES).unwrap_err(),
        RingError::ChainTooLong(8)
    );
    // A loop through every descriptor: 0 -> 1 -> ... -> 7 -> 0.
    for i in 0..8 {
        rig.write_desc(i, d, 8, N, (i + 1) % 8);
    }
    assert_eq!(
        pop0(&rig, NO_FEATURES).unwrap_err(),
        RingError::ChainTooLong(8)
    );
    // A loop that starts further down the chain: 0 -> 5 -> 6 -> 5.
    rig.write_desc(0, d, 8, N, 5);
    rig.write_desc(5, d, 8, N, 6);
    rig.write_desc(6, d, 8, N, 5);
    assert_eq!(
        pop0(&rig, NO_FEATURES).unwrap_err(),
        RingError::ChainTooLong(8)
    );

    // Size 1: a descriptor pointing at itself.
    let rig = Rig::new(1);
    rig.write_desc(0, rig.data, 8, N, 0);
    assert_eq!(
        pop0(&rig, NO_FEATURES).unwrap_err(),
        RingError::ChainTooLong(1)
    );
}

#[test]
fn chain_as_long_as_the_queue_is_fine() {
    let rig = Rig::new(16);
    // 3 -> 4 -> ... -> 15 -> 0 -> 1 -> 2: all 16 descriptors, each 1 byte.
    for k in 0..16u16 {
        let i = (k + 3) % 16;
        let last = k == 15;
        let flags = if last { 0 } else { N };
        rig.write_desc(i, rig.data + k as u64, 1, flags, (i + 1) % 16);
    }
    let c = pop_head(&rig, NO_FEATURES, 3).unwrap();
    assert_eq!(c.num_segments(), 16);
    assert_eq!(c.readable_len(), 16);
    assert_eq!(c.head(), 3);
}

#[test]
fn indirect_loops_and_bad_indices() {
    let rig = Rig::new(8);
    let d = rig.data;
    let t = d + 0x1000;
    rig.write_desc(0, t, 4 * 16, I, 0);
    // Table: 0 -> 1 -> 2 -> 1.
    rig.write_desc_at(t, 0, d, 8, N, 1);
    rig.write_desc_at(t, 1, d, 8, N, 2);
    rig.write_desc_at(t, 2, d, 8, N, 1);
    assert_eq!(
        pop0(&rig, ALL_FEATURES).unwrap_err(),
        RingError::ChainTooLong(4)
    );
    // Self-loop inside a one-entry table.
    rig.write_desc(0, t, 16, I, 0);
    rig.write_desc_at(t, 0, d, 8, N, 0);
    assert_eq!(
        pop0(&rig, ALL_FEATURES).unwrap_err(),
        RingError::ChainTooLong(1)
    );
    // next beyond the table (but well inside the queue size).
    rig.write_desc(0, t, 4 * 16, I, 0);
    rig.write_desc_at(t, 0, d, 8, N, 4);
    assert_eq!(
        pop0(&rig, ALL_FEATURES).unwrap_err(),
        RingError::BadIndex { index: 4, size: 4 }
    );
    rig.write_desc_at(t, 0, d, 8, N, 0xffff);
    assert!(matches!(
        pop0(&rig, ALL_FEATURES),
        Err(RingError::BadIndex { .. })
    ));
    // The last entry of the table claims a next: the chain runs off the table.
    rig.write_desc_at(t, 0, d, 8, N, 1);
    rig.write_desc_at(t, 1, d, 8, N, 2);
    rig.write_desc_at(t, 2, d, 8, N, 3);
    rig.write_desc_at(t, 3, d, 8, N, 4);
    assert_eq!(
        pop0(&rig, ALL_FEATURES).unwrap_err(),
        RingError::BadIndex { index: 4, size: 4 }
    );
    // The same table, properly terminated, is fine.
    rig.write_desc_at(t, 3, d, 8, W, 0);
    let c = pop0(&rig, ALL_FEATURES).unwrap();
    assert_eq!(
        (c.num_segments(), c.readable_len(), c.writable_len()),
        (4, 24, 8)
    );
}

#[test]
fn head_and_next_out_of_range() {
    let rig = Rig::new(8);
    rig.write_desc(0, rig.data, 8, N, 8);
    assert_eq!(
        pop0(&rig, NO_FEATURES).unwrap_err(),
        RingError::BadIndex { index: 8, size: 8 }
    );
    rig.write_desc(0, rig.data, 8, N, 0xffff);
    assert!(matches!(
        pop0(&rig, NO_FEATURES),
        Err(RingError::BadIndex { index: 0xffff, .. })
    ));
    for head in [8u16, 9, 0x100, 0x8000, 0xffff] {
        assert_eq!(
            pop_head(&rig, NO_FEATURES, head).unwrap_err(),
            RingError::BadIndex {
                index: head,
                size: 8
            }
        );
    }
}

#[test]
fn indirect_misuse() {
    let rig = Rig::new(8);
    let d = rig.data;
    let t = d + 0x1000;
    rig.write_desc_at(t, 0, d, 8, 0, 0);
    rig.write_desc_at(t, 1, d, 8, 0, 0);

    // Without the feature.
    rig.write_desc(0, t, 32, I, 0);
    assert!(matches!(
        pop0(&rig, NO_FEATURES),
        Err(RingError::BadIndirect(_))
    ));
    assert!(pop0(&rig, features(false, true)).is_ok());

    // INDIRECT together with NEXT.
    rig.write_desc(0, t, 32, I | N, 1);
    rig.write_desc(1, d, 8, 0, 0);
    assert!(matches!(
        pop0(&rig, ALL_FEATURES),
        Err(RingError::BadIndirect(_))
    ));

    // Table lengths: zero, not a multiple of 16, larger than MAX_INDIRECT entries.
    for len in [
        0u32,
        1,
        8,
        15,
        17,
        24,
        40,
        (MAX_INDIRECT + 1) * 16,
        0xffff_fff0,
        u32::MAX,
    ] {
        rig.write_desc(0, t, len, I, 0);
        assert!(
            matches!(pop0(&rig, ALL_FEATURES), Err(RingError::BadIndirect(_))),
            "table length {len}"
        );
    }

    // Nested indirect.
    rig.write_desc(0, t, 32, I, 0);
    rig.write_desc_at(t, 0, d, 8, N, 1);
    rig.write_desc_at(t, 1, t, 32, I, 0);
    assert_eq!(
        pop0(&rig, ALL_FEATURES).unwrap_err(),
        RingError::NestedIndirect
    );
    // An indirect entry pointing at its own table.
    rig.write_desc_at(t, 0, t, 32, I, 0);
    assert_eq!(
        pop0(&rig, ALL_FEATURES).unwrap_err(),
        RingError::NestedIndirect
    );

    // Table outside memory, or running past its end.
    rig.write_desc(0, 0x1000, 32, I, 0);
    assert!(is_oor(&pop0(&rig, ALL_FEATURES).unwrap_err()));
    rig.write_desc(0, rig.end - 16, 32, I, 0);
    assert!(is_oor(&pop0(&rig, ALL_FEATURES).unwrap_err()));
    rig.write_desc(0, u64::MAX - 15, 32, I, 0);
    assert!(is_oor(&pop0(&rig, ALL_FEATURES).unwrap_err()));

    // The WRITE flag on the indirect descriptor itself is ignored (spec 2.7.5.3.2), and
    // the table need not be 16-aligned.
    let t2 = t + 0x203;
    rig.write_desc_at(t2, 0, d, 8, 0, 0);
    rig.write_desc(0, t2, 16, I | W, 0);
    let c = pop0(&rig, ALL_FEATURES).unwrap();
    assert_eq!((c.readable_len(), c.writable_len()), (8, 0));
}

#[test]
fn buffers_outside_memory() {
    let rig = Rig::new(8);
    let cases: &[(u64, u32)] = &[
        (0, 1),               // below every region
        (0x1000, 0),          // zero length, still outside
        (BASE - 1, 2),        // starts just before the region
        (rig.end, 0),         // zero length right at the end
        (rig.end, 1),         // just past the end
        (rig.end - 1, 2),     // runs one byte past the end
        (rig.data, u32::MAX), // 4 GiB
        (rig.data, 0xffff_fff0),
        (u64::MAX, 1), // address + length wraps past 2^64
        (u64::MAX - 3, 16),
        (u64::MAX, 0),
        (1 << 63, 4096),
    ];
    for &(addr, len) in cases {
        for flags in [0, W] {
            rig.write_desc(0, addr, len, flags, 0);
            let e = pop0(&rig, NO_FEATURES).unwrap_err();
            assert!(is_oor(&e), "{addr:#x}+{len:#x}: {e:?}");
        }
    }
    // The edges themselves are fine.
    for &(addr, len) in &[
        (BASE, 1u32),
        (rig.end - 1, 1),
        (rig.end - 8, 8),
        (BASE, 0),
        (rig.end - 1, 0),
    ] {
        rig.write_desc(0, addr, len, 0, 0);
        assert_eq!(pop0(&rig, NO_FEATURES).unwrap().readable_len(), len);
    }
    // The bad descriptor deep in a chain, and inside an indirect table.
    rig.write_desc(0, rig.data, 8, N, 3);
    rig.write_desc(3, rig.data, 8, N | W, 5);
    rig.write_desc(5, rig.end - 4, 8, W, 0);
    assert!(is_oor(&pop0(&rig, NO_FEATURES).unwrap_err()));
    let t = rig.data + 0x1000;
    rig.write_desc(0, t, 32, I, 0);
    rig.write_desc_at(t, 0, rig.data, 8, N, 1);
    rig.write_desc_at(t, 1, u64::MAX - 7, 16, 0, 0);
    assert!(is_oor(&pop0(&rig, ALL_FEATURES).unwrap_err()));
}

#[test]
fn buffer_straddling_two_regions() {
    let second = BASE + MEM_SIZE;
    let rig = Rig::with_regions(8, &[(BASE, MEM_SIZE), (second, 0x10000)]);
    assert_eq!(rig.dev_mem.num_regions(), 2);
    // Wholly in either region: fine.
    for (addr, len) in [
        (second - 16, 16u32),
        (second, 16),
        (second + 0x10000 - 16, 16),
    ] {
        rig.write_desc(0, addr, len, W, 0);
        assert_eq!(pop0(&rig, NO_FEATURES).unwrap().writable_len(), len);
    }
    // Across the boundary: refused, although every byte is mapped.
    for (addr, len) in [
        (second - 8, 16u32),
        (second - 1, 2),
        (BASE, MEM_SIZE as u32 + 1),
    ] {
        rig.write_desc(0, addr, len, W, 0);
        assert!(
            is_oor(&pop0(&rig, NO_FEATURES).unwrap_err()),
            "{addr:#x}+{len}"
        );
    }
    // An indirect table straddling the boundary.
    rig.write_desc(0, second - 16, 32, I, 0);
    assert!(is_oor(&pop0(&rig, ALL_FEATURES).unwrap_err()));
    // Segments in different regions in one chain are fine.
    rig.write_desc(0, second - 16, 16, N, 1);
    rig.write_desc(1, second, 16, W, 0);
    let c = pop0(&rig, NO_FEATURES).unwrap();
    assert_eq!((c.readable_len(), c.writable_len()), (16, 16));
}

#[test]
fn readable_after_writable() {
    let rig = Rig::new(8);
    let d = rig.data;
    rig.write_desc(0, d, 8, N, 1);
    rig.write_desc(1, d, 8, W | N, 2);
    rig.write_desc(2, d, 8, N, 3);
    rig.write_desc(3, d, 8, W, 0);
    assert_eq!(
        pop0(&rig, NO_FEATURES).unwrap_err(),
        RingError::ReadableAfterWritable
    );
    // Inside an indirect table.
    let t = d + 0x1000;
    rig.write_desc(0, t, 32, I, 0);
    rig.write_desc_at(t, 0, d, 8, W | N, 1);
    rig.write_desc_at(t, 1, d, 8, 0, 0);
    assert_eq!(
        pop0(&rig, ALL_FEATURES).unwrap_err(),
        RingError::ReadableAfterWritable
    );
    // A writable direct descriptor followed by an indirect table with a readable entry.
    rig.write_desc(0, d, 8, W | N, 1);
    rig.write_desc(1, t, 16, I, 0);
    rig.write_desc_at(t, 0, d, 8, 0, 0);
    assert_eq!(
        pop0(&rig, ALL_FEATURES).unwrap_err(),
        RingError::ReadableAfterWritable
    );
    // A zero-length readable after a writable is still out of order.
    rig.write_desc(0, d, 8, W | N, 1);
    rig.write_desc(1, d, 0, 0, 0);
    assert_eq!(
        pop0(&rig, NO_FEATURES).unwrap_err(),
        RingError::ReadableAfterWritable
    );
}

/// Descriptors may alias: 2048 of them covering the whole 2 MiB region add up to 4 GiB,
/// which overflows a chain's 32-bit length.
#[test]
fn chain_length_overflows_32_bits() {
    let size = 2048u16;
    let rig = Rig::new(size);
    let (_, _, _, total) = SplitLayout::new(size).packed_offsets();
    assert!(total < MEM_SIZE);
    for flags in [0, W] {
        for i in 0..size {
            let last = i + 1 == size;
            rig.write_desc(
                i,
                BASE,
                MEM_SIZE as u32,
                flags | if last { 0 } else { N },
                i + 1,
            );
        }
        assert_eq!(pop0(&rig, NO_FEATURES).unwrap_err(), RingError::ChainLength);
    }
    // One fewer descriptor fits.
    rig.write_desc(size - 2, BASE, MEM_SIZE as u32, W, 0);
    let c = pop0(&rig, NO_FEATURES).unwrap();
    assert_eq!(c.writable_len() as u64, (size as u64 - 1) * MEM_SIZE);
    assert_eq!(c.num_segments(), size as usize - 1);
    // The same through an indirect table of 2048 entries.
    let t = rig.data;
    for i in 0..2048u32 {
        let last = i == 2047;
        rig.write_desc_at(
            t,
            i,
            BASE,
            MEM_SIZE as u32,
            W | if last { 0 } else { N },
            i as u16 + 1,
        );
    }
    rig.write_desc(0, t, 2048 * 16, I, 0);
    assert_eq!(
        pop0(&rig, ALL_FEATURES).unwrap_err(),
        RingError::ChainLength
    );
}

#[test]
fn avail_index_jumps() {
    let rig = Rig::new(8);
    for i in 0..8 {
        rig.write_desc(i, rig.data, 8, 0, 0);
        rig.set_avail_entry(i, i);
    }
    let mut dev = rig.device(NO_FEATURES);
    let mut c = Chain::new();
    rig.set_avail_idx(9);
    let e = RingError::AvailJump {
        last: 0,
        now: 9,
        size: 8,
    };
    assert_eq!(dev.pop(&mut c).unwrap_err(), e);
    assert_eq!(dev.available().unwrap_err(), e);
    assert_eq!(dev.enable_notifications().unwrap_err(), e);
    assert_eq!(dev.pop(&mut c).unwrap_err(), e, "stays an error, no panic");
    rig.set_avail_idx(0xffff);
    assert!(matches!(dev.pop(&mut c), Err(RingError::AvailJump { .. })));
    // Exactly the queue size is legal.
    rig.set_avail_idx(8);
    assert_eq!(dev.available().unwrap(), 8);
    assert!(dev.pop(&mut c).unwrap());
    assert!(dev.pop(&mut c).unwrap());
    // The driver takes back what it published: the index goes backwards.
    let mut dev2 = rig.device(NO_FEATURES);
    for _ in 0..8 {
        assert!(dev2.pop(&mut c).unwrap());
    }
    rig.set_avail_idx(5);
    assert_eq!(
        dev2.pop(&mut c).unwrap_err(),
        RingError::AvailJump {
            last: 8,
            now: 5,
            size: 8
        }
    );
    // Further than size from the device's position, counting modulo 2^16.
    rig.set_avail_idx(8 + 9);
    assert!(matches!(dev2.pop(&mut c), Err(RingError::AvailJump { .. })));
    rig.set_avail_idx(8 + 8);
    assert_eq!(dev2.available().unwrap(), 8);
}

/// A bad chain is consumed: the device moves past it and the next good chain pops.
#[test]
fn device_continues_after_a_bad_chain() {
    let rig = Rig::new(8);
    rig.write_desc(0, 0, 8, 0, 0); // bad address
    rig.write_desc(1, rig.data, 8, 0, 0);
    rig.set_avail_entry(0, 0);
    rig.set_avail_entry(1, 1);
    rig.set_avail_idx(2);
    let mut dev = rig.device(NO_FEATURES);
    let mut c = Chain::new();
    assert!(is_oor(&dev.pop(&mut c).unwrap_err()));
    assert!(dev.pop(&mut c).unwrap());
    assert_eq!(c.head(), 1);
    assert_eq!(c.readable_len(), 8);
    assert!(!dev.pop(&mut c).unwrap());
}

#[test]
fn misaligned_or_unmapped_rings() {
    let rig = Rig::new(8);
    let (desc, avail, used) = (rig.desc, rig.avail, rig.used);
    let mem = rig.dev_mem.clone();
    let dev = |d: GuestAddr, a: GuestAddr, u: GuestAddr| {
        DeviceQueue::new(mem.clone(), 8, d, a, u, NO_FEATURES).map(|_| ())
    };
    let drv = |d: GuestAddr, a: GuestAddr, u: GuestAddr| {
        DriverQueue::new(rig.drv_mem.clone(), 8, d, a, u, NO_FEATURES).map(|_| ())
    };
    let add = |g: GuestAddr, n: u64| GuestAddr(g.0 + n);
    let mis = |align| move |e: RingError| matches!(e, RingError::Memory(MemError::Misaligned { align: a, .. }) if a == align);
    for off in [1, 2, 4, 8] {
        assert!(
            mis(16)(dev(add(desc, off), avail, used).unwrap_err()),
            "desc +{off}"
        );
        assert!(
            mis(16)(drv(add(desc, off), avail, used).unwrap_err()),
            "desc +{off}"
        );
    }
    assert!(mis(2)(dev(desc, add(avail, 1), used).unwrap_err()));
    assert!(mis(2)(drv(desc, add(avail, 1), used).unwrap_err()));
    for off in [1, 2, 3] {
        assert!(
            mis(4)(dev(desc, avail, add(used, off)).unwrap_err()),
            "used +{off}"
        );
        assert!(
            mis(4)(drv(desc, avail, add(used, off)).unwrap_err()),
            "used +{off}"
        );
    }
    // Looser alignments than 16/2/4 beyond what is required are accepted.
    assert!(dev(add(desc, 16), add(avail, 2), add(used, 4)).is_ok());

    // Rings that do not fit in memory.
    let past = GuestAddr(rig.end - 16);
    assert!(is_oor(&dev(past, avail, used).unwrap_err()));
    assert!(is_oor(&dev(desc, past, used).unwrap_err()));
    assert!(is_oor(&dev(desc, avail, past).unwrap_err()));
    assert!(is_oor(&drv(desc, avail, past).unwrap_err()));
    let nowhere = GuestAddr(0x1000);
    assert!(is_oor(&dev(nowhere, avail, used).unwrap_err()));
    let wrap = GuestAddr(!15);
    assert!(is_oor(&dev(wrap, avail, used).unwrap_err()));
    assert!(is_oor(&dev(desc, wrap, used).unwrap_err()));
    assert!(is_oor(&dev(desc, avail, wrap).unwrap_err()));
}

#[test]
fn queue_size_must_be_a_power_of_two() {
    let rig = Rig::new(8);
    for size in [
        0u16, 3, 5, 6, 7, 100, 255, 257, 1000, 32767, 32769, 49152, 65535,
    ] {
        let e = DeviceQueue::new(
            rig.dev_mem.clone(),
            size,
            rig.desc,
            rig.avail,
            rig.used,
            NO_FEATURES,
        )
        .map(|_| ())
        .unwrap_err();
        assert_eq!(e, RingError::BadSize(size as u32));
        let e = DriverQueue::new(
            rig.drv_mem.clone(),
            size,
            rig.desc,
            rig.avail,
            rig.used,
            NO_FEATURES,
        )
        .map(|_| ())
        .unwrap_err();
        assert_eq!(e, RingError::BadSize(size as u32));
    }
    for size in [1u16, 2, 4, 8] {
        assert!(DeviceQueue::new(
            rig.dev_mem.clone(),
            size,
            rig.desc,
            rig.avail,
            rig.used,
            NO_FEATURES
        )
        .is_ok());
    }
}

/// A device writing garbage into the used ring: the driver reports it, never panics, and
/// frees nothing it should not.
#[test]
fn hostile_device_seen_by_the_driver() {
    let rig = Rig::new(8);
    let mut drv = rig.driver(NO_FEATURES);
    let seg = Segment {
        addr: GuestAddr(rig.data),
        len: 8,
        writable: true,
    };
    let a = drv.add(&[seg, seg]).unwrap();
    let b = drv.add(&[seg]).unwrap();
    drv.publish();
    let free = drv.free_descriptors();
    assert_eq!(free, 5);
    let bad_ids: Vec<u32> = vec![
        8,
        0xffff,
        0x1_0000 | a as u32, // must not be truncated to a
        u32::MAX,
    ];
    for id in bad_ids {
        rig.set_used_elem(0, id, 0);
        rig.set_used_idx(1);
        assert_eq!(
            drv.pop_used().unwrap_err(),
            RingError::BadUsedId(id),
            "id {id:#x}"
        );
        assert_eq!(drv.free_descriptors(), free);
    }
    // Ids of descriptors that are not in-flight heads: free ones, and the second
    // descriptor of chain `a`.
    for id in 0..8u32 {
        if id as u16 == a || id as u16 == b {
            continue;
        }
        rig.set_used_elem(0, id, 0);
        let e = drv.pop_used().unwrap_err();
        assert_eq!(e, RingError::BadUsedId(id));
        assert_eq!(drv.free_descriptors(), free);
    }
    // A good one, then the same id again.
    rig.set_used_elem(0, a as u32, 3);
    assert_eq!(drv.pop_used().unwrap(), Some((a, 3)));
    assert_eq!(drv.free_descriptors(), free + 2);
    rig.set_used_elem(1, a as u32, 3);
    rig.set_used_idx(2);
    assert_eq!(drv.pop_used().unwrap_err(), RingError::BadUsedId(a as u32));
    assert_eq!(drv.free_descriptors(), free + 2);
    // The device corrects the entry (the driver has the index cached already).
    rig.set_used_elem(1, b as u32, 0);
    assert_eq!(drv.pop_used().unwrap(), Some((b, 0)));
    assert_eq!(drv.free_descriptors(), 8);
    assert_eq!(drv.in_flight(), 0);
    // The used index jumping by more than the queue size, forwards or backwards.
    rig.set_used_idx(2 + 9);
    assert_eq!(
        drv.pop_used().unwrap_err(),
        RingError::UsedJump { last: 2, now: 11 }
    );
    rig.set_used_idx(1);
    assert_eq!(
        drv.pop_used().unwrap_err(),
        RingError::UsedJump { last: 2, now: 1 }
    );
    // By exactly the size: accepted, but nothing is in flight so every id is bad.
    rig.set_used_idx(2 + 8);
    assert!(matches!(drv.pop_used(), Err(RingError::BadUsedId(_))));
    assert_eq!(drv.free_descriptors(), 8);
}
