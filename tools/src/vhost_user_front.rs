//! The front-end side of vhost-user: this process drives a vhost-user back end (vmdev's own
//! vhost-user door, DPDK's vhost PMD, any vhost-user-net device) the way QEMU does, through
//! the rust-vmm `vhost` crate's [`Frontend`].
//!
//! How the virtio transport operations of [`crate::DeviceTransport`] map onto vhost-user:
//!
//! * **Connection** ([`VhostUserFront::connect`]): GET_FEATURES; when the back end offers
//!   `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30), GET_PROTOCOL_FEATURES and
//!   SET_PROTOCOL_FEATURES acking what is offered of REPLY_ACK, CONFIG, STATUS and
//!   RESET_DEVICE; then SET_OWNER — QEMU's order.
//! * **Features**: the device features are GET_FEATURES without bit 30 (a vhost-user bit,
//!   not a virtio one); SET_FEATURES sends the driver's features plus bit 30 whenever it was
//!   offered, so the rings are gated by SET_VRING_ENABLE.
//! * **Status**: with the STATUS protocol feature every status write is a SET_STATUS and
//!   every read a GET_STATUS (the crate has no call for either, so those two messages are
//!   written on a second handle of the same socket, between the crate's requests). Without
//!   it the status is kept here.
//! * **Setup**: memory regions, ring sizes, addresses and eventfds are recorded, and sent at
//!   DRIVER_OK, in QEMU's order: SET_MEM_TABLE (the memfd, at the driver's guest address,
//!   with this process's mapping address as `userspace_addr`), then per queue SET_VRING_NUM,
//!   SET_VRING_BASE(0; 0x8000 for a packed ring: index 0, wrap counter 1 in bit 15),
//!   SET_VRING_ADDR (front-end virtual addresses: the guest addresses
//!   translated through the memory table), SET_VRING_KICK, SET_VRING_CALL, then
//!   SET_VRING_ENABLE(1) per ready queue when bit 30 was acked, and finally
//!   SET_STATUS(DRIVER_OK) if STATUS was negotiated.
//! * **Reset**: SET_VRING_ENABLE(0) and GET_VRING_BASE per started ring (which stops it),
//!   then SET_STATUS(0) with STATUS or RESET_DEVICE with RESET_DEVICE.
//! * **Config space**: GET_CONFIG with the CONFIG protocol feature; without it
//!   [`VhostUserFront::read_config`] fails (nothing is synthesised) and
//!   [`crate::DeviceTransport::config_readable`] says so, so the driver negotiates no
//!   feature whose value lives there.
//! * **Queue size**: vhost-user has no query for the largest ring; [`DEFAULT_QUEUE_MAX`]
//!   (QEMU's default for vhost-user-net) unless set with [`VhostUserFront::set_queue_max`].
//!
//! With REPLY_ACK negotiated every request without a reply of its own asks for an ack, so
//! a back end's refusal (say, of a memory table) is an error of that very request.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures as PF};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmdev_proto::virtio::status as st;
use vmdev_shm_ring::{GuestAddr, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

/// The vhost-user protocol feature bits (from the `vhost` crate), as
/// [`VhostUserFront::protocol_features`] reports them.
pub use vhost::vhost_user::VhostUserProtocolFeatures;

/// `VHOST_USER_F_PROTOCOL_FEATURES`: the back end speaks protocol features; acked, it also
/// makes every ring start disabled until SET_VRING_ENABLE.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Largest ring size assumed for a back end (vhost-user cannot be asked): QEMU's default
/// `rx_queue_size`/`tx_queue_size` for vhost-user-net, which every back end accepts.
pub const DEFAULT_QUEUE_MAX: u16 = 256;

/// Protocol features this front end uses when offered.
const WANTED_PROTOCOL: PF = PF::REPLY_ACK
    .union(PF::CONFIG)
    .union(PF::STATUS)
    .union(PF::RESET_DEVICE);

/// Highest vring index + 1 the crate lets us address (vring fd messages carry 8 bits).
const MAX_VRINGS: u64 = 256;

/// How long a reply may take before the back end is declared hung.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// `VHOST_USER_SET_STATUS`.
const REQ_SET_STATUS: u32 = 39;
/// `VHOST_USER_GET_STATUS`.
const REQ_GET_STATUS: u32 = 40;
/// Header flags: protocol version 1.
const HDR_VERSION: u32 = 0x1;
/// Header flags: a reply.
const HDR_REPLY: u32 = 0x4;
/// Header flags: the front end wants an ack.
const HDR_NEED_REPLY: u32 = 0x8;

/// Failures of the vhost-user front end; each names the socket and, where one was sent, the
/// vhost-user request.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserFrontError {
    /// Nothing accepted the connection (no socket, nobody listening, no permission).
    #[error("connecting to the vhost-user socket {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A request failed: the socket broke, the back end refused it (NACK), or its reply was
    /// malformed or did not come within 10 s.
    #[error("vhost-user {req} on {path}: {msg}")]
    Request {
        /// The socket.
        path: PathBuf,
        /// The request, e.g. `SET_MEM_TABLE`.
        req: &'static str,
        /// What went wrong.
        msg: String,
    },
    /// The back end cannot do what was asked (a missing protocol feature), or the driver
    /// asked for something this front end cannot express.
    #[error("vhost-user back end {path}: {msg}")]
    Unsupported {
        /// The socket.
        path: PathBuf,
        /// What is missing.
        msg: String,
    },
}

