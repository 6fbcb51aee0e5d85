//! The vhost-user front door: QEMU, DPDK's virtio-user and other vhost-user front ends
//! drive a vmdev device through the socket protocol they already speak.
//!
//! A [`Session`] keeps what the front end told it (features, memory table, vring setup,
//! status) and *translates* it into device-model requests: when the front end's device is
//! ready (DRIVER_OK with the STATUS protocol feature, else rings 0 and 1 kicked and
//! enabled) the session replays the setup into the model — memory regions, ring guest
//! addresses (translated from the front end's virtual addresses through the memory table),
//! ring positions, eventfds — and sets DRIVER_OK, which attaches the device to its datapath
//! exactly as for a vmdev-protocol driver. A change while running (new call fd, memory
//! table, ring enabled) stops the device, keeps each ring's position, and starts it again.
//! The wire structures come from the rust-vmm `vhost` crate; the I/O and every check are ours.

use crate::registry::{lock, Device};
use crate::server::Server;
use sendfd::RecvWithFd;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserMemory, VhostUserMemoryRegion, VhostUserU64,
    VhostUserVringAddr, VhostUserVringState,
};
use vhost::vhost_user::VhostUserProtocolFeatures as PF;
use vm_memory::ByteValued;
use vmdev_proto::transport::{Reply, Request, VqState};
use vmdev_proto::virtio::status as st;
use vmdev_proto::WireError;

/// VHOST_USER_F_PROTOCOL_FEATURES: the front end may negotiate protocol features.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Protocol features vmdev offers.
pub fn offered_protocol_features() -> u64 {
    (PF::MQ
        | PF::LOG_SHMFD
        | PF::REPLY_ACK
        | PF::CONFIG
        | PF::RESET_DEVICE
        | PF::CONFIGURE_MEM_SLOTS
        | PF::STATUS)
        .bits()
}

/// Largest payload accepted.
pub const MAX_PAYLOAD: usize = 4096;
/// Most regions in one SET_MEM_TABLE (the protocol's baseline).
pub const MAX_TABLE_REGIONS: usize = 8;
/// Most memory slots (CONFIGURE_MEM_SLOTS).
pub const MAX_MEM_SLOTS: usize = 32;

const HDR_LEN: usize = 12;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const VRING_NOFD: u64 = 0x100;
const VRING_IDX_MASK: u64 = 0xff;

