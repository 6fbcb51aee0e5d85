//! The hostile-driver suite: a malicious driver, built on vmdev's own driver-side ring code,
//! attacks its own device while a healthy device of the same datapath streams
//! sequence-numbered frames. Each attack is one named test; each ends with the attacked
//! device in NEEDS_RESET or the request refused with a typed error — and the healthy stream
//! lost nothing, every daemon still running. (More attacks: bad_input.rs,
//! vhost_user_bad_input.rs, state_bad_input.rs; ring-level ones in shm-ring/tests/.)

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmdev_proto::transport::Request;
use vmdev_proto::virtio::{features as f, status as st};
use vmdev_proto::{ErrorCode, ProtoError, Uuid};
use vmdev_shm_ring::{create_sealed_memfd, GuestAddr};
use vmdev_tests::{frame_seq, make_frame, wait_until, Daemons};
use vmdev_tools::net_driver::GUEST_BASE;
use vmdev_tools::{NetDriver, NetDriverConfig, TransportClient};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;
const TX: usize = 1;
const RX: usize = 0;

/// What the healthy stream saw.
struct StreamResult {
    sent: u64,
    got: u64,
    error: Option<String>,
}

/// Daemons, a healthy device streaming frames on its own thread, and the attacker's tools.
struct Suite {
    d: Daemons,
    stop: Arc<AtomicBool>,
    stream: Option<JoinHandle<StreamResult>>,
}

fn stream(mut drv: NetDriver, stop: Arc<AtomicBool>) -> StreamResult {
    let mac = drv.mac();
    let window = drv.max_in_flight() as u64;
    let (mut sent, mut got) = (0u64, 0u64);
    let mut buf = Vec::new();
    let mut last = Instant::now();
    let mut run = || -> Result<(), String> {
        loop {
            // However short the attack, the stream carries frames before it stops.
            let stopping = stop.load(Ordering::Acquire) && got > 0;
            if stopping && got == sent {
                return Ok(());
            }
            while !stopping && sent - got < window.min(64) {
                let f = make_frame(mac, sent, 60 + (sent as usize * 13) % 1400);
                if !drv.queue_frame(&f).map_err(|e| e.to_string())? {
                    break;
                }
                sent += 1;
            }
            drv.flush().map_err(|e| e.to_string())?;
            while drv.recv_into(&mut buf).map_err(|e| e.to_string())? {
                if frame_seq(&buf) != Some(got) {
                    return Err(format!("frame {got} came back as {:?}", frame_seq(&buf)));
                }
                got += 1;
                last = Instant::now();
            }
            if last.elapsed() > Duration::from_secs(20) {
                return Err(format!("stalled at frame {got} of {sent}"));
            }
            if drv.status().map_err(|e| e.to_string())? & st::NEEDS_RESET != 0 {
                return Err("the healthy device went NEEDS_RESET".into());
            }
        }
    };
    let error = run().err();
    StreamResult { sent, got, error }
}

