//! Packed-ring driver and device round trips over one memfd mapped twice (as two processes
//! would), including many wraps of the ring and of both wrap counters.

mod common;
mod packed_common;

use common::*;
use packed_common::*;
use vmdev_shm_ring::packed::{PackedLayout, PackedState, DESC_F_NEXT, MAX_QUEUE_SIZE};
use vmdev_shm_ring::split::{Segment, MAX_INDIRECT};
use vmdev_shm_ring::{Chain, GuestAddr, PackedDeviceQueue, PackedDriverQueue, RingError};

/// The fixed example: one readable and two writable segments, then an indirect chain.
#[test]
fn one_chain_each_way() {
    let rig = PackedRig::new(8);
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
    let id = drv.add(&segs).unwrap();
    assert_eq!(drv.free_descriptors(), 5);
    assert_eq!(drv.in_flight(), 1);

    // Not published yet: the device sees nothing.
    let mut chain = Chain::new();
    assert!(!dev.pop(&mut chain).unwrap());
    drv.publish();
    assert!(dev.pop(&mut chain).unwrap());
    assert_eq!(chain.head(), id);
    assert_eq!(
        (
            chain.readable_len(),
            chain.writable_len(),
            chain.num_segments()
        ),
        (13, 10, 3)
    );
    let mut buf = [0u8; 13];
    assert_eq!(chain.read_at(0, &mut buf), 13);
    assert_eq!(&buf, b"hello, device");
    assert_eq!(chain.write_at(0, b"hi driver!"), 10);
    assert_eq!(
        dev.state(),
        PackedState {
            avail_index: 3,
            avail_wrap: true,
            used_index: 0,
            used_wrap: true
        }
    );
    dev.add_used(chain.head(), 10).unwrap();
    assert_eq!(
        drv.pop_used().unwrap(),
        None,
        "not visible before publish_used"
    );
    dev.publish_used();
    // One used descriptor, at the chain's first position; the device skips 3.
    let u = rig.desc_at(0);
    assert_eq!((u.id, u.len, u.flags), (id, 10, used(true)));
    assert_eq!(dev.state().used_index, 3);
    assert_eq!(drv.pop_used().unwrap(), Some((id, 10)));
    assert_eq!(rig.read_vec(d + 0x100, 4), b"hi d");
    assert_eq!(rig.read_vec(d + 0x200, 6), b"river!");
    assert_eq!(drv.free_descriptors(), 8);
    assert_eq!(drv.in_flight(), 0);

    // The same through an indirect table: one ring descriptor.
    let table = GuestAddr(d + 0x1000);
    let id = drv.add_indirect(table, &segs).unwrap().unwrap();
    assert_eq!(drv.free_descriptors(), 7);
    drv.publish();
    assert!(dev.pop(&mut chain).unwrap());
    assert_eq!(chain.head(), id);
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
    dev.add_used(id, 0).unwrap();
    dev.publish_used();
    assert_eq!(drv.pop_used().unwrap(), Some((id, 0)));
    assert_eq!(drv.free_descriptors(), 8);
    assert_eq!(drv.pop_used().unwrap(), None);
    assert_eq!(dev.state(), drv.state());
}

