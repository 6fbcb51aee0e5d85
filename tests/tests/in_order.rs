//! VIRTIO_F_IN_ORDER through the real daemons: the net-loopback offers it, and vmdev's own
//! driver negotiates it. On split rings the driver refuses any buffer the device returns
//! before one made available earlier (RingError::OutOfOrder); on packed rings the device
//! returns each run of TX buffers with one used descriptor and the driver hands them back
//! one by one. Mixed TX layouts, frames spread over several RX buffers, and frames dropped
//! for want of RX buffers.

use std::time::Duration;
use vmdev_proto::virtio::features as f;
use vmdev_tests::{frame_seq, make_frame, run_traffic, wait_until, Daemons};
use vmdev_tools::{NetDriver, NetDriverConfig, TxLayout};

fn in_order_traffic(packed: bool) {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let uuid = d.start_device("dp0", &[]);
    let cfg = NetDriverConfig {
        packed,
        in_order: true,
        mrg_rxbuf: true,
        rx_buffer_size: 256,
        tx_layout: TxLayout::Mixed,
        ..Default::default()
    };
    let mut drv = NetDriver::open(&d.run_dir, uuid, cfg).expect("driver");
    assert_ne!(drv.features() & f::IN_ORDER, 0, "IN_ORDER negotiated");
    assert_eq!(drv.packed(), packed);
    let bytes = run_traffic(&mut drv, 0, 20_000, 7, None);
    let s = d.client().stats(uuid).expect("stats");
    assert_eq!(s.queues[0].packets, 20_000, "rx packets");
    assert_eq!(s.queues[0].bytes, bytes, "rx bytes");
    assert_eq!(s.queues[0].drops + s.queues[1].drops, 0, "drops");
}

#[test]
fn split_ring_buffers_come_back_in_order_with_mixed_layouts_and_merged_rx() {
    in_order_traffic(false);
}

#[test]
fn packed_ring_buffers_come_back_in_order_with_mixed_layouts_and_merged_rx() {
    in_order_traffic(true);
}

/// A second ring's worth of frames finds no RX buffer and is dropped: their TX buffers
/// still come back in order (checked as the driver reaps them), and the frames that did
/// get through are received in order.
#[test]
fn frames_dropped_for_want_of_rx_buffers_still_complete_in_order() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let uuid = d.start_device("dp0", &["queue-size=64"]);
    let cfg = NetDriverConfig {
        in_order: true,
        ..Default::default()
    };
    let mut drv = NetDriver::open(&d.run_dir, uuid, cfg).expect("driver");
    assert_ne!(drv.features() & f::IN_ORDER, 0, "IN_ORDER negotiated");
    let mac = drv.mac();
    let tx_packets = |d: &Daemons| d.client().stats(uuid).expect("stats").queues[1].packets;
    let mut seq = 0u64;
    for round in 1..=2u64 {
        while seq < 64 * round {
            if !drv.queue_frame(&make_frame(mac, seq, 100)).expect("queue") {
                drv.flush().expect("flush");
                continue; // the TX ring is full until the device returns buffers
            }
            seq += 1;
        }
        drv.flush().expect("flush");
        wait_until(
            "the device took every frame",
            Duration::from_secs(20),
            || tx_packets(&d) == 64 * round,
        );
    }
    let s = d.client().stats(uuid).expect("stats");
    assert_eq!(s.queues[0].packets, 64, "one ring of RX buffers was filled");
    assert_eq!(s.queues[0].drops, 64, "the second ring's worth was dropped");
    let mut buf = Vec::new();
    for want in 0..64 {
        assert!(drv.recv_into(&mut buf).expect("in order"), "frame {want}");
        assert_eq!(frame_seq(&buf), Some(want));
    }
    assert!(!drv.recv_into(&mut buf).expect("in order"));
    // Reaping the dropped frames' TX buffers goes through the in-order check too, and the
    // device still works afterwards.
    run_traffic(&mut drv, 1000, 1000, 3, None);
}
