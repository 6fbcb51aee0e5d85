//! Shared helpers for the shm-ring integration tests: one sealed memfd mapped twice (the
//! driver's and the device's view, as two processes would map it), ring placement, raw
//! ring access for hostile tests, and a small deterministic RNG.

#![allow(dead_code)]

use std::sync::Arc;
use vmdev_shm_ring::split::{RingFeatures, SplitLayout};
use vmdev_shm_ring::{create_sealed_memfd, DeviceQueue, DriverQueue, GuestAddr, GuestMemory};

/// Guest address of the first region.
pub const BASE: u64 = 0x10000;
/// Size of the first region.
pub const MEM_SIZE: u64 = 2 << 20;

pub const NO_FEATURES: RingFeatures = RingFeatures {
    event_idx: false,
    indirect: false,
    in_order: false,
};
pub const ALL_FEATURES: RingFeatures = RingFeatures {
    event_idx: true,
    indirect: true,
    in_order: false,
};

pub fn features(event_idx: bool, indirect: bool) -> RingFeatures {
    RingFeatures {
        event_idx,
        indirect,
        in_order: false,
    }
}

/// `f` with VIRTIO_F_IN_ORDER set to `in_order`.
pub fn with_in_order(f: RingFeatures, in_order: bool) -> RingFeatures {
    RingFeatures { in_order, ..f }
}

/// Maps regions `(guest_addr, size)` twice; each region is its own sealed memfd, and the
/// second mapping uses a dup of the fd (`try_clone`), like a second process would.
pub fn map_twice(regions: &[(u64, u64)]) -> (Arc<GuestMemory>, Arc<GuestMemory>) {
    let mut a = GuestMemory::new();
    let mut b = GuestMemory::new();
    for &(addr, size) in regions {
        let fd = create_sealed_memfd("shm-ring-test", size).unwrap();
        let fd2 = fd.try_clone().unwrap();
        a.add_region(fd, GuestAddr(addr), size, 0).unwrap();
        b.add_region(fd2, GuestAddr(addr), size, 0).unwrap();
    }
    (Arc::new(a), Arc::new(b))
}

/// One queue's rings placed with `SplitLayout::packed_offsets` at `BASE`, followed by a
/// data area, in one region mapped twice.
pub struct Rig {
    pub size: u16,
    pub drv_mem: Arc<GuestMemory>,
    pub dev_mem: Arc<GuestMemory>,
    pub desc: GuestAddr,
    pub avail: GuestAddr,
    pub used: GuestAddr,
    /// First byte of the data area (4096-aligned, after the rings).
    pub data: u64,
    /// One past the last byte of the first region.
    pub end: u64,
}

impl Rig {
    pub fn new(size: u16) -> Rig {
        Self::with_regions(size, &[(BASE, MEM_SIZE)])
    }

    /// Where `Rig::new(size)` puts its data area.
    pub fn new_layout_data(size: u16) -> u64 {
        let (_, _, _, total) = SplitLayout::new(size).packed_offsets();
        (BASE + total + 4095) & !4095
    }

    /// Rings at the start of the first region; further regions are just mapped.
    pub fn with_regions(size: u16, regions: &[(u64, u64)]) -> Rig {
        let (drv_mem, dev_mem) = map_twice(regions);
        let (d, a, u, total) = SplitLayout::new(size).packed_offsets();
        let base = regions[0].0;
        Rig {
            size,
            drv_mem,
            dev_mem,
            desc: GuestAddr(base + d),
            avail: GuestAddr(base + a),
            used: GuestAddr(base + u),
            data: (base + total + 4095) & !4095,
            end: base + regions[0].1,
        }
    }

    pub fn driver(&self, f: RingFeatures) -> DriverQueue {
        DriverQueue::new(
            self.drv_mem.clone(),
            self.size,
            self.desc,
            self.avail,
            self.used,
            f,
        )
        .unwrap()
    }

