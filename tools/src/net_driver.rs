//! A virtio-net driver: negotiates features (MAC, MTU, EVENT_IDX, INDIRECT_DESC, and
//! RING_PACKED when asked), lays out its own memfd memory (rings + buffers), and sends and
//! receives frames through the driver side of `vmdev-shm-ring`, split or packed
//! ([`DriverRing`]). It reaches its device through any [`DeviceTransport`]: the
//! vmdev protocol ([`NetDriver::open`]), the kernel's vhost-vdpa
//! ([`NetDriver::open_vhost_vdpa`]) or a vhost-user back end's socket
//! ([`NetDriver::open_vhost_user`]).

use crate::client::TransportClient;
use crate::driver_ring::{ring_offsets, DriverRing};
use crate::sys;
use crate::transport::{DeviceTransport, TransportError};
use crate::vhost_user_front::{VhostUserFront, VhostUserFrontError};
use crate::vhost_vdpa::{VhostVdpa, VhostVdpaError};
use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;
use vmdev_proto::virtio::{features as f, net, status as st};
use vmdev_proto::ProtoError;
use vmdev_shm_ring::split::{RingFeatures, Segment};
use vmdev_shm_ring::{create_sealed_memfd, GuestAddr, GuestMemory, RingError};

/// Guest address where the driver's memory starts (any 4 KiB-aligned value works).
pub const GUEST_BASE: u64 = 0x1_0000_0000;

/// The MAC used when the device's config space cannot be read and the caller gave none:
/// locally administered, unicast ("vmdev" after the 0x02).
pub const DEFAULT_MAC: [u8; 6] = [0x02, b'v', b'm', b'd', b'e', b'v'];

/// Room before each TX buffer for its two-entry indirect table.
const TX_TABLE: u64 = 64;

/// Marks, in the TX head table, an RX buffer lent to TX by [`NetDriver::echo`].
const LENT_RX: u32 = 1 << 31;

/// How many buffers ahead the driver prefetches the TX buffer it will fill and the RX
/// buffer it will read.
const PREFETCH_AHEAD: usize = 4;

/// On packed rings, a received frame up to this long (virtio-net header included) lets
/// the driver look at the next descriptor line too when it reaches a line (seven buffers
/// on, not three). Short frames come back faster than the device publishes them, so that
/// line is usually complete; long ones leave the device still writing it, and reading it
/// early takes the line from under the device. On the eighth session's host, packed/split
/// at 64 B went from 0.93-0.95 to 1.08 with it; looking ahead seven always lost 4-6 % at
/// 1518 B (perf/RESULTS.md).
const PACKED_SHORT_FRAME: u32 = 256;

/// Failures of the driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The transport failed or the control plane refused a request.
    #[error("transport: {0}")]
    Transport(#[from] ProtoError),
    /// A vhost-vdpa ioctl or IOTLB update failed (the message names the device and ioctl).
    #[error(transparent)]
    VhostVdpa(#[from] VhostVdpaError),
    /// A vhost-user request failed (the message names the socket and request).
    #[error(transparent)]
    VhostUser(#[from] VhostUserFrontError),
    /// The device broke the ring contract.
    #[error("ring: {0}")]
    Ring(#[from] RingError),
    /// A local system call failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The device does not offer what this driver needs, or reported nonsense.
    #[error("device: {0}")]
    Device(String),
    /// The frame is larger than the MTU allows.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// Frame length.
        len: usize,
        /// Largest allowed.
        max: usize,
    },
}

impl From<TransportError> for DriverError {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::Vmdev(e) => DriverError::Transport(e),
            TransportError::VhostVdpa(e) => DriverError::VhostVdpa(e),
            TransportError::VhostUser(e) => DriverError::VhostUser(e),
        }
    }
}

/// How the driver learns about received frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyMode {
    /// Busy-poll the used ring; interrupts suppressed.
    Poll,
    /// Sleep on the call eventfd when there is nothing to do.
    Interrupt,
}

/// How TX chains are built (to exercise the device's chain walker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxLayout {
    /// One descriptor: header and frame together.
    Contiguous,
    /// Two descriptors: header, then frame.
    HeaderSplit,
    /// One indirect descriptor pointing at a two-entry table.
    Indirect,
    /// Rotate through the three.
    Mixed,
}

/// Driver settings.
#[derive(Debug, Clone, Copy)]
pub struct NetDriverConfig {
    /// Queue size (0: the device's maximum; capped at it). Split rings need a power of
    /// two; packed rings take any size.
    pub queue_size: u16,
    /// Negotiate EVENT_IDX if offered.
    pub event_idx: bool,
    /// Negotiate INDIRECT_DESC if offered.
    pub indirect: bool,
    /// Poll or interrupts.
    pub mode: NotifyMode,
    /// TX chain shape.
    pub tx_layout: TxLayout,
    /// Negotiate MRG_RXBUF if offered (a frame may then span several RX buffers).
    pub mrg_rxbuf: bool,
    /// RX buffer size in bytes (0: room for a whole frame; at least 64 otherwise).
    pub rx_buffer_size: u32,
    /// The MAC to use when the device's config space cannot be read (a vhost-user back
    /// end without the CONFIG protocol feature); `None`: [`DEFAULT_MAC`]. A device whose
    /// config space is readable always gives its own.
    pub mac: Option<[u8; 6]>,
    /// Negotiate VIRTIO_F_RING_PACKED if offered: both queues are then packed rings (any
    /// queue size, not only powers of two). Over the vmdev protocol and vhost-user; refused
    /// over vhost-vdpa ([`NetDriver::open_vhost_vdpa`]).
    pub packed: bool,
    /// Negotiate VIRTIO_F_IN_ORDER if offered. Either ring form then reads a used id for a
    /// later buffer as one entry for the batch up to it, as the spec allows (the earlier
    /// buffers come back with length 0); a split ring refuses an id that cannot be that (a
    /// [`RingError::OutOfOrder`]).
    pub in_order: bool,
}

impl Default for NetDriverConfig {
    fn default() -> Self {
        NetDriverConfig {
            queue_size: 0,
            event_idx: true,
            indirect: true,
            mode: NotifyMode::Poll,
            tx_layout: TxLayout::Contiguous,
            mrg_rxbuf: false,
            rx_buffer_size: 0,
            mac: None,
            packed: false,
            in_order: false,
        }
    }
}

