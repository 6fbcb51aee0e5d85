//! A Linux guest's own virtio-net driver (kernel 6.12 from Debian backports, under QEMU TCG)
//! drives a vmdev device through the vhost-user door: the guest sends sequence-numbered raw
//! frames and checks each comes back byte-identical (tests/guest/).

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use vmdev_tests::{external_tool, wait_until, Daemons};

#[test]
fn linux_guest_virtio_net_loops_frames_through_vmdev() {
    if external_tool("qemu-system-x86_64").is_none() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let image = root.join("target/guest-image");
    let built = Command::new("bash")
        .arg(root.join("tests/guest/build-image.sh"))
        .arg(&image)
        .status()
        .expect("run build-image.sh");
    assert!(built.success(), "building the guest image failed");

    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let sock = d.run_dir.join("vu0.sock");
    let uuid = d.start_device_with("dp0", &[], Some(&sock));
    wait_until("the vhost-user socket", Duration::from_secs(10), || {
        sock.exists()
    });
    let out = Command::new("bash")
        .arg(root.join("tests/guest/run-guest.sh"))
        .arg("--kernel")
        .arg(image.join("vmlinuz"))
        .arg("--initrd")
        .arg(image.join("initrd.gz"))
        .arg("--vhost-user")
        .arg(&sock)
        .args(["--count", "2000", "--timeout", "300"])
        .output()
        .expect("run run-guest.sh");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("VMDEV-GUEST-RESULT: PASS sent=2000 received=2000"),
        "guest failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
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