impl Suite {
    fn new() -> Suite {
        let mut d = Daemons::start();
        d.add_datapath("dp0");
        let uuid = d.start_device("dp0", &[]);
        let healthy = NetDriver::open(&d.run_dir, uuid, NetDriverConfig::default()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let stream = Some(std::thread::spawn(move || stream(healthy, s)));
        Suite { d, stop, stream }
    }

    /// Stops the stream and checks the healthy device lost nothing and every daemon lives.
    fn finish(mut self) {
        self.stop.store(true, Ordering::Release);
        let r = self.stream.take().unwrap().join().unwrap();
        assert_eq!(r.error, None, "healthy stream broken");
        assert!(r.sent > 0, "the healthy stream never ran");
        assert_eq!(r.got, r.sent, "the healthy device lost frames");
        assert!(self.d.control_alive(), "vmdev-control died");
        assert!(self.d.datapaths_alive(), "vmdev-datapath died");
    }

    /// A second device, opened by the attacker with vmdev's driver (rings and RX buffers set up).
    fn victim(&self) -> NetDriver {
        let uuid = self.d.start_device("dp0", &[]);
        NetDriver::open(&self.d.run_dir, uuid, NetDriverConfig::default()).unwrap()
    }

    /// A second device, opened by the attacker and taken up to FEATURES_OK by hand.
    fn raw_victim(&self) -> (TransportClient, Uuid) {
        let uuid = self.d.start_device("dp0", &[]);
        let mut c = TransportClient::connect(&self.d.run_dir).unwrap();
        c.open(uuid).unwrap();
        c.set_status(st::ACKNOWLEDGE).unwrap();
        c.set_status(st::ACKNOWLEDGE | st::DRIVER).unwrap();
        c.set_driver_features(f::VERSION_1).unwrap();
        c.set_status(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK)
            .unwrap();
        (c, uuid)
    }
}

fn code(e: ProtoError) -> ErrorCode {
    match e {
        ProtoError::Remote(w) => w.code,
        other => panic!("expected an error reply, got {other}"),
    }
}

fn desc_bytes(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

/// Writes descriptors at indices 0.. of queue `q`'s table.
fn write_descs(drv: &NetDriver, q: usize, descs: &[(u64, u32, u16, u16)]) {
    let r = drv.ring_addrs(q).unwrap();
    for (i, &(a, l, fl, n)) in descs.iter().enumerate() {
        let at = r.desc + 16 * i as u64;
        drv.memory()
            .write(GuestAddr(at), &desc_bytes(a, l, fl, n))
            .unwrap();
    }
}

/// Writes an indirect table into the victim's TX buffer area; returns its address.
fn write_table(drv: &NetDriver, descs: &[(u64, u32, u16, u16)]) -> u64 {
    let (base, _) = drv.tx_area();
    for (i, &(a, l, fl, n)) in descs.iter().enumerate() {
        drv.memory()
            .write(GuestAddr(base + 16 * i as u64), &desc_bytes(a, l, fl, n))
            .unwrap();
    }
    base
}

/// Publishes TX chain `head` as the first avail entry (avail index = `idx`) and kicks.
fn publish_tx(drv: &NetDriver, head: u16, idx: u16) {
    let r = drv.ring_addrs(TX).unwrap();
    drv.memory()
        .write(GuestAddr(r.driver + 4), &head.to_le_bytes())
        .unwrap();
    drv.memory()
        .write(GuestAddr(r.driver + 2), &idx.to_le_bytes())
        .unwrap();
    drv.kick(TX).unwrap();
}

/// One hostile TX chain starting at descriptor 0.
fn attack_tx(s: &Suite, descs: &[(u64, u32, u16, u16)]) -> NetDriver {
    let v = s.victim();
    write_descs(&v, TX, descs);
    publish_tx(&v, 0, 1);
    v
}

fn expect_needs_reset(mut victim: NetDriver) {
    assert!(
        victim.wait_config_signal(Duration::from_secs(20)).unwrap(),
        "the attacker's driver was not told through its config eventfd"
    );
    assert_ne!(victim.status().unwrap() & st::NEEDS_RESET, 0);
    victim.client().reset().unwrap();
    assert_eq!(victim.status().unwrap(), 0, "a reset clears NEEDS_RESET");
}

fn buf(v: &NetDriver) -> u64 {
    v.tx_area().0 + 4096
}

// ------------------------------------------------------------------ descriptor attacks

#[test]
fn loop_of_two_descriptors() {
    let s = Suite::new();
    let v = s.victim();
    let b = buf(&v);
    write_descs(&v, TX, &[(b, 64, NEXT, 1), (b, 64, NEXT, 0)]);
    publish_tx(&v, 0, 1);
    expect_needs_reset(v);
    s.finish();
}

#[test]
fn loop_inside_an_indirect_table() {
    let s = Suite::new();
    let v = s.victim();
    let b = buf(&v);
    let t = write_table(&v, &[(b, 64, NEXT, 1), (b, 64, NEXT, 0)]);
    write_descs(&v, TX, &[(t, 32, INDIRECT, 0)]);
    publish_tx(&v, 0, 1);
    expect_needs_reset(v);
    s.finish();
}

#[test]
fn indirect_inside_indirect() {
    let s = Suite::new();
    let v = s.victim();
    let b = buf(&v);
    let t = write_table(&v, &[(b, 64, INDIRECT, 0)]);
    write_descs(&v, TX, &[(t, 16, INDIRECT, 0)]);
    publish_tx(&v, 0, 1);
    expect_needs_reset(v);
    s.finish();
}

#[test]
fn indirect_with_next() {
    let s = Suite::new();
    let v = s.victim();
    let b = buf(&v);
    let t = write_table(&v, &[(b, 64, 0, 0)]);
    write_descs(&v, TX, &[(t, 16, INDIRECT | NEXT, 1), (b, 64, 0, 0)]);
    publish_tx(&v, 0, 1);
    expect_needs_reset(v);
    s.finish();
}

#[test]
fn indirect_table_length_not_a_multiple_of_16() {
    let s = Suite::new();
    let v = s.victim();
    let b = buf(&v);
    let t = write_table(&v, &[(b, 64, 0, 0), (b, 64, 0, 0)]);
    let v = {
        write_descs(&v, TX, &[(t, 24, INDIRECT, 0)]);
        publish_tx(&v, 0, 1);
        v
    };
    expect_needs_reset(v);
    s.finish();
}

#[test]
fn indirect_table_longer_than_any_queue() {
    let s = Suite::new();
    let v = s.victim();
    let (base, _) = v.tx_area();
    // 40,000 entries: more than the largest queue (32,768), and past the driver's memory.
    let v = attack_tx(&s, &[(base, 16 * 40_000, INDIRECT, 0)]);
    expect_needs_reset(v);
    s.finish();
}

#[test]
fn chain_with_next_past_the_table() {
    let s = Suite::new();
    let v = s.victim();
    let b = buf(&v);
    write_descs(&v, TX, &[(b, 64, NEXT, 60_000)]);
    publish_tx(&v, 0, 1);
    expect_needs_reset(v);
    s.finish();
}

#[test]
fn head_index_past_the_table() {
    let s = Suite::new();
    let v = s.victim();
    publish_tx(&v, 5000, 1);
    expect_needs_reset(v);
    s.finish();
}

#[test]
fn avail_index_jumps_by_more_than_the_queue() {
    let s = Suite::new();
    let v = s.victim();
    let b = buf(&v);
    write_descs(&v, TX, &[(b, 64, 0, 0)]);
    publish_tx(&v, 0, 1000);
    expect_needs_reset(v);
    s.finish();
}

#[test]
fn length_of_4_gib() {
    let s = Suite::new();
    let v = s.victim();
    let b = buf(&v);
    let v = {
        write_descs(&v, TX, &[(b, u32::MAX, 0, 0)]);
        publish_tx(&v, 0, 1);
        v
    };
    expect_needs_reset(v);
    s.finish();
}

#[test]
fn address_that_wraps_past_2_pow_64() {
    let s = Suite::new();
    let v = attack_tx(&s, &[(u64::MAX - 31, 64, 0, 0)]);
    expect_needs_reset(v);
    s.finish();
}

#[test]
fn buffer_straddling_the_end_of_memory() {
    let s = Suite::new();
    let v = s.victim();
    let (base, len) = v.mem_area();
    let end = base + len;
    write_descs(&v, TX, &[(end - 32, 64, 0, 0)]);
    publish_tx(&v, 0, 1);
    expect_needs_reset(v);
    s.finish();
}

#[test]
fn readable_after_writable_in_a_tx_chain() {
    let s = Suite::new();
    let v = s.victim();
    let b = buf(&v);
    write_descs(&v, TX, &[(b, 64, WRITE | NEXT, 1), (b, 64, 0, 0)]);
    publish_tx(&v, 0, 1);
    expect_needs_reset(v);
    s.finish();
}

#[test]
fn rx_buffer_the_device_may_not_write() {
    let s = Suite::new();
    let mut v = s.victim();
    // Every posted RX buffer loses its WRITE flag: the device must not write a frame there.
    let r = v.ring_addrs(RX).unwrap();
    for i in 0..r.size as u64 {
        let at = r.desc + 16 * i + 12;
        v.memory()
            .write(GuestAddr(at), &0u16.to_le_bytes())
            .unwrap();
    }
    let (rx, rx_len) = v.rx_area();
    let before = {
        let mut b = vec![0u8; rx_len as usize];
        v.memory().read(GuestAddr(rx), &mut b).unwrap();
        b
    };
    let mac = v.mac();
    assert!(v.send(&make_frame(mac, 0, 100)).unwrap());
    assert!(v.wait_config_signal(Duration::from_secs(20)).unwrap());
    assert_ne!(v.status().unwrap() & st::NEEDS_RESET, 0);
    let mut after = vec![0u8; rx_len as usize];
    v.memory().read(GuestAddr(rx), &mut after).unwrap();
    assert!(
        before == after,
        "the device wrote into read-only RX buffers"
    );
    s.finish();
}

#[test]
fn frame_larger_than_any_rx_buffer_is_dropped_and_counted() {
    let s = Suite::new();
    let v = s.victim();
    let uuid = v.uuid();
    let b = buf(&v);
    // 12-byte header + 9000-byte frame: RX buffers hold an MTU of 1500 (no MRG_RXBUF).
    write_descs(&v, TX, &[(b, 12 + 9000, 0, 0)]);
    publish_tx(&v, 0, 1);
    let mut c = s.d.client();
    wait_until("the drop to be counted", Duration::from_secs(20), || {
        c.stats(uuid).unwrap().queues[RX].drops >= 1
    });
    s.finish();
}

#[test]
fn flood_of_kicks() {
    let s = Suite::new();
    let mut v = s.victim();
    for _ in 0..200_000 {
        v.kick(TX).unwrap();
        v.kick(RX).unwrap();
    }
    // The flooded device itself still works.
    let mac = v.mac();
    let mut b = Vec::new();
    assert!(v.send(&make_frame(mac, 7, 100)).unwrap());
    wait_until("frame", Duration::from_secs(20), || {
        v.recv_into(&mut b).unwrap()
    });
    assert_eq!(frame_seq(&b), Some(7));
    s.finish();
}

#[test]
fn memfd_shrunk_after_handover_is_impossible() {
    let s = Suite::new();
    let (mut c, _) = s.raw_victim();
    let m = create_sealed_memfd("m", 1 << 20).unwrap();
    c.add_mem_region(m.as_fd(), 0x10000, 1 << 20, 0).unwrap();
    // The driver tries to cut its memory under the device: the seal says no.
    // SAFETY: ftruncate on an fd we own; it must fail with EPERM (F_SEAL_SHRINK).
    let r = unsafe { libc::ftruncate(m.as_raw_fd(), 4096) };
    let errno = std::io::Error::last_os_error().raw_os_error();
    assert_eq!((r, errno), (-1, Some(libc::EPERM)));
    s.finish();
}

// ------------------------------------------------------------------ setup attacks

/// Hands the raw victim one region and sets queue `q` up at the given ring addresses.
fn raw_queue(c: &mut TransportClient, q: u16, desc: u64, driver: u64, device: u64) -> OwnedFd {
    let kick = vmdev_tests::eventfd();
    c.set_queue_size(q, 256).unwrap();
    c.set_queue_address(q, desc, driver, device).unwrap();
    c.set_queue_kick(q, kick.as_fd()).unwrap();
    c.set_queue_ready(q, true).unwrap();
    kick
}

const ALL: u8 = st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK | st::DRIVER_OK;

#[test]
fn rings_overlapping_each_other() {
    let s = Suite::new();
    let (mut c, _) = s.raw_victim();
    let m = create_sealed_memfd("m", 1 << 20).unwrap();
    c.add_mem_region(m.as_fd(), 0x10000, 1 << 20, 0).unwrap();
    let _k0 = raw_queue(&mut c, 0, 0x10000, 0x20000, 0x30000);
    // Queue 1's used ring lies on queue 0's descriptor table.
    let _k1 = raw_queue(&mut c, 1, 0x40000, 0x50000, 0x10000);
    let e = c.set_status(ALL).unwrap_err();
    assert_eq!(code(e), ErrorCode::BadAddress);
    assert_eq!(c.status().unwrap() & st::DRIVER_OK, 0);
    s.finish();
}

#[test]
fn ring_addresses_changed_after_driver_ok() {
    let s = Suite::new();
    let mut v = s.victim();
    let e = v
        .client()
        .set_queue_address(1, GUEST_BASE, GUEST_BASE, GUEST_BASE)
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::BadState);
    let e = v.client().set_queue_size(1, 16).unwrap_err();
    assert_eq!(code(e), ErrorCode::BadState);
    s.finish();
}

#[test]
fn memory_removed_after_driver_ok() {
    let s = Suite::new();
    let mut v = s.victim();
    let e = v.client().remove_mem_region(GUEST_BASE).unwrap_err();
    assert_eq!(code(e), ErrorCode::BadState);
    s.finish();
}

#[test]
fn feature_bits_not_offered() {
    let s = Suite::new();
    let uuid = s.d.start_device("dp0", &[]);
    let mut c = TransportClient::connect(&s.d.run_dir).unwrap();
    c.open(uuid).unwrap();
    c.set_status(st::ACKNOWLEDGE | st::DRIVER).unwrap();
    c.set_driver_features(f::VERSION_1 | (1 << 63)).unwrap();
    let e = c
        .set_status(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK)
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::BadFeatures);
    assert_eq!(c.status().unwrap() & st::FEATURES_OK, 0);
    s.finish();
}

