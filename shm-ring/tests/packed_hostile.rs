//! Hostile packed rings: whatever a driver writes, the device side returns an error (never
//! panics, never touches memory outside the regions), and the same for a hostile device
//! seen from the driver side.

mod common;
mod packed_common;

use common::*;
use packed_common::*;
use vmdev_shm_ring::packed::{
    PackedState, DESC_F_AVAIL, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_USED, DESC_F_WRITE,
};
use vmdev_shm_ring::split::{RingFeatures, Segment, MAX_INDIRECT};
use vmdev_shm_ring::{
    Chain, GuestAddr, MemError, PackedDeviceQueue, PackedDriverQueue, PackedLayout, RingError,
};

const N: u16 = DESC_F_NEXT;
const W: u16 = DESC_F_WRITE;
const I: u16 = DESC_F_INDIRECT;
/// Available in the first lap (wrap counter 1).
const A: u16 = DESC_F_AVAIL;
/// Available in the second lap (wrap counter 0).
const A0: u16 = DESC_F_USED;

/// Pops the chain at position 0 (first lap) with a fresh device queue.
fn pop0(rig: &PackedRig, f: RingFeatures) -> Result<Chain, RingError> {
    let mut dev = rig.device(f);
    let mut c = Chain::new();
    assert!(dev.pop(&mut c)?, "nothing available");
    Ok(c)
}

fn is_oor(e: &RingError) -> bool {
    matches!(e, RingError::Memory(MemError::OutOfRange { .. }))
}

/// Descriptors whose AVAIL/USED bits do not say "available for this lap" are not
/// available: the ring looks empty (the driver has simply not got there yet).
#[test]
fn wrong_wrap_bits_at_the_head_mean_empty() {
    let rig = PackedRig::new(4);
    let mut c = Chain::new();
    for flags in [0, A | DESC_F_USED, A0, A0 | N] {
        rig.write_desc(0, rig.data, 8, 0, flags);
        let mut dev = rig.device(NO_FEATURES);
        assert!(!dev.pop(&mut c).unwrap(), "flags {flags:#x}");
        assert!(!dev.has_available());
    }
    rig.write_desc(0, rig.data, 8, 0, A);
    assert!(pop0(&rig, NO_FEATURES).is_ok());
    // In the second lap the meaning flips.
    let mut dev = rig.device(NO_FEATURES);
    dev.set_state(PackedState {
        avail_index: 0,
        avail_wrap: false,
        used_index: 0,
        used_wrap: false,
    })
    .unwrap();
    assert!(!dev.pop(&mut c).unwrap(), "first-lap descriptor in lap 2");
    rig.write_desc(0, rig.data, 8, 0, A0);
    assert!(dev.pop(&mut c).unwrap());
}

