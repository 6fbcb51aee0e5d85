//! The packed virtqueue (virtio 1.1+ §2.8, VIRTIO_F_RING_PACKED): layout, device side and
//! driver side.
//!
//! Layout in guest memory (little-endian):
//! * descriptor ring: `size` × 16 bytes {addr u64, len u32, id u16, flags u16}, 16-aligned;
//!   the driver writes available descriptors into it and the device overwrites them with
//!   used descriptors;
//! * driver event suppression: {desc_event_off_wrap u16, desc_event_flags u16}, 4-aligned,
//!   written by the driver: whether the device should send used-buffer notifications;
//! * device event suppression: the same structure, written by the device: whether the
//!   driver should send available-buffer notifications (kicks).
//!
//! Both sides keep a position in the ring and a wrap counter (starting at 1) that flips each
//! time the position passes the ring's end. A descriptor is available when its AVAIL flag
//! equals the driver's wrap counter at its position and its USED flag does not; it is used
//! when both flags equal the device's wrap counter. Chains are consecutive descriptors
//! linked by NEXT (wrapping at the ring end); the buffer id is the last descriptor's. The
//! device writes one used descriptor per chain, at its used position, and skips forward by
//! the chain's descriptor count. Queue sizes need not be powers of two.
//!
//! Both sides publish a batch with one release store: everything but the first
//! descriptor's flags is written first, then those flags.

use crate::split::{RingFeatures, Segment, MAX_INDIRECT};
use crate::{chain::Chain, memory::GuestMemory, volatile, GuestAddr, RingError};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, Ordering};
use std::sync::Arc;

/// Descriptor flag: the chain continues with the next descriptor in the ring.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors.
pub const DESC_F_INDIRECT: u16 = 4;
/// Descriptor flag: the AVAIL bit (compared with the wrap counter).
pub const DESC_F_AVAIL: u16 = 1 << 7;
/// Descriptor flag: the USED bit (compared with the wrap counter).
pub const DESC_F_USED: u16 = 1 << 15;

/// Event suppression flags: notifications wanted.
pub const EVENT_F_ENABLE: u16 = 0;
/// Event suppression flags: no notifications.
pub const EVENT_F_DISABLE: u16 = 1;
/// Event suppression flags: a notification when the descriptor at the event's offset and
/// wrap counter is made available (or used). Only with VIRTIO_F_RING_EVENT_IDX.
pub const EVENT_F_DESC: u16 = 2;
/// The wrap-counter bit of an event suppression structure's `desc_event_off_wrap`.
pub const EVENT_WRAP: u16 = 1 << 15;

/// Largest packed queue size.
pub const MAX_QUEUE_SIZE: u16 = 32768;

const DESC_LEN: u64 = 16;
const EVENT_LEN: u64 = 4;

/// Byte sizes of one packed queue's three areas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedLayout {
    /// Queue size.
    pub size: u16,
    /// Bytes of the descriptor ring.
    pub desc_len: u64,
    /// Bytes of the driver event suppression structure.
    pub driver_event_len: u64,
    /// Bytes of the device event suppression structure.
    pub device_event_len: u64,
}

impl PackedLayout {
    /// Sizes for a queue of `size` descriptors.
    pub fn new(size: u16) -> Self {
        PackedLayout {
            size,
            desc_len: DESC_LEN * size as u64,
            driver_event_len: EVENT_LEN,
            device_event_len: EVENT_LEN,
        }
    }

    /// Offsets (descriptor ring, driver event, device event) and total length when the
    /// three areas are placed back to back from a 64-byte-aligned base, each on its own
    /// cache lines (the same placement as [`crate::split::SplitLayout::packed_offsets`]).
    pub fn packed_offsets(&self) -> (u64, u64, u64, u64) {
        let up = |x: u64| (x + 63) & !63;
        let desc = 0;
        let driver = up(desc + self.desc_len);
        let device = up(driver + self.driver_event_len);
        (desc, driver, device, up(device + self.device_event_len))
    }
}

fn check_size(size: u16) -> Result<(), RingError> {
    if size == 0 || size > MAX_QUEUE_SIZE {
        return Err(RingError::BadPackedSize(size as u32));
    }
    Ok(())
}

/// Where a packed queue stands, so it can stop and resume without losing or repeating a
/// buffer: the device's next available position and the driver wrap counter it expects
/// there, and its next used position with the wrap counter it writes there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PackedState {
    /// Next descriptor the device reads (0..size).
    pub avail_index: u16,
    /// Wrap counter of the available descriptors expected at `avail_index`.
    pub avail_wrap: bool,
    /// Next descriptor the device writes a used element into (0..size).
    pub used_index: u16,
    /// Wrap counter the device writes at `used_index`.
    pub used_wrap: bool,
}

impl Default for PackedState {
    /// A fresh queue: both positions 0, both wrap counters 1.
    fn default() -> Self {
        PackedState {
            avail_index: 0,
            avail_wrap: true,
            used_index: 0,
            used_wrap: true,
        }
    }
}

impl PackedState {
    /// The 32-bit form vhost uses for a packed ring's base (as vhost-vdpa reports it):
    /// bits 0–14 avail index, bit 15 avail wrap, bits 16–30 used index, bit 31 used wrap.
    pub fn to_u32(self) -> u32 {
        let a = (self.avail_index & !EVENT_WRAP) as u32 | (self.avail_wrap as u32) << 15;
        let u = (self.used_index & !EVENT_WRAP) as u32 | (self.used_wrap as u32) << 15;
        a | u << 16
    }

