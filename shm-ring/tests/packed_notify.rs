//! Packed-ring notification suppression (virtio 1.1+ §2.8.10, §2.8.14): the event
//! suppression structures' ENABLE / DISABLE / DESC modes, and the "re-check after enabling"
//! contract that keeps either side from sleeping on work it has not seen.

mod common;
mod packed_common;

use common::*;
use packed_common::*;
use proptest::prelude::*;
use vmdev_shm_ring::packed::{
    need_event, EVENT_F_DESC, EVENT_F_DISABLE, EVENT_F_ENABLE, EVENT_WRAP,
};
use vmdev_shm_ring::split::Segment;
use vmdev_shm_ring::{Chain, GuestAddr, PackedDeviceQueue, PackedDriverQueue};

fn seg(rig: &PackedRig) -> Segment {
    Segment {
        addr: GuestAddr(rig.data),
        len: 16,
        writable: true,
    }
}

/// Adds `n` chains of `len` descriptors each and publishes them.
fn add_publish(rig: &PackedRig, drv: &mut PackedDriverQueue, n: usize, len: usize) {
    for _ in 0..n {
        drv.add(&vec![seg(rig); len]).unwrap();
    }
    drv.publish();
}

fn serve(dev: &mut PackedDeviceQueue) -> usize {
    let mut c = Chain::new();
    let mut n = 0;
    while dev.pop(&mut c).unwrap() {
        dev.add_used(c.head(), 0).unwrap();
        n += 1;
    }
    dev.publish_used();
    n
}

fn complete_one(dev: &mut PackedDeviceQueue) {
    let mut c = Chain::new();
    assert!(dev.pop(&mut c).unwrap());
    dev.add_used(c.head(), 0).unwrap();
    dev.publish_used();
}

fn reap(drv: &mut PackedDriverQueue) -> usize {
    let mut n = 0;
    while drv.pop_used().unwrap().is_some() {
        n += 1;
    }
    n
}

fn ow(index: u16, wrap: bool) -> u16 {
    index | if wrap { EVENT_WRAP } else { 0 }
}

#[test]
fn need_event_examples() {
    // Ring of 8; the notifying side moved 3 descriptors, from (2, lap 1) to (5, lap 1).
    let new = ow(5, true);
    assert!(need_event(8, ow(2, true), new, 3));
    assert!(need_event(8, ow(4, true), new, 3));
    assert!(!need_event(8, ow(5, true), new, 3), "not yet reached");
    assert!(!need_event(8, ow(1, true), new, 3), "before the window");
    assert!(
        !need_event(8, ow(3, false), new, 3),
        "same offset, other lap"
    );
    assert!(!need_event(8, ow(3, true), new, 0), "nothing moved");
    // Across the end: from (6, lap 1) to (1, lap 2).
    let new = ow(1, false);
    for (e, want) in [
        (ow(6, true), true),
        (ow(7, true), true),
        (ow(0, false), true),
        (ow(1, false), false),
        (ow(0, true), false),
        (ow(6, false), false),
        (ow(5, true), false),
    ] {
        assert_eq!(need_event(8, e, new, 3), want, "event {e:#x}");
    }
    // Two full laps or more: any position was passed.
    assert!(need_event(8, ow(3, false), ow(5, true), 16));
    // A malformed offset asks for a notification rather than risk losing one.
    assert!(need_event(8, ow(8, true), ow(5, true), 1));
    assert!(need_event(8, 0x7fff, ow(5, true), 1));
}

proptest! {
    /// `need_event` against a model that walks the positions one by one.
    #[test]
    fn need_event_matches_a_walk(size in 1u16..=40, start in 0u32..80, count in 0u32..100,
                                 eoff in 0u16..40, ewrap in any::<bool>()) {
        let two = 2 * size as u32;
        let start = start % two;
        let enc = |lin: u32| {
            let lin = lin % two;
            if lin < size as u32 { ow(lin as u16, true) } else { ow((lin - size as u32) as u16, false) }
        };
        let new = enc(start + count);
        let event = ow(eoff % size, ewrap);
        let walked = (0..count).any(|k| enc(start + k) == event);
        prop_assert_eq!(need_event(size, event, new, count), walked);
    }
}

