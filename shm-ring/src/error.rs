//! Errors for memory translation and ring validation.

use crate::GuestAddr;

/// A guest memory region or address could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// The fd is not a memfd (it has no seals).
    #[error("the fd is not a memfd (F_GET_SEALS failed: {0})")]
    NotMemfd(String),
    /// The memfd may still shrink, which would SIGBUS whoever maps it.
    #[error("the memfd is not sealed against shrinking (F_SEAL_SHRINK missing)")]
    NotSealed,
    /// The memfd is smaller than offset + size.
    #[error("the memfd holds {file_len} bytes, the region needs {needed}")]
    TooSmall {
        /// Size of the file.
        file_len: u64,
        /// offset + size.
        needed: u64,
    },
    /// Size zero, overflow, or misalignment.
    #[error("invalid region: {0}")]
    BadRegion(String),
    /// The region overlaps one already added.
    #[error("region at {0} overlaps an existing region")]
    Overlap(GuestAddr),
    /// mmap failed.
    #[error("mmap failed: {0}")]
    Map(String),
    /// An address range is not entirely inside one region.
    #[error("guest range {addr}+{len} is outside the driver's memory")]
    OutOfRange {
        /// Start of the range.
        addr: GuestAddr,
        /// Its length.
        len: u64,
    },
    /// An address is not aligned as the ring layout requires.
    #[error("guest address {addr} is not aligned to {align}")]
    Misaligned {
        /// The address.
        addr: GuestAddr,
        /// Required alignment.
        align: u64,
    },
}

/// The other side broke the virtqueue contract; the device needs a reset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// A ring or buffer address is not usable.
    #[error(transparent)]
    Memory(#[from] MemError),
    /// The queue size is not a power of two in 1..=32768.
    #[error("queue size {0} is not a power of two between 1 and 32768")]
    BadSize(u32),
    /// The avail index moved by more than the queue size.
    #[error("avail index jumped from {last} to {now} (queue size {size})")]
    AvailJump {
        /// Last index consumed.
        last: u16,
        /// Index read.
        now: u16,
        /// Queue size.
        size: u16,
    },
    /// A descriptor index is outside the table.
    #[error("descriptor index {index} outside a table of {size}")]
    BadIndex {
        /// The index.
        index: u16,
        /// Table size.
        size: u32,
    },
    /// The chain has more descriptors than the queue (a loop, or simply too long).
    #[error("descriptor chain longer than {0} descriptors (loop?)")]
    ChainTooLong(u32),
    /// An indirect descriptor inside an indirect table.
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    /// INDIRECT used without the feature, or combined with NEXT.
    #[error("indirect descriptor not allowed here: {0}")]
    BadIndirect(String),
    /// A device-readable descriptor after a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// A chain the device must write into (e.g. a receive buffer) has no device-writable
    /// part, or one it must only read has some.
    #[error("wrong buffer direction: {0}")]
    WrongDirection(&'static str),
    /// Under VIRTIO_F_IN_ORDER the device returned a chain before one made available
    /// earlier (`expected`: the oldest in flight, if any).
    #[error("the device broke IN_ORDER: returned {got}, expected {expected:?}")]
    OutOfOrder {
        /// The oldest chain in flight.
        expected: Option<u16>,
        /// What the device returned.
        got: u16,
    },
    /// A chain's total length overflowed 32 bits.
    #[error("chain length exceeds 4 GiB")]
    ChainLength,
    /// The device returned an id that is not an outstanding chain (driver side).
    #[error("used ring returned id {0}, which is not in flight")]
    BadUsedId(u32),
    /// The used index moved by more than the queue size (driver side).
    #[error("used index jumped from {last} to {now}")]
    UsedJump {
        /// Last index consumed.
        last: u16,
        /// Index read.
        now: u16,
    },
    /// A packed queue size outside 1..=32768 (packed sizes need not be powers of two).
    #[error("packed queue size {0} is not between 1 and 32768")]
    BadPackedSize(u32),
    /// A packed-ring descriptor inside a chain is not available for the wrap counter its
    /// position requires (a chain crossing the ring end with a stale wrap bit, or a chain
    /// whose NEXT runs into descriptors the driver never made available).
    #[error("descriptor {index} is not available for wrap counter {wrap} (flags {flags:#06x})")]
    BadWrap {
        /// Position in the descriptor ring.
        index: u16,
        /// The wrap counter the position requires.
        wrap: bool,
        /// The flags read.
        flags: u16,
    },
    /// A packed-ring buffer id outside `0..size` (device side).
    #[error("buffer id {id} outside a queue of {size}")]
    BadBufferId {
        /// The id.
        id: u16,
        /// Queue size.
        size: u16,
    },
    /// The driver made a buffer available under an id that is still in flight (packed
    /// ring, device side).
    #[error("buffer id {0} made available while still in flight")]
    IdInFlight(u16),
    /// The device completed an id it does not hold (packed ring, device side).
    #[error("used buffer id {0} is not in flight")]
    NotInFlight(u16),
    /// A saved ring position that cannot belong to this queue.
    #[error("ring state index {index} outside a queue of {size}")]
    BadState {
        /// The index.
        index: u16,
        /// Queue size.
        size: u16,
    },
}