    /// The inverse of [`PackedState::to_u32`].
    pub fn from_u32(v: u32) -> Self {
        PackedState {
            avail_index: (v & 0x7fff) as u16,
            avail_wrap: v & (1 << 15) != 0,
            used_index: ((v >> 16) & 0x7fff) as u16,
            used_wrap: v & (1 << 31) != 0,
        }
    }
}

/// A position in the ring with its wrap counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    index: u16,
    wrap: bool,
}

impl Pos {
    const START: Pos = Pos {
        index: 0,
        wrap: true,
    };

    /// Moves `n` (at most the queue size) descriptors on, flipping the wrap counter when
    /// passing the ring's end.
    fn advance(&mut self, n: u16, size: u16) {
        let i = self.index as u32 + n as u32;
        if i >= size as u32 {
            self.index = (i - size as u32) as u16;
            self.wrap = !self.wrap;
        } else {
            self.index = i as u16;
        }
    }

    fn advanced(mut self, n: u16, size: u16) -> Pos {
        self.advance(n, size);
        self
    }

    /// The `desc_event_off_wrap` encoding.
    fn off_wrap(self) -> u16 {
        self.index | if self.wrap { EVENT_WRAP } else { 0 }
    }
}

/// Whether a descriptor's flags mark it available for wrap counter `wrap`.
fn is_avail(flags: u16, wrap: bool) -> bool {
    (flags & DESC_F_AVAIL != 0) == wrap && (flags & DESC_F_USED != 0) != wrap
}

/// Whether a descriptor's flags mark it used for wrap counter `wrap`.
fn is_used(flags: u16, wrap: bool) -> bool {
    (flags & DESC_F_AVAIL != 0) == wrap && (flags & DESC_F_USED != 0) == wrap
}

fn avail_bits(wrap: bool) -> u16 {
    if wrap {
        DESC_F_AVAIL
    } else {
        DESC_F_USED
    }
}

fn used_bits(wrap: bool) -> u16 {
    if wrap {
        DESC_F_AVAIL | DESC_F_USED
    } else {
        0
    }
}

/// Whether an event suppression structure in DESC mode asks for a notification: the
/// position named by `event_off_wrap` (offset | wrap << 15) is among the `count`
/// descriptors that ended just before `new_off_wrap` (the notifying side's position, same
/// encoding), in a ring of `size`. A malformed event (offset outside the ring) asks for one:
/// a spurious notification is harmless, a lost one hangs the other side.
pub fn need_event(size: u16, event_off_wrap: u16, new_off_wrap: u16, count: u32) -> bool {
    let size = size as u32;
    let two = 2 * size;
    if count == 0 {
        return false;
    }
    if count >= two {
        return true;
    }
    let lin = |ow: u16| (ow & !EVENT_WRAP) as u32 + if ow & EVENT_WRAP != 0 { 0 } else { size };
    if (event_off_wrap & !EVENT_WRAP) as u32 >= size || (new_off_wrap & !EVENT_WRAP) as u32 >= size
    {
        return true;
    }
    let new = lin(new_off_wrap);
    let old = (new + two - count) % two;
    (lin(event_off_wrap) + two - old) % two < count
}

/// Host pointers to a queue's three areas, validated once at setup.
#[derive(Clone, Copy)]
struct Rings {
    size: u16,
    desc: NonNull<u8>,
    driver: NonNull<u8>,
    device: NonNull<u8>,
}

impl Rings {
    fn new(
        mem: &GuestMemory,
        size: u16,
        desc: GuestAddr,
        driver: GuestAddr,
        device: GuestAddr,
    ) -> Result<Self, RingError> {
        check_size(size)?;
        let l = PackedLayout::new(size);
        Ok(Rings {
            size,
            desc: mem.translate_aligned(desc, l.desc_len, 16)?,
            driver: mem.translate_aligned(driver, EVENT_LEN, 4)?,
            device: mem.translate_aligned(device, EVENT_LEN, 4)?,
        })
    }

    /// Byte offset of descriptor `index`, kept inside the ring whatever `index` is (all
    /// callers pass positions below `size`; the reduction only guards memory safety).
    fn desc_off(&self, index: u16) -> usize {
        let i = if index < self.size {
            index
        } else {
            index % self.size
        };
        i as usize * DESC_LEN as usize
    }

    /// The flags of descriptor `index`.
    fn flags(&self, index: u16) -> &AtomicU16 {
        // SAFETY: `desc_off` is inside the ring validated at setup; +14 is 2-aligned in a
        // 16-aligned ring; the mapping lives as long as the queue (which holds the
        // Arc<GuestMemory>).
        unsafe {
            &*self
                .desc
                .as_ptr()
                .add(self.desc_off(index) + 14)
                .cast::<AtomicU16>()
        }
    }

    /// Pointer to byte `field` of descriptor `index`.
    fn desc_ptr(&self, index: u16, field: usize) -> *mut u8 {
        // SAFETY: `desc_off` is inside the ring validated at setup and `field` < 16 (a
        // descriptor's size), so the pointer stays inside the mapping.
        unsafe { self.desc.as_ptr().add(self.desc_off(index) + field) }
    }

    /// Reads addr, len and id of descriptor `index` (after its flags were loaded), once.
    fn read_body(&self, index: u16) -> (u64, u32, u16) {
        // SAFETY: bytes 0..14 of a descriptor inside the ring validated at setup (16-aligned,
        // so each field is aligned).
        unsafe {
            (
                volatile::load_u64(self.desc_ptr(index, 0)),
                volatile::load_u32(self.desc_ptr(index, 8)),
                volatile::load_u16(self.desc_ptr(index, 12)),
            )
        }
    }

