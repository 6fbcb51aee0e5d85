//! vmdev's own driver on packed virtqueues (VIRTIO_F_RING_PACKED) through the real daemons:
//! every TX layout at odd queue sizes, interrupts with and without EVENT_IDX, migration
//! between datapaths under traffic, the vhost-user front end against vmdev's door, packed
//! and split devices side by side, save/restore with `reattach` and `live_copy`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmdev_proto::transport::VqState;
use vmdev_proto::virtio::features as f;
use vmdev_proto::Uuid;
use vmdev_tests::{frame_seq, make_frame, run_traffic, wait_until, Daemons};
use vmdev_tools::{NetDriver, NetDriverConfig, NotifyMode, TxLayout, VhostUserNetDriver};

/// The features the driver of device `uuid` accepted, as the control plane lists them.
fn driver_features(d: &Daemons, uuid: Uuid) -> u64 {
    d.client()
        .list_devices()
        .expect("list devices")
        .into_iter()
        .find(|x| x.uuid == uuid)
        .expect("the device is listed")
        .driver_features
}

/// Checks the device's counters: `n` frames and `bytes` bytes each way, no drops.
fn check_counters(d: &Daemons, uuid: Uuid, n: u64, bytes: u64) {
    let mut c = d.client();
    let s = c.stats(uuid).expect("stats");
    assert_eq!(s.queues[1].packets, n, "tx packets");
    assert_eq!(s.queues[0].packets, n, "rx packets");
    assert_eq!(s.queues[1].bytes, bytes, "tx bytes");
    assert_eq!(s.queues[0].bytes, bytes, "rx bytes");
    assert_eq!(s.queues[0].drops + s.queues[1].drops, 0, "drops");
}

/// 100,000 frames through a packed device over the vmdev protocol with `layout`, at queue
/// size `size` (chosen by the driver: the `queue-size` attribute takes powers of two only).
fn hundred_thousand_frames(layout: TxLayout, size: u16, seed: u64) {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let uuid = d.start_device("dp0", &[]);
    let cfg = NetDriverConfig {
        packed: true,
        queue_size: size,
        tx_layout: layout,
        ..Default::default()
    };
    let mut drv = NetDriver::open(&d.run_dir, uuid, cfg).expect("driver");
    assert!(drv.packed(), "the driver runs packed rings");
    assert_ne!(drv.features() & f::RING_PACKED, 0);
    assert_ne!(
        driver_features(&d, uuid) & f::RING_PACKED,
        0,
        "the device negotiated RING_PACKED"
    );
    assert_eq!(drv.ring_addrs(0).map(|r| r.size), Some(size));
    assert_eq!(drv.ring_addrs(1).map(|r| r.size), Some(size));
    if layout != TxLayout::Contiguous {
        assert_ne!(drv.features() & f::RING_INDIRECT_DESC, 0);
    }
    let bytes = run_traffic(&mut drv, 0, 100_000, seed, None);
    check_counters(&d, uuid, 100_000, bytes);
}

#[test]
fn packed_contiguous_hundred_thousand_frames_at_queue_size_100() {
    hundred_thousand_frames(TxLayout::Contiguous, 100, 1);
}

#[test]
fn packed_header_split_hundred_thousand_frames_at_queue_size_77() {
    hundred_thousand_frames(TxLayout::HeaderSplit, 77, 2);
}

#[test]
fn packed_indirect_hundred_thousand_frames_at_queue_size_129() {
    hundred_thousand_frames(TxLayout::Indirect, 129, 3);
}

#[test]
fn packed_mixed_hundred_thousand_frames_at_queue_size_255() {
    hundred_thousand_frames(TxLayout::Mixed, 255, 4);
}

#[test]
fn packed_tiny_odd_ring_wraps_constantly() {
    // Three descriptors: header-split chains straddle the ring's end every other frame.
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let uuid = d.start_device("dp0", &[]);
    let cfg = NetDriverConfig {
        packed: true,
        queue_size: 3,
        tx_layout: TxLayout::Mixed,
        ..Default::default()
    };
    let mut drv = NetDriver::open(&d.run_dir, uuid, cfg).expect("driver");
    assert!(drv.packed());
    let bytes = run_traffic(&mut drv, 0, 20_000, 5, None);
    check_counters(&d, uuid, 20_000, bytes);
}

