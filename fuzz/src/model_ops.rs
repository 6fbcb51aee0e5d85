//! The operations the `control_model` target interprets (decoded from fuzz input with
//! `arbitrary`), and an encoder for the few that seed inputs use: `gen_seeds` builds a
//! driver that reaches DRIVER_OK and checks that the bytes decode back to the same ops.

use arbitrary::Arbitrary;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use vmdev_proto::transport::VqState;

pub const BASE: u64 = 0x10000;

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    /// `BASE + n * 256`: inside (or just past) a typical region, aligned for every ring.
    Near(u8),
    /// Anything.
    Raw(u64),
}

impl Addr {
    /// The value.
    pub fn get(self) -> u64 {
        match self {
            Addr::Near(n) => BASE + n as u64 * 0x100,
            Addr::Raw(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum RegionAddr {
    Base,
    Page(u8),
    Raw(u64),
}

impl RegionAddr {
    /// The value.
    pub fn get(self) -> u64 {
        match self {
            RegionAddr::Base => BASE,
            RegionAddr::Page(n) => n as u64 * 0x1000,
            RegionAddr::Raw(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Len {
    /// `(n % 17 + 1)` pages.
    Pages(u8),
    Raw(u64),
}

impl Len {
    /// The value.
    pub fn get(self) -> u64 {
        match self {
            Len::Pages(n) => (n as u64 % 17 + 1) * 0x1000,
            Len::Raw(v) => v,
        }
    }
}

/// The fd sent with a request.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Fd {
    None,
    Eventfd,
    /// A memfd of `n % 17` pages sealed against shrinking and growing.
    Sealed(u8),
    /// A memfd of `n % 17` pages without seals.
    Unsealed(u8),
}

pub fn eventfd() -> OwnedFd {
    // SAFETY: eventfd returns a new fd or -1, checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: freshly created and owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

pub fn memfd(pages: u8, sealed: bool) -> OwnedFd {
    let size = (pages as u64 % 17) * 0x1000;
    if sealed {
        return vmdev_shm_ring::create_sealed_memfd("fuzz", size).expect("sealed memfd");
    }
    // SAFETY: memfd_create with a NUL-terminated name; checked below.
    let fd = unsafe { libc::memfd_create(c"fuzz-unsealed".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: freshly created and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on a valid fd.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
    fd
}

impl Fd {
    /// The fds to send.
    pub fn make(self) -> Vec<OwnedFd> {
        match self {
            Fd::None => vec![],
            Fd::Eventfd => vec![eventfd()],
            Fd::Sealed(n) => vec![memfd(n, true)],
            Fd::Unsealed(n) => vec![memfd(n, false)],
        }
    }
}

/// An eventfd or none (the server refuses other fds for kick, call and config notify).
pub fn event(with: bool) -> Vec<OwnedFd> {
    if with {
        vec![eventfd()]
    } else {
        vec![]
    }
}

pub fn queue(q: u8) -> u16 {
    if q < 0xf0 {
        (q % 6) as u16
    } else {
        u16::MAX - (q - 0xf0) as u16
    }
}

/// A queue state: split unless bit 0 of `kind`; bits 1 and 2 are the packed wrap counters.
pub fn vq_state(kind: u8, avail: u16, used: u16) -> VqState {
    if kind & 1 == 0 {
        VqState::Split {
            avail_index: avail,
            used_index: used,
        }
    } else {
        VqState::Packed {
            avail_index: avail,
            avail_wrap: kind & 2 != 0,
            used_index: used,
            used_wrap: kind & 4 != 0,
        }
    }
}

pub fn qsize(s: u8) -> u16 {
    if s < 16 {
        1 << s
    } else {
        (s as u16).wrapping_mul(3)
    }
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Op {
    // ---- requests, as a driver sends them ----
    GetDeviceId,
    GetVendorId,
    GetDeviceFeatures,
    GetDriverFeatures,
    GetStatus,
    GetConfigSize,
    GetConfigGeneration,
    GetNumQueues,
    ReadConfig {
        offset: u32,
        len: u32,
    },
    ReadConfigSmall {
        offset: u8,
        len: u8,
    },
    WriteConfig {
        offset: u32,
        data: Vec<u8>,
    },
    SetDriverFeatures(u64),
    /// Accepts `offered & mask`, plus VERSION_1.
    AcceptFeatures(u64),
    SetStatus(u8),
    /// Writes the current status with these bits added.
    AddStatus(u8),
    /// Adds the next bit of ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK.
    NextStatus,
    Reset,
    Suspend,
    Resume,
    GetQueueMaxSize {
        queue: u8,
    },
    GetQueueState {
        queue: u8,
    },
    /// `kind`: see [`vq_state`].
    SetQueueState {
        queue: u8,
        avail: u16,
        used: u16,
        kind: u8,
    },
    GetQueueReady {
        queue: u8,
    },
    SetQueueSize {
        queue: u8,
        size: u8,
    },
    SetQueueAddress {
        queue: u8,
        desc: Addr,
        driver: Addr,
        device: Addr,
    },
    /// Places a queue's rings back to back from `BASE + slot * 0x3000` (size of the ring
    /// `size`, or the maximum).
    PlaceQueue {
        queue: u8,
        slot: u8,
    },
    SetQueueReady {
        queue: u8,
        ready: bool,
    },
    SetQueueKick {
        queue: u8,
        fd: bool,
    },
    SetQueueCall {
        queue: u8,
        fd: bool,
    },
    SetConfigNotify {
        fd: bool,
    },
    AddMemRegion {
        guest_addr: RegionAddr,
        size: Len,
        offset: Len,
        fd: Fd,
    },
    /// A 64 KiB sealed region at BASE.
    AddDefaultRegion,
    RemoveMemRegion {
        guest_addr: RegionAddr,
    },
    /// Not device operations: the model refuses them.
    SaveState,
    LoadStateRequest(Vec<u8>),
    ListTypes,
    // ---- the daemon's side ----
    LoadState {
        features: u64,
        status: u8,
        queues: Vec<(u8, u16, u16, u8)>,
    },
    SetDirtyLog(Option<u8>),
    /// The datapath reports the device failed (or was lost with its parent).
    DeviceFailed,
    /// Management migration: detach where it runs, attach again elsewhere.
    Migrate {
        advance: u8,
        fail: bool,
    },
    /// The driver went away.
    Release,
}

#[derive(Arbitrary, Debug, Clone)]
pub struct Input {
    pub pairs: u8,
    pub queue_size: u8,
    pub trusted: bool,
    /// Bit i: the i-th attach fails in the datapath.
    pub attach_failures: u32,
    /// Chains the datapath completed on each queue before a detach.
    pub advance: u8,
    pub ops: Vec<Op>,
}

/// Number of variants of [`Op`] (the derive maps a u32 onto them by multiply and shift).
const OP_VARIANTS: u64 = 41;

/// The u32 that `arbitrary`'s derive maps to variant `index` of `count`.
fn variant(out: &mut Vec<u8>, index: u64, count: u64) {
    let x = ((index << 32) + count - 1) / count;
    out.extend_from_slice(&(x as u32).to_le_bytes());
}

impl Op {
    /// Appends the bytes `arbitrary` decodes as this op (inside `Input::ops`: a
    /// continuation byte, then the op). Only the ops seeds use are supported.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(1);
        let (index, fields): (u64, Vec<u8>) = match *self {
            Op::GetStatus => (4, vec![]),
            Op::ReadConfigSmall { offset, len } => (9, vec![offset, len]),
            Op::AcceptFeatures(mask) => (12, mask.to_le_bytes().to_vec()),
            Op::NextStatus => (15, vec![]),
            Op::Reset => (16, vec![]),
            Op::Suspend => (17, vec![]),
            Op::Resume => (18, vec![]),
            Op::GetQueueState { queue } => (20, vec![queue]),
            Op::SetQueueState {
                queue,
                avail,
                used,
                kind,
            } => {
                let mut f = vec![queue];
                f.extend_from_slice(&avail.to_le_bytes());
                f.extend_from_slice(&used.to_le_bytes());
                f.push(kind);
                (21, f)
            }
            Op::SetQueueSize { queue, size } => (23, vec![queue, size]),
            Op::PlaceQueue { queue, slot } => (25, vec![queue, slot]),
            Op::SetQueueReady { queue, ready } => (26, vec![queue, ready as u8]),
            Op::SetQueueKick { queue, fd } => (27, vec![queue, fd as u8]),
            Op::SetQueueCall { queue, fd } => (28, vec![queue, fd as u8]),
            Op::SetConfigNotify { fd } => (29, vec![fd as u8]),
            Op::AddDefaultRegion => (31, vec![]),
            Op::DeviceFailed => (38, vec![]),
            Op::Migrate { advance, fail } => (39, vec![advance, fail as u8]),
            Op::Release => (40, vec![]),
            ref other => unimplemented!("encoding {other:?}"),
        };
        variant(out, index, OP_VARIANTS);
        out.extend_from_slice(&fields);
    }
}

impl Input {
    /// The bytes `arbitrary` decodes as this input (see [`Op::encode`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.pairs, self.queue_size, self.trusted as u8];
        out.extend_from_slice(&self.attach_failures.to_le_bytes());
        out.push(self.advance);
        for op in &self.ops {
            op.encode(&mut out);
        }
        out
    }
}
