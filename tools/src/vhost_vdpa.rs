//! The driver side of the Linux kernel's vhost-vdpa char device (`/dev/vhost-vdpa-N`),
//! written against `linux/vhost.h` and `linux/vhost_types.h` without bindgen: ioctl numbers
//! from the `_IOC` formula, `#[repr(C)]` structs of the same layout, and IOTLB updates
//! written to the device as `struct vhost_msg_v2`.
//!
//! The order the kernel expects: `VHOST_SET_OWNER`, backend features (IOTLB_MSG_V2), device
//! features, status ACKNOWLEDGE|DRIVER, `VHOST_SET_FEATURES`, status FEATURES_OK, IOTLB
//! updates, per vring NUM/BASE/ADDR/KICK/CALL and `VHOST_VDPA_SET_VRING_ENABLE`, status
//! DRIVER_OK. [`VhostVdpa::open`] does the first two steps; the rest is the driver's.
//!
//! Ring addresses handed to `VHOST_SET_VRING_ADDR` are IOVAs (the driver's guest addresses,
//! which the IOTLB maps onto this process's memory), so the driver must accept
//! VIRTIO_F_ACCESS_PLATFORM.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

// ---- the _IOC formula (asm-generic/ioctl.h; powerpc, mips and sparc differ) ----

#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
mod ioc_arch {
    pub const SIZEBITS: u32 = 13;
    pub const NONE: u32 = 1;
    pub const READ: u32 = 2;
    pub const WRITE: u32 = 4;
}
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
mod ioc_arch {
    pub const SIZEBITS: u32 = 14;
    pub const NONE: u32 = 0;
    pub const READ: u32 = 2;
    pub const WRITE: u32 = 1;
}

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = ioc_arch::SIZEBITS;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;
const IOC_NONE: u32 = ioc_arch::NONE;
const IOC_WRITE: u32 = ioc_arch::WRITE;
const IOC_READ: u32 = ioc_arch::READ;

/// `_IOC(dir, type, nr, size)`.
const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    (dir << IOC_DIRSHIFT)
        | (ty << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}

/// `_IO(type, nr)`.
const fn io(ty: u32, nr: u32) -> u32 {
    ioc(IOC_NONE, ty, nr, 0)
}

/// `_IOR(type, nr, T)`: the kernel writes a `T` to userspace.
const fn ior<T>(ty: u32, nr: u32) -> u32 {
    ioc(IOC_READ, ty, nr, std::mem::size_of::<T>())
}

/// `_IOW(type, nr, T)`: the kernel reads a `T` from userspace.
const fn iow<T>(ty: u32, nr: u32) -> u32 {
    ioc(IOC_WRITE, ty, nr, std::mem::size_of::<T>())
}

// ---- linux/vhost_types.h ----

/// `struct vhost_vring_state`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VhostVringState {
    /// Vring index.
    pub index: u32,
    /// The value (size, base, enable...).
    pub num: u32,
}

/// `struct vhost_vring_file`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VhostVringFile {
    /// Vring index.
    pub index: u32,
    /// Eventfd (-1 unbinds).
    pub fd: i32,
}

/// `struct vhost_vring_addr` (note the order: desc, used, avail).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VhostVringAddr {
    /// Vring index.
    pub index: u32,
    /// Option flags (bit `VHOST_VRING_F_LOG`).
    pub flags: u32,
    /// Descriptor table.
    pub desc_user_addr: u64,
    /// Used (device) ring.
    pub used_user_addr: u64,
    /// Available (driver) ring.
    pub avail_user_addr: u64,
    /// Where writes to the used ring are logged.
    pub log_guest_addr: u64,
}

/// `struct vhost_iotlb_msg`, with its tail padding spelled out (the struct is 8-aligned).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VhostIotlbMsg {
    /// I/O virtual address (the device's address).
    pub iova: u64,
    /// Length in bytes.
    pub size: u64,
    /// Address in this process that backs `iova`.
    pub uaddr: u64,
    /// `VHOST_ACCESS_*`.
    pub perm: u8,
    /// `VHOST_IOTLB_*`.
    pub msg_type: u8,
    /// Padding to the struct's 8-byte alignment.
    pub pad: [u8; 6],
}

/// `struct vhost_msg_v2`: type, address space, and a 64-byte union holding the IOTLB
/// message (the rest of the union spelled out as padding).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VhostMsgV2 {
    /// `VHOST_IOTLB_MSG_V2`.
    pub msg_type: u32,
    /// Address space id (read by the kernel only with VHOST_BACKEND_F_IOTLB_ASID).
    pub asid: u32,
    /// The IOTLB message.
    pub iotlb: VhostIotlbMsg,
    /// The rest of the 64-byte union.
    pub pad: [u8; 64 - std::mem::size_of::<VhostIotlbMsg>()],
}