/// Why a vhost-user message failed.
#[derive(Debug, thiserror::Error)]
pub enum VuError {
    /// The socket failed or closed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The header is not a vhost-user request we can frame.
    #[error("malformed header: {0}")]
    Header(String),
    /// A request code we do not handle.
    #[error("unsupported request {0}")]
    Unsupported(u32),
    /// The payload size does not fit the request.
    #[error("{req:?}: payload of {got} bytes, expected {want}")]
    Size {
        /// Request.
        req: FrontendReq,
        /// Size received.
        got: usize,
        /// What it should be.
        want: String,
    },
    /// Wrong number of fds for the request.
    #[error("{req:?}: {got} fds attached, expected {want}")]
    Fds {
        /// Request.
        req: FrontendReq,
        /// Fds received.
        got: usize,
        /// Fds expected.
        want: usize,
    },
    /// A value in the request is unacceptable.
    #[error("{0}")]
    Invalid(String),
    /// The device model refused the translated request.
    #[error("device refused: {0}")]
    Model(#[from] WireError),
}

/// One message as read from the socket.
pub struct Message {
    /// Raw request code.
    pub code: u32,
    /// Header flags.
    pub flags: u32,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Attached fds.
    pub fds: Vec<OwnedFd>,
}

/// Reads one message: the fds arrive with the header's first byte.
pub fn read_message(s: &mut UnixStream) -> Result<Message, VuError> {
    let mut hdr = [0u8; HDR_LEN];
    let mut raw = [-1 as RawFd; 32];
    let (n, nfds) = s.recv_with_fd(&mut hdr, &mut raw)?;
    let fds: Vec<OwnedFd> = raw[..nfds]
        .iter()
        // SAFETY: the kernel just installed these fds for us; nobody else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Err(VuError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    s.read_exact(&mut hdr[n..])?;
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let (code, flags, size) = (word(0), word(4), word(8) as usize);
    if flags & 0x3 != FLAG_VERSION || flags & !(0x3 | FLAG_REPLY | FLAG_NEED_REPLY) != 0 {
        return Err(VuError::Header(format!("flags {flags:#x}")));
    }
    if size > MAX_PAYLOAD {
        return Err(VuError::Header(format!(
            "payload of {size} bytes exceeds {MAX_PAYLOAD}"
        )));
    }
    let mut payload = vec![0u8; size];
    s.read_exact(&mut payload)?;
    Ok(Message {
        code,
        flags,
        payload,
        fds,
    })
}

fn write_reply(s: &mut UnixStream, code: u32, body: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(HDR_LEN + body.len());
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    s.write_all(&out)
}

/// Copies a wire struct out of `b`, which must be exactly its size.
fn parse<T: ByteValued + Default>(req: FrontendReq, b: &[u8]) -> Result<T, VuError> {
    let mut v = T::default();
    let want = std::mem::size_of::<T>();
    if b.len() != want {
        return Err(VuError::Size {
            req,
            got: b.len(),
            want: want.to_string(),
        });
    }
    v.as_mut_slice().copy_from_slice(b);
    Ok(v)
}

fn u64_body(v: u64) -> Vec<u8> {
    VhostUserU64::new(v).as_slice().to_vec()
}

fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory arguments; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds F_SEAL_SHRINK to a memfd that allows sealing (a front end's memory may come
/// unsealed but sealable); a memfd that forbids new seals keeps what it has.
fn seal_against_shrinking(fd: BorrowedFd<'_>) {
    // SAFETY: F_ADD_SEALS only changes the seal set of the file behind `fd`.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK);
    }
}

/// Device attribute that lets a vhost-user front end hand memory that cannot be sealed
/// against shrinking (DPDK's virtio-user does): the front end is then trusted not to
/// truncate it.
pub const ATTR_UNSEALED: &str = "unsealed-memory";

#[derive(Debug)]
struct Region {
    gpa: u64,
    size: u64,
    uaddr: u64,
    offset: u64,
    fd: OwnedFd,
}

/// Ring addresses as the front end's virtual addresses.
#[derive(Debug, Clone, Copy)]
struct RingAddr {
    desc: u64,
    avail: u64,
    used: u64,
}

#[derive(Debug, Default)]
struct Ring {
    num: Option<u16>,
    addr: Option<RingAddr>,
    base: u16,
    kick: Option<OwnedFd>,
    call: Option<OwnedFd>,
    kicked: bool,
    enabled: bool,
}

/// One front end's session with one device.
pub struct Session {
    dev: Arc<Mutex<Device>>,
    offered: u64,
    max_queue: u16,
    acked: Option<u64>,
    protocol: u64,
    regions: Vec<Region>,
    rings: Vec<Ring>,
    status: u8,
    running: Option<Vec<usize>>,
    /// The rings whose start the device refused; not retried until the setup changes.
    failed: Option<Vec<usize>>,
    dirty: bool,
    accept_unsealed: bool,
}

impl Session {
    /// A fresh session for `dev`.
    pub fn new(dev: Arc<Mutex<Device>>) -> Self {
        let (offered, n, max_queue, accept_unsealed) = {
            let d = lock(&dev);
            let p = d.model.profile();
            let unsealed = d
                .attrs
                .iter()
                .any(|(k, v)| k == ATTR_UNSEALED && v == "accept");
            (
                p.offered | F_PROTOCOL_FEATURES,
                p.num_queues as usize,
                p.max_queue_size,
                unsealed,
            )
        };
        Session {
            dev,
            offered,
            max_queue,
            acked: None,
            protocol: 0,
            regions: Vec::new(),
            rings: (0..n).map(|_| Ring::default()).collect(),
            status: 0,
            running: None,
            failed: None,
            dirty: false,
            accept_unsealed,
        }
    }

