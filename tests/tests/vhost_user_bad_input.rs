//! Bad input from a hostile vhost-user front end: a raw Unix socket speaking hand-built
//! vhost-user messages to a device's vhost-user door. Each attack is refused the way the
//! vhost-user spec says — a NACK (u64 1) when the front end negotiated REPLY_ACK and set
//! NEED_REPLY, otherwise a closed connection — the attacked device is released when the
//! front end leaves and serves the next one, and the daemons still serve a second, healthy
//! device driven by vmdev's own driver.

use sendfd::SendWithFd;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use vmdev_proto::Uuid;
use vmdev_shm_ring::memory::SealPolicy;
use vmdev_shm_ring::split::{RingFeatures, Segment};
use vmdev_shm_ring::{create_sealed_memfd, DriverQueue, GuestAddr, GuestMemory, SplitLayout};
use vmdev_tests::{frame_seq, make_frame, wait_until, Daemons};
use vmdev_tools::{NetDriver, NetDriverConfig};

/// Bound on every wait in this file.
const TIMEOUT: Duration = Duration::from_secs(20);

// Request codes (FrontendReq).
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const SET_STATUS: u32 = 39;
const GET_STATUS: u32 = 40;

// Header flags.
const VERSION: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;
const REPLY_FLAGS: u32 = 0x5;
/// SET_VRING_KICK/CALL: no fd comes with this message.
const VRING_NOFD: u64 = 0x100;

// Feature bits.
const F_VERSION_1: u64 = 1 << 32;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const PF_REPLY_ACK: u64 = 1 << 3;
const PF_STATUS: u64 = 1 << 16;

/// virtio status bits.
const DRIVER_OK_ALL: u64 = 0x1 | 0x2 | 0x8 | 0x4;

/// Queue size the tests use (the net-loopback default maximum).
const QSIZE: u16 = 256;
/// `struct virtio_net_hdr_v1`.
const NET_HDR: usize = 12;

/// Little-endian u64 payload.
fn u64_payload(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// `struct vhost_vring_state`: {index u32, num u32}.
fn vring_state(index: u32, num: u32) -> Vec<u8> {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&num.to_le_bytes());
    p
}

