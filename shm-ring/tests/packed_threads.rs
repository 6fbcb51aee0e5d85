//! The packed device side on its own thread, as the datapath runs it: both sides poll,
//! then re-enable notifications and sleep on a "kick" or "interrupt" channel (standing in
//! for the eventfds). A lost wake-up hangs one side, which the timeout turns into a
//! failure. A million chains, every byte checked on both sides.

mod common;
mod packed_common;

use common::*;
use packed_common::*;
use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::thread;
use std::time::Duration;
use vmdev_shm_ring::split::Segment;
use vmdev_shm_ring::{Chain, GuestAddr};

const WAIT: Duration = Duration::from_secs(20);
const SLOT: u64 = 256;

/// The readable bytes of chain `seq`: 1..=64 bytes of a pattern derived from `seq`.
fn payload(seq: u64) -> Vec<u8> {
    let n = 1 + (seq % 64) as usize;
    (0..n)
        .map(|i| (seq.wrapping_mul(31) as u8).wrapping_add((i as u8).wrapping_mul(7)))
        .collect()
}

/// What the device writes back for a payload: every byte transformed, reversed.
fn answer(p: &[u8]) -> Vec<u8> {
    p.iter().rev().map(|b| b ^ 0x5a).collect()
}

fn run(size: u16, event_idx: bool, total: u64) {
    let rig = PackedRig::new(size);
    assert!(rig.data + size as u64 * SLOT <= rig.end);
    let f = features(event_idx, true);
    let mut drv = rig.driver(f);
    let mut dev = rig.device(f);
    let (kick_tx, kick_rx) = sync_channel::<()>(1);
    let (irq_tx, irq_rx) = sync_channel::<()>(1);

    let device = thread::spawn(move || {
        let mut c = Chain::new();
        let mut served = 0u64;
        let mut buf = [0u8; 64];
        while served < total {
            dev.disable_notifications();
            let mut did = 0;
            while dev.pop(&mut c).unwrap() {
                let want = payload(served);
                assert_eq!(c.readable_len() as usize, want.len());
                assert_eq!(c.writable_len(), 64 + 8);
                let n = c.read_at(0, &mut buf);
                assert_eq!(
                    &buf[..n],
                    &want[..],
                    "chain {served} out of order or corrupted"
                );
                let mut out = served.to_le_bytes().to_vec();
                out.extend(answer(&want));
                assert_eq!(c.write_at(0, &out), out.len());
                dev.add_used(c.head(), out.len() as u32).unwrap();
                served += 1;
                did += 1;
                if did % 8 == 0 {
                    dev.publish_used();
                    if dev.needs_notification() {
                        let _ = irq_tx.try_send(());
                    }
                }
            }
            dev.publish_used();
            if dev.needs_notification() {
                let _ = irq_tx.try_send(());
            }
            if did == 0 && served < total && !dev.enable_notifications().unwrap() {
                match kick_rx.recv_timeout(WAIT) {
                    Ok(()) => {}
                    Err(RecvTimeoutError::Timeout) => {
                        panic!("device slept {WAIT:?} after {served} chains: lost kick")
                    }
                    Err(RecvTimeoutError::Disconnected) => panic!("driver gone"),
                }
            }
        }
        dev.state()
    });

    let mut next = 0u64;
    let mut reaped = 0u64;
    let mut ids = VecDeque::new();
    // Slots are handed out in order and come back in order (the device completes in
    // order), so seq % size names a free slot.
    drv.disable_interrupts();
    while reaped < total {
        let mut added = 0;
        while next < total && drv.free_descriptors() >= 4 && ids.len() < size as usize {
            let base = rig.data + (next % size as u64) * SLOT;
            let p = payload(next);
            rig.drv_mem.write(GuestAddr(base), &p).unwrap();
            rig.drv_mem.write(GuestAddr(base + 64), &[0; 72]).unwrap();
            let segs = [
                Segment {
                    addr: GuestAddr(base),
                    len: p.len() as u32,
                    writable: false,
                },
                Segment {
                    addr: GuestAddr(base + 64),
                    len: 8,
                    writable: true,
                },
                Segment {
                    addr: GuestAddr(base + 72),
                    len: 64,
                    writable: true,
                },
            ];
            let id = match next % 3 {
                0 => drv.add(&segs),
                1 => drv.add_indirect(GuestAddr(base + 144), &segs).unwrap(),
                _ => drv.add(&[
                    segs[0],
                    segs[1],
                    Segment {
                        addr: GuestAddr(base + 72),
                        len: 32,
                        writable: true,
                    },
                    Segment {
                        addr: GuestAddr(base + 104),
                        len: 32,
                        writable: true,
                    },
                ]),
            }
            .unwrap();
            ids.push_back((id, next));
            next += 1;
            added += 1;
        }
        if added > 0 {
            drv.publish();
            if drv.needs_kick() {
                let _ = kick_tx.try_send(());
            }
        }
        let mut got = 0;
        while let Some((id, len)) = drv.pop_used().unwrap() {
            let (want_id, seq) = ids.pop_front().unwrap();
            assert_eq!(id, want_id);
            let p = payload(seq);
            assert_eq!(len as usize, 8 + p.len());
            let base = rig.data + (seq % size as u64) * SLOT;
            let back = rig.read_vec(base + 64, 8 + p.len());
            assert_eq!(u64::from_le_bytes(back[..8].try_into().unwrap()), seq);
            assert_eq!(&back[8..], &answer(&p)[..], "chain {seq}: bytes differ");
            reaped += 1;
            got += 1;
        }
        if added == 0 && got == 0 {
            if drv.enable_interrupts() {
                drv.disable_interrupts();
                continue;
            }
            match irq_rx.recv_timeout(WAIT) {
                Ok(()) => {}
                Err(RecvTimeoutError::Timeout) => {
                    panic!("driver slept {WAIT:?} after {reaped} chains: lost interrupt")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    device.join().unwrap();
                    unreachable!("device thread ended early");
                }
            }
            drv.disable_interrupts();
        }
    }
    let dev_state = device.join().unwrap();
    assert_eq!(drv.free_descriptors(), size as usize);
    assert_eq!(drv.state(), dev_state);
}

#[test]
fn threads_million_chains_event_idx() {
    run(257, true, 1_000_000);
}

#[test]
fn threads_flags_odd_sizes() {
    run(5, false, 100_000);
    run(7, true, 100_000);
}
