//! The kernel's vDPA bus: adding and removing a VDUSE device through the `vdpa` generic
//! netlink family (what the `vdpa dev add/del` tool sends), and binding it to
//! `virtio_vdpa` or `vhost_vdpa` through sysfs.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const GENL_ID_CTRL: u16 = 16;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const VDPA_CMD_DEV_NEW: u8 = 3;
const VDPA_CMD_DEV_DEL: u8 = 4;
const VDPA_ATTR_MGMTDEV_DEV_NAME: u16 = 2;
const VDPA_ATTR_DEV_NAME: u16 = 4;

/// Sysfs folder of the vDPA bus.
pub const BUS: &str = "/sys/bus/vdpa";

/// Which kernel driver a VDUSE device is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bind {
    /// `virtio_vdpa`: the kernel's own virtio driver (virtio_net) uses the device.
    Virtio,
    /// `vhost_vdpa`: `/dev/vhost-vdpa-N` for a VMM or a userspace driver.
    Vhost,
}

impl Bind {
    /// The kernel driver's name.
    pub fn driver(self) -> &'static str {
        match self {
            Bind::Virtio => "virtio_vdpa",
            Bind::Vhost => "vhost_vdpa",
        }
    }
}

/// A generic netlink socket speaking the `vdpa` family.
pub struct VdpaNetlink {
    fd: OwnedFd,
    family: u16,
    seq: u32,
}

fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Walks netlink attributes: `(type, payload)` pairs; stops at the first malformed one.
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((kind, &b[4..len]));
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    out
}

impl VdpaNetlink {
    /// Opens a generic netlink socket and looks up the `vdpa` family.
    pub fn open() -> io::Result<VdpaNetlink> {
        // SAFETY: socket() with constant arguments; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let tv = libc::timeval {
            tv_sec: 20,
            tv_usec: 0,
        };
        // SAFETY: setsockopt reads a valid timeval of the given size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        let mut nl = VdpaNetlink {
            fd,
            family: GENL_ID_CTRL,
            seq: 0,
        };
        let mut a = Vec::new();
        attr(&mut a, CTRL_ATTR_FAMILY_NAME, &cstr("vdpa"));
        let reply = nl
            .call(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, &a, false)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("the kernel has no 'vdpa' netlink family ({e}): load the vdpa module"),
                )
            })?;
        let id = attrs(reply.get(4..).unwrap_or_default())
            .into_iter()
            .find(|(k, p)| *k == CTRL_ATTR_FAMILY_ID && p.len() >= 2)
            .map(|(_, p)| u16::from_ne_bytes([p[0], p[1]]))
            .ok_or_else(|| {
                io::Error::other("the netlink controller did not name the vdpa family")
            })?;
        nl.family = id;
        Ok(nl)
    }

    /// Sends one request and returns the payload of the answer (genl header onward); with
    /// `ack_only`, waits for the acknowledgement instead.
    fn call(
        &mut self,
        family: u16,
        cmd: u8,
        version: u8,
        attrs: &[u8],
        ack_only: bool,
    ) -> io::Result<Vec<u8>> {
        self.seq = self.seq.wrapping_add(1);
        let len = 16 + 4 + attrs.len();
        let mut m = Vec::with_capacity(len);
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&family.to_ne_bytes());
        let flags = NLM_F_REQUEST | if ack_only { NLM_F_ACK } else { 0 };
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&self.seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[cmd, version, 0, 0]);
        m.extend_from_slice(attrs);
        // SAFETY: sends `m.len()` bytes from a live buffer on a socket we own (to the
        // kernel: a zeroed default address is not needed for netlink send()).
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 16384];
        loop {
            // SAFETY: receives at most `buf.len()` bytes into a live buffer.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut b = &buf[..n as usize];
            while b.len() >= 16 {
                let mlen = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
                let kind = u16::from_ne_bytes([b[4], b[5]]);
                let seq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
                if mlen < 16 || mlen > b.len() {
                    return Err(io::Error::other("malformed netlink answer"));
                }
                let payload = &b[16..mlen];
                if seq == self.seq {
                    if kind == NLMSG_ERROR {
                        let code = payload
                            .get(..4)
                            .map(|e| i32::from_ne_bytes([e[0], e[1], e[2], e[3]]))
                            .unwrap_or(-libc::EIO);
                        if code == 0 {
                            return Ok(Vec::new());
                        }
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    if !ack_only {
                        return Ok(payload.to_vec());
                    }
                }
                b = &b[mlen.next_multiple_of(4).min(b.len())..];
            }
        }
    }

    /// `vdpa dev add name NAME mgmtdev vduse`.
    pub fn add_vduse(&mut self, name: &str) -> io::Result<()> {
        let mut a = Vec::new();
        attr(&mut a, VDPA_ATTR_MGMTDEV_DEV_NAME, &cstr("vduse"));
        attr(&mut a, VDPA_ATTR_DEV_NAME, &cstr(name));
        let fam = self.family;
        self.call(fam, VDPA_CMD_DEV_NEW, 1, &a, true)
            .map(|_| ())
            .map_err(|e| io::Error::new(e.kind(), format!("vdpa dev add {name}: {e}")))
    }

    /// `vdpa dev del NAME`.
    pub fn del(&mut self, name: &str) -> io::Result<()> {
        let mut a = Vec::new();
        attr(&mut a, VDPA_ATTR_DEV_NAME, &cstr(name));
        let fam = self.family;
        self.call(fam, VDPA_CMD_DEV_DEL, 1, &a, true)
            .map(|_| ())
            .map_err(|e| io::Error::new(e.kind(), format!("vdpa dev del {name}: {e}")))
    }
}

