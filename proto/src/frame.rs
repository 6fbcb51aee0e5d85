//! Length-prefixed postcard frames over a Unix stream socket, with file descriptors
//! passed alongside (SCM_RIGHTS).
//!
//! A frame is an 8-byte header — body length (u32 LE), number of fds (u16 LE), reserved
//! (u16, zero) — followed by the postcard-encoded body. The fds of a frame are sent with
//! its first byte, so they have always arrived once the frame is complete; fds that no
//! frame announces, a body over [`MAX_FRAME_LEN`] or a non-zero reserved field are
//! protocol errors that end the connection.

use crate::error::ProtoError;
use sendfd::{RecvWithFd, SendWithFd};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Largest frame body accepted or sent, in bytes.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Most file descriptors one frame may carry.
pub const MAX_FDS_PER_FRAME: usize = 64;

const HEADER_LEN: usize = 8;
const READ_CHUNK: usize = MAX_FRAME_LEN + HEADER_LEN;

/// One end of a framed connection: a Unix stream plus the bytes and fds received but not
/// yet consumed.
pub struct Channel {
    stream: UnixStream,
    buf: Vec<u8>,
    start: usize,
    fds: VecDeque<OwnedFd>,
}

impl Channel {
    /// Wraps a connected stream.
    pub fn new(stream: UnixStream) -> Self {
        Channel {
            stream,
            buf: Vec::new(),
            start: 0,
            fds: VecDeque::new(),
        }
    }

