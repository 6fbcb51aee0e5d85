//! Notification suppression (virtio 1.x §2.7.7, §2.7.10): flags without EVENT_IDX,
//! avail_event / used_event with it, and the "re-check after enabling" contract that keeps
//! either side from going to sleep on work it has not seen.

mod common;

use common::*;
use proptest::prelude::*;
use vmdev_shm_ring::split::{need_event, Segment, AVAIL_F_NO_INTERRUPT, USED_F_NO_NOTIFY};
use vmdev_shm_ring::{Chain, DeviceQueue, DriverQueue, GuestAddr};

fn seg(rig: &Rig) -> Segment {
    Segment {
        addr: GuestAddr(rig.data),
        len: 16,
        writable: true,
    }
}

fn add_publish(rig: &Rig, drv: &mut DriverQueue, n: usize) -> Vec<u16> {
    let heads = (0..n).map(|_| drv.add(&[seg(rig)]).unwrap()).collect();
    drv.publish();
    heads
}

/// Device pops everything available and completes it; returns how many.
fn serve(dev: &mut DeviceQueue) -> usize {
    let mut c = Chain::new();
    let mut n = 0;
    while dev.pop(&mut c).unwrap() {
        dev.add_used(c.head(), 0);
        n += 1;
    }
    dev.publish_used();
    n
}

fn reap(drv: &mut DriverQueue) -> usize {
    let mut n = 0;
    while drv.pop_used().unwrap().is_some() {
        n += 1;
    }
    n
}

#[test]
fn need_event_matches_spec_examples() {
    // event in [old, new) modulo 2^16.
    assert!(need_event(0, 1, 0));
    assert!(!need_event(1, 1, 0));
    assert!(need_event(5, 10, 3));
    assert!(!need_event(2, 10, 3));
    assert!(!need_event(10, 10, 3));
    assert!(!need_event(7, 7, 7), "nothing new, no event");
    assert!(need_event(0xffff, 2, 0xfffe), "wraps");
    assert!(need_event(1, 2, 0xfffe), "wraps");
    assert!(!need_event(2, 2, 0xfffe));
    assert!(!need_event(0xfffd, 2, 0xfffe));
}

proptest! {
    /// `need_event` is exactly "event lies in the half-open window [old, new)", mod 2^16.
    #[test]
    fn need_event_is_window_membership(event in any::<u16>(), old in any::<u16>(), delta in any::<u16>()) {
        let new = old.wrapping_add(delta);
        let in_window = (event.wrapping_sub(old) as u32) < delta as u32;
        prop_assert_eq!(need_event(event, new, old), in_window);
    }
}

/// Without EVENT_IDX: USED_F_NO_NOTIFY governs kicks.
#[test]
fn kick_flags_without_event_idx() {
    let rig = Rig::new(8);
    let mut drv = rig.driver(NO_FEATURES);
    let mut dev = rig.device(NO_FEATURES);
    assert_eq!(rig.used_flags(), 0);
    add_publish(&rig, &mut drv, 1);
    assert!(drv.needs_kick(), "a fresh ring wants kicks");

    dev.disable_notifications();
    assert_eq!(rig.used_flags(), USED_F_NO_NOTIFY);
    add_publish(&rig, &mut drv, 1);
    assert!(!drv.needs_kick(), "the device is polling");
    add_publish(&rig, &mut drv, 2);
    assert!(!drv.needs_kick());

    // Work arrived while notifications were off: enabling says so.
    assert!(dev.enable_notifications().unwrap());
    assert_eq!(rig.used_flags(), 0);
    assert_eq!(serve(&mut dev), 4);
    assert!(
        !dev.enable_notifications().unwrap(),
        "ring drained: safe to sleep"
    );
    add_publish(&rig, &mut drv, 1);
    assert!(drv.needs_kick());
    assert!(drv.needs_kick(), "flags mode asks every time");
}

/// Without EVENT_IDX: AVAIL_F_NO_INTERRUPT governs interrupts.
#[test]
fn interrupt_flags_without_event_idx() {
    let rig = Rig::new(8);
    let mut drv = rig.driver(NO_FEATURES);
    let mut dev = rig.device(NO_FEATURES);
    add_publish(&rig, &mut drv, 3);
    let mut c = Chain::new();
    assert!(dev.pop(&mut c).unwrap());
    dev.add_used(c.head(), 0);
    dev.publish_used();
    assert!(
        dev.needs_notification(),
        "the driver wants interrupts by default"
    );

    drv.disable_interrupts();
    assert_eq!(rig.avail_flags(), AVAIL_F_NO_INTERRUPT);
    assert!(dev.pop(&mut c).unwrap());
    dev.add_used(c.head(), 0);
    dev.publish_used();
    assert!(!dev.needs_notification(), "the driver is polling");

    // Two used entries wait: enabling interrupts says so.
    assert!(drv.enable_interrupts());
    assert_eq!(rig.avail_flags(), 0);
    assert_eq!(reap(&mut drv), 2);
    assert!(!drv.enable_interrupts(), "nothing left: safe to sleep");
    assert!(dev.pop(&mut c).unwrap());
    dev.add_used(c.head(), 0);
    dev.publish_used();
    assert!(dev.needs_notification());
}

