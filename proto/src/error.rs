//! Errors: [`WireError`] travels in replies; [`ProtoError`] is what the framing layer returns.

use serde::{Deserialize, Serialize};
use std::fmt;

/// What kind of failure a reply reports; stable across versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The peer speaks an unsupported protocol version.
    BadVersion,
    /// The message is not allowed in this state (e.g. before hello, or out of the status order).
    BadState,
    /// No device with that UUID.
    NoSuchDevice,
    /// No parent (datapath) with that name.
    NoSuchParent,
    /// The parent does not offer that device type.
    NoSuchType,
    /// The device is held by another driver, or already exists.
    Busy,
    /// The parent has no free instance of that type.
    NoCapacity,
    /// The driver accepted a feature that was not offered.
    BadFeatures,
    /// A queue index or queue size is invalid.
    BadQueue,
    /// A guest address or range is outside the driver's memory.
    BadAddress,
    /// A memory region is unusable (not a sealed memfd, too small, overlapping).
    BadMemory,
    /// An argument is out of range or malformed.
    BadArgument,
    /// The request needs a file descriptor that was not sent.
    MissingFd,
    /// The datapath refused or failed the operation.
    Datapath,
    /// Unexpected internal failure.
    Internal,
    /// This host lacks what the request needs (a kernel module, a privilege).
    Unavailable,
    /// The peer's credentials (SO_PEERCRED uid) are not on the daemon's allow-list.
    NotAllowed,
}

/// A typed error carried in a reply: a code for programs and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct WireError {
    /// Machine-readable kind.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
}

impl WireError {
    /// Builds an error with a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Failures of the framing layer; any of these ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// Socket I/O failed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection.
    #[error("peer closed the connection")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("peer closed the connection in the middle of a frame ({0} bytes buffered)")]
    Truncated(usize),
    /// A frame header announced more than the maximum frame length.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// Maximum allowed.
        max: usize,
    },
    /// A frame header is malformed (reserved bits set or too many fds announced).
    #[error("malformed frame header: {0}")]
    BadHeader(String),
    /// A frame announced file descriptors that did not arrive with it.
    #[error("frame announced {announced} file descriptors but {received} arrived")]
    MissingFds {
        /// Announced by the header.
        announced: usize,
        /// Actually received.
        received: usize,
    },
    /// File descriptors arrived that no frame announced.
    #[error("{0} file descriptors arrived that no frame announced")]
    UnexpectedFds(usize),
    /// The frame body is not a valid message.
    #[error("undecodable message: {0}")]
    Decode(#[from] postcard::Error),
    /// The peer's hello was refused or malformed.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// The peer answered with an error reply.
    #[error("{0}")]
    Remote(#[from] WireError),
    /// The peer answered with a reply of the wrong kind.
    #[error("unexpected reply: {0}")]
    UnexpectedReply(String),
}
