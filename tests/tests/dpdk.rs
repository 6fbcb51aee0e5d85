//! DPDK's virtio-user PMD (testpmd) drives a vmdev device through the vhost-user door —
//! a driver nobody here wrote — while vmdev's own driver uses a second device of the same
//! datapath through the vmdev protocol.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;
use vmdev_tests::{external_tool, frame_seq, make_frame, wait_until, Daemons};
use vmdev_tools::{NetDriver, NetDriverConfig};

static NEXT_PREFIX: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// An interactive testpmd with its output lines on a channel.
struct Testpmd {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Testpmd {
    fn start(
        path: &std::path::Path,
        sock: &std::path::Path,
        queues: u16,
        vdev_extra: &str,
    ) -> Testpmd {
        // Line-buffered, so answers to interactive commands arrive while it runs.
        let mut child = Command::new("stdbuf")
            .arg("-oL")
            .arg(path)
            .args([
                "-l",
                "0,1",
                "--main-lcore",
                "1",
                "--no-pci",
                "--no-huge",
                "-m",
                "1024",
            ])
            // One prefix per instance: tests of this file run in parallel.
            .arg(format!(
                "--file-prefix=vmdev-test-{}-{}",
                std::process::id(),
                NEXT_PREFIX.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ))
            .arg("--vdev")
            .arg(format!(
                "net_virtio_user0,path={},queues={queues}{vdev_extra}",
                sock.display()
            ))
            .args(["--", "-i", "--nb-cores=1", "--total-num-mbufs=16384"])
            .arg(format!("--rxq={queues}"))
            .arg(format!("--txq={queues}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dpdk-testpmd");
        let stdin = child.stdin.take().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Testpmd {
            child,
            stdin,
            lines,
        }
    }

    fn cmd(&mut self, c: &str) {
        writeln!(self.stdin, "{c}").expect("write to testpmd");
        self.stdin.flush().unwrap();
    }

    /// Reads lines until one contains `key`, returning the number after `key`.
    fn value_after(&mut self, key: &str) -> u64 {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(60))
                .expect("testpmd output");
            if let Some(rest) = line.split(key).nth(1) {
                if let Some(n) = rest.split_whitespace().next().and_then(|v| v.parse().ok()) {
                    return n;
                }
            }
        }
    }
}

/// testpmd counts a frame when it puts it in the ring and vmdev when it takes it out: waits
/// until vmdev took all `tx_total` (on its TX queues `tx_queues`) before testpmd leaves and
/// stops the rings. On a loaded machine the datapath may run late; a lost frame still
/// fails here.
fn wait_for_vmdev_to_take(d: &Daemons, uuid: &str, tx_queues: &[usize], tx_total: u64) {
    wait_until(
        "vmdev to take every frame testpmd sent",
        Duration::from_secs(20),
        || {
            let v = stats(d, uuid);
            let taken: u64 = tx_queues
                .iter()
                .map(|&i| v["queues"][i]["packets"].as_u64().unwrap_or(0))
                .sum();
            taken >= tx_total
        },
    );
}

