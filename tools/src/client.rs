//! The transport client: a connection to `vmdev-control` with one typed method per
//! protocol operation. Error replies come back as [`ProtoError::Remote`].

use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use uuid::Uuid;
use vmdev_proto::transport::{DeviceInfo, DeviceStats, ParentInfo, Reply, Request, VduseBind};
use vmdev_proto::{Channel, Hello, ProtoError};

/// A connected, handshaken transport client.
pub struct TransportClient {
    ch: Channel,
    hello: Hello,
}

fn unexpected(r: Reply) -> ProtoError {
    match r {
        Reply::Error(e) => ProtoError::Remote(e),
        other => ProtoError::UnexpectedReply(format!("{other:?}")),
    }
}

impl TransportClient {
    /// Connects to `RUN_DIR/control.sock` and exchanges hellos.
    pub fn connect(run_dir: &Path) -> Result<Self, ProtoError> {
        Self::connect_path(&run_dir.join("control.sock"))
    }

    /// Connects to a control socket path and exchanges hellos.
    pub fn connect_path(path: &Path) -> Result<Self, ProtoError> {
        let stream = UnixStream::connect(path).map_err(|e| {
            ProtoError::Io(std::io::Error::new(
                e.kind(),
                format!(
                    "connecting to {} (is vmdev-control running?): {e}",
                    path.display()
                ),
            ))
        })?;
        Self::handshake(Channel::new(stream))
    }

    /// Exchanges hellos over an already connected channel.
    pub fn handshake(mut ch: Channel) -> Result<Self, ProtoError> {
        let sent = ch.send(&Request::Hello(Hello::ours()), &[]);
        // A server that refuses us (full, uid not allowed) may answer and close before our
        // hello arrives: its answer still waits in our socket, so read it either way.
        let reply = match ch.recv::<Reply>() {
            Ok((r, _)) => r,
            Err(e) => return Err(sent.err().unwrap_or(e)),
        };
        match reply {
            Reply::Hello(hello) => Ok(TransportClient { ch, hello }),
            Reply::Error(e) => Err(ProtoError::Handshake(e.to_string())),
            other => Err(ProtoError::UnexpectedReply(format!("{other:?}"))),
        }
    }

    /// What the server accepted in the hello.
    pub fn hello(&self) -> Hello {
        self.hello
    }

