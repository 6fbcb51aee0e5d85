//! vmdev's own driver as a vhost-user front end (`NetDriver::open_vhost_user`): through
//! vmdev's vhost-user door (real daemons), and — when installed — through DPDK's vhost PMD
//! with testpmd forwarding every frame back.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmdev_tests::{external_tool, run_traffic, wait_until, Daemons};
use vmdev_tools::net_driver::{DriverError, DEFAULT_MAC};
use vmdev_tools::vhost_user_front::VhostUserProtocolFeatures as PF;
use vmdev_tools::{NetDriverConfig, NotifyMode, TxLayout, VhostUserFrontError, VhostUserNetDriver};

fn stats(d: &Daemons, uuid: &str) -> serde_json::Value {
    let out = d.vmdevctl(&["--json", "stats", "-u", uuid]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Starts a net-loopback device with a vhost-user door; returns its UUID and socket.
fn door(d: &mut Daemons, attrs: &[&str]) -> (vmdev_proto::Uuid, std::path::PathBuf) {
    let sock = d.run_dir.join("vu0.sock");
    let uuid = d.start_device_with("dp0", attrs, Some(&sock));
    wait_until("the vhost-user socket", Duration::from_secs(10), || {
        sock.exists()
    });
    (uuid, sock)
}

/// Waits until the control plane has released the device (front end gone, datapath
/// detached), so its counters are final.
fn wait_released(d: &Daemons, uuid: vmdev_proto::Uuid) {
    let mut c = d.client();
    wait_until("the device to be released", Duration::from_secs(20), || {
        c.list_devices()
            .unwrap()
            .iter()
            .any(|x| x.uuid == uuid && !x.claimed && !x.attached)
    });
}

#[test]
fn ten_thousand_frames_through_vmdevs_own_vhost_user_door() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let (uuid, sock) = door(&mut d, &[]);
    let cfg = NetDriverConfig {
        tx_layout: TxLayout::Mixed,
        ..Default::default()
    };
    let mut drv = VhostUserNetDriver::open_vhost_user(&sock, cfg).expect("vhost-user driver");
    let front = drv.vhost_user();
    assert!(front.running(), "rings handed over at DRIVER_OK");
    let pf = front.protocol_features();
    assert!(pf.contains(PF::CONFIG), "the door offers CONFIG: {pf:?}");
    // The MAC and MTU come from the device's config space, through GET_CONFIG.
    assert_ne!(drv.mac(), DEFAULT_MAC);
    assert_eq!(drv.mtu(), 1500);
    let f = drv.features();
    use vmdev_proto::virtio::features as vf;
    assert_eq!(
        f & (vf::VERSION_1 | vf::NET_F_MAC | vf::NET_F_MTU),
        vf::VERSION_1 | vf::NET_F_MAC | vf::NET_F_MTU
    );
    assert_eq!(
        f & (1 << 30),
        0,
        "bit 30 is the transport's, not the driver's"
    );
    assert_eq!(drv.status().unwrap() & 0x4, 0x4, "DRIVER_OK");

    let bytes = run_traffic(&mut drv, 0, 10_000, 42, None);
    drop(drv);
    wait_released(&d, uuid);
    let v = stats(&d, &uuid.to_string());
    let q = |i: usize, k: &str| v["queues"][i][k].as_u64().unwrap();
    assert_eq!(q(1, "packets"), 10_000, "tx packets");
    assert_eq!(q(0, "packets"), 10_000, "rx packets");
    assert_eq!(q(1, "bytes"), bytes, "tx bytes");
    assert_eq!(q(0, "bytes"), bytes, "rx bytes");
    assert_eq!(q(0, "drops") + q(1, "drops"), 0, "drops");
}

#[test]
fn interrupt_mode_through_the_door() {
    let mut d = Daemons::start();
    d.add_datapath_with("dp0", &["--spin-us", "0"]);
    let (uuid, sock) = door(&mut d, &[]);
    let cfg = NetDriverConfig {
        mode: NotifyMode::Interrupt,
        tx_layout: TxLayout::Mixed,
        ..Default::default()
    };
    let mut drv = VhostUserNetDriver::open_vhost_user(&sock, cfg).expect("vhost-user driver");
    run_traffic(&mut drv, 0, 5_000, 7, None);
    let v = stats(&d, &uuid.to_string());
    assert_eq!(v["queues"][0]["packets"].as_u64(), Some(5_000));
    assert!(
        v["queues"][0]["calls"].as_u64().unwrap() > 0,
        "the driver was interrupted through the call eventfd it handed over"
    );
}

#[test]
fn interrupt_mode_without_event_idx_or_indirect_through_the_door() {
    let mut d = Daemons::start();
    d.add_datapath_with("dp0", &["--spin-us", "0"]);
    let (_, sock) = door(&mut d, &[]);
    let cfg = NetDriverConfig {
        mode: NotifyMode::Interrupt,
        event_idx: false,
        indirect: false,
        tx_layout: TxLayout::Mixed,
        ..Default::default()
    };
    let mut drv = VhostUserNetDriver::open_vhost_user(&sock, cfg).expect("vhost-user driver");
    run_traffic(&mut drv, 0, 2_000, 8, None);
}

#[test]
fn a_second_front_end_gets_a_clean_device_after_the_first_leaves() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let (uuid, sock) = door(&mut d, &[]);
    let mut first =
        VhostUserNetDriver::open_vhost_user(&sock, NetDriverConfig::default()).expect("first");
    run_traffic(&mut first, 0, 1_000, 1, None);
    drop(first);
    wait_released(&d, uuid);
    // A different queue size and features: nothing of the first session must linger.
    let cfg = NetDriverConfig {
        queue_size: 64,
        event_idx: false,
        ..Default::default()
    };
    let mut second = VhostUserNetDriver::open_vhost_user(&sock, cfg).expect("second");
    assert_eq!(second.ring_addrs(0).map(|r| r.size), Some(64));
    run_traffic(&mut second, 0, 3_000, 2, None);
    drop(second);
    wait_released(&d, uuid);
    let v = stats(&d, &uuid.to_string());
    assert_eq!(
        v["queues"][1]["packets"].as_u64(),
        Some(4_000),
        "counters add up"
    );
    assert_eq!(v["queues"][0]["packets"].as_u64(), Some(4_000));
}

