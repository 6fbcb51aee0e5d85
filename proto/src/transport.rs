//! The transport protocol: what a driver (or `vmdevctl`) says to `vmdev-control` over
//! `control.sock`. One request, one reply, in order. Driver operations mirror the
//! virtio-mdev transport (and Linux `struct vdpa_config_ops`); management operations
//! mirror the `mdevctl` verbs.

use crate::{error::WireError, Hello};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A request to the control plane. Requests marked *(+1 fd)* carry exactly one fd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Must be first on every connection.
    Hello(Hello),

    // ---- management (vmdevctl) ----
    /// Lists parents and the device types they offer.
    ListTypes,
    /// Lists devices.
    ListDevices,
    /// Creates a device on a parent.
    StartDevice {
        /// Parent (datapath) name.
        parent: String,
        /// Device type, e.g. `net-loopback`.
        device_type: String,
        /// UUID to use; a random one when absent.
        uuid: Option<Uuid>,
        /// Attributes such as `mac`, `mtu`, `queue-size`.
        attrs: Vec<(String, String)>,
        /// Also serve the device as a vhost-user backend on this socket path.
        vhost_user: Option<String>,
    },
    /// Defines a device persistently (started now only if `StartDevice` follows, or when its
    /// parent registers if `auto`).
    DefineDevice(DefinedDevice),
    /// Removes a definition (a running device keeps running).
    UndefineDevice {
        /// Which device.
        uuid: Uuid,
    },
    /// Lists defined devices.
    ListDefined,
    /// Starts a defined device from its definition.
    StartDefined {
        /// Which device.
        uuid: Uuid,
    },
    /// Removes a device (its driver, if any, loses it).
    StopDevice {
        /// Which device.
        uuid: Uuid,
    },
    /// Moves a device to another parent while its driver keeps running: the device is
    /// detached where it runs and attached on `to` at the same ring positions.
    MigrateDevice {
        /// Which device.
        uuid: Uuid,
        /// Target parent.
        to: String,
    },
    /// Reads a device's per-queue counters.
    GetStats {
        /// Which device.
        uuid: Uuid,
    },

    // ---- driver: binding ----
    /// Claims a device for this connection (one driver per device).
    Open {
        /// Which device.
        uuid: Uuid,
    },

    // ---- driver: virtio-mdev transport operations ----
    /// Virtio device id (1 = net).
    GetDeviceId,
    /// Vendor id.
    GetVendorId,
    /// Feature bits the device offers.
    GetDeviceFeatures,
    /// Feature bits the driver accepted so far.
    GetDriverFeatures,
    /// The driver accepts these features (before FEATURES_OK).
    SetDriverFeatures(u64),
    /// Device status byte.
    GetStatus,
    /// Writes the status byte (only adding bits, in the virtio order; 0 resets).
    SetStatus(u8),
    /// Resets the device (same as `SetStatus(0)`).
    Reset,
    /// Size of the device's config space.
    GetConfigSize,
    /// Reads config space.
    ReadConfig {
        /// Byte offset.
        offset: u32,
        /// Byte count.
        len: u32,
    },
    /// Writes config space.
    WriteConfig {
        /// Byte offset.
        offset: u32,
        /// Bytes to write.
        data: Vec<u8>,
    },
    /// Config generation counter (changes whenever the device changes its config).
    GetConfigGeneration,
    /// Number of virtqueues the device has.
    GetNumQueues,
    /// Largest size a queue supports.
    GetQueueMaxSize {
        /// Queue index.
        queue: u16,
    },
    /// Sets a queue's size (a power of two, at most the maximum).
    SetQueueSize {
        /// Queue index.
        queue: u16,
        /// Number of descriptors.
        size: u16,
    },
    /// Sets the guest addresses of a queue's three rings.
    SetQueueAddress {
        /// Queue index.
        queue: u16,
        /// Descriptor table.
        desc: u64,
        /// Driver (avail) ring.
        driver: u64,
        /// Device (used) ring.
        device: u64,
    },
    /// Marks a queue ready (or not) for the device.
    SetQueueReady {
        /// Queue index.
        queue: u16,
        /// Ready or not.
        ready: bool,
    },
    /// Whether a queue is ready.
    GetQueueReady {
        /// Queue index.
        queue: u16,
    },
    /// Stops the device between chains: it finishes what it started, then writes nothing
    /// to driver memory and sends no notification until `Resume` *(PROTO_F_SUSPEND)*.
    Suspend,
    /// Lets a suspended device run again from where its queues stand *(PROTO_F_SUSPEND)*.
    Resume,
    /// Starts dirty-page logging into a bitmap memfd sealed against shrinking: one bit per
    /// 4 KiB page of every region, regions in guest-address order, each starting on a new
    /// bit; the device sets bits with atomic ORs for every page it writes *(+1 fd,
    /// PROTO_F_DIRTY_LOG)*.
    StartDirtyLog,
    /// Stops dirty-page logging *(PROTO_F_DIRTY_LOG)*.
    StopDirtyLog,
    /// The opened device's state as a versioned, self-describing blob (JSON
    /// [`DeviceState`]); the device must be suspended or not running
    /// *(PROTO_F_DEVICE_STATE)*.
    SaveState,
    /// Loads a state blob into the opened, freshly reset device: features, status up to
    /// FEATURES_OK and queue positions; the driver then sets up its rings and DRIVER_OK
    /// *(PROTO_F_DEVICE_STATE)*.
    LoadState(Vec<u8>),
    /// Management: a device's state blob (a running device is snapshotted between passes).
    SaveDevice {
        /// Which device.
        uuid: Uuid,
    },
    /// Management: recreates a saved device (identity, type, attributes, counters) on
    /// `parent` (default: the one it was saved from).
    RestoreDevice {
        /// The blob from `SaveDevice`.
        blob: Vec<u8>,
        /// Parent to create it on.
        parent: Option<String>,
    },
    /// Where a queue resumes (before DRIVER_OK or while suspended; default: 0)
    /// *(PROTO_F_VQ_STATE)*.
    SetQueueState {
        /// Queue index.
        queue: u16,
        /// Ring position.
        state: VqState,
    },
    /// Where a queue stands (its state when the device last stopped, or as set).
    GetQueueState {
        /// Queue index.
        queue: u16,
    },
    /// Eventfd the driver writes to kick the queue *(+1 fd)*.
    SetQueueKick {
        /// Queue index.
        queue: u16,
    },
    /// Eventfd the device writes to interrupt the driver *(+1 fd)*.
    SetQueueCall {
        /// Queue index.
        queue: u16,
    },
    /// Eventfd the control plane writes on a config change or NEEDS_RESET *(+1 fd)*.
    SetConfigNotify,
    /// Adds a region of driver memory: a memfd sealed against shrinking *(+1 fd)*.
    AddMemRegion {
        /// Guest address of the region's first byte.
        guest_addr: u64,
        /// Length in bytes.
        size: u64,
        /// Offset of the region inside the memfd.
        offset: u64,
    },
    /// Removes the region starting at `guest_addr` (only while the device is not running).
    RemoveMemRegion {
        /// Guest address the region was added with.
        guest_addr: u64,
    },
    /// Management: starts a device served to the Linux kernel through VDUSE: a vDPA
    /// device named `name`, bound to `virtio_vdpa` or `vhost_vdpa` (root only).
    StartVduseDevice {
        /// Parent (datapath) name.
        parent: String,
        /// Device type, e.g. `net-loopback`.
        device_type: String,
        /// UUID to use; a random one when absent.
        uuid: Option<Uuid>,
        /// Attributes such as `mac`, `mtu`, `queue-size`.
        attrs: Vec<(String, String)>,
        /// VDUSE / vDPA device name.
        name: String,
        /// Which kernel driver gets it.
        bind: VduseBind,
    },
}