/// Without EVENT_IDX: the device event suppression flags govern kicks.
#[test]
fn kick_flags_without_event_idx() {
    let rig = PackedRig::new(5);
    let mut drv = rig.driver(NO_FEATURES);
    let mut dev = rig.device(NO_FEATURES);
    assert_eq!(rig.device_event(), (0, EVENT_F_ENABLE));
    add_publish(&rig, &mut drv, 1, 1);
    assert!(drv.needs_kick(), "a fresh ring wants kicks");

    dev.disable_notifications();
    assert_eq!(rig.device_event().1, EVENT_F_DISABLE);
    add_publish(&rig, &mut drv, 1, 2);
    assert!(!drv.needs_kick(), "the device is polling");

    assert!(
        dev.enable_notifications().unwrap(),
        "work arrived meanwhile"
    );
    assert_eq!(rig.device_event().1, EVENT_F_ENABLE);
    assert_eq!(serve(&mut dev), 2);
    assert!(
        !dev.enable_notifications().unwrap(),
        "drained: safe to sleep"
    );
    assert_eq!(reap(&mut drv), 2);
    add_publish(&rig, &mut drv, 1, 1);
    assert!(drv.needs_kick());
    assert!(drv.needs_kick(), "flags mode asks every time");
}

/// Without EVENT_IDX: the driver event suppression flags govern interrupts.
#[test]
fn interrupt_flags_without_event_idx() {
    let rig = PackedRig::new(5);
    let mut drv = rig.driver(NO_FEATURES);
    let mut dev = rig.device(NO_FEATURES);
    add_publish(&rig, &mut drv, 3, 1);
    complete_one(&mut dev);
    assert!(dev.needs_notification(), "interrupts wanted by default");
    drv.disable_interrupts();
    assert_eq!(rig.driver_event().1, EVENT_F_DISABLE);
    complete_one(&mut dev);
    assert!(!dev.needs_notification());
    assert!(drv.enable_interrupts(), "two used buffers wait");
    assert_eq!(rig.driver_event().1, EVENT_F_ENABLE);
    assert_eq!(reap(&mut drv), 2);
    assert!(!drv.enable_interrupts());
    complete_one(&mut dev);
    assert!(dev.needs_notification());
    // DESC without EVENT_IDX negotiated is not a mode this queue honours: notify.
    rig.set_driver_event(ow(0, true), EVENT_F_DESC);
    assert!(dev.needs_notification());
}

/// With EVENT_IDX: the device asks for a kick at its position; the driver kicks exactly
/// when it publishes the descriptor there, including multi-descriptor chains covering it
/// and positions across the ring's end.
#[test]
fn kicks_with_event_idx() {
    let rig = PackedRig::new(5);
    let mut drv = rig.driver(ALL_FEATURES);
    let mut dev = rig.device(ALL_FEATURES);
    assert!(!dev.enable_notifications().unwrap());
    assert_eq!(rig.device_event(), (ow(0, true), EVENT_F_DESC));
    add_publish(&rig, &mut drv, 1, 2); // positions 0, 1
    assert!(drv.needs_kick());
    add_publish(&rig, &mut drv, 1, 1); // 2: the device did not re-arm
    assert!(!drv.needs_kick());
    assert_eq!(serve(&mut dev), 2);
    assert!(!dev.enable_notifications().unwrap());
    assert_eq!(rig.device_event(), (ow(3, true), EVENT_F_DESC));
    assert_eq!(reap(&mut drv), 2);
    add_publish(&rig, &mut drv, 1, 3); // 3, 4, 0 (lap 2): covers 3
    assert!(drv.needs_kick());
    assert_eq!(serve(&mut dev), 1);
    assert!(!dev.enable_notifications().unwrap());
    assert_eq!(rig.device_event(), (ow(1, false), EVENT_F_DESC));
    assert_eq!(reap(&mut drv), 1);
    // A device asking further ahead (like enable_cb_delayed): (3, lap 2).
    rig.set_device_event(ow(3, false), EVENT_F_DESC);
    add_publish(&rig, &mut drv, 1, 2); // 1, 2
    assert!(!drv.needs_kick());
    add_publish(&rig, &mut drv, 1, 1); // 3
    assert!(drv.needs_kick());
    // The same offset in the other lap does not match.
    assert_eq!(serve(&mut dev), 2);
    assert_eq!(reap(&mut drv), 2);
    rig.set_device_event(ow(0, false), EVENT_F_DESC); // position 0 of lap 2: long past
    add_publish(&rig, &mut drv, 1, 1); // 4 (lap 2)
    assert!(!drv.needs_kick());
    // DISABLE wins over a matching offset.
    rig.set_device_event(ow(0, true), EVENT_F_DISABLE);
    add_publish(&rig, &mut drv, 1, 1); // 0 (lap 3, wrap 1)
    assert!(!drv.needs_kick());
}

