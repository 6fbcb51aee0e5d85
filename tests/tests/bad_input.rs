//! Bad input from a peer: each case gets a clear error (or closes only its own
//! connection, or puts only its own device in NEEDS_RESET), and afterwards the daemons still
//! serve a second, healthy device.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;
use vmdev_proto::transport::{Reply, Request};
use vmdev_proto::virtio::status as st;
use vmdev_proto::{ErrorCode, ProtoError, Uuid};
use vmdev_shm_ring::GuestAddr;
use vmdev_tests::{bin_path, frame_seq, make_frame, wait_until, Daemons};
use vmdev_tools::{NetDriver, NetDriverConfig, TransportClient};

/// A control plane, one datapath, and a healthy device with its driver running.
struct World {
    d: Daemons,
    healthy: NetDriver,
}

fn world() -> World {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let uuid = d.start_device("dp0", &[]);
    let healthy =
        NetDriver::open(&d.run_dir, uuid, NetDriverConfig::default()).expect("healthy driver");
    World { d, healthy }
}

impl World {
    /// The healthy device still forwards every frame, and no daemon died.
    fn assert_healthy(&mut self) {
        let mac = self.healthy.mac();
        let mut buf = Vec::new();
        for seq in 0..1000u64 {
            let f = make_frame(mac, seq, 64 + (seq as usize % 1400));
            assert!(self.healthy.send(&f).expect("send"), "TX ring full");
            wait_until("the frame to come back", Duration::from_secs(20), || {
                self.healthy.recv_into(&mut buf).expect("recv")
            });
            assert_eq!(frame_seq(&buf), Some(seq));
            assert_eq!(buf, f);
        }
        assert!(self.d.control_alive(), "vmdev-control died");
        assert!(self.d.datapaths_alive(), "vmdev-datapath died");
        let st = self.healthy.status().expect("status");
        assert_eq!(st & st::NEEDS_RESET, 0, "the healthy device was hurt");
    }

    fn victim(&self) -> Uuid {
        self.d.start_device("dp0", &[])
    }
}

fn remote_code(e: ProtoError) -> ErrorCode {
    match e {
        ProtoError::Remote(w) => w.code,
        other => panic!("expected an error reply, got {other}"),
    }
}