    /// Reads len and id of used descriptor `index` (after its flags were loaded), once.
    fn read_used_body(&self, index: u16) -> (u32, u16) {
        // SAFETY: bytes 8..14 of a descriptor inside the ring validated at setup.
        unsafe {
            (
                volatile::load_u32(self.desc_ptr(index, 8)),
                volatile::load_u16(self.desc_ptr(index, 12)),
            )
        }
    }

    /// Reads the buffer id of descriptor `index`, once.
    fn read_id(&self, index: u16) -> u16 {
        // SAFETY: bytes 12..14 of a descriptor inside the ring validated at setup.
        unsafe { volatile::load_u16(self.desc_ptr(index, 12)) }
    }

    /// Writes addr, len and id of descriptor `index` (its flags are stored separately).
    fn write_body(&self, index: u16, addr: u64, len: u32, id: u16) {
        // SAFETY: bytes 0..14 of a descriptor inside the ring validated at setup.
        unsafe {
            volatile::store_u64(self.desc_ptr(index, 0), addr);
            volatile::store_u32(self.desc_ptr(index, 8), len);
            volatile::store_u16(self.desc_ptr(index, 12), id);
        }
    }

    /// Writes len and id of a used descriptor (the address field is left alone).
    fn write_used_body(&self, index: u16, len: u32, id: u16) {
        // SAFETY: bytes 8..14 of a descriptor inside the ring validated at setup.
        unsafe {
            volatile::store_u32(self.desc_ptr(index, 8), len);
            volatile::store_u16(self.desc_ptr(index, 12), id);
        }
    }

    fn event(&self, base: NonNull<u8>) -> &AtomicU32 {
        // SAFETY: the 4-byte structure was validated (and 4-aligned) at setup; the
        // mapping lives as long as the queue.
        unsafe { &*base.as_ptr().cast::<AtomicU32>() }
    }

    /// The driver event suppression structure (driver writes, device reads).
    fn driver_event(&self) -> &AtomicU32 {
        self.event(self.driver)
    }

    /// The device event suppression structure (device writes, driver reads).
    fn device_event(&self) -> &AtomicU32 {
        self.event(self.device)
    }
}

/// An event suppression structure as one 32-bit value.
fn event_word(off_wrap: u16, flags: u16) -> u32 {
    off_wrap as u32 | (flags as u32) << 16
}

/// Splits an event suppression value into (off_wrap, flags); reserved flag bits are
/// ignored.
fn split_event(v: u32) -> (u16, u16) {
    (v as u16, (v >> 16) as u16 & 3)
}

/// One descriptor of an indirect table (or the ring), as read once from guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedDescriptor {
    /// Buffer guest address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// Buffer id.
    pub id: u16,
    /// `DESC_F_*` flags.
    pub flags: u16,
}

impl PackedDescriptor {
    /// The 16 little-endian bytes of this descriptor.
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.id.to_le_bytes());
        b[14..].copy_from_slice(&self.flags.to_le_bytes());
        b
    }

    /// Decodes 16 little-endian bytes.
    pub fn decode(b: &[u8; 16]) -> Self {
        PackedDescriptor {
            addr: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            id: u16::from_le_bytes([b[12], b[13]]),
            flags: u16::from_le_bytes([b[14], b[15]]),
        }
    }

    fn read(table: NonNull<u8>, index: u32) -> Self {
        let p = table.as_ptr().wrapping_add(index as usize * 16);
        // SAFETY: callers bound `index` by the table length validated at translation; each
        // field is read once.
        unsafe {
            PackedDescriptor {
                addr: volatile::load_u64(p),
                len: volatile::load_u32(p.add(8)),
                id: volatile::load_u16(p.add(12)),
                flags: volatile::load_u16(p.add(14)),
            }
        }
    }

    fn write(&self, table: NonNull<u8>, index: u32) {
        let p = table.as_ptr().wrapping_add(index as usize * 16);
        // SAFETY: callers bound `index` by the table length they validated.
        unsafe {
            volatile::store_u64(p, self.addr);
            volatile::store_u32(p.add(8), self.len);
            volatile::store_u16(p.add(12), self.id);
            volatile::store_u16(p.add(14), self.flags);
        }
    }
}

/// The last pops of a device queue, newest last, for `unpop`: a fixed ring of `size`
/// entries that overwrites its oldest (a `VecDeque` cost 23 instructions per pop).
struct PopLog {
    entries: Vec<(u16, Pos)>,
    /// Where the next entry goes.
    next: usize,
    /// Entries held, at most `entries.len()`.
    len: usize,
}

impl PopLog {
    fn new(size: usize) -> Self {
        PopLog {
            entries: vec![(0, Pos::START); size.max(1)],
            next: 0,
            len: 0,
        }
    }

    fn push(&mut self, e: (u16, Pos)) {
        if let Some(slot) = self.entries.get_mut(self.next) {
            *slot = e;
        }
        self.next = if self.next + 1 == self.entries.len() {
            0
        } else {
            self.next + 1
        };
        self.len = (self.len + 1).min(self.entries.len());
    }

    fn pop(&mut self) -> Option<(u16, Pos)> {
        self.len = self.len.checked_sub(1)?;
        self.next = self.next.checked_sub(1).unwrap_or(self.entries.len() - 1);
        self.entries.get(self.next).copied()
    }

    fn clear(&mut self) {
        self.len = 0;
    }
}

/// A used descriptor the device side has recorded and not yet written to the ring.
#[derive(Clone, Copy)]
struct StagedUsed {
    index: u16,
    len: u32,
    id: u16,
    flags: u16,
}