#[test]
fn status_going_backwards() {
    let s = Suite::new();
    let mut v = s.victim();
    let e = v
        .client()
        .set_status(st::ACKNOWLEDGE | st::DRIVER)
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::BadState);
    assert_ne!(v.status().unwrap() & st::DRIVER_OK, 0, "still running");
    s.finish();
}

#[test]
fn kick_fd_that_is_not_an_eventfd() {
    let s = Suite::new();
    let (mut c, _) = s.raw_victim();
    let m = create_sealed_memfd("m", 1 << 20).unwrap();
    let e = c.set_queue_kick(0, m.as_fd()).unwrap_err();
    assert_eq!(code(e), ErrorCode::BadArgument);
    s.finish();
}

#[test]
fn fd_where_none_is_expected() {
    let s = Suite::new();
    let (mut c, _) = s.raw_victim();
    let extra = vmdev_tests::eventfd();
    // GetStatus takes no fd: the fd is refused or ignored, never kept, and the daemon lives.
    let r = c.request(&Request::GetStatus, &[extra.as_fd()]);
    if let Err(e) = r {
        assert!(
            matches!(
                e,
                ProtoError::Remote(_) | ProtoError::Closed | ProtoError::Io(_)
            ),
            "{e}"
        );
    }
    s.finish();
}