/// A chain whose later descriptors are not available for their lap is refused: inside
/// the ring, and across the ring's end where the wrap counter flips.
#[test]
fn bad_wrap_inside_a_chain() {
    let rig = PackedRig::new(5);
    let d = rig.data;
    rig.write_desc(0, d, 8, 0, A | N);
    rig.write_desc(1, d, 8, 0, 0); // never made available
    assert_eq!(
        pop0(&rig, NO_FEATURES).unwrap_err(),
        RingError::BadWrap {
            index: 1,
            wrap: true,
            flags: 0
        }
    );
    // Looks used rather than available.
    rig.write_desc(1, d, 8, 0, A | DESC_F_USED);
    assert!(matches!(
        pop0(&rig, NO_FEATURES),
        Err(RingError::BadWrap { index: 1, .. })
    ));

    // Crossing the end: positions 3, 4 (lap 1), 0, 1 (lap 2).
    let start = PackedState {
        avail_index: 3,
        avail_wrap: true,
        used_index: 3,
        used_wrap: true,
    };
    let pop_at = |f: &dyn Fn()| {
        f();
        let mut dev = rig.device(NO_FEATURES);
        dev.set_state(start).unwrap();
        let mut c = Chain::new();
        dev.pop(&mut c).map(|got| {
            assert!(got);
            (c.num_segments(), dev.state())
        })
    };
    let good = || {
        rig.write_desc(3, d, 8, 3, A | N);
        rig.write_desc(4, d, 8, 3, A | N);
        rig.write_desc(0, d, 8, 3, A0 | N);
        rig.write_desc(1, d, 8, 3, A0 | W);
    };
    let (n, s) = pop_at(&good).unwrap();
    assert_eq!(n, 4);
    assert_eq!((s.avail_index, s.avail_wrap), (2, false));
    // The part after the end still carries the first lap's bits.
    let stale = || {
        good();
        rig.write_desc(0, d, 8, 3, A | N);
    };
    assert_eq!(
        pop_at(&stale).unwrap_err(),
        RingError::BadWrap {
            index: 0,
            wrap: false,
            flags: A | N
        }
    );
    let stale_last = || {
        good();
        rig.write_desc(1, d, 8, 3, A | W);
    };
    assert!(matches!(
        pop_at(&stale_last),
        Err(RingError::BadWrap { index: 1, .. })
    ));
    // A descriptor before the end with the next lap's bits.
    let early = || {
        good();
        rig.write_desc(4, d, 8, 3, A0 | N);
    };
    assert!(matches!(
        pop_at(&early),
        Err(RingError::BadWrap { index: 4, .. })
    ));
}

/// Packed chains cannot loop (they are consecutive), but they can claim to be longer than
/// the ring: every descriptor with NEXT. Exactly the queue size is fine.
#[test]
fn chains_longer_than_the_queue() {
    for size in [1u16, 2, 5, 8] {
        let rig = PackedRig::new(size);
        for i in 0..size {
            rig.write_desc(i, rig.data, 1, 0, A | N);
        }
        assert_eq!(
            pop0(&rig, NO_FEATURES).unwrap_err(),
            RingError::ChainTooLong(size as u32),
            "size {size}"
        );
        // The same from the middle of the ring, with the second lap's bits after the end.
        if size > 1 {
            let mut dev = rig.device(NO_FEATURES);
            dev.set_state(PackedState {
                avail_index: size - 1,
                avail_wrap: true,
                used_index: 0,
                used_wrap: true,
            })
            .unwrap();
            for i in 0..size - 1 {
                rig.write_desc(i, rig.data, 1, 0, A0 | N);
            }
            let mut c = Chain::new();
            assert_eq!(
                dev.pop(&mut c).unwrap_err(),
                RingError::ChainTooLong(size as u32)
            );
        }
        // Terminated at the last descriptor: a chain of `size`.
        let rig = PackedRig::new(size);
        for i in 0..size {
            let last = i + 1 == size;
            rig.write_desc(i, rig.data, 1, 0, A | if last { 0 } else { N });
        }
        assert_eq!(
            pop0(&rig, NO_FEATURES).unwrap().num_segments(),
            size as usize
        );
    }
}

/// Buffer ids: out of range, and an id made available again while still in flight.
#[test]
fn bad_buffer_ids() {
    let rig = PackedRig::new(5);
    for id in [5u16, 6, 0x100, 0x8000, 0xffff] {
        rig.write_desc(0, rig.data, 8, id, A);
        assert_eq!(
            pop0(&rig, NO_FEATURES).unwrap_err(),
            RingError::BadBufferId { id, size: 5 }
        );
    }
    // The id is the last descriptor's; earlier ones may carry anything.
    rig.write_desc(0, rig.data, 8, 0xffff, A | N);
    rig.write_desc(1, rig.data, 8, 4, A);
    assert_eq!(pop0(&rig, NO_FEATURES).unwrap().head(), 4);
    rig.write_desc(1, rig.data, 8, 9, A);
    assert!(matches!(
        pop0(&rig, NO_FEATURES),
        Err(RingError::BadBufferId { id: 9, .. })
    ));
    // Id 2 twice while the first is still held.
    rig.write_desc(0, rig.data, 8, 2, A);
    rig.write_desc(1, rig.data, 8, 2, A);
    let mut dev = rig.device(NO_FEATURES);
    let mut c = Chain::new();
    assert!(dev.pop(&mut c).unwrap());
    assert_eq!(dev.pop(&mut c).unwrap_err(), RingError::IdInFlight(2));
    // Once completed, the id may come again.
    dev.add_used(2, 0).unwrap();
    assert!(dev.pop(&mut c).unwrap());
    assert_eq!(c.head(), 2);
}