    /// Sends any request with fds and returns the reply; error replies become `Err`.
    pub fn request(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<Reply, ProtoError> {
        match self.ch.call::<_, Reply>(req, fds)? {
            Reply::Error(e) => Err(ProtoError::Remote(e)),
            r => Ok(r),
        }
    }

    /// The underlying channel (tests use it to send malformed frames).
    pub fn channel(&mut self) -> &mut Channel {
        &mut self.ch
    }

    fn ok(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<(), ProtoError> {
        match self.request(req, fds)? {
            Reply::Ok => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    fn value(&mut self, req: &Request) -> Result<u64, ProtoError> {
        match self.request(req, &[])? {
            Reply::Value(v) => Ok(v),
            r => Err(unexpected(r)),
        }
    }

    // ---- management ----

    /// Parents and the types they offer.
    pub fn list_types(&mut self) -> Result<Vec<ParentInfo>, ProtoError> {
        match self.request(&Request::ListTypes, &[])? {
            Reply::Types(t) => Ok(t),
            r => Err(unexpected(r)),
        }
    }

    /// All devices.
    pub fn list_devices(&mut self) -> Result<Vec<DeviceInfo>, ProtoError> {
        match self.request(&Request::ListDevices, &[])? {
            Reply::Devices(d) => Ok(d),
            r => Err(unexpected(r)),
        }
    }

    /// Creates a device; returns its UUID.
    pub fn start_device(
        &mut self,
        parent: &str,
        device_type: &str,
        uuid: Option<Uuid>,
        attrs: Vec<(String, String)>,
        vhost_user: Option<&str>,
    ) -> Result<Uuid, ProtoError> {
        let req = Request::StartDevice {
            parent: parent.into(),
            device_type: device_type.into(),
            uuid,
            attrs,
            vhost_user: vhost_user.map(str::to_string),
        };
        match self.request(&req, &[])? {
            Reply::Started(u) => Ok(u),
            r => Err(unexpected(r)),
        }
    }

    /// Creates a device served to the Linux kernel through VDUSE as vDPA device `name`,
    /// bound to `bind`'s driver; returns its UUID.
    pub fn start_vduse_device(
        &mut self,
        parent: &str,
        device_type: &str,
        uuid: Option<Uuid>,
        attrs: Vec<(String, String)>,
        name: &str,
        bind: VduseBind,
    ) -> Result<Uuid, ProtoError> {
        let req = Request::StartVduseDevice {
            parent: parent.into(),
            device_type: device_type.into(),
            uuid,
            attrs,
            name: name.into(),
            bind,
        };
        match self.request(&req, &[])? {
            Reply::Started(u) => Ok(u),
            r => Err(unexpected(r)),
        }
    }

    /// Moves a device to another parent (live, if a driver runs it).
    pub fn migrate_device(&mut self, uuid: Uuid, to: &str) -> Result<(), ProtoError> {
        self.ok(
            &Request::MigrateDevice {
                uuid,
                to: to.into(),
            },
            &[],
        )
    }

    /// Suspends the opened device (it keeps its rings; nothing is written meanwhile).
    pub fn suspend(&mut self) -> Result<(), ProtoError> {
        self.ok(&Request::Suspend, &[])
    }

    /// Resumes the opened device.
    pub fn resume(&mut self) -> Result<(), ProtoError> {
        self.ok(&Request::Resume, &[])
    }

    /// Where a queue of the opened device stands.
    pub fn queue_state(
        &mut self,
        queue: u16,
    ) -> Result<vmdev_proto::transport::VqState, ProtoError> {
        match self.request(&Request::GetQueueState { queue }, &[])? {
            Reply::QueueState(s) => Ok(s),
            r => Err(unexpected(r)),
        }
    }

    /// Saves a device definition.
    pub fn define_device(
        &mut self,
        def: vmdev_proto::transport::DefinedDevice,
    ) -> Result<(), ProtoError> {
        self.ok(&Request::DefineDevice(def), &[])
    }

    /// Removes a device definition.
    pub fn undefine_device(&mut self, uuid: Uuid) -> Result<(), ProtoError> {
        self.ok(&Request::UndefineDevice { uuid }, &[])
    }

    /// Defined devices.
    pub fn list_defined(
        &mut self,
    ) -> Result<Vec<vmdev_proto::transport::DefinedDevice>, ProtoError> {
        match self.request(&Request::ListDefined, &[])? {
            Reply::Defined(d) => Ok(d),
            r => Err(unexpected(r)),
        }
    }

    /// Starts a defined device.
    pub fn start_defined(&mut self, uuid: Uuid) -> Result<Uuid, ProtoError> {
        match self.request(&Request::StartDefined { uuid }, &[])? {
            Reply::Started(u) => Ok(u),
            r => Err(unexpected(r)),
        }
    }

    /// A device's state blob (management; a running device is snapshotted between passes).
    pub fn save_device(&mut self, uuid: Uuid) -> Result<Vec<u8>, ProtoError> {
        match self.request(&Request::SaveDevice { uuid }, &[])? {
            Reply::State(b) => Ok(b),
            r => Err(unexpected(r)),
        }
    }

    /// Recreates a saved device, on `parent` or where it was saved from.
    pub fn restore_device(
        &mut self,
        blob: Vec<u8>,
        parent: Option<&str>,
    ) -> Result<Uuid, ProtoError> {
        match self.request(
            &Request::RestoreDevice {
                blob,
                parent: parent.map(str::to_string),
            },
            &[],
        )? {
            Reply::Started(u) => Ok(u),
            r => Err(unexpected(r)),
        }
    }

    /// The opened device's state blob (suspend it first if it runs).
    pub fn save_state(&mut self) -> Result<Vec<u8>, ProtoError> {
        match self.request(&Request::SaveState, &[])? {
            Reply::State(b) => Ok(b),
            r => Err(unexpected(r)),
        }
    }

    /// Loads a state blob into the opened, freshly reset device.
    pub fn load_state(&mut self, blob: Vec<u8>) -> Result<(), ProtoError> {
        self.ok(&Request::LoadState(blob), &[])
    }

    /// Starts dirty-page logging of the opened device into `bitmap` (a sealed memfd).
    pub fn start_dirty_log(&mut self, bitmap: BorrowedFd<'_>) -> Result<(), ProtoError> {
        self.ok(&Request::StartDirtyLog, &[bitmap])
    }

    /// Stops dirty-page logging.
    pub fn stop_dirty_log(&mut self) -> Result<(), ProtoError> {
        self.ok(&Request::StopDirtyLog, &[])
    }

    /// Removes a device.
    pub fn stop_device(&mut self, uuid: Uuid) -> Result<(), ProtoError> {
        self.ok(&Request::StopDevice { uuid }, &[])
    }

    /// A device's counters.
    pub fn stats(&mut self, uuid: Uuid) -> Result<DeviceStats, ProtoError> {
        match self.request(&Request::GetStats { uuid }, &[])? {
            Reply::Stats(s) => Ok(s),
            r => Err(unexpected(r)),
        }
    }

    // ---- driver ----

    /// Claims a device for this connection.
    pub fn open(&mut self, uuid: Uuid) -> Result<(), ProtoError> {
        self.ok(&Request::Open { uuid }, &[])
    }

    /// Virtio device id.
    pub fn device_id(&mut self) -> Result<u32, ProtoError> {
        self.value(&Request::GetDeviceId).map(|v| v as u32)
    }

    /// Vendor id.
    pub fn vendor_id(&mut self) -> Result<u32, ProtoError> {
        self.value(&Request::GetVendorId).map(|v| v as u32)
    }

    /// Features the device offers.
    pub fn device_features(&mut self) -> Result<u64, ProtoError> {
        self.value(&Request::GetDeviceFeatures)
    }

    /// The features the driver accepted (or a loaded state carries).
    pub fn driver_features(&mut self) -> Result<u64, ProtoError> {
        self.value(&Request::GetDriverFeatures)
    }

    /// Accepts features.
    pub fn set_driver_features(&mut self, f: u64) -> Result<(), ProtoError> {
        self.ok(&Request::SetDriverFeatures(f), &[])
    }

    /// Status byte.
    pub fn status(&mut self) -> Result<u8, ProtoError> {
        self.value(&Request::GetStatus).map(|v| v as u8)
    }

    /// Writes the status byte.
    pub fn set_status(&mut self, s: u8) -> Result<(), ProtoError> {
        self.ok(&Request::SetStatus(s), &[])
    }

    /// Resets the device.
    pub fn reset(&mut self) -> Result<(), ProtoError> {
        self.ok(&Request::Reset, &[])
    }

    /// Reads config space.
    pub fn read_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, ProtoError> {
        match self.request(&Request::ReadConfig { offset, len }, &[])? {
            Reply::Config(b) => Ok(b),
            r => Err(unexpected(r)),
        }
    }

    /// Config space size.
    pub fn config_size(&mut self) -> Result<u32, ProtoError> {
        self.value(&Request::GetConfigSize).map(|v| v as u32)
    }

    /// Config generation.
    pub fn config_generation(&mut self) -> Result<u32, ProtoError> {
        self.value(&Request::GetConfigGeneration).map(|v| v as u32)
    }

    /// Largest size of a queue.
    pub fn queue_max_size(&mut self, queue: u16) -> Result<u16, ProtoError> {
        self.value(&Request::GetQueueMaxSize { queue })
            .map(|v| v as u16)
    }

    /// Sets a queue's size.
    pub fn set_queue_size(&mut self, queue: u16, size: u16) -> Result<(), ProtoError> {
        self.ok(&Request::SetQueueSize { queue, size }, &[])
    }

    /// Sets a queue's ring addresses.
    pub fn set_queue_address(
        &mut self,
        queue: u16,
        desc: u64,
        driver: u64,
        device: u64,
    ) -> Result<(), ProtoError> {
        self.ok(
            &Request::SetQueueAddress {
                queue,
                desc,
                driver,
                device,
            },
            &[],
        )
    }

    /// Marks a queue ready.
    pub fn set_queue_ready(&mut self, queue: u16, ready: bool) -> Result<(), ProtoError> {
        self.ok(&Request::SetQueueReady { queue, ready }, &[])
    }

    /// Hands over a queue's kick eventfd.
    pub fn set_queue_kick(&mut self, queue: u16, fd: BorrowedFd<'_>) -> Result<(), ProtoError> {
        self.ok(&Request::SetQueueKick { queue }, &[fd])
    }

    /// Hands over a queue's call eventfd.
    pub fn set_queue_call(&mut self, queue: u16, fd: BorrowedFd<'_>) -> Result<(), ProtoError> {
        self.ok(&Request::SetQueueCall { queue }, &[fd])
    }

    /// Hands over the config-change eventfd.
    pub fn set_config_notify(&mut self, fd: BorrowedFd<'_>) -> Result<(), ProtoError> {
        self.ok(&Request::SetConfigNotify, &[fd])
    }

    /// Adds a memory region.
    pub fn add_mem_region(
        &mut self,
        fd: BorrowedFd<'_>,
        guest_addr: u64,
        size: u64,
        offset: u64,
    ) -> Result<(), ProtoError> {
        self.ok(
            &Request::AddMemRegion {
                guest_addr,
                size,
                offset,
            },
            &[fd],
        )
    }

    /// Removes a memory region.
    pub fn remove_mem_region(&mut self, guest_addr: u64) -> Result<(), ProtoError> {
        self.ok(&Request::RemoveMemRegion { guest_addr }, &[])
    }
}
