//! Driver and device round trips over one memfd mapped twice (as two processes would).

mod common;

use common::harness::{Harness, MAX_SEGS};
use common::*;
use vmdev_shm_ring::split::{Segment, SplitLayout, MAX_QUEUE_SIZE};
use vmdev_shm_ring::{Chain, DeviceQueue, DriverQueue, GuestAddr, RingError};

/// The fixed example: one readable and two writable segments, then an indirect chain.
#[test]
fn one_chain_each_way() {
    let rig = Rig::new(8);
    let mut drv = rig.driver(ALL_FEATURES);
    let mut dev = rig.device(ALL_FEATURES);
    let d = rig.data;
    rig.drv_mem.write(GuestAddr(d), b"hello, device").unwrap();
    let segs = [
        Segment {
            addr: GuestAddr(d),
            len: 13,
            writable: false,
        },
        Segment {
            addr: GuestAddr(d + 0x100),
            len: 4,
            writable: true,
        },
        Segment {
            addr: GuestAddr(d + 0x200),
            len: 6,
            writable: true,
        },
    ];
    let head = drv.add(&segs).unwrap();
    assert_eq!(drv.free_descriptors(), 5);
    assert_eq!(drv.in_flight(), 1);

    // Not published yet: the device sees nothing.
    let mut chain = Chain::new();
    assert!(!dev.pop(&mut chain).unwrap());
    drv.publish();
    assert!(dev.pop(&mut chain).unwrap());
    assert_eq!(chain.head(), head);
    assert_eq!(chain.readable_len(), 13);
    assert_eq!(chain.writable_len(), 10);
    assert_eq!(chain.num_segments(), 3);
    let mut buf = [0u8; 13];
    assert_eq!(chain.read_at(0, &mut buf), 13);
    assert_eq!(&buf, b"hello, device");
    assert_eq!(
        chain.write_at(9, b"xyz"),
        1,
        "writes stop at the end of the chain"
    );
    assert_eq!(chain.write_at(10, b"xyz"), 0);
    assert_eq!(chain.write_at(0, b"hi driver!"), 10);
    dev.add_used(chain.head(), 10);
    assert_eq!(
        drv.pop_used().unwrap(),
        None,
        "not visible before publish_used"
    );
    dev.publish_used();
    assert_eq!(drv.pop_used().unwrap(), Some((head, 10)));
    assert_eq!(rig.read_vec(d + 0x100, 4), b"hi d");
    assert_eq!(rig.read_vec(d + 0x200, 6), b"river!");
    assert_eq!(drv.free_descriptors(), 8);
    assert_eq!(drv.in_flight(), 0);

    // The same through an indirect table: one ring descriptor.
    let table = GuestAddr(d + 0x1000);
    let head = drv.add_indirect(table, &segs).unwrap().unwrap();
    assert_eq!(drv.free_descriptors(), 7);
    drv.publish();
    assert!(dev.pop(&mut chain).unwrap());
    assert_eq!(chain.head(), head);
    assert_eq!(
        (
            chain.readable_len(),
            chain.writable_len(),
            chain.num_segments()
        ),
        (13, 10, 3)
    );
    assert_eq!(chain.read_at(7, &mut buf), 6);
    assert_eq!(&buf[..6], b"device");
    dev.add_used(head, 0);
    dev.publish_used();
    assert_eq!(drv.pop_used().unwrap(), Some((head, 0)));
    assert_eq!(drv.free_descriptors(), 8);
    assert_eq!(drv.pop_used().unwrap(), None);
}

/// Random chains, direct and indirect, for several queue sizes and feature sets.
#[test]
fn random_round_trips() {
    for (i, &size) in [1u16, 2, 4, 8, 16, 64, 256].iter().enumerate() {
        for (j, &(event_idx, indirect)) in
            [(false, false), (false, true), (true, false), (true, true)]
                .iter()
                .enumerate()
        {
            let mut h = Harness::new(size, features(event_idx, indirect), (i * 4 + j) as u64);
            for _ in 0..400 {
                let ind = indirect && h.rng.chance(1, 2);
                let spec = h.random_spec(MAX_SEGS.min(size as usize + 1), ind);
                h.add(&spec);
                if h.rng.chance(1, 2) {
                    h.publish();
                }
                let n = h.rng.below(4) as usize;
                h.device_pop(n);
                let n = h.rng.below(4) as usize;
                let publish = h.rng.chance(2, 3);
                h.device_complete(n, publish);
                let n = h.rng.below(4) as usize;
                h.driver_reap(n);
                h.check_accounting();
            }
            h.drain();
            assert!(h.stats.popped > 50, "{:?}", h.stats);
            assert_eq!(h.stats.popped, h.stats.reaped);
            if indirect {
                assert!(h.stats.added_indirect > 0);
            }
        }
    }
}

