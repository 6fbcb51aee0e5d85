//! End-to-end traffic through the real daemons.

use std::time::Duration;
use vmdev_tests::{frame_seq, make_frame, run_traffic, wait_until, Daemons};
use vmdev_tools::{NetDriver, NetDriverConfig, NotifyMode, TxLayout};

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
    let bytes = run_traffic(&mut drv, 0, 100_000, 42, None);
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
    let bytes = run_traffic(&mut drv, 0, 5_000, 7, None);
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
    let bytes = run_traffic(&mut drv, 0, 5_000, 9, None);
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
    // A 1514-byte frame and its header take 6 RX buffers of 256 bytes: the window says so.
    assert_eq!(drv.max_in_flight(), (256 - 32) / 6);
    let bytes = run_traffic(&mut drv, 0, 20_000, 11, None);
    check_counters(&d, &drv, 20_000, bytes);
}

/// `NetDriver::echo` (testpmd-style io forwarding): 16 frames of different sizes circulate
/// 300 times each, each received one sent straight back from its RX buffer. They keep
/// their order and their bytes, and the device's counters add up.
#[test]
fn echo_sends_received_frames_back_unchanged_and_in_order() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let uuid = d.start_device("dp0", &[]);
    let mut drv = NetDriver::open(&d.run_dir, uuid, NetDriverConfig::default()).expect("driver");
    let mac = drv.mac();
    let size = |seq: u64| 60 + seq as usize * 90;
    for seq in 0..16 {
        assert!(drv
            .queue_frame(&make_frame(mac, seq, size(seq)))
            .expect("queue"));
    }
    drv.flush().expect("flush");
    let echoes = 16 * 300u64;
    let mut got = 0u64;
    let mut peek = [0u8; 22];
    let mut last = std::time::Instant::now();
    while got < echoes {
        while let Some(len) = drv.echo(&mut peek).expect("echo") {
            let seq = got % 16;
            assert_eq!(frame_seq(&peek), Some(seq), "frame {got} out of order");
            assert_eq!(len, size(seq), "frame {got} changed length");
            got += 1;
            last = std::time::Instant::now();
            if got == echoes {
                break;
            }
        }
        drv.flush().expect("flush");
        assert!(
            last.elapsed() < Duration::from_secs(20),
            "no progress at {got}"
        );
    }
    // The last 16 come back once more, byte for byte what was first sent.
    let mut buf = Vec::new();
    for i in 0..16 {
        wait_until("an echoed frame", Duration::from_secs(20), || {
            drv.recv_into(&mut buf).expect("recv")
        });
        assert!(buf == make_frame(mac, i, size(i)), "frame {i} corrupted");
    }
    let s = d.client().stats(uuid).expect("stats");
    assert_eq!(s.queues[1].packets, 16 + echoes, "tx packets");
    assert_eq!(s.queues[0].packets, 16 + echoes, "rx packets");
    assert_eq!(s.queues[0].drops + s.queues[1].drops, 0, "drops");
}

/// `echo` lends whole RX buffers to TX: with buffers smaller than a frame it refuses,
/// clearly, before taking anything.
#[test]
fn echo_refuses_rx_buffers_smaller_than_a_frame() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let uuid = d.start_device("dp0", &[]);
    let cfg = NetDriverConfig {
        mrg_rxbuf: true,
        rx_buffer_size: 256,
        ..Default::default()
    };
    let mut drv = NetDriver::open(&d.run_dir, uuid, cfg).expect("driver");
    let err = drv.echo(&mut [0u8; 22]).expect_err("refused");
    assert!(err.to_string().contains("whole frame"), "{err}");
    run_traffic(&mut drv, 0, 100, 5, None);
}