#[test]
fn no_fd_where_one_is_expected() {
    let s = Suite::new();
    let (mut c, _) = s.raw_victim();
    let e = c
        .request(&Request::SetQueueKick { queue: 0 }, &[])
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::MissingFd);
    let e = c
        .request(
            &Request::AddMemRegion {
                guest_addr: 0x10000,
                size: 4096,
                offset: 0,
            },
            &[],
        )
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::MissingFd);
    s.finish();
}

#[test]
fn regions_overlapping_each_other() {
    let s = Suite::new();
    let (mut c, _) = s.raw_victim();
    let m = create_sealed_memfd("m", 1 << 20).unwrap();
    c.add_mem_region(m.as_fd(), 0x10000, 1 << 16, 0).unwrap();
    let e = c
        .add_mem_region(m.as_fd(), 0x18000, 1 << 16, 0)
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::BadMemory);
    s.finish();
}

#[test]
fn region_not_page_aligned() {
    let s = Suite::new();
    let (mut c, _) = s.raw_victim();
    let m = create_sealed_memfd("m", 1 << 20).unwrap();
    let e = c.add_mem_region(m.as_fd(), 0x10010, 4096, 0).unwrap_err();
    assert_eq!(code(e), ErrorCode::BadMemory);
    let e = c.add_mem_region(m.as_fd(), 0x10000, 4096, 16).unwrap_err();
    assert_eq!(code(e), ErrorCode::BadMemory);
    s.finish();
}