/// One memory region as the back end is told about it.
#[derive(Debug)]
struct Region {
    gpa: u64,
    size: u64,
    uva: u64,
    offset: u64,
    fd: OwnedFd,
}

/// What the driver set up for one ring.
#[derive(Debug, Default)]
struct Ring {
    size: Option<u16>,
    addr: Option<(u64, u64, u64)>,
    kick: Option<EventFd>,
    call: Option<EventFd>,
    ready: bool,
}

/// What the watchdog thread and the requests share.
#[derive(Debug, Default)]
struct WatchState {
    deadline: Option<Instant>,
    fired: bool,
    quit: bool,
}

/// Cuts the connection when a request of the `vhost` crate gets no reply in time: the crate
/// retries timed-out reads forever, so a socket timeout alone cannot end the wait.
#[derive(Debug)]
struct Watchdog {
    state: Arc<(Mutex<WatchState>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn new(sock: UnixStream) -> std::io::Result<Self> {
        let state = Arc::new((Mutex::new(WatchState::default()), Condvar::new()));
        let st = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("vhost-user-watchdog".into())
            .spawn(move || {
                let (m, cv) = &*st;
                let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if g.quit {
                        return;
                    }
                    match g.deadline {
                        None => g = cv.wait(g).unwrap_or_else(|p| p.into_inner()),
                        Some(d) => {
                            let now = Instant::now();
                            if now >= d {
                                let _ = sock.shutdown(std::net::Shutdown::Both);
                                g.fired = true;
                                g.deadline = None;
                            } else {
                                g = cv
                                    .wait_timeout(g, d - now)
                                    .unwrap_or_else(|p| p.into_inner())
                                    .0;
                            }
                        }
                    }
                }
            })?;
        Ok(Watchdog {
            state,
            thread: Some(thread),
        })
    }