fn write_sysfs(path: &Path, value: &str) -> io::Result<()> {
    std::fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing '{value}' to {}: {e}", path.display()),
        )
    })
}

/// The driver device `name` is bound to, if any.
pub fn bound_driver(name: &str) -> Option<String> {
    let link = std::fs::read_link(Path::new(BUS).join("devices").join(name).join("driver")).ok()?;
    link.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Binds device `name` to the driver `bind` asks for (unbinding another one first), and
/// returns the `/dev/vhost-vdpa-N` path for [`Bind::Vhost`].
pub fn bind(name: &str, bind: Bind) -> io::Result<Option<PathBuf>> {
    let drv = bind.driver();
    if !Path::new(BUS).join("drivers").join(drv).exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("the {drv} driver is not loaded (modprobe {drv})"),
        ));
    }
    let dev = Path::new(BUS).join("devices").join(name);
    match bound_driver(name) {
        Some(d) if d == drv => {}
        other => {
            if let Some(d) = other {
                write_sysfs(
                    &Path::new(BUS).join("drivers").join(&d).join("unbind"),
                    name,
                )?;
            }
            write_sysfs(&dev.join("driver_override"), drv)?;
            write_sysfs(&Path::new(BUS).join("drivers_probe"), name)?;
            if bound_driver(name).as_deref() != Some(drv) {
                return Err(io::Error::other(format!("{name} did not bind to {drv}")));
            }
        }
    }
    if bind == Bind::Virtio {
        return Ok(None);
    }
    // The char device's node is created by devtmpfs shortly after the bind.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = std::fs::read_dir(&dev)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("vhost-vdpa-"));
        if let Some(n) = found {
            let node = Path::new("/dev").join(&n);
            if node.exists() {
                return Ok(Some(node));
            }
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "no /dev/vhost-vdpa-N appeared for {name}"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_and_malformed_ones_stop_the_walk() {
        let mut b = Vec::new();
        attr(&mut b, 4, &cstr("vmdev0"));
        attr(&mut b, 1, &7u16.to_ne_bytes());
        assert_eq!(b.len() % 4, 0);
        let a = attrs(&b);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0], (4, &b"vmdev0\0"[..]));
        assert_eq!(a[1].1, &7u16.to_ne_bytes()[..]);
        // A length past the end stops the walk instead of panicking.
        let mut bad = b.clone();
        bad[0] = 200;
        assert!(attrs(&bad).is_empty());
        assert!(attrs(&[1, 0]).is_empty());
    }
}