/// The fixed head of `struct vhost_vdpa_config` (`buf[]` follows it).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VhostVdpaConfig {
    /// Offset into config space.
    pub off: u32,
    /// Bytes in `buf`.
    pub len: u32,
}

/// `struct vhost_vdpa_iova_range`: the IOVAs the device can map, inclusive.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VhostVdpaIovaRange {
    /// First mappable IOVA.
    pub first: u64,
    /// Last mappable IOVA.
    pub last: u64,
}

/// `VHOST_ACCESS_RW`.
pub const VHOST_ACCESS_RW: u8 = 0x3;
/// `VHOST_IOTLB_UPDATE`.
pub const VHOST_IOTLB_UPDATE: u8 = 2;
/// `VHOST_IOTLB_MSG_V2`.
pub const VHOST_IOTLB_MSG_V2: u32 = 0x2;
/// `VHOST_BACKEND_F_IOTLB_MSG_V2` — a bit number, as all backend features are.
pub const VHOST_BACKEND_F_IOTLB_MSG_V2: u32 = 0x1;

// ---- linux/vhost.h ----

/// `VHOST_VIRTIO`: the vhost ioctl type.
pub const VHOST_VIRTIO: u32 = 0xAF;

/// `VHOST_GET_FEATURES`.
pub const VHOST_GET_FEATURES: u32 = ior::<u64>(VHOST_VIRTIO, 0x00);
/// `VHOST_SET_FEATURES`.
pub const VHOST_SET_FEATURES: u32 = iow::<u64>(VHOST_VIRTIO, 0x00);
/// `VHOST_SET_OWNER`.
pub const VHOST_SET_OWNER: u32 = io(VHOST_VIRTIO, 0x01);
/// `VHOST_SET_VRING_NUM`.
pub const VHOST_SET_VRING_NUM: u32 = iow::<VhostVringState>(VHOST_VIRTIO, 0x10);
/// `VHOST_SET_VRING_ADDR`.
pub const VHOST_SET_VRING_ADDR: u32 = iow::<VhostVringAddr>(VHOST_VIRTIO, 0x11);
/// `VHOST_SET_VRING_BASE`.
pub const VHOST_SET_VRING_BASE: u32 = iow::<VhostVringState>(VHOST_VIRTIO, 0x12);
/// `VHOST_SET_VRING_KICK`.
pub const VHOST_SET_VRING_KICK: u32 = iow::<VhostVringFile>(VHOST_VIRTIO, 0x20);
/// `VHOST_SET_VRING_CALL`.
pub const VHOST_SET_VRING_CALL: u32 = iow::<VhostVringFile>(VHOST_VIRTIO, 0x21);
/// `VHOST_SET_BACKEND_FEATURES`.
pub const VHOST_SET_BACKEND_FEATURES: u32 = iow::<u64>(VHOST_VIRTIO, 0x25);
/// `VHOST_GET_BACKEND_FEATURES`.
pub const VHOST_GET_BACKEND_FEATURES: u32 = ior::<u64>(VHOST_VIRTIO, 0x26);
/// `VHOST_VDPA_GET_DEVICE_ID`.
pub const VHOST_VDPA_GET_DEVICE_ID: u32 = ior::<u32>(VHOST_VIRTIO, 0x70);
/// `VHOST_VDPA_GET_STATUS`.
pub const VHOST_VDPA_GET_STATUS: u32 = ior::<u8>(VHOST_VIRTIO, 0x71);
/// `VHOST_VDPA_SET_STATUS`.
pub const VHOST_VDPA_SET_STATUS: u32 = iow::<u8>(VHOST_VIRTIO, 0x72);
/// `VHOST_VDPA_GET_CONFIG` (the size is that of the fixed head of `vhost_vdpa_config`).
pub const VHOST_VDPA_GET_CONFIG: u32 = ior::<VhostVdpaConfig>(VHOST_VIRTIO, 0x73);
/// `VHOST_VDPA_SET_VRING_ENABLE`.
pub const VHOST_VDPA_SET_VRING_ENABLE: u32 = iow::<VhostVringState>(VHOST_VIRTIO, 0x75);
/// `VHOST_VDPA_GET_VRING_NUM`.
pub const VHOST_VDPA_GET_VRING_NUM: u32 = ior::<u16>(VHOST_VIRTIO, 0x76);
/// `VHOST_VDPA_SET_CONFIG_CALL`.
pub const VHOST_VDPA_SET_CONFIG_CALL: u32 = iow::<i32>(VHOST_VIRTIO, 0x77);
/// `VHOST_VDPA_GET_IOVA_RANGE`.
pub const VHOST_VDPA_GET_IOVA_RANGE: u32 = ior::<VhostVdpaIovaRange>(VHOST_VIRTIO, 0x78);
/// `VHOST_VDPA_GET_CONFIG_SIZE`.
pub const VHOST_VDPA_GET_CONFIG_SIZE: u32 = ior::<u32>(VHOST_VIRTIO, 0x79);

