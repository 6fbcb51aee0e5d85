//! The kernel's VDUSE uAPI (`include/uapi/linux/vduse.h`, API version 0), written out here:
//! `#[repr(C)]` structs, ioctl numbers, and one small safe wrapper per ioctl.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// Directory of the VDUSE char devices.
pub const VDUSE_DIR: &str = "/dev/vduse";
/// Longest device name, with its NUL.
pub const NAME_MAX: usize = 256;

const BASE: u64 = 0x81;
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (BASE << 8) | nr
}
const W: u64 = 1;
const R: u64 = 2;

/// `VDUSE_GET_API_VERSION`.
pub const GET_API_VERSION: u64 = ioc(R, 0x00, 8);
/// `VDUSE_SET_API_VERSION`.
pub const SET_API_VERSION: u64 = ioc(W, 0x01, 8);
/// `VDUSE_CREATE_DEV`.
pub const CREATE_DEV: u64 = ioc(W, 0x02, std::mem::size_of::<DevConfig>());
/// `VDUSE_DESTROY_DEV`.
pub const DESTROY_DEV: u64 = ioc(W, 0x03, NAME_MAX);
/// `VDUSE_IOTLB_GET_FD`.
pub const IOTLB_GET_FD: u64 = ioc(R | W, 0x10, std::mem::size_of::<IotlbEntry>());
/// `VDUSE_DEV_GET_FEATURES`.
pub const DEV_GET_FEATURES: u64 = ioc(R, 0x11, 8);
/// `VDUSE_VQ_SETUP`.
pub const VQ_SETUP: u64 = ioc(W, 0x14, std::mem::size_of::<VqConfig>());
/// `VDUSE_VQ_GET_INFO`.
pub const VQ_GET_INFO: u64 = ioc(R | W, 0x15, std::mem::size_of::<VqInfo>());
/// `VDUSE_VQ_SETUP_KICKFD`.
pub const VQ_SETUP_KICKFD: u64 = ioc(W, 0x16, std::mem::size_of::<VqEventfd>());
/// `VDUSE_VQ_INJECT_IRQ`.
pub const VQ_INJECT_IRQ: u64 = ioc(W, 0x17, 4);

/// `struct vduse_dev_config` without its trailing config bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DevConfig {
    /// Device name, NUL-terminated.
    pub name: [u8; NAME_MAX],
    /// Virtio vendor id.
    pub vendor_id: u32,
    /// Virtio device id.
    pub device_id: u32,
    /// Offered feature bits.
    pub features: u64,
    /// Number of virtqueues.
    pub vq_num: u32,
    /// Ring alignment.
    pub vq_align: u32,
    /// Zero.
    pub reserved: [u32; 13],
    /// Length of the config bytes that follow.
    pub config_size: u32,
}

/// `struct vduse_iotlb_entry`: one IOVA range and where it lives in the returned fd.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct IotlbEntry {
    /// Offset of `start` in the fd.
    pub offset: u64,
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub last: u64,
    /// `VDUSE_ACCESS_*`.
    pub perm: u8,
}

/// `struct vduse_vq_config`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct VqConfig {
    /// Queue index.
    pub index: u32,
    /// Largest size the driver may choose.
    pub max_size: u16,
    /// Zero.
    pub reserved: [u16; 13],
}

/// `struct vduse_vq_info` (split-ring state only: vmdev offers no packed ring here).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct VqInfo {
    /// Queue index.
    pub index: u32,
    /// Queue size the driver chose.
    pub num: u32,
    /// Descriptor table IOVA.
    pub desc_addr: u64,
    /// Driver (avail) ring IOVA.
    pub driver_addr: u64,
    /// Device (used) ring IOVA.
    pub device_addr: u64,
    /// The union: split state is `avail_index` in the first two bytes.
    pub state: [u16; 4],
    /// Whether the driver made the queue ready.
    pub ready: u8,
}

/// `struct vduse_vq_eventfd`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VqEventfd {
    /// Queue index.
    pub index: u32,
    /// Eventfd, or -1 to deassign.
    pub fd: i32,
}

/// `enum vduse_req_type`.
pub mod req {
    /// The kernel asks for a queue's state.
    pub const GET_VQ_STATE: u32 = 0;
    /// The driver wrote the status byte.
    pub const SET_STATUS: u32 = 1;
    /// IOTLB mappings in a range changed.
    pub const UPDATE_IOTLB: u32 = 2;
}

/// `VDUSE_REQ_RESULT_OK`.
pub const RESULT_OK: u32 = 0;
/// `VDUSE_REQ_RESULT_FAILED`.
pub const RESULT_FAILED: u32 = 1;

/// `struct vduse_dev_request` (read from the device fd).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DevRequest {
    /// `req::*`.
    pub kind: u32,
    /// Echoed in the response.
    pub request_id: u32,
    /// Zero.
    pub reserved: [u32; 4],
    /// The union, as words: GET_VQ_STATE → `[index, ..]`; SET_STATUS → status in the low
    /// byte of word 0; UPDATE_IOTLB → start in words 0–1, last in words 2–3.
    pub body: [u32; 32],
}