    /// Arms (`Some`) or disarms (`None`) the watchdog; returns whether it ever fired.
    fn set(&self, deadline: Option<Instant>) -> bool {
        let (m, cv) = &*self.state;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        g.deadline = deadline;
        cv.notify_one();
        g.fired
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        {
            let (m, cv) = &*self.state;
            let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
            g.quit = true;
            cv.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A vhost-user front end connected to one back end's socket; implements
/// [`crate::DeviceTransport`], so [`crate::NetDriver`] drives the back end's device.
pub struct VhostUserFront {
    fe: Frontend,
    watchdog: Watchdog,
    /// A second handle of the socket, for SET_STATUS / GET_STATUS.
    sock: UnixStream,
    path: PathBuf,
    device_id: u32,
    offered: u64,
    protocol: PF,
    acked: Option<u64>,
    status: u8,
    queue_max: u16,
    regions: Vec<Region>,
    rings: Vec<Ring>,
    started: Vec<usize>,
}

impl std::fmt::Debug for VhostUserFront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFront")
            .field("path", &self.path)
            .field("offered", &format_args!("{:#x}", self.offered))
            .field("protocol", &self.protocol)
            .field("status", &self.status)
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

/// A duplicate of `fd` as an [`EventFd`] (the type the crate takes eventfds as).
fn dup_eventfd(fd: BorrowedFd<'_>) -> std::io::Result<EventFd> {
    let owned = fd.try_clone_to_owned()?;
    // SAFETY: `owned` is a freshly duplicated descriptor that nothing else refers to; its
    // ownership moves into the EventFd, which closes it on drop.
    Ok(unsafe { EventFd::from_raw_fd(owned.into_raw_fd()) })
}

impl VhostUserFront {
    /// Connects to the vhost-user back end listening on `path`, which serves a device of
    /// virtio type `device_id` (vhost-user has no way to ask), and negotiates protocol
    /// features and ownership. Fails at once when nothing listens there.
    pub fn connect(path: &Path, device_id: u32) -> Result<Self, VhostUserFrontError> {
        let connect_err = |source| VhostUserFrontError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect_err)?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(connect_err)?;
        stream
            .set_write_timeout(Some(REPLY_TIMEOUT))
            .map_err(connect_err)?;
        let sock = stream.try_clone().map_err(connect_err)?;
        let watchdog =
            Watchdog::new(stream.try_clone().map_err(connect_err)?).map_err(connect_err)?;
        let mut me = VhostUserFront {
            fe: Frontend::from_stream(stream, MAX_VRINGS),
            watchdog,
            sock,
            path: path.to_path_buf(),
            device_id,
            offered: 0,
            protocol: PF::empty(),
            acked: None,
            status: 0,
            queue_max: DEFAULT_QUEUE_MAX,
            regions: Vec::new(),
            rings: Vec::new(),
            started: Vec::new(),
        };
        me.offered = me.call("GET_FEATURES", |fe| fe.get_features())?;
        if me.offered & F_PROTOCOL_FEATURES != 0 {
            let offered = me.call("GET_PROTOCOL_FEATURES", |fe| fe.get_protocol_features())?;
            let want = offered & WANTED_PROTOCOL;
            // Not acked: REPLY_ACK is not in force before this request is done.
            me.call("SET_PROTOCOL_FEATURES", |fe| fe.set_protocol_features(want))?;
            me.protocol = want;
        }
        me.acked_req("SET_OWNER", |fe| fe.set_owner())?;
        Ok(me)
    }

    /// The back end's socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every feature bit the back end offered, `VHOST_USER_F_PROTOCOL_FEATURES` included.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// The protocol features negotiated (a subset of REPLY_ACK, CONFIG, STATUS,
    /// RESET_DEVICE).
    pub fn protocol_features(&self) -> PF {
        self.protocol
    }

    /// Sets the ring size reported as the largest (default [`DEFAULT_QUEUE_MAX`]), for a
    /// back end known to take bigger (or only smaller) rings.
    pub fn set_queue_max(&mut self, max: u16) {
        self.queue_max = max.max(1);
    }

    /// Whether the device's rings have been handed over and started (DRIVER_OK was set).
    pub fn running(&self) -> bool {
        !self.started.is_empty()
    }

    fn req_err(&self, req: &'static str, e: vhost::Error, timed_out: bool) -> VhostUserFrontError {
        let msg = match e {
            _ if timed_out => format!("no reply within {REPLY_TIMEOUT:?} (connection closed)"),
            vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::BackendInternalError) => {
                "the back end refused it".to_string()
            }
            vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::SocketRetry(_)) => {
                format!("no reply within {REPLY_TIMEOUT:?}")
            }
            e => e.to_string(),
        };
        VhostUserFrontError::Request {
            path: self.path.clone(),
            req,
            msg,
        }
    }

    fn unsupported(&self, msg: String) -> VhostUserFrontError {
        VhostUserFrontError::Unsupported {
            path: self.path.clone(),
            msg,
        }
    }