/// The kernel driver a VDUSE device is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VduseBind {
    /// `virtio_vdpa`: the kernel's own virtio driver (e.g. virtio_net) uses the device.
    Virtio,
    /// `vhost_vdpa`: `/dev/vhost-vdpa-N` for a VMM or a userspace driver.
    Vhost,
}

/// A reply from the control plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// Answer to [`Request::Hello`].
    Hello(Hello),
    /// Success with no value.
    Ok,
    /// Success with a number (ids, features, status, sizes, generation, readiness as 0/1).
    Value(u64),
    /// Config space bytes.
    Config(Vec<u8>),
    /// Parents and their types.
    Types(Vec<ParentInfo>),
    /// Devices.
    Devices(Vec<DeviceInfo>),
    /// The UUID of a device just created.
    Started(Uuid),
    /// Counters.
    Stats(DeviceStats),
    /// A queue's ring position.
    QueueState(VqState),
    /// Defined devices.
    Defined(Vec<DefinedDevice>),
    /// A device state blob.
    State(Vec<u8>),
    /// The request failed.
    Error(WireError),
}

/// Where a virtqueue stands, so it can stop and resume (here or on another datapath)
/// without losing or repeating a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VqState {
    /// Split ring: next avail entry the device consumes, next used entry it writes.
    Split {
        /// Next avail index.
        avail_index: u16,
        /// Next used index.
        used_index: u16,
    },
    /// Packed ring: next descriptor the device reads and the wrap counter expected there,
    /// next descriptor it writes a used element into and the wrap counter it writes.
    Packed {
        /// Next avail position (0..size).
        avail_index: u16,
        /// Avail wrap counter.
        avail_wrap: bool,
        /// Next used position (0..size).
        used_index: u16,
        /// Used wrap counter.
        used_wrap: bool,
    },
}

impl VqState {
    /// The state of a fresh queue of the given ring kind.
    pub fn fresh(packed: bool) -> VqState {
        if packed {
            VqState::Packed {
                avail_index: 0,
                avail_wrap: true,
                used_index: 0,
                used_wrap: true,
            }
        } else {
            VqState::default()
        }
    }
}