/// `struct vduse_dev_response` (written to the device fd).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DevResponse {
    /// From the request.
    pub request_id: u32,
    /// `RESULT_OK` or `RESULT_FAILED`.
    pub result: u32,
    /// Zero.
    pub reserved: [u32; 4],
    /// GET_VQ_STATE: word 0 the index, then the split avail index in the low half of word 1.
    pub body: [u32; 32],
}

impl DevRequest {
    /// The two u64 of an UPDATE_IOTLB body: first and last IOVA.
    pub fn iova_range(&self) -> (u64, u64) {
        let w = |i: usize| self.body[i] as u64 | (self.body[i + 1] as u64) << 32;
        (w(0), w(2))
    }
}

/// The ioctl, with the bare OS error on failure.
fn ioctl_raw<T>(fd: RawFd, nr: u64, arg: *mut T) -> io::Result<i32> {
    // SAFETY: every caller passes an ioctl number whose size matches `T`, and `arg` points
    // to a live, properly sized `T` (or buffer) for the duration of the call.
    let r = unsafe { libc::ioctl(fd, nr as libc::c_ulong, arg) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// The ioctl, with its name in the error.
fn ioctl_ptr<T>(fd: RawFd, what: &str, nr: u64, arg: *mut T) -> io::Result<i32> {
    ioctl_raw(fd, nr, arg).map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))
}

/// `/dev/vduse/control`.
pub struct Control(File);

impl Control {
    /// Opens the control node and agrees on API version 0.
    pub fn open() -> io::Result<Control> {
        let path = Path::new(VDUSE_DIR).join("control");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let mut v: u64 = 0;
        ioctl_ptr(
            f.as_raw_fd(),
            "VDUSE_GET_API_VERSION",
            GET_API_VERSION,
            &mut v,
        )?;
        let mut want: u64 = 0;
        ioctl_ptr(
            f.as_raw_fd(),
            "VDUSE_SET_API_VERSION",
            SET_API_VERSION,
            &mut want,
        )?;
        Ok(Control(f))
    }

    /// Creates device `name` with `config` bytes (its virtio config space); the error is
    /// the bare OS error (EEXIST: the name is taken).
    pub fn create(&self, mut dc: DevConfig, config: &[u8]) -> io::Result<()> {
        dc.config_size = config.len() as u32;
        let head = std::mem::size_of::<DevConfig>();
        // A u64 buffer keeps the struct's alignment.
        let mut buf = vec![0u64; (head + config.len()).div_ceil(8)];
        let bytes: &mut [u8] = bytemuck_bytes(&mut buf);
        // SAFETY: DevConfig is plain old data of `head` bytes; copying its bytes is sound.
        let dc_bytes =
            unsafe { std::slice::from_raw_parts((&dc as *const DevConfig).cast::<u8>(), head) };
        bytes[..head].copy_from_slice(dc_bytes);
        bytes[head..head + config.len()].copy_from_slice(config);
        // The bare OS error: callers tell EEXIST (the name is taken) from the rest.
        ioctl_raw(self.0.as_raw_fd(), CREATE_DEV, buf.as_mut_ptr())?;
        Ok(())
    }

    /// Destroys device `name` (fails with EBUSY while its fd is open or it is on the bus).
    pub fn destroy(&self, name: &str) -> io::Result<()> {
        let mut n = name_bytes(name)?;
        ioctl_ptr(
            self.0.as_raw_fd(),
            "VDUSE_DESTROY_DEV",
            DESTROY_DEV,
            n.as_mut_ptr(),
        )?;
        Ok(())
    }
}

fn bytemuck_bytes(v: &mut [u64]) -> &mut [u8] {
    // SAFETY: a u64 slice is valid as bytes of 8× its length; alignment only decreases.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), v.len() * 8) }
}

/// A device name as the kernel wants it: NUL-terminated in 256 bytes, no '/'.
pub fn name_bytes(name: &str) -> io::Result<[u8; NAME_MAX]> {
    if name.is_empty() || name.len() >= NAME_MAX || name.contains('/') || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("'{name}' is not a valid VDUSE device name (1..255 bytes, no '/')"),
        ));
    }
    let mut n = [0u8; NAME_MAX];
    n[..name.len()].copy_from_slice(name.as_bytes());
    Ok(n)
}

/// `/dev/vduse/NAME`: messages from the kernel and the per-device ioctls.
pub struct DevFd(pub File);

