//! A running device moves between two datapath processes while its driver keeps sending:
//! every frame arrives exactly once, in order, byte-identical, and the counters add up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vmdev_tests::{frame_seq, make_frame, wait_until, Daemons};
use vmdev_tools::{NetDriver, NetDriverConfig, TxLayout};

const FRAMES: u64 = 1_000_000;
const MOVES: u64 = 24;

#[test]
fn device_migrates_back_and_forth_under_load_without_losing_a_frame() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    d.add_datapath("dp1");
    let uuid = d.start_device("dp0", &[]);
    let cfg = NetDriverConfig {
        tx_layout: TxLayout::Mixed,
        ..Default::default()
    };
    let mut drv = NetDriver::open(&d.run_dir, uuid, cfg).expect("driver");

    // Migrations are paced by traffic progress: one every FRAMES / MOVES frames.
    let progress = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut c = d.client();
    let (p, fin) = (Arc::clone(&progress), Arc::clone(&done));
    let mover = std::thread::spawn(move || {
        let mut moves = 0u64;
        while moves < MOVES && !fin.load(Ordering::Acquire) {
            if p.load(Ordering::Acquire) >= moves * (FRAMES / MOVES) {
                let to = if moves.is_multiple_of(2) {
                    "dp1"
                } else {
                    "dp0"
                };
                c.migrate_device(uuid, to).expect("migrate");
                let dev = c
                    .list_devices()
                    .unwrap()
                    .into_iter()
                    .find(|x| x.uuid == uuid)
                    .unwrap();
                assert_eq!(dev.parent, to);
                assert!(dev.attached, "attached on {to} after the move");
                moves += 1;
            } else {
                std::thread::yield_now();
            }
        }
        moves
    });

    let mac = drv.mac();
    let window = drv.max_in_flight() as u64;
    let (mut sent, mut got) = (0u64, 0u64);
    let mut sizes = std::collections::VecDeque::new();
    let mut buf = Vec::new();
    let mut last = std::time::Instant::now();
    while got < FRAMES {
        while sent < FRAMES && sent - got < window {
            let len = 60 + ((sent * 7919) % 1455) as usize;
            if !drv.queue_frame(&make_frame(mac, sent, len)).unwrap() {
                break;
            }
            sizes.push_back(len);
            sent += 1;
        }
        drv.flush().unwrap();
        while drv.recv_into(&mut buf).unwrap() {
            let len = sizes
                .pop_front()
                .expect("a frame that was never sent came back");
            assert_eq!(frame_seq(&buf), Some(got), "lost, duplicated or reordered");
            assert!(buf == make_frame(mac, got, len), "frame {got} corrupted");
            got += 1;
            last = std::time::Instant::now();
        }
        progress.store(got, Ordering::Release);
        assert!(
            last.elapsed() < Duration::from_secs(20),
            "stalled at frame {got}"
        );
    }
    done.store(true, Ordering::Release);
    let moves = mover.join().unwrap();
    assert!(
        moves >= 20,
        "only {moves} migrations happened during the traffic"
    );
    assert_eq!(
        drv.status().unwrap() & vmdev_proto::virtio::status::NEEDS_RESET,
        0,
        "no reset seen"
    );

    let mut c = d.client();
    wait_until("stats", Duration::from_secs(5), || c.stats(uuid).is_ok());
    let s = c.stats(uuid).unwrap();
    assert_eq!(
        s.queues[1].packets, FRAMES,
        "tx counters add up across moves"
    );
    assert_eq!(
        s.queues[0].packets, FRAMES,
        "rx counters add up across moves"
    );
    assert_eq!(s.queues[0].drops + s.queues[1].drops, 0);
}
