//! Shared helpers for the packed-ring integration tests: the packed rings placed in one
//! sealed memfd mapped twice (see `common`), raw ring access for hostile tests, and a
//! driver/device harness checked against a model (the packed twin of `common::harness`).
//! Test files declare `mod common; mod packed_common;`.

#![allow(dead_code)]

use crate::common::{map_twice, Rng, BASE, MEM_SIZE};
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use vmdev_shm_ring::packed::{PackedDescriptor, PackedLayout, DESC_F_AVAIL, DESC_F_USED};
use vmdev_shm_ring::split::{RingFeatures, Segment};
use vmdev_shm_ring::{Chain, GuestAddr, GuestMemory, PackedDeviceQueue, PackedDriverQueue};

/// One packed queue placed with `PackedLayout::packed_offsets` at the start of the first
/// region, followed by a data area, in regions mapped twice.
pub struct PackedRig {
    pub size: u16,
    pub drv_mem: Arc<GuestMemory>,
    pub dev_mem: Arc<GuestMemory>,
    pub desc: GuestAddr,
    pub driver_ev: GuestAddr,
    pub device_ev: GuestAddr,
    /// First byte of the data area (4096-aligned, after the rings).
    pub data: u64,
    /// One past the last byte of the first region.
    pub end: u64,
}

/// AVAIL/USED bits of an available descriptor for wrap counter `wrap`.
pub fn avail(wrap: bool) -> u16 {
    if wrap {
        DESC_F_AVAIL
    } else {
        DESC_F_USED
    }
}

/// AVAIL/USED bits of a used descriptor for wrap counter `wrap`.
pub fn used(wrap: bool) -> u16 {
    if wrap {
        DESC_F_AVAIL | DESC_F_USED
    } else {
        0
    }
}

impl PackedRig {
    pub fn new(size: u16) -> PackedRig {
        Self::with_regions(size, &[(BASE, MEM_SIZE)])
    }

    /// Where `PackedRig::new(size)` puts its data area.
    pub fn new_layout_data(size: u16) -> u64 {
        let (_, _, _, total) = PackedLayout::new(size).packed_offsets();
        (BASE + total + 4095) & !4095
    }

    pub fn with_regions(size: u16, regions: &[(u64, u64)]) -> PackedRig {
        let (drv_mem, dev_mem) = map_twice(regions);
        let (d, a, u, total) = PackedLayout::new(size).packed_offsets();
        let base = regions[0].0;
        PackedRig {
            size,
            drv_mem,
            dev_mem,
            desc: GuestAddr(base + d),
            driver_ev: GuestAddr(base + a),
            device_ev: GuestAddr(base + u),
            data: (base + total + 4095) & !4095,
            end: base + regions[0].1,
        }
    }

    pub fn driver(&self, f: RingFeatures) -> PackedDriverQueue {
        PackedDriverQueue::new(
            self.drv_mem.clone(),
            self.size,
            self.desc,
            self.driver_ev,
            self.device_ev,
            f,
        )
        .unwrap()
    }

