//! End-to-end traffic through the real daemons.

use std::time::Duration;
use vmdev_tests::{frame_seq, make_frame, Daemons};
use vmdev_tools::{NetDriver, NetDriverConfig, NotifyMode, TxLayout};

/// Sends `n` frames of pseudo-random sizes 60..=1514 with at most `max_in_flight` outstanding,
/// checks each one comes back byte-identical and in order; returns bytes of frame payload.
fn run_traffic(drv: &mut NetDriver, n: u64, seed: u64) -> u64 {
    let window = drv.max_in_flight() as u64;
    run_traffic_window(drv, n, seed, window)
}

/// [`run_traffic`] with at most `window` frames in flight.
fn run_traffic_window(drv: &mut NetDriver, n: u64, seed: u64, window: u64) -> u64 {
    let mac = drv.mac();
    let mut rng = seed | 1;
    let mut size_of = |_: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        60 + (rng % (1514 - 60 + 1)) as usize
    };
    let mut sizes = std::collections::VecDeque::new();
    let (mut sent, mut got, mut bytes) = (0u64, 0u64, 0u64);
    let mut buf = Vec::new();
    let mut last_progress = std::time::Instant::now();
    while got < n {
        let mut progressed = false;
        while sent < n && sent - got < window {
            let len = size_of(sent);
            if !drv
                .queue_frame(&make_frame(mac, sent, len))
                .expect("queue frame")
            {
                break;
            }
            sizes.push_back(len);
            sent += 1;
            progressed = true;
        }
        drv.flush().expect("flush");
        while drv.recv_into(&mut buf).expect("recv") {
            let len = sizes
                .pop_front()
                .expect("a frame came back that was never sent");
            let want = make_frame(mac, got, len);
            assert_eq!(frame_seq(&buf), Some(got), "frame out of order");
            assert!(
                buf == want,
                "frame {got} corrupted (len {} vs {})",
                buf.len(),
                want.len()
            );
            bytes += len as u64;
            got += 1;
            progressed = true;
        }
        if progressed {
            last_progress = std::time::Instant::now();
        } else {
            // Nothing moved: wait for the device (interrupt mode sleeps on the call eventfd).
            drv.wait_rx(Duration::from_millis(100)).expect("wait");
            assert!(
                last_progress.elapsed() < Duration::from_secs(20),
                "no progress for 20 s at frame {got} of {n} ({sent} sent)"
            );
        }
    }
    bytes
}

fn check_counters(d: &Daemons, drv: &NetDriver, n: u64, bytes: u64) {
    let out = d.vmdevctl(&["--json", "stats", "-u", &drv.uuid().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let q = |i: usize, k: &str| v["queues"][i][k].as_u64().unwrap();
    assert_eq!(q(1, "packets"), n, "tx packets");
    assert_eq!(q(0, "packets"), n, "rx packets");
    assert_eq!(q(1, "bytes"), bytes, "tx bytes");
    assert_eq!(q(0, "bytes"), bytes, "rx bytes");
    assert_eq!(q(0, "drops") + q(1, "drops"), 0, "drops");
}

#[test]
fn hundred_thousand_frames_come_back_in_order_and_counters_agree() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let uuid = d.start_device("dp0", &["queue-size=256"]);
    let cfg = NetDriverConfig {
        tx_layout: TxLayout::Mixed,
        ..Default::default()
    };
    let mut drv = NetDriver::open(&d.run_dir, uuid, cfg).expect("driver");
    let bytes = run_traffic(&mut drv, 100_000, 42);
    check_counters(&d, &drv, 100_000, bytes);
}

#[test]
fn interrupt_mode_without_event_idx_or_indirect_works() {
    let mut d = Daemons::start();
    d.add_datapath_with("dp0", &["--spin-us", "0"]);
    let uuid = d.start_device("dp0", &["queue-size=64"]);
    let cfg = NetDriverConfig {
        mode: NotifyMode::Interrupt,
        event_idx: false,
        indirect: false,
        tx_layout: TxLayout::Mixed,
        ..Default::default()
    };
    let mut drv = NetDriver::open(&d.run_dir, uuid, cfg).expect("driver");
    let bytes = run_traffic(&mut drv, 5_000, 7);
    check_counters(&d, &drv, 5_000, bytes);
    let v: serde_json::Value = serde_json::from_slice(
        &d.vmdevctl(&["--json", "stats", "-u", &uuid.to_string()])
            .stdout,
    )
    .unwrap();
    assert!(
        v["queues"][1]["kicks"].as_u64().unwrap() > 0,
        "the datapath slept and was woken by kicks"
    );
    assert!(
        v["queues"][0]["calls"].as_u64().unwrap() > 0,
        "the driver was interrupted"
    );
}

#[test]
fn interrupt_mode_with_event_idx_works() {
    let mut d = Daemons::start();
    d.add_datapath_with("dp0", &["--spin-us", "0"]);
    let uuid = d.start_device("dp0", &[]);
    let cfg = NetDriverConfig {
        mode: NotifyMode::Interrupt,
        ..Default::default()
    };
    let mut drv = NetDriver::open(&d.run_dir, uuid, cfg).expect("driver");
    let bytes = run_traffic(&mut drv, 5_000, 9);
    check_counters(&d, &drv, 5_000, bytes);
}

#[test]
fn frames_span_small_rx_buffers_with_mrg_rxbuf() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let uuid = d.start_device("dp0", &["queue-size=256"]);
    let cfg = NetDriverConfig {
        mrg_rxbuf: true,
        rx_buffer_size: 256,
        tx_layout: TxLayout::Mixed,
        ..Default::default()
    };
    let mut drv = NetDriver::open(&d.run_dir, uuid, cfg).expect("driver");
    assert_ne!(
        drv.features() & vmdev_proto::virtio::features::NET_F_MRG_RXBUF,
        0,
        "MRG_RXBUF negotiated"
    );
    // A 1514-byte frame takes up to 7 RX buffers of 256 bytes: keep the window small enough.
    let bytes = run_traffic_window(&mut drv, 20_000, 11, 24);
    check_counters(&d, &drv, 20_000, bytes);
}