/// The device side refuses to complete ids it does not hold.
#[test]
fn add_used_for_ids_not_in_flight() {
    let rig = PackedRig::new(4);
    let mut dev = rig.device(NO_FEATURES);
    for id in [0u16, 3, 4, 0xffff] {
        assert_eq!(dev.add_used(id, 0).unwrap_err(), RingError::NotInFlight(id));
    }
    rig.write_desc(0, rig.data, 8, 1, A);
    let mut c = Chain::new();
    assert!(dev.pop(&mut c).unwrap());
    dev.add_used(1, 8).unwrap();
    assert_eq!(dev.add_used(1, 8).unwrap_err(), RingError::NotInFlight(1));
    assert_eq!(dev.state().used_index, 1, "the refused call wrote nothing");
}

#[test]
fn indirect_misuse() {
    let rig = PackedRig::new(8);
    let d = rig.data;
    let t = d + 0x1000;
    rig.write_desc_at(t, 0, d, 8, 0, 0);
    rig.write_desc_at(t, 1, d, 8, 0, 0);

    // Without the feature.
    rig.write_desc(0, t, 32, 0, A | I);
    assert!(matches!(
        pop0(&rig, NO_FEATURES),
        Err(RingError::BadIndirect(_))
    ));
    assert!(pop0(&rig, features(false, true)).is_ok());

    // INDIRECT together with NEXT.
    rig.write_desc(0, t, 32, 0, A | I | N);
    rig.write_desc(1, d, 8, 0, A);
    assert!(matches!(
        pop0(&rig, ALL_FEATURES),
        Err(RingError::BadIndirect(_))
    ));
    // An indirect descriptor after direct ones in a chain (spec 2.8.19 forbids it).
    rig.write_desc(0, d, 8, 0, A | N);
    rig.write_desc(1, t, 32, 0, A | I);
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
        rig.write_desc(0, t, len, 0, A | I);
        assert!(
            matches!(pop0(&rig, ALL_FEATURES), Err(RingError::BadIndirect(_))),
            "table length {len}"
        );
    }

    // Nested indirect, including a table pointing at itself.
    rig.write_desc(0, t, 32, 0, A | I);
    rig.write_desc_at(t, 1, t, 32, 0, I);
    assert_eq!(
        pop0(&rig, ALL_FEATURES).unwrap_err(),
        RingError::NestedIndirect
    );
    rig.write_desc_at(t, 0, t, 32, 0, I | W);
    assert_eq!(
        pop0(&rig, ALL_FEATURES).unwrap_err(),
        RingError::NestedIndirect
    );

    // Table outside memory, or running past its end.
    rig.write_desc_at(t, 0, d, 8, 0, 0);
    rig.write_desc_at(t, 1, d, 8, 0, 0);
    for addr in [0x1000, rig.end - 16, u64::MAX - 15] {
        rig.write_desc(0, addr, 32, 0, A | I);
        assert!(is_oor(&pop0(&rig, ALL_FEATURES).unwrap_err()));
    }

    // NEXT inside a table is ignored (entries are consecutive, spec 2.8.19); so are the
    // ids there. WRITE on the indirect descriptor itself is ignored, and the table need
    // not be 16-aligned.
    let t2 = t + 0x203;
    rig.write_desc_at(t2, 0, d, 8, 0xffff, N);
    rig.write_desc_at(t2, 1, d, 4, 77, W);
    rig.write_desc(0, t2, 32, 3, A | I | W);
    let c = pop0(&rig, ALL_FEATURES).unwrap();
    assert_eq!((c.readable_len(), c.writable_len(), c.head()), (8, 4, 3));
}