/// Guest addresses of one queue's rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddrs {
    /// Descriptor table (packed: descriptor ring).
    pub desc: u64,
    /// Driver area: avail ring (packed: driver event suppression structure).
    pub driver: u64,
    /// Device area: used ring (packed: device event suppression structure).
    pub device: u64,
    /// Queue size.
    pub size: u16,
}

/// What [`NetDriver::live_copy`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveCopyReport {
    /// Pages copied in each round while the device ran (round 0: all of them).
    pub rounds: Vec<usize>,
    /// Pages copied after suspending the device.
    pub final_pages: usize,
}

/// A running virtio-net driver bound to one device, reached through transport `T`: the
/// vmdev protocol (the default) or vhost-vdpa ([`VhostVdpaNetDriver`]).
pub struct NetDriver<T = TransportClient> {
    // Dropped first: the device lets go of the memory before it is unmapped.
    client: T,
    uuid: Uuid,
    cfg: NetDriverConfig,
    base: u64,
    mem: Arc<GuestMemory>,
    memfd: OwnedFd,
    features: u64,
    mac: [u8; 6],
    mtu: u16,
    rx: DriverRing,
    tx: DriverRing,
    rings: [RingAddrs; 2],
    kick: [OwnedFd; 2],
    call: [OwnedFd; 2],
    config: OwnedFd,
    rx_base: u64,
    rx_buf: u64,
    tx_base: u64,
    tx_buf: u64,
    /// RX buffer of each in-flight chain, by the token `add` returned (split: head
    /// descriptor; packed: buffer id), which is what `pop_used` gives back.
    rx_buf_of_head: Vec<u32>,
    /// TX buffer of each in-flight chain, by token as for RX.
    tx_buf_of_head: Vec<u32>,
    /// Free TX buffers, taken from the front and returned at the back: with in-order
    /// completions each TX descriptor gets the same buffer every lap, so the descriptor
    /// need not be rewritten.
    tx_free: VecDeque<u32>,
    rx_unpublished: usize,
    /// RX buffers received and not yet reposted: their descriptors are written after the
    /// next TX publish, while the device works, not between a frame's arrival and the
    /// next one's departure.
    rx_returned: Vec<u32>,
    rx_publish_batch: usize,
    tx_unpublished: usize,
    tx_count: u64,
}

/// A virtio-net driver over the kernel's vhost-vdpa char device.
pub type VhostVdpaNetDriver = NetDriver<VhostVdpa>;

/// A virtio-net driver acting as a vhost-user front end.
pub type VhostUserNetDriver = NetDriver<VhostUserFront>;

fn round_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Where the driver's `size` bytes of memory go: at [`GUEST_BASE`] when the device can
/// reach it there, else as low as the device's address range allows (never at 0).
fn choose_base((first, last): (u64, u64), size: u64) -> Result<u64, DriverError> {
    let fits = |base: u64| {
        base >= first
            && base
                .checked_add(size.saturating_sub(1))
                .is_some_and(|e| e <= last)
    };
    if fits(GUEST_BASE) {
        return Ok(GUEST_BASE);
    }
    let low = round_up(first.max(4096), 4096);
    if fits(low) {
        return Ok(low);
    }
    Err(DriverError::Device(format!(
        "the device's address range {first:#x}..={last:#x} has no room for {size:#x} bytes"
    )))
}

impl NetDriver<TransportClient> {
    /// Connects to the control plane in `run_dir`, claims device `uuid`, negotiates, sets up
    /// memory and queues, posts every RX buffer and sets DRIVER_OK.
    pub fn open(run_dir: &Path, uuid: Uuid, cfg: NetDriverConfig) -> Result<Self, DriverError> {
        let mut c = TransportClient::connect(run_dir)?;
        c.open(uuid)?;
        Self::setup(c, uuid, cfg)
    }

    /// Sets up a device on an already opened client.
    pub fn setup(
        c: TransportClient,
        uuid: Uuid,
        cfg: NetDriverConfig,
    ) -> Result<Self, DriverError> {
        Self::start(c, uuid, cfg)
    }

    /// Takes the device over again on a new connection — after it was stopped and restored
    /// elsewhere, or its control connection was lost — keeping this driver's memory, rings,
    /// posted buffers and eventfds. The device continues from the ring positions of its saved
    /// state: `saved` (a blob from `save_state` or `vmdevctl save`, loaded after a reset) or,
    /// with `None`, the state `vmdevctl restore` already loaded into it. Features and MAC
    /// must be the ones this driver runs with.
    pub fn reattach(&mut self, run_dir: &Path, saved: Option<Vec<u8>>) -> Result<(), DriverError> {
        let mut c = TransportClient::connect(run_dir)?;
        c.open(self.uuid)?;
        if let Some(blob) = saved {
            c.reset()?;
            c.load_state(blob)?;
        }
        let status = c.status()?;
        if status & (st::FEATURES_OK | st::DRIVER_OK | st::NEEDS_RESET) != st::FEATURES_OK {
            return Err(DriverError::Device(format!(
                "the device holds no saved state to continue from (status {status:#x})"
            )));
        }
        let features = c.driver_features()?;
        if features != self.features {
            return Err(DriverError::Device(format!(
                "the saved state has features {features:#x}, this driver runs with {:#x}",
                self.features
            )));
        }
        let mac = c.read_config(0, 6)?;
        if mac != self.mac {
            return Err(DriverError::Device(format!(
                "the device's MAC {mac:02x?} is not this driver's {:02x?}",
                self.mac
            )));
        }
        let size = self
            .mem
            .region_sizes()
            .first()
            .copied()
            .ok_or_else(|| DriverError::Device("no memory".into()))?;
        c.add_mem_region(self.memfd.as_fd(), self.base, size, 0)?;
        hand_queues(&mut c, &self.rings, &self.kick, &self.call)?;
        ready_queues(&mut c, self.config.as_fd())?;
        c.set_status(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK | st::DRIVER_OK)?;
        self.client = c;
        // Whatever the device missed while it was away is waiting in the rings.
        self.kick(0)?;
        self.kick(1)
    }

    /// The transport client (for requests the driver does not wrap).
    pub fn client(&mut self) -> &mut TransportClient {
        &mut self.client
    }