/// Plain data the kernel may fill with any bytes: every bit pattern is a valid value.
trait Plain: Copy + Default {}
impl Plain for u8 {}
impl Plain for u16 {}
impl Plain for u32 {}
impl Plain for u64 {}
impl Plain for i32 {}
impl Plain for VhostVringState {}
impl Plain for VhostVringFile {}
impl Plain for VhostVringAddr {}
impl Plain for VhostVdpaIovaRange {}

/// Failures of the vhost-vdpa device; each names the device and the operation.
#[derive(Debug, thiserror::Error)]
pub enum VhostVdpaError {
    /// The char device could not be opened.
    #[error("opening {}: {source}{}", path.display(), open_hint(source))]
    Open {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// An ioctl failed.
    #[error("{ioctl} on {}: {source}", path.display())]
    Ioctl {
        /// The ioctl's name, as in `linux/vhost.h`.
        ioctl: &'static str,
        /// The device.
        path: PathBuf,
        /// The errno.
        source: io::Error,
    },
    /// Writing an IOTLB update failed (the kernel reports every refusal of the mapping
    /// itself as EFAULT).
    #[error(
        "IOTLB update iova {iova:#x}+{size:#x} written to {}: {source} (out of the device's \
         IOVA range, overlapping an earlier mapping, over RLIMIT_MEMLOCK for devices that pin \
         pages, or memory that is not a shared file mapping)",
        path.display()
    )]
    Iotlb {
        /// The device.
        path: PathBuf,
        /// First IOVA.
        iova: u64,
        /// Length.
        size: u64,
        /// The errno.
        source: io::Error,
    },
    /// The device does not support what this driver needs, or the request cannot be made.
    #[error("{}: {msg}", path.display())]
    Unsupported {
        /// The device.
        path: PathBuf,
        /// What is missing.
        msg: String,
    },
}

fn open_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::NotFound => {
            " — is the vhost_vdpa module loaded and a vDPA device bound to it (`vdpa dev add ...`)?"
        }
        io::ErrorKind::PermissionDenied => " — opening it needs read-write access",
        _ => "",
    }
}

/// An open, owned `/dev/vhost-vdpa-N`, with backend feature IOTLB_MSG_V2 acknowledged.
#[derive(Debug)]
pub struct VhostVdpa {
    fd: OwnedFd,
    path: PathBuf,
    config_size: Option<u32>,
}