/// The device side of a packed queue: pops validated chains, returns used buffers, and
/// decides notifications. Everything it reads from the ring is checked before use.
///
/// A malformed chain is an error that leaves the queue where it was: the same error comes
/// back on every later pop (the device needs a reset).
pub struct PackedDeviceQueue {
    mem: Arc<GuestMemory>,
    rings: Rings,
    features: RingFeatures,
    next_avail: Pos,
    next_used: Pos,
    /// Descriptors each in-flight buffer id covers (0: not in flight), indexed by id.
    in_flight: Vec<u16>,
    /// Ring position each in-flight buffer id was popped at, indexed by id.
    popped_at: Vec<u16>,
    held: usize,
    /// Recent pops, newest last: (id, first position), for `unpop`.
    pop_log: PopLog,
    /// The unpublished batch's used descriptors, written to the ring together at publish,
    /// the first one's flags last: the driver spins on the batch's first line, and
    /// descriptors stored into it one at a time, with copies in between, would pull that
    /// line across and back once per store.
    staged: Vec<StagedUsed>,
    /// Descriptors the unpublished batch covers (for dirty logging).
    batch_descs: u32,
    /// Under IN_ORDER: whether the last staged used descriptor stands for a run of
    /// read-only buffers (length 0) that the next such buffer may join.
    zero_run: bool,
    /// Used descriptors advanced since the last notification check, and whether there was one.
    used_since_check: u32,
    checked: bool,
    /// What this side last wrote into the device event suppression structure.
    event_off_wrap: u16,
}

// SAFETY: the ring pointers point into mappings owned by `mem` (Send + Sync); the queue is
// used by one thread at a time.
unsafe impl Send for PackedDeviceQueue {}