    /// Moves the driver's memory to a new memfd while the device keeps running — the
    /// live-copy flow of a VM migration: dirty logging on, copy everything, re-copy the pages
    /// the device dirtied until at most `few` remain (or `max_rounds`), suspend, copy the
    /// last ones, switch the device's region and this driver's rings to the new memory.
    /// The device is left suspended on the new memory: call [`NetDriver::resume`].
    /// Returns the pages copied in each round.
    pub fn live_copy(
        &mut self,
        max_rounds: usize,
        few: usize,
    ) -> Result<LiveCopyReport, DriverError> {
        use vmdev_shm_ring::dirty::{bitmap_len, DirtyLog, DIRTY_PAGE};
        let size = self
            .mem
            .region_sizes()
            .first()
            .copied()
            .ok_or_else(|| DriverError::Device("no memory".into()))?;
        let new_fd = create_sealed_memfd("vmdev-driver-copy", size)?;
        let mut new_mem = GuestMemory::new();
        new_mem
            .add_region(new_fd.try_clone()?, GuestAddr(self.base), size, 0)
            .map_err(|e| DriverError::Device(e.to_string()))?;
        let len = bitmap_len([size]);
        let bitmap = create_sealed_memfd("vmdev-dirty-bitmap", len)?;
        let log = DirtyLog::map(bitmap.try_clone()?, len)
            .map_err(|e| DriverError::Device(e.to_string()))?;
        let pages = size.div_ceil(DIRTY_PAGE);
        let mut page = vec![0u8; DIRTY_PAGE as usize];
        let base = self.base;
        let old_mem = Arc::clone(&self.mem);
        let mut copy = |list: &mut dyn Iterator<Item = u64>| -> Result<usize, DriverError> {
            let mut n = 0;
            for p in list.filter(|&p| p < pages) {
                let off = p * DIRTY_PAGE;
                let chunk = &mut page[..(size - off).min(DIRTY_PAGE) as usize];
                old_mem
                    .read(GuestAddr(base + off), chunk)
                    .map_err(RingError::from)?;
                new_mem
                    .write(GuestAddr(base + off), chunk)
                    .map_err(RingError::from)?;
                n += 1;
            }
            Ok(n)
        };
        self.client.start_dirty_log(bitmap.as_fd())?;
        // Frames queued by the caller go out now, so the device works while memory is copied.
        self.flush()?;
        let mut rounds = vec![copy(&mut (0..pages))?];
        while rounds.len() < max_rounds.max(1) {
            let n = copy(&mut log.harvest().into_iter())?;
            rounds.push(n);
            if n <= few {
                break;
            }
        }
        self.client.suspend()?;
        let last = copy(&mut log.harvest().into_iter())?;
        self.client.stop_dirty_log()?;
        self.client.remove_mem_region(base)?;
        self.client.add_mem_region(new_fd.as_fd(), base, size, 0)?;
        let new_mem = Arc::new(new_mem);
        self.rx.remap(Arc::clone(&new_mem))?;
        self.tx.remap(Arc::clone(&new_mem))?;
        self.mem = new_mem;
        self.memfd = new_fd;
        Ok(LiveCopyReport {
            rounds,
            final_pages: last,
        })
    }

    /// Resumes a suspended device (after [`NetDriver::live_copy`]).
    pub fn resume(&mut self) -> Result<(), DriverError> {
        Ok(self.client.resume()?)
    }
}

impl NetDriver<VhostVdpa> {
    /// Opens a vhost-vdpa device (`/dev/vhost-vdpa-N`), negotiates (accepting
    /// VIRTIO_F_ACCESS_PLATFORM), maps its memory through the IOTLB, sets up the RX and TX
    /// queues (vhost-vdpa net devices have no control queue here), posts every RX buffer and
    /// sets DRIVER_OK. [`NetDriver::uuid`] is nil: such a device has no vmdev UUID.
    /// Packed rings (`cfg.packed`) are refused here: vhost-vdpa would start them at base 0
    /// with wrap counters 0, not where a fresh packed ring starts.
    pub fn open_vhost_vdpa(path: &Path, cfg: NetDriverConfig) -> Result<Self, DriverError> {
        if cfg.packed {
            return Err(DriverError::Device(
                "packed rings are not supported over vhost-vdpa by this driver".into(),
            ));
        }
        Self::start(VhostVdpa::open(path)?, Uuid::nil(), cfg)
    }

    /// The vhost-vdpa device (for requests the driver does not wrap).
    pub fn vhost_vdpa(&mut self) -> &mut VhostVdpa {
        &mut self.client
    }
}

impl NetDriver<VhostUserFront> {
    /// Connects to the vhost-user-net back end listening on `path` (vmdev's vhost-user door,
    /// DPDK's vhost PMD...) and drives it as a VMM would: negotiates, hands it the memory
    /// table and the RX and TX rings, posts every RX buffer and sets DRIVER_OK (when the
    /// rings are actually handed over). A back end without the CONFIG protocol feature has
    /// no readable config space: MAC and MTU are then not negotiated, the MAC is
    /// `cfg.mac` (or [`DEFAULT_MAC`]) and the MTU 1500. [`NetDriver::uuid`] is nil.
    pub fn open_vhost_user(path: &Path, cfg: NetDriverConfig) -> Result<Self, DriverError> {
        let front = VhostUserFront::connect(path, vmdev_proto::virtio::device_id::NET)?;
        Self::start(front, Uuid::nil(), cfg)
    }

    /// The vhost-user front end (for requests the driver does not wrap).
    pub fn vhost_user(&mut self) -> &mut VhostUserFront {
        &mut self.client
    }
}