impl VhostVdpa {
    /// Opens the char device, becomes its owner (`VHOST_SET_OWNER`) and acknowledges the
    /// backend feature VHOST_BACKEND_F_IOTLB_MSG_V2 (the form of the IOTLB updates written by
    /// [`VhostVdpa::iotlb_update`]).
    pub fn open(path: &Path) -> Result<Self, VhostVdpaError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| VhostVdpaError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let dev = VhostVdpa {
            fd: OwnedFd::from(file),
            path: path.to_path_buf(),
            config_size: None,
        };
        dev.ioctl_none("VHOST_SET_OWNER", VHOST_SET_OWNER)?;
        let offered = dev.backend_features()?;
        let v2 = 1u64 << VHOST_BACKEND_F_IOTLB_MSG_V2;
        if offered & v2 == 0 {
            return Err(dev.unsupported(format!(
                "the device does not offer VHOST_BACKEND_F_IOTLB_MSG_V2 (backend features {offered:#x})"
            )));
        }
        dev.set_backend_features(v2)?;
        Ok(dev)
    }

    /// The path this device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open char device.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn unsupported(&self, msg: String) -> VhostVdpaError {
        VhostVdpaError::Unsupported {
            path: self.path.clone(),
            msg,
        }
    }

    fn ioctl_err(&self, ioctl: &'static str, source: io::Error) -> VhostVdpaError {
        VhostVdpaError::Ioctl {
            ioctl,
            path: self.path.clone(),
            source,
        }
    }

    /// An ioctl without argument.
    fn ioctl_none(&self, name: &'static str, req: u32) -> Result<(), VhostVdpaError> {
        // SAFETY: an `_IO` request takes no argument; the kernel reads and writes no user
        // memory for it.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as libc::Ioctl) };
        if r < 0 {
            return Err(self.ioctl_err(name, io::Error::last_os_error()));
        }
        Ok(())
    }

    /// An ioctl whose argument is the pointer `arg`, to memory the kernel reads (`_IOW`) or
    /// fills (`_IOR`).
    ///
    /// # Safety
    /// `arg` must be valid for reads and writes of the size encoded in `req` (or, for
    /// `VHOST_VDPA_GET_CONFIG`, of the head plus the `len` it carries).
    unsafe fn ioctl_ptr(
        &self,
        name: &'static str,
        req: u32,
        arg: *mut libc::c_void,
    ) -> Result<(), VhostVdpaError> {
        // SAFETY: the caller guarantees `arg` points to memory of the size the request
        // encodes; the fd is ours and open.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as libc::Ioctl, arg) };
        if r < 0 {
            return Err(self.ioctl_err(name, io::Error::last_os_error()));
        }
        Ok(())
    }

    /// An `_IOR` ioctl that fills one `T`.
    fn ioctl_get<T: Plain>(&self, name: &'static str, req: u32) -> Result<T, VhostVdpaError> {
        debug_assert_eq!(
            (req >> IOC_SIZESHIFT) as usize & ((1 << IOC_SIZEBITS) - 1),
            std::mem::size_of::<T>()
        );
        let mut v = T::default();
        // SAFETY: `v` is a live, writable `T` that any bytes make a valid value (`Plain`), and
        // every request passed here encodes size_of::<T>() (checked above in debug builds),
        // so the kernel writes within it.
        unsafe { self.ioctl_ptr(name, req, (&mut v as *mut T).cast())? };
        Ok(v)
    }

    /// An `_IOW` ioctl that passes one `T`.
    fn ioctl_set<T: Plain>(
        &self,
        name: &'static str,
        req: u32,
        v: T,
    ) -> Result<(), VhostVdpaError> {
        debug_assert_eq!(
            (req >> IOC_SIZESHIFT) as usize & ((1 << IOC_SIZEBITS) - 1),
            std::mem::size_of::<T>()
        );
        let mut v = v;
        // SAFETY: `v` is a live `T`, and every request passed here encodes size_of::<T>()
        // (checked above in debug builds), so the kernel reads within it.
        unsafe { self.ioctl_ptr(name, req, (&mut v as *mut T).cast()) }
    }

    /// Backend features the device offers (`VHOST_GET_BACKEND_FEATURES`; bit numbers are
    /// the `VHOST_BACKEND_F_*` values).
    pub fn backend_features(&self) -> Result<u64, VhostVdpaError> {
        self.ioctl_get("VHOST_GET_BACKEND_FEATURES", VHOST_GET_BACKEND_FEATURES)
    }

    /// Acknowledges backend features (`VHOST_SET_BACKEND_FEATURES`).
    pub fn set_backend_features(&self, features: u64) -> Result<(), VhostVdpaError> {
        self.ioctl_set(
            "VHOST_SET_BACKEND_FEATURES",
            VHOST_SET_BACKEND_FEATURES,
            features,
        )
    }

    /// The virtio device id (`VHOST_VDPA_GET_DEVICE_ID`).
    pub fn device_id(&self) -> Result<u32, VhostVdpaError> {
        self.ioctl_get("VHOST_VDPA_GET_DEVICE_ID", VHOST_VDPA_GET_DEVICE_ID)
    }

    /// Features the device offers (`VHOST_GET_FEATURES`).
    pub fn features(&self) -> Result<u64, VhostVdpaError> {
        self.ioctl_get("VHOST_GET_FEATURES", VHOST_GET_FEATURES)
    }

    /// Accepts features (`VHOST_SET_FEATURES`; before FEATURES_OK).
    pub fn set_features(&self, features: u64) -> Result<(), VhostVdpaError> {
        self.ioctl_set("VHOST_SET_FEATURES", VHOST_SET_FEATURES, features)
    }

    /// The status byte (`VHOST_VDPA_GET_STATUS`).
    pub fn status(&self) -> Result<u8, VhostVdpaError> {
        self.ioctl_get("VHOST_VDPA_GET_STATUS", VHOST_VDPA_GET_STATUS)
    }

    /// Writes the status byte (`VHOST_VDPA_SET_STATUS`; 0 resets the device).
    pub fn set_status(&self, status: u8) -> Result<(), VhostVdpaError> {
        self.ioctl_set("VHOST_VDPA_SET_STATUS", VHOST_VDPA_SET_STATUS, status)
    }

    /// Config space size (`VHOST_VDPA_GET_CONFIG_SIZE`).
    pub fn config_size(&self) -> Result<u32, VhostVdpaError> {
        self.ioctl_get("VHOST_VDPA_GET_CONFIG_SIZE", VHOST_VDPA_GET_CONFIG_SIZE)
    }

    /// Reads `len` bytes of config space at `offset` (`VHOST_VDPA_GET_CONFIG`).
    pub fn read_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, VhostVdpaError> {
        let size = match self.config_size {
            Some(s) => s,
            None => {
                let s = match self.config_size() {
                    // Kernels before VHOST_VDPA_GET_CONFIG_SIZE: the kernel checks alone.
                    Err(VhostVdpaError::Ioctl { source, .. })
                        if source.raw_os_error() == Some(libc::ENOTTY) =>
                    {
                        u32::MAX
                    }
                    r => r?,
                };
                self.config_size = Some(s);
                s
            }
        };
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(self.unsupported(format!(
                "config read of {len} bytes at {offset} outside the device's {size}-byte config space"
            )));
        }
        let head = std::mem::size_of::<VhostVdpaConfig>();
        // struct vhost_vdpa_config: off, len, then buf[len] for the kernel to fill.
        let mut buf = Vec::with_capacity(head + len as usize);
        buf.extend_from_slice(&offset.to_ne_bytes());
        buf.extend_from_slice(&len.to_ne_bytes());
        buf.resize(head + len as usize, 0);
        // SAFETY: `buf` holds the head the kernel reads and exactly the `len` bytes of
        // `buf[]` the kernel fills (it copies bytes, so alignment does not matter).
        unsafe {
            self.ioctl_ptr(
                "VHOST_VDPA_GET_CONFIG",
                VHOST_VDPA_GET_CONFIG,
                buf.as_mut_ptr().cast(),
            )?
        };
        buf.drain(..head);
        Ok(buf)
    }

    /// Largest vring size (`VHOST_VDPA_GET_VRING_NUM`; the same for every vring).
    pub fn vring_num_max(&self) -> Result<u16, VhostVdpaError> {
        self.ioctl_get("VHOST_VDPA_GET_VRING_NUM", VHOST_VDPA_GET_VRING_NUM)
    }

    /// IOVAs the device can map (`VHOST_VDPA_GET_IOVA_RANGE`; the whole space on kernels
    /// without the ioctl).
    pub fn iova_range(&self) -> Result<VhostVdpaIovaRange, VhostVdpaError> {
        match self.ioctl_get("VHOST_VDPA_GET_IOVA_RANGE", VHOST_VDPA_GET_IOVA_RANGE) {
            Err(VhostVdpaError::Ioctl { source, .. })
                if source.raw_os_error() == Some(libc::ENOTTY) =>
            {
                Ok(VhostVdpaIovaRange {
                    first: 0,
                    last: u64::MAX,
                })
            }
            r => r,
        }
    }

    /// Sets a vring's size (`VHOST_SET_VRING_NUM`).
    pub fn set_vring_num(&self, index: u16, num: u16) -> Result<(), VhostVdpaError> {
        self.ioctl_set(
            "VHOST_SET_VRING_NUM",
            VHOST_SET_VRING_NUM,
            VhostVringState {
                index: index.into(),
                num: num.into(),
            },
        )
    }

    /// Sets the ring position a vring starts from (`VHOST_SET_VRING_BASE`; split rings:
    /// the next avail index).
    pub fn set_vring_base(&self, index: u16, base: u16) -> Result<(), VhostVdpaError> {
        self.ioctl_set(
            "VHOST_SET_VRING_BASE",
            VHOST_SET_VRING_BASE,
            VhostVringState {
                index: index.into(),
                num: base.into(),
            },
        )
    }

    /// Sets a vring's ring addresses, as IOVAs (`VHOST_SET_VRING_ADDR`).
    pub fn set_vring_addr(
        &self,
        index: u16,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> Result<(), VhostVdpaError> {
        self.ioctl_set(
            "VHOST_SET_VRING_ADDR",
            VHOST_SET_VRING_ADDR,
            VhostVringAddr {
                index: index.into(),
                flags: 0,
                desc_user_addr: desc,
                used_user_addr: used,
                avail_user_addr: avail,
                log_guest_addr: 0,
            },
        )
    }

    /// Hands a vring's kick eventfd (`VHOST_SET_VRING_KICK`).
    pub fn set_vring_kick(&self, index: u16, fd: BorrowedFd<'_>) -> Result<(), VhostVdpaError> {
        self.ioctl_set(
            "VHOST_SET_VRING_KICK",
            VHOST_SET_VRING_KICK,
            VhostVringFile {
                index: index.into(),
                fd: fd.as_raw_fd(),
            },
        )
    }

    /// Hands a vring's call eventfd (`VHOST_SET_VRING_CALL`).
    pub fn set_vring_call(&self, index: u16, fd: BorrowedFd<'_>) -> Result<(), VhostVdpaError> {
        self.ioctl_set(
            "VHOST_SET_VRING_CALL",
            VHOST_SET_VRING_CALL,
            VhostVringFile {
                index: index.into(),
                fd: fd.as_raw_fd(),
            },
        )
    }

    /// Enables or disables a vring (`VHOST_VDPA_SET_VRING_ENABLE`).
    pub fn set_vring_enable(&self, index: u16, enable: bool) -> Result<(), VhostVdpaError> {
        self.ioctl_set(
            "VHOST_VDPA_SET_VRING_ENABLE",
            VHOST_VDPA_SET_VRING_ENABLE,
            VhostVringState {
                index: index.into(),
                num: enable.into(),
            },
        )
    }

    /// Hands the config-change eventfd (`VHOST_VDPA_SET_CONFIG_CALL`).
    pub fn set_config_call(&self, fd: BorrowedFd<'_>) -> Result<(), VhostVdpaError> {
        self.ioctl_set(
            "VHOST_VDPA_SET_CONFIG_CALL",
            VHOST_VDPA_SET_CONFIG_CALL,
            fd.as_raw_fd(),
        )
    }

    /// Maps `size` bytes at IOVA `iova` onto this process's memory at `uaddr`, read-write,
    /// by writing a `vhost_msg_v2` IOTLB update. With VDUSE-backed devices `uaddr` must lie
    /// in a shared file mapping (such as a memfd mapped MAP_SHARED); the kernel keeps its
    /// own reference, but the mapping should stay as long as the device uses it.
    pub fn iotlb_update(&self, iova: u64, size: u64, uaddr: u64) -> Result<(), VhostVdpaError> {
        let msg = iotlb_update_msg(iova, size, uaddr).to_bytes();
        let len = msg.len();
        // SAFETY: `msg` is a live array of `len` initialised bytes; write only reads it.
        let r = unsafe { libc::write(self.fd.as_raw_fd(), msg.as_ptr().cast(), len) };
        let err = |source| VhostVdpaError::Iotlb {
            path: self.path.clone(),
            iova,
            size,
            source,
        };
        if r < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        if r as usize != len {
            return Err(err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write of {r} of {len} bytes"),
            )));
        }
        Ok(())
    }
}