/// Random chains, direct and indirect, for several queue sizes (odd ones included) and
/// feature sets, long enough for both wrap counters to flip many times.
#[test]
fn random_round_trips() {
    for (i, &size) in [1u16, 2, 3, 5, 7, 8, 16, 64, 257].iter().enumerate() {
        for (j, &(event_idx, indirect)) in
            [(false, false), (false, true), (true, false), (true, true)]
                .iter()
                .enumerate()
        {
            let mut h = PackedHarness::new(size, features(event_idx, indirect), (i * 4 + j) as u64);
            let ops = 400.max(4 * size as usize);
            for _ in 0..ops {
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
            if size < 64 {
                assert!(
                    h.stats.avail_wraps >= 6 && h.stats.used_wraps >= 6,
                    "size {size}: {:?}",
                    h.stats
                );
            } else {
                assert!(h.stats.avail_wraps >= 1, "size {size}: {:?}", h.stats);
            }
        }
    }
}

/// Many times round odd-sized rings with chains of 1..n descriptors (direct, indirect,
/// mixed), more than 3 × the queue size of operations per lap count: every position is a
/// head, a middle and a tail of a chain crossing the ring's end at some point.
#[test]
fn odd_sizes_wrap_many_times() {
    for &size in &[5u16, 7, 257] {
        let mut h = PackedHarness::new(size, ALL_FEATURES, size as u64 * 31);
        let target = 40 * size as u64;
        while h.stats.reaped < target {
            let k = h.rng.range(1, 3);
            for _ in 0..k {
                let ind = h.rng.chance(1, 3);
                let spec = h.random_spec(MAX_SEGS.min(size as usize), ind);
                h.add(&spec);
            }
            h.publish();
            let n = h.rng.range(0, 3) as usize;
            h.device_pop(n);
            let n = h.rng.range(0, 3) as usize;
            let publish = h.rng.chance(3, 4);
            h.device_complete(n, publish);
            let n = h.rng.range(0, 3) as usize;
            h.driver_reap(n);
            h.check_accounting();
        }
        h.drain();
        assert!(
            h.stats.avail_wraps >= 20 && h.stats.used_wraps >= 20,
            "size {size}: {:?}",
            h.stats
        );
        assert!(h.stats.unpopped > 0);
    }
}

/// Filling every descriptor: further adds are refused until the device returns some;
/// out-of-order completion puts used descriptors in the device's order.
#[test]
fn full_ring_refuses_then_recovers() {
    for size in [1u16, 3, 4, 32] {
        let rig = PackedRig::new(size);
        let mut drv = rig.driver(ALL_FEATURES);
        let mut dev = rig.device(ALL_FEATURES);
        let seg = |i: u64| Segment {
            addr: GuestAddr(rig.data + i * 64),
            len: 64,
            writable: true,
        };
        let mut ids = Vec::new();
        for i in 0..size as u64 {
            ids.push(drv.add(&[seg(i)]).unwrap());
        }
        assert_eq!(drv.free_descriptors(), 0);
        assert_eq!(drv.add(&[seg(0)]), None);
        assert_eq!(drv.add(&[]), None, "an empty chain is refused");
        let table = GuestAddr(rig.data + 0x8000);
        assert_eq!(drv.add_indirect(table, &[seg(0)]).unwrap(), None);
        assert_eq!(drv.add_indirect(table, &[]).unwrap(), None);
        drv.publish();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, (0..size).collect::<Vec<_>>(), "every id used once");

        let mut c = Chain::new();
        for &h in &ids {
            assert!(dev.pop(&mut c).unwrap());
            assert_eq!(c.head(), h);
        }
        assert!(!dev.pop(&mut c).unwrap());
        // Complete in reverse order: the driver sees the device's order.
        for &h in ids.iter().rev() {
            dev.add_used(h, 1).unwrap();
        }
        dev.publish_used();
        for &h in ids.iter().rev() {
            assert_eq!(drv.pop_used().unwrap(), Some((h, 1)));
        }
        assert_eq!(drv.free_descriptors(), size as usize);
        // A chain as long as the whole queue (crossing the ring end unless size is 1).
        let all: Vec<_> = (0..size as u64).map(seg).collect();
        let h = drv.add(&all).unwrap();
        drv.publish();
        assert!(dev.pop(&mut c).unwrap());
        assert_eq!(c.head(), h);
        assert_eq!(c.num_segments(), size as usize);
        assert_eq!(c.writable_len(), 64 * size as u32);
        dev.add_used(h, 0).unwrap();
        dev.publish_used();
        assert_eq!(drv.pop_used().unwrap(), Some((h, 0)));
        assert_eq!(drv.free_descriptors(), size as usize);
        assert_eq!(dev.state(), drv.state());
    }
}