#[test]
fn region_larger_than_its_memfd() {
    let s = Suite::new();
    let (mut c, _) = s.raw_victim();
    let m = create_sealed_memfd("m", 1 << 16).unwrap();
    let e = c
        .add_mem_region(m.as_fd(), 0x10000, 1 << 20, 0)
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::BadMemory);
    s.finish();
}

#[test]
fn too_many_regions() {
    let s = Suite::new();
    let (mut c, _) = s.raw_victim();
    let m = create_sealed_memfd("m", 1 << 20).unwrap();
    let mut refused = None;
    for i in 0..100u64 {
        if let Err(e) = c.add_mem_region(m.as_fd(), 0x10_0000 * (i + 1), 4096, 0) {
            refused = Some((i, code(e)));
            break;
        }
    }
    assert_eq!(
        refused,
        Some((64, ErrorCode::BadMemory)),
        "the 65th region is refused"
    );
    s.finish();
}

#[test]
fn queue_size_not_a_power_of_two_and_queue_index_out_of_range() {
    let s = Suite::new();
    let (mut c, _) = s.raw_victim();
    assert_eq!(
        code(c.set_queue_size(0, 100).unwrap_err()),
        ErrorCode::BadQueue
    );
    assert_eq!(
        code(c.set_queue_size(0, 0).unwrap_err()),
        ErrorCode::BadQueue
    );
    assert_eq!(
        code(c.set_queue_size(0, 65535).unwrap_err()),
        ErrorCode::BadQueue
    );
    assert_eq!(
        code(c.set_queue_size(999, 256).unwrap_err()),
        ErrorCode::BadQueue
    );
    s.finish();
}