#[test]
fn buffers_outside_memory() {
    let rig = PackedRig::new(8);
    let cases: &[(u64, u32)] = &[
        (0, 1),
        (0x1000, 0),
        (BASE - 1, 2),
        (rig.end, 0),
        (rig.end, 1),
        (rig.end - 1, 2),
        (rig.data, u32::MAX),
        (u64::MAX, 1),
        (u64::MAX - 3, 16),
        (u64::MAX, 0),
        (1 << 63, 4096),
    ];
    for &(addr, len) in cases {
        for flags in [0, W] {
            rig.write_desc(0, addr, len, 0, A | flags);
            let e = pop0(&rig, NO_FEATURES).unwrap_err();
            assert!(is_oor(&e), "{addr:#x}+{len:#x}: {e:?}");
        }
    }
    for &(addr, len) in &[(BASE, 1u32), (rig.end - 8, 8), (BASE, 0), (rig.end - 1, 0)] {
        rig.write_desc(0, addr, len, 0, A);
        assert_eq!(pop0(&rig, NO_FEATURES).unwrap().readable_len(), len);
    }
    // Deep in a chain, and inside an indirect table.
    rig.write_desc(0, rig.data, 8, 0, A | N);
    rig.write_desc(1, rig.data, 8, 0, A | N | W);
    rig.write_desc(2, rig.end - 4, 8, 0, A | W);
    assert!(is_oor(&pop0(&rig, NO_FEATURES).unwrap_err()));
    let t = rig.data + 0x1000;
    rig.write_desc(0, t, 32, 0, A | I);
    rig.write_desc_at(t, 0, rig.data, 8, 0, 0);
    rig.write_desc_at(t, 1, u64::MAX - 7, 16, 0, 0);
    assert!(is_oor(&pop0(&rig, ALL_FEATURES).unwrap_err()));
}

#[test]
fn readable_after_writable() {
    let rig = PackedRig::new(8);
    let d = rig.data;
    rig.write_desc(0, d, 8, 0, A | N);
    rig.write_desc(1, d, 8, 0, A | W | N);
    rig.write_desc(2, d, 0, 0, A);
    assert_eq!(
        pop0(&rig, NO_FEATURES).unwrap_err(),
        RingError::ReadableAfterWritable
    );
    let t = d + 0x1000;
    rig.write_desc(0, t, 32, 0, A | I);
    rig.write_desc_at(t, 0, d, 8, 0, W);
    rig.write_desc_at(t, 1, d, 8, 0, 0);
    assert_eq!(
        pop0(&rig, ALL_FEATURES).unwrap_err(),
        RingError::ReadableAfterWritable
    );
}

/// Aliasing descriptors adding up to 4 GiB overflow a chain's 32-bit length.
#[test]
fn chain_length_overflows_32_bits() {
    let size = 2048u16;
    let rig = PackedRig::new(size);
    for flags in [0, W] {
        for i in 0..size {
            let last = i + 1 == size;
            rig.write_desc(
                i,
                BASE,
                MEM_SIZE as u32,
                0,
                A | flags | if last { 0 } else { N },
            );
        }
        assert_eq!(pop0(&rig, NO_FEATURES).unwrap_err(), RingError::ChainLength);
    }
    rig.write_desc(size - 2, BASE, MEM_SIZE as u32, 0, A | W);
    let c = pop0(&rig, NO_FEATURES).unwrap();
    assert_eq!(c.writable_len() as u64, (size as u64 - 1) * MEM_SIZE);
}