/// Out-of-order completion of chains of different lengths: each used descriptor lands at
/// the device's used position, which skips the completed chain's descriptor count (spec
/// 2.8.9), and the driver follows the same skips.
#[test]
fn used_positions_follow_completed_counts() {
    let rig = PackedRig::new(7);
    let mut drv = rig.driver(NO_FEATURES);
    let mut dev = rig.device(NO_FEATURES);
    let seg = Segment {
        addr: GuestAddr(rig.data),
        len: 8,
        writable: true,
    };
    let a = drv.add(&[seg; 3]).unwrap(); // positions 0..3
    let b = drv.add(&[seg]).unwrap(); // 3
    let c2 = drv.add(&[seg; 2]).unwrap(); // 4..6
    drv.publish();
    let mut c = Chain::new();
    for _ in 0..3 {
        assert!(dev.pop(&mut c).unwrap());
    }
    assert_eq!(dev.in_flight(), 3);
    dev.add_used(b, 1).unwrap(); // at 0, next used 1
    dev.add_used(c2, 2).unwrap(); // at 1, next used 3
    dev.add_used(a, 3).unwrap(); // at 3, next used 6
    assert_eq!(dev.state().used_index, 6);
    dev.publish_used();
    assert_eq!((rig.desc_at(0).id, rig.desc_at(0).len), (b, 1));
    assert_eq!((rig.desc_at(1).id, rig.desc_at(1).len), (c2, 2));
    assert_eq!((rig.desc_at(3).id, rig.desc_at(3).len), (a, 3));
    assert_eq!(drv.pop_used().unwrap(), Some((b, 1)));
    assert_eq!(drv.pop_used().unwrap(), Some((c2, 2)));
    assert_eq!(drv.pop_used().unwrap(), Some((a, 3)));
    assert_eq!(drv.pop_used().unwrap(), None);
    assert_eq!(drv.state().used_index, 6);
    // Next chain crosses the ring end: positions 6, 0, 1 with wrap counters 1, 0, 0.
    let x = drv.add(&[seg; 3]).unwrap();
    drv.publish();
    assert!(rig.desc_at(6).flags & DESC_F_NEXT != 0);
    assert_eq!(rig.desc_at(0).flags & !3, avail(false));
    assert!(dev.pop(&mut c).unwrap());
    assert_eq!((c.head(), c.num_segments()), (x, 3));
    assert_eq!(
        dev.state(),
        PackedState {
            avail_index: 2,
            avail_wrap: false,
            used_index: 6,
            used_wrap: true
        }
    );
    dev.add_used(x, 0).unwrap();
    dev.publish_used();
    assert_eq!(rig.desc_at(6).flags, used(true));
    assert_eq!(drv.pop_used().unwrap(), Some((x, 0)));
    assert_eq!(drv.state(), dev.state());
    assert!(!drv.state().used_wrap);
}

/// `unpop` hands the same chains out again, newest first, and only while still held.
#[test]
fn unpop_puts_back_newest_first() {
    let rig = PackedRig::new(5);
    let mut drv = rig.driver(NO_FEATURES);
    let mut dev = rig.device(NO_FEATURES);
    let seg = Segment {
        addr: GuestAddr(rig.data),
        len: 8,
        writable: false,
    };
    assert!(!dev.has_available());
    dev.unpop(); // nothing popped: no effect
    assert_eq!(dev.state(), PackedState::default());
    let a = drv.add(&[seg, seg]).unwrap();
    let b = drv.add(&[seg; 2]).unwrap();
    let c3 = drv.add(&[seg]).unwrap();
    drv.publish();
    let mut c = Chain::new();
    for id in [a, b, c3] {
        assert!(dev.pop(&mut c).unwrap());
        assert_eq!(c.head(), id);
    }
    assert_eq!(dev.state().avail_index, 0);
    assert!(!dev.state().avail_wrap, "crossed the ring end");
    // Put back c3 and b (like a merged receive that ran out of buffers).
    dev.unpop();
    dev.unpop();
    assert_eq!(dev.state().avail_index, 2);
    assert!(dev.state().avail_wrap);
    assert_eq!(dev.in_flight(), 1);
    assert!(dev.pop(&mut c).unwrap());
    assert_eq!(c.head(), b);
    // A completed chain cannot be put back.
    dev.add_used(b, 0).unwrap();
    dev.unpop();
    assert_eq!(dev.state().avail_index, 4);
    assert!(dev.pop(&mut c).unwrap());
    assert_eq!(c.head(), c3);
    assert!(!dev.pop(&mut c).unwrap());
    assert_eq!(
        dev.add_used(b, 0).unwrap_err(),
        RingError::NotInFlight(b),
        "completed twice"
    );
    dev.add_used(a, 0).unwrap();
    dev.add_used(c3, 0).unwrap();
    dev.publish_used();
    assert_eq!(drv.pop_used().unwrap(), Some((b, 0)));
    assert_eq!(drv.pop_used().unwrap(), Some((a, 0)));
    assert_eq!(drv.pop_used().unwrap(), Some((c3, 0)));
    assert_eq!(drv.free_descriptors(), 5);
    assert_eq!(drv.state(), dev.state());
}

