//! The live-copy flow of a VM migration, run by the driver on itself: with frames in
//! flight, dirty logging on, copy all memory to a new memfd, re-copy dirty pages, suspend,
//! copy the last ones, move the device to the new memory. The new memory must equal the
//! old one exactly (dirty tracking missed nothing), and every frame comes back.

use std::sync::Arc;
use std::time::Duration;
use vmdev_shm_ring::GuestAddr;
use vmdev_tests::{frame_seq, make_frame, wait_until, Daemons};
use vmdev_tools::net_driver::GUEST_BASE;
use vmdev_tools::{NetDriver, NetDriverConfig};

#[test]
fn live_copy_with_frames_in_flight_loses_nothing() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let uuid = d.start_device("dp0", &[]);
    let mut drv = NetDriver::open(&d.run_dir, uuid, NetDriverConfig::default()).unwrap();
    let mac = drv.mac();
    let size = drv.memory().region_sizes()[0];
    let mut buf = Vec::new();
    let (mut sent, mut got) = (0u64, 0u64);
    for round in 0..5 {
        // Put a window of frames in flight, then copy while the device works on them.
        let window = drv.max_in_flight() as u64 - 8;
        while sent - got < window {
            assert!(drv
                .queue_frame(&make_frame(mac, sent, 60 + (sent as usize * 13) % 1450))
                .unwrap());
            sent += 1;
        }
        // Not flushed: live_copy publishes them once logging is on, so the device writes
        // RX buffers and used rings while the copy runs.
        let old = Arc::clone(drv.memory());
        let report = drv.live_copy(8, 2).unwrap();
        assert!(
            report.rounds[0] > 0 && !Arc::ptr_eq(&old, drv.memory()),
            "round {round}: {report:?}"
        );
        // Suspended on the new memory: it must be an exact copy of the old one.
        let (mut a, mut b) = (vec![0u8; size as usize], vec![0u8; size as usize]);
        old.read(GuestAddr(GUEST_BASE), &mut a).unwrap();
        drv.memory().read(GuestAddr(GUEST_BASE), &mut b).unwrap();
        let diff = a.iter().zip(&b).position(|(x, y)| x != y);
        assert_eq!(
            diff, None,
            "round {round}: the copy differs at offset {diff:?} ({report:?})"
        );
        drv.resume().unwrap();
        while got < sent {
            wait_until("frame after the copy", Duration::from_secs(20), || {
                drv.recv_into(&mut buf).unwrap()
            });
            assert_eq!(frame_seq(&buf), Some(got), "round {round}");
            assert_eq!(buf, make_frame(mac, got, 60 + (got as usize * 13) % 1450));
            got += 1;
        }
    }
    let s = d.client().stats(uuid).unwrap();
    assert_eq!((s.queues[0].packets, s.queues[1].packets), (sent, sent));
    assert_eq!(s.queues[0].drops + s.queues[1].drops, 0);
}