/// Filling every descriptor: further adds are refused until the device returns some.
#[test]
fn full_ring_refuses_then_recovers() {
    for size in [1u16, 4, 32] {
        let rig = Rig::new(size);
        let mut drv = rig.driver(ALL_FEATURES);
        let mut dev = rig.device(ALL_FEATURES);
        let seg = |i: u64| Segment {
            addr: GuestAddr(rig.data + i * 64),
            len: 64,
            writable: true,
        };
        let mut heads = Vec::new();
        for i in 0..size as u64 {
            heads.push(drv.add(&[seg(i)]).unwrap());
        }
        assert_eq!(drv.free_descriptors(), 0);
        assert_eq!(drv.add(&[seg(0)]), None);
        assert_eq!(drv.add(&[]), None, "an empty chain is refused");
        let table = GuestAddr(rig.data + 0x8000);
        assert_eq!(drv.add_indirect(table, &[seg(0)]).unwrap(), None);
        assert_eq!(drv.add_indirect(table, &[]).unwrap(), None);
        drv.publish();
        let mut sorted = heads.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(
            sorted,
            (0..size).collect::<Vec<_>>(),
            "every descriptor used once"
        );

        let mut c = Chain::new();
        for &h in &heads {
            assert!(dev.pop(&mut c).unwrap());
            assert_eq!(c.head(), h);
        }
        assert!(!dev.pop(&mut c).unwrap());
        // Complete in reverse order: the driver sees the device's order.
        for &h in heads.iter().rev() {
            dev.add_used(h, 1);
        }
        dev.publish_used();
        for &h in heads.iter().rev() {
            assert_eq!(drv.pop_used().unwrap(), Some((h, 1)));
        }
        assert_eq!(drv.free_descriptors(), size as usize);
        // A chain as long as the whole queue.
        let all: Vec<_> = (0..size as u64).map(seg).collect();
        let h = drv.add(&all).unwrap();
        drv.publish();
        assert!(dev.pop(&mut c).unwrap());
        assert_eq!(c.head(), h);
        assert_eq!(c.num_segments(), size as usize);
        assert_eq!(c.writable_len(), 64 * size as u32);
        dev.add_used(h, 0);
        dev.publish_used();
        assert_eq!(drv.pop_used().unwrap(), Some((h, 0)));
        assert_eq!(drv.free_descriptors(), size as usize);
    }
}

/// `unpop` hands the same chain out again; `available` counts published chains.
#[test]
fn unpop_and_available() {
    let rig = Rig::new(4);
    let mut drv = rig.driver(NO_FEATURES);
    let mut dev = rig.device(NO_FEATURES);
    let seg = Segment {
        addr: GuestAddr(rig.data),
        len: 8,
        writable: false,
    };
    assert_eq!(dev.available().unwrap(), 0);
    let a = drv.add(&[seg]).unwrap();
    let b = drv.add(&[seg]).unwrap();
    assert_eq!(dev.available().unwrap(), 0);
    drv.publish();
    assert_eq!(dev.available().unwrap(), 2);
    let mut c = Chain::new();
    assert!(dev.pop(&mut c).unwrap());
    assert_eq!(c.head(), a);
    dev.unpop();
    assert_eq!(dev.next_avail(), 0);
    assert!(dev.pop(&mut c).unwrap());
    assert_eq!(c.head(), a);
    assert!(dev.pop(&mut c).unwrap());
    assert_eq!(c.head(), b);
    assert_eq!(dev.available().unwrap(), 0);
    assert!(!dev.pop(&mut c).unwrap());
}

/// The two sides need not share a mapping, or even the mapping's layout: the device maps
/// the same memfd with the rings' region at a different host address.
#[test]
fn separate_mappings_see_each_other() {
    let rig = Rig::new(16);
    let drv_p = rig.drv_mem.translate(rig.desc, 16).unwrap();
    let dev_p = rig.dev_mem.translate(rig.desc, 16).unwrap();
    assert_ne!(drv_p, dev_p, "two distinct mappings");
    let mut h = Harness::new(16, ALL_FEATURES, 7);
    for _ in 0..50 {
        let spec = h.random_spec(4, false);
        h.add(&spec);
        h.publish();
        h.device_pop(1);
        h.device_complete(1, true);
        h.driver_reap(1);
    }
    h.drain();
}

