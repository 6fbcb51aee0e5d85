//! Dirty-page logging is complete and precise: with traffic running, every page the device
//! changed (used rings, RX buffers) has its bit set, and pages it only read (TX buffers)
//! do not; it keeps logging across a migration.

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::time::Duration;
use vmdev_shm_ring::dirty::{bitmap_len, DIRTY_PAGE};
use vmdev_shm_ring::{create_sealed_memfd, GuestAddr};
use vmdev_tests::{frame_seq, make_frame, wait_until, Daemons};
use vmdev_tools::net_driver::GUEST_BASE;
use vmdev_tools::{NetDriver, NetDriverConfig};

fn traffic(drv: &mut NetDriver, from: u64, n: u64) {
    let mut buf = Vec::new();
    for seq in from..from + n {
        let f = make_frame(drv.mac(), seq, 60 + (seq as usize * 37) % 1450);
        assert!(drv.send(&f).unwrap());
        wait_until("frame", Duration::from_secs(20), || {
            drv.recv_into(&mut buf).unwrap()
        });
        assert_eq!(frame_seq(&buf), Some(seq));
    }
}

fn read_mem(drv: &NetDriver, addr: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    drv.memory().read(GuestAddr(addr), &mut v).unwrap();
    v
}

#[test]
fn dirty_log_marks_every_page_the_device_writes_and_no_other() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    d.add_datapath("dp1");
    let uuid = d.start_device("dp0", &["queue-size=64"]);
    let mut drv = NetDriver::open(&d.run_dir, uuid, NetDriverConfig::default()).unwrap();
    traffic(&mut drv, 0, 100);

    let len = bitmap_len(drv.memory().region_sizes());
    let bitmap = create_sealed_memfd("dirty", len).unwrap();

    let (rx, rx_len) = drv.rx_area();
    let (tx, tx_len) = drv.tx_area();
    let used: Vec<(u64, u64)> = (0..2)
        .map(|q| drv.ring_addrs(q).unwrap())
        .map(|r| (r.device, 6 + 8 * r.size as u64))
        .collect();
    let watched: Vec<(u64, u64)> = std::iter::once((rx, rx_len))
        .chain(used.iter().copied())
        .collect();
    let before: Vec<Vec<u8>> = watched.iter().map(|&(a, l)| read_mem(&drv, a, l)).collect();

    drv.client().start_dirty_log(bitmap.as_fd()).unwrap();
    traffic(&mut drv, 100, 150);
    drv.client().migrate_device(uuid, "dp1").unwrap(); // logging follows the device
    traffic(&mut drv, 250, 150);
    drv.client().stop_dirty_log().unwrap();

    let read_bitmap = || {
        let mut v = vec![0u8; len as usize];
        std::fs::File::from(bitmap.try_clone().unwrap())
            .read_exact_at(&mut v, 0)
            .unwrap();
        v
    };
    let bits = read_bitmap();
    let bit = |addr: u64| {
        let b = (addr - GUEST_BASE) / DIRTY_PAGE;
        bits[(b / 8) as usize] & (1 << (b % 8)) != 0
    };
    let mut changed_pages = 0;
    for ((addr, len), old) in watched.iter().zip(&before) {
        let new = read_mem(&drv, *addr, *len);
        for (i, (o, n)) in old.iter().zip(&new).enumerate() {
            if o != n {
                let page = addr + i as u64;
                assert!(
                    bit(page),
                    "page of {page:#x} changed but is not marked dirty"
                );
                changed_pages += 1;
            }
        }
    }
    assert!(
        changed_pages > 0,
        "the traffic changed device-written memory"
    );
    let mut p = tx & !(DIRTY_PAGE - 1);
    while p < tx + tx_len {
        assert!(
            !bit(p),
            "TX page {p:#x} is only read by the device but marked dirty"
        );
        p += DIRTY_PAGE;
    }
    // Stopped: more traffic sets no new bits.
    let snapshot = bits.clone();
    traffic(&mut drv, 400, 50);
    assert_eq!(read_bitmap(), snapshot, "no marking after StopDirtyLog");
}