/// Packed traffic in interrupt mode on a datapath that sleeps at once (no spinning).
fn interrupts(event_idx: bool, indirect: bool, seed: u64) {
    let mut d = Daemons::start();
    d.add_datapath_with("dp0", &["--spin-us", "0"]);
    let uuid = d.start_device("dp0", &[]);
    let cfg = NetDriverConfig {
        packed: true,
        queue_size: 100,
        mode: NotifyMode::Interrupt,
        event_idx,
        indirect,
        tx_layout: TxLayout::Mixed,
        ..Default::default()
    };
    let mut drv = NetDriver::open(&d.run_dir, uuid, cfg).expect("driver");
    assert!(drv.packed());
    assert_eq!(drv.features() & f::RING_EVENT_IDX != 0, event_idx);
    let negotiated = driver_features(&d, uuid);
    assert_ne!(negotiated & f::RING_PACKED, 0);
    assert_eq!(negotiated & f::RING_EVENT_IDX != 0, event_idx);
    let bytes = run_traffic(&mut drv, 0, 10_000, seed, None);
    check_counters(&d, uuid, 10_000, bytes);
    let s = d.client().stats(uuid).expect("stats");
    assert!(s.queues[1].kicks > 0, "the datapath slept and was kicked");
    assert!(s.queues[0].calls > 0, "the driver was interrupted");
}

#[test]
fn packed_interrupt_mode_with_event_idx() {
    interrupts(true, true, 6);
}

#[test]
fn packed_interrupt_mode_without_event_idx_or_indirect() {
    interrupts(false, false, 7);
}

#[test]
fn packed_device_migrates_ten_times_under_traffic_without_losing_a_frame() {
    const FRAMES: u64 = 200_000;
    const MOVES: u64 = 10;
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    d.add_datapath("dp1");
    let uuid = d.start_device("dp0", &[]);
    let cfg = NetDriverConfig {
        packed: true,
        queue_size: 251,
        tx_layout: TxLayout::Mixed,
        ..Default::default()
    };
    let mut drv = NetDriver::open(&d.run_dir, uuid, cfg).expect("driver");
    assert!(drv.packed());

    // Migrations are paced by traffic progress: one every FRAMES / (MOVES + 1) frames.
    let progress = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut c = d.client();
    let (p, fin) = (Arc::clone(&progress), Arc::clone(&done));
    let mover = std::thread::spawn(move || {
        let mut moves = 0u64;
        while moves < MOVES && !fin.load(Ordering::Acquire) {
            if p.load(Ordering::Acquire) >= (moves + 1) * (FRAMES / (MOVES + 1)) {
                let to = if moves.is_multiple_of(2) {
                    "dp1"
                } else {
                    "dp0"
                };
                c.migrate_device(uuid, to).expect("migrate");
                let dev = c
                    .list_devices()
                    .expect("list")
                    .into_iter()
                    .find(|x| x.uuid == uuid)
                    .expect("listed");
                assert_eq!(dev.parent, to);
                assert!(dev.attached, "attached on {to} after the move");
                assert_ne!(dev.driver_features & f::RING_PACKED, 0);
                moves += 1;
            } else {
                std::thread::yield_now();
            }
        }
        moves
    });
    let bytes = run_traffic(&mut drv, 0, FRAMES, 8, Some(&progress));
    done.store(true, Ordering::Release);
    let moves = mover.join().expect("mover");
    assert_eq!(moves, MOVES, "every migration happened during the traffic");
    assert_eq!(
        drv.status().expect("status") & vmdev_proto::virtio::status::NEEDS_RESET,
        0,
        "no reset seen"
    );
    let mut c = d.client();
    wait_until("stats", Duration::from_secs(5), || c.stats(uuid).is_ok());
    check_counters(&d, uuid, FRAMES, bytes);
}

#[test]
fn packed_over_the_vhost_user_front_end_against_vmdevs_door() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let sock = d.run_dir.join("vu0.sock");
    let uuid = d.start_device_with("dp0", &[], Some(&sock));
    wait_until("the vhost-user socket", Duration::from_secs(10), || {
        sock.exists()
    });
    // An odd size: packed rings need not be powers of two, through the door too.
    let cfg = NetDriverConfig {
        packed: true,
        queue_size: 100,
        tx_layout: TxLayout::Mixed,
        ..Default::default()
    };
    let mut drv = VhostUserNetDriver::open_vhost_user(&sock, cfg).expect("vhost-user driver");
    assert!(drv.vhost_user().running(), "rings handed over at DRIVER_OK");
    assert!(drv.packed());
    assert_ne!(
        driver_features(&d, uuid) & f::RING_PACKED,
        0,
        "the door passed RING_PACKED to the device"
    );
    let bytes = run_traffic(&mut drv, 0, 50_000, 9, None);
    check_counters(&d, uuid, 50_000, bytes);

    // Interrupt mode through the door as well, on a fresh connection.
    drop(drv);
    let mut c = d.client();
    wait_until("the device to be released", Duration::from_secs(20), || {
        c.list_devices()
            .expect("list")
            .iter()
            .any(|x| x.uuid == uuid && !x.claimed && !x.attached)
    });
    let cfg = NetDriverConfig {
        mode: NotifyMode::Interrupt,
        ..cfg
    };
    let mut drv = VhostUserNetDriver::open_vhost_user(&sock, cfg).expect("vhost-user driver");
    assert!(drv.packed());
    run_traffic(&mut drv, 0, 5_000, 10, None);
}

