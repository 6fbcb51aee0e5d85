//! The protocol decoder: arbitrary bytes (and a few file descriptors) arrive on a real
//! `Channel` over a Unix socket pair, and frame bodies are decoded on their own as every
//! message type of both conversations. Nothing may panic; whatever decodes must re-encode
//! and decode to the same value.
//!
//! Input layout: byte 0 selects the message type the channel decodes (bits 0-1: Request,
//! Reply, ToDatapath, FromDatapath) and how many fds ride with the first byte (bits 2-3);
//! the rest is the byte stream written into the socket. The whole input after byte 0 is also
//! decoded as a bare postcard body of every type.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;
use std::io::Write;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;
use vmdev_proto::datapath::{FromDatapath, ToDatapath};
use vmdev_proto::transport::{Reply, Request};
use vmdev_proto::{Channel, MAX_FRAME_LEN};

/// Largest stream written into the socket: more than one maximal frame, and well inside
/// the socket buffer so the write never blocks.
const MAX_STREAM: usize = 2 * (MAX_FRAME_LEN + 8);

fn eventfd() -> &'static OwnedFd {
    static FD: OnceLock<OwnedFd> = OnceLock::new();
    FD.get_or_init(|| {
        // SAFETY: eventfd returns a new fd or -1, checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd");
        // SAFETY: freshly created and owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    })
}

/// Whatever decodes re-encodes, and the encoding decodes to the same value.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(msg: &T) {
    let bytes = postcard::to_stdvec(msg).expect("a decoded message encodes");
    let again: T = postcard::from_bytes(&bytes).expect("an encoded message decodes");
    assert_eq!(&again, msg, "postcard round trip changed the message");
}

fn body<T: Serialize + DeserializeOwned + PartialEq + Debug>(bytes: &[u8]) {
    if let Ok(msg) = postcard::from_bytes::<T>(bytes) {
        round_trip(&msg);
    }
}

fn stream<T: Serialize + DeserializeOwned + PartialEq + Debug>(bytes: &[u8], nfds: usize) {
    let (tx, rx) = UnixStream::pair().expect("socketpair");
    let mut tx = Channel::new(tx);
    let fd = eventfd().as_fd();
    let fds = vec![fd; nfds];
    if !bytes.is_empty() {
        // The fds go with the first byte, as a peer's `send` would send them.
        tx.send_raw(&bytes[..1], &fds).expect("send first byte");
        // Non-blocking: a stream larger than the socket buffer just ends early.
        let mut s = tx.stream();
        s.set_nonblocking(true).expect("nonblocking");
        let _ = s.write_all(&bytes[1..]);
    }
    drop(tx);
    let mut rx = Channel::new(rx);
    // Every successful recv consumes at least one 8-byte header, so this ends.
    let mut frames = 0usize;
    while let Ok((msg, _fds)) = rx.recv::<T>() {
        round_trip(&msg);
        frames += 1;
        assert!(frames <= bytes.len() / 8, "more frames than headers");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let rest = &rest[..rest.len().min(MAX_STREAM)];
    let nfds = ((sel >> 2) & 3) as usize;
    match sel & 3 {
        0 => stream::<Request>(rest, nfds),
        1 => stream::<Reply>(rest, nfds),
        2 => stream::<ToDatapath>(rest, nfds),
        _ => stream::<FromDatapath>(rest, nfds),
    }
    body::<Request>(rest);
    body::<Reply>(rest);
    body::<ToDatapath>(rest);
    body::<FromDatapath>(rest);
    // Bodies as they sit inside a frame, after an 8-byte header.
    if let Some(b) = rest.get(8..) {
        body::<Request>(b);
        body::<FromDatapath>(b);
    }
});