impl PackedDeviceQueue {
    /// Sets up the device side over the descriptor ring and the two event suppression
    /// structures at the given guest addresses, which must lie in `mem` with the
    /// alignment the layout requires (16, 4, 4). Starts at a fresh queue's state.
    pub fn new(
        mem: Arc<GuestMemory>,
        size: u16,
        desc_ring: GuestAddr,
        driver_event: GuestAddr,
        device_event: GuestAddr,
        features: RingFeatures,
    ) -> Result<Self, RingError> {
        let rings = Rings::new(&mem, size, desc_ring, driver_event, device_event)?;
        Ok(PackedDeviceQueue {
            mem,
            rings,
            features,
            next_avail: Pos::START,
            next_used: Pos::START,
            in_flight: vec![0; size as usize],
            popped_at: vec![0; size as usize],
            held: 0,
            pop_log: PopLog::new(size as usize),
            staged: Vec::with_capacity(size as usize),
            batch_descs: 0,
            zero_run: false,
            used_since_check: 0,
            checked: false,
            event_off_wrap: 0,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.rings.size
    }

    /// Where the device stands: next available position and wrap counter, next used
    /// position and wrap counter.
    pub fn state(&self) -> PackedState {
        PackedState {
            avail_index: self.next_avail.index,
            avail_wrap: self.next_avail.wrap,
            used_index: self.next_used.index,
            used_wrap: self.next_used.wrap,
        }
    }

    /// Resumes a queue that already ran (what a stopped device reported, or what a front
    /// end restored), with nothing in flight. Indices must be below the queue size.
    pub fn set_state(&mut self, s: PackedState) -> Result<(), RingError> {
        for index in [s.avail_index, s.used_index] {
            if index >= self.rings.size {
                return Err(RingError::BadState {
                    index,
                    size: self.rings.size,
                });
            }
        }
        self.next_avail = Pos {
            index: s.avail_index,
            wrap: s.avail_wrap,
        };
        self.next_used = Pos {
            index: s.used_index,
            wrap: s.used_wrap,
        };
        self.in_flight.fill(0);
        self.held = 0;
        self.pop_log.clear();
        self.staged.clear();
        self.batch_descs = 0;
        self.zero_run = false;
        self.used_since_check = 0;
        self.checked = false;
        Ok(())
    }

    /// Chains popped and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.held
    }

    /// Whether a chain is available at the device's position (one acquire load).
    pub fn has_available(&self) -> bool {
        let f = self
            .rings
            .flags(self.next_avail.index)
            .load(Ordering::Acquire);
        is_avail(f, self.next_avail.wrap)
    }

    /// Pops the next available chain into `chain`; `Ok(false)` when none is available.
    /// `chain.head()` is then the buffer id to give [`PackedDeviceQueue::add_used`].
    pub fn pop(&mut self, chain: &mut Chain) -> Result<bool, RingError> {
        let start = self.next_avail;
        let flags = self.rings.flags(start.index).load(Ordering::Acquire);
        if !is_avail(flags, start.wrap) {
            return Ok(false);
        }
        let (end, id, count) = self.walk(start, flags, chain)?;
        self.in_flight[id as usize] = count;
        self.popped_at[id as usize] = start.index;
        self.held += 1;
        self.next_avail = end;
        self.pop_log.push((id, start));
        Ok(true)
    }

    /// Puts back the chain popped last, if it is still held (not completed): the next pop
    /// returns it again. Repeated calls put back earlier pops, newest first.
    pub fn unpop(&mut self) {
        let Some((id, start)) = self.pop_log.pop() else {
            return;
        };
        let n = self.in_flight.get(id as usize).copied().unwrap_or(0);
        if n > 0 && start.advanced(n, self.rings.size) == self.next_avail {
            self.in_flight[id as usize] = 0;
            self.held -= 1;
            self.next_avail = start;
        }
    }

    /// Walks the chain at `start` (whose flags, available, were read): returns the
    /// position after it, its buffer id and its descriptor count in the ring.
    fn walk(
        &self,
        start: Pos,
        first_flags: u16,
        chain: &mut Chain,
    ) -> Result<(Pos, u16, u16), RingError> {
        let size = self.rings.size;
        chain.reset(&self.mem, 0);
        let mut pos = start;
        let mut flags = first_flags;
        let mut count = 0u16;
        loop {
            let (addr, len, id) = self.rings.read_body(pos.index);
            count += 1;
            pos.advance(1, size);
            if flags & DESC_F_INDIRECT != 0 {
                if !self.features.indirect {
                    return Err(RingError::BadIndirect("feature not negotiated".into()));
                }
                if flags & DESC_F_NEXT != 0 {
                    return Err(RingError::BadIndirect("INDIRECT together with NEXT".into()));
                }
                if count > 1 {
                    return Err(RingError::BadIndirect(
                        "indirect descriptor inside a chain".into(),
                    ));
                }
                self.walk_table(addr, len, chain)?;
                return self.finish(chain, pos, id, count);
            }
            let ptr = self.mem.translate(GuestAddr(addr), len as u64)?;
            chain.push(ptr, len, flags & DESC_F_WRITE != 0)?;
            if flags & DESC_F_NEXT == 0 {
                return self.finish(chain, pos, id, count);
            }
            if count >= size {
                return Err(RingError::ChainTooLong(size as u32));
            }
            flags = self.rings.flags(pos.index).load(Ordering::Acquire);
            if !is_avail(flags, pos.wrap) {
                return Err(RingError::BadWrap {
                    index: pos.index,
                    wrap: pos.wrap,
                    flags,
                });
            }
        }
    }

    /// Resolves an indirect table: `len / 16` descriptors in order (NEXT is ignored
    /// there, as the spec says; INDIRECT is refused).
    fn walk_table(&self, addr: u64, len: u32, chain: &mut Chain) -> Result<(), RingError> {
        if len == 0 || !(len as u64).is_multiple_of(DESC_LEN) || len / 16 > MAX_INDIRECT {
            return Err(RingError::BadIndirect(format!("table length {len}")));
        }
        let table = self.mem.translate(GuestAddr(addr), len as u64)?;
        for i in 0..len / 16 {
            let d = PackedDescriptor::read(table, i);
            if d.flags & DESC_F_INDIRECT != 0 {
                return Err(RingError::NestedIndirect);
            }
            let ptr = self.mem.translate(GuestAddr(d.addr), d.len as u64)?;
            chain.push(ptr, d.len, d.flags & DESC_F_WRITE != 0)?;
        }
        Ok(())
    }

    fn finish(
        &self,
        chain: &mut Chain,
        end: Pos,
        id: u16,
        count: u16,
    ) -> Result<(Pos, u16, u16), RingError> {
        match self.in_flight.get(id as usize) {
            None => Err(RingError::BadBufferId {
                id,
                size: self.rings.size,
            }),
            Some(&n) if n > 0 => Err(RingError::IdInFlight(id)),
            Some(_) => {
                chain.set_head(id);
                Ok((end, id, count))
            }
        }
    }

    /// Records a used buffer by id (not visible to the driver until
    /// [`PackedDeviceQueue::publish_used`]). The used descriptor goes at the device's used
    /// position, which then skips the chain's descriptor count.
    ///
    /// Under VIRTIO_F_IN_ORDER, a read-only buffer (`len` 0) that follows another one in
    /// the same unpublished batch, at the very next position, writes no descriptor of its
    /// own: it takes over the used descriptor of that run (its id replaces the one there),
    /// as the spec allows and DPDK's vhost does. The driver then frees every buffer up to
    /// that id. A run of eight transmitted frames writes one descriptor line instead of
    /// two; on the 2-core test machine that measured level, so this is here for drivers
    /// to be tested against, not for speed (perf/RESULTS.md, 2026-12-05 evening).
    pub fn add_used(&mut self, id: u16, len: u32) -> Result<(), RingError> {
        let n = match self.in_flight.get(id as usize) {
            Some(&n) if n > 0 => n,
            _ => return Err(RingError::NotInFlight(id)),
        };
        self.in_flight[id as usize] = 0;
        self.held -= 1;
        let pos = self.next_used;
        let in_order_zero =
            self.features.in_order && len == 0 && self.popped_at[id as usize] == pos.index;
        if in_order_zero && self.zero_run {
            // The run's descriptor is the last one staged.
            if let Some(last) = self.staged.last_mut() {
                last.id = id;
            }
            self.advance_used(n);
            return Ok(());
        }
        self.zero_run = in_order_zero;
        self.staged.push(StagedUsed {
            index: pos.index,
            len,
            id,
            flags: used_bits(pos.wrap),
        });
        self.advance_used(n);
        Ok(())
    }

    /// Moves the used position past a chain of `n` descriptors.
    fn advance_used(&mut self, n: u16) {
        self.batch_descs = self.batch_descs.saturating_add(n as u32);
        self.used_since_check = self.used_since_check.saturating_add(n as u32);
        self.next_used.advance(n, self.rings.size);
    }

    /// Writes the used descriptors added so far, back to back, and makes them visible with
    /// one release store: the flags of the batch's first, written after all the others.
    pub fn publish_used(&mut self) {
        self.zero_run = false;
        let Some(&head) = self.staged.first() else {
            return;
        };
        self.rings.write_used_body(head.index, head.len, head.id);
        for d in &self.staged[1..] {
            self.rings.write_used_body(d.index, d.len, d.id);
            self.rings.flags(d.index).store(d.flags, Ordering::Relaxed);
        }
        self.rings
            .flags(head.index)
            .store(head.flags, Ordering::Release);
        self.staged.clear();
        self.mark_batch(head.index);
    }

    /// Logs the descriptors the batch starting at ring index `start` wrote into (when dirty
    /// logging is on).
    fn mark_batch(&mut self, start: u16) {
        let size = self.rings.size as u32;
        let n = std::mem::take(&mut self.batch_descs).min(size);
        let start = start as u32;
        let first = n.min(size - start);
        let base = self.rings.desc.as_ptr();
        // SAFETY (both): pointer arithmetic inside the ring (no dereference).
        self.mem.mark_host(
            unsafe { base.add(start as usize * 16) },
            first as usize * 16,
        );
        if n > first {
            self.mem.mark_host(base, (n - first) as usize * 16);
        }
    }

    /// After publishing: whether the driver asked to be notified of the used buffers
    /// published since the last check (driver event suppression: ENABLE, DISABLE, or with
    /// EVENT_IDX a descriptor position). The first check in DESC mode always notifies.
    pub fn needs_notification(&mut self) -> bool {
        fence(Ordering::SeqCst);
        let (off_wrap, flags) = split_event(self.rings.driver_event().load(Ordering::Relaxed));
        let count = std::mem::take(&mut self.used_since_check);
        let checked = std::mem::replace(&mut self.checked, true);
        if self.features.event_idx && flags == EVENT_F_DESC {
            if !checked {
                return true;
            }
            need_event(self.rings.size, off_wrap, self.next_used.off_wrap(), count)
        } else {
            flags != EVENT_F_DISABLE
        }
    }

    fn store_device_event(&mut self, off_wrap: u16, flags: u16) {
        self.event_off_wrap = off_wrap;
        self.rings
            .device_event()
            .store(event_word(off_wrap, flags), Ordering::Relaxed);
        self.mem
            .mark_host(self.rings.device.as_ptr(), EVENT_LEN as usize);
    }

    /// Asks the driver not to kick (while the device polls).
    pub fn disable_notifications(&mut self) {
        self.store_device_event(self.event_off_wrap, EVENT_F_DISABLE);
    }

    /// Asks the driver to kick on its next buffer (with EVENT_IDX: on the descriptor at the
    /// device's position), then re-checks the ring: returns `Ok(true)` when work arrived
    /// meanwhile (keep polling instead of sleeping).
    pub fn enable_notifications(&mut self) -> Result<bool, RingError> {
        if self.features.event_idx {
            self.store_device_event(self.next_avail.off_wrap(), EVENT_F_DESC);
        } else {
            self.store_device_event(self.event_off_wrap, EVENT_F_ENABLE);
        }
        fence(Ordering::SeqCst);
        Ok(self.has_available())
    }
}

/// The driver side of a packed queue: adds chains, publishes them, decides kicks, and
/// collects used buffers. It trusts none of the device's writes either.
pub struct PackedDriverQueue {
    mem: Arc<GuestMemory>,
    rings: Rings,
    addrs: (GuestAddr, GuestAddr, GuestAddr),
    features: RingFeatures,
    /// Free buffer ids (a stack with capacity `size`). Unused under IN_ORDER, where a
    /// chain's id is its head's ring index: the device returns chains in ring order, so
    /// the oldest in flight is always the one at the used position, and no list of ids in
    /// flight is kept.
    free_ids: Vec<u16>,
    /// Descriptors each buffer id holds (0: free).
    desc_count: Vec<u16>,
    /// Under IN_ORDER: the id and length of a used descriptor that stands for the buffers
    /// in flight up to and including that id; they are handed out one by one, oldest first.
    used_through: Option<(u16, u32)>,
    free_descs: u16,
    chains: usize,
    next_avail: Pos,
    last_used: Pos,
    /// First head of the unpublished batch: (index, flags), stored last.
    pending_head: Option<(u16, u16)>,
    /// Descriptors added since the last kick check.
    added_since_check: u32,
    /// What this side last wrote into the driver event suppression structure.
    event_off_wrap: u16,
}

// SAFETY: as for PackedDeviceQueue.
unsafe impl Send for PackedDriverQueue {}

impl PackedDriverQueue {
    /// Sets up the driver side and zeroes the descriptor ring and both event suppression
    /// structures.
    pub fn new(
        mem: Arc<GuestMemory>,
        size: u16,
        desc_ring: GuestAddr,
        driver_event: GuestAddr,
        device_event: GuestAddr,
        features: RingFeatures,
    ) -> Result<Self, RingError> {
        let rings = Rings::new(&mem, size, desc_ring, driver_event, device_event)?;
        mem.zero(desc_ring, PackedLayout::new(size).desc_len)?;
        mem.zero(driver_event, EVENT_LEN)?;
        mem.zero(device_event, EVENT_LEN)?;
        Ok(PackedDriverQueue {
            mem,
            rings,
            addrs: (desc_ring, driver_event, device_event),
            features,
            free_ids: (0..size).rev().collect(),
            desc_count: vec![0; size as usize],
            used_through: None,
            free_descs: size,
            chains: 0,
            next_avail: Pos::START,
            last_used: Pos::START,
            pending_head: None,
            added_since_check: 0,
            event_off_wrap: 0,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.rings.size
    }

    /// Where the driver stands: its next available position and wrap counter, and the
    /// next used position it reads with the wrap counter it expects there.
    pub fn state(&self) -> PackedState {
        PackedState {
            avail_index: self.next_avail.index,
            avail_wrap: self.next_avail.wrap,
            used_index: self.last_used.index,
            used_wrap: self.last_used.wrap,
        }
    }

    /// Moves the queue to another mapping of the same guest addresses (the driver's memory
    /// was copied elsewhere), keeping every position and chain in flight.
    pub fn remap(&mut self, mem: Arc<GuestMemory>) -> Result<(), RingError> {
        let (d, a, u) = self.addrs;
        self.rings = Rings::new(&mem, self.rings.size, d, a, u)?;
        self.mem = mem;
        Ok(())
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free_descs as usize
    }

    /// Chains added and not yet returned by the device.
    pub fn in_flight(&self) -> usize {
        self.chains
    }

    /// Stores a head's flags now, or last at publish when it is the batch's first.
    fn expose_head(&mut self, index: u16, flags: u16) {
        if self.pending_head.is_none() {
            self.pending_head = Some((index, flags));
        } else {
            self.rings.flags(index).store(flags, Ordering::Relaxed);
        }
    }

    /// Takes a buffer id for a chain of `ndesc` descriptors whose head goes at the next
    /// available position (the caller checked there are that many free descriptors).
    fn take_id(&mut self, ndesc: u16) -> Option<u16> {
        let id = if self.features.in_order {
            self.next_avail.index
        } else {
            self.free_ids.pop()?
        };
        self.desc_count[id as usize] = ndesc;
        self.free_descs -= ndesc;
        self.chains += 1;
        self.added_since_check = self.added_since_check.saturating_add(ndesc as u32);
        Some(id)
    }

    /// Adds a chain of direct descriptors; returns its buffer id, or `None` if the ring
    /// lacks free descriptors. Not visible to the device until [`PackedDriverQueue::publish`].
    pub fn add(&mut self, segs: &[Segment]) -> Option<u16> {
        if segs.is_empty() || segs.len() > self.free_descs as usize {
            return None;
        }
        let n = segs.len() as u16;
        let head = self.next_avail;
        let id = self.take_id(n)?;
        let mut pos = head;
        let mut head_flags = 0;
        for (i, s) in segs.iter().enumerate() {
            let mut flags = avail_bits(pos.wrap);
            if s.writable {
                flags |= DESC_F_WRITE;
            }
            if i + 1 < segs.len() {
                flags |= DESC_F_NEXT;
            }
            self.rings.write_body(pos.index, s.addr.0, s.len, id);
            if i == 0 {
                head_flags = flags;
            } else {
                self.rings.flags(pos.index).store(flags, Ordering::Relaxed);
            }
            pos.advance(1, self.rings.size);
        }
        self.next_avail = pos;
        self.expose_head(head.index, head_flags);
        Some(id)
    }

    /// Adds a chain through an indirect table the caller placed at `table` (room for
    /// `segs.len()` descriptors); uses one ring descriptor. A table of more than
    /// [`MAX_INDIRECT`] descriptors, which no device side accepts, is an error.
    pub fn add_indirect(
        &mut self,
        table: GuestAddr,
        segs: &[Segment],
    ) -> Result<Option<u16>, RingError> {
        if segs.len() > MAX_INDIRECT as usize {
            return Err(RingError::BadIndirect(format!(
                "{} descriptors in one table, at most {MAX_INDIRECT}",
                segs.len()
            )));
        }
        if segs.is_empty() || self.free_descs == 0 {
            return Ok(None);
        }
        let tlen = segs.len() as u64 * DESC_LEN;
        let tptr = self.mem.translate(table, tlen)?;
        for (i, s) in segs.iter().enumerate() {
            PackedDescriptor {
                addr: s.addr.0,
                len: s.len,
                id: 0,
                flags: if s.writable { DESC_F_WRITE } else { 0 },
            }
            .write(tptr, i as u32);
        }
        let Some(id) = self.take_id(1) else {
            return Ok(None);
        };
        let head = self.next_avail;
        self.rings.write_body(head.index, table.0, tlen as u32, id);
        self.next_avail.advance(1, self.rings.size);
        self.expose_head(head.index, DESC_F_INDIRECT | avail_bits(head.wrap));
        Ok(Some(id))
    }

    /// Makes every chain added so far visible with one release store: the flags of the
    /// batch's first head, written after everything else.
    pub fn publish(&mut self) {
        if let Some((index, flags)) = self.pending_head.take() {
            self.rings.flags(index).store(flags, Ordering::Release);
        }
    }

    /// After publishing: whether the device asked to be kicked for the descriptors added
    /// since the last check (device event suppression: ENABLE, DISABLE, or with EVENT_IDX a
    /// descriptor position).
    pub fn needs_kick(&mut self) -> bool {
        fence(Ordering::SeqCst);
        let (off_wrap, flags) = split_event(self.rings.device_event().load(Ordering::Relaxed));
        let count = std::mem::take(&mut self.added_since_check);
        if self.features.event_idx && flags == EVENT_F_DESC {
            need_event(self.rings.size, off_wrap, self.next_avail.off_wrap(), count)
        } else {
            flags != EVENT_F_DISABLE
        }
    }

    /// Takes the next used buffer: its id and the length the device wrote.
    ///
    /// Under VIRTIO_F_IN_ORDER one used descriptor may stand for every buffer in flight up
    /// to its id (the device skipped the others' descriptors): they come back one per
    /// call, oldest first, with length 0 (the last with the length written).
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>, RingError> {
        if let Some(last) = self.used_through {
            return self.release_oldest(last).map(Some);
        }
        let pos = self.last_used;
        let flags = self.rings.flags(pos.index).load(Ordering::Acquire);
        if !is_used(flags, pos.wrap) {
            return Ok(None);
        }
        let (len, id) = self.rings.read_used_body(pos.index);
        if !matches!(self.desc_count.get(id as usize), Some(&n) if n > 0) {
            return Err(RingError::BadUsedId(id as u32));
        }
        if self.features.in_order {
            return self.release_oldest((id, len)).map(Some);
        }
        self.release(id);
        Ok(Some((id, len)))
    }

    /// Right after the driver took the first used descriptor of a cache line: calls `f`
    /// with the id of each of the next `ahead` descriptors the device has marked used,
    /// stopping at the first it has not, for prefetching their buffers. Up to 3 (the rest
    /// of a line) it reads only the line the driver already holds, unless the ring ends
    /// within them; beyond, it reads the next lines early, which costs a transfer when the
    /// device is still writing them. A hint, unvalidated (`pop_used` checks each id when
    /// it gets there).
    pub fn peek_used_ahead(&self, ahead: u16, mut f: impl FnMut(u16)) {
        let size = self.rings.size;
        let just = self.last_used.index.checked_sub(1).unwrap_or(size - 1);
        let line_start =
            (self.rings.desc.as_ptr() as usize + self.rings.desc_off(just)).is_multiple_of(64);
        if !line_start {
            return;
        }
        let mut pos = self.last_used;
        // Never back onto the descriptor just taken (a ring shorter than `ahead`).
        for _ in 0..ahead.min(size - 1) {
            let flags = self.rings.flags(pos.index).load(Ordering::Relaxed);
            if !is_used(flags, pos.wrap) {
                break;
            }
            let id = self.rings.read_id(pos.index);
            if id < size {
                f(id);
            }
            pos.advance(1, size);
        }
    }

    /// The buffer id the device will most likely mark used next: the oldest in flight
    /// under IN_ORDER, otherwise the id the driver wrote into the next used slot (a device
    /// completing in order returns it there). A hint for prefetching while waiting, not
    /// validated.
    pub fn next_used_hint(&self) -> Option<u16> {
        if self.features.in_order {
            return Some(self.last_used.index);
        }
        let id = self.rings.read_id(self.last_used.index);
        (id < self.rings.size).then_some(id)
    }

    /// Under IN_ORDER: frees the oldest buffer in flight, which the used descriptor
    /// `(id, len)` of a buffer in flight covers, and returns its id and length: `len` if it
    /// is that buffer, 0 if it comes before it.
    fn release_oldest(&mut self, last: (u16, u32)) -> Result<(u16, u32), RingError> {
        let oldest = self.last_used.index;
        if self.desc_count[oldest as usize] == 0 {
            return Err(RingError::BadUsedId(last.0 as u32));
        }
        self.release(oldest);
        if oldest == last.0 {
            self.used_through = None;
            Ok((oldest, last.1))
        } else {
            self.used_through = Some(last);
            Ok((oldest, 0))
        }
    }

    /// Frees buffer `id` (in flight) and moves the used position past its descriptors.
    fn release(&mut self, id: u16) {
        let n = std::mem::take(&mut self.desc_count[id as usize]);
        if !self.features.in_order {
            self.free_ids.push(id);
        }
        self.free_descs += n;
        self.chains -= 1;
        self.last_used.advance(n, self.rings.size);
    }

    fn store_driver_event(&mut self, off_wrap: u16, flags: u16) {
        self.event_off_wrap = off_wrap;
        self.rings
            .driver_event()
            .store(event_word(off_wrap, flags), Ordering::Relaxed);
    }

    /// Asks the device to notify on the next used buffer (with EVENT_IDX: on the used
    /// descriptor at the driver's position), then re-checks: `true` when used buffers are
    /// already waiting (do not sleep).
    pub fn enable_interrupts(&mut self) -> bool {
        if self.features.event_idx {
            self.store_driver_event(self.last_used.off_wrap(), EVENT_F_DESC);
        } else {
            self.store_driver_event(self.event_off_wrap, EVENT_F_ENABLE);
        }
        fence(Ordering::SeqCst);
        let f = self
            .rings
            .flags(self.last_used.index)
            .load(Ordering::Acquire);
        self.used_through.is_some() || is_used(f, self.last_used.wrap)
    }

    /// Asks the device not to notify (while the driver polls).
    pub fn disable_interrupts(&mut self) {
        self.store_driver_event(self.event_off_wrap, EVENT_F_DISABLE);
    }

    /// The memory this queue lives in.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }
}

#[cfg(test)]
mod tests {
    use super::{PopLog, Pos};

    #[test]
    fn pop_log_keeps_the_newest_entries_and_hands_them_back_newest_first() {
        let at = |index| Pos { index, wrap: true };
        let mut log = PopLog::new(3);
        assert_eq!(log.pop(), None);
        for id in 0..5u16 {
            log.push((id, at(id)));
        }
        // Five pushed into three places: 4, 3, 2 come back; 1 and 0 were overwritten.
        assert_eq!(log.pop(), Some((4, at(4))));
        assert_eq!(log.pop(), Some((3, at(3))));
        log.push((7, at(7)));
        assert_eq!(log.pop(), Some((7, at(7))));
        assert_eq!(log.pop(), Some((2, at(2))));
        assert_eq!(log.pop(), None);
        log.push((9, at(9)));
        log.clear();
        assert_eq!(log.pop(), None);
    }
}