    /// Runs a request that has no reply of its own, asking for an ack when REPLY_ACK was
    /// negotiated (so a refusal is this request's error).
    fn acked_req<R>(
        &mut self,
        req: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<R>,
    ) -> Result<R, VhostUserFrontError> {
        let ack = self.protocol.contains(PF::REPLY_ACK);
        if ack {
            self.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let r = self.call(req, f);
        if ack {
            self.fe.set_hdr_flags(VhostUserHeaderFlag::empty());
        }
        r
    }

    /// Runs one request of the crate under the watchdog.
    fn call<R>(
        &mut self,
        req: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<R>,
    ) -> Result<R, VhostUserFrontError> {
        self.watchdog.set(Some(Instant::now() + REPLY_TIMEOUT));
        let r = f(&mut self.fe);
        let timed_out = self.watchdog.set(None);
        r.map_err(|e| self.req_err(req, e, timed_out))
    }

    fn raw_err(&self, req: &'static str, msg: impl std::fmt::Display) -> VhostUserFrontError {
        VhostUserFrontError::Request {
            path: self.path.clone(),
            req,
            msg: msg.to_string(),
        }
    }

    /// Sends a header (and an optional u64 body) on the second socket handle.
    fn raw_send(
        &mut self,
        req: &'static str,
        code: u32,
        flags: u32,
        body: Option<u64>,
    ) -> Result<(), VhostUserFrontError> {
        let size: u32 = if body.is_some() { 8 } else { 0 };
        let mut msg = Vec::with_capacity(20);
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&(flags | HDR_VERSION).to_le_bytes());
        msg.extend_from_slice(&size.to_le_bytes());
        if let Some(v) = body {
            msg.extend_from_slice(&v.to_le_bytes());
        }
        self.sock.write_all(&msg).map_err(|e| self.raw_err(req, e))
    }

