//! A datapath killed with SIGKILL in the middle of a sequence-numbered stream: the control
//! plane re-attaches its devices to another datapath (or to the same one restarted) at the
//! ring positions found in shared memory; the driver sees no reset; frames after the resume
//! arrive in order and exactly once; the frames lost in the crash equal the drop counter.
//! Resume times are printed (not asserted); `VMDEV_RECOVERY_KILLS` sets how many kills.

use std::time::{Duration, Instant};
use vmdev_proto::virtio::status as st;
use vmdev_tests::{frame_seq, make_frame, wait_until, Daemons};
use vmdev_tools::{NetDriver, NetDriverConfig};

/// Streams until `kills` datapath kills have each been followed by `after` received frames;
/// `kill` kills (and possibly restarts) the device's datapath. Returns resume times.
fn stream_through_kills(
    d: &mut Daemons,
    drv: &mut NetDriver,
    kills: usize,
    mut kill: impl FnMut(&mut Daemons, usize),
) -> (Vec<Duration>, u64, u64, u64) {
    let mac = drv.mac();
    let window = (drv.max_in_flight() as u64).min(128);
    let (mut sent, mut received, mut next, mut gap) = (0u64, 0u64, 0u64, 0u64);
    let mut buf = Vec::new();
    let mut resumes = Vec::new();
    let mut killed: Option<(Instant, u64)> = None;
    let mut last_progress = Instant::now();
    let mut done_kills = 0;
    loop {
        if killed.is_none() && received >= 5_000 * (done_kills as u64 + 1) {
            if done_kills == kills {
                break;
            }
            kill(d, done_kills);
            killed = Some((Instant::now(), sent));
            done_kills += 1;
        }
        while sent - received - gap < window {
            if !drv
                .queue_frame(&make_frame(mac, sent, 60 + (sent as usize % 500)))
                .unwrap()
            {
                break;
            }
            sent += 1;
        }
        drv.flush().unwrap();
        while drv.recv_into(&mut buf).unwrap() {
            let s = frame_seq(&buf).expect("a sequence number");
            assert!(
                s >= next,
                "frame {s} delivered twice or out of order (expected >= {next})"
            );
            assert!(
                buf == make_frame(mac, s, 60 + (s as usize % 500)),
                "frame {s} corrupted"
            );
            gap += s - next;
            next = s + 1;
            received += 1;
            last_progress = Instant::now();
            if let Some((t, at)) = killed {
                if s >= at {
                    resumes.push(t.elapsed());
                    killed = None;
                }
            }
        }
        assert!(
            last_progress.elapsed() < Duration::from_secs(30),
            "no frame for 30 s after kill {done_kills} (sent {sent}, received {received})"
        );
        assert_eq!(
            drv.status().unwrap() & st::NEEDS_RESET,
            0,
            "the driver saw a reset"
        );
    }
    // Drain: whatever was sent either came back or was lost in a crash.
    wait_until("in-flight frames", Duration::from_secs(20), || {
        while drv.recv_into(&mut buf).unwrap() {
            let s = frame_seq(&buf).unwrap();
            assert!(s >= next);
            gap += s - next;
            next = s + 1;
            received += 1;
        }
        next == sent
    });
    (resumes, sent, received, gap)
}

fn report(what: &str, resumes: &[Duration]) {
    let mut v: Vec<u128> = resumes.iter().map(|d| d.as_micros()).collect();
    v.sort();
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    eprintln!(
        "{what}: {} kills, resume p50 {} µs, p99 {} µs, max {} µs",
        v.len(),
        p(0.5),
        p(0.99),
        v[v.len() - 1]
    );
}

fn kills() -> usize {
    std::env::var("VMDEV_RECOVERY_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

#[test]
fn killed_datapath_devices_resume_on_another_datapath() {
    let mut d = Daemons::start();
    let n = kills();
    // Datapaths dp0, dp1; each kill takes down the one serving the device and starts a
    // replacement under a fresh name, so another one is always there to take over.
    d.add_datapath("dp0");
    d.add_datapath("dp1");
    let uuid = d.start_device("dp0", &[]);
    let mut drv = NetDriver::open(&d.run_dir, uuid, NetDriverConfig::default()).unwrap();
    let mut c = d.client();
    let (resumes, sent, received, gap) = stream_through_kills(&mut d, &mut drv, n, |d, k| {
        let mut c = d.client();
        let serving = c
            .list_devices()
            .unwrap()
            .into_iter()
            .find(|x| x.uuid == uuid)
            .unwrap()
            .parent;
        d.kill_datapath(&serving);
        d.add_datapath(&format!("dp{}", k + 2));
    });
    report("another datapath", &resumes);
    eprintln!("another datapath: sent {sent}, received {received}, lost in crashes {gap}");
    assert_eq!(resumes.len(), n);
    assert_eq!(received + gap, sent);
    let s = c.stats(uuid).unwrap();
    assert_eq!(
        s.queues[0].drops, gap,
        "the drop counter equals the frames missing from the stream"
    );
    let dev = c
        .list_devices()
        .unwrap()
        .into_iter()
        .find(|x| x.uuid == uuid)
        .unwrap();
    assert!(dev.attached);
}

#[test]
fn the_same_datapath_restarted_takes_its_devices_back() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let uuid = d.start_device("dp0", &[]);
    let mut drv = NetDriver::open(&d.run_dir, uuid, NetDriverConfig::default()).unwrap();
    let (resumes, sent, received, gap) = stream_through_kills(&mut d, &mut drv, 2, |d, _| {
        d.kill_datapath("dp0");
        d.add_datapath("dp0");
    });
    report("same datapath restarted", &resumes);
    eprintln!("same datapath restarted: sent {sent}, received {received}, lost in crashes {gap}");
    assert_eq!(received + gap, sent);
    let mut c = d.client();
    assert_eq!(c.stats(uuid).unwrap().queues[0].drops, gap);
    let dev = c
        .list_devices()
        .unwrap()
        .into_iter()
        .find(|x| x.uuid == uuid)
        .unwrap();
    assert_eq!(dev.parent, "dp0");
}