#[test]
fn config_read_out_of_range() {
    let s = Suite::new();
    let (mut c, _) = s.raw_victim();
    assert_eq!(
        code(c.read_config(8, 100).unwrap_err()),
        ErrorCode::BadArgument
    );
    assert_eq!(
        code(c.read_config(u32::MAX, 2).unwrap_err()),
        ErrorCode::BadArgument
    );
    s.finish();
}

#[test]
fn device_held_by_another_driver() {
    let s = Suite::new();
    let v = s.victim();
    let mut c = TransportClient::connect(&s.d.run_dir).unwrap();
    assert_eq!(code(c.open(v.uuid()).unwrap_err()), ErrorCode::Busy);
    s.finish();
}

// ------------------------------------------------------------------ connection attacks

#[test]
fn a_thousand_connections_at_once() {
    let s = Suite::new();
    let sock = s.d.run_dir.join("control.sock");
    let conns: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    // Served while they hang there.
    let mut c = s.d.client();
    assert_eq!(c.list_types().unwrap().len(), 1);
    drop(conns);
    s.finish();
}

#[test]
fn half_sent_frame() {
    let s = Suite::new();
    let sock = s.d.run_dir.join("control.sock");
    let mut half = UnixStream::connect(&sock).unwrap();
    // A header that promises 1000 bytes, then only 10 of them, and silence.
    let mut h = Vec::new();
    h.extend_from_slice(&1000u32.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&[0u8; 10]);
    half.write_all(&h).unwrap();
    let mut c = s.d.client();
    assert_eq!(
        c.list_types().unwrap().len(),
        1,
        "others are served meanwhile"
    );
    drop(half);
    s.finish();
}

#[test]
fn connections_beyond_the_limit_are_refused_with_a_clear_error() {
    let mut d = Daemons::start_with(&["--max-clients", "8"]);
    d.add_datapath("dp0");
    let sock = d.run_dir.join("control.sock");
    // Fill every slot with connections that never say a word.
    let mut held: Vec<UnixStream> = Vec::new();
    wait_until(
        "all slots taken",
        Duration::from_secs(20),
        || match TransportClient::connect(&d.run_dir) {
            Ok(c) => {
                drop(c);
                held.push(UnixStream::connect(&sock).unwrap());
                false
            }
            Err(e) => {
                assert!(e.to_string().contains("NoCapacity"), "{e}");
                assert!(e.to_string().contains("at most 8 connections"), "{e}");
                true
            }
        },
    );
    // Slots free when their connections go away. (Some held streams may themselves have
    // been refused while a short-lived client still had its slot.)
    drop(held);
    wait_until("a free slot", Duration::from_secs(20), || {
        TransportClient::connect(&d.run_dir).is_ok()
    });
    assert!(d.control_alive());
}