impl<T: DeviceTransport> NetDriver<T> {
    /// Negotiates, lays out memory, hands the queues and sets DRIVER_OK: the setup every
    /// transport shares.
    fn start(mut c: T, uuid: Uuid, cfg: NetDriverConfig) -> Result<Self, DriverError> {
        if c.device_id()? != vmdev_proto::virtio::device_id::NET {
            return Err(DriverError::Device("not a virtio-net device".into()));
        }
        c.reset()?;
        c.set_status(st::ACKNOWLEDGE)?;
        c.set_status(st::ACKNOWLEDGE | st::DRIVER)?;
        let offered = c.device_features()?;
        let has_config = c.config_readable();
        let mut want = f::VERSION_1;
        if has_config {
            want |= f::NET_F_MAC | f::NET_F_MTU | f::NET_F_STATUS;
        }
        want |= c.required_features();
        if cfg.event_idx {
            want |= f::RING_EVENT_IDX;
        }
        if cfg.indirect {
            want |= f::RING_INDIRECT_DESC;
        }
        if cfg.mrg_rxbuf {
            want |= f::NET_F_MRG_RXBUF;
        }
        if cfg.packed {
            want |= f::RING_PACKED;
        }
        if cfg.in_order {
            want |= f::IN_ORDER;
        }
        let features = want & offered;
        if features & f::VERSION_1 == 0 {
            return Err(DriverError::Device(
                "the device does not offer VERSION_1".into(),
            ));
        }
        c.set_driver_features(features)?;
        c.set_status(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK)?;
        if c.status()? & st::FEATURES_OK == 0 {
            return Err(DriverError::Device(
                "the device did not accept our features".into(),
            ));
        }
        let config = if has_config {
            c.read_config(0, net::CONFIG_LEN as u32)?
        } else {
            Vec::new()
        };
        let mut mac = cfg.mac.unwrap_or(DEFAULT_MAC);
        if has_config {
            mac.copy_from_slice(
                config
                    .get(0..6)
                    .ok_or_else(|| DriverError::Device("short config".into()))?,
            );
        }
        let mtu = if features & f::NET_F_MTU != 0 {
            match config.get(net::CONFIG_MTU..net::CONFIG_MTU + 2) {
                Some(&[a, b]) => u16::from_le_bytes([a, b]),
                _ => {
                    return Err(DriverError::Device(
                        "config space too short for the MTU".into(),
                    ))
                }
            }
        } else {
            net::DEFAULT_MTU
        };

        let packed = features & f::RING_PACKED != 0;
        let mut sizes = [0u16; 2];
        for (q, s) in sizes.iter_mut().enumerate() {
            let max = c.queue_max_size(q as u16)?;
            *s = if cfg.queue_size == 0 {
                max
            } else {
                cfg.queue_size.min(max)
            };
        }
        // Memory: [rx rings][tx rings][rx buffers][tx buffers], each part 4 KiB aligned.
        let frame_room = round_up(net::HDR_LEN as u64 + 14 + mtu as u64, 64);
        let rx_buf = match cfg.rx_buffer_size {
            0 => frame_room,
            n if n < 64 => {
                return Err(DriverError::Device(format!(
                    "RX buffers of {n} bytes are too small"
                )))
            }
            n if features & f::NET_F_MRG_RXBUF == 0 && (n as u64) < frame_room => {
                return Err(DriverError::Device(format!(
                    "RX buffers of {n} bytes need MRG_RXBUF"
                )))
            }
            n => n as u64,
        };
        let tx_buf = TX_TABLE + frame_room;
        // Offsets first; the base follows from the size and the device's address range.
        let mut off = 0u64;
        let mut ring_offs = [(0u64, 0u64, 0u64); 2];
        for (q, r) in ring_offs.iter_mut().enumerate() {
            let (d, a, u, total) = ring_offsets(sizes[q], packed);
            *r = (off + d, off + a, off + u);
            off = round_up(off + total, 4096);
        }
        let rx_off = off;
        off = round_up(off + rx_buf * sizes[0] as u64, 4096);
        let tx_off = off;
        off = round_up(off + tx_buf * sizes[1] as u64, 4096);
        // Whole 2 MiB, so that the memory can sit in transparent huge pages (GuestMemory
        // asks for them): a 4 KiB page per buffer or two thrashes the datapath's TLB once
        // it serves tens of devices.
        let mem_size = round_up(off, 2 << 20);
        let base = choose_base(c.address_range()?, mem_size)?;
        let mut rings = [RingAddrs {
            desc: 0,
            driver: 0,
            device: 0,
            size: 0,
        }; 2];
        for ((r, (d, a, u)), size) in rings.iter_mut().zip(ring_offs).zip(sizes) {
            *r = RingAddrs {
                desc: base + d,
                driver: base + a,
                device: base + u,
                size,
            };
        }
        let rx_base = base + rx_off;
        let tx_base = base + tx_off;

        let memfd = create_sealed_memfd("vmdev-driver", mem_size)?;
        let mut mem = GuestMemory::new();
        mem.add_region(memfd.try_clone()?, GuestAddr(base), mem_size, 0)
            .map_err(|e| DriverError::Device(e.to_string()))?;
        let mem = Arc::new(mem);
        c.add_mem_region(memfd.as_fd(), base, mem_size, 0, &mem)?;

        let kick = [sys::eventfd()?, sys::eventfd()?];
        let call = [sys::eventfd()?, sys::eventfd()?];
        let config_fd = sys::eventfd()?;
        let rf = RingFeatures::from_bits(features);
        hand_queues(&mut c, &rings, &kick, &call)?;
        let mk = |r: RingAddrs| {
            DriverRing::new(
                Arc::clone(&mem),
                r.size,
                (r.desc, r.driver, r.device),
                rf,
                packed,
            )
        };
        let (rx, tx) = (mk(rings[0])?, mk(rings[1])?);
        ready_queues(&mut c, config_fd.as_fd())?;

        let mut drv = NetDriver {
            client: c,
            uuid,
            cfg,
            base,
            mem,
            memfd,
            features,
            mac,
            mtu,
            rx,
            tx,
            rings,
            kick,
            call,
            config: config_fd,
            rx_base,
            rx_buf,
            tx_base,
            tx_buf,
            rx_buf_of_head: vec![0; sizes[0] as usize],
            tx_buf_of_head: vec![0; sizes[1] as usize],
            tx_free: (0..sizes[1] as u32).collect(),
            rx_unpublished: 0,
            rx_returned: Vec::with_capacity(sizes[0] as usize),
            rx_publish_batch: (sizes[0] as usize / 8).max(1),
            tx_unpublished: 0,
            tx_count: 0,
        };
        for b in 0..sizes[0] as u32 {
            drv.post_rx(b)?;
        }
        drv.rx.publish();
        drv.rx_unpublished = 0;
        drv.tx.disable_interrupts();
        if cfg.mode == NotifyMode::Poll {
            drv.rx.disable_interrupts();
        }
        drv.client
            .set_status(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK | st::DRIVER_OK)?;
        Ok(drv)
    }

    fn post_rx(&mut self, buf: u32) -> Result<(), DriverError> {
        let addr = GuestAddr(self.rx_base + buf as u64 * self.rx_buf);
        let head = self
            .rx
            .add(&[Segment {
                addr,
                len: self.rx_buf as u32,
                writable: true,
            }])
            .ok_or_else(|| DriverError::Device("RX ring full while reposting".into()))?;
        if let Some(slot) = self.rx_buf_of_head.get_mut(head as usize) {
            *slot = buf;
        }
        self.rx_unpublished += 1;
        Ok(())
    }

