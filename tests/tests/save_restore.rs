//! Device state save/restore: `vmdevctl save` writes a versioned, self-describing blob of a
//! running device; `vmdevctl restore` recreates it (elsewhere) with its counters; a driver
//! can save a suspended device's state and load it into a fresh one.

use std::time::Duration;
use vmdev_proto::transport::{DeviceState, VqState};
use vmdev_proto::{ErrorCode, ProtoError};
use vmdev_tests::{frame_seq, make_frame, wait_until, Daemons};
use vmdev_tools::{NetDriver, NetDriverConfig};

fn run_frames(drv: &mut NetDriver, from: u64, n: u64) {
    let mut buf = Vec::new();
    for seq in from..from + n {
        let f = make_frame(drv.mac(), seq, 128);
        assert!(drv.send(&f).unwrap());
        wait_until("frame", Duration::from_secs(20), || {
            drv.recv_into(&mut buf).unwrap()
        });
        assert_eq!(frame_seq(&buf), Some(seq));
    }
}

#[test]
fn save_and_restore_a_device_with_its_state_and_counters() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    d.add_datapath("dp1");
    let uuid = d.start_device("dp0", &["mac=52:54:00:aa:bb:cc", "mtu=4000"]);
    let mut drv = NetDriver::open(&d.run_dir, uuid, NetDriverConfig::default()).unwrap();
    run_frames(&mut drv, 0, 300);
    let file = d.run_dir.join("dev.json");
    let out = d.vmdevctl(&["save", "-u", &uuid.to_string(), file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: DeviceState = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!((st.format.as_str(), st.version), ("vmdev-device-state", 1));
    assert_eq!(
        (st.uuid, st.parent.as_str(), st.device_type.as_str()),
        (uuid, "dp0", "net-loopback")
    );
    assert_eq!(
        &st.config[..6],
        &[0x52, 0x54, 0, 0xaa, 0xbb, 0xcc],
        "MAC in the saved config"
    );
    assert_ne!(st.status & vmdev_proto::virtio::status::DRIVER_OK, 0);
    assert_eq!(
        st.queues[1].1,
        VqState::Split {
            avail_index: 300,
            used_index: 300
        }
    );
    assert_eq!(st.stats.queues[1].packets, 300);
    // Saving a running device did not disturb it.
    run_frames(&mut drv, 300, 100);
    drop(drv);

    let out = d.vmdevctl(&["stop", "-u", &uuid.to_string()]);
    assert!(out.status.success());
    let out = d.vmdevctl(&["restore", file.to_str().unwrap(), "-p", "dp1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut c = d.client();
    let dev = c
        .list_devices()
        .unwrap()
        .into_iter()
        .find(|x| x.uuid == uuid)
        .expect("restored");
    assert_eq!(dev.parent, "dp1");
    assert!(dev.attrs.contains(&("mtu".into(), "4000".into())));
    assert_eq!(
        c.stats(uuid).unwrap().queues[1].packets,
        300,
        "counters restored"
    );
    let mut drv = NetDriver::open(&d.run_dir, uuid, NetDriverConfig::default()).unwrap();
    assert_eq!(drv.mac(), [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
    run_frames(&mut drv, 0, 50);
}

#[test]
fn driver_saves_a_suspended_device_and_loads_it_into_a_fresh_one() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let uuid = d.start_device("dp0", &[]);
    let mut drv = NetDriver::open(&d.run_dir, uuid, NetDriverConfig::default()).unwrap();
    run_frames(&mut drv, 0, 40);
    let e = drv.client().save_state().unwrap_err();
    assert!(
        matches!(e, ProtoError::Remote(w) if w.code == ErrorCode::BadState),
        "running: suspend first"
    );
    drv.client().suspend().unwrap();
    let blob = drv.client().save_state().unwrap();
    drop(drv);
    // A new driver: reset, load, and the queues stand where they were.
    let mut c = d.client();
    wait_until("the old driver's release", Duration::from_secs(20), || {
        c.list_devices()
            .unwrap()
            .iter()
            .any(|x| x.uuid == uuid && !x.claimed)
    });
    c.open(uuid).unwrap();
    c.reset().unwrap();
    c.load_state(blob.clone()).unwrap();
    assert_eq!(
        c.status().unwrap() & vmdev_proto::virtio::status::FEATURES_OK,
        vmdev_proto::virtio::status::FEATURES_OK
    );
    assert_eq!(
        c.queue_state(1).unwrap(),
        VqState::Split {
            avail_index: 40,
            used_index: 40
        }
    );
    let e = c.load_state(blob).unwrap_err();
    assert!(
        matches!(e, ProtoError::Remote(w) if w.code == ErrorCode::BadState),
        "only into a reset device"
    );
}

fn ctl_ok(d: &Daemons, args: &[&str]) {
    let out = d.vmdevctl(args);
    assert!(
        out.status.success(),
        "vmdevctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn save_stop_restore_elsewhere_and_the_same_driver_continues_at_its_ring_positions() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    d.add_datapath("dp1");
    let uuid = d.start_device("dp0", &["mac=52:54:00:12:34:56"]);
    let u = uuid.to_string();
    let mut drv = NetDriver::open(&d.run_dir, uuid, NetDriverConfig::default()).unwrap();
    let features = drv.features();
    run_frames(&mut drv, 0, 300);
    let file = d.run_dir.join("dev.json");
    let f = file.to_str().unwrap();
    ctl_ok(&d, &["save", "-u", &u, f]);
    ctl_ok(&d, &["stop", "-u", &u]);
    assert!(
        drv.wait_config_signal(Duration::from_secs(20)).unwrap(),
        "the driver hears that its device went away"
    );
    ctl_ok(&d, &["restore", f, "-p", "dp1"]);

    // The restored device waits at the saved features and ring positions.
    let mut c = d.client();
    let dev = c.list_devices().unwrap();
    let dev = dev.iter().find(|x| x.uuid == uuid).expect("restored");
    assert_eq!(dev.parent, "dp1");
    drv.reattach(&d.run_dir, None).unwrap();
    assert_eq!(drv.features(), features);
    assert_eq!(drv.mac(), [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    assert_eq!(
        drv.client().queue_state(1).unwrap(),
        VqState::Split {
            avail_index: 300,
            used_index: 300
        }
    );
    // Sequence numbers continue: a device that started its rings at 0 again would replay
    // old descriptors and the next frame would not be 300.
    run_frames(&mut drv, 300, 200);
    assert_eq!(c.stats(uuid).unwrap().queues[1].packets, 500);

    // A device started afresh holds no state to continue from: the driver is told so, then
    // brings a saved state itself (as a VMM carries it in its migration stream).
    ctl_ok(&d, &["save", "-u", &u, f]);
    ctl_ok(&d, &["stop", "-u", &u]);
    assert!(drv.wait_config_signal(Duration::from_secs(20)).unwrap());
    ctl_ok(
        &d,
        &[
            "start",
            "-p",
            "dp0",
            "-t",
            "net-loopback",
            "-u",
            &u,
            "--attr",
            "mac=52:54:00:12:34:56",
        ],
    );
    let e = drv.reattach(&d.run_dir, None).unwrap_err();
    assert!(e.to_string().contains("no saved state"), "{e}");
    wait_until(
        "the refused driver's release",
        Duration::from_secs(20),
        || {
            c.list_devices()
                .unwrap()
                .iter()
                .any(|x| x.uuid == uuid && !x.claimed)
        },
    );
    drv.reattach(&d.run_dir, Some(std::fs::read(&file).unwrap()))
        .unwrap();
    run_frames(&mut drv, 500, 100);
}
