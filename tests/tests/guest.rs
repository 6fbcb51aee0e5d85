//! A Linux guest's own virtio-net driver (kernel 6.12 from Debian backports, under QEMU TCG)
//! drives a vmdev device through the vhost-user door: the guest sends sequence-numbered raw
//! frames and checks each comes back byte-identical (tests/guest/).

use std::time::Duration;
use vmdev_tests::{guest_image, run_guest, wait_until, Daemons};

#[test]
fn linux_guest_virtio_net_loops_frames_through_vmdev() {
    let Some(image) = guest_image() else {
        return;
    };
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let sock = d.run_dir.join("vu0.sock");
    let uuid = d.start_device_with("dp0", &[], Some(&sock));
    wait_until("the vhost-user socket", Duration::from_secs(10), || {
        sock.exists()
    });
    let (ok, text) = run_guest(
        &image,
        "net",
        &["--vhost-user", sock.to_str().unwrap(), "--count", "2000"],
    );
    assert!(
        ok && text.contains("VMDEV-GUEST-RESULT: PASS sent=2000 received=2000"),
        "guest failed:\n{text}"
    );
    let s = d.vmdevctl(&["--json", "stats", "-u", &uuid.to_string()]);
    let v: serde_json::Value = serde_json::from_slice(&s.stdout).unwrap();
    let rx = v["queues"][0]["packets"].as_u64().unwrap();
    assert!(
        rx >= 2000,
        "vmdev delivered {rx} frames to the guest, at least 2000 expected"
    );
    assert_eq!(
        v["queues"][0]["packets"], v["queues"][1]["packets"],
        "every guest frame came back"
    );
}
