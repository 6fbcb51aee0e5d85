//! The datapath protocol: between `vmdev-control` and each `vmdev-datapath` parent over
//! `datapath.sock`. The datapath registers itself, then the control plane sends numbered
//! requests (attach, detach, stats) that the datapath answers in order; the datapath may
//! also send [`DpEvent`]s at any time.

use crate::{
    error::WireError,
    transport::{DeviceStats, VqState},
    Hello,
};
use serde::{Deserialize, Serialize};

/// Control plane → datapath.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToDatapath {
    /// Answer to the datapath's hello.
    Hello(Hello),
    /// Answer to [`FromDatapath::Register`].
    Registered(Result<(), WireError>),
    /// A numbered request; the datapath answers with [`FromDatapath::Reply`] of the same `seq`.
    Request {
        /// Correlation number.
        seq: u64,
        /// What to do.
        op: DpOp,
    },
}

/// Operations the control plane asks of a datapath.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DpOp {
    /// Start servicing a device. Fds, in order: one memfd per region, then for each queue
    /// its kick eventfd (if `has_kick`) and its call eventfd (if `has_call`).
    Attach(AttachSpec),
    /// Stop servicing a device and return its final counters.
    Detach {
        /// Handle given at attach.
        handle: u64,
    },
    /// Start (with the bitmap memfd attached) or stop dirty-page logging.
    SetDirtyLog {
        /// Handle given at attach.
        handle: u64,
        /// On or off.
        on: bool,
    },
    /// Read a device's live counters.
    Stats {
        /// Handle given at attach.
        handle: u64,
    },
}

/// Everything the datapath needs to service one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachSpec {
    /// Control plane's handle for the device (unique per datapath connection).
    pub handle: u64,
    /// Device type, e.g. `net-loopback`.
    pub device_type: String,
    /// Negotiated feature bits.
    pub features: u64,
    /// Number of virtqueues the device has (attached or not).
    pub num_queues: u16,
    /// Driver memory regions.
    pub regions: Vec<RegionSpec>,
    /// Accept region memfds that are not sealed against shrinking (trusted front end).
    pub trust_unsealed: bool,
    /// Log written pages into the dirty bitmap whose memfd comes last among the fds.
    pub dirty_log: bool,
    /// Recovery after a datapath died: ignore the queues' `state` and resume every ring at
    /// the used index found in its used ring (what the dead datapath last published);
    /// answered with [`DpReply::Recovered`].
    pub recover: bool,
    /// Ready queues.
    pub queues: Vec<QueueSpec>,
}

/// One region of driver memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionSpec {
    /// Guest address of the first byte.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset inside the memfd.
    pub offset: u64,
}

/// One virtqueue's setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSpec {
    /// Queue index within the device.
    pub index: u16,
    /// Number of descriptors.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Driver (avail) ring address.
    pub driver: u64,
    /// Device (used) ring address.
    pub device: u64,
    /// Where the ring resumes.
    pub state: VqState,
    /// Whether a kick eventfd follows.
    pub has_kick: bool,
    /// Whether a call eventfd follows.
    pub has_call: bool,
}

/// Datapath → control plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromDatapath {
    /// Must be first.
    Hello(Hello),
    /// Registers this datapath as a parent.
    Register {
        /// Parent name.
        name: String,
        /// CPU it pinned itself to.
        cpu: Option<u32>,
        /// Types offered and how many instances of each.
        types: Vec<(String, u32)>,
    },
    /// Answer to a [`ToDatapath::Request`].
    Reply {
        /// The request's correlation number.
        seq: u64,
        /// Outcome.
        result: Result<DpReply, WireError>,
    },
    /// Something happened to a device.
    Event(DpEvent),
}

/// Successful answers of the datapath.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DpReply {
    /// Attached.
    Attached,
    /// Attached for recovery; where each queue resumed (by queue index).
    Recovered(Vec<(u16, VqState)>),
    /// Detached; final counters and where each queue stopped (by queue index).
    Detached(DeviceStats, Vec<(u16, VqState)>),
    /// Live counters.
    Stats(DeviceStats),
    /// Done.
    Ok,
}

/// Unsolicited news from the datapath.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DpEvent {
    /// The driver broke a ring; the datapath dropped the device (as if detached), which
    /// now needs a reset.
    DeviceFailed {
        /// Handle given at attach.
        handle: u64,
        /// What was wrong.
        reason: String,
        /// Final counters.
        stats: DeviceStats,
    },
}