/// `struct vhost_vring_addr`: {index u32, flags u32, desc u64, used u64, avail u64, log u64}.
fn vring_addr(index: u32, a: RingUva) -> Vec<u8> {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    for v in [a.desc, a.used, a.avail, 0] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

/// One entry of a memory table, as the front end describes it.
#[derive(Debug, Clone, Copy)]
struct Region {
    gpa: u64,
    size: u64,
    uva: u64,
    offset: u64,
}

/// SET_MEM_TABLE payload: u32 nregions, u32 padding, then the regions.
fn mem_table(regions: &[Region]) -> Vec<u8> {
    let mut p = (regions.len() as u32).to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    for r in regions {
        for v in [r.gpa, r.size, r.uva, r.offset] {
            p.extend_from_slice(&v.to_le_bytes());
        }
    }
    p
}

/// A ring's three addresses in the front end's virtual address space.
#[derive(Debug, Clone, Copy)]
struct RingUva {
    desc: u64,
    avail: u64,
    used: u64,
}

/// The memory the well-behaved parts of these tests lay out: one region, ring `q` at
/// `RING_STRIDE * q` (descriptor table, then avail, then used, each on its own page),
/// packet buffers from `BUF_OFFSET`.
const REGION_GPA: u64 = 0x4000_0000;
const REGION_UVA: u64 = 0x7f3a_5000_0000;
const REGION_SIZE: u64 = 4 << 20;
const RING_STRIDE: u64 = 0x1_0000;
const BUF_OFFSET: u64 = 0x10_0000;

fn region() -> Region {
    Region {
        gpa: REGION_GPA,
        size: REGION_SIZE,
        uva: REGION_UVA,
        offset: 0,
    }
}

/// Offsets of ring `q` inside the region.
fn ring_offsets(q: u64) -> (u64, u64, u64) {
    let l = SplitLayout::new(QSIZE);
    let base = q * RING_STRIDE;
    assert!(l.desc_len <= 0x1000 && l.avail_len <= 0x1000 && l.used_len <= 0x1000);
    (base, base + 0x1000, base + 0x2000)
}

fn ring_uva(q: u64) -> RingUva {
    let (d, a, u) = ring_offsets(q);
    RingUva {
        desc: REGION_UVA + d,
        avail: REGION_UVA + a,
        used: REGION_UVA + u,
    }
}

fn eventfd() -> OwnedFd {
    vmdev_tools::sys::eventfd().expect("eventfd")
}

/// A hand-driven vhost-user front end on a raw socket.
struct FrontEnd {
    s: UnixStream,
}

impl FrontEnd {
    fn connect(path: &Path) -> FrontEnd {
        let s = UnixStream::connect(path).expect("connect to the vhost-user socket");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
        FrontEnd { s }
    }

    /// Sends one message; the fds travel with its first byte.
    fn send(&mut self, code: u32, flags: u32, payload: &[u8], fds: &[BorrowedFd<'_>]) {
        let mut m = Vec::with_capacity(12 + payload.len());
        m.extend_from_slice(&code.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let n = self.s.send_with_fd(&m, &raw).expect("sendmsg");
        self.s.write_all(&m[n..]).expect("write the rest");
    }

    /// Reads one reply to `code` and returns its payload.
    fn reply(&mut self, code: u32) -> Vec<u8> {
        let mut h = [0u8; 12];
        self.s
            .read_exact(&mut h)
            .unwrap_or_else(|e| panic!("no reply to request {code}: {e}"));
        let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
        assert_eq!(word(0), code, "the reply echoes the request code");
        assert_eq!(word(4), REPLY_FLAGS, "reply flags");
        let size = word(8) as usize;
        assert!(size <= 4096, "reply of {size} bytes");
        let mut p = vec![0u8; size];
        self.s.read_exact(&mut p).expect("reply payload");
        p
    }

    fn reply_u64(&mut self, code: u32) -> u64 {
        let p = self.reply(code);
        assert_eq!(p.len(), 8, "a u64 reply to request {code}");
        u64::from_le_bytes(p.try_into().unwrap())
    }

    /// Sends with NEED_REPLY; returns the REPLY_ACK value (0 accepted, nonzero refused).
    fn ack(&mut self, code: u32, payload: &[u8], fds: &[BorrowedFd<'_>]) -> u64 {
        self.send(code, VERSION | NEED_REPLY, payload, fds);
        self.reply_u64(code)
    }

    fn accepted(&mut self, what: &str, code: u32, payload: &[u8], fds: &[BorrowedFd<'_>]) {
        assert_eq!(self.ack(code, payload, fds), 0, "{what} was refused");
    }

    fn nacked(&mut self, what: &str, code: u32, payload: &[u8], fds: &[BorrowedFd<'_>]) {
        assert_eq!(self.ack(code, payload, fds), 1, "{what} was not NACKed");
    }

    /// A request with a u64 reply (GET_FEATURES, GET_STATUS, ...).
    fn get(&mut self, code: u32) -> u64 {
        self.send(code, VERSION, &[], &[]);
        self.reply_u64(code)
    }

    /// SET_OWNER, features (VERSION_1 + PROTOCOL_FEATURES) and `protocol` features; ends
    /// with a GET_FEATURES round trip, so everything before it was accepted.
    fn negotiate(&mut self, protocol: u64) {
        self.send(SET_OWNER, VERSION, &[], &[]);
        let offered = self.get(GET_FEATURES);
        assert_eq!(
            offered & (F_VERSION_1 | F_PROTOCOL_FEATURES),
            F_VERSION_1 | F_PROTOCOL_FEATURES,
            "offered features {offered:#x}"
        );
        self.send(
            SET_FEATURES,
            VERSION,
            &u64_payload(F_VERSION_1 | F_PROTOCOL_FEATURES),
            &[],
        );
        let pf = self.get(GET_PROTOCOL_FEATURES);
        assert_eq!(pf & protocol, protocol, "protocol features {pf:#x}");
        self.send(SET_PROTOCOL_FEATURES, VERSION, &u64_payload(protocol), &[]);
        assert_eq!(self.get(GET_FEATURES), offered);
    }

    /// The device closed the connection: a read returns EOF (or a reset) — and no reply.
    fn assert_closed(mut self, what: &str) {
        let mut buf = [0u8; 256];
        match self.s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Ok(n) => panic!("{what}: {n} bytes came back instead of a closed connection"),
            Err(e) => panic!("{what}: the connection was not closed: {e}"),
        }
    }
}

/// What a well-behaved front end holds for rings 0 (RX) and 1 (TX).
struct Rings {
    kicks: Vec<OwnedFd>,
    calls: Vec<OwnedFd>,
}

impl Rings {
    fn new() -> Self {
        Rings {
            kicks: (0..2).map(|_| eventfd()).collect(),
            calls: (0..2).map(|_| eventfd()).collect(),
        }
    }
}

/// Everything of a full setup up to, not including, enabling ring 1 — the message that
/// starts the device. Every message asks for an ACK and must be accepted.
fn setup_until_last_enable(
    fe: &mut FrontEnd,
    mem: BorrowedFd<'_>,
    table: Region,
    addrs: [RingUva; 2],
    rings: &Rings,
) {
    setup_until_last_enable_with(fe, PF_REPLY_ACK, mem, table, addrs, rings)
}

/// [`setup_until_last_enable`] negotiating `protocol` features.
fn setup_until_last_enable_with(
    fe: &mut FrontEnd,
    protocol: u64,
    mem: BorrowedFd<'_>,
    table: Region,
    addrs: [RingUva; 2],
    rings: &Rings,
) {
    fe.negotiate(protocol);
    fe.accepted("SET_MEM_TABLE", SET_MEM_TABLE, &mem_table(&[table]), &[mem]);
    for q in 0..2u32 {
        let i = q as usize;
        fe.accepted(
            "SET_VRING_NUM",
            SET_VRING_NUM,
            &vring_state(q, QSIZE.into()),
            &[],
        );
        fe.accepted(
            "SET_VRING_ADDR",
            SET_VRING_ADDR,
            &vring_addr(q, addrs[i]),
            &[],
        );
        fe.accepted("SET_VRING_BASE", SET_VRING_BASE, &vring_state(q, 0), &[]);
        fe.accepted(
            "SET_VRING_KICK",
            SET_VRING_KICK,
            &u64_payload(q.into()),
            &[rings.kicks[i].as_fd()],
        );
        fe.accepted(
            "SET_VRING_CALL",
            SET_VRING_CALL,
            &u64_payload(q.into()),
            &[rings.calls[i].as_fd()],
        );
    }
    fe.accepted(
        "SET_VRING_ENABLE 0",
        SET_VRING_ENABLE,
        &vring_state(0, 1),
        &[],
    );
}

/// The guest side of the rings in `mem`: puts a frame on TX and waits for it on RX.
struct Guest {
    mem: Arc<GuestMemory>,
    rx: DriverQueue,
    tx: DriverQueue,
}

impl Guest {
    /// Maps `fd` as the region and zeroes both rings (before the device starts).
    fn new(fd: &OwnedFd, policy: SealPolicy) -> Self {
        let mut mem = GuestMemory::new();
        mem.add_region_with(
            fd.try_clone().unwrap(),
            GuestAddr(REGION_GPA),
            REGION_SIZE,
            0,
            policy,
        )
        .expect("map the region");
        let mem = Arc::new(mem);
        let queue = |q: u64| {
            let (d, a, u) = ring_offsets(q);
            DriverQueue::new(
                Arc::clone(&mem),
                QSIZE,
                GuestAddr(REGION_GPA + d),
                GuestAddr(REGION_GPA + a),
                GuestAddr(REGION_GPA + u),
                RingFeatures::from_bits(F_VERSION_1),
            )
            .expect("driver queue")
        };
        let (rx, tx) = (queue(0), queue(1));
        Guest { mem, rx, tx }
    }

    /// One frame through the loopback: RX buffer posted, frame sent on TX, and back.
    fn loop_frame(&mut self, rings: &Rings, seq: u64) {
        let rx_buf = GuestAddr(REGION_GPA + BUF_OFFSET);
        let tx_buf = GuestAddr(REGION_GPA + BUF_OFFSET + 0x1000);
        let frame = make_frame([0x52, 0x54, 0, 1, 2, 3], seq, 200);
        self.rx
            .add(&[Segment {
                addr: rx_buf,
                len: 2048,
                writable: true,
            }])
            .expect("RX descriptor");
        self.rx.publish();
        vmdev_tools::sys::signal(rings.kicks[0].as_fd()).unwrap();
        let mut out = vec![0u8; NET_HDR];
        out.extend_from_slice(&frame);
        self.mem.write(tx_buf, &out).unwrap();
        self.tx
            .add(&[Segment {
                addr: tx_buf,
                len: out.len() as u32,
                writable: false,
            }])
            .expect("TX descriptor");
        self.tx.publish();
        vmdev_tools::sys::signal(rings.kicks[1].as_fd()).unwrap();
        let mut got = None;
        wait_until("the frame back on RX", TIMEOUT, || {
            got = self.rx.pop_used().expect("RX used ring");
            got.is_some()
        });
        let (_, len) = got.unwrap();
        assert_eq!(len as usize, NET_HDR + frame.len());
        let mut back = vec![0u8; frame.len()];
        self.mem
            .read(GuestAddr(rx_buf.0 + NET_HDR as u64), &mut back)
            .unwrap();
        assert_eq!(back, frame);
        wait_until("TX completion", TIMEOUT, || {
            self.tx.pop_used().expect("TX used ring").is_some()
        });
    }
}

/// A control plane, one datapath, a vhost-user device to attack, and a healthy device
/// with vmdev's own driver running.
struct World {
    d: Daemons,
    healthy: NetDriver,
    vu: Uuid,
    sock: PathBuf,
}

fn world() -> World {
    world_with(&[])
}

fn world_with(vu_attrs: &[&str]) -> World {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let sock = d.run_dir.join("vu0.sock");
    let vu = d.start_device_with("dp0", vu_attrs, Some(&sock));
    let uuid = d.start_device("dp0", &[]);
    let healthy =
        NetDriver::open(&d.run_dir, uuid, NetDriverConfig::default()).expect("healthy driver");
    wait_until("the vhost-user socket", TIMEOUT, || sock.exists());
    World {
        d,
        healthy,
        vu,
        sock,
    }
}

impl World {
    fn front_end(&self) -> FrontEnd {
        FrontEnd::connect(&self.sock)
    }

    /// (claimed, attached) of the vhost-user device, from `vmdevctl --json list`.
    fn vu_state(&self) -> (bool, bool) {
        let out = self.d.vmdevctl(&["--json", "list"]);
        assert!(
            out.status.success(),
            "vmdevctl list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("list json");
        let uuid = self.vu.to_string();
        let dev = v
            .as_array()
            .expect("a list of devices")
            .iter()
            .find(|d| d["uuid"].as_str() == Some(uuid.as_str()))
            .expect("the vhost-user device is listed");
        (
            dev["claimed"].as_bool().expect("claimed"),
            dev["attached"].as_bool().expect("attached"),
        )
    }

    fn wait_vu_state(&self, what: &str, want: (bool, bool)) {
        wait_until(what, TIMEOUT, || self.vu_state() == want);
    }

    /// The attacked device was released and serves the next front end; the healthy device
    /// still forwards every frame; no daemon died.
    fn assert_healthy(&mut self) {
        self.wait_vu_state(
            "the vhost-user device to be released (not claimed, not attached)",
            (false, false),
        );
        let mut fe = self.front_end();
        assert_ne!(fe.get(GET_FEATURES) & F_VERSION_1, 0);
        drop(fe);

        let mac = self.healthy.mac();
        let mut buf = Vec::new();
        for seq in 0..1000u64 {
            let f = make_frame(mac, seq, 64 + (seq as usize % 1400));
            assert!(self.healthy.send(&f).expect("send"), "TX ring full");
            wait_until("the frame to come back", TIMEOUT, || {
                self.healthy.recv_into(&mut buf).expect("recv")
            });
            assert_eq!(frame_seq(&buf), Some(seq));
            assert_eq!(buf, f);
        }
        assert!(self.d.control_alive(), "vmdev-control died");
        assert!(self.d.datapaths_alive(), "vmdev-datapath died");
        let st = self.healthy.status().expect("status");
        assert_eq!(
            st & vmdev_proto::virtio::status::NEEDS_RESET,
            0,
            "the healthy device was hurt"
        );
    }
}

#[test]
fn unknown_request_closes_the_connection_without_reply_ack() {
    let mut w = world();
    let mut fe = w.front_end();
    fe.negotiate(0);
    fe.send(0xdead, VERSION | NEED_REPLY, &[], &[]);
    fe.assert_closed("unknown request 0xdead without REPLY_ACK");
    // REPLY_ACK negotiated but NEED_REPLY not set: nobody waits for a NACK either.
    let mut fe = w.front_end();
    fe.negotiate(PF_REPLY_ACK);
    fe.send(0xdead, VERSION, &u64_payload(7), &[]);
    fe.assert_closed("unknown request 0xdead without NEED_REPLY");
    w.assert_healthy();
}

#[test]
fn unknown_request_with_reply_ack_is_nacked_and_the_session_goes_on() {
    let mut w = world();
    let mut fe = w.front_end();
    fe.negotiate(PF_REPLY_ACK);
    fe.nacked("unknown request 0xdead", 0xdead, &[], &[]);
    fe.nacked(
        "unknown request 0xdead with a payload",
        0xdead,
        &[0; 24],
        &[],
    );
    assert_ne!(fe.get(GET_FEATURES) & F_VERSION_1, 0);
    fe.accepted(
        "SET_FEATURES after a NACK",
        SET_FEATURES,
        &u64_payload(F_VERSION_1 | F_PROTOCOL_FEATURES),
        &[],
    );
    drop(fe);
    w.assert_healthy();
}

#[test]
fn wrong_payload_size_is_nacked() {
    let mut w = world();
    let mut fe = w.front_end();
    fe.negotiate(PF_REPLY_ACK);
    fe.nacked(
        "SET_FEATURES with 4 bytes",
        SET_FEATURES,
        &(F_VERSION_1 as u32).to_le_bytes(),
        &[],
    );
    fe.nacked("SET_FEATURES with 16 bytes", SET_FEATURES, &[0u8; 16], &[]);
    fe.nacked(
        "SET_VRING_NUM with 12 bytes",
        SET_VRING_NUM,
        &[0u8; 12],
        &[],
    );
    let mut short = vring_state(0, QSIZE.into());
    short.pop();
    fe.nacked("SET_VRING_NUM with 7 bytes", SET_VRING_NUM, &short, &[]);
    let mut addr = vring_addr(0, ring_uva(0));
    addr.truncate(32);
    fe.nacked("SET_VRING_ADDR with 32 bytes", SET_VRING_ADDR, &addr, &[]);
    // A memory table whose size disagrees with its region count.
    let mem = create_sealed_memfd("vu", REGION_SIZE).unwrap();
    let mut table = mem_table(&[region()]);
    table.extend_from_slice(&[0u8; 8]);
    fe.nacked(
        "SET_MEM_TABLE with 8 trailing bytes",
        SET_MEM_TABLE,
        &table,
        &[mem.as_fd()],
    );
    assert_ne!(fe.get(GET_FEATURES) & F_VERSION_1, 0, "still answering");
    drop(fe);
    // Without REPLY_ACK the same mistake closes the connection.
    let mut fe = w.front_end();
    fe.negotiate(0);
    fe.send(SET_VRING_NUM, VERSION, &[0u8; 12], &[]);
    fe.assert_closed("SET_VRING_NUM with 12 bytes, no REPLY_ACK");
    // A payload larger than any request: the stream cannot be trusted, close even with
    // REPLY_ACK.
    let mut fe = w.front_end();
    fe.negotiate(PF_REPLY_ACK);
    fe.send(SET_FEATURES, VERSION | NEED_REPLY, &vec![0u8; 8192], &[]);
    fe.assert_closed("an 8 KiB payload");
    w.assert_healthy();
}

#[test]
fn bad_header_flags_close_the_connection() {
    let mut w = world();
    let mut fe = w.front_end();
    fe.negotiate(PF_REPLY_ACK);
    fe.send(GET_FEATURES, 0x2, &[], &[]);
    fe.assert_closed("version 2");
    let mut fe = w.front_end();
    fe.negotiate(PF_REPLY_ACK);
    fe.send(GET_FEATURES, VERSION | NEED_REPLY | 0x100, &[], &[]);
    fe.assert_closed("unknown flag bits");
    w.assert_healthy();
}

#[test]
fn mem_table_with_nine_regions_is_refused() {
    let mut w = world();
    let mut fe = w.front_end();
    fe.negotiate(PF_REPLY_ACK);
    let fds: Vec<OwnedFd> = (0..9)
        .map(|_| create_sealed_memfd("vu", 0x10_0000).unwrap())
        .collect();
    let regions: Vec<Region> = (0..9u64)
        .map(|i| Region {
            gpa: i * 0x10_0000,
            size: 0x10_0000,
            uva: REGION_UVA + i * 0x10_0000,
            offset: 0,
        })
        .collect();
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    fe.nacked("9 regions", SET_MEM_TABLE, &mem_table(&regions), &borrowed);
    fe.nacked("0 regions", SET_MEM_TABLE, &mem_table(&[]), &[]);
    // The first eight are a fine table.
    fe.accepted(
        "8 regions",
        SET_MEM_TABLE,
        &mem_table(&regions[..8]),
        &borrowed[..8],
    );
    drop(fe);
    // Without REPLY_ACK the connection closes.
    let mut fe = w.front_end();
    fe.negotiate(0);
    fe.send(SET_MEM_TABLE, VERSION, &mem_table(&regions), &borrowed);
    fe.assert_closed("9 regions without REPLY_ACK");
    w.assert_healthy();
}

#[test]
fn overlapping_mem_regions_are_refused() {
    let mut w = world();
    let mut fe = w.front_end();
    fe.negotiate(PF_REPLY_ACK);
    let a = create_sealed_memfd("a", 0x20_0000).unwrap();
    let b = create_sealed_memfd("b", 0x20_0000).unwrap();
    let first = Region {
        gpa: 0x10_0000,
        size: 0x20_0000,
        uva: REGION_UVA,
        offset: 0,
    };
    // Overlapping guest addresses, distinct front-end addresses.
    let gpa_overlap = Region {
        gpa: 0x20_0000,
        uva: REGION_UVA + 0x100_0000,
        ..first
    };
    fe.nacked(
        "regions overlapping in guest physical addresses",
        SET_MEM_TABLE,
        &mem_table(&[first, gpa_overlap]),
        &[a.as_fd(), b.as_fd()],
    );
    // Distinct guest addresses, overlapping front-end addresses.
    let uva_overlap = Region {
        gpa: 0x100_0000,
        uva: REGION_UVA + 0x1000,
        ..first
    };
    fe.nacked(
        "regions overlapping in front-end addresses",
        SET_MEM_TABLE,
        &mem_table(&[first, uva_overlap]),
        &[a.as_fd(), b.as_fd()],
    );
    // The same region twice.
    fe.nacked(
        "a region listed twice",
        SET_MEM_TABLE,
        &mem_table(&[first, first]),
        &[a.as_fd(), a.as_fd()],
    );
    // Adjacent is fine.
    let adjacent = Region {
        gpa: first.gpa + first.size,
        uva: first.uva + first.size,
        ..first
    };
    fe.accepted(
        "adjacent regions",
        SET_MEM_TABLE,
        &mem_table(&[first, adjacent]),
        &[a.as_fd(), b.as_fd()],
    );
    drop(fe);
    w.assert_healthy();
}

/// A memfd created without MFD_ALLOW_SEALING: it can never be sealed (DPDK's kind).
fn unsealable_memfd(size: u64) -> OwnedFd {
    let m = memfd::MemfdOptions::default()
        .allow_sealing(false)
        .create("unsealable")
        .unwrap();
    m.as_file().set_len(size).unwrap();
    OwnedFd::from(m.into_file())
}

fn seals(fd: BorrowedFd<'_>) -> i32 {
    // SAFETY: F_GET_SEALS only reads the seal set of the file behind `fd`.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) }
}

#[test]
fn unsealed_memfd_is_refused() {
    let mut w = world();
    let mut fe = w.front_end();
    fe.negotiate(PF_REPLY_ACK);
    let m = unsealable_memfd(REGION_SIZE);
    fe.nacked(
        "an unsealable memfd",
        SET_MEM_TABLE,
        &mem_table(&[region()]),
        &[m.as_fd()],
    );
    // A regular file is no memfd at all.
    let f = std::fs::File::open(vmdev_tests::bin_path("vmdev-control")).unwrap();
    fe.nacked(
        "a regular file",
        SET_MEM_TABLE,
        &mem_table(&[Region {
            size: 0x1000,
            ..region()
        }]),
        &[f.as_fd()],
    );
    // Sealed, but smaller than the region claims.
    let small = create_sealed_memfd("small", 0x1000).unwrap();
    fe.nacked(
        "a memfd smaller than its region",
        SET_MEM_TABLE,
        &mem_table(&[region()]),
        &[small.as_fd()],
    );
    // Unsealed but sealable memory gets the seal added, and is accepted.
    let sealable = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .create("sealable")
        .unwrap();
    sealable.as_file().set_len(REGION_SIZE).unwrap();
    let sealable = OwnedFd::from(sealable.into_file());
    assert_eq!(seals(sealable.as_fd()) & libc::F_SEAL_SHRINK, 0);
    fe.accepted(
        "a sealable memfd",
        SET_MEM_TABLE,
        &mem_table(&[region()]),
        &[sealable.as_fd()],
    );
    assert_ne!(
        seals(sealable.as_fd()) & libc::F_SEAL_SHRINK,
        0,
        "vmdev sealed the memfd against shrinking"
    );
    drop(fe);
    w.assert_healthy();
}

#[test]
fn unsealed_memfd_is_accepted_with_the_attribute() {
    let mut w = world_with(&["unsealed-memory=accept"]);
    let mut fe = w.front_end();
    let m = unsealable_memfd(REGION_SIZE);
    let rings = Rings::new();
    let mut guest = Guest::new(&m, SealPolicy::Trusted);
    setup_until_last_enable(
        &mut fe,
        m.as_fd(),
        region(),
        [ring_uva(0), ring_uva(1)],
        &rings,
    );
    fe.accepted(
        "SET_VRING_ENABLE 1 (starts the device)",
        SET_VRING_ENABLE,
        &vring_state(1, 1),
        &[],
    );
    w.wait_vu_state("the device attached", (true, true));
    for seq in 0..10 {
        guest.loop_frame(&rings, seq);
    }
    drop(fe);
    w.assert_healthy();
}

#[test]
fn ring_outside_memory_table_is_nacked_at_start() {
    let mut w = world();
    let mut fe = w.front_end();
    let mem = create_sealed_memfd("vu", REGION_SIZE).unwrap();
    let rings = Rings::new();
    let mut bad = ring_uva(1);
    bad.avail = REGION_UVA + REGION_SIZE + 0x1000; // past the only region
    setup_until_last_enable(&mut fe, mem.as_fd(), region(), [ring_uva(0), bad], &rings);
    fe.nacked(
        "SET_VRING_ENABLE 1 with TX avail outside every region",
        SET_VRING_ENABLE,
        &vring_state(1, 1),
        &[],
    );
    assert_eq!(
        w.vu_state(),
        (true, false),
        "held by the front end, not attached"
    );
    // Correct addresses start it.
    let mut guest = Guest::new(&mem, SealPolicy::Required);
    fe.accepted(
        "SET_VRING_ADDR 1 inside the region",
        SET_VRING_ADDR,
        &vring_addr(1, ring_uva(1)),
        &[],
    );
    w.wait_vu_state("the device attached", (true, true));
    guest.loop_frame(&rings, 1);
    drop(fe);
    w.assert_healthy();
}

#[test]
fn ring_straddling_the_end_of_its_region_is_nacked_at_start() {
    let mut w = world();
    let mut fe = w.front_end();
    let mem = create_sealed_memfd("vu", REGION_SIZE).unwrap();
    let rings = Rings::new();
    let mut bad = ring_uva(1);
    bad.used = REGION_UVA + REGION_SIZE - 0x100; // starts inside, 6 + 8 * 256 bytes do not fit
    setup_until_last_enable(&mut fe, mem.as_fd(), region(), [ring_uva(0), bad], &rings);
    fe.nacked(
        "SET_VRING_ENABLE 1 with TX used ring straddling the region's end",
        SET_VRING_ENABLE,
        &vring_state(1, 1),
        &[],
    );
    assert_eq!(
        w.vu_state(),
        (true, false),
        "held by the front end, not attached"
    );
    drop(fe);
    w.assert_healthy();
}

/// After a start was NACKed, requests that have nothing to do with it are still answered
/// as the spec says: GET_FEATURES returns the features, with or without NEED_REPLY.
#[test]
fn failed_start_does_not_break_later_requests() {
    let mut w = world();
    let mut fe = w.front_end();
    let mem = create_sealed_memfd("vu", REGION_SIZE).unwrap();
    let rings = Rings::new();
    let mut bad = ring_uva(1);
    bad.avail = REGION_UVA + REGION_SIZE + 0x1000;
    setup_until_last_enable(&mut fe, mem.as_fd(), region(), [ring_uva(0), bad], &rings);
    fe.nacked(
        "SET_VRING_ENABLE 1 with TX avail outside every region",
        SET_VRING_ENABLE,
        &vring_state(1, 1),
        &[],
    );
    // With NEED_REPLY: GET_FEATURES has a reply of its own, the features.
    fe.send(GET_FEATURES, VERSION | NEED_REPLY, &[], &[]);
    let got = fe.reply_u64(GET_FEATURES);
    assert_ne!(
        got & F_VERSION_1,
        0,
        "GET_FEATURES (NEED_REPLY) after a failed start answered {got:#x}, not the features"
    );
    // Without NEED_REPLY: answered too, not a closed connection.
    fe.send(GET_FEATURES, VERSION, &[], &[]);
    let mut h = [0u8; 12];
    if let Err(e) = fe.s.read_exact(&mut h) {
        panic!("GET_FEATURES after a failed start: no reply, the door closed the connection ({e})");
    }
    drop(fe);
    w.assert_healthy();
}

#[test]
fn vring_index_beyond_the_queue_count_is_nacked() {
    let mut w = world();
    let mut fe = w.front_end();
    fe.negotiate(PF_REPLY_ACK);
    fe.nacked(
        "SET_VRING_NUM index 50",
        SET_VRING_NUM,
        &vring_state(50, QSIZE.into()),
        &[],
    );
    fe.nacked(
        "SET_VRING_NUM index 3 (one past the control queue)",
        SET_VRING_NUM,
        &vring_state(3, QSIZE.into()),
        &[],
    );
    fe.nacked(
        "SET_VRING_NUM index u32::MAX",
        SET_VRING_NUM,
        &vring_state(u32::MAX, QSIZE.into()),
        &[],
    );
    fe.nacked(
        "SET_VRING_ADDR index 50",
        SET_VRING_ADDR,
        &vring_addr(50, ring_uva(0)),
        &[],
    );
    fe.nacked(
        "SET_VRING_BASE index 50",
        SET_VRING_BASE,
        &vring_state(50, 0),
        &[],
    );
    fe.nacked(
        "SET_VRING_KICK index 50",
        SET_VRING_KICK,
        &u64_payload(50 | VRING_NOFD),
        &[],
    );
    let call = eventfd();
    fe.nacked(
        "SET_VRING_CALL index 50",
        SET_VRING_CALL,
        &u64_payload(50),
        &[call.as_fd()],
    );
    fe.nacked(
        "SET_VRING_ENABLE index 50",
        SET_VRING_ENABLE,
        &vring_state(50, 1),
        &[],
    );
    fe.nacked(
        "GET_VRING_BASE index 50",
        GET_VRING_BASE,
        &vring_state(50, 0),
        &[],
    );
    // Sizes that are no queue size.
    fe.nacked(
        "SET_VRING_NUM size 0",
        SET_VRING_NUM,
        &vring_state(0, 0),
        &[],
    );
    fe.nacked(
        "SET_VRING_NUM size 100",
        SET_VRING_NUM,
        &vring_state(0, 100),
        &[],
    );
    fe.nacked(
        "SET_VRING_NUM size 65536",
        SET_VRING_NUM,
        &vring_state(0, 65536),
        &[],
    );
    fe.accepted(
        "SET_VRING_NUM index 2 (the control queue)",
        SET_VRING_NUM,
        &vring_state(2, 64),
        &[],
    );
    drop(fe);
    // Without REPLY_ACK the connection closes.
    let mut fe = w.front_end();
    fe.negotiate(0);
    fe.send(SET_VRING_NUM, VERSION, &vring_state(50, QSIZE.into()), &[]);
    fe.assert_closed("SET_VRING_NUM index 50 without REPLY_ACK");
    w.assert_healthy();
}

#[test]
fn missing_fd_is_nacked() {
    let mut w = world();
    let mut fe = w.front_end();
    fe.negotiate(PF_REPLY_ACK);
    fe.nacked(
        "SET_VRING_KICK without NOFD and without an fd",
        SET_VRING_KICK,
        &u64_payload(0),
        &[],
    );
    fe.nacked(
        "SET_VRING_CALL without NOFD and without an fd",
        SET_VRING_CALL,
        &u64_payload(1),
        &[],
    );
    fe.nacked(
        "SET_MEM_TABLE with one region and no fd",
        SET_MEM_TABLE,
        &mem_table(&[region()]),
        &[],
    );
    let a = create_sealed_memfd("a", 0x10_0000).unwrap();
    let two = [
        Region {
            gpa: 0,
            size: 0x10_0000,
            uva: REGION_UVA,
            offset: 0,
        },
        Region {
            gpa: 0x10_0000,
            size: 0x10_0000,
            uva: REGION_UVA + 0x10_0000,
            offset: 0,
        },
    ];
    fe.nacked(
        "SET_MEM_TABLE with two regions and one fd",
        SET_MEM_TABLE,
        &mem_table(&two),
        &[a.as_fd()],
    );
    fe.accepted(
        "SET_VRING_KICK with NOFD",
        SET_VRING_KICK,
        &u64_payload(VRING_NOFD),
        &[],
    );
    drop(fe);
    let mut fe = w.front_end();
    fe.negotiate(0);
    fe.send(SET_VRING_KICK, VERSION, &u64_payload(0), &[]);
    fe.assert_closed("SET_VRING_KICK without an fd, no REPLY_ACK");
    w.assert_healthy();
}

#[test]
fn extra_fd_is_nacked() {
    let mut w = world();
    let mut fe = w.front_end();
    fe.negotiate(PF_REPLY_ACK);
    let e = eventfd();
    fe.send(GET_FEATURES, VERSION | NEED_REPLY, &[], &[e.as_fd()]);
    assert_eq!(
        fe.reply_u64(GET_FEATURES),
        1,
        "GET_FEATURES with an fd was answered"
    );
    fe.nacked(
        "SET_FEATURES with an fd",
        SET_FEATURES,
        &u64_payload(F_VERSION_1 | F_PROTOCOL_FEATURES),
        &[e.as_fd()],
    );
    fe.nacked(
        "SET_VRING_KICK with NOFD and an fd",
        SET_VRING_KICK,
        &u64_payload(VRING_NOFD),
        &[e.as_fd()],
    );
    let f = eventfd();
    fe.nacked(
        "SET_VRING_CALL with two fds",
        SET_VRING_CALL,
        &u64_payload(0),
        &[e.as_fd(), f.as_fd()],
    );
    let mem = create_sealed_memfd("vu", REGION_SIZE).unwrap();
    fe.nacked(
        "SET_MEM_TABLE with one region and two fds",
        SET_MEM_TABLE,
        &mem_table(&[region()]),
        &[mem.as_fd(), e.as_fd()],
    );
    // Many fds on one message (more than the door's receive buffer holds).
    let many: Vec<OwnedFd> = (0..40).map(|_| eventfd()).collect();
    let many_b: Vec<BorrowedFd<'_>> = many.iter().map(|f| f.as_fd()).collect();
    fe.nacked("SET_OWNER with 40 fds", SET_OWNER, &[], &many_b);
    assert_ne!(fe.get(GET_FEATURES) & F_VERSION_1, 0, "still answering");
    drop(fe);
    let mut fe = w.front_end();
    fe.negotiate(0);
    fe.send(GET_FEATURES, VERSION, &[], &[e.as_fd()]);
    fe.assert_closed("GET_FEATURES with an fd, no REPLY_ACK");
    w.assert_healthy();
}

/// A front end with a running device that vanishes after `partial` bytes of a message.
fn vanish_mid_message(partial: &[u8]) {
    let mut w = world();
    let mut fe = w.front_end();
    let mem = create_sealed_memfd("vu", REGION_SIZE).unwrap();
    let rings = Rings::new();
    setup_until_last_enable(
        &mut fe,
        mem.as_fd(),
        region(),
        [ring_uva(0), ring_uva(1)],
        &rings,
    );
    fe.accepted(
        "SET_VRING_ENABLE 1",
        SET_VRING_ENABLE,
        &vring_state(1, 1),
        &[],
    );
    w.wait_vu_state("the device attached", (true, true));
    fe.s.write_all(partial).unwrap();
    drop(fe);
    w.wait_vu_state("the device released", (false, false));
    // A new front end is answered and can start the device again.
    let mut fe = w.front_end();
    assert_ne!(fe.get(GET_FEATURES) & F_VERSION_1, 0);
    let rings = Rings::new();
    let mut guest = Guest::new(&mem, SealPolicy::Required);
    setup_until_last_enable(
        &mut fe,
        mem.as_fd(),
        region(),
        [ring_uva(0), ring_uva(1)],
        &rings,
    );
    fe.accepted(
        "SET_VRING_ENABLE 1",
        SET_VRING_ENABLE,
        &vring_state(1, 1),
        &[],
    );
    w.wait_vu_state("the device attached again", (true, true));
    guest.loop_frame(&rings, 1);
    drop(fe);
    w.assert_healthy();
}

#[test]
fn front_end_vanishing_mid_header_releases_the_device() {
    let hdr = GET_FEATURES.to_le_bytes();
    vanish_mid_message(&[hdr[0], hdr[1], hdr[2], hdr[3], 0x1, 0]);
}

#[test]
fn front_end_vanishing_mid_payload_releases_the_device() {
    let mut m = SET_MEM_TABLE.to_le_bytes().to_vec();
    m.extend_from_slice(&VERSION.to_le_bytes());
    m.extend_from_slice(&40u32.to_le_bytes());
    m.extend_from_slice(&[0u8; 10]);
    vanish_mid_message(&m);
}

#[test]
fn front_end_that_disconnects_and_reconnects_gets_a_clean_device() {
    let mut w = world();
    let mem = create_sealed_memfd("vu", REGION_SIZE).unwrap();
    let mut fe = w.front_end();
    let rings = Rings::new();
    let mut guest = Guest::new(&mem, SealPolicy::Required);
    setup_until_last_enable(
        &mut fe,
        mem.as_fd(),
        region(),
        [ring_uva(0), ring_uva(1)],
        &rings,
    );
    fe.accepted(
        "SET_VRING_ENABLE 1 (starts the device)",
        SET_VRING_ENABLE,
        &vring_state(1, 1),
        &[],
    );
    w.wait_vu_state("the device attached", (true, true));
    for seq in 0..10 {
        guest.loop_frame(&rings, seq);
    }
    drop(fe);
    w.wait_vu_state("the device released", (false, false));

    // The next front end negotiates STATUS and finds a device that knows nothing.
    let mut fe = w.front_end();
    fe.negotiate(PF_REPLY_ACK | PF_STATUS);
    assert_eq!(fe.get(GET_STATUS), 0, "a clean device after reconnect");
    assert_eq!(w.vu_state(), (true, false));
    // Its rings start from wherever the new front end says (zeroed rings, base 0), and
    // the device only starts at DRIVER_OK.
    let rings = Rings::new();
    let mut guest = Guest::new(&mem, SealPolicy::Required);
    fe.accepted(
        "SET_MEM_TABLE",
        SET_MEM_TABLE,
        &mem_table(&[region()]),
        &[mem.as_fd()],
    );
    for q in 0..2u32 {
        let i = q as usize;
        fe.accepted(
            "SET_VRING_NUM",
            SET_VRING_NUM,
            &vring_state(q, QSIZE.into()),
            &[],
        );
        fe.accepted(
            "SET_VRING_ADDR",
            SET_VRING_ADDR,
            &vring_addr(q, ring_uva(q.into())),
            &[],
        );
        fe.accepted("SET_VRING_BASE", SET_VRING_BASE, &vring_state(q, 0), &[]);
        fe.accepted(
            "SET_VRING_KICK",
            SET_VRING_KICK,
            &u64_payload(q.into()),
            &[rings.kicks[i].as_fd()],
        );
        fe.accepted(
            "SET_VRING_CALL",
            SET_VRING_CALL,
            &u64_payload(q.into()),
            &[rings.calls[i].as_fd()],
        );
        fe.accepted(
            "SET_VRING_ENABLE",
            SET_VRING_ENABLE,
            &vring_state(q, 1),
            &[],
        );
    }
    assert_eq!(w.vu_state(), (true, false), "not started before DRIVER_OK");
    fe.accepted(
        "SET_STATUS DRIVER_OK",
        SET_STATUS,
        &u64_payload(DRIVER_OK_ALL),
        &[],
    );
    assert_eq!(fe.get(GET_STATUS), DRIVER_OK_ALL);
    w.wait_vu_state("the device attached", (true, true));
    for seq in 0..10 {
        guest.loop_frame(&rings, seq);
    }
    drop(fe);
    w.assert_healthy();
}

#[test]
fn descriptor_loop_from_a_front_end_marks_only_that_device_needs_reset() {
    let mut w = world();
    let mem = create_sealed_memfd("vu", REGION_SIZE).unwrap();
    let mut fe = w.front_end();
    let rings = Rings::new();
    let guest = Guest::new(&mem, SealPolicy::Required);
    setup_until_last_enable(
        &mut fe,
        mem.as_fd(),
        region(),
        [ring_uva(0), ring_uva(1)],
        &rings,
    );
    fe.accepted(
        "SET_VRING_ENABLE 1",
        SET_VRING_ENABLE,
        &vring_state(1, 1),
        &[],
    );
    w.wait_vu_state("the device attached", (true, true));
    // TX descriptor 0 chains to itself, published as avail entry 0, kicked.
    let (desc, avail, _) = ring_offsets(1);
    let mut d = Vec::new();
    d.extend_from_slice(&(REGION_GPA + BUF_OFFSET).to_le_bytes());
    d.extend_from_slice(&64u32.to_le_bytes());
    d.extend_from_slice(&1u16.to_le_bytes()); // NEXT
    d.extend_from_slice(&0u16.to_le_bytes()); // itself
    guest.mem.write(GuestAddr(REGION_GPA + desc), &d).unwrap();
    guest
        .mem
        .write(GuestAddr(REGION_GPA + avail + 4), &0u16.to_le_bytes())
        .unwrap();
    guest
        .mem
        .write(GuestAddr(REGION_GPA + avail + 2), &1u16.to_le_bytes())
        .unwrap();
    vmdev_tools::sys::signal(rings.kicks[1].as_fd()).unwrap();
    let needs_reset = vmdev_proto::virtio::status::NEEDS_RESET as u64;
    wait_until("NEEDS_RESET in GET_STATUS", TIMEOUT, || {
        fe.get(GET_STATUS) & needs_reset != 0
    });
    drop(fe);
    w.assert_healthy();
}

#[test]
fn front_end_is_turned_away_while_a_vmdev_driver_holds_the_device() {
    let mut w = world();
    let drv = NetDriver::open(&w.d.run_dir, w.vu, NetDriverConfig::default())
        .expect("vmdev driver on the vhost-user device");
    w.wait_vu_state("the device held by the vmdev driver", (true, true));
    w.front_end()
        .assert_closed("a front end while a vmdev driver holds the device");
    drop(drv);
    w.wait_vu_state("the device released", (false, false));
    // And the other way round: a front end holds it, a vmdev driver is told Busy.
    let mut fe = w.front_end();
    fe.negotiate(PF_REPLY_ACK);
    let mut c = w.d.client();
    match c.open(w.vu) {
        Err(vmdev_proto::ProtoError::Remote(e)) => {
            assert_eq!(e.code, vmdev_proto::ErrorCode::Busy)
        }
        other => panic!("open while a front end holds the device: {other:?}"),
    }
    drop(fe);
    w.assert_healthy();
}

#[test]
fn refused_driver_ok_is_not_reported_by_get_status() {
    let mut w = world();
    let mut fe = w.front_end();
    let mem = create_sealed_memfd("vu", REGION_SIZE).unwrap();
    let rings = Rings::new();
    let mut bad = ring_uva(1);
    bad.avail = REGION_UVA + REGION_SIZE + 0x1000; // past the only region
    let addrs = [ring_uva(0), bad];
    setup_until_last_enable_with(
        &mut fe,
        PF_REPLY_ACK | PF_STATUS,
        mem.as_fd(),
        region(),
        addrs,
        &rings,
    );
    fe.accepted(
        "SET_VRING_ENABLE 1 (the device waits for DRIVER_OK)",
        SET_VRING_ENABLE,
        &vring_state(1, 1),
        &[],
    );
    fe.nacked(
        "SET_STATUS DRIVER_OK with a ring outside memory",
        SET_STATUS,
        &u64_payload(DRIVER_OK_ALL),
        &[],
    );
    assert_eq!(
        fe.get(GET_STATUS) & 0x4,
        0,
        "no DRIVER_OK after a refused start"
    );
    assert_eq!(w.vu_state(), (true, false));
    drop(fe);
    w.assert_healthy();
}