impl VhostMsgV2 {
    /// The message as the kernel reads it (native byte order, the struct's layout).
    pub fn to_bytes(&self) -> [u8; std::mem::size_of::<VhostMsgV2>()] {
        let mut b = [0u8; std::mem::size_of::<VhostMsgV2>()];
        let t = &self.iotlb;
        let parts: [&[u8]; 8] = [
            &self.msg_type.to_ne_bytes(),
            &self.asid.to_ne_bytes(),
            &t.iova.to_ne_bytes(),
            &t.size.to_ne_bytes(),
            &t.uaddr.to_ne_bytes(),
            &[t.perm, t.msg_type],
            &t.pad,
            &self.pad,
        ];
        let mut at = 0;
        for p in parts {
            if let Some(dst) = b.get_mut(at..at + p.len()) {
                dst.copy_from_slice(p);
            }
            at += p.len();
        }
        b
    }
}

/// The `vhost_msg_v2` that maps `iova..iova+size` read-write onto `uaddr`.
pub fn iotlb_update_msg(iova: u64, size: u64, uaddr: u64) -> VhostMsgV2 {
    VhostMsgV2 {
        msg_type: VHOST_IOTLB_MSG_V2,
        asid: 0,
        iotlb: VhostIotlbMsg {
            iova,
            size,
            uaddr,
            perm: VHOST_ACCESS_RW,
            msg_type: VHOST_IOTLB_UPDATE,
            pad: [0; 6],
        },
        pad: [0; 64 - std::mem::size_of::<VhostIotlbMsg>()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// Values printed by a C program including `<linux/vhost.h>` on x86_64 (gcc), and
    /// computed by hand from `_IOC(dir, 0xAF, nr, size)` (the asm-generic layout).
    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn ioctl_numbers_match_the_header() {
        assert_eq!(VHOST_GET_FEATURES, 0x8008_AF00);
        assert_eq!(VHOST_SET_FEATURES, 0x4008_AF00);
        assert_eq!(VHOST_SET_OWNER, 0xAF01);
        assert_eq!(VHOST_GET_BACKEND_FEATURES, 0x8008_AF26);
        assert_eq!(VHOST_SET_BACKEND_FEATURES, 0x4008_AF25);
        assert_eq!(VHOST_SET_VRING_NUM, 0x4008_AF10);
        assert_eq!(VHOST_SET_VRING_ADDR, 0x4028_AF11);
        assert_eq!(VHOST_SET_VRING_BASE, 0x4008_AF12);
        assert_eq!(VHOST_SET_VRING_KICK, 0x4008_AF20);
        assert_eq!(VHOST_SET_VRING_CALL, 0x4008_AF21);
        assert_eq!(VHOST_VDPA_GET_DEVICE_ID, 0x8004_AF70);
        assert_eq!(VHOST_VDPA_GET_STATUS, 0x8001_AF71);
        assert_eq!(VHOST_VDPA_SET_STATUS, 0x4001_AF72);
        assert_eq!(VHOST_VDPA_GET_CONFIG, 0x8008_AF73);
        assert_eq!(VHOST_VDPA_SET_VRING_ENABLE, 0x4008_AF75);
        assert_eq!(VHOST_VDPA_GET_VRING_NUM, 0x8002_AF76);
        assert_eq!(VHOST_VDPA_SET_CONFIG_CALL, 0x4004_AF77);
        assert_eq!(VHOST_VDPA_GET_IOVA_RANGE, 0x8010_AF78);
        assert_eq!(VHOST_VDPA_GET_CONFIG_SIZE, 0x8004_AF79);
    }

    /// Compiles a C program against this machine's `<linux/vhost.h>` and compares every
    /// constant and layout; skipped where there is no C compiler or no kernel headers.
    #[test]
    fn matches_this_machines_c_header() {
        let ours: &[(&str, u64)] = &[
            ("VHOST_GET_FEATURES", VHOST_GET_FEATURES.into()),
            ("VHOST_SET_FEATURES", VHOST_SET_FEATURES.into()),
            ("VHOST_SET_OWNER", VHOST_SET_OWNER.into()),
            (
                "VHOST_GET_BACKEND_FEATURES",
                VHOST_GET_BACKEND_FEATURES.into(),
            ),
            (
                "VHOST_SET_BACKEND_FEATURES",
                VHOST_SET_BACKEND_FEATURES.into(),
            ),
            ("VHOST_SET_VRING_NUM", VHOST_SET_VRING_NUM.into()),
            ("VHOST_SET_VRING_ADDR", VHOST_SET_VRING_ADDR.into()),
            ("VHOST_SET_VRING_BASE", VHOST_SET_VRING_BASE.into()),
            ("VHOST_SET_VRING_KICK", VHOST_SET_VRING_KICK.into()),
            ("VHOST_SET_VRING_CALL", VHOST_SET_VRING_CALL.into()),
            ("VHOST_VDPA_GET_DEVICE_ID", VHOST_VDPA_GET_DEVICE_ID.into()),
            ("VHOST_VDPA_GET_STATUS", VHOST_VDPA_GET_STATUS.into()),
            ("VHOST_VDPA_SET_STATUS", VHOST_VDPA_SET_STATUS.into()),
            ("VHOST_VDPA_GET_CONFIG", VHOST_VDPA_GET_CONFIG.into()),
            (
                "VHOST_VDPA_SET_VRING_ENABLE",
                VHOST_VDPA_SET_VRING_ENABLE.into(),
            ),
            ("VHOST_VDPA_GET_VRING_NUM", VHOST_VDPA_GET_VRING_NUM.into()),
            (
                "VHOST_VDPA_SET_CONFIG_CALL",
                VHOST_VDPA_SET_CONFIG_CALL.into(),
            ),
            (
                "VHOST_VDPA_GET_IOVA_RANGE",
                VHOST_VDPA_GET_IOVA_RANGE.into(),
            ),
            (
                "VHOST_VDPA_GET_CONFIG_SIZE",
                VHOST_VDPA_GET_CONFIG_SIZE.into(),
            ),
            ("VHOST_ACCESS_RW", VHOST_ACCESS_RW.into()),
            ("VHOST_IOTLB_UPDATE", VHOST_IOTLB_UPDATE.into()),
            ("VHOST_IOTLB_MSG_V2", VHOST_IOTLB_MSG_V2.into()),
            (
                "VHOST_BACKEND_F_IOTLB_MSG_V2",
                VHOST_BACKEND_F_IOTLB_MSG_V2.into(),
            ),
            (
                "sizeof(struct vhost_vring_state)",
                size_of::<VhostVringState>() as u64,
            ),
            (
                "sizeof(struct vhost_vring_file)",
                size_of::<VhostVringFile>() as u64,
            ),
            (
                "sizeof(struct vhost_vring_addr)",
                size_of::<VhostVringAddr>() as u64,
            ),
            (
                "offsetof(struct vhost_vring_addr, used_user_addr)",
                offset_of!(VhostVringAddr, used_user_addr) as u64,
            ),
            (
                "offsetof(struct vhost_vring_addr, avail_user_addr)",
                offset_of!(VhostVringAddr, avail_user_addr) as u64,
            ),
            (
                "sizeof(struct vhost_iotlb_msg)",
                size_of::<VhostIotlbMsg>() as u64,
            ),
            (
                "offsetof(struct vhost_iotlb_msg, perm)",
                offset_of!(VhostIotlbMsg, perm) as u64,
            ),
            (
                "offsetof(struct vhost_iotlb_msg, type)",
                offset_of!(VhostIotlbMsg, msg_type) as u64,
            ),
            (
                "sizeof(struct vhost_msg_v2)",
                size_of::<VhostMsgV2>() as u64,
            ),
            (
                "offsetof(struct vhost_msg_v2, iotlb)",
                offset_of!(VhostMsgV2, iotlb) as u64,
            ),
            (
                "sizeof(struct vhost_vdpa_config)",
                size_of::<VhostVdpaConfig>() as u64,
            ),
            (
                "sizeof(struct vhost_vdpa_iova_range)",
                size_of::<VhostVdpaIovaRange>() as u64,
            ),
        ];
        if !Path::new("/usr/include/linux/vhost.h").exists() {
            eprintln!("skipped: no /usr/include/linux/vhost.h");
            return;
        }
        let dir = std::env::temp_dir().join(format!("vmdev-vhost-h-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut c = String::from(
            "#include <stdio.h>\n#include <stddef.h>\n#include <linux/vhost.h>\nint main(void) {\n",
        );
        for (name, _) in ours {
            c.push_str(&format!(
                "printf(\"%s=%llu\\n\", \"{name}\", (unsigned long long)({name}));\n"
            ));
        }
        c.push_str("return 0; }\n");
        let src = dir.join("vhost.c");
        let exe = dir.join("vhost");
        std::fs::write(&src, c).expect("write C source");
        let built = std::process::Command::new("cc")
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .status();
        if !matches!(built, Ok(s) if s.success()) {
            let _ = std::fs::remove_dir_all(&dir);
            eprintln!("skipped: no working C compiler");
            return;
        }
        let out = std::process::Command::new(&exe).output().expect("run");
        let _ = std::fs::remove_dir_all(&dir);
        let text = String::from_utf8_lossy(&out.stdout);
        let theirs: std::collections::HashMap<&str, u64> = text
            .lines()
            .filter_map(|l| l.rsplit_once('='))
            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
            .collect();
        for (name, value) in ours {
            assert_eq!(theirs.get(name), Some(value), "{name}");
        }
    }

    #[test]
    fn struct_layouts_match_the_header() {
        assert_eq!(size_of::<VhostVringState>(), 8);
        assert_eq!(size_of::<VhostVringFile>(), 8);
        assert_eq!(size_of::<VhostVringAddr>(), 0x28);
        assert_eq!(offset_of!(VhostVringAddr, desc_user_addr), 0x08);
        assert_eq!(offset_of!(VhostVringAddr, used_user_addr), 0x10);
        assert_eq!(offset_of!(VhostVringAddr, avail_user_addr), 0x18);
        assert_eq!(offset_of!(VhostVringAddr, log_guest_addr), 0x20);
        assert_eq!(size_of::<VhostIotlbMsg>(), 0x20);
        assert_eq!(offset_of!(VhostIotlbMsg, perm), 0x18);
        assert_eq!(offset_of!(VhostIotlbMsg, msg_type), 0x19);
        assert_eq!(size_of::<VhostMsgV2>(), 0x48);
        assert_eq!(offset_of!(VhostMsgV2, iotlb), 0x08);
        assert_eq!(size_of::<VhostVdpaConfig>(), 8);
        assert_eq!(size_of::<VhostVdpaIovaRange>(), 0x10);
    }

    #[test]
    fn iotlb_update_message_bytes() {
        let m = iotlb_update_msg(0x1_0000_0000, 0x20_0000, 0x7f00_0000_0000);
        let b = m.to_bytes();
        assert_eq!(b.len(), size_of::<VhostMsgV2>());
        assert_eq!(&b[0..4], &2u32.to_ne_bytes()); // VHOST_IOTLB_MSG_V2
        assert_eq!(&b[4..8], &[0; 4]); // asid
        assert_eq!(&b[8..16], &0x1_0000_0000u64.to_ne_bytes()); // iova
        assert_eq!(&b[16..24], &0x20_0000u64.to_ne_bytes()); // size
        assert_eq!(&b[24..32], &0x7f00_0000_0000u64.to_ne_bytes()); // uaddr
        assert_eq!(b[32], 3); // VHOST_ACCESS_RW
        assert_eq!(b[33], 2); // VHOST_IOTLB_UPDATE
        assert!(b[34..].iter().all(|&x| x == 0));
    }

    #[test]
    fn opening_a_missing_device_is_a_clear_error() {
        let e = VhostVdpa::open(Path::new("/dev/vhost-vdpa-does-not-exist")).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, VhostVdpaError::Open { .. }), "{msg}");
        assert!(
            msg.starts_with("opening /dev/vhost-vdpa-does-not-exist: No such file or directory"),
            "{msg}"
        );
        assert!(msg.contains("vhost_vdpa module"), "{msg}");
    }

    #[test]
    fn ioctls_on_a_non_vhost_file_name_the_ioctl() {
        // /dev/null opens read-write but knows no vhost ioctl.
        let e = VhostVdpa::open(Path::new("/dev/null")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("VHOST_SET_OWNER on /dev/null: "), "{msg}");
    }
}
