//! vmdev driver-side tools.
//!
//! * [`client`]: the transport client — one typed method per vmdev protocol operation;
//! * [`vhost_vdpa`]: the driver side of the kernel's vhost-vdpa char device
//!   (`/dev/vhost-vdpa-N`): ioctls and IOTLB updates;
//! * [`vhost_user_front`]: a vhost-user front end (what QEMU is to a vhost-user back end),
//!   over the rust-vmm `vhost` crate: reaches vmdev's vhost-user door or DPDK's vhost PMD;
//! * [`transport`]: [`DeviceTransport`], the operations a driver sets a device up with,
//!   implemented by all three of the above;
//! * [`net_driver`]: a virtio-net driver over the driver side of `vmdev-shm-ring`, with its
//!   own memfd memory, RX/TX queues and feature negotiation, over any transport;
//! * [`driver_ring`]: one driver-side virtqueue, split or packed, behind the operations
//!   the driver uses;
//! * [`sys`]: eventfd and poll helpers.
//!
//! `vmdevctl` (the mdevctl-like command) is built on [`client`].

#![warn(missing_docs)]

pub mod client;
pub mod driver_ring;
pub mod net_driver;
pub mod sys;
pub mod transport;
pub mod vhost_user_front;
pub mod vhost_vdpa;

pub use client::TransportClient;
pub use driver_ring::DriverRing;
pub use net_driver::{
    NetDriver, NetDriverConfig, NotifyMode, TxLayout, VhostUserNetDriver, VhostVdpaNetDriver,
};
pub use transport::{DeviceTransport, TransportError};
pub use vhost_user_front::{VhostUserFront, VhostUserFrontError};
pub use vhost_vdpa::{VhostVdpa, VhostVdpaError};