/// With EVENT_IDX: the driver asks for an interrupt at its used position; the device
/// notifies exactly when its used writes pass it.
#[test]
fn interrupts_with_event_idx() {
    let rig = PackedRig::new(7);
    let mut drv = rig.driver(ALL_FEATURES);
    let mut dev = rig.device(ALL_FEATURES);
    add_publish(&rig, &mut drv, 5, 1);
    complete_one(&mut dev);
    assert!(
        dev.needs_notification(),
        "ENABLE by default (the driver zeroed the structure)"
    );
    drv.disable_interrupts();
    complete_one(&mut dev);
    assert!(!dev.needs_notification());
    assert!(drv.enable_interrupts(), "two used buffers wait");
    assert_eq!(rig.driver_event(), (ow(0, true), EVENT_F_DESC));
    assert_eq!(reap(&mut drv), 2);
    assert!(!drv.enable_interrupts());
    assert_eq!(rig.driver_event(), (ow(2, true), EVENT_F_DESC));
    complete_one(&mut dev);
    assert!(dev.needs_notification(), "2 written");
    complete_one(&mut dev);
    assert!(!dev.needs_notification(), "the driver has not re-armed");
    assert!(!dev.needs_notification(), "nothing new since");
    // The driver asks for notification only at (6, lap 1).
    assert_eq!(reap(&mut drv), 2);
    rig.set_driver_event(ow(6, true), EVENT_F_DESC);
    add_publish(&rig, &mut drv, 1, 3); // positions 5, 6, 0
    complete_one(&mut dev); // used at 4
    assert!(!dev.needs_notification());
    complete_one(&mut dev); // used at 5, skipping 5..8: passes 6
    assert!(
        dev.needs_notification(),
        "the event lies inside the chain's skip"
    );
}

/// A batch of used buffers notifies when the driver's event lies anywhere inside it.
#[test]
fn batched_used_with_event_idx() {
    let rig = PackedRig::new(13);
    let mut drv = rig.driver(ALL_FEATURES);
    let mut dev = rig.device(ALL_FEATURES);
    add_publish(&rig, &mut drv, 12, 1);
    let mut c = Chain::new();
    rig.set_driver_event(ow(0, true), EVENT_F_DESC);
    assert!(dev.needs_notification(), "the first check always notifies");
    for event in [0u16, 3, 4, 8] {
        rig.set_driver_event(ow(event, true), EVENT_F_DESC);
        let old = dev.state().used_index;
        for _ in 0..3 {
            assert!(dev.pop(&mut c).unwrap());
            dev.add_used(c.head(), 0).unwrap();
        }
        dev.publish_used();
        let expect = (old..old + 3).contains(&event);
        assert_eq!(
            dev.needs_notification(),
            expect,
            "event {event}, from {old}"
        );
    }
}

#[derive(Debug, Clone, Copy)]
enum Step {
    DriverAdd(u8, u8),
    DeviceServe,
    DeviceTrySleep,
    DriverReap,
    DriverTrySleep,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u8..5, 1u8..4).prop_map(|(n, l)| Step::DriverAdd(n, l)),
        Just(Step::DeviceServe),
        Just(Step::DeviceTrySleep),
        Just(Step::DriverReap),
        Just(Step::DriverTrySleep),
    ]
}