/// Reads until EOF; true if the server closed the connection.
fn closed_by_server(mut s: UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn malformed_frame_closes_only_that_connection() {
    let mut w = world();
    let mut s = UnixStream::connect(w.d.run_dir.join("control.sock")).unwrap();
    // Valid header, body that is no message at all.
    s.write_all(&[4, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff])
        .unwrap();
    assert!(closed_by_server(s));
    // A header with reserved bits set.
    let mut s = UnixStream::connect(w.d.run_dir.join("control.sock")).unwrap();
    s.write_all(&[1, 0, 0, 0, 0, 0, 1, 0, 0]).unwrap();
    assert!(closed_by_server(s));
    w.assert_healthy();
}

#[test]
fn oversized_frame_closes_only_that_connection() {
    let mut w = world();
    let mut s = UnixStream::connect(w.d.run_dir.join("control.sock")).unwrap();
    let len = (vmdev_proto::MAX_FRAME_LEN as u32 + 1).to_le_bytes();
    s.write_all(&[len[0], len[1], len[2], len[3], 0, 0, 0, 0])
        .unwrap();
    assert!(closed_by_server(s));
    w.assert_healthy();
}

#[test]
fn no_hello_first_is_refused() {
    let mut w = world();
    let stream = UnixStream::connect(w.d.run_dir.join("control.sock")).unwrap();
    let mut ch = vmdev_proto::Channel::new(stream);
    let r: Reply = ch.call(&Request::ListTypes, &[]).unwrap();
    assert!(matches!(r, Reply::Error(e) if e.code == ErrorCode::BadState));
    let bad_version = Request::Hello(vmdev_proto::Hello {
        version: 99,
        features: 0,
    });
    let stream = UnixStream::connect(w.d.run_dir.join("control.sock")).unwrap();
    let mut ch = vmdev_proto::Channel::new(stream);
    let r: Reply = ch.call(&bad_version, &[]).unwrap();
    assert!(matches!(r, Reply::Error(e) if e.code == ErrorCode::BadVersion));
    w.assert_healthy();
}

#[test]
fn requests_out_of_order_get_typed_errors() {
    let mut w = world();
    let uuid = w.victim();
    let mut c = w.d.client();
    assert_eq!(
        remote_code(c.status().unwrap_err()),
        ErrorCode::BadState,
        "before Open"
    );
    c.open(uuid).unwrap();
    assert_eq!(
        remote_code(c.set_status(st::DRIVER).unwrap_err()),
        ErrorCode::BadState,
        "DRIVER before ACK"
    );
    c.set_status(st::ACKNOWLEDGE).unwrap();
    assert_eq!(
        remote_code(c.set_driver_features(1 << 32).unwrap_err()),
        ErrorCode::BadState,
        "features before DRIVER"
    );
    assert_eq!(
        remote_code(c.set_queue_size(0, 64).unwrap_err()),
        ErrorCode::BadState,
        "queue before FEATURES_OK"
    );
    c.set_status(st::ACKNOWLEDGE | st::DRIVER).unwrap();
    c.set_driver_features(1 << 32 | 1 << 63).unwrap();
    assert_eq!(
        remote_code(
            c.set_status(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK)
                .unwrap_err()
        ),
        ErrorCode::BadFeatures,
        "a feature that was not offered"
    );
    assert_eq!(
        remote_code(c.set_status(st::ACKNOWLEDGE).unwrap_err()),
        ErrorCode::BadState,
        "going backwards"
    );
    // One driver per device.
    let mut other = w.d.client();
    assert_eq!(remote_code(other.open(uuid).unwrap_err()), ErrorCode::Busy);
    assert_eq!(
        remote_code(other.open(Uuid::new_v4()).unwrap_err()),
        ErrorCode::NoSuchDevice
    );
    // An fd where none is expected, and none where one is.
    let fd = vmdev_tools::sys::eventfd().unwrap();
    assert_eq!(
        remote_code(c.request(&Request::GetStatus, &[fd.as_fd()]).unwrap_err()),
        ErrorCode::BadArgument
    );
    assert_eq!(
        remote_code(c.request(&Request::SetConfigNotify, &[]).unwrap_err()),
        ErrorCode::MissingFd
    );
    // A memfd where an eventfd belongs.
    let m = vmdev_shm_ring::create_sealed_memfd("x", 4096).unwrap();
    assert_eq!(
        remote_code(c.set_config_notify(m.as_fd()).unwrap_err()),
        ErrorCode::BadArgument
    );
    w.assert_healthy();
}

#[test]
fn unsealed_memfd_is_refused() {
    let mut w = world();
    let uuid = w.victim();
    let mut c = w.d.client();
    c.open(uuid).unwrap();
    let m = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .create("unsealed")
        .unwrap();
    m.as_file().set_len(1 << 20).unwrap();
    let fd = OwnedFd::from(m.into_file());
    assert_eq!(
        remote_code(
            c.add_mem_region(fd.as_fd(), 0x10000, 1 << 20, 0)
                .unwrap_err()
        ),
        ErrorCode::BadMemory
    );
    // A regular file is no memfd either.
    let f = std::fs::File::open(bin_path("vmdev-control")).unwrap();
    assert_eq!(
        remote_code(c.add_mem_region(f.as_fd(), 0x10000, 4096, 0).unwrap_err()),
        ErrorCode::BadMemory
    );
    // Sealed but smaller than claimed.
    let small = vmdev_shm_ring::create_sealed_memfd("small", 4096).unwrap();
    assert_eq!(
        remote_code(
            c.add_mem_region(small.as_fd(), 0x10000, 8192, 0)
                .unwrap_err()
        ),
        ErrorCode::BadMemory
    );
    w.assert_healthy();
}

#[test]
fn ring_outside_memory_is_refused_at_driver_ok() {
    let mut w = world();
    let uuid = w.victim();
    let mut c = w.d.client();
    c.open(uuid).unwrap();
    let mem = vmdev_shm_ring::create_sealed_memfd("m", 1 << 20).unwrap();
    c.add_mem_region(mem.as_fd(), 0x10000, 1 << 20, 0).unwrap();
    c.set_status(st::ACKNOWLEDGE | st::DRIVER).unwrap();
    c.set_driver_features(1 << 32).unwrap();
    c.set_status(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK)
        .unwrap();
    let kicks: Vec<OwnedFd> = (0..2)
        .map(|_| vmdev_tools::sys::eventfd().unwrap())
        .collect();
    for q in 0..2u16 {
        c.set_queue_size(q, 256).unwrap();
        let base = if q == 0 {
            0x10000
        } else {
            0x10000 + (1 << 20) - 0x1000
        }; // TX runs off the end
        c.set_queue_address(q, base, base + 0x1000, base + 0x2000)
            .unwrap();
        c.set_queue_kick(q, kicks[q as usize].as_fd()).unwrap();
        c.set_queue_ready(q, true).unwrap();
    }
    let e = c
        .set_status(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK | st::DRIVER_OK)
        .unwrap_err();
    assert_eq!(remote_code(e), ErrorCode::BadAddress);
    assert_eq!(c.status().unwrap() & st::DRIVER_OK, 0);
    w.assert_healthy();
}

/// Opens a victim device, writes one hostile descriptor as TX chain 0, publishes and kicks.
fn hostile_tx(w: &World, desc: (u64, u32, u16, u16)) -> NetDriver {
    let uuid = w.victim();
    let drv =
        NetDriver::open(&w.d.run_dir, uuid, NetDriverConfig::default()).expect("victim driver");
    let r = drv.ring_addrs(1).unwrap();
    let mem = drv.memory();
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&desc.0.to_le_bytes());
    d[8..12].copy_from_slice(&desc.1.to_le_bytes());
    d[12..14].copy_from_slice(&desc.2.to_le_bytes());
    d[14..16].copy_from_slice(&desc.3.to_le_bytes());
    mem.write(GuestAddr(r.desc), &d).unwrap();
    mem.write(GuestAddr(r.driver + 4), &0u16.to_le_bytes())
        .unwrap();
    mem.write(GuestAddr(r.driver + 2), &1u16.to_le_bytes())
        .unwrap();
    drv.kick(1).unwrap();
    drv
}

