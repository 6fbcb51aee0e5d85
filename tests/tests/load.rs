//! Load: one datapath serves 64 devices with traffic on all of them for a minute
//! (`VMDEV_LOAD_SECONDS`, default 60) while other devices are started, driven and stopped in
//! a loop. No frame is lost on the devices that stay up, and neither daemon leaks fds,
//! threads or memory (compared through /proc before and after).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmdev_tests::{frame_seq, make_frame, wait_until, Daemons};
use vmdev_tools::{NetDriver, NetDriverConfig};

const STAYING: usize = 63;

/// fds, threads and resident KiB of a process.
fn usage(pid: u32) -> (usize, usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (fds, field("Threads:") as usize, field("VmRSS:"))
}

/// Sends and receives on every driver, checking each device's sequence.
fn round(drivers: &mut [(NetDriver, u64, u64)], buf: &mut Vec<u8>) {
    for (d, sent, got) in drivers.iter_mut() {
        let mac = d.mac();
        let mut q = 0;
        while q < 8 && *sent - *got < 64 {
            if !d
                .queue_frame(&make_frame(mac, *sent, 60 + (*sent as usize % 200)))
                .unwrap()
            {
                break;
            }
            *sent += 1;
            q += 1;
        }
        d.flush().unwrap();
        while d.recv_into(buf).unwrap() {
            assert_eq!(
                frame_seq(buf),
                Some(*got),
                "a staying device lost or reordered a frame"
            );
            *got += 1;
        }
    }
}

#[test]
fn sixty_four_devices_for_a_minute_with_churn_leak_nothing() {
    let seconds: u64 = std::env::var("VMDEV_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let mut c = d.client();
    let dp_pid = c.list_types().unwrap()[0].pid;
    let ctl_pid = d.control_pid();

    let mut staying: Vec<(NetDriver, u64, u64)> = (0..STAYING)
        .map(|_| {
            let u = d.start_device("dp0", &["queue-size=64"]);
            (
                NetDriver::open(&d.run_dir, u, NetDriverConfig::default()).unwrap(),
                0,
                0,
            )
        })
        .collect();

    // Churn: the 64th slot, whose device comes and goes.
    let stop = Arc::new(AtomicBool::new(false));
    let cycles = Arc::new(AtomicU64::new(0));
    let run_dir = d.run_dir.clone();
    let churn = {
        let (stop, cycles) = (Arc::clone(&stop), Arc::clone(&cycles));
        std::thread::spawn(move || {
            let mut mgmt = vmdev_tools::TransportClient::connect(&run_dir).unwrap();
            let mut buf = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let attrs = vec![("queue-size".to_string(), "64".to_string())];
                let u = mgmt
                    .start_device("dp0", "net-loopback", None, attrs, None)
                    .unwrap();
                let mut drv = NetDriver::open(&run_dir, u, NetDriverConfig::default()).unwrap();
                let mac = drv.mac();
                for seq in 0..20 {
                    assert!(drv.send(&make_frame(mac, seq, 100)).unwrap());
                    wait_until("churn frame", Duration::from_secs(20), || {
                        drv.recv_into(&mut buf).unwrap()
                    });
                }
                drop(drv);
                mgmt.stop_device(u).unwrap();
                cycles.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let mut buf = Vec::new();
    // Warm-up, then the baseline.
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_secs(2) {
        round(&mut staying, &mut buf);
    }
    let before = (usage(ctl_pid), usage(dp_pid));
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(seconds) {
        round(&mut staying, &mut buf);
    }
    stop.store(true, Ordering::Release);
    churn.join().unwrap();
    // Drain what is in flight (receiving only: nothing new is sent).
    wait_until("in-flight frames", Duration::from_secs(20), || {
        for (d, _, got) in staying.iter_mut() {
            while d.recv_into(&mut buf).unwrap() {
                assert_eq!(
                    frame_seq(&buf),
                    Some(*got),
                    "a staying device lost or reordered a frame"
                );
                *got += 1;
            }
        }
        staying.iter().all(|(_, s, g)| s == g)
    });
    // Let the churn's last connection be released (its thread ends), then compare.
    wait_until("the churn's devices gone", Duration::from_secs(20), || {
        c.list_devices().unwrap().len() == STAYING
    });
    let settled = || (usage(ctl_pid), usage(dp_pid));
    let mut after = settled();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (after.0 .0 > before.0 .0 || after.0 .1 > before.0 .1) && Instant::now() < deadline {
        std::thread::yield_now();
        after = settled();
    }
    let total: u64 = staying.iter().map(|(_, _, g)| g).sum();
    let n = cycles.load(Ordering::Relaxed);
    eprintln!(
        "load: {STAYING} devices, {total} frames in {seconds} s, {n} start/stop cycles; control (fds, threads, KiB) {:?} -> {:?}; datapath {:?} -> {:?}",
        before.0, after.0, before.1, after.1
    );
    assert!(n >= 10, "the churn ran only {n} cycles");
    for (name, b, a) in [
        ("vmdev-control", before.0, after.0),
        ("vmdev-datapath", before.1, after.1),
    ] {
        // The baseline may include the churning device (taken mid-cycle): no growth allowed.
        assert!(a.0 <= b.0, "{name} fds leaked: {} -> {}", b.0, a.0);
        assert!(a.1 <= b.1, "{name} threads leaked: {} -> {}", b.1, a.1);
        assert!(
            a.2 < b.2 + 16 * 1024,
            "{name} memory grew from {} to {} KiB",
            b.2,
            a.2
        );
    }
}