    /// The device's UUID (nil for a vhost-vdpa or vhost-user device).
    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    /// Negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether the queues are packed rings (VIRTIO_F_RING_PACKED was negotiated).
    pub fn packed(&self) -> bool {
        self.rx.is_packed()
    }

    /// The device's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The device's MTU.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Largest frame (Ethernet header + payload) the driver sends.
    pub fn max_frame(&self) -> usize {
        self.mtu as usize + 14
    }

    /// Frames that may be in flight (sent, not yet received) without the loopback ever
    /// finding its RX ring empty, counting a largest frame spread over several RX buffers
    /// when they are smaller than it (MRG_RXBUF).
    pub fn max_in_flight(&self) -> usize {
        let per_frame =
            (net::HDR_LEN as u64 + self.max_frame() as u64).div_ceil(self.rx_buf.max(1));
        ((self.rings[0].size as usize).saturating_sub(self.rx_publish_batch)
            / per_frame.max(1) as usize)
            .max(1)
    }

    /// Takes back every TX buffer the device has finished with.
    fn reap_tx(&mut self) -> Result<(), DriverError> {
        self.reap_tx_upto(usize::MAX)
    }

    /// Takes back at most `max` TX buffers the device has finished with.
    fn reap_tx_upto(&mut self, max: usize) -> Result<(), DriverError> {
        for _ in 0..max {
            let Some((head, _)) = self.tx.pop_used()? else {
                break;
            };
            match self.tx_buf_of_head.get(head as usize) {
                Some(&b) if b & LENT_RX != 0 => self.post_rx(b & !LENT_RX)?,
                Some(&b) => self.tx_free.push_back(b),
                None => {}
            }
        }
        Ok(())
    }

    /// Takes the next used RX buffer, if any: its buffer number, the length the device
    /// wrote (checked to hold a header and fit the buffer) and the header's num_buffers.
    fn take_rx(&mut self) -> Result<Option<(u32, u32, u16)>, DriverError> {
        let Some((head, len)) = self.rx.pop_used()? else {
            return Ok(None);
        };
        let buf = self.rx_buf_of_head.get(head as usize).copied().unwrap_or(0);
        self.prefetch_rx_ahead(len);
        if (len as usize) < net::HDR_LEN || len as u64 > self.rx_buf {
            return Err(DriverError::Device(format!(
                "RX used length {len} outside {}..={}",
                net::HDR_LEN,
                self.rx_buf
            )));
        }
        let mut h = [0u8; net::HDR_LEN];
        self.mem
            .read(GuestAddr(self.rx_base + buf as u64 * self.rx_buf), &mut h)
            .map_err(RingError::from)?;
        let nb = u16::from_le_bytes([h[net::HDR_NUM_BUFFERS], h[net::HDR_NUM_BUFFERS + 1]]);
        Ok(Some((buf, len, nb)))
    }

    /// Asks the cache for RX buffers the device has already filled (from the other core),
    /// so that reading them later does not stall: a few used entries on for split rings;
    /// for packed ones, when a descriptor line was just reached, the rest of it, and the
    /// next line too after a short frame (`len`, the one just taken).
    fn prefetch_rx_ahead(&self, len: u32) {
        let ahead = if self.rx.is_packed() && len <= PACKED_SHORT_FRAME {
            2 * PREFETCH_AHEAD as u16 - 1
        } else {
            PREFETCH_AHEAD as u16 - 1
        };
        self.rx.peek_used(ahead, |next| self.prefetch_rx(next));
    }

    /// Asks the cache for the first lines of the RX buffer under descriptor `head` (a
    /// hint read from the ring; an id out of range names buffer 0, which is harmless).
    fn prefetch_rx(&self, head: u16) {
        let b = self.rx_buf_of_head.get(head as usize).copied().unwrap_or(0);
        let at = self.rx_base + b as u64 * self.rx_buf;
        self.mem.prefetch(GuestAddr(at), self.rx_buf, false);
    }

    /// Sends the next received frame straight back, without copying it: its RX buffer
    /// becomes the TX buffer (visible at the next [`NetDriver::flush`]) and returns to the
    /// RX ring once the device has sent it — testpmd's `io` forwarding. `peek` gets the
    /// frame's first bytes for the caller to look at. Returns the frame's length, or `None`
    /// when nothing was received (or TX has no room yet). Needs RX buffers that hold a
    /// whole frame (the default `rx_buffer_size`).
    pub fn echo(&mut self, peek: &mut [u8]) -> Result<Option<usize>, DriverError> {
        let hdr = net::HDR_LEN as u64;
        if self.rx_buf < hdr + self.max_frame() as u64 {
            return Err(DriverError::Device(format!(
                "echo needs RX buffers that hold a whole frame ({} bytes), not {}",
                hdr + self.max_frame() as u64,
                self.rx_buf
            )));
        }
        // Lent buffers come back to the RX ring in batches, not only when TX is full.
        if self.tx.in_flight() >= self.rx_publish_batch || self.tx.free_descriptors() == 0 {
            self.reap_tx()?;
            if self.tx.free_descriptors() == 0 {
                return Ok(None);
            }
        }
        let Some((buf, len, nb)) = self.take_rx()? else {
            return Ok(None);
        };
        let base = self.rx_base + buf as u64 * self.rx_buf;
        if self.features & f::NET_F_MRG_RXBUF != 0 && nb != 1 {
            return Err(DriverError::Device(format!(
                "num_buffers {nb} for a frame that fits one RX buffer"
            )));
        }
        let n = peek.len().min(len as usize - net::HDR_LEN);
        self.mem
            .read(GuestAddr(base + hdr), &mut peek[..n])
            .map_err(RingError::from)?;
        // num_buffers means nothing on transmit: send the header back zeroed.
        self.mem
            .write(GuestAddr(base + net::HDR_NUM_BUFFERS as u64), &[0, 0])
            .map_err(RingError::from)?;
        let seg = Segment {
            addr: GuestAddr(base),
            len,
            writable: false,
        };
        let Some(t) = self.tx.add(&[seg]) else {
            return Err(DriverError::Device(
                "TX ring full after a free check".into(),
            ));
        };
        if let Some(s) = self.tx_buf_of_head.get_mut(t as usize) {
            *s = buf | LENT_RX;
        }
        self.tx_unpublished += 1;
        self.tx_count += 1;
        Ok(Some(len as usize - net::HDR_LEN))
    }