    pub fn device(&self, f: RingFeatures) -> PackedDeviceQueue {
        PackedDeviceQueue::new(
            self.dev_mem.clone(),
            self.size,
            self.desc,
            self.driver_ev,
            self.device_ev,
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
    pub fn write_desc_at(&self, table: u64, i: u32, addr: u64, len: u32, id: u16, flags: u16) {
        let d = PackedDescriptor {
            addr,
            len,
            id,
            flags,
        };
        self.drv_mem
            .write(GuestAddr(table + 16 * i as u64), &d.encode())
            .unwrap();
    }
    /// Writes descriptor `i` of the ring (flags exactly as given).
    pub fn write_desc(&self, i: u16, addr: u64, len: u32, id: u16, flags: u16) {
        self.write_desc_at(self.desc.0, i as u32, addr, len, id, flags);
    }
    /// Reads descriptor `i` of the ring.
    pub fn desc_at(&self, i: u16) -> PackedDescriptor {
        let mut b = [0u8; 16];
        self.drv_mem
            .read(GuestAddr(self.desc.0 + 16 * i as u64), &mut b)
            .unwrap();
        PackedDescriptor::decode(&b)
    }
    pub fn set_flags(&self, i: u16, flags: u16) {
        self.w16(self.desc.0 + 16 * i as u64 + 14, flags);
    }
    /// (off_wrap, flags) of the driver event suppression structure.
    pub fn driver_event(&self) -> (u16, u16) {
        (self.r16(self.driver_ev.0), self.r16(self.driver_ev.0 + 2))
    }
    pub fn set_driver_event(&self, off_wrap: u16, flags: u16) {
        self.w16(self.driver_ev.0, off_wrap);
        self.w16(self.driver_ev.0 + 2, flags);
    }
    /// (off_wrap, flags) of the device event suppression structure.
    pub fn device_event(&self) -> (u16, u16) {
        (self.r16(self.device_ev.0), self.r16(self.device_ev.0 + 2))
    }
    pub fn set_device_event(&self, off_wrap: u16, flags: u16) {
        self.w16(self.device_ev.0, off_wrap);
        self.w16(self.device_ev.0 + 2, flags);
    }

    /// Reads `len` bytes of guest memory (driver's view).
    pub fn read_vec(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.drv_mem.read(GuestAddr(addr), &mut v).unwrap();
        v
    }
}

/// Bytes of data area reserved for each chain in flight (segments and indirect table).
pub const SLOT_LEN: u64 = 4096;
/// Largest segment the generators produce, and most segments per chain (see harness.rs).
pub const MAX_SEG_LEN: u32 = 400;
pub const MAX_SEGS: usize = 8;
const SENTINEL: u8 = 0xEE;

pub use crate::common::harness::ChainSpec;

#[derive(Debug)]
struct Sent {
    id: u16,
    slot: usize,
    ndesc: usize,
    nsegs: usize,
    readable: Vec<u8>,
    writable: Vec<(u64, u32)>,
    writable_len: u32,
}

struct Done {
    sent: Sent,
    written: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub added: u64,
    pub added_indirect: u64,
    pub refused: u64,
    pub popped: u64,
    pub reaped: u64,
    pub unpopped: u64,
    /// Times the device's avail wrap counter flipped.
    pub avail_wraps: u64,
    /// Times the device's used wrap counter flipped.
    pub used_wraps: u64,
}

/// A packed driver and device over the same rings, driven step by step against a model.
pub struct PackedHarness {
    pub rig: PackedRig,
    pub drv: PackedDriverQueue,
    pub dev: PackedDeviceQueue,
    pub rng: Rng,
    pub stats: Stats,
    free_slots: Vec<usize>,
    unpublished: VecDeque<Sent>,
    published: VecDeque<Sent>,
    popped: Vec<(Sent, Chain)>,
    used_unpublished: VecDeque<Done>,
    used_published: VecDeque<Done>,
    chain_pool: Vec<Chain>,
    /// VIRTIO_F_IN_ORDER: the device completes the oldest held chain first.
    in_order: bool,
}

impl PackedHarness {
    pub fn new(size: u16, features: RingFeatures, seed: u64) -> PackedHarness {
        let rig = PackedRig::new(size);
        let drv = rig.driver(features);
        let dev = rig.device(features);
        let nslots = ((rig.end - rig.data) / SLOT_LEN).min(size as u64) as usize;
        PackedHarness {
            drv,
            dev,
            rng: Rng::new(seed),
            stats: Stats::default(),
            free_slots: (0..nslots).rev().collect(),
            unpublished: VecDeque::new(),
            published: VecDeque::new(),
            popped: Vec::new(),
            used_unpublished: VecDeque::new(),
            used_published: VecDeque::new(),
            chain_pool: Vec::new(),
            in_order: features.in_order,
            rig,
        }
    }

    fn in_flight(&self) -> impl Iterator<Item = &Sent> {
        self.unpublished
            .iter()
            .chain(self.published.iter())
            .chain(self.popped.iter().map(|(s, _)| s))
            .chain(self.used_unpublished.iter().map(|d| &d.sent))
            .chain(self.used_published.iter().map(|d| &d.sent))
    }

    pub fn chains_in_flight(&self) -> usize {
        self.in_flight().count()
    }

    pub fn held_by_device(&self) -> usize {
        self.popped.len()
    }

    /// Checks descriptor, id and chain accounting on both sides.
    pub fn check_accounting(&self) {
        let ndesc: usize = self.in_flight().map(|s| s.ndesc).sum();
        assert_eq!(
            self.drv.free_descriptors() + ndesc,
            self.rig.size as usize,
            "descriptor leak or double free"
        );
        assert_eq!(self.drv.in_flight(), self.chains_in_flight());
        assert_eq!(self.dev.in_flight(), self.popped.len());
        let ids: HashSet<u16> = self.in_flight().map(|s| s.id).collect();
        assert_eq!(ids.len(), self.chains_in_flight(), "two chains share an id");
    }

    /// Random segments, readable first: between 1 and `max_segs` of them.
    pub fn random_spec(&mut self, max_segs: usize, indirect: bool) -> ChainSpec {
        let n = self.rng.range(1, max_segs as u64) as usize;
        let mut segs: Vec<(u32, bool)> = (0..n)
            .map(|_| {
                let len = if self.rng.chance(1, 16) {
                    0
                } else {
                    self.rng.range(1, MAX_SEG_LEN as u64) as u32
                };
                (len, self.rng.chance(1, 2))
            })
            .collect();
        segs.sort_by_key(|&(_, w)| w);
        ChainSpec {
            segs,
            indirect,
            table_misalign: if self.rng.chance(1, 4) {
                self.rng.below(16) as u8
            } else {
                0
            },
        }
    }

    /// Adds a chain as `spec` says; returns whether the driver took it. Checks that the
    /// driver refuses exactly when it lacks descriptors.
    pub fn add(&mut self, spec: &ChainSpec) -> bool {
        assert!(spec.segs.len() <= MAX_SEGS && !spec.segs.is_empty());
        let Some(slot) = self.free_slots.pop() else {
            return false;
        };
        let base = self.rig.data + slot as u64 * SLOT_LEN;
        let mut cursor = self.rng.below(16);
        let mut segments = Vec::new();
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut writable_len = 0u32;
        for &(len, w) in &spec.segs {
            let addr = base + cursor;
            if w {
                self.rig
                    .drv_mem
                    .write(GuestAddr(addr), &vec![SENTINEL; len as usize])
                    .unwrap();
                writable.push((addr, len));
                writable_len += len;
            } else {
                let bytes = self.rng.bytes(len as usize);
                self.rig.drv_mem.write(GuestAddr(addr), &bytes).unwrap();
                readable.extend_from_slice(&bytes);
            }
            segments.push(Segment {
                addr: GuestAddr(addr),
                len,
                writable: w,
            });
            cursor += len as u64 + self.rng.below(16);
        }
        let free = self.drv.free_descriptors();
        let (id, ndesc) = if spec.indirect {
            let table = base + ((cursor + 15) & !15) + spec.table_misalign as u64;
            assert!(table + 16 * spec.segs.len() as u64 <= base + SLOT_LEN);
            let id = self.drv.add_indirect(GuestAddr(table), &segments).unwrap();
            assert_eq!(
                id.is_none(),
                free == 0,
                "add_indirect refused with {free} free"
            );
            (id, 1)
        } else {
            assert!(cursor <= SLOT_LEN);
            let id = self.drv.add(&segments);
            assert_eq!(
                id.is_none(),
                segments.len() > free,
                "add of {} segments with {free} free",
                segments.len()
            );
            (id, segments.len())
        };
        let Some(id) = id else {
            self.free_slots.push(slot);
            self.stats.refused += 1;
            return false;
        };
        assert!(id < self.rig.size);
        assert_eq!(self.drv.free_descriptors(), free - ndesc);
        assert!(
            self.in_flight().all(|s| s.id != id),
            "id {id} handed out twice"
        );
        self.unpublished.push_back(Sent {
            id,
            slot,
            ndesc,
            nsegs: spec.segs.len(),
            readable,
            writable,
            writable_len,
        });
        self.stats.added += 1;
        if spec.indirect {
            self.stats.added_indirect += 1;
        }
        true
    }

    pub fn publish(&mut self) {
        // Before publishing, the device sees none of the unpublished chains.
        if self.published.is_empty() && !self.unpublished.is_empty() {
            assert!(
                !self.dev.has_available(),
                "an unpublished chain is visible to the device"
            );
        }
        self.drv.publish();
        self.published.extend(self.unpublished.drain(..));
    }

    fn note_wraps(&mut self, before: vmdev_shm_ring::PackedState) {
        let after = self.dev.state();
        self.stats.avail_wraps += (before.avail_wrap != after.avail_wrap) as u64;
        self.stats.used_wraps += (before.used_wrap != after.used_wrap) as u64;
    }

    /// Pops up to `max` chains on the device side and checks each against what was sent;
    /// now and then puts the last one back and pops it again.
    pub fn device_pop(&mut self, max: usize) {
        for _ in 0..max {
            assert_eq!(self.dev.has_available(), !self.published.is_empty());
            let mut chain = self.chain_pool.pop().unwrap_or_default();
            let before = self.dev.state();
            let got = self.dev.pop(&mut chain).unwrap();
            let Some(sent) = self.published.pop_front() else {
                assert!(!got, "device popped a chain nobody published");
                self.chain_pool.push(chain);
                return;
            };
            assert!(got, "device missed a published chain");
            self.check_chain(&sent, &chain);
            if self.rng.chance(1, 8) {
                self.dev.unpop();
                self.stats.unpopped += 1;
                assert_eq!(self.dev.state(), before, "unpop restores the position");
                assert!(self.dev.pop(&mut chain).unwrap());
                self.check_chain(&sent, &chain);
            }
            self.note_wraps(before);
            self.stats.popped += 1;
            self.popped.push((sent, chain));
        }
    }

    fn check_chain(&mut self, sent: &Sent, chain: &Chain) {
        assert_eq!(chain.head(), sent.id, "chains out of order");
        assert_eq!(chain.readable_len() as usize, sent.readable.len());
        assert_eq!(chain.writable_len(), sent.writable_len);
        assert_eq!(chain.num_segments(), sent.nsegs);
        let mut buf = vec![0u8; sent.readable.len()];
        assert_eq!(chain.read_at(0, &mut buf), buf.len());
        assert_eq!(buf, sent.readable);
        let off = self.rng.range(0, sent.readable.len() as u64) as usize;
        let mut buf = vec![0u8; self.rng.range(0, 600) as usize];
        let n = chain.read_at(off, &mut buf);
        let expect = (sent.readable.len() - off).min(buf.len());
        assert_eq!(n, expect);
        assert_eq!(&buf[..n], &sent.readable[off..off + n]);
    }

    /// Completes up to `max` held chains, in random order (under IN_ORDER: oldest first);
    /// publishes when asked.
    pub fn device_complete(&mut self, max: usize, publish: bool) {
        for _ in 0..max {
            if self.popped.is_empty() {
                break;
            }
            let (sent, chain) = if self.in_order {
                self.popped.remove(0)
            } else {
                let i = self.rng.below(self.popped.len() as u64) as usize;
                self.popped.swap_remove(i)
            };
            let len = self.rng.range(0, sent.writable_len as u64) as usize;
            let written = self.rng.bytes(len);
            let cut = self.rng.range(0, len as u64) as usize;
            assert_eq!(chain.write_at(0, &written[..cut]), cut);
            assert_eq!(chain.write_at(cut, &written[cut..]), len - cut);
            assert_eq!(chain.write_at(sent.writable_len as usize, &[1, 2, 3]), 0);
            let before = self.dev.state();
            self.dev.add_used(chain.head(), len as u32).unwrap();
            self.note_wraps(before);
            self.chain_pool.push(chain);
            self.used_unpublished.push_back(Done { sent, written });
        }
        if publish {
            if self.used_published.is_empty() && !self.used_unpublished.is_empty() {
                assert_eq!(
                    self.drv.pop_used().unwrap(),
                    None,
                    "used buffers visible before publish_used"
                );
            }
            self.dev.publish_used();
            self.used_published.extend(self.used_unpublished.drain(..));
        }
    }

    /// Reaps up to `max` used buffers on the driver side and checks ids, lengths and bytes.
    pub fn driver_reap(&mut self, max: usize) {
        for _ in 0..max {
            let got = self.drv.pop_used().unwrap();
            let Some(done) = self.used_published.pop_front() else {
                assert_eq!(
                    got, None,
                    "driver reaped a buffer the device did not publish"
                );
                return;
            };
            let (id, len) = got.expect("driver missed a published used buffer");
            assert_eq!(id, done.sent.id, "used ids out of order");
            assert_eq!(len as usize, done.written.len());
            let mut all = Vec::new();
            for &(addr, l) in &done.sent.writable {
                all.extend(self.rig.read_vec(addr, l as usize));
            }
            assert_eq!(&all[..done.written.len()], &done.written[..]);
            assert!(all[done.written.len()..].iter().all(|&b| b == SENTINEL));
            self.free_slots.push(done.sent.slot);
            self.stats.reaped += 1;
        }
    }

    /// Runs everything in flight through to the end and checks nothing leaked.
    pub fn drain(&mut self) {
        self.publish();
        self.device_pop(usize::MAX);
        self.device_complete(usize::MAX, true);
        self.driver_reap(usize::MAX);
        self.check_accounting();
        assert_eq!(self.chains_in_flight(), 0);
        assert_eq!(self.drv.free_descriptors(), self.rig.size as usize);
        assert_eq!(self.drv.in_flight(), 0);
        assert_eq!(self.dev.in_flight(), 0);
        assert_eq!(self.drv.pop_used().unwrap(), None);
        let mut c = Chain::new();
        assert!(!self.dev.pop(&mut c).unwrap());
        // With nothing in flight, both sides stand at the same place.
        let (d, v) = (self.drv.state(), self.dev.state());
        assert_eq!(d, v);
        assert_eq!((d.avail_index, d.avail_wrap), (d.used_index, d.used_wrap));
    }
}
