//! Virtio constants shared by the device model, the datapath and the drivers
//! (values from the virtio 1.x specification).

/// Device status bits (virtio spec §2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u8 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const NEEDS_RESET: u8 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 128;
}

/// Feature bits (virtio spec §6 and §5.1.3).
pub mod features {
    /// virtio-net: device has the given checksum offload… (not offered by the loopback).
    pub const NET_F_CSUM: u64 = 1 << 0;
    /// virtio-net: the device reports its maximum MTU in config space.
    pub const NET_F_MTU: u64 = 1 << 3;
    /// virtio-net: the device has a MAC address in config space.
    pub const NET_F_MAC: u64 = 1 << 5;
    /// virtio-net: the driver can merge receive buffers.
    pub const NET_F_MRG_RXBUF: u64 = 1 << 15;
    /// virtio-net: a control virtqueue exists.
    pub const NET_F_CTRL_VQ: u64 = 1 << 17;
    /// virtio-net: several queue pairs (with CTRL_VQ).
    pub const NET_F_MQ: u64 = 1 << 22;
    /// virtio-net: config space has a link status field.
    pub const NET_F_STATUS: u64 = 1 << 16;
    /// Indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Virtio 1.x (modern) device.
    pub const VERSION_1: u64 = 1 << 32;
    /// The device is behind an IOMMU / platform translation.
    pub const ACCESS_PLATFORM: u64 = 1 << 33;
    /// Packed virtqueue layout.
    pub const RING_PACKED: u64 = 1 << 34;
    /// The device uses buffers in the order the driver made them available.
    pub const IN_ORDER: u64 = 1 << 35;
}

/// Virtio device ids.
pub mod device_id {
    /// Network card.
    pub const NET: u32 = 1;
}

/// The vendor id vmdev devices report ("VMDV").
pub const VMDEV_VENDOR_ID: u32 = 0x5644_4d56;

/// virtio-net specifics shared by the device and its drivers.
pub mod net {
    /// Size of `struct virtio_net_hdr_v1` (VERSION_1 devices always use it).
    pub const HDR_LEN: usize = 12;
    /// Offset of `num_buffers` inside the header.
    pub const HDR_NUM_BUFFERS: usize = 10;
    /// Queue index of the first receive queue.
    pub const RX_QUEUE: u16 = 0;
    /// Queue index of the first transmit queue.
    pub const TX_QUEUE: u16 = 1;
    /// Config space: 6-byte MAC at offset 0.
    pub const CONFIG_MAC: usize = 0;
    /// Config space: u16 link status at offset 6.
    pub const CONFIG_STATUS: usize = 6;
    /// Config space: u16 max_virtqueue_pairs at offset 8.
    pub const CONFIG_MAX_VQ_PAIRS: usize = 8;
    /// Config space: u16 mtu at offset 10.
    pub const CONFIG_MTU: usize = 10;
    /// Size of the config space the loopback exposes.
    pub const CONFIG_LEN: usize = 12;
    /// Link status bit: link up.
    pub const STATUS_LINK_UP: u16 = 1;
    /// Largest Ethernet frame (without FCS) carried by default.
    pub const DEFAULT_MTU: u16 = 1500;
}