    /// Receives the u64 reply to request `code` on the second socket handle.
    fn raw_reply(&mut self, req: &'static str, code: u32) -> Result<u64, VhostUserFrontError> {
        let mut hdr = [0u8; 12];
        self.sock.read_exact(&mut hdr).map_err(|e| {
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                self.raw_err(req, format!("no reply within {REPLY_TIMEOUT:?}"))
            } else {
                self.raw_err(req, e)
            }
        })?;
        let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let (got, flags, size) = (word(0), word(4), word(8));
        if got != code || flags & HDR_REPLY == 0 || size != 8 {
            return Err(self.raw_err(
                req,
                format!("malformed reply (request {got}, flags {flags:#x}, {size} bytes)"),
            ));
        }
        let mut body = [0u8; 8];
        self.sock
            .read_exact(&mut body)
            .map_err(|e| self.raw_err(req, e))?;
        Ok(u64::from_le_bytes(body))
    }

    /// VHOST_USER_SET_STATUS (only with the STATUS protocol feature).
    fn send_status(&mut self, status: u8) -> Result<(), VhostUserFrontError> {
        let ack = self.protocol.contains(PF::REPLY_ACK);
        let flags = if ack { HDR_NEED_REPLY } else { 0 };
        self.raw_send("SET_STATUS", REQ_SET_STATUS, flags, Some(status as u64))?;
        if ack && self.raw_reply("SET_STATUS", REQ_SET_STATUS)? != 0 {
            return Err(self.raw_err(
                "SET_STATUS",
                format!("the back end refused status {status:#x}"),
            ));
        }
        Ok(())
    }

    /// VHOST_USER_GET_STATUS (only with the STATUS protocol feature).
    fn fetch_status(&mut self) -> Result<u8, VhostUserFrontError> {
        self.raw_send("GET_STATUS", REQ_GET_STATUS, 0, None)?;
        let v = self.raw_reply("GET_STATUS", REQ_GET_STATUS)?;
        u8::try_from(v).map_err(|_| self.raw_err("GET_STATUS", format!("status {v:#x}")))
    }

    fn ring_mut(&mut self, queue: u16) -> Result<&mut Ring, VhostUserFrontError> {
        if queue as u64 >= MAX_VRINGS {
            return Err(self.unsupported(format!("no vring {queue} (at most {MAX_VRINGS})")));
        }
        let q = queue as usize;
        if self.rings.len() <= q {
            self.rings.resize_with(q + 1, Ring::default);
        }
        Ok(&mut self.rings[q])
    }

    /// Guest address → this process's virtual address, through the memory table.
    fn to_uva(&self, gpa: u64, len: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.size && len <= r.size - (gpa - r.gpa))
            .map(|r| r.uva + (gpa - r.gpa))
    }

    fn send_mem_table(&mut self) -> Result<(), VhostUserFrontError> {
        if self.regions.is_empty() {
            return Err(self.unsupported("DRIVER_OK without any memory region".into()));
        }
        use std::os::fd::AsRawFd;
        let table: Vec<VhostUserMemoryRegionInfo> = self
            .regions
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: r.uva,
                mmap_offset: r.offset,
                mmap_handle: r.fd.as_raw_fd(),
            })
            .collect();
        self.acked_req("SET_MEM_TABLE", |fe| fe.set_mem_table(&table).map(|_| ()))
    }

    /// Hands everything recorded to the back end and starts the rings (at DRIVER_OK).
    fn start(&mut self) -> Result<(), VhostUserFrontError> {
        if self.acked.is_none() {
            return Err(self.unsupported("DRIVER_OK before SET_FEATURES".into()));
        }
        self.send_mem_table()?;
        let gated = self.acked.unwrap_or(0) & F_PROTOCOL_FEATURES != 0;
        let packed = self.acked.unwrap_or(0) & vmdev_proto::virtio::features::RING_PACKED != 0;
        // Where a fresh ring starts: a packed ring's base carries its wrap counter (1) in
        // bit 15, as QEMU sends it.
        let base = if packed { 0x8000 } else { 0 };
        let queues: Vec<usize> = (0..self.rings.len())
            .filter(|&q| self.rings[q].size.is_some())
            .collect();
        for &q in &queues {
            let ring = &self.rings[q];
            let size = ring.size.unwrap_or(0);
            let (desc, avail, used) = ring
                .addr
                .ok_or_else(|| self.unsupported(format!("vring {q} has no ring addresses")))?;
            let n = size as u64;
            let tr = |gpa: u64, len: u64, what: &str| {
                self.to_uva(gpa, len).ok_or_else(|| {
                    self.unsupported(format!(
                        "vring {q}: {what} at {gpa:#x} is outside the memory table"
                    ))
                })
            };
            // Packed: descriptor ring, then two 4-byte event suppression structures.
            let (avail_len, used_len) = if packed {
                (4, 4)
            } else {
                (6 + 2 * n, 6 + 8 * n)
            };
            let config = VringConfigData {
                queue_max_size: self.queue_max.max(size),
                queue_size: size,
                flags: 0,
                desc_table_addr: tr(desc, 16 * n, "descriptor table")?,
                used_ring_addr: tr(used, used_len, "used ring")?,
                avail_ring_addr: tr(avail, avail_len, "avail ring")?,
                log_addr: None,
            };
            let (kick, call) = match (&ring.kick, &ring.call) {
                (Some(k), Some(c)) => (
                    k.try_clone()
                        .map_err(|e| self.raw_err("SET_VRING_KICK", e))?,
                    c.try_clone()
                        .map_err(|e| self.raw_err("SET_VRING_CALL", e))?,
                ),
                _ => {
                    return Err(self.unsupported(format!("vring {q} lacks a kick or call eventfd")))
                }
            };
            self.acked_req("SET_VRING_NUM", |fe| fe.set_vring_num(q, size))?;
            self.acked_req("SET_VRING_BASE", |fe| fe.set_vring_base(q, base))?;
            self.acked_req("SET_VRING_ADDR", |fe| fe.set_vring_addr(q, &config))?;
            self.acked_req("SET_VRING_KICK", |fe| fe.set_vring_kick(q, &kick))?;
            self.acked_req("SET_VRING_CALL", |fe| fe.set_vring_call(q, &call))?;
            self.started.push(q);
        }
        if gated {
            for &q in &queues {
                if self.rings[q].ready {
                    self.acked_req("SET_VRING_ENABLE", |fe| fe.set_vring_enable(q, true))?;
                }
            }
        }
        Ok(())
    }

    /// Stops every started ring: SET_VRING_ENABLE(0) (when gated) and GET_VRING_BASE.
    fn stop(&mut self) -> Result<(), VhostUserFrontError> {
        let gated = self.acked.unwrap_or(0) & F_PROTOCOL_FEATURES != 0;
        for q in std::mem::take(&mut self.started) {
            if gated {
                self.acked_req("SET_VRING_ENABLE", |fe| fe.set_vring_enable(q, false))?;
            }
            self.call("GET_VRING_BASE", |fe| fe.get_vring_base(q))?;
        }
        Ok(())
    }
}

impl crate::transport::DeviceTransport for VhostUserFront {
    fn device_id(&mut self) -> Result<u32, crate::TransportError> {
        Ok(self.device_id)
    }

    fn device_features(&mut self) -> Result<u64, crate::TransportError> {
        Ok(self.offered & !F_PROTOCOL_FEATURES)
    }