/// With EVENT_IDX: avail_event governs kicks; flags are not used.
#[test]
fn kicks_with_event_idx() {
    let rig = Rig::new(8);
    let mut drv = rig.driver(ALL_FEATURES);
    let mut dev = rig.device(ALL_FEATURES);
    add_publish(&rig, &mut drv, 1);
    assert!(drv.needs_kick(), "avail_event 0 is in [0, 1)");
    add_publish(&rig, &mut drv, 1);
    assert!(!drv.needs_kick(), "the device has not asked again");

    // disable_notifications leaves the flags alone under EVENT_IDX.
    dev.disable_notifications();
    assert_eq!(rig.used_flags(), 0);

    assert_eq!(serve(&mut dev), 2);
    assert!(!dev.enable_notifications().unwrap());
    assert_eq!(rig.avail_event(), 2, "kick me when avail passes 2");
    add_publish(&rig, &mut drv, 3);
    assert!(drv.needs_kick(), "one kick for the batch");
    assert!(!drv.needs_kick(), "nothing new");
    add_publish(&rig, &mut drv, 1);
    assert!(!drv.needs_kick(), "the device is busy with the batch");

    // Enabling while work is pending reports it and asks for a kick past it.
    assert!(dev.enable_notifications().unwrap());
    assert_eq!(rig.avail_event(), 2);
    assert_eq!(serve(&mut dev), 4);
    assert!(!dev.enable_notifications().unwrap());
    assert_eq!(rig.avail_event(), 6);
    reap(&mut drv);

    // A device may ask for a kick only after several more buffers.
    rig.set_avail_event(8);
    add_publish(&rig, &mut drv, 2); // avail idx 8: event 8 not yet in [6, 8)
    assert!(!drv.needs_kick());
    add_publish(&rig, &mut drv, 1); // 9: 8 in [8, 9)
    assert!(drv.needs_kick());
}

/// With EVENT_IDX: used_event governs interrupts.
#[test]
fn interrupts_with_event_idx() {
    let rig = Rig::new(8);
    let mut drv = rig.driver(ALL_FEATURES);
    let mut dev = rig.device(ALL_FEATURES);
    let mut c = Chain::new();
    add_publish(&rig, &mut drv, 6);
    let mut complete_one = |dev: &mut DeviceQueue| {
        assert!(dev.pop(&mut c).unwrap());
        dev.add_used(c.head(), 0);
        dev.publish_used();
    };

    complete_one(&mut dev);
    assert!(
        dev.needs_notification(),
        "the first notification is always sent"
    );
    assert!(!dev.needs_notification(), "nothing new since");
    complete_one(&mut dev);
    // used_event is still 0 (as the driver zeroed it): not in [1, 2).
    assert!(!dev.needs_notification());

    assert!(drv.enable_interrupts(), "two used entries already wait");
    assert_eq!(rig.used_event(), 0);
    assert_eq!(reap(&mut drv), 2);
    assert!(!drv.enable_interrupts());
    assert_eq!(rig.used_event(), 2);
    complete_one(&mut dev);
    assert!(dev.needs_notification(), "2 is in [2, 3)");
    complete_one(&mut dev);
    assert!(!dev.needs_notification(), "the driver has not re-armed");

    // Polling driver: used_event is parked behind last_used, so the device never fires.
    assert_eq!(reap(&mut drv), 2);
    drv.disable_interrupts();
    assert_eq!(rig.used_event(), 3);
    assert_eq!(rig.avail_flags(), 0, "EVENT_IDX does not use the flags");
    complete_one(&mut dev);
    assert!(!dev.needs_notification());
    complete_one(&mut dev);
    assert!(!dev.needs_notification());

    // A driver may ask to be told only after several more (like enable_cb_delayed).
    assert_eq!(reap(&mut drv), 2);
    add_publish(&rig, &mut drv, 4);
    rig.set_used_event(8);
    complete_one(&mut dev); // used idx 7: 8 not in [6, 7)
    assert!(!dev.needs_notification());
    complete_one(&mut dev); // 8: not in [7, 8)
    assert!(!dev.needs_notification());
    complete_one(&mut dev); // 9: 8 in [8, 9)
    assert!(dev.needs_notification());
}

