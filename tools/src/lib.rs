//! vmdev driver-side tools.
//!
//! * [`client`]: the transport client — one typed method per vmdev protocol operation;
//! * [`net_driver`]: a virtio-net driver over the driver side of `vmdev-shm-ring`, with its
//!   own memfd memory, RX/TX queues and feature negotiation;
//! * [`sys`]: eventfd and poll helpers.
//!
//! `vmdevctl` (the mdevctl-like command) is built on [`client`].

pub mod client;
pub mod net_driver;
pub mod sys;

pub use client::TransportClient;
pub use net_driver::{NetDriver, NetDriverConfig, NotifyMode, TxLayout};