    fn set_driver_features(&mut self, features: u64) -> Result<(), crate::TransportError> {
        if features & F_PROTOCOL_FEATURES != 0 {
            return Err(self
                .unsupported(
                    "bit 30 is VHOST_USER_F_PROTOCOL_FEATURES, not a virtio feature".into(),
                )
                .into());
        }
        let f = features | (self.offered & F_PROTOCOL_FEATURES);
        self.acked_req("SET_FEATURES", |fe| fe.set_features(f))?;
        self.acked = Some(f);
        Ok(())
    }

    fn status(&mut self) -> Result<u8, crate::TransportError> {
        if self.protocol.contains(PF::STATUS) {
            return Ok(self.fetch_status()?);
        }
        Ok(self.status)
    }

    fn set_status(&mut self, status: u8) -> Result<(), crate::TransportError> {
        if status == 0 {
            return self.reset();
        }
        if status & st::DRIVER_OK != 0 && self.status & st::DRIVER_OK == 0 {
            self.start()?;
        }
        if self.protocol.contains(PF::STATUS) {
            self.send_status(status)?;
        }
        self.status = status;
        Ok(())
    }

    fn reset(&mut self) -> Result<(), crate::TransportError> {
        self.stop()?;
        if self.protocol.contains(PF::STATUS) {
            self.send_status(0)?;
        } else if self.protocol.contains(PF::RESET_DEVICE) {
            self.acked_req("RESET_DEVICE", |fe| fe.reset_device())?;
        }
        self.status = 0;
        self.acked = None;
        self.regions.clear();
        self.rings.clear();
        Ok(())
    }

    fn read_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, crate::TransportError> {
        if !self.protocol.contains(PF::CONFIG) {
            return Err(self
                .unsupported(
                    "it does not offer VHOST_USER_PROTOCOL_F_CONFIG, so its config space \
                     cannot be read (GET_CONFIG)"
                        .into(),
                )
                .into());
        }
        let buf = vec![0u8; len as usize];
        let (_, payload) = self.call("GET_CONFIG", |fe| {
            fe.get_config(offset, len, VhostUserConfigFlags::empty(), &buf)
        })?;
        Ok(payload)
    }

    fn queue_max_size(&mut self, _queue: u16) -> Result<u16, crate::TransportError> {
        Ok(self.queue_max)
    }

    fn set_queue_size(&mut self, queue: u16, size: u16) -> Result<(), crate::TransportError> {
        self.ring_mut(queue)?.size = Some(size);
        Ok(())
    }

    fn set_queue_address(
        &mut self,
        queue: u16,
        desc: u64,
        driver: u64,
        device: u64,
    ) -> Result<(), crate::TransportError> {
        self.ring_mut(queue)?.addr = Some((desc, driver, device));
        Ok(())
    }

    fn set_queue_kick(
        &mut self,
        queue: u16,
        fd: BorrowedFd<'_>,
    ) -> Result<(), crate::TransportError> {
        let e = dup_eventfd(fd).map_err(|e| self.raw_err("SET_VRING_KICK", e))?;
        self.ring_mut(queue)?.kick = Some(e);
        Ok(())
    }

    fn set_queue_call(
        &mut self,
        queue: u16,
        fd: BorrowedFd<'_>,
    ) -> Result<(), crate::TransportError> {
        let e = dup_eventfd(fd).map_err(|e| self.raw_err("SET_VRING_CALL", e))?;
        if self.started.contains(&(queue as usize)) {
            // A new call fd for a running ring goes to the back end at once.
            let q = queue as usize;
            self.acked_req("SET_VRING_CALL", |fe| fe.set_vring_call(q, &e))?;
        }
        self.ring_mut(queue)?.call = Some(e);
        Ok(())
    }

    fn set_queue_ready(&mut self, queue: u16, ready: bool) -> Result<(), crate::TransportError> {
        self.ring_mut(queue)?.ready = ready;
        let gated = self.acked.unwrap_or(0) & F_PROTOCOL_FEATURES != 0;
        if gated && self.started.contains(&(queue as usize)) {
            let q = queue as usize;
            self.acked_req("SET_VRING_ENABLE", |fe| fe.set_vring_enable(q, ready))?;
        }
        Ok(())
    }

    fn set_config_notify(&mut self, _fd: BorrowedFd<'_>) -> Result<(), crate::TransportError> {
        // Config-change notices come over the back end's own channel (BACKEND_REQ), which
        // this front end does not negotiate: the eventfd is simply never signalled.
        Ok(())
    }