/// A device that batched several used entries before asking still notifies when the
/// driver's used_event lies anywhere inside the batch.
#[test]
fn batched_used_with_event_idx() {
    let rig = Rig::new(16);
    let mut drv = rig.driver(ALL_FEATURES);
    let mut dev = rig.device(ALL_FEATURES);
    add_publish(&rig, &mut drv, 12);
    let mut c = Chain::new();
    assert!(dev.needs_notification()); // initial
    for used_event in [0u16, 3, 4, 8] {
        rig.set_used_event(used_event);
        for _ in 0..3 {
            assert!(dev.pop(&mut c).unwrap());
            dev.add_used(c.head(), 0);
        }
        dev.publish_used();
        let new = dev.next_used();
        let expect = (new - 3..new).contains(&used_event);
        assert_eq!(
            dev.needs_notification(),
            expect,
            "used_event {used_event}, batch up to {new}"
        );
    }
}

#[derive(Debug, Clone, Copy)]
enum Step {
    /// The driver adds and publishes n chains, kicking if asked.
    DriverAdd(u8),
    /// The device, if awake or kicked, polls: serves everything with kicks disabled and
    /// interrupts the driver if asked.
    DeviceServe,
    /// The device, if awake, re-enables kicks and sleeps unless work arrived meanwhile.
    DeviceTrySleep,
    /// The driver, if awake or interrupted, polls: reaps everything with interrupts off.
    DriverReap,
    /// The driver, if awake, re-enables interrupts and sleeps unless used buffers wait.
    DriverTrySleep,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u8..5).prop_map(Step::DriverAdd),
        Just(Step::DeviceServe),
        Just(Step::DeviceTrySleep),
        Just(Step::DriverReap),
        Just(Step::DriverTrySleep),
    ]
}

/// Runs the two sides as a sleeping/polling pair; panics on a lost wake-up. Returns how
/// often each side found work when it tried to sleep (to show that path is exercised).
fn no_lost_wakeups(size: u16, event_idx: bool, steps: &[Step]) -> (u32, u32, u64) {
    let rig = Rig::new(size);
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
            Step::DriverAdd(n) => {
                for _ in 0..n {
                    if drv.add(&[seg(&rig)]).is_some() {
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
                    dev.add_used(c.head(), 0);
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
                        assert!(published > popped, "enable_notifications saw phantom work");
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
                        assert!(used > reaped, "enable_interrupts saw phantom used entries");
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
            "driver asleep with {} used chains waiting and no interrupt ({s:?})",
            used - reaped
        );
    }
    (dev_rechecks, drv_rechecks, published)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Whatever the interleaving, neither side sleeps on work the other has published
    /// without being notified of it, in both suppression modes.
    #[test]
    fn suppression_never_loses_a_wakeup(
        size_log in 0u32..=4,
        event_idx in any::<bool>(),
        steps in proptest::collection::vec(step(), 1..200),
    ) {
        no_lost_wakeups(1 << size_log, event_idx, &steps);
    }
}

/// The same across 16-bit index wrap-around (event indices compare modulo 2^16).
#[test]
fn suppression_across_index_wrap() {
    let mut rng = common::Rng::new(5);
    for event_idx in [true, false] {
        let steps: Vec<Step> = (0..400_000)
            .map(|_| match rng.below(5) {
                0 => Step::DriverAdd(rng.range(1, 4) as u8),
                1 => Step::DeviceServe,
                2 => Step::DeviceTrySleep,
                3 => Step::DriverReap,
                _ => Step::DriverTrySleep,
            })
            .collect();
        let (dev_rechecks, drv_rechecks, published) = no_lost_wakeups(4, event_idx, &steps);
        assert!(dev_rechecks > 100 && drv_rechecks > 100);
        assert!(
            published > 65_536,
            "only {published} chains: the indices did not wrap"
        );
    }
}

/// With EVENT_IDX, a driver that polls (re-parking used_event behind last_used each time)
/// gets no interrupts, even past an index wrap. A device that polls without re-arming
/// leaves avail_event where it was; the driver passes that stale value again once the
/// avail index has gone round, so at most one kick per 2^16 buffers.
#[test]
fn event_idx_suppression_holds_across_wrap() {
    let rig = Rig::new(4);
    let mut drv = rig.driver(ALL_FEATURES);
    let mut dev = rig.device(ALL_FEATURES);
    add_publish(&rig, &mut drv, 1);
    assert!(drv.needs_kick());
    serve(&mut dev);
    assert!(dev.needs_notification());
    drv.disable_interrupts();
    let (mut kicks, mut irqs) = (0, 0);
    for _ in 0..70_000 {
        add_publish(&rig, &mut drv, 1);
        kicks += drv.needs_kick() as u32;
        serve(&mut dev);
        irqs += dev.needs_notification() as u32;
        reap(&mut drv);
        drv.disable_interrupts();
    }
    assert_eq!(irqs, 0);
    // A device that parked avail_event (as the driver parks used_event) would get none.
    assert!(
        kicks <= 1,
        "{kicks} kicks: only when avail idx passes the stale avail_event"
    );
}