    /// Asks for the `i`-th free TX buffer's first lines for writing (see `queue_frame`).
    fn prefetch_tx(&self, i: usize) {
        if let Some(&b) = self.tx_free.get(i) {
            let at = self.tx_base + b as u64 * self.tx_buf + TX_TABLE;
            self.mem
                .prefetch(GuestAddr(at), self.tx_buf - TX_TABLE, true);
        }
    }

    /// Queues one frame for transmission (visible to the device at the next
    /// [`NetDriver::flush`]); `Ok(false)` when no TX buffer is free.
    // Inlined into the sender's loop on purpose: as a call, the copying benchmark ran at
    // 4.8, 5.6 or 7.2 Mframes/s with the same code depending on where the linker placed it
    // (a stall at its prologue's pushes in the slow layouts); inlined, three layouts ran at
    // 7.2-7.4 (perf/RESULTS.md, 2026-12-05 sixth session).
    #[inline(always)]
    pub fn queue_frame(&mut self, frame: &[u8]) -> Result<bool, DriverError> {
        if frame.len() > self.max_frame() {
            return Err(DriverError::FrameTooLarge {
                len: frame.len(),
                max: self.max_frame(),
            });
        }
        if self.tx_free.is_empty() || self.tx.free_descriptors() < 2 {
            self.reap_tx()?;
        }
        let Some(buf) = self.tx_free.pop_front() else {
            return Ok(false);
        };
        // The buffer a few frames on is probably still in the device's cache: ask for it now
        // so these copies do not wait for it then. A batch's first frame leaves that to the
        // last flush, which asked for the next batch's first buffers after publishing.
        if self.tx_unpublished > 0 {
            self.prefetch_tx(PREFETCH_AHEAD - 1);
        }
        let slot = self.tx_base + buf as u64 * self.tx_buf;
        let hdr = GuestAddr(slot + TX_TABLE);
        let data = GuestAddr(slot + TX_TABLE + net::HDR_LEN as u64);
        // No Arc clone per frame (an atomic pair for nothing): borrow the memory.
        self.mem
            .write(hdr, &[0u8; net::HDR_LEN])
            .map_err(RingError::from)?;
        self.mem.write(data, frame).map_err(RingError::from)?;
        let mut layout = match self.cfg.tx_layout {
            TxLayout::Mixed => [
                TxLayout::Contiguous,
                TxLayout::HeaderSplit,
                TxLayout::Indirect,
            ][(self.tx_count % 3) as usize],
            l => l,
        };
        if frame.is_empty()
            || (layout == TxLayout::Indirect && self.features & f::RING_INDIRECT_DESC == 0)
        {
            layout = TxLayout::Contiguous;
        }
        let hdr_seg = Segment {
            addr: hdr,
            len: net::HDR_LEN as u32,
            writable: false,
        };
        let data_seg = Segment {
            addr: data,
            len: frame.len() as u32,
            writable: false,
        };
        let head = match layout {
            TxLayout::HeaderSplit => self.tx.add(&[hdr_seg, data_seg]),
            TxLayout::Indirect => self
                .tx
                .add_indirect(GuestAddr(slot), &[hdr_seg, data_seg])?,
            _ => self.tx.add(&[Segment {
                addr: hdr,
                len: (net::HDR_LEN + frame.len()) as u32,
                writable: false,
            }]),
        };
        let Some(head) = head else {
            self.tx_free.push_front(buf);
            return Ok(false);
        };
        if let Some(s) = self.tx_buf_of_head.get_mut(head as usize) {
            *s = buf;
        }
        self.tx_unpublished += 1;
        self.tx_count += 1;
        Ok(true)
    }

    /// Publishes queued TX frames and reposted RX buffers, kicking where the device asks.
    pub fn flush(&mut self) -> Result<(), DriverError> {
        if self.tx_unpublished > 0 {
            self.tx.publish();
            let sent = std::mem::take(&mut self.tx_unpublished);
            if self.tx.needs_kick() {
                sys::signal(self.kick[1].as_fd())?;
            }
            // Once a batch is out, one buffer back per frame sent, after the frames are
            // visible (off the path to the device): a sender that waited for the ring to
            // run dry would pay for a whole ring's completions in one frame (4-6 µs every
            // 256th frame in the quiet mode: all of `vmdev-perf latency`'s p99.9).
            if self.tx.in_flight() >= self.rx_publish_batch {
                self.reap_tx_upto(sent)?;
            }
            for i in 0..=PREFETCH_AHEAD {
                self.prefetch_tx(i);
            }
        }
        self.flush_rx()
    }

    fn flush_rx(&mut self) -> Result<(), DriverError> {
        let mut returned = std::mem::take(&mut self.rx_returned);
        for &b in &returned {
            self.post_rx(b)?;
        }
        returned.clear();
        self.rx_returned = returned;
        if self.rx_unpublished > 0 {
            self.rx.publish();
            self.rx_unpublished = 0;
            if self.rx.needs_kick() {
                sys::signal(self.kick[0].as_fd())?;
            }
        }
        Ok(())
    }

    /// Queues and flushes one frame; `Ok(false)` when no TX buffer is free.
    pub fn send(&mut self, frame: &[u8]) -> Result<bool, DriverError> {
        let queued = self.queue_frame(frame)?;
        self.flush()?;
        Ok(queued)
    }

    /// Takes one received frame (without the virtio-net header) into `out` and returns its
    /// buffer for reposting (at the next [`NetDriver::flush`], or here once a publish batch
    /// has gathered); `Ok(false)` when none is waiting.
    pub fn recv_into(&mut self, out: &mut Vec<u8>) -> Result<bool, DriverError> {
        let Some((buf, len, n)) = self.take_rx()? else {
            return Ok(false);
        };
        let base = self.rx_base + buf as u64 * self.rx_buf;
        out.resize(len as usize - net::HDR_LEN, 0);
        self.mem
            .read(GuestAddr(base + net::HDR_LEN as u64), out)
            .map_err(RingError::from)?;
        self.rx_returned.push(buf);
        if self.features & f::NET_F_MRG_RXBUF != 0 {
            if n == 0 || n > self.rings[0].size {
                return Err(DriverError::Device(format!(
                    "num_buffers {n} in a merged RX header"
                )));
            }
            for _ in 1..n {
                let Some((head, len)) = self.rx.pop_used()? else {
                    return Err(DriverError::Device(
                        "merged frame: the device published too few buffers".into(),
                    ));
                };
                let buf = self.rx_buf_of_head.get(head as usize).copied().unwrap_or(0);
                if len as u64 > self.rx_buf {
                    return Err(DriverError::Device(format!(
                        "RX used length {len} over {}",
                        self.rx_buf
                    )));
                }
                let at = out.len();
                out.resize(at + len as usize, 0);
                let addr = GuestAddr(self.rx_base + buf as u64 * self.rx_buf);
                self.mem
                    .read(addr, &mut out[at..])
                    .map_err(RingError::from)?;
                self.rx_returned.push(buf);
            }
        }
        if self.rx_returned.len() + self.rx_unpublished >= self.rx_publish_batch {
            self.flush_rx()?;
        }
        Ok(true)
    }