fn stats(d: &Daemons, uuid: &str) -> serde_json::Value {
    let out = d.vmdevctl(&["--json", "stats", "-u", uuid]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn testpmd_virtio_user_loops_through_vmdev_while_vmdev_driver_uses_another_device() {
    let Some(testpmd) = external_tool("dpdk-testpmd") else {
        return;
    };
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let sock = d.run_dir.join("vu0.sock");
    let vu = d.start_device_with(
        "dp0",
        &["queue-pairs=2", "unsealed-memory=accept"],
        Some(&sock),
    );
    let other = d.start_device("dp0", &[]);
    wait_until("the vhost-user socket", Duration::from_secs(10), || {
        sock.exists()
    });

    let mut pmd = Testpmd::start(&testpmd, &sock, 2, "");
    pmd.cmd("start tx_first");
    // The second door at the same time: vmdev's own driver on another device.
    let mut drv =
        NetDriver::open(&d.run_dir, other, NetDriverConfig::default()).expect("vmdev driver");
    let mut buf = Vec::new();
    for seq in 0..10_000u64 {
        let f = make_frame(drv.mac(), seq, 60 + (seq as usize * 7) % 1450);
        assert!(drv.send(&f).unwrap());
        wait_until("our frame back", Duration::from_secs(20), || {
            drv.recv_into(&mut buf).unwrap()
        });
        assert_eq!(frame_seq(&buf), Some(seq));
        assert_eq!(buf, f);
    }
    // Let testpmd run until it has looped a good number of frames.
    loop {
        pmd.cmd("show port stats 0");
        let rx = pmd.value_after("RX-packets:");
        pmd.value_after("TX-packets:"); // the rest of this answer
        if rx >= 200_000 {
            break;
        }
    }
    pmd.cmd("stop");
    let per_stream_tx = [
        pmd.value_after("TX-packets:"),
        pmd.value_after("TX-packets:"),
    ];
    let rx_total = pmd.value_after("RX-packets:");
    let tx_total = pmd.value_after("TX-packets:");
    wait_for_vmdev_to_take(&d, &vu.to_string(), &[1, 3], tx_total);
    pmd.cmd("quit");
    assert!(pmd.child.wait().unwrap().success(), "testpmd failed");

    // testpmd left: the device is detached and its counters are final.
    let mut c = d.client();
    wait_until(
        "the vhost-user device to be released",
        Duration::from_secs(20),
        || {
            c.list_devices()
                .unwrap()
                .iter()
                .any(|x| x.uuid == vu && !x.claimed && !x.attached)
        },
    );
    let v = stats(&d, &vu.to_string());
    let q = |i: usize, k: &str| v["queues"][i][k].as_u64().unwrap();
    let (vm_tx, vm_rx) = (
        q(1, "packets") + q(3, "packets"),
        q(0, "packets") + q(2, "packets"),
    );
    assert_eq!(vm_tx, tx_total, "vmdev saw every frame testpmd transmitted");
    assert_eq!(vm_rx, vm_tx, "every frame came back (no drops)");
    assert_eq!(
        q(0, "drops") + q(1, "drops") + q(2, "drops") + q(3, "drops"),
        0
    );
    assert_eq!(
        [q(1, "packets"), q(3, "packets")],
        per_stream_tx,
        "per-queue counters match testpmd's streams"
    );
    assert!(
        rx_total <= vm_rx && vm_rx - rx_total <= 2 * 256,
        "testpmd received all but the frames in flight"
    );
    assert!(
        q(0, "packets") > 0 && q(2, "packets") > 0,
        "both queue pairs carried traffic"
    );
    assert_eq!(
        stats(&d, &other.to_string())["queues"][0]["packets"].as_u64(),
        Some(10_000)
    );
}

#[test]
fn testpmd_virtio_user_with_packed_rings_loops_through_vmdev() {
    let Some(testpmd) = external_tool("dpdk-testpmd") else {
        return;
    };
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let sock = d.run_dir.join("vu0.sock");
    let vu = d.start_device_with("dp0", &["unsealed-memory=accept"], Some(&sock));
    wait_until("the vhost-user socket", Duration::from_secs(10), || {
        sock.exists()
    });
    let mut pmd = Testpmd::start(&testpmd, &sock, 1, ",packed_vq=1");
    pmd.cmd("start tx_first");
    let mut c = d.client();
    wait_until("DRIVER_OK", Duration::from_secs(20), || {
        c.list_devices()
            .unwrap()
            .iter()
            .any(|x| x.uuid == vu && x.attached)
    });
    let dev = c
        .list_devices()
        .unwrap()
        .into_iter()
        .find(|x| x.uuid == vu)
        .unwrap();
    assert_ne!(
        dev.driver_features & vmdev_proto::virtio::features::RING_PACKED,
        0,
        "testpmd negotiated packed rings"
    );
    // With IN_ORDER too, vmdev returns each run of transmitted frames with one used
    // descriptor, which testpmd's in-order TX clean-up must follow.
    assert_ne!(
        dev.driver_features & vmdev_proto::virtio::features::IN_ORDER,
        0,
        "testpmd negotiated IN_ORDER"
    );
    loop {
        pmd.cmd("show port stats 0");
        let rx = pmd.value_after("RX-packets:");
        pmd.value_after("TX-packets:");
        if rx >= 200_000 {
            break;
        }
    }
    pmd.cmd("stop");
    pmd.value_after("TX-packets:");
    let _rx_total = pmd.value_after("RX-packets:");
    let tx_total = pmd.value_after("TX-packets:");
    wait_for_vmdev_to_take(&d, &vu.to_string(), &[1], tx_total);
    pmd.cmd("quit");
    assert!(pmd.child.wait().unwrap().success(), "testpmd failed");
    wait_until("the device to be released", Duration::from_secs(20), || {
        c.list_devices()
            .unwrap()
            .iter()
            .any(|x| x.uuid == vu && !x.claimed && !x.attached)
    });
    let v = stats(&d, &vu.to_string());
    let q = |i: usize, k: &str| v["queues"][i][k].as_u64().unwrap();
    assert_eq!(
        q(1, "packets"),
        tx_total,
        "vmdev saw every frame testpmd transmitted"
    );
    assert_eq!(q(0, "packets"), q(1, "packets"), "every frame came back");
    assert_eq!(q(0, "drops") + q(1, "drops"), 0);
}