/// The largest queue: rings of 32768 descriptors still round-trip.
#[test]
fn max_queue_size() {
    let size = MAX_QUEUE_SIZE;
    let (_, _, _, total) = SplitLayout::new(size).packed_offsets();
    assert!(total < MEM_SIZE);
    let mut h = Harness::new(size, ALL_FEATURES, 99);
    for _ in 0..200 {
        let ind = h.rng.chance(1, 2);
        let spec = h.random_spec(MAX_SEGS, ind);
        h.add(&spec);
        h.publish();
        h.device_pop(2);
        h.device_complete(2, true);
        h.driver_reap(2);
    }
    h.drain();
    assert!(h.stats.reaped >= 190);
}

/// Both sides can be built over the same rings more than once (a device re-attached):
/// a new DeviceQueue starts from index 0 and sees what a fresh driver publishes.
#[test]
fn fresh_queues_over_reused_memory() {
    let rig = Rig::new(8);
    for round in 0..3u8 {
        let mut drv = DriverQueue::new(
            rig.drv_mem.clone(),
            8,
            rig.desc,
            rig.avail,
            rig.used,
            NO_FEATURES,
        )
        .unwrap();
        let mut dev = DeviceQueue::new(
            rig.dev_mem.clone(),
            8,
            rig.desc,
            rig.avail,
            rig.used,
            NO_FEATURES,
        )
        .unwrap();
        rig.drv_mem
            .write(GuestAddr(rig.data), &[round; 16])
            .unwrap();
        let h = drv
            .add(&[Segment {
                addr: GuestAddr(rig.data),
                len: 16,
                writable: false,
            }])
            .unwrap();
        drv.publish();
        let mut c = Chain::new();
        assert!(dev.pop(&mut c).unwrap());
        let mut b = [0u8; 16];
        assert_eq!(c.read_at(0, &mut b), 16);
        assert_eq!(b, [round; 16]);
        dev.add_used(h, 0);
        dev.publish_used();
        assert_eq!(drv.pop_used().unwrap(), Some((h, 0)));
    }
}

/// The largest indirect table a device accepts round-trips; a longer one is refused by the
/// driver side up front (it used to be added, for the device to reject, and past 65536
/// descriptors the `next` field overflowed: a panic in debug builds).
#[test]
fn indirect_table_size_limit() {
    use vmdev_shm_ring::split::MAX_INDIRECT;
    use vmdev_shm_ring::RingError;
    let rig = Rig::new(4);
    let mut drv = rig.driver(ALL_FEATURES);
    let mut dev = rig.device(ALL_FEATURES);
    let table = GuestAddr(rig.data);
    let buf = GuestAddr(rig.end - 4096);
    rig.drv_mem.write(buf, &[7; 4]).unwrap();
    let seg = Segment {
        addr: buf,
        len: 1,
        writable: false,
    };
    for n in [MAX_INDIRECT as usize + 1, 65536, 65537, 70000] {
        let segs = vec![seg; n];
        assert!(
            matches!(
                drv.add_indirect(table, &segs),
                Err(RingError::BadIndirect(_))
            ),
            "{n} descriptors"
        );
        assert_eq!(drv.free_descriptors(), 4);
    }
    // A table outside memory is refused without using a descriptor.
    let e = drv
        .add_indirect(GuestAddr(rig.end - 16), &[seg, seg])
        .unwrap_err();
    assert!(matches!(e, RingError::Memory(_)), "{e:?}");
    assert_eq!(drv.free_descriptors(), 4);
    drv.publish();
    let mut c = Chain::new();
    assert!(!dev.pop(&mut c).unwrap(), "nothing was added");

    let segs = vec![seg; MAX_INDIRECT as usize];
    let h = drv.add_indirect(table, &segs).unwrap().unwrap();
    drv.publish();
    assert!(dev.pop(&mut c).unwrap());
    assert_eq!(c.num_segments(), MAX_INDIRECT as usize);
    assert_eq!(c.readable_len(), MAX_INDIRECT);
    let mut b = vec![0u8; 4];
    assert_eq!(c.read_at(32767, &mut b), 1);
    assert_eq!(b[0], 7);
    dev.add_used(h, 0);
    dev.publish_used();
    assert_eq!(drv.pop_used().unwrap(), Some((h, 0)));
    assert_eq!(drv.free_descriptors(), 4);
}