    pub fn device(&self, f: RingFeatures) -> DeviceQueue {
        DeviceQueue::new(
            self.dev_mem.clone(),
            self.size,
            self.desc,
            self.avail,
            self.used,
            f,
        )
        .unwrap()
    }

    // ---- raw ring access (through the driver's mapping) ----

    pub fn w16(&self, addr: u64, v: u16) {
        self.drv_mem
            .write(GuestAddr(addr), &v.to_le_bytes())
            .unwrap();
    }
    pub fn r16(&self, addr: u64) -> u16 {
        let mut b = [0u8; 2];
        self.drv_mem.read(GuestAddr(addr), &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    /// Writes descriptor `i` of the table at `table`.
    pub fn write_desc_at(&self, table: u64, i: u32, addr: u64, len: u32, flags: u16, next: u16) {
        self.drv_mem
            .write(
                GuestAddr(table + 16 * i as u64),
                &encode_desc(addr, len, flags, next),
            )
            .unwrap();
    }
    /// Writes descriptor `i` of the queue's descriptor table.
    pub fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.write_desc_at(self.desc.0, i as u32, addr, len, flags, next);
    }
    pub fn set_avail_entry(&self, slot: u16, head: u16) {
        self.w16(self.avail.0 + 4 + 2 * (slot & (self.size - 1)) as u64, head);
    }
    pub fn set_avail_idx(&self, idx: u16) {
        self.w16(self.avail.0 + 2, idx);
    }
    pub fn avail_idx(&self) -> u16 {
        self.r16(self.avail.0 + 2)
    }
    pub fn avail_flags(&self) -> u16 {
        self.r16(self.avail.0)
    }
    pub fn used_event(&self) -> u16 {
        self.r16(self.avail.0 + 4 + 2 * self.size as u64)
    }
    pub fn set_used_event(&self, v: u16) {
        self.w16(self.avail.0 + 4 + 2 * self.size as u64, v)
    }
    pub fn used_flags(&self) -> u16 {
        self.r16(self.used.0)
    }
    pub fn used_idx(&self) -> u16 {
        self.r16(self.used.0 + 2)
    }
    pub fn set_used_idx(&self, v: u16) {
        self.w16(self.used.0 + 2, v)
    }
    pub fn avail_event(&self) -> u16 {
        self.r16(self.used.0 + 4 + 8 * self.size as u64)
    }
    pub fn set_avail_event(&self, v: u16) {
        self.w16(self.used.0 + 4 + 8 * self.size as u64, v)
    }
    pub fn set_used_elem(&self, slot: u16, id: u32, len: u32) {
        let off = self.used.0 + 4 + 8 * (slot & (self.size - 1)) as u64;
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&id.to_le_bytes());
        b[4..].copy_from_slice(&len.to_le_bytes());
        self.drv_mem.write(GuestAddr(off), &b).unwrap();
    }
    pub fn used_elem(&self, slot: u16) -> (u32, u32) {
        let off = self.used.0 + 4 + 8 * (slot & (self.size - 1)) as u64;
        let mut b = [0u8; 8];
        self.drv_mem.read(GuestAddr(off), &mut b).unwrap();
        (
            u32::from_le_bytes(b[..4].try_into().unwrap()),
            u32::from_le_bytes(b[4..].try_into().unwrap()),
        )
    }

    /// Reads `len` bytes of guest memory (driver's view).
    pub fn read_vec(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.drv_mem.read(GuestAddr(addr), &mut v).unwrap();
        v
    }
}

/// The 16 little-endian bytes of a split-ring descriptor.
pub fn encode_desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..].copy_from_slice(&next.to_le_bytes());
    b
}

/// xorshift64*: deterministic, dependency-free randomness for non-proptest tests.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn range(&mut self, lo: u64, hi_inclusive: u64) -> u64 {
        lo + self.below(hi_inclusive - lo + 1)
    }
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}
pub mod harness;
