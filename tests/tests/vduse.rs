//! The VDUSE front door. On the host (no vduse module here): clear errors. In the Linux
//! guest under QEMU TCG (tests/guest/init), with vmdev's daemons running inside it: the
//! kernel's virtio_net drives a vmdev device through virtio_vdpa; `vmdev-perf` drives one
//! through /dev/vhost-vdpa-N; bad cases leave the kernel and the daemons clean.

use std::path::Path;
use vmdev_tests::{guest_image, run_guest, Daemons};

#[test]
fn vduse_without_the_module_names_the_module() {
    if Path::new("/dev/vduse/control").exists() {
        eprintln!("SKIPPED: this host has VDUSE; the guest tests cover it");
        return;
    }
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let out = d.vmdevctl(&[
        "start",
        "-p",
        "dp0",
        "-t",
        "net-loopback",
        "--vduse",
        "vmdev0",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("modprobe vduse"), "{err}");
    assert!(
        d.client().list_devices().unwrap().is_empty(),
        "nothing left behind"
    );
    assert!(d.control_alive());
}

#[test]
fn vduse_names_are_checked_before_anything_is_created() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    for bad in ["a/b", ""] {
        let out = d.vmdevctl(&["start", "-p", "dp0", "-t", "net-loopback", "--vduse", bad]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("not a valid VDUSE device name"),
            "{bad:?}: {err}"
        );
    }
    let out = d.vmdevctl(&[
        "start",
        "-p",
        "dp0",
        "-t",
        "net-loopback",
        "--vduse",
        "v0",
        "--attr",
        "queue-pairs=2",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("one queue pair only"), "{err}");
    assert!(d.client().list_devices().unwrap().is_empty());
}

#[test]
fn linux_virtio_net_drives_vmdev_through_vduse() {
    let Some(image) = guest_image() else {
        return;
    };
    let (ok, text) = run_guest(&image, "vduse", &["--count", "10000"]);
    assert!(ok, "guest failed:\n{text}");
    // pkt-check's own verdict, then vmdevctl's counters: every frame went through vmdev
    // (the kernel may add a few frames of its own when the link comes up).
    let line = text
        .lines()
        .find(|l| l.starts_with("VMDEV-GUEST-RESULT: PASS"))
        .unwrap_or_default();
    assert!(line.contains("sent=10000 received=10000"), "{line}");
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (rx, tx) = (field("rx="), field("tx="));
    assert!((10_000..10_100).contains(&tx), "tx counter {tx}: {line}");
    assert_eq!(rx, tx, "every frame sent came back: {line}");
    assert!(line.contains("reload stop-under-traffic removed"), "{line}");
    assert!(text.contains("vmdev0 is bound to virtio_vdpa"), "{text}");
    // The kernel's virtio_ring takes packed rings when offered: vmdev's packed device side
    // against Linux's own packed driver.
    assert!(
        text.contains("packed=1"),
        "the kernel did not negotiate packed rings:\n{text}"
    );
}

#[test]
fn vmdev_perf_runs_over_vhost_vdpa_and_the_vmdev_protocol() {
    let Some(image) = guest_image() else {
        return;
    };
    let (ok, text) = run_guest(&image, "vduse-vhost", &["--count", "2000"]);
    assert!(ok, "guest failed:\n{text}");
    assert!(
        text.contains("round trips of one 64-byte frame through /dev/vhost-vdpa-"),
        "{text}"
    );
    let histograms = text.lines().filter(|l| l.starts_with("vmdev ")).count();
    assert_eq!(histograms, 2, "one histogram per transport:\n{text}");
    assert!(
        text.contains("VMDEV-GUEST-RESULT: PASS vhost-vdpa"),
        "{text}"
    );
}

#[test]
fn vduse_bad_cases_leave_kernel_and_daemons_clean() {
    let Some(image) = guest_image() else {
        return;
    };
    let (ok, text) = run_guest(&image, "vduse-bad", &[]);
    assert!(ok, "guest failed:\n{text}");
    assert!(text.contains("already exists"), "{text}");
    assert!(text.contains("VDUSE needs root"), "{text}");
    assert!(
        text.contains("status=0x4f"),
        "NEEDS_RESET after the datapath died:\n{text}"
    );
    assert!(
        text.contains("VMDEV-GUEST-RESULT: PASS duplicate-name not-root datapath-killed"),
        "{text}"
    );
}
