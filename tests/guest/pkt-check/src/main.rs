//! pkt-check: runs inside the test guest. Sends COUNT sequence-numbered Ethernet frames
//! on IFACE through an AF_PACKET socket and checks that each comes back byte-identical
//! (the vhost-user backend under test is a loopback). Prints exactly one line:
//! `VMDEV-GUEST-RESULT: PASS sent=N received=N` or `VMDEV-GUEST-RESULT: FAIL <reason>`.
//!
//! Usage: pkt-check IFACE COUNT [MIN_SIZE [MAX_SIZE]]   (frame sizes, default 60..=1514)

use std::collections::BTreeSet;
use std::io::Error;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;

/// Local experimental ethertype (IEEE 802 "local experimental 1").
const ETHERTYPE: u16 = 0x88b5;
/// Frames in flight at once.
const WINDOW: u64 = 8;
/// How long to wait for the next frame to come back.
const RECV_TIMEOUT_SECS: libc::time_t = 5;
const HEADER: usize = 14 + 8; // Ethernet header + u64 sequence number

fn main() -> ExitCode {
    match run() {
        Ok((sent, received)) => {
            println!("VMDEV-GUEST-RESULT: PASS sent={sent} received={received}");
            ExitCode::SUCCESS
        }
        Err(reason) => {
            println!("VMDEV-GUEST-RESULT: FAIL {reason}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(u64, u64), String> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 || args.len() > 5 {
        return Err("usage: pkt-check IFACE COUNT [MIN_SIZE [MAX_SIZE]]".into());
    }
    let iface = &args[1];
    let num = |i: usize, default: u64| -> Result<u64, String> {
        args.get(i).map_or(Ok(default), |s| {
            s.parse().map_err(|_| format!("bad number {s:?}"))
        })
    };
    let count = num(2, 0)?;
    let (min, max) = (num(3, 60)? as usize, num(4, 1514)? as usize);
    if count == 0 {
        return Err("COUNT must be at least 1".into());
    }
    if !(HEADER..=65535).contains(&min) || max < min {
        return Err(format!(
            "bad sizes {min}..={max} (need {HEADER} <= MIN <= MAX)"
        ));
    }

    let sock = PacketSocket::open(iface)?;
    let mac = sock.mac;
    let mut outstanding = BTreeSet::new();
    let (mut sent, mut received) = (0u64, 0u64);
    let mut buf = vec![0u8; 65536];
    while received < count {
        while sent < count && sent - received < WINDOW {
            sock.send(&frame(&mac, sent, min, max))
                .map_err(|e| format!("send seq={sent}: {e} (sent={sent} received={received})"))?;
            outstanding.insert(sent);
            sent += 1;
        }
        let len = sock.recv(&mut buf).map_err(|e| {
            format!("recv: {e} (sent={sent} received={received}, waiting for {outstanding:?})")
        })?;
        let got = &buf[..len];
        if len < HEADER {
            return Err(format!(
                "runt frame of {len} bytes after received={received}"
            ));
        }
        let seq = u64::from_le_bytes(got[14..22].try_into().unwrap());
        if !outstanding.remove(&seq) {
            return Err(format!("unexpected or duplicate frame seq={seq} len={len}"));
        }
        let want = frame(&mac, seq, min, max);
        if got != want.as_slice() {
            let at = got
                .iter()
                .zip(&want)
                .position(|(a, b)| a != b)
                .unwrap_or(len.min(want.len()));
            return Err(format!(
                "frame seq={seq} differs: got {len} bytes, want {}, first difference at byte {at}",
                want.len()
            ));
        }
        received += 1;
    }
    Ok((sent, received))
}

/// splitmix64: a deterministic pseudo-random stream.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Frame number `seq`: to our own MAC, from our own MAC, ethertype 0x88b5, the sequence
/// number, then deterministic bytes. Seq 0 has the smallest size, seq 1 the largest.
fn frame(mac: &[u8; 6], seq: u64, min: usize, max: usize) -> Vec<u8> {
    let len = match seq {
        0 => min,
        1 => max,
        _ => min + (mix(seq) % (max - min + 1) as u64) as usize,
    };
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(mac);
    f.extend_from_slice(mac);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&seq.to_le_bytes());
    let mut state = mix(seq ^ 0x5eed);
    while f.len() < len {
        state = mix(state);
        let take = (len - f.len()).min(8);
        f.extend_from_slice(&state.to_le_bytes()[..take]);
    }
    f
}

struct PacketSocket {
    fd: OwnedFd,
    mac: [u8; 6],
}

impl PacketSocket {
    fn open(iface: &str) -> Result<Self, String> {
        let proto = ETHERTYPE.to_be();
        // SAFETY: plain syscall with constant arguments; the result is checked below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as libc::c_int) };
        if raw < 0 {
            return Err(format!("socket(AF_PACKET): {}", Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { zeroed() };
        let name = iface.as_bytes();
        if name.is_empty() || name.len() >= ifr.ifr_name.len() {
            return Err(format!("bad interface name {iface:?}"));
        }
        for (d, s) in ifr.ifr_name.iter_mut().zip(name) {
            *d = *s as libc::c_char;
        }
        // SAFETY: `ifr` is a valid ifreq with a NUL-terminated name; the kernel fills it in.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFINDEX, &mut ifr) } < 0 {
            return Err(format!("interface {iface}: {}", Error::last_os_error()));
        }
        // SAFETY: SIOCGIFINDEX succeeded, so the union holds the index.
        let ifindex = unsafe { ifr.ifr_ifru.ifru_ifindex };
        // SAFETY: as above; SIOCGIFHWADDR fills the hardware address.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr) } < 0 {
            return Err(format!("MAC of {iface}: {}", Error::last_os_error()));
        }
        // SAFETY: SIOCGIFHWADDR succeeded, so the union holds the address.
        let hw = unsafe { ifr.ifr_ifru.ifru_hwaddr };
        let mut mac = [0u8; 6];
        for (d, s) in mac.iter_mut().zip(hw.sa_data.iter()) {
            *d = *s as u8;
        }

        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        // SAFETY: `sll` is a valid sockaddr_ll and we pass its exact size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(format!("bind to {iface}: {}", Error::last_os_error()));
        }

        let tv = libc::timeval {
            tv_sec: RECV_TIMEOUT_SECS,
            tv_usec: 0,
        };
        // SAFETY: `tv` is a valid timeval and we pass its exact size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(format!("SO_RCVTIMEO: {}", Error::last_os_error()));
        }
        Ok(Self { fd, mac })
    }

    fn send(&self, frame: &[u8]) -> Result<(), Error> {
        // SAFETY: `frame` is a valid buffer of `frame.len()` bytes; the socket is bound.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        match n {
            n if n < 0 => Err(Error::last_os_error()),
            n if n as usize != frame.len() => Err(Error::other(format!("short send {n}"))),
            _ => Ok(()),
        }
    }

    /// Receives the next frame that came *in* on the interface, skipping the copies of
    /// our own outgoing frames that AF_PACKET also delivers (PACKET_OUTGOING).
    fn recv(&self, buf: &mut [u8]) -> Result<usize, Error> {
        loop {
            // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
            let mut from: libc::sockaddr_ll = unsafe { zeroed() };
            let mut from_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` and `from` are valid for writes of the sizes passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                    &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut from_len,
                )
            };
            if n < 0 {
                let e = Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    return Err(Error::other(format!("timeout after {RECV_TIMEOUT_SECS} s")));
                }
                return Err(e);
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            if n as usize > buf.len() {
                return Err(Error::other(format!("frame of {n} bytes truncated")));
            }
            return Ok(n as usize);
        }
    }
}