impl DevFd {
    /// Opens the node of device `name`.
    pub fn open(name: &str) -> io::Result<DevFd> {
        let path = Path::new(VDUSE_DIR).join(name);
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map(DevFd)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    }

    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Declares queue `index` with its largest size (before the device joins the bus).
    pub fn vq_setup(&self, index: u32, max_size: u16) -> io::Result<()> {
        let mut c = VqConfig {
            index,
            max_size,
            ..Default::default()
        };
        ioctl_ptr(self.fd(), "VDUSE_VQ_SETUP", VQ_SETUP, &mut c).map(|_| ())
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> io::Result<u64> {
        let mut f = 0u64;
        ioctl_ptr(
            self.fd(),
            "VDUSE_DEV_GET_FEATURES",
            DEV_GET_FEATURES,
            &mut f,
        )?;
        Ok(f)
    }

    /// Queue `index` as the driver set it up.
    pub fn vq_info(&self, index: u32) -> io::Result<VqInfo> {
        let mut i = VqInfo {
            index,
            ..Default::default()
        };
        ioctl_ptr(self.fd(), "VDUSE_VQ_GET_INFO", VQ_GET_INFO, &mut i)?;
        Ok(i)
    }

    /// Has the kernel signal `fd` when the driver kicks queue `index` (None: stop).
    pub fn set_kickfd(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let mut e = VqEventfd {
            index,
            fd: fd.map(|f| f.as_raw_fd()).unwrap_or(-1),
        };
        ioctl_ptr(self.fd(), "VDUSE_VQ_SETUP_KICKFD", VQ_SETUP_KICKFD, &mut e).map(|_| ())
    }

    /// Interrupts the driver for queue `index`.
    pub fn inject_irq(&self, index: u32) -> io::Result<()> {
        let mut i = index;
        ioctl_ptr(self.fd(), "VDUSE_VQ_INJECT_IRQ", VQ_INJECT_IRQ, &mut i).map(|_| ())
    }

    /// The first IOTLB mapping overlapping `[start, last]` and an fd to map it from; `None`
    /// when nothing is mapped there.
    pub fn iotlb_fd(&self, start: u64, last: u64) -> io::Result<Option<(IotlbEntry, OwnedFd)>> {
        let mut e = IotlbEntry {
            start,
            last,
            ..Default::default()
        };
        match ioctl_raw(self.fd(), IOTLB_GET_FD, &mut e) {
            // SAFETY: on success the ioctl returns a new fd that we now own.
            Ok(fd) => Ok(Some((e, unsafe { OwnedFd::from_raw_fd(fd) }))),
            // EINVAL: no mapping overlaps the range.
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => Ok(None),
            Err(err) => Err(io::Error::new(
                err.kind(),
                format!("VDUSE_IOTLB_GET_FD: {err}"),
            )),
        }
    }

    /// Reads the next kernel message (blocks).
    pub fn read_request(&self) -> io::Result<DevRequest> {
        let mut r = DevRequest {
            kind: 0,
            request_id: 0,
            reserved: [0; 4],
            body: [0; 32],
        };
        let n = std::mem::size_of::<DevRequest>();
        // SAFETY: reads at most `n` bytes into `r`, which is `n` bytes of plain data.
        let got = unsafe { libc::read(self.fd(), (&mut r as *mut DevRequest).cast(), n) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        if got as usize != n {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short VDUSE message ({got} of {n} bytes)"),
            ));
        }
        Ok(r)
    }

    /// Answers a kernel message.
    pub fn write_response(&self, r: &DevResponse) -> io::Result<()> {
        let n = std::mem::size_of::<DevResponse>();
        // SAFETY: writes `n` bytes from `r`, which is `n` bytes of plain data.
        let put = unsafe { libc::write(self.fd(), (r as *const DevResponse).cast(), n) };
        if put < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_header() {
        assert_eq!(std::mem::size_of::<DevConfig>(), 336);
        assert_eq!(std::mem::size_of::<IotlbEntry>(), 32);
        assert_eq!(std::mem::size_of::<VqConfig>(), 32);
        assert_eq!(std::mem::size_of::<VqInfo>(), 48);
        assert_eq!(std::mem::size_of::<VqEventfd>(), 8);
        assert_eq!(std::mem::size_of::<DevRequest>(), 152);
        assert_eq!(std::mem::size_of::<DevResponse>(), 152);
    }

    #[test]
    fn ioctl_numbers_match_the_header() {
        // Values printed by a C program including <linux/vduse.h> on this machine.
        assert_eq!(GET_API_VERSION, 0x8008_8100);
        assert_eq!(SET_API_VERSION, 0x4008_8101);
        assert_eq!(CREATE_DEV, 0x4150_8102);
        assert_eq!(DESTROY_DEV, 0x4100_8103);
        assert_eq!(IOTLB_GET_FD, 0xc020_8110);
        assert_eq!(DEV_GET_FEATURES, 0x8008_8111);
        assert_eq!(VQ_SETUP, 0x4020_8114);
        assert_eq!(VQ_GET_INFO, 0xc030_8115);
        assert_eq!(VQ_SETUP_KICKFD, 0x4008_8116);
        assert_eq!(VQ_INJECT_IRQ, 0x4004_8117);
    }

    #[test]
    fn names_are_checked() {
        assert!(name_bytes("vmdev0").is_ok());
        assert!(name_bytes("").is_err());
        assert!(name_bytes("a/b").is_err());
        assert!(name_bytes(&"x".repeat(300)).is_err());
    }
}