/// A malformed chain leaves the device where it was: the error repeats (the device needs
/// a reset) and nothing is recorded as in flight.
#[test]
fn errors_do_not_move_the_device() {
    let rig = PackedRig::new(4);
    rig.write_desc(0, 0, 8, 0, A);
    let mut dev = rig.device(NO_FEATURES);
    let mut c = Chain::new();
    for _ in 0..3 {
        assert!(is_oor(&dev.pop(&mut c).unwrap_err()));
        assert_eq!(dev.state(), PackedState::default());
        assert_eq!(dev.in_flight(), 0);
    }
    rig.write_desc(0, rig.data, 8, 0, A);
    assert!(dev.pop(&mut c).unwrap());
}

/// A hostile device seen from the driver: used ids out of range, never added, or
/// completed twice are errors; used flags from the wrong lap are just "nothing yet".
#[test]
fn hostile_device_used_ids() {
    let rig = PackedRig::new(4);
    let mut drv = rig.driver(NO_FEATURES);
    let seg = Segment {
        addr: GuestAddr(rig.data),
        len: 8,
        writable: true,
    };
    let a = drv.add(&[seg, seg]).unwrap();
    let b = drv.add(&[seg]).unwrap();
    drv.publish();
    let write_used = |i: u16, id: u16, len: u32, flags: u16| {
        rig.write_desc(i, 0, len, id, flags);
    };
    // Wrong lap: not used.
    write_used(0, a, 1, 0);
    assert_eq!(drv.pop_used().unwrap(), None);
    write_used(0, a, 1, DESC_F_AVAIL);
    assert_eq!(drv.pop_used().unwrap(), None, "an available descriptor");
    for id in [4u16, 0xffff, 3] {
        write_used(0, id, 1, used(true));
        assert_eq!(drv.pop_used().unwrap_err(), RingError::BadUsedId(id as u32));
    }
    assert_eq!(drv.in_flight(), 2);
    write_used(0, a, 16, used(true));
    assert_eq!(drv.pop_used().unwrap(), Some((a, 16)));
    // Next used position is 2 (a had two descriptors): the same id again.
    write_used(2, a, 16, used(true));
    assert_eq!(drv.pop_used().unwrap_err(), RingError::BadUsedId(a as u32));
    write_used(2, b, 0, used(true));
    assert_eq!(drv.pop_used().unwrap(), Some((b, 0)));
    assert_eq!(drv.free_descriptors(), 4);
    assert_eq!(drv.pop_used().unwrap(), None);
}