impl Default for VqState {
    fn default() -> Self {
        VqState::Split {
            avail_index: 0,
            used_index: 0,
        }
    }
}

/// Name in [`DeviceState::format`].
pub const DEVICE_STATE_FORMAT: &str = "vmdev-device-state";
/// Current [`DeviceState::version`].
pub const DEVICE_STATE_VERSION: u32 = 1;

/// A device's saved state: what it is, what the driver negotiated, where each queue
/// stands, and the device's own state (MAC, counters). Serialized as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Always [`DEVICE_STATE_FORMAT`].
    pub format: String,
    /// Format version ([`DEVICE_STATE_VERSION`]); newer versions are refused.
    pub version: u32,
    /// Device UUID.
    pub uuid: Uuid,
    /// Parent it was saved from.
    pub parent: String,
    /// Device type.
    pub device_type: String,
    /// Creation attributes.
    pub attrs: Vec<(String, String)>,
    /// Negotiated features.
    pub features: u64,
    /// Status byte.
    pub status: u8,
    /// Config space bytes.
    pub config: Vec<u8>,
    /// Queue positions, by queue index.
    pub queues: Vec<(u16, VqState)>,
    /// Counters.
    pub stats: DeviceStats,
    /// FNV-1a 64 of the compact JSON of this state with `checksum` = 0 (catches edits and
    /// bit flips that still parse).
    #[serde(default)]
    pub checksum: u64,
}

impl DeviceState {
    /// The checksum this state should carry.
    pub fn compute_checksum(&self) -> u64 {
        let mut copy = self.clone();
        copy.checksum = 0;
        let bytes = serde_json::to_vec(&copy).unwrap_or_default();
        bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }
}

/// A persistent device definition (mdevctl `define`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefinedDevice {
    /// Device UUID.
    pub uuid: Uuid,
    /// Parent to start it on.
    pub parent: String,
    /// Device type.
    pub device_type: String,
    /// Attributes.
    pub attrs: Vec<(String, String)>,
    /// vhost-user socket path, if any.
    pub vhost_user: Option<String>,
    /// Start automatically when the parent registers.
    pub auto: bool,
}

/// One parent (datapath process) and what it offers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParentInfo {
    /// Parent name (`--name` of the datapath).
    pub name: String,
    /// Process id of the datapath, as seen by the control plane.
    pub pid: u32,
    /// CPU the datapath pinned itself to, if any.
    pub cpu: Option<u32>,
    /// Types offered.
    pub types: Vec<TypeInfo>,
}

/// One device type offered by a parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeInfo {
    /// Type name, e.g. `net-loopback`.
    pub name: String,
    /// Total instances the parent can take.
    pub max_instances: u32,
    /// Instances still free.
    pub available: u32,
}

/// One device as `vmdevctl list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Device UUID.
    pub uuid: Uuid,
    /// Parent it runs on.
    pub parent: String,
    /// Device type.
    pub device_type: String,
    /// Current virtio status byte.
    pub status: u8,
    /// Features the driver accepted (0 before it did).
    pub driver_features: u64,
    /// Whether a driver holds it.
    pub claimed: bool,
    /// Whether the datapath is servicing it right now.
    pub attached: bool,
    /// Attributes it was created with.
    pub attrs: Vec<(String, String)>,
    /// vhost-user socket path, if the device has that front door.
    pub vhost_user: Option<String>,
    /// VDUSE device name and, bound to vhost_vdpa, its `/dev/vhost-vdpa-N`.
    pub vduse: Option<(String, Option<String>)>,
}

/// Counters of one virtqueue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    /// Frames (chains) completed on this queue.
    pub packets: u64,
    /// Payload bytes (frame bytes, without the virtio-net header).
    pub bytes: u64,
    /// Frames dropped (TX with no RX buffer; RX buffer too small).
    pub drops: u64,
    /// Kicks received from the driver.
    pub kicks: u64,
    /// Interrupts (call eventfd writes) sent to the driver.
    pub calls: u64,
    /// Poll passes that found work on this queue.
    pub polls: u64,
}

impl QueueStats {
    /// Adds another set of counters to this one.
    pub fn add(&mut self, o: &QueueStats) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.drops += o.drops;
        self.kicks += o.kicks;
        self.calls += o.calls;
        self.polls += o.polls;
    }
}

/// Counters of one device, by queue index.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStats {
    /// One entry per queue, in queue order.
    pub queues: Vec<QueueStats>,
}

impl DeviceStats {
    /// Adds another device's counters queue by queue.
    pub fn add(&mut self, o: &DeviceStats) {
        if self.queues.len() < o.queues.len() {
            self.queues.resize(o.queues.len(), QueueStats::default());
        }
        for (a, b) in self.queues.iter_mut().zip(&o.queues) {
            a.add(b);
        }
    }
}