    /// In interrupt mode: sleeps until the device signals RX (or `timeout` passes), unless
    /// frames are already waiting; returns whether RX has something. In poll mode it returns
    /// `false` at once (the caller keeps polling with interrupts suppressed), after asking
    /// the cache for the RX buffer the device will most likely fill next. Each poll then
    /// fetches that buffer's lines alongside the used index, so that once the device has
    /// written both, the driver takes the two cross-core misses together, not one after
    /// the other.
    pub fn wait_rx(&mut self, timeout: Duration) -> Result<bool, DriverError> {
        self.flush()?;
        if self.cfg.mode == NotifyMode::Poll {
            if let Some(head) = self.rx.next_used_hint() {
                self.prefetch_rx(head);
            }
            std::hint::spin_loop();
            return Ok(false);
        }
        if self.rx.enable_interrupts() {
            return Ok(true);
        }
        let ready = sys::poll_readable(&[self.call[0].as_fd()], timeout)?;
        sys::drain(self.call[0].as_fd());
        Ok(ready.first().copied().unwrap_or(false))
    }

    /// Whether the control plane signalled the config eventfd (config change or NEEDS_RESET)
    /// since the last call; waits up to `timeout`.
    pub fn wait_config_signal(&self, timeout: Duration) -> Result<bool, DriverError> {
        let r = sys::poll_readable(&[self.config.as_fd()], timeout)?;
        Ok(r.first().copied().unwrap_or(false) && sys::drain(self.config.as_fd()) > 0)
    }

    /// Reads the device status over the transport.
    pub fn status(&mut self) -> Result<u8, DriverError> {
        Ok(self.client.status()?)
    }

    /// The transport (for requests the driver does not wrap).
    pub fn transport(&mut self) -> &mut T {
        &mut self.client
    }

    /// The driver's memory (tests write hostile rings through it).
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// Ring addresses of queue `q` (0 = RX, 1 = TX).
    pub fn ring_addrs(&self, q: usize) -> Option<RingAddrs> {
        self.rings.get(q).copied()
    }

    /// Guest address and length of the RX buffer area (what the device writes).
    pub fn rx_area(&self) -> (u64, u64) {
        (self.rx_base, self.rx_buf * self.rings[0].size as u64)
    }

    /// Guest address and length of the TX buffer area (what the device only reads).
    pub fn tx_area(&self) -> (u64, u64) {
        (self.tx_base, self.tx_buf * self.rings[1].size as u64)
    }

    /// Guest address and length of all the driver's memory (rings, buffers and the padding
    /// up to a whole 2 MiB): what the device may touch, for tests aiming at its edges.
    pub fn mem_area(&self) -> (u64, u64) {
        (self.base, self.mem.region_sizes().iter().sum())
    }

    /// Kicks queue `q` unconditionally.
    pub fn kick(&self, q: usize) -> Result<(), DriverError> {
        match self.kick.get(q) {
            Some(k) => Ok(sys::signal(k.as_fd())?),
            None => Err(DriverError::Device(format!("no queue {q}"))),
        }
    }
}

/// Hands both queues' sizes, ring addresses and eventfds to the device.
fn hand_queues<T: DeviceTransport>(
    c: &mut T,
    rings: &[RingAddrs; 2],
    kick: &[OwnedFd; 2],
    call: &[OwnedFd; 2],
) -> Result<(), DriverError> {
    for (q, ((r, k), cl)) in rings.iter().zip(kick).zip(call).enumerate() {
        let q = q as u16;
        c.set_queue_size(q, r.size)?;
        c.set_queue_address(q, r.desc, r.driver, r.device)?;
        c.set_queue_kick(q, k.as_fd())?;
        c.set_queue_call(q, cl.as_fd())?;
    }
    Ok(())
}