    fn add_mem_region(
        &mut self,
        fd: BorrowedFd<'_>,
        guest_addr: u64,
        size: u64,
        offset: u64,
        local: &GuestMemory,
    ) -> Result<(), crate::TransportError> {
        let uva = local
            .translate(GuestAddr(guest_addr), size)
            .map_err(|e| {
                self.unsupported(format!(
                    "memory {guest_addr:#x}+{size:#x} is not mapped in this process: {e}"
                ))
            })?
            .as_ptr() as u64;
        let fd = fd
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| self.raw_err("SET_MEM_TABLE", e))?;
        self.regions.push(Region {
            gpa: guest_addr,
            size,
            uva,
            offset,
            fd,
        });
        if self.running() {
            // The back end gets the new table at once.
            self.send_mem_table()?;
        }
        Ok(())
    }

    fn config_readable(&mut self) -> bool {
        self.protocol.contains(PF::CONFIG)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net_driver::{NetDriver, NetDriverConfig};
    use crate::DeviceTransport;
    use std::os::unix::net::UnixListener;
    use vmdev_proto::virtio::features as f;

    const SET_OWNER: u32 = 3;
    const GET_FEATURES: u32 = 1;
    const SET_FEATURES: u32 = 2;
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
    const GET_CONFIG: u32 = 24;

    /// The log of requests a fake back end saw: (request code, body).
    type Log = std::thread::JoinHandle<Vec<(u32, Vec<u8>)>>;

    /// A scripted back end: answers what a front end asks and records every request.
    fn fake_backend(protocol: u64) -> (PathBuf, Log, tempdir::Dir) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("be.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut log = Vec::new();
            let mut status = 0u64;
            loop {
                let mut hdr = [0u8; 12];
                if s.read_exact(&mut hdr).is_err() {
                    return log;
                }
                let w = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
                let (code, flags, size) = (w(0), w(4), w(8));
                let mut body = vec![0u8; size as usize];
                s.read_exact(&mut body).unwrap();
                let reply = |s: &mut UnixStream, payload: &[u8]| {
                    let mut m = code.to_le_bytes().to_vec();
                    m.extend_from_slice(&5u32.to_le_bytes());
                    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                    m.extend_from_slice(payload);
                    s.write_all(&m).unwrap();
                };
                let mut answered = true;
                match code {
                    GET_FEATURES => reply(
                        &mut s,
                        &(f::VERSION_1 | f::NET_F_MAC | f::NET_F_MTU | F_PROTOCOL_FEATURES)
                            .to_le_bytes(),
                    ),
                    GET_PROTOCOL_FEATURES => reply(&mut s, &protocol.to_le_bytes()),
                    GET_CONFIG => {
                        let mut out = body[..12].to_vec();
                        let mut cfg = vec![0u8; body.len() - 12];
                        cfg[..6].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
                        cfg[10..12].copy_from_slice(&1400u16.to_le_bytes());
                        out.extend_from_slice(&cfg);
                        reply(&mut s, &out);
                    }
                    GET_VRING_BASE => {
                        let mut out = body[..4].to_vec();
                        out.extend_from_slice(&0u32.to_le_bytes());
                        reply(&mut s, &out);
                    }
                    REQ_GET_STATUS => reply(&mut s, &status.to_le_bytes()),
                    _ => answered = false,
                }
                if code == REQ_SET_STATUS {
                    status = u64::from_le_bytes(body[..8].try_into().unwrap());
                }
                if !answered && flags & HDR_NEED_REPLY != 0 {
                    reply(&mut s, &0u64.to_le_bytes());
                }
                log.push((code, body));
            }
        });
        (path, t, dir)
    }

    mod tempdir {
        /// A scratch directory removed on drop.
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "vmdev-vuf-unit-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn setup_follows_qemus_order_with_front_end_virtual_addresses() {
        let pf = (PF::REPLY_ACK | PF::CONFIG | PF::STATUS | PF::MQ).bits();
        let (path, backend, _dir) = fake_backend(pf);
        let drv = NetDriver::open_vhost_user(&path, NetDriverConfig::default()).unwrap();
        assert_eq!(drv.mac(), [2, 0, 0, 0, 0, 9], "MAC from GET_CONFIG");
        assert_eq!(drv.mtu(), 1400);
        let mem = Arc::clone(drv.memory());
        let rings = [drv.ring_addrs(0).unwrap(), drv.ring_addrs(1).unwrap()];
        drop(drv);
        let log = backend.join().unwrap();
        let codes: Vec<u32> = log.iter().map(|(c, _)| *c).collect();
        let negotiated = log
            .iter()
            .find(|(c, _)| *c == SET_PROTOCOL_FEATURES)
            .map(|(_, b)| u64_at(b, 0));
        assert_eq!(
            negotiated,
            Some((PF::REPLY_ACK | PF::CONFIG | PF::STATUS).bits()),
            "MQ not taken"
        );
        let start = codes.iter().position(|&c| c == SET_MEM_TABLE).unwrap();
        assert_eq!(
            &codes[start..],
            [
                SET_MEM_TABLE,
                SET_VRING_NUM,
                SET_VRING_BASE,
                SET_VRING_ADDR,
                SET_VRING_KICK,
                SET_VRING_CALL,
                SET_VRING_NUM,
                SET_VRING_BASE,
                SET_VRING_ADDR,
                SET_VRING_KICK,
                SET_VRING_CALL,
                SET_VRING_ENABLE,
                SET_VRING_ENABLE,
                REQ_SET_STATUS,
            ]
        );
        assert_eq!(
            &codes[..4],
            [
                GET_FEATURES,
                GET_PROTOCOL_FEATURES,
                SET_PROTOCOL_FEATURES,
                SET_OWNER
            ]
        );
        let acked = log
            .iter()
            .find(|(c, _)| *c == SET_FEATURES)
            .map(|(_, b)| u64_at(b, 0))
            .unwrap();
        assert_ne!(acked & F_PROTOCOL_FEATURES, 0, "bit 30 kept");
        // The memory table: guest address, and this process's mapping as user address.
        let table = &log[start].1;
        assert_eq!(u64_at(table, 0) as u32, 1, "one region");
        let (gpa, uva) = (u64_at(table, 8), u64_at(table, 24));
        assert_eq!(gpa, crate::net_driver::GUEST_BASE);
        assert_eq!(
            uva,
            mem.translate(GuestAddr(gpa), 1).unwrap().as_ptr() as u64
        );
        // Ring addresses are our virtual addresses: desc, used, avail.
        let va = |g: u64| mem.translate(GuestAddr(g), 1).unwrap().as_ptr() as u64;
        for (i, (_, a)) in log.iter().filter(|(c, _)| *c == SET_VRING_ADDR).enumerate() {
            assert_eq!(u64_at(a, 0) as u32, i as u32);
            assert_eq!(u64_at(a, 8), va(rings[i].desc));
            assert_eq!(u64_at(a, 16), va(rings[i].device));
            assert_eq!(u64_at(a, 24), va(rings[i].driver));
        }
        let status = log.last().map(|(_, b)| u64_at(b, 0));
        assert_eq!(status, Some(0xf), "DRIVER_OK last");
    }

    #[test]
    fn without_config_the_driver_takes_no_mac_or_mtu_and_status_is_local() {
        let (path, backend, _dir) = fake_backend(PF::REPLY_ACK.bits());
        let cfg = NetDriverConfig {
            mac: Some([2, 1, 2, 3, 4, 5]),
            ..Default::default()
        };
        let mut drv = NetDriver::open_vhost_user(&path, cfg).unwrap();
        assert_eq!(drv.mac(), [2, 1, 2, 3, 4, 5]);
        assert_eq!(drv.mtu(), 1500);
        assert_eq!(drv.features() & (f::NET_F_MAC | f::NET_F_MTU), 0);
        assert_eq!(drv.status().unwrap(), 0xf);
        let e = drv.transport().read_config(0, 6).unwrap_err().to_string();
        assert!(e.contains("GET_CONFIG") && e.contains("be.sock"), "{e}");
        drv.transport().reset().unwrap();
        drop(drv);
        let log = backend.join().unwrap();
        let codes: Vec<u32> = log.iter().map(|(c, _)| *c).collect();
        assert!(!codes.contains(&GET_CONFIG) && !codes.contains(&REQ_SET_STATUS));
        // Reset stops both started rings.
        assert_eq!(codes.iter().filter(|&&c| c == GET_VRING_BASE).count(), 2);
        let d = NetDriver::open_vhost_user(&path, NetDriverConfig::default());
        assert!(d.is_err(), "nobody listens any more");
    }
}
