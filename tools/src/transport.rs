//! One driver-side interface to a virtio device, whichever door it is reached through:
//! the vmdev protocol ([`TransportClient`]), the kernel's vhost-vdpa char device
//! ([`VhostVdpa`]) or a vhost-user back end's socket ([`crate::VhostUserFront`], which
//! implements the trait in its own module). [`crate::NetDriver`] sets a device up through
//! [`DeviceTransport`] only.

use crate::client::TransportClient;
use crate::vhost_user_front::VhostUserFrontError;
use crate::vhost_vdpa::{VhostVdpa, VhostVdpaError};
use std::os::fd::BorrowedFd;
use vmdev_proto::virtio::features as f;
use vmdev_proto::ProtoError;
use vmdev_shm_ring::{GuestAddr, GuestMemory};

/// A failure of any transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The vmdev protocol failed or the control plane refused a request.
    #[error("{0}")]
    Vmdev(#[from] ProtoError),
    /// A vhost-vdpa ioctl or IOTLB update failed.
    #[error("{0}")]
    VhostVdpa(#[from] VhostVdpaError),
    /// A vhost-user request failed or the back end lacks what was asked.
    #[error("{0}")]
    VhostUser(#[from] VhostUserFrontError),
}

/// The operations a driver needs to negotiate with a device and hand it its queues.
pub trait DeviceTransport {
    /// Virtio device id.
    fn device_id(&mut self) -> Result<u32, TransportError>;
    /// Features the device offers.
    fn device_features(&mut self) -> Result<u64, TransportError>;
    /// Accepts features.
    fn set_driver_features(&mut self, features: u64) -> Result<(), TransportError>;
    /// The status byte.
    fn status(&mut self) -> Result<u8, TransportError>;
    /// Writes the status byte (bits are only ever added, until a reset).
    fn set_status(&mut self, status: u8) -> Result<(), TransportError>;
    /// Resets the device (status 0).
    fn reset(&mut self) -> Result<(), TransportError>;
    /// Reads `len` bytes of config space at `offset`.
    fn read_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, TransportError>;
    /// Largest size of queue `queue`.
    fn queue_max_size(&mut self, queue: u16) -> Result<u16, TransportError>;
    /// Sets a queue's size; the queue starts at ring position 0.
    fn set_queue_size(&mut self, queue: u16, size: u16) -> Result<(), TransportError>;
    /// Sets a queue's ring addresses (guest addresses).
    fn set_queue_address(
        &mut self,
        queue: u16,
        desc: u64,
        driver: u64,
        device: u64,
    ) -> Result<(), TransportError>;
    /// Hands a queue's kick eventfd.
    fn set_queue_kick(&mut self, queue: u16, fd: BorrowedFd<'_>) -> Result<(), TransportError>;
    /// Hands a queue's call eventfd.
    fn set_queue_call(&mut self, queue: u16, fd: BorrowedFd<'_>) -> Result<(), TransportError>;
    /// Enables (or disables) a queue.
    fn set_queue_ready(&mut self, queue: u16, ready: bool) -> Result<(), TransportError>;
    /// Hands the config-change eventfd.
    fn set_config_notify(&mut self, fd: BorrowedFd<'_>) -> Result<(), TransportError>;
    /// Gives the device `size` bytes of memfd `fd` from `offset` at `guest_addr`. `local` is
    /// this process's mapping of that memory (a transport that needs a user address, such
    /// as vhost-vdpa, takes it from there); it must stay mapped while the device uses it.
    fn add_mem_region(
        &mut self,
        fd: BorrowedFd<'_>,
        guest_addr: u64,
        size: u64,
        offset: u64,
        local: &GuestMemory,
    ) -> Result<(), TransportError>;
    /// The guest addresses the device can reach, inclusive (`(0, u64::MAX)`: all).
    fn address_range(&mut self) -> Result<(u64, u64), TransportError> {
        Ok((0, u64::MAX))
    }
    /// Transport feature bits the driver must accept whenever the device offers them
    /// (vhost-vdpa: VIRTIO_F_ACCESS_PLATFORM, since ring and buffer addresses are IOVAs).
    fn required_features(&self) -> u64 {
        0
    }
    /// Whether [`DeviceTransport::read_config`] can work at all. A vhost-user back end
    /// without the CONFIG protocol feature (DPDK's vhost PMD) has no readable config space:
    /// the driver then negotiates no feature whose value lives there (MAC, MTU, link status).
    fn config_readable(&mut self) -> bool {
        true
    }
}

impl DeviceTransport for TransportClient {
    fn device_id(&mut self) -> Result<u32, TransportError> {
        Ok(TransportClient::device_id(self)?)
    }
    fn device_features(&mut self) -> Result<u64, TransportError> {
        Ok(TransportClient::device_features(self)?)
    }
    fn set_driver_features(&mut self, features: u64) -> Result<(), TransportError> {
        Ok(TransportClient::set_driver_features(self, features)?)
    }
    fn status(&mut self) -> Result<u8, TransportError> {
        Ok(TransportClient::status(self)?)
    }
    fn set_status(&mut self, status: u8) -> Result<(), TransportError> {
        Ok(TransportClient::set_status(self, status)?)
    }
    fn reset(&mut self) -> Result<(), TransportError> {
        Ok(TransportClient::reset(self)?)
    }
    fn read_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, TransportError> {
        Ok(TransportClient::read_config(self, offset, len)?)
    }
    fn queue_max_size(&mut self, queue: u16) -> Result<u16, TransportError> {
        Ok(TransportClient::queue_max_size(self, queue)?)
    }
    fn set_queue_size(&mut self, queue: u16, size: u16) -> Result<(), TransportError> {
        Ok(TransportClient::set_queue_size(self, queue, size)?)
    }
    fn set_queue_address(
        &mut self,
        queue: u16,
        desc: u64,
        driver: u64,
        device: u64,
    ) -> Result<(), TransportError> {
        Ok(TransportClient::set_queue_address(
            self, queue, desc, driver, device,
        )?)
    }
    fn set_queue_kick(&mut self, queue: u16, fd: BorrowedFd<'_>) -> Result<(), TransportError> {
        Ok(TransportClient::set_queue_kick(self, queue, fd)?)
    }
    fn set_queue_call(&mut self, queue: u16, fd: BorrowedFd<'_>) -> Result<(), TransportError> {
        Ok(TransportClient::set_queue_call(self, queue, fd)?)
    }
    fn set_queue_ready(&mut self, queue: u16, ready: bool) -> Result<(), TransportError> {
        Ok(TransportClient::set_queue_ready(self, queue, ready)?)
    }
    fn set_config_notify(&mut self, fd: BorrowedFd<'_>) -> Result<(), TransportError> {
        Ok(TransportClient::set_config_notify(self, fd)?)
    }
    fn add_mem_region(
        &mut self,
        fd: BorrowedFd<'_>,
        guest_addr: u64,
        size: u64,
        offset: u64,
        _local: &GuestMemory,
    ) -> Result<(), TransportError> {
        // The control plane maps the memfd itself.
        Ok(TransportClient::add_mem_region(
            self, fd, guest_addr, size, offset,
        )?)
    }
}

impl DeviceTransport for VhostVdpa {
    fn device_id(&mut self) -> Result<u32, TransportError> {
        Ok(VhostVdpa::device_id(self)?)
    }
    fn device_features(&mut self) -> Result<u64, TransportError> {
        Ok(self.features()?)
    }
    fn set_driver_features(&mut self, features: u64) -> Result<(), TransportError> {
        Ok(self.set_features(features)?)
    }
    fn status(&mut self) -> Result<u8, TransportError> {
        Ok(VhostVdpa::status(self)?)
    }
    fn set_status(&mut self, status: u8) -> Result<(), TransportError> {
        Ok(VhostVdpa::set_status(self, status)?)
    }
    fn reset(&mut self) -> Result<(), TransportError> {
        Ok(VhostVdpa::set_status(self, 0)?)
    }
    fn read_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, TransportError> {
        Ok(VhostVdpa::read_config(self, offset, len)?)
    }
    fn queue_max_size(&mut self, _queue: u16) -> Result<u16, TransportError> {
        // vhost-vdpa reports one maximum for every vring.
        Ok(self.vring_num_max()?)
    }
    fn set_queue_size(&mut self, queue: u16, size: u16) -> Result<(), TransportError> {
        self.set_vring_num(queue, size)?;
        Ok(self.set_vring_base(queue, 0)?)
    }
    fn set_queue_address(
        &mut self,
        queue: u16,
        desc: u64,
        driver: u64,
        device: u64,
    ) -> Result<(), TransportError> {
        Ok(self.set_vring_addr(queue, desc, driver, device)?)
    }
    fn set_queue_kick(&mut self, queue: u16, fd: BorrowedFd<'_>) -> Result<(), TransportError> {
        Ok(self.set_vring_kick(queue, fd)?)
    }
    fn set_queue_call(&mut self, queue: u16, fd: BorrowedFd<'_>) -> Result<(), TransportError> {
        Ok(self.set_vring_call(queue, fd)?)
    }
    fn set_queue_ready(&mut self, queue: u16, ready: bool) -> Result<(), TransportError> {
        Ok(self.set_vring_enable(queue, ready)?)
    }
    fn set_config_notify(&mut self, fd: BorrowedFd<'_>) -> Result<(), TransportError> {
        Ok(self.set_config_call(fd)?)
    }
    fn add_mem_region(
        &mut self,
        _fd: BorrowedFd<'_>,
        guest_addr: u64,
        size: u64,
        _offset: u64,
        local: &GuestMemory,
    ) -> Result<(), TransportError> {
        // The IOTLB maps IOVAs onto this process's own (shared, memfd-backed) mapping.
        let host = local.translate(GuestAddr(guest_addr), size).map_err(|e| {
            VhostVdpaError::Unsupported {
                path: self.path().to_path_buf(),
                msg: format!("memory {guest_addr:#x}+{size:#x} is not mapped in this process: {e}"),
            }
        })?;
        Ok(self.iotlb_update(guest_addr, size, host.as_ptr() as u64)?)
    }
    fn address_range(&mut self) -> Result<(u64, u64), TransportError> {
        let r = self.iova_range()?;
        Ok((r.first, r.last))
    }
    fn required_features(&self) -> u64 {
        f::ACCESS_PLATFORM
    }
}