/// Runs the two sides as a sleeping/polling pair; panics on a lost wake-up.
fn no_lost_wakeups(size: u16, event_idx: bool, steps: &[Step]) -> (u32, u32, u64) {
    let rig = PackedRig::new(size);
    let f = features(event_idx, false);
    let mut drv = rig.driver(f);
    let mut dev = rig.device(f);
    let (mut dev_asleep, mut kicked) = (false, false);
    let (mut drv_asleep, mut interrupted) = (false, false);
    let (mut published, mut popped, mut used, mut reaped) = (0u64, 0u64, 0u64, 0u64);
    let (mut dev_rechecks, mut drv_rechecks) = (0, 0);
    let mut c = Chain::new();
    for &s in steps {
        match s {
            Step::DriverAdd(n, len) => {
                let segs = vec![seg(&rig); len.min(size as u8) as usize];
                for _ in 0..n {
                    if drv.add(&segs).is_some() {
                        published += 1;
                    }
                }
                drv.publish();
                if drv.needs_kick() {
                    kicked = true;
                }
            }
            Step::DeviceServe => {
                if dev_asleep && !kicked {
                    continue;
                }
                kicked = false;
                dev_asleep = false;
                dev.disable_notifications();
                while dev.pop(&mut c).unwrap() {
                    popped += 1;
                    dev.add_used(c.head(), 0).unwrap();
                    used += 1;
                }
                dev.publish_used();
                if dev.needs_notification() {
                    interrupted = true;
                }
            }
            Step::DeviceTrySleep => {
                if !dev_asleep {
                    if dev.enable_notifications().unwrap() {
                        assert!(published > popped, "phantom work");
                        dev_rechecks += 1;
                    } else {
                        dev_asleep = true;
                    }
                }
            }
            Step::DriverReap => {
                if drv_asleep && !interrupted {
                    continue;
                }
                interrupted = false;
                drv_asleep = false;
                drv.disable_interrupts();
                while drv.pop_used().unwrap().is_some() {
                    reaped += 1;
                }
            }
            Step::DriverTrySleep => {
                if !drv_asleep {
                    if drv.enable_interrupts() {
                        assert!(used > reaped, "phantom used buffers");
                        drv_rechecks += 1;
                    } else {
                        drv_asleep = true;
                    }
                }
            }
        }
        assert!(
            !(dev_asleep && !kicked && published > popped),
            "device asleep with {} chains waiting and no kick ({s:?})",
            published - popped
        );
        assert!(
            !(drv_asleep && !interrupted && used > reaped),
            "driver asleep with {} used buffers waiting and no interrupt ({s:?})",
            used - reaped
        );
    }
    (dev_rechecks, drv_rechecks, published)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever the interleaving, neither side sleeps on work the other published without
    /// being notified, in both suppression modes, for any queue size.
    #[test]
    fn suppression_never_loses_a_wakeup(
        size in 1u16..=17,
        event_idx in any::<bool>(),
        steps in proptest::collection::vec(step(), 1..200),
    ) {
        no_lost_wakeups(size, event_idx, &steps);
    }
}

/// The same over many laps of small odd rings (the wrap counters flip thousands of times).
#[test]
fn suppression_across_many_laps() {
    let mut rng = common::Rng::new(5);
    for size in [1u16, 3, 5, 7] {
        for event_idx in [true, false] {
            let steps: Vec<Step> = (0..60_000)
                .map(|_| match rng.below(5) {
                    0 => Step::DriverAdd(rng.range(1, 4) as u8, rng.range(1, 3) as u8),
                    1 => Step::DeviceServe,
                    2 => Step::DeviceTrySleep,
                    3 => Step::DriverReap,
                    _ => Step::DriverTrySleep,
                })
                .collect();
            let (dev_rechecks, drv_rechecks, published) = no_lost_wakeups(size, event_idx, &steps);
            assert!(dev_rechecks > 100 && drv_rechecks > 100);
            assert!(published > 6 * size as u64);
        }
    }
}

/// With EVENT_IDX, a polling pair (both sides disable and never re-arm) exchanges no
/// notifications at all over many laps.
#[test]
fn polling_pair_sends_no_notifications() {
    let rig = PackedRig::new(3);
    let mut drv = rig.driver(ALL_FEATURES);
    let mut dev = rig.device(ALL_FEATURES);
    dev.disable_notifications();
    drv.disable_interrupts();
    let (mut kicks, mut irqs) = (0, 0);
    for _ in 0..10_000 {
        add_publish(&rig, &mut drv, 1, 1);
        kicks += drv.needs_kick() as u32;
        serve(&mut dev);
        irqs += dev.needs_notification() as u32;
        reap(&mut drv);
    }
    assert_eq!((kicks, irqs), (0, 0));
}