#[test]
fn packed_and_split_devices_share_a_datapath() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let packed_uuid = d.start_device("dp0", &[]);
    let split_uuid = d.start_device("dp0", &["queue-size=128"]);
    let packed_cfg = NetDriverConfig {
        packed: true,
        queue_size: 200,
        tx_layout: TxLayout::Mixed,
        ..Default::default()
    };
    let split_cfg = NetDriverConfig {
        tx_layout: TxLayout::Mixed,
        ..Default::default()
    };
    let mut p = NetDriver::open(&d.run_dir, packed_uuid, packed_cfg).expect("packed driver");
    let mut s = NetDriver::open(&d.run_dir, split_uuid, split_cfg).expect("split driver");
    assert!(p.packed());
    assert!(!s.packed());
    assert_ne!(driver_features(&d, packed_uuid) & f::RING_PACKED, 0);
    assert_eq!(driver_features(&d, split_uuid) & f::RING_PACKED, 0);
    let t = std::thread::spawn(move || {
        let bytes = run_traffic(&mut p, 0, 50_000, 11, None);
        (p, bytes)
    });
    let split_bytes = run_traffic(&mut s, 0, 50_000, 12, None);
    let (_p, packed_bytes) = t.join().expect("packed traffic");
    check_counters(&d, packed_uuid, 50_000, packed_bytes);
    check_counters(&d, split_uuid, 50_000, split_bytes);
}

fn ctl_ok(d: &Daemons, args: &[&str]) {
    let out = d.vmdevctl(args);
    assert!(
        out.status.success(),
        "vmdevctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn packed_driver_reattaches_to_a_restored_device_at_its_ring_positions() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    d.add_datapath("dp1");
    let uuid = d.start_device("dp0", &["mac=52:54:00:12:34:56"]);
    let u = uuid.to_string();
    let cfg = NetDriverConfig {
        packed: true,
        queue_size: 100,
        tx_layout: TxLayout::Mixed,
        ..Default::default()
    };
    let mut drv = NetDriver::open(&d.run_dir, uuid, cfg).expect("driver");
    // 250 frames: both rings have wrapped twice (odd wrap counters) and stand mid-ring.
    run_traffic(&mut drv, 0, 250, 13, None);
    let file = d.run_dir.join("dev.json");
    let fname = file.to_str().expect("utf-8 path");
    ctl_ok(&d, &["save", "-u", &u, fname]);
    ctl_ok(&d, &["stop", "-u", &u]);
    assert!(
        drv.wait_config_signal(Duration::from_secs(20))
            .expect("poll"),
        "the driver hears that its device went away"
    );
    ctl_ok(&d, &["restore", fname, "-p", "dp1"]);
    drv.reattach(&d.run_dir, None).expect("reattach");
    assert!(drv.packed());
    match drv.client().queue_state(1).expect("queue state") {
        VqState::Packed {
            avail_index,
            used_index,
            ..
        } => {
            // TX: 250 chains of 1 or 2 descriptors; both positions agree (all used).
            assert_eq!(avail_index, used_index);
        }
        s => panic!("a packed device reports {s:?}"),
    }
    // Sequence numbers continue: a device that restarted its rings would not go on at 250.
    run_traffic(&mut drv, 250, 2_000, 14, None);
    assert_eq!(
        d.client().stats(uuid).expect("stats").queues[1].packets,
        2_250
    );
}

#[test]
fn packed_live_copy_with_frames_in_flight_loses_nothing() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let uuid = d.start_device("dp0", &[]);
    let cfg = NetDriverConfig {
        packed: true,
        queue_size: 120,
        tx_layout: TxLayout::Mixed,
        ..Default::default()
    };
    let mut drv = NetDriver::open(&d.run_dir, uuid, cfg).expect("driver");
    run_traffic(&mut drv, 0, 1_000, 15, None);
    let mac = drv.mac();
    // Queued, not flushed: live_copy publishes them while the device runs.
    for seq in 1_000..1_050 {
        assert!(drv
            .queue_frame(&make_frame(mac, seq, 600))
            .expect("queue frame"));
    }
    drv.live_copy(8, 2).expect("live copy");
    drv.resume().expect("resume");
    let mut buf = Vec::new();
    let mut seq = 1_000;
    let deadline = Instant::now() + Duration::from_secs(20);
    while seq < 1_050 {
        if drv.recv_into(&mut buf).expect("recv") {
            assert_eq!(frame_seq(&buf), Some(seq), "lost, duplicated or reordered");
            assert!(buf == make_frame(mac, seq, 600), "frame {seq} corrupted");
            seq += 1;
        } else {
            assert!(Instant::now() < deadline, "stalled at frame {seq}");
            drv.wait_rx(Duration::from_millis(100)).expect("wait");
        }
    }
    run_traffic(&mut drv, 1_050, 2_000, 16, None);
    let s = d.client().stats(uuid).expect("stats");
    assert_eq!(s.queues[1].packets, 3_050);
    assert_eq!(s.queues[0].drops + s.queues[1].drops, 0);
}