/// A device stopped with nothing in flight resumes elsewhere from its state (and the
/// 32-bit vhost form of it) without losing or repeating a buffer.
#[test]
fn state_survives_a_device_restart() {
    let mut h = PackedHarness::new(7, ALL_FEATURES, 3);
    for round in 0..20 {
        for _ in 0..30 {
            let ind = h.rng.chance(1, 3);
            let spec = h.random_spec(4, ind);
            h.add(&spec);
            h.publish();
            h.device_pop(2);
            h.device_complete(2, true);
            h.driver_reap(2);
        }
        // Stop: the device finishes what it holds and publishes; the driver may still
        // have chains published for it.
        h.device_complete(usize::MAX, true);
        let s = h.dev.state();
        assert_eq!(PackedState::from_u32(s.to_u32()), s);
        let mut dev = h.rig.device(ALL_FEATURES);
        dev.set_state(PackedState::from_u32(s.to_u32())).unwrap();
        assert_eq!(dev.state(), s, "round {round}");
        h.dev = dev;
    }
    h.drain();
    assert!(h.stats.avail_wraps > 10);
}

#[test]
fn set_state_refuses_positions_outside_the_ring() {
    let rig = PackedRig::new(7);
    let mut dev = rig.device(NO_FEATURES);
    for (a, u) in [(7u16, 0u16), (0, 7), (0x7fff, 0), (0xffff, 0xffff)] {
        let s = PackedState {
            avail_index: a,
            avail_wrap: false,
            used_index: u,
            used_wrap: true,
        };
        assert!(matches!(
            dev.set_state(s),
            Err(RingError::BadState { size: 7, .. })
        ));
    }
    assert_eq!(dev.state(), PackedState::default());
    let s = PackedState {
        avail_index: 6,
        avail_wrap: false,
        used_index: 6,
        used_wrap: false,
    };
    dev.set_state(s).unwrap();
    assert_eq!(dev.state(), s);
    assert_eq!(
        s.to_u32(),
        6 | 6 << 16,
        "wrap counters 0 leave bits 15 and 31 clear"
    );
    assert_eq!(PackedState::default().to_u32(), 1 << 15 | 1 << 31);
}