fn assert_needs_reset(mut victim: NetDriver) {
    assert!(
        victim.wait_config_signal(Duration::from_secs(20)).unwrap(),
        "the driver was not told through its config eventfd"
    );
    assert_ne!(
        victim.status().unwrap() & st::NEEDS_RESET,
        0,
        "status lacks NEEDS_RESET"
    );
    // A reset brings the device back to a clean state.
    victim.client().reset().unwrap();
    assert_eq!(victim.status().unwrap(), 0);
}

#[test]
fn descriptor_loop_marks_only_that_device_needs_reset() {
    let mut w = world();
    let victim = hostile_tx(
        &w,
        (
            vmdev_tools::net_driver::GUEST_BASE,
            64,
            1, /* NEXT */
            0, /* itself */
        ),
    );
    assert_needs_reset(victim);
    w.assert_healthy();
}

#[test]
fn descriptor_outside_memory_marks_only_that_device_needs_reset() {
    let mut w = world();
    let victim = hostile_tx(&w, (0xdead_0000_0000, 64, 0, 0));
    assert_needs_reset(victim);
    w.assert_healthy();
}

#[test]
fn killed_client_releases_its_device() {
    let mut w = world();
    let uuid = w.victim();
    let mut child = Command::new(bin_path("vmdev-test-client"))
        .arg(&w.d.run_dir)
        .arg(uuid.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "running");
    child.kill().unwrap();
    child.wait().unwrap();
    let mut c = w.d.client();
    wait_until("the device to be released", Duration::from_secs(20), || {
        c.list_devices()
            .unwrap()
            .iter()
            .any(|d| d.uuid == uuid && !d.claimed && !d.attached)
    });
    // A new client can take it and traffic flows.
    let mut drv = NetDriver::open(&w.d.run_dir, uuid, NetDriverConfig::default()).unwrap();
    let mut buf = Vec::new();
    let f = make_frame(drv.mac(), 7, 100);
    assert!(drv.send(&f).unwrap());
    wait_until("the frame", Duration::from_secs(20), || {
        drv.recv_into(&mut buf).unwrap()
    });
    assert_eq!(buf, f);
    w.assert_healthy();
}

#[test]
fn vmdevctl_reports_clear_errors() {
    let w = world();
    let out = w.d.vmdevctl(&["start", "-p", "nope", "-t", "net-loopback"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no parent named 'nope'"));
    let out = w.d.vmdevctl(&[
        "start",
        "-p",
        "dp0",
        "-t",
        "net-loopback",
        "--attr",
        "mac=zz",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("mac"));
    let out = w.d.vmdevctl(&["stop", "-u", &Uuid::new_v4().to_string()]);
    assert!(!out.status.success());
    let _ = TransportClient::connect(&w.d.run_dir).unwrap();
}
