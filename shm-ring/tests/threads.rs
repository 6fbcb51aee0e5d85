//! The device side on its own thread, as the datapath runs it: both sides poll, then
//! re-enable notifications and sleep on a "kick" or "interrupt" channel (standing in for
//! the eventfds). A lost wake-up hangs one side, which the timeout turns into a failure.

mod common;

use common::*;
use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::thread;
use std::time::Duration;
use vmdev_shm_ring::split::Segment;
use vmdev_shm_ring::{Chain, GuestAddr};

const WAIT: Duration = Duration::from_secs(10);
const SLOT: u64 = 64;

fn run(size: u16, event_idx: bool, total: u64) {
    let rig = Rig::new(size);
    let f = features(event_idx, true);
    let mut drv = rig.driver(f);
    let mut dev = rig.device(f);
    // Capacity 1 and try_send: signals coalesce, like an eventfd counter.
    let (kick_tx, kick_rx) = sync_channel::<()>(1);
    let (irq_tx, irq_rx) = sync_channel::<()>(1);

    let device = thread::spawn(move || {
        let mut c = Chain::new();
        let mut served = 0u64;
        let mut sleeps = 0u64;
        while served < total {
            dev.disable_notifications();
            let mut did = 0;
            while dev.pop(&mut c).unwrap() {
                let mut b = [0u8; 8];
                assert_eq!(c.read_at(0, &mut b), 8);
                let v = u64::from_le_bytes(b);
                assert_eq!(v, served, "chains out of order or corrupted");
                assert_eq!(c.write_at(0, &(v * 3 + 1).to_le_bytes()), 8);
                dev.add_used(c.head(), 8);
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
                sleeps += 1;
                match kick_rx.recv_timeout(WAIT) {
                    Ok(()) => {}
                    Err(RecvTimeoutError::Timeout) => {
                        panic!("device slept {WAIT:?} after {served} chains: lost kick")
                    }
                    Err(RecvTimeoutError::Disconnected) => panic!("driver gone"),
                }
            }
        }
        sleeps
    });

    let mut next = 0u64;
    let mut reaped = 0u64;
    let mut heads = VecDeque::new();
    let mut sleeps = 0u64;
    drv.disable_interrupts();
    while reaped < total {
        let mut added = 0;
        while next < total && drv.free_descriptors() >= 2 {
            // In-flight chains never exceed the queue size, so seq % size is a free slot.
            let base = rig.data + (next % size as u64) * SLOT;
            rig.drv_mem
                .write(GuestAddr(base), &next.to_le_bytes())
                .unwrap();
            rig.drv_mem.write(GuestAddr(base + 16), &[0; 8]).unwrap();
            let segs = [
                Segment {
                    addr: GuestAddr(base),
                    len: 8,
                    writable: false,
                },
                Segment {
                    addr: GuestAddr(base + 16),
                    len: 8,
                    writable: true,
                },
            ];
            let h = if next.is_multiple_of(2) {
                drv.add(&segs)
            } else {
                drv.add_indirect(GuestAddr(base + 32), &segs).unwrap()
            }
            .unwrap();
            heads.push_back((h, next));
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
            let (h, seq) = heads.pop_front().unwrap();
            assert_eq!((id, len), (h, 8));
            let v = rig.read_vec(rig.data + (seq % size as u64) * SLOT + 16, 8);
            assert_eq!(u64::from_le_bytes(v.try_into().unwrap()), seq * 3 + 1);
            reaped += 1;
            got += 1;
        }
        if added == 0 && got == 0 {
            if drv.enable_interrupts() {
                drv.disable_interrupts();
                continue;
            }
            sleeps += 1;
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
    let dev_sleeps = device.join().unwrap();
    assert_eq!(drv.free_descriptors(), size as usize);
    assert_eq!(rig.avail_idx(), total as u16);
    assert_eq!(rig.used_idx(), total as u16);
    let _ = (sleeps, dev_sleeps); // how often each side slept: timing-dependent
}

#[test]
fn threads_event_idx() {
    run(4, true, 30_000);
    run(64, true, 30_000);
}

#[test]
fn threads_flags() {
    run(4, false, 30_000);
    run(64, false, 30_000);
}

#[test]
fn threads_across_index_wrap() {
    run(16, true, 70_000);
}