/// The largest queue and non-power-of-two sizes near it still round-trip.
#[test]
fn max_and_odd_queue_sizes() {
    for size in [MAX_QUEUE_SIZE, 32767, 1000] {
        let (_, _, _, total) = PackedLayout::new(size).packed_offsets();
        assert!(total < MEM_SIZE);
        let mut h = PackedHarness::new(size, ALL_FEATURES, 99);
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
}

/// Both sides can be built over the same rings more than once (a device re-attached):
/// fresh queues start at the initial state and see what a fresh driver publishes.
#[test]
fn fresh_queues_over_reused_memory() {
    let rig = PackedRig::new(3);
    for round in 0..5u8 {
        let mut drv = PackedDriverQueue::new(
            rig.drv_mem.clone(),
            3,
            rig.desc,
            rig.driver_ev,
            rig.device_ev,
            NO_FEATURES,
        )
        .unwrap();
        let mut dev = PackedDeviceQueue::new(
            rig.dev_mem.clone(),
            3,
            rig.desc,
            rig.driver_ev,
            rig.device_ev,
            NO_FEATURES,
        )
        .unwrap();
        rig.drv_mem
            .write(GuestAddr(rig.data), &[round; 16])
            .unwrap();
        for _ in 0..round {
            // Leave the previous round's state at different places.
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
            dev.add_used(h, 0).unwrap();
            dev.publish_used();
            assert_eq!(drv.pop_used().unwrap(), Some((h, 0)));
        }
    }
}

/// The largest indirect table a device accepts round-trips; a longer one is refused by the
/// driver side up front.
#[test]
fn indirect_table_size_limit() {
    let rig = PackedRig::new(3);
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
    for n in [MAX_INDIRECT as usize + 1, 65536, 70000] {
        let segs = vec![seg; n];
        assert!(
            matches!(
                drv.add_indirect(table, &segs),
                Err(RingError::BadIndirect(_))
            ),
            "{n} descriptors"
        );
        assert_eq!(drv.free_descriptors(), 3);
    }
    let e = drv
        .add_indirect(GuestAddr(rig.end - 16), &[seg, seg])
        .unwrap_err();
    assert!(matches!(e, RingError::Memory(_)), "{e:?}");
    assert_eq!(drv.free_descriptors(), 3);
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
    dev.add_used(h, 0).unwrap();
    dev.publish_used();
    assert_eq!(drv.pop_used().unwrap(), Some((h, 0)));
    assert_eq!(drv.free_descriptors(), 3);
}

/// The driver side moves to another mapping of the same memory and carries on.
#[test]
fn driver_remap_keeps_chains_in_flight() {
    let rig = PackedRig::new(5);
    let mut drv = rig.driver(NO_FEATURES);
    let mut dev = rig.device(NO_FEATURES);
    let seg = Segment {
        addr: GuestAddr(rig.data),
        len: 4,
        writable: true,
    };
    let a = drv.add(&[seg, seg]).unwrap();
    drv.publish();
    let mut c = Chain::new();
    assert!(dev.pop(&mut c).unwrap());
    // A third mapping of the same memory: the device's.
    drv.remap(rig.dev_mem.clone()).unwrap();
    let b = drv.add(&[seg]).unwrap();
    drv.publish();
    dev.add_used(a, 4).unwrap();
    dev.publish_used();
    assert_eq!(drv.pop_used().unwrap(), Some((a, 4)));
    assert!(dev.pop(&mut c).unwrap());
    assert_eq!(c.head(), b);
    assert_eq!(drv.in_flight(), 1);
    assert_eq!(drv.free_descriptors(), 4);
    assert_eq!(drv.size(), 5);
    assert!(std::sync::Arc::ptr_eq(drv.memory(), &rig.dev_mem));
}

/// Under IN_ORDER a run of read-only chains completed with length 0 comes back as one used
/// descriptor carrying the run's last id, written at the run's first position; a chain
/// the device wrote into ends the run and gets its own. The driver hands every buffer back,
/// oldest first, with the run's members at length 0.
#[test]
fn in_order_runs_of_read_only_chains_share_one_used_descriptor() {
    let f = with_in_order(ALL_FEATURES, true);
    let rig = PackedRig::new(16);
    let mut drv = rig.driver(f);
    let mut dev = rig.device(f);
    let seg = |i: u64, writable: bool| Segment {
        addr: GuestAddr(rig.data + 64 * i),
        len: 32,
        writable,
    };
    // Three TX chains (one of them two descriptors long), one RX chain, two more TX.
    let mut ids = vec![
        drv.add(&[seg(0, false)]).unwrap(),
        drv.add(&[seg(1, false), seg(2, false)]).unwrap(),
        drv.add(&[seg(3, false)]).unwrap(),
        drv.add(&[seg(4, true)]).unwrap(),
    ];
    ids.push(drv.add(&[seg(5, false)]).unwrap());
    ids.push(drv.add(&[seg(6, false)]).unwrap());
    drv.publish();
    let mut chain = Chain::new();
    for (i, &id) in ids.iter().enumerate() {
        assert!(dev.pop(&mut chain).unwrap());
        let len = if i == 3 { 7 } else { 0 };
        dev.add_used(id, len).unwrap();
    }
    dev.publish_used();
    // Positions: chains at 0, 1-2, 3, 4 (RX), 5, 6. Used descriptors: 0 (run of three,
    // last id), 4 (RX), 5 (run of two). 1-3 and 6 still hold what the driver wrote.
    let u = rig.desc_at(0);
    assert_eq!((u.id, u.len, u.flags), (ids[2], 0, used(true)));
    let u = rig.desc_at(4);
    assert_eq!((u.id, u.len, u.flags), (ids[3], 7, used(true)));
    let u = rig.desc_at(5);
    assert_eq!((u.id, u.len, u.flags), (ids[5], 0, used(true)));
    for i in [1, 2, 3, 6] {
        assert_eq!(rig.desc_at(i).flags & used(true), avail(true), "slot {i}");
    }
    assert_eq!(dev.state().used_index, 7);
    for (i, &id) in ids.iter().enumerate() {
        let len = if i == 3 { 7 } else { 0 };
        assert_eq!(drv.pop_used().unwrap(), Some((id, len)), "chain {i}");
    }
    assert_eq!(drv.pop_used().unwrap(), None);
    assert_eq!(drv.free_descriptors(), 16);
    assert_eq!(drv.state(), dev.state());

    // Without IN_ORDER every chain gets its own used descriptor.
    let rig = PackedRig::new(16);
    let mut drv = rig.driver(ALL_FEATURES);
    let mut dev = rig.device(ALL_FEATURES);
    let a = drv.add(&[seg(0, false)]).unwrap();
    let b = drv.add(&[seg(1, false)]).unwrap();
    drv.publish();
    for id in [a, b] {
        assert!(dev.pop(&mut chain).unwrap());
        dev.add_used(id, 0).unwrap();
    }
    dev.publish_used();
    assert_eq!(rig.desc_at(1).id, b);
    assert_eq!(rig.desc_at(1).flags, used(true));
    assert_eq!(drv.pop_used().unwrap(), Some((a, 0)));
    assert_eq!(drv.pop_used().unwrap(), Some((b, 0)));
}

/// A device that completes out of pop order under IN_ORDER gets no shared descriptor: each
/// chain keeps its own, so nothing is freed on the driver's behalf by mistake.
#[test]
fn in_order_runs_form_only_in_pop_order() {
    let f = with_in_order(ALL_FEATURES, true);
    let rig = PackedRig::new(8);
    let mut drv = rig.driver(f);
    let mut dev = rig.device(f);
    let seg = |i: u64| Segment {
        addr: GuestAddr(rig.data + 64 * i),
        len: 8,
        writable: false,
    };
    let ids: Vec<u16> = (0..3).map(|i| drv.add(&[seg(i)]).unwrap()).collect();
    drv.publish();
    let mut chain = Chain::new();
    for _ in 0..3 {
        assert!(dev.pop(&mut chain).unwrap());
    }
    for id in [ids[1], ids[0], ids[2]] {
        dev.add_used(id, 0).unwrap();
    }
    dev.publish_used();
    let written: Vec<(u16, u16)> = (0..3)
        .map(|i| (rig.desc_at(i).id, rig.desc_at(i).flags))
        .collect();
    assert_eq!(
        written,
        vec![
            (ids[1], used(true)),
            (ids[0], used(true)),
            (ids[2], used(true))
        ]
    );
}

/// The prefetch hint names the buffer an in-order device marks used next: the oldest in
/// flight under IN_ORDER, otherwise the id in the next used slot, where a device writing
/// garbage leaves no hint (and no panic).
#[test]
fn next_used_hint_names_the_next_buffer_in_order() {
    for in_order in [false, true] {
        let f = with_in_order(ALL_FEATURES, in_order);
        let rig = PackedRig::new(8);
        let mut drv = rig.driver(f);
        let mut dev = rig.device(f);
        let seg = [Segment {
            addr: GuestAddr(rig.data),
            len: 64,
            writable: true,
        }];
        let mut chain = Chain::new();
        for round in 0..8 {
            let ids: Vec<u16> = (0..3).map(|_| drv.add(&seg).unwrap()).collect();
            drv.publish();
            assert_eq!(
                drv.next_used_hint(),
                Some(ids[0]),
                "in_order {in_order} round {round}"
            );
            for &id in &ids {
                assert!(dev.pop(&mut chain).unwrap());
                dev.add_used(id, 64).unwrap();
            }
            dev.publish_used();
            for &id in &ids {
                assert_eq!(drv.pop_used().unwrap(), Some((id, 64)));
            }
        }
        if !in_order {
            // 24 descriptors used: the next used slot is 0. A garbage id there: no hint.
            let d = rig.desc_at(0);
            rig.write_desc(0, d.addr, d.len, 0xffff, d.flags);
            assert_eq!(drv.next_used_hint(), None);
        }
    }
}

/// A driver over `rig` that made every descriptor a writable 64-byte buffer, of which the
/// device used the first `used` (64 bytes each) and published them; and the buffer ids in
/// ring order.
fn driver_with_used(rig: &PackedRig, used: usize) -> (PackedDriverQueue, Vec<u16>) {
    let mut drv = rig.driver(ALL_FEATURES);
    let mut dev = rig.device(ALL_FEATURES);
    let seg = [Segment {
        addr: GuestAddr(rig.data),
        len: 64,
        writable: true,
    }];
    let ids: Vec<u16> = (0..rig.size).map(|_| drv.add(&seg).unwrap()).collect();
    drv.publish();
    let mut chain = Chain::new();
    for &id in &ids[..used] {
        assert!(dev.pop(&mut chain).unwrap());
        dev.add_used(id, 64).unwrap();
    }
    dev.publish_used();
    (drv, ids)
}

/// After taking the first used descriptor of a cache line, the driver learns the ids of up
/// to `ahead` further used descriptors (to prefetch their buffers): nothing past the first
/// one not yet used, nothing after a descriptor in the middle of a line, and never the
/// descriptor just taken again.
#[test]
fn peek_used_ahead_names_the_used_descriptors_after_a_line_start() {
    let rig = PackedRig::new(8);
    assert_eq!(rig.desc.0 % 64, 0, "the rig's ring starts a cache line");
    // The device uses the first six.
    let (mut drv, ids) = driver_with_used(&rig, 6);
    let seen = |drv: &PackedDriverQueue, ahead: u16| {
        let mut v = Vec::new();
        drv.peek_used_ahead(ahead, |id| v.push(id));
        v
    };
    assert_eq!(drv.pop_used().unwrap(), Some((ids[0], 64)));
    assert_eq!(seen(&drv, 3), ids[1..4].to_vec(), "the rest of line 0");
    assert_eq!(
        seen(&drv, 7),
        ids[1..6].to_vec(),
        "into line 1, up to the first unused"
    );
    assert_eq!(seen(&drv, 2), ids[1..3].to_vec(), "no further than asked");
    assert_eq!(drv.pop_used().unwrap(), Some((ids[1], 64)));
    assert_eq!(seen(&drv, 7), Vec::<u16>::new(), "mid-line: nothing");
    for &id in &ids[2..5] {
        assert_eq!(drv.pop_used().unwrap(), Some((id, 64)));
    }
    assert_eq!(
        seen(&drv, 3),
        vec![ids[5]],
        "line 1 up to the first unused one"
    );
    // A garbage id there is no hint (and no panic).
    let d = rig.desc_at(5);
    rig.write_desc(5, d.addr, d.len, 0xffff, d.flags);
    assert_eq!(seen(&drv, 3), Vec::<u16>::new(), "an id past the ring");
}

/// On a ring shorter than `ahead`, the look-ahead stops before coming back round to the
/// descriptor just taken, even when every descriptor is used.
#[test]
fn peek_used_ahead_never_laps_the_ring() {
    let rig = PackedRig::new(4);
    let (mut drv, ids) = driver_with_used(&rig, 4);
    assert_eq!(drv.pop_used().unwrap(), Some((ids[0], 64)));
    let mut v = Vec::new();
    drv.peek_used_ahead(100, |id| v.push(id));
    assert_eq!(v, ids[1..4].to_vec());
}