    /// The underlying socket (for polling, credentials, shutdown).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Encodes `msg` and sends it with `fds` attached.
    pub fn send<T: Serialize>(
        &mut self,
        msg: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ProtoError> {
        if fds.len() > MAX_FDS_PER_FRAME {
            return Err(ProtoError::BadHeader(format!(
                "{} fds exceed the maximum of {MAX_FDS_PER_FRAME} per frame",
                fds.len()
            )));
        }
        let mut out = vec![0u8; HEADER_LEN];
        let mut out = postcard::to_extend(msg, std::mem::take(&mut out))?;
        let len = out.len() - HEADER_LEN;
        if len > MAX_FRAME_LEN {
            return Err(ProtoError::FrameTooLarge {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        out[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        out[4..6].copy_from_slice(&(fds.len() as u16).to_le_bytes());
        self.send_raw(&out, fds)
    }

    /// Sends raw bytes with fds attached to the first byte (tests use this to forge frames).
    pub fn send_raw(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ProtoError> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut sent = loop {
            match self.stream.send_with_fd(bytes, &raw) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        };
        while sent < bytes.len() {
            match self.stream.write(&bytes[sent..]) {
                Ok(0) => return Err(ProtoError::Closed),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Blocks until a whole frame is available and decodes it.
    pub fn recv<T: DeserializeOwned>(&mut self) -> Result<(T, Vec<OwnedFd>), ProtoError> {
        loop {
            if let Some(msg) = self.next_buffered()? {
                return Ok(msg);
            }
            self.fill()?;
        }
    }

    /// Performs exactly one read from the socket (which blocks only if nothing is pending);
    /// use after a readiness notification, then drain with [`Channel::next_buffered`].
    pub fn fill(&mut self) -> Result<(), ProtoError> {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + READ_CHUNK, 0);
        let mut raw = [-1 as RawFd; MAX_FDS_PER_FRAME];
        let res = loop {
            match self.stream.recv_with_fd(&mut self.buf[old..], &mut raw) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        let (n, nfds) = match res {
            Ok(v) => v,
            Err(e) => {
                self.buf.truncate(old);
                return Err(e.into());
            }
        };
        self.buf.truncate(old + n);
        for &fd in raw.iter().take(nfds) {
            // SAFETY: the kernel just installed `fd` in our table for us; nobody else owns it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            set_cloexec(owned.as_fd());
            self.fds.push_back(owned);
        }
        if self.fds.len() > MAX_FDS_PER_FRAME * 2 {
            return Err(ProtoError::UnexpectedFds(self.fds.len()));
        }
        if n == 0 {
            let pending = self.buf.len() - self.start;
            return Err(if pending == 0 {
                ProtoError::Closed
            } else {
                ProtoError::Truncated(pending)
            });
        }
        Ok(())
    }

    /// Decodes the next complete frame already buffered, if any.
    pub fn next_buffered<T: DeserializeOwned>(
        &mut self,
    ) -> Result<Option<(T, Vec<OwnedFd>)>, ProtoError> {
        let avail = &self.buf[self.start..];
        let Some(header) = avail.get(..HEADER_LEN) else {
            return self.no_frame_yet();
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let nfds = u16::from_le_bytes([header[4], header[5]]) as usize;
        let reserved = u16::from_le_bytes([header[6], header[7]]);
        if len > MAX_FRAME_LEN {
            return Err(ProtoError::FrameTooLarge {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        if reserved != 0 || nfds > MAX_FDS_PER_FRAME {
            return Err(ProtoError::BadHeader(format!(
                "reserved field {reserved:#x}, {nfds} fds announced"
            )));
        }
        let Some(body) = avail.get(HEADER_LEN..HEADER_LEN + len) else {
            return Ok(None);
        };
        if self.fds.len() < nfds {
            return Err(ProtoError::MissingFds {
                announced: nfds,
                received: self.fds.len(),
            });
        }
        let msg = postcard::from_bytes(body)?;
        self.start += HEADER_LEN + len;
        let fds = self.fds.drain(..nfds).collect();
        if self.start == self.buf.len() && !self.fds.is_empty() {
            return Err(ProtoError::UnexpectedFds(self.fds.len()));
        }
        Ok(Some((msg, fds)))
    }

    fn no_frame_yet<T>(&self) -> Result<Option<T>, ProtoError> {
        if self.start == self.buf.len() && !self.fds.is_empty() {
            return Err(ProtoError::UnexpectedFds(self.fds.len()));
        }
        Ok(None)
    }

    /// Sends a request and waits for its reply (strict request/reply conversations).
    pub fn call<Q: Serialize, R: DeserializeOwned>(
        &mut self,
        req: &Q,
        fds: &[BorrowedFd<'_>],
    ) -> Result<R, ProtoError> {
        self.send(req, fds)?;
        let (reply, extra) = self.recv::<R>()?;
        if !extra.is_empty() {
            return Err(ProtoError::UnexpectedFds(extra.len()));
        }
        Ok(reply)
    }
}

fn set_cloexec(fd: BorrowedFd<'_>) {
    // SAFETY: F_SETFD on a valid fd we own has no memory effects.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Msg {
        A(u32),
        B(Vec<u8>),
    }

    fn pair() -> (Channel, Channel) {
        let (a, b) = UnixStream::pair().unwrap();
        (Channel::new(a), Channel::new(b))
    }

    #[test]
    fn round_trip_with_fds() {
        let (mut a, mut b) = pair();
        let (x, _y) = UnixStream::pair().unwrap();
        a.send(&Msg::A(7), &[x.as_fd()]).unwrap();
        a.send(&Msg::B(vec![1, 2, 3]), &[]).unwrap();
        let (m, fds) = b.recv::<Msg>().unwrap();
        assert_eq!(m, Msg::A(7));
        assert_eq!(fds.len(), 1);
        let (m, fds) = b.recv::<Msg>().unwrap();
        assert_eq!(m, Msg::B(vec![1, 2, 3]));
        assert!(fds.is_empty());
    }

    #[test]
    fn oversized_frame_is_refused_before_reading_it() {
        let (mut a, mut b) = pair();
        let mut h = ((MAX_FRAME_LEN + 1) as u32).to_le_bytes().to_vec();
        h.extend_from_slice(&[0, 0, 0, 0]);
        a.send_raw(&h, &[]).unwrap();
        assert!(matches!(
            b.recv::<Msg>(),
            Err(ProtoError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn missing_and_unexpected_fds_are_errors() {
        let (mut a, mut b) = pair();
        a.send_raw(&[1, 0, 0, 0, 1, 0, 0, 0, 0], &[]).unwrap();
        assert!(matches!(
            b.recv::<Msg>(),
            Err(ProtoError::MissingFds { .. })
        ));
        let (mut a, mut b) = pair();
        let (x, _y) = UnixStream::pair().unwrap();
        a.send_raw(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 1], &[x.as_fd()])
            .unwrap();
        assert!(matches!(b.recv::<Msg>(), Err(ProtoError::UnexpectedFds(1))));
    }

    #[test]
    fn garbage_body_and_truncation_are_errors() {
        let (mut a, mut b) = pair();
        a.send_raw(&[2, 0, 0, 0, 0, 0, 0, 0, 9, 9], &[]).unwrap();
        assert!(matches!(b.recv::<Msg>(), Err(ProtoError::Decode(_))));
        let (mut a, mut b) = pair();
        a.send_raw(&[5, 0, 0, 0, 0, 0, 0, 0, 1], &[]).unwrap();
        drop(a);
        assert!(matches!(b.recv::<Msg>(), Err(ProtoError::Truncated(9))));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let (mut a, mut b) = pair();
            a.send_raw(&bytes, &[]).unwrap();
            drop(a);
            loop {
                if b.recv::<Msg>().is_err() { break; }
            }
        }
    }
}