#[test]
fn connecting_where_nothing_listens_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("vmdev-vuf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // No file at all.
    let missing = dir.join("missing.sock");
    let t0 = Instant::now();
    let e = VhostUserNetDriver::open_vhost_user(&missing, NetDriverConfig::default())
        .err()
        .expect("no socket: an error");
    assert!(t0.elapsed() < Duration::from_secs(5), "no hang");
    assert!(
        matches!(
            e,
            DriverError::VhostUser(VhostUserFrontError::Connect { .. })
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    eprintln!("no socket: {msg}");
    assert!(
        msg.contains("missing.sock") && msg.contains("vhost-user"),
        "{msg}"
    );

    // A socket file whose listener is gone.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let e = VhostUserNetDriver::open_vhost_user(&stale, NetDriverConfig::default())
        .err()
        .expect("stale socket: an error");
    assert!(t0.elapsed() < Duration::from_secs(5), "no hang");
    assert!(e.to_string().contains("stale.sock"), "{e}");

    // Something listens but never answers: the request times out and is named.
    let mute = dir.join("mute.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&mute).unwrap();
    let t1 = Instant::now();
    let e = VhostUserNetDriver::open_vhost_user(&mute, NetDriverConfig::default())
        .err()
        .expect("mute back end: an error");
    assert!(t1.elapsed() < Duration::from_secs(30), "no hang");
    let msg = e.to_string();
    eprintln!("mute back end: {msg}");
    assert!(
        msg.contains("GET_FEATURES") && msg.contains("mute.sock"),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// testpmd, killed and reaped on drop; its stdin is kept open (it quits when stdin closes).
struct Testpmd {
    child: Child,
    _stdin: Option<std::process::ChildStdin>,
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_testpmd(path: &Path, sock: &Path) -> Testpmd {
    let mut child = Command::new(path)
        .args(["-l", "0,1", "--no-pci", "--no-huge", "-m", "1024"])
        .arg(format!("--file-prefix=vmdev-vuf-{}", std::process::id()))
        .arg("--vdev")
        .arg(format!("net_vhost0,iface={},queues=1", sock.display()))
        .args([
            "--",
            "--forward-mode=io",
            "--auto-start",
            "--nb-cores=1",
            "--total-num-mbufs=4096",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn dpdk-testpmd");
    let stdin = child.stdin.take();
    Testpmd {
        child,
        _stdin: stdin,
    }
}

#[test]
fn dpdk_vhost_pmd_sends_every_frame_back() {
    let Some(testpmd) = external_tool("dpdk-testpmd") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("vmdev-vuf-dpdk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("vhost0.sock");
    let _ = std::fs::remove_file(&sock);
    let mut pmd = start_testpmd(&testpmd, &sock);
    wait_until(
        "testpmd's vhost-user socket",
        Duration::from_secs(60),
        || {
            assert!(
                pmd.child.try_wait().unwrap().is_none(),
                "testpmd exited early"
            );
            sock.exists()
        },
    );
    let cfg = NetDriverConfig {
        tx_layout: TxLayout::Mixed,
        mac: Some([0x02, 0, 0, 0, 0, 0x42]),
        ..Default::default()
    };
    let mut drv = VhostUserNetDriver::open_vhost_user(&sock, cfg).expect("vhost-user driver");
    let front = drv.vhost_user();
    eprintln!(
        "DPDK vhost PMD: features {:#x}, protocol features {:?}",
        front.offered_features(),
        front.protocol_features()
    );
    if !front.protocol_features().contains(PF::CONFIG) {
        assert_eq!(drv.mac(), [0x02, 0, 0, 0, 0, 0x42], "the caller's MAC");
        assert_eq!(
            drv.features() & vmdev_proto::virtio::features::NET_F_MAC,
            0,
            "no MAC negotiated without a readable config space"
        );
    }
    run_traffic(&mut drv, 0, 1_000, 5, None);
    drop(drv);
    drop(pmd);
    let _ = std::fs::remove_dir_all(&dir);
}
