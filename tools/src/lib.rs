//! vmdev driver-side tools.
//!
//! * [`client`]: the transport client — one typed method per vmdev protocol operation;
//! * [`vhost_vdpa`]: the driver side of the kernel's vhost-vdpa char device
//!   (`/dev/vhost-vdpa-N`): ioctls and IOTLB updates;
//! * [`transport`]: [`DeviceTransport`], the operations a driver sets a device up with,
//!   implemented by both of the above;
//! * [`net_driver`]: a virtio-net driver over the driver side of `vmdev-shm-ring`, with its
//!   own memfd memory, RX/TX queues and feature negotiation, over either transport;
//! * [`sys`]: eventfd and poll helpers.
//!
//! `vmdevctl` (the mdevctl-like command) is built on [`client`].

pub mod client;
pub mod net_driver;
pub mod sys;
pub mod transport;
pub mod vhost_vdpa;

pub use client::TransportClient;
pub use net_driver::{NetDriver, NetDriverConfig, NotifyMode, TxLayout, VhostVdpaNetDriver};
pub use transport::{DeviceTransport, TransportError};
pub use vhost_vdpa::{VhostVdpa, VhostVdpaError};
