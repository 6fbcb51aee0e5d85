//! Shared guest memory and virtqueues for vmdev.
//!
//! * [`memory`]: driver memory arrives as memfds sealed against shrinking; each region is
//!   mapped once and every guest address ([`GuestAddr`]) is translated with its length.
//! * [`split`]: the split virtqueue layout, its **device side** ([`DeviceQueue`], used by
//!   the datapath) and **driver side** ([`DriverQueue`], used by driver clients), with
//!   indirect descriptors and EVENT_IDX.
//! * [`packed`]: the packed virtqueue layout (VIRTIO_F_RING_PACKED), its device side
//!   ([`PackedDeviceQueue`]) and driver side ([`PackedDriverQueue`]), with indirect
//!   descriptors and event suppression.
//! * [`chain`]: a validated descriptor chain, resolved to host memory once.
//! * [`prefetch`]: cache hints a batching datapath issues before touching a batch.
//!
//! Everything read from guest memory is read once, with volatile word loads (`volatile`),
//! and checked before use; nothing in
//! this crate panics on guest-controlled data.

#![warn(missing_docs)]

#[cfg(not(target_endian = "little"))]
compile_error!("vmdev-shm-ring assumes a little-endian host (virtio 1.x rings are little-endian)");

pub mod addr;
pub mod chain;
pub mod dirty;
pub mod error;
pub mod memory;
pub mod packed;
pub mod prefetch;
pub mod split;
mod volatile;

pub use addr::GuestAddr;
pub use chain::Chain;
pub use error::{MemError, RingError};
pub use memory::{create_sealed_memfd, shmem_huge_setting, GuestMemory};
pub use packed::{PackedDeviceQueue, PackedDriverQueue, PackedLayout, PackedState};
pub use split::{DeviceQueue, DriverQueue, SplitLayout};