    /// Serves the front end until it leaves or breaks the protocol.
    pub fn serve(&mut self, s: &mut UnixStream) -> Result<(), VuError> {
        loop {
            let msg = read_message(s)?;
            let need_reply =
                msg.flags & FLAG_NEED_REPLY != 0 && self.protocol & PF::REPLY_ACK.bits() != 0;
            let code = msg.code;
            let result = match FrontendReq::try_from(code) {
                Ok(req) => {
                    let status_before = self.status;
                    self.handle(req, &msg.payload, msg.fds)
                        .and_then(|r| match self.reconcile() {
                            Ok(()) => Ok((req, r)),
                            Err(e) => {
                                // A refused start leaves no DRIVER_OK behind for GET_STATUS.
                                self.status = status_before;
                                Err(e)
                            }
                        })
                }
                Err(_) => Err(VuError::Unsupported(code)),
            };
            match result {
                Ok((_, Some(body))) => write_reply(s, code, &body)?,
                Ok((_, None)) if need_reply => write_reply(s, code, &u64_body(0))?,
                Ok((_, None)) => {}
                Err(e @ VuError::Io(_)) => return Err(e),
                Err(e) if need_reply => {
                    tracing::warn!("vhost-user request {code}: {e} (NACK)");
                    write_reply(s, code, &u64_body(1))?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn ring(&mut self, index: u64) -> Result<&mut Ring, VuError> {
        let n = self.rings.len();
        self.rings.get_mut(index as usize).ok_or_else(|| {
            VuError::Invalid(format!("vring {index} does not exist (the device has {n})"))
        })
    }

    fn expect_fds(req: FrontendReq, fds: &[OwnedFd], want: usize) -> Result<(), VuError> {
        if fds.len() != want {
            return Err(VuError::Fds {
                req,
                got: fds.len(),
                want,
            });
        }
        Ok(())
    }

    /// Applies one request to the session; returns a reply body for requests that have one.
    fn handle(
        &mut self,
        req: FrontendReq,
        p: &[u8],
        mut fds: Vec<OwnedFd>,
    ) -> Result<Option<Vec<u8>>, VuError> {
        use FrontendReq as R;
        let fd_count = match req {
            R::SET_MEM_TABLE => fds.len(),
            R::ADD_MEM_REG | R::SET_LOG_BASE | R::SET_LOG_FD | R::SET_BACKEND_REQ_FD => 1,
            R::REM_MEM_REG => fds.len().min(1),
            R::SET_VRING_KICK | R::SET_VRING_CALL | R::SET_VRING_ERR => {
                let v = parse::<VhostUserU64>(req, p)?.value;
                usize::from(v & VRING_NOFD == 0)
            }
            _ => 0,
        };
        Self::expect_fds(req, &fds, fd_count)?;
        match req {
            R::GET_FEATURES => Ok(Some(u64_body(self.offered))),
            R::SET_FEATURES => {
                let f = parse::<VhostUserU64>(req, p)?.value;
                if f & !self.offered != 0 {
                    return Err(VuError::Invalid(format!(
                        "features {:#x} were not offered",
                        f & !self.offered
                    )));
                }
                if self.acked != Some(f) {
                    self.acked = Some(f);
                    self.dirty = true;
                }
                Ok(None)
            }
            R::GET_PROTOCOL_FEATURES => Ok(Some(u64_body(offered_protocol_features()))),
            R::SET_PROTOCOL_FEATURES => {
                let f = parse::<VhostUserU64>(req, p)?.value;
                if f & !offered_protocol_features() != 0 {
                    return Err(VuError::Invalid(format!(
                        "protocol features {f:#x} were not offered"
                    )));
                }
                self.protocol = f;
                Ok(None)
            }
            R::SET_OWNER | R::SEND_RARP | R::NET_SET_MTU => Ok(None),
            R::SET_BACKEND_REQ_FD | R::SET_LOG_FD => Ok(None),
            R::RESET_OWNER | R::RESET_DEVICE => {
                self.stop();
                self.acked = None;
                self.status = 0;
                for r in &mut self.rings {
                    *r = Ring::default();
                }
                Ok(None)
            }
            R::GET_QUEUE_NUM => Ok(Some(u64_body(self.rings.len() as u64 / 2))),
            R::GET_MAX_MEM_SLOTS => Ok(Some(u64_body(MAX_MEM_SLOTS as u64))),
            R::SET_MEM_TABLE => {
                let head_len = std::mem::size_of::<VhostUserMemory>();
                let reg_len = std::mem::size_of::<VhostUserMemoryRegion>();
                let head = parse::<VhostUserMemory>(req, p.get(..head_len).unwrap_or(p))?;
                let n = head.num_regions as usize;
                if n == 0 || n > MAX_TABLE_REGIONS {
                    return Err(VuError::Invalid(format!(
                        "{n} regions (1..={MAX_TABLE_REGIONS} allowed)"
                    )));
                }
                if p.len() != head_len + n * reg_len {
                    return Err(VuError::Size {
                        req,
                        got: p.len(),
                        want: format!("{}", head_len + n * reg_len),
                    });
                }
                Self::expect_fds(req, &fds, n)?;
                let mut table = Vec::new();
                for (i, fd) in fds.into_iter().enumerate() {
                    let at = head_len + i * reg_len;
                    let r = parse::<VhostUserMemoryRegion>(req, &p[at..at + reg_len])?;
                    table.push(self.region(&r, fd)?);
                }
                Self::check_overlaps(&table)?;
                self.regions = table;
                self.dirty = true;
                Ok(None)
            }
            R::ADD_MEM_REG => {
                let reg_len = std::mem::size_of::<VhostUserMemoryRegion>();
                let body = p
                    .get(8..)
                    .filter(|b| b.len() == reg_len && p.len() == 8 + reg_len)
                    .ok_or(VuError::Size {
                        req,
                        got: p.len(),
                        want: format!("{}", 8 + reg_len),
                    })?;
                if self.regions.len() >= MAX_MEM_SLOTS {
                    return Err(VuError::Invalid(format!(
                        "more than {MAX_MEM_SLOTS} memory slots"
                    )));
                }
                let r = parse::<VhostUserMemoryRegion>(req, body)?;
                let fd = fds.pop().ok_or(VuError::Fds {
                    req,
                    got: 0,
                    want: 1,
                })?;
                let region = self.region(&r, fd)?;
                let mut table: Vec<&Region> = self.regions.iter().collect();
                table.push(&region);
                Self::check_overlaps_ref(&table)?;
                self.regions.push(region);
                self.dirty = true;
                Ok(None)
            }
            R::REM_MEM_REG => {
                let reg_len = std::mem::size_of::<VhostUserMemoryRegion>();
                if p.len() != 8 + reg_len {
                    return Err(VuError::Size {
                        req,
                        got: p.len(),
                        want: format!("{}", 8 + reg_len),
                    });
                }
                let r = parse::<VhostUserMemoryRegion>(req, &p[8..])?;
                let (gpa, size) = (r.guest_phys_addr, r.memory_size);
                let before = self.regions.len();
                self.regions.retain(|x| !(x.gpa == gpa && x.size == size));
                if self.regions.len() == before {
                    return Err(VuError::Invalid(format!("no region at {gpa:#x}")));
                }
                self.dirty = true;
                Ok(None)
            }
            R::SET_LOG_BASE => Ok(Some(u64_body(0))),
            R::SET_VRING_NUM => {
                let s = parse::<VhostUserVringState>(req, p)?;
                let (index, num) = (s.index, s.num);
                let max = self.max_queue;
                // Packed rings may have any size; split rings need a power of two.
                let packed =
                    self.acked.unwrap_or(0) & vmdev_proto::virtio::features::RING_PACKED != 0;
                if num == 0 || (!packed && !num.is_power_of_two()) || num > max as u32 {
                    return Err(VuError::Invalid(format!(
                        "vring size {num} is not a power of two in 1..={max}"
                    )));
                }
                self.ring(index as u64)?.num = Some(num as u16);
                self.dirty = true;
                Ok(None)
            }
            R::SET_VRING_ADDR => {
                let a = parse::<VhostUserVringAddr>(req, p)?;
                let addr = RingAddr {
                    desc: a.descriptor,
                    avail: a.available,
                    used: a.used,
                };
                self.ring(a.index as u64)?.addr = Some(addr);
                self.dirty = true;
                Ok(None)
            }
            R::SET_VRING_BASE => {
                let s = parse::<VhostUserVringState>(req, p)?;
                let (index, num) = (s.index, s.num);
                if num > u16::MAX as u32 {
                    return Err(VuError::Invalid(format!(
                        "vring base {num} is not a 16-bit index"
                    )));
                }
                self.ring(index as u64)?.base = num as u16;
                self.dirty = true;
                Ok(None)
            }
            R::GET_VRING_BASE => {
                let index = parse::<VhostUserVringState>(req, p)?.index;
                self.ring(index as u64)?;
                self.stop();
                let r = self.ring(index as u64)?;
                r.kicked = false;
                let state = VhostUserVringState::new(index, r.base as u32);
                Ok(Some(state.as_slice().to_vec()))
            }
            R::SET_VRING_KICK | R::SET_VRING_CALL | R::SET_VRING_ERR => {
                let v = parse::<VhostUserU64>(req, p)?.value;
                let fd = fds.pop();
                let r = self.ring(v & VRING_IDX_MASK)?;
                match req {
                    R::SET_VRING_KICK => {
                        r.kick = fd;
                        r.kicked = true;
                    }
                    R::SET_VRING_CALL => r.call = fd,
                    _ => return Ok(None),
                }
                self.dirty = true;
                Ok(None)
            }
            R::SET_VRING_ENABLE => {
                let s = parse::<VhostUserVringState>(req, p)?;
                let (index, num) = (s.index, s.num);
                if num > 1 {
                    return Err(VuError::Invalid(format!("vring enable value {num}")));
                }
                let r = self.ring(index as u64)?;
                if r.enabled != (num == 1) {
                    r.enabled = num == 1;
                    self.dirty = true;
                }
                Ok(None)
            }
            R::GET_CONFIG => {
                let head_len = std::mem::size_of::<VhostUserConfig>();
                let c = parse::<VhostUserConfig>(req, p.get(..head_len).unwrap_or(p))?;
                let (offset, size) = (c.offset, c.size);
                if p.len() != head_len + size as usize {
                    return Err(VuError::Size {
                        req,
                        got: p.len(),
                        want: format!("{}", head_len + size as usize),
                    });
                }
                let bytes = match lock(&self.dev)
                    .model
                    .handle(Request::ReadConfig { offset, len: size }, vec![])
                {
                    crate::model::Step::Reply(Reply::Config(b)) => b,
                    crate::model::Step::Reply(Reply::Error(e)) => return Err(e.into()),
                    _ => return Err(VuError::Invalid("config read failed".into())),
                };
                let mut out = c.as_slice().to_vec();
                out.extend_from_slice(&bytes);
                Ok(Some(out))
            }
            R::SET_CONFIG => Err(VuError::Invalid(
                "the net-loopback config space is read-only".into(),
            )),
            R::SET_STATUS => {
                let v = parse::<VhostUserU64>(req, p)?.value;
                if v > u8::MAX as u64 {
                    return Err(VuError::Invalid(format!("status {v:#x}")));
                }
                if v == 0 {
                    self.stop();
                }
                self.status = v as u8;
                Ok(None)
            }
            R::GET_STATUS => {
                let model_status = lock(&self.dev).model.status();
                Ok(Some(u64_body(
                    (self.status | (model_status & st::NEEDS_RESET)) as u64,
                )))
            }
            other => Err(VuError::Unsupported(other.into())),
        }
    }

    fn region(&self, r: &VhostUserMemoryRegion, fd: OwnedFd) -> Result<Region, VuError> {
        use vmdev_shm_ring::memory::{check_memfd, check_region_shape, SealPolicy};
        use vmdev_shm_ring::MemError;
        let (gpa, size, uaddr, offset) =
            (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset);
        seal_against_shrinking(fd.as_fd());
        let checked = check_region_shape(gpa, size, offset)
            .and_then(|_| check_memfd(fd.as_fd(), offset, size, SealPolicy::Required));
        match checked {
            Ok(()) => {}
            Err(MemError::NotSealed) if self.accept_unsealed => {
                tracing::debug!("accepting unsealed memory at {gpa:#x} ({ATTR_UNSEALED}=accept)")
            }
            Err(MemError::NotSealed) => {
                return Err(VuError::Invalid(format!(
                "memory region at {gpa:#x} is not sealed against shrinking and cannot be sealed; \
                     start the device with --attr {ATTR_UNSEALED}=accept to trust this front end"
            )))
            }
            Err(e) => return Err(VuError::Invalid(format!("memory region at {gpa:#x}: {e}"))),
        }
        if uaddr.checked_add(size).is_none() {
            return Err(VuError::Invalid(
                "region user address + size overflows".into(),
            ));
        }
        Ok(Region {
            gpa,
            size,
            uaddr,
            offset,
            fd,
        })
    }

    fn check_overlaps(table: &[Region]) -> Result<(), VuError> {
        Self::check_overlaps_ref(&table.iter().collect::<Vec<_>>())
    }

    fn check_overlaps_ref(table: &[&Region]) -> Result<(), VuError> {
        for (i, a) in table.iter().enumerate() {
            for b in &table[i + 1..] {
                let g = a.gpa < b.gpa + b.size && b.gpa < a.gpa + a.size;
                let u = a.uaddr < b.uaddr + b.size && b.uaddr < a.uaddr + a.size;
                if g || u {
                    return Err(VuError::Invalid(format!(
                        "regions at {:#x} and {:#x} overlap",
                        a.gpa, b.gpa
                    )));
                }
            }
        }
        Ok(())
    }

    /// Front-end virtual address → guest address through the memory table.
    fn uva_to_gpa(&self, uva: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| uva >= r.uaddr && uva - r.uaddr < r.size)
            .map(|r| r.gpa + (uva - r.uaddr))
    }

    /// The rings that should run now, if the device should run at all.
    fn desired(&self) -> Option<Vec<usize>> {
        let acked = self.acked?;
        if self.regions.is_empty() {
            return None;
        }
        if self.protocol & PF::STATUS.bits() != 0 && self.status & st::DRIVER_OK == 0 {
            return None;
        }
        let gated = acked & F_PROTOCOL_FEATURES != 0;
        let ready: Vec<usize> = self
            .rings
            .iter()
            .enumerate()
            .filter(|(_, r)| r.addr.is_some() && r.kicked && (r.enabled || !gated))
            .map(|(i, _)| i)
            .collect();
        (ready.contains(&0) && ready.contains(&1)).then_some(ready)
    }

    /// Starts, stops or restarts the device so it matches what the front end set up.
    fn reconcile(&mut self) -> Result<(), VuError> {
        let want = self.desired();
        if self.dirty || want != self.failed {
            self.failed = None;
        }
        if self.running.is_some() && (self.dirty || want != self.running) {
            self.stop();
        }
        self.dirty = false;
        if let (None, None, Some(set)) = (&self.running, &self.failed, want) {
            if let Err(e) = self.start(&set) {
                self.failed = Some(set);
                return Err(e);
            }
            self.running = Some(set);
        }
        Ok(())
    }

    /// Detaches the device, keeping each running ring's position for the next start.
    fn stop(&mut self) {
        let Some(set) = self.running.take() else {
            return;
        };
        let mut d = lock(&self.dev);
        Server::detach(&mut d);
        for i in set {
            if let crate::model::Step::Reply(Reply::QueueState(st)) = d
                .model
                .handle(Request::GetQueueState { queue: i as u16 }, vec![])
            {
                if let Some(r) = self.rings.get_mut(i) {
                    r.base = ring_base(st);
                }
            }
        }
        d.model.release();
    }

    fn start(&mut self, set: &[usize]) -> Result<(), VuError> {
        let features = self.acked.unwrap_or(0) & !F_PROTOCOL_FEATURES;
        let mut reqs: Vec<(Request, Vec<OwnedFd>)> = vec![
            (Request::SetStatus(st::ACKNOWLEDGE), vec![]),
            (Request::SetStatus(st::ACKNOWLEDGE | st::DRIVER), vec![]),
            (Request::SetDriverFeatures(features), vec![]),
            (
                Request::SetStatus(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK),
                vec![],
            ),
        ];
        for r in &self.regions {
            let fd = r.fd.try_clone()?;
            reqs.push((
                Request::AddMemRegion {
                    guest_addr: r.gpa,
                    size: r.size,
                    offset: r.offset,
                },
                vec![fd],
            ));
        }
        for &i in set {
            let ring = &self.rings[i];
            let queue = i as u16;
            let a = ring
                .addr
                .as_ref()
                .ok_or_else(|| VuError::Invalid(format!("vring {i} has no addresses")))?;
            let tr = |uva: u64, what: &str| {
                self.uva_to_gpa(uva).ok_or_else(|| {
                    VuError::Invalid(format!(
                        "vring {i}: {what} address {uva:#x} is outside every region"
                    ))
                })
            };
            let (desc, driver, device) = (
                tr(a.desc, "descriptor")?,
                tr(a.avail, "avail")?,
                tr(a.used, "used")?,
            );
            if let Some(num) = ring.num {
                reqs.push((Request::SetQueueSize { queue, size: num }, vec![]));
            }
            reqs.push((
                Request::SetQueueAddress {
                    queue,
                    desc,
                    driver,
                    device,
                },
                vec![],
            ));
            let packed = self.acked.unwrap_or(0) & vmdev_proto::virtio::features::RING_PACKED != 0;
            let state = ring_state(ring.base, packed);
            reqs.push((Request::SetQueueState { queue, state }, vec![]));
            let kick = match &ring.kick {
                Some(k) => k.try_clone()?,
                None => eventfd()?,
            };
            reqs.push((Request::SetQueueKick { queue }, vec![kick]));
            if let Some(c) = &ring.call {
                reqs.push((Request::SetQueueCall { queue }, vec![c.try_clone()?]));
            }
            reqs.push((Request::SetQueueReady { queue, ready: true }, vec![]));
        }
        reqs.push((
            Request::SetStatus(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK | st::DRIVER_OK),
            vec![],
        ));
        let mut d = lock(&self.dev);
        d.model.release();
        for (req, fds) in reqs {
            if let Reply::Error(e) = Server::drive(&mut d, req, fds) {
                d.model.release();
                return Err(e.into());
            }
        }
        tracing::info!(uuid = %d.uuid, rings = ?set, "vhost-user front end started the device");
        Ok(())
    }

    /// Ends the session: the device is detached and forgets everything.
    pub fn close(&mut self) {
        self.stop();
        lock(&self.dev).model.release();
    }
}

/// A ring position in vhost-user's VRING_BASE form: the avail index, and for packed rings
/// its wrap counter in bit 15 (the device resumes with everything used).
fn ring_base(st: VqState) -> u16 {
    match st {
        VqState::Split { avail_index, .. } => avail_index,
        VqState::Packed {
            avail_index,
            avail_wrap,
            ..
        } => (avail_index & 0x7fff) | (u16::from(avail_wrap) << 15),
    }
}

/// The queue state a VRING_BASE stands for.
fn ring_state(base: u16, packed: bool) -> VqState {
    if packed {
        let (index, wrap) = (base & 0x7fff, base & 0x8000 != 0);
        VqState::Packed {
            avail_index: index,
            avail_wrap: wrap,
            used_index: index,
            used_wrap: wrap,
        }
    } else {
        VqState::Split {
            avail_index: base,
            used_index: base,
        }
    }
}

/// A device's vhost-user socket: the listener and the front end currently connected.
pub struct Door {
    /// Socket path.
    pub path: PathBuf,
    listener: std::os::unix::net::UnixListener,
    active: Mutex<Option<UnixStream>>,
}

impl Door {
    /// Binds `path` (mode 0600); refuses a path where a live socket already listens.
    pub fn bind(path: PathBuf) -> std::io::Result<Arc<Door>> {
        let parent = path.parent().map(|p| p.to_path_buf()).unwrap_or_default();
        let name = path.file_name().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "socket path has no file name",
            )
        })?;
        let listener = crate::server::bind_socket(&parent, &name.to_string_lossy())?;
        Ok(Arc::new(Door {
            path,
            listener,
            active: Mutex::new(None),
        }))
    }