/// Marks both queues ready and hands the config-change eventfd.
fn ready_queues<T: DeviceTransport>(c: &mut T, config: BorrowedFd<'_>) -> Result<(), DriverError> {
    for q in 0..2u16 {
        c.set_queue_ready(q, true)?;
    }
    Ok(c.set_config_notify(config)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_goes_at_guest_base_when_reachable() {
        assert_eq!(choose_base((0, u64::MAX), 1 << 20).ok(), Some(GUEST_BASE));
        // A device reaching only its first 1.1 GiB (VDUSE-like): as low as possible, not 0.
        assert_eq!(choose_base((0, 0x47ff_ffff), 1 << 20).ok(), Some(4096));
        assert_eq!(
            choose_base((0x1001, 0x47ff_ffff), 1 << 20).ok(),
            Some(0x2000)
        );
        assert!(choose_base((0, 0xfffff), 1 << 20).is_err());
    }

    /// A device model behind the transport trait that records what the driver asks.
    struct Mock {
        log: Vec<String>,
        status: u8,
        offered: u64,
        accepted: u64,
        range: (u64, u64),
        required: u64,
    }

    impl DeviceTransport for Mock {
        fn device_id(&mut self) -> Result<u32, TransportError> {
            Ok(vmdev_proto::virtio::device_id::NET)
        }
        fn device_features(&mut self) -> Result<u64, TransportError> {
            Ok(self.offered)
        }
        fn set_driver_features(&mut self, features: u64) -> Result<(), TransportError> {
            self.accepted = features;
            self.log.push(format!("features {features:#x}"));
            Ok(())
        }
        fn status(&mut self) -> Result<u8, TransportError> {
            Ok(self.status)
        }
        fn set_status(&mut self, status: u8) -> Result<(), TransportError> {
            self.status = status;
            self.log.push(format!("status {status:#x}"));
            Ok(())
        }
        fn reset(&mut self) -> Result<(), TransportError> {
            self.status = 0;
            self.log.push("reset".into());
            Ok(())
        }
        fn read_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, TransportError> {
            let mut c = vec![2, 0, 0, 0, 0, 7, 1, 0, 1, 0];
            c.extend_from_slice(&1500u16.to_le_bytes());
            Ok(c[offset as usize..(offset + len) as usize].to_vec())
        }
        fn queue_max_size(&mut self, _queue: u16) -> Result<u16, TransportError> {
            Ok(256)
        }
        fn set_queue_size(&mut self, queue: u16, size: u16) -> Result<(), TransportError> {
            self.log.push(format!("q{queue} size {size}"));
            Ok(())
        }
        fn set_queue_address(
            &mut self,
            queue: u16,
            desc: u64,
            _driver: u64,
            _device: u64,
        ) -> Result<(), TransportError> {
            self.log.push(format!("q{queue} addr {desc:#x}"));
            Ok(())
        }
        fn set_queue_kick(
            &mut self,
            queue: u16,
            _fd: BorrowedFd<'_>,
        ) -> Result<(), TransportError> {
            self.log.push(format!("q{queue} kick"));
            Ok(())
        }
        fn set_queue_call(
            &mut self,
            queue: u16,
            _fd: BorrowedFd<'_>,
        ) -> Result<(), TransportError> {
            self.log.push(format!("q{queue} call"));
            Ok(())
        }
        fn set_queue_ready(&mut self, queue: u16, ready: bool) -> Result<(), TransportError> {
            self.log.push(format!("q{queue} ready {ready}"));
            Ok(())
        }
        fn set_config_notify(&mut self, _fd: BorrowedFd<'_>) -> Result<(), TransportError> {
            self.log.push("config notify".into());
            Ok(())
        }
        fn add_mem_region(
            &mut self,
            _fd: BorrowedFd<'_>,
            guest_addr: u64,
            size: u64,
            offset: u64,
            local: &GuestMemory,
        ) -> Result<(), TransportError> {
            // What vhost-vdpa does: the local mapping of the whole region must exist.
            assert!(local.translate(GuestAddr(guest_addr), size).is_ok());
            self.log
                .push(format!("mem {guest_addr:#x}+{size:#x} at {offset}"));
            Ok(())
        }
        fn address_range(&mut self) -> Result<(u64, u64), TransportError> {
            Ok(self.range)
        }
        fn required_features(&self) -> u64 {
            self.required
        }
    }

    fn mock(required: u64, range: (u64, u64)) -> Mock {
        Mock {
            log: Vec::new(),
            status: 0,
            offered: f::VERSION_1 | f::NET_F_MAC | f::NET_F_MTU | f::ACCESS_PLATFORM,
            accepted: 0,
            range,
            required,
        }
    }

    #[test]
    fn a_vhost_vdpa_like_transport_gets_access_platform_and_the_setup_order() {
        let drv = NetDriver::start(
            mock(f::ACCESS_PLATFORM, (0, 0x47ff_ffff)),
            Uuid::nil(),
            NetDriverConfig::default(),
        )
        .expect("setup");
        assert_eq!(
            drv.features(),
            f::VERSION_1 | f::NET_F_MAC | f::NET_F_MTU | f::ACCESS_PLATFORM
        );
        assert_eq!(drv.mac(), [2, 0, 0, 0, 0, 7]);
        assert_eq!(drv.mtu(), 1500);
        let rx = drv.ring_addrs(0).expect("rx ring");
        assert_eq!(rx.desc, 4096);
        let log: Vec<&str> = drv.client.log.iter().map(String::as_str).collect();
        let steps: Vec<&str> = log
            .iter()
            .map(|l| l.split(' ').next().unwrap_or(""))
            .collect();
        assert_eq!(
            steps,
            [
                "reset", "status", "status", "features", "status", "mem", "q0", "q0", "q0", "q0",
                "q1", "q1", "q1", "q1", "q0", "q1", "config", "status"
            ]
        );
        assert_eq!(log[4], "status 0xb");
        assert_eq!(log[17], "status 0xf");
        assert_eq!(
            &log[6..10],
            ["q0 size 256", "q0 addr 0x1000", "q0 kick", "q0 call"]
        );
    }

    #[test]
    fn packed_rings_are_taken_only_when_asked_and_offered_and_use_the_packed_layout() {
        let mut m = mock(0, (0, u64::MAX));
        m.offered |= f::RING_PACKED;
        let drv = NetDriver::start(m, Uuid::nil(), NetDriverConfig::default()).expect("setup");
        assert!(!drv.packed());
        assert_eq!(drv.features() & f::RING_PACKED, 0);

        let mut m = mock(0, (0, u64::MAX));
        m.offered |= f::RING_PACKED;
        let cfg = NetDriverConfig {
            packed: true,
            queue_size: 100,
            ..Default::default()
        };
        let drv = NetDriver::start(m, Uuid::nil(), cfg).expect("setup");
        assert!(drv.packed());
        assert_ne!(drv.client.accepted & f::RING_PACKED, 0);
        let rx = drv.ring_addrs(0).expect("rx ring");
        let tx = drv.ring_addrs(1).expect("tx ring");
        // 100 descriptors of 16 bytes, then the two 4-byte event areas on their own lines.
        assert_eq!(rx.size, 100);
        assert_eq!(rx.desc, GUEST_BASE);
        assert_eq!(rx.driver, GUEST_BASE + 1600);
        assert_eq!(rx.device, GUEST_BASE + 1664);
        assert_eq!(tx.desc, GUEST_BASE + 4096);
        assert!(drv.client.log.iter().any(|l| l == "q1 size 100"));

        // Asked but not offered: split rings (which need a power-of-two size).
        let cfg = NetDriverConfig {
            queue_size: 128,
            ..cfg
        };
        let drv = NetDriver::start(mock(0, (0, u64::MAX)), Uuid::nil(), cfg).expect("setup");
        assert!(!drv.packed());
        assert_eq!(drv.features() & f::RING_PACKED, 0);
        // Split: the avail ring follows the 2048-byte descriptor table.
        assert_eq!(drv.ring_addrs(0).map(|r| r.driver), Some(GUEST_BASE + 2048));
    }

    #[test]
    fn the_vmdev_transport_does_not_take_access_platform() {
        let drv = NetDriver::start(
            mock(0, (0, u64::MAX)),
            Uuid::nil(),
            NetDriverConfig::default(),
        )
        .expect("setup");
        assert_eq!(drv.features() & f::ACCESS_PLATFORM, 0);
        assert_eq!(drv.ring_addrs(0).map(|r| r.desc), Some(GUEST_BASE));
        assert_eq!(drv.client.accepted, drv.features());
    }
}