/// A ring of 8 with every feature, its two sides, and one 64-byte writable segment for the
/// in-order tests below.
fn in_order_rig() -> (Rig, DriverQueue, DeviceQueue, [Segment; 1]) {
    let rig = Rig::new(8);
    let drv = rig.driver(ALL_FEATURES);
    let dev = rig.device(ALL_FEATURES);
    let seg = [Segment {
        addr: GuestAddr(rig.data),
        len: 64,
        writable: true,
    }];
    (rig, drv, dev, seg)
}

/// With completions in order, the driver hands out descriptors in ring order, lap after
/// lap: avail slot `i` always carries head `i % size`, so the avail ring (and, on the
/// device side, each used element) holds the same bytes every lap and neither side has to
/// store into those lines again.
#[test]
fn in_order_completions_reuse_heads_in_ring_order() {
    let (_rig, mut drv, mut dev, seg) = in_order_rig();
    let mut chain = Chain::new();
    for lap in 0..3u16 {
        // Five chains at a time, so the laps do not line up with the ring's end.
        for round in 0..8u16 {
            let first = (lap * 8 + round) * 5;
            let heads: Vec<u16> = (0..5).map(|_| drv.add(&seg).unwrap()).collect();
            let want: Vec<u16> = (first..first + 5).map(|i| i % 8).collect();
            assert_eq!(heads, want, "lap {lap} round {round}");
            drv.publish();
            for &h in &heads {
                assert!(dev.pop(&mut chain).unwrap());
                assert_eq!(chain.head(), h);
                dev.add_used(h, 64);
            }
            dev.publish_used();
            for &h in &heads {
                assert_eq!(drv.pop_used().unwrap(), Some((h, 64)));
            }
        }
    }
    assert_eq!(drv.free_descriptors(), 8);
}

/// The prefetch hint names the head an in-order device returns next once the used ring
/// has gone round once, and a device's garbage id in the used ring gives no hint (no
/// panic).
#[test]
fn next_used_hint_follows_in_order_completions_and_ignores_garbage() {
    let (rig, mut drv, mut dev, seg) = in_order_rig();
    let mut chain = Chain::new();
    for round in 0..8u16 {
        let heads: Vec<u16> = (0..3).map(|_| drv.add(&seg).unwrap()).collect();
        drv.publish();
        if round >= 3 {
            // Every used slot has been written once (three a round, eight slots).
            assert_eq!(drv.next_used_hint(), Some(heads[0]), "round {round}");
        }
        for &h in &heads {
            assert!(dev.pop(&mut chain).unwrap());
            dev.add_used(h, 64);
        }
        dev.publish_used();
        for &h in &heads {
            assert_eq!(drv.pop_used().unwrap(), Some((h, 64)));
        }
    }
    // 24 entries used: the next used slot is 0. A hostile id there gives no hint.
    let slot0 = rig.used.0 + 4;
    rig.dev_mem
        .write(GuestAddr(slot0), &0xffff_u32.to_le_bytes())
        .unwrap();
    assert_eq!(drv.next_used_hint(), None);
    rig.dev_mem
        .write(GuestAddr(slot0), &5_u32.to_le_bytes())
        .unwrap();
    assert_eq!(drv.next_used_hint(), Some(5));
}

/// Under IN_ORDER the driver checks each used entry against the head it made available
/// that many chains ago (its own copy, not the shared avail ring), across laps of the ring.
/// A later chain's id is one entry for a batch up to it (virtio 1.2, 2.7.9), so a device
/// that returns the second chain first, alone, has moved the used index too little for
/// that batch: refused, and the queue does not move. Once the first chain is returned too,
/// the pair reads as that batch: the entry the device wrote for the first is skipped.
#[test]
fn in_order_driver_refuses_a_later_chain_first_and_does_not_move() {
    let rig = Rig::new(8);
    let f = with_in_order(ALL_FEATURES, true);
    let (mut drv, mut dev) = (rig.driver(f), rig.device(f));
    let seg = [Segment {
        addr: GuestAddr(rig.data),
        len: 64,
        writable: true,
    }];
    let mut chain = Chain::new();
    for lap in 0..4u16 {
        let heads: Vec<u16> = (0..3).map(|_| drv.add(&seg).unwrap()).collect();
        drv.publish();
        for _ in &heads {
            assert!(dev.pop(&mut chain).unwrap());
        }
        if lap < 3 {
            for &h in &heads {
                dev.add_used(h, 64);
            }
            dev.publish_used();
            for &h in &heads {
                assert_eq!(drv.pop_used().unwrap(), Some((h, 64)), "lap {lap}");
            }
            continue;
        }
        dev.add_used(heads[1], 11);
        dev.publish_used();
        for _ in 0..2 {
            match drv.pop_used() {
                Err(RingError::OutOfOrder { expected, got }) => {
                    assert_eq!((expected, got), (Some(heads[0]), heads[1]));
                }
                other => panic!("expected OutOfOrder, got {other:?}"),
            }
        }
        assert_eq!(drv.in_flight(), 3, "nothing was taken");
        dev.add_used(heads[0], 10);
        dev.add_used(heads[2], 12);
        dev.publish_used();
        assert_eq!(drv.pop_used().unwrap(), Some((heads[0], 0)));
        assert_eq!(drv.pop_used().unwrap(), Some((heads[1], 11)));
        assert_eq!(drv.pop_used().unwrap(), Some((heads[2], 12)));
        assert_eq!(drv.pop_used().unwrap(), None);
    }
}

