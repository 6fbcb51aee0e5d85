//! The vmdev wire protocol.
//!
//! Two conversations share one framing ([`frame`]): the **transport protocol** spoken by
//! drivers and `vmdevctl` to `vmdev-control` ([`transport`]), and the **datapath protocol**
//! spoken between `vmdev-control` and each `vmdev-datapath` parent ([`datapath`]). Both start
//! with a [`Hello`] carrying the protocol version and feature bits. Virtio constants used by
//! every side live in [`virtio`].

#![warn(missing_docs)]

pub mod datapath;
pub mod error;
pub mod frame;
pub mod transport;
pub mod virtio;

pub use error::{ErrorCode, ProtoError, WireError};
pub use frame::{Channel, MAX_FDS_PER_FRAME, MAX_FRAME_LEN};
pub use uuid::Uuid;

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks; a peer with another major version is refused.
pub const PROTOCOL_VERSION: u16 = 1;

/// Protocol feature: `SetQueueState` / `GetQueueState` (virtqueue state get/set).
pub const PROTO_F_VQ_STATE: u64 = 1 << 0;

/// Protocol feature: `Suspend` / `Resume`.
pub const PROTO_F_SUSPEND: u64 = 1 << 1;

/// Protocol feature: `SaveState` / `LoadState` (device state blobs).
pub const PROTO_F_DEVICE_STATE: u64 = 1 << 2;

/// Protocol feature: `StartDirtyLog` / `StopDirtyLog` (dirty-page tracking).
pub const PROTO_F_DIRTY_LOG: u64 = 1 << 3;

/// Protocol feature bits this build understands.
pub const PROTOCOL_FEATURES: u64 =
    PROTO_F_VQ_STATE | PROTO_F_SUSPEND | PROTO_F_DEVICE_STATE | PROTO_F_DIRTY_LOG;

/// The first message on every connection, in both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version of the sender.
    pub version: u16,
    /// Protocol feature bits offered (by a client) or accepted (by a server).
    pub features: u64,
}

impl Hello {
    /// The hello this build sends.
    pub fn ours() -> Self {
        Hello {
            version: PROTOCOL_VERSION,
            features: PROTOCOL_FEATURES,
        }
    }

    /// Server side: checks a peer's hello and returns the negotiated hello to send back.
    pub fn negotiate(peer: Hello) -> Result<Hello, WireError> {
        if peer.version != PROTOCOL_VERSION {
            return Err(WireError::new(
                ErrorCode::BadVersion,
                format!(
                    "protocol version {} is not supported (this side speaks {})",
                    peer.version, PROTOCOL_VERSION
                ),
            ));
        }
        Ok(Hello {
            version: PROTOCOL_VERSION,
            features: peer.features & PROTOCOL_FEATURES,
        })
    }
}