#[test]
fn misaligned_unmapped_and_badly_sized_rings() {
    let rig = PackedRig::new(8);
    let (desc, dre, dve) = (rig.desc, rig.driver_ev, rig.device_ev);
    let dev = |size: u16, d: GuestAddr, a: GuestAddr, u: GuestAddr| {
        PackedDeviceQueue::new(rig.dev_mem.clone(), size, d, a, u, NO_FEATURES).map(|_| ())
    };
    let drv = |size: u16, d: GuestAddr, a: GuestAddr, u: GuestAddr| {
        PackedDriverQueue::new(rig.drv_mem.clone(), size, d, a, u, NO_FEATURES).map(|_| ())
    };
    let add = |g: GuestAddr, n: u64| GuestAddr(g.0 + n);
    let mis = |align| move |e: RingError| matches!(e, RingError::Memory(MemError::Misaligned { align: a, .. }) if a == align);
    for off in [1, 2, 4, 8] {
        assert!(mis(16)(dev(8, add(desc, off), dre, dve).unwrap_err()));
        assert!(mis(16)(drv(8, add(desc, off), dre, dve).unwrap_err()));
    }
    for off in [1, 2, 3] {
        assert!(mis(4)(dev(8, desc, add(dre, off), dve).unwrap_err()));
        assert!(mis(4)(dev(8, desc, dre, add(dve, off)).unwrap_err()));
        assert!(mis(4)(drv(8, desc, dre, add(dve, off)).unwrap_err()));
    }
    assert!(dev(8, add(desc, 16), add(dre, 4), add(dve, 4)).is_ok());
    let past = GuestAddr(rig.end - 16);
    assert!(is_oor(&dev(8, past, dre, dve).unwrap_err()));
    let past = GuestAddr(rig.end - 2 * 16 + 16);
    assert!(is_oor(&dev(2, past, dre, dve).unwrap_err()));
    assert!(is_oor(&dev(8, desc, GuestAddr(rig.end), dve).unwrap_err()));
    assert!(is_oor(&drv(8, desc, dre, GuestAddr(0x1000)).unwrap_err()));
    assert!(is_oor(&dev(8, GuestAddr(!15), dre, dve).unwrap_err()));

    for size in [0u16, 32769, 40000, 65535] {
        assert_eq!(
            dev(size, desc, dre, dve).unwrap_err(),
            RingError::BadPackedSize(size as u32)
        );
        assert_eq!(
            drv(size, desc, dre, dve).unwrap_err(),
            RingError::BadPackedSize(size as u32)
        );
    }
    // Any size in 1..=32768 works, powers of two or not (given room for the ring).
    let big = PackedRig::new(32768);
    for size in [1u16, 3, 5, 6, 7, 100, 255, 257, 1000, 32767, 32768] {
        let l = PackedLayout::new(size);
        assert_eq!(l.desc_len, 16 * size as u64);
        PackedDeviceQueue::new(
            big.dev_mem.clone(),
            size,
            big.desc,
            big.driver_ev,
            big.device_ev,
            NO_FEATURES,
        )
        .unwrap();
        PackedDriverQueue::new(
            big.drv_mem.clone(),
            size,
            big.desc,
            big.driver_ev,
            big.device_ev,
            NO_FEATURES,
        )
        .unwrap();
    }
}

/// The same under IN_ORDER: a used id in flight but not the oldest stands for every buffer
/// up to it (they come back oldest first, at length 0, the last with the length written);
/// ids out of range, never added or already returned are still errors that move nothing.
#[test]
fn hostile_device_used_ids_in_order() {
    let f = with_in_order(NO_FEATURES, true);
    let rig = PackedRig::new(8);
    let mut drv = rig.driver(f);
    let seg = Segment {
        addr: GuestAddr(rig.data),
        len: 8,
        writable: true,
    };
    let a = drv.add(&[seg, seg]).unwrap();
    let b = drv.add(&[seg]).unwrap();
    let c = drv.add(&[seg]).unwrap();
    let d = drv.add(&[seg]).unwrap();
    drv.publish();
    let write_used = |i: u16, id: u16, len: u32| rig.write_desc(i, 0, len, id, used(true));
    for id in [8u16, 0xffff, 7] {
        write_used(0, id, 1);
        assert_eq!(drv.pop_used().unwrap_err(), RingError::BadUsedId(id as u32));
    }
    assert_eq!(drv.in_flight(), 4);
    // One descriptor at position 0 for a, b and c.
    write_used(0, c, 5);
    assert_eq!(drv.pop_used().unwrap(), Some((a, 0)));
    assert_eq!(drv.pop_used().unwrap(), Some((b, 0)));
    assert_eq!(drv.pop_used().unwrap(), Some((c, 5)));
    assert_eq!(drv.pop_used().unwrap(), None, "position 4 not written yet");
    // Position 4: an id already returned, then d.
    write_used(4, b, 1);
    assert_eq!(drv.pop_used().unwrap_err(), RingError::BadUsedId(b as u32));
    write_used(4, d, 2);
    assert_eq!(drv.pop_used().unwrap(), Some((d, 2)));
    assert_eq!(drv.free_descriptors(), 8);
    assert_eq!(drv.in_flight(), 0);
    assert_eq!(drv.pop_used().unwrap(), None);
}