/// A device under IN_ORDER may write one used entry for a batch, with the id of the
/// batch's last chain, and move the used index by the batch's size (virtio 1.2, 2.7.9).
/// The driver hands the batch's chains back oldest first (length 0, the last with the
/// length written) and skips the entries the device did not write; a batch the used index
/// does not cover, or an id not in flight after the oldest, is refused and moves nothing.
#[test]
fn in_order_driver_takes_one_used_entry_for_a_batch() {
    let rig = Rig::new(8);
    let f = with_in_order(ALL_FEATURES, true);
    let mut drv = rig.driver(f);
    let seg = [Segment {
        addr: GuestAddr(rig.data),
        len: 64,
        writable: true,
    }];
    // The device's writes, by hand: used entry `slot` and the used index.
    let write_used = |slot: u16, id: u32, len: u32| {
        let at = rig.used.0 + 4 + (slot as u64 % 8) * 8;
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&id.to_le_bytes());
        b[4..].copy_from_slice(&len.to_le_bytes());
        rig.dev_mem.write(GuestAddr(at), &b).unwrap();
    };
    let set_used_idx = |idx: u16| {
        rig.dev_mem
            .write(GuestAddr(rig.used.0 + 2), &idx.to_le_bytes())
            .unwrap();
    };
    let mut used = 0u16;
    // Three laps of the ring, so the batches and the skipped entries wrap.
    for lap in 0..3 {
        let heads: Vec<u16> = (0..6).map(|_| drv.add(&seg).unwrap()).collect();
        drv.publish();
        // Stale entries where the device will not write: they must not be read.
        for k in 1..4 {
            write_used(used + k, 0xdead, 0xdead);
        }
        // One entry for the first four chains, with a length for the last of them; the used
        // index first moves by only three: not enough for that batch.
        write_used(used, heads[3] as u32, 60 + lap);
        set_used_idx(used.wrapping_add(3));
        match drv.pop_used() {
            Err(RingError::OutOfOrder { expected, got }) => {
                assert_eq!((expected, got), (Some(heads[0]), heads[3]), "lap {lap}");
            }
            other => panic!("a batch past the used index: {other:?}"),
        }
        assert_eq!(drv.in_flight(), 6, "nothing was taken");
        set_used_idx(used.wrapping_add(4));
        assert_eq!(drv.pop_used().unwrap(), Some((heads[0], 0)));
        assert_eq!(drv.pop_used().unwrap(), Some((heads[1], 0)));
        assert_eq!(drv.pop_used().unwrap(), Some((heads[2], 0)));
        assert_eq!(drv.pop_used().unwrap(), Some((heads[3], 60 + lap)));
        assert_eq!(drv.pop_used().unwrap(), None, "lap {lap}: the batch is all");
        used = used.wrapping_add(4);
        // An id that is not in flight after the oldest (one already returned) is refused.
        write_used(used, heads[1] as u32, 1);
        set_used_idx(used.wrapping_add(1));
        assert!(drv.pop_used().is_err(), "lap {lap}: an id already returned");
        assert_eq!(drv.in_flight(), 2);
        // Then the last two one at a time, as an ordinary device returns them.
        write_used(used, heads[4] as u32, 5);
        assert_eq!(drv.pop_used().unwrap(), Some((heads[4], 5)));
        write_used(used + 1, heads[5] as u32, 6);
        set_used_idx(used.wrapping_add(2));
        assert_eq!(drv.pop_used().unwrap(), Some((heads[5], 6)));
        used = used.wrapping_add(2);
        assert_eq!(drv.in_flight(), 0);
        assert_eq!(drv.free_descriptors(), 8);
    }
}