    /// Accepts front ends one at a time and serves each with a fresh session; returns when
    /// the door is closed.
    pub fn run(self: Arc<Self>, server: Arc<Server>, dev: Arc<Mutex<Device>>) {
        for conn in self.listener.incoming() {
            let mut s = match conn {
                Ok(s) => s,
                Err(_) => break,
            };
            if server.check_peer(&s, "vhost-user").is_err() {
                continue; // logged; vhost-user has no way to say why
            }
            let conn_id = server.new_conn_id();
            {
                let mut d = lock(&dev);
                if d.removed {
                    break;
                }
                if d.claimed_by.is_some() {
                    tracing::warn!(uuid = %d.uuid, "vhost-user front end refused: the device is held by another driver");
                    continue;
                }
                d.claimed_by = Some(conn_id);
            }
            if let Ok(c) = s.try_clone() {
                *lock(&self.active) = Some(c);
            }
            tracing::info!(path = %self.path.display(), "vhost-user front end connected");
            let mut session = Session::new(Arc::clone(&dev));
            match session.serve(&mut s) {
                Err(VuError::Io(e)) => {
                    tracing::info!(path = %self.path.display(), "vhost-user front end left: {e}")
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), "closing vhost-user connection: {e}")
                }
                Ok(()) => {}
            }
            session.close();
            *lock(&self.active) = None;
            let mut d = lock(&dev);
            if d.claimed_by == Some(conn_id) {
                d.claimed_by = None;
            }
        }
    }

    /// Closes the door: the listener stops, the connected front end is cut off, the socket
    /// file goes away.
    pub fn close(&self) {
        // SAFETY: shutdown on sockets we own; it makes accept() and reads return.
        unsafe {
            libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR);
        }
        if let Some(s) = lock(&self.active).as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
