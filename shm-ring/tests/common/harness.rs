//! A driver and a device over the same rings (two mappings of one memfd), driven step by
//! step against a model of what each side must see.

use super::{Rig, Rng};
use std::collections::{HashSet, VecDeque};
use vmdev_shm_ring::split::{RingFeatures, Segment};
use vmdev_shm_ring::{Chain, DeviceQueue, DriverQueue, GuestAddr};

/// Bytes of data area reserved for each chain in flight (segments and indirect table).
pub const SLOT_LEN: u64 = 4096;
/// Largest segment the generators produce, and most segments per chain, so that a chain
/// always fits its slot: 8 * (400 + 15) + 15 + 8 * 16 + 15 < 4096.
pub const MAX_SEG_LEN: u32 = 400;
pub const MAX_SEGS: usize = 8;
/// What the driver fills writable buffers with, to see exactly what the device wrote.
const SENTINEL: u8 = 0xEE;

/// A chain the driver will add: `(len, writable)` segments, readable ones first.
#[derive(Debug, Clone)]
pub struct ChainSpec {
    pub segs: Vec<(u32, bool)>,
    pub indirect: bool,
    /// Byte offset of the indirect table from 16-byte alignment (0..16).
    pub table_misalign: u8,
}

#[derive(Debug)]
struct Sent {
    head: u16,
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
}

pub struct Harness {
    pub rig: Rig,
    pub drv: DriverQueue,
    pub dev: DeviceQueue,
    pub rng: Rng,
    pub stats: Stats,
    free_slots: Vec<usize>,
    unpublished: VecDeque<Sent>,
    published: VecDeque<Sent>,
    popped: Vec<(Sent, Chain)>,
    used_unpublished: VecDeque<Done>,
    used_published: VecDeque<Done>,
    chain_pool: Vec<Chain>,
}

impl Harness {
    pub fn new(size: u16, features: RingFeatures, seed: u64) -> Harness {
        let rig = Rig::new(size);
        let drv = rig.driver(features);
        let dev = rig.device(features);
        let nslots = ((rig.end - rig.data) / SLOT_LEN).min(size as u64) as usize;
        Harness {
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

    /// Chains the driver added and has not reaped yet.
    pub fn chains_in_flight(&self) -> usize {
        self.in_flight().count()
    }

    /// Chains published and not yet popped by the device.
    pub fn pending_for_device(&self) -> usize {
        self.published.len()
    }

    /// Chains the device holds (popped, not completed).
    pub fn held_by_device(&self) -> usize {
        self.popped.len()
    }

    /// Checks descriptor and chain accounting on the driver side.
    pub fn check_accounting(&self) {
        let ndesc: usize = self.in_flight().map(|s| s.ndesc).sum();
        assert_eq!(
            self.drv.free_descriptors() + ndesc,
            self.rig.size as usize,
            "descriptor leak or double free"
        );
        assert_eq!(self.drv.in_flight(), self.chains_in_flight());
        let heads: HashSet<u16> = self.in_flight().map(|s| s.head).collect();
        assert_eq!(
            heads.len(),
            self.chains_in_flight(),
            "two chains share a head"
        );
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
        let (head, ndesc) = if spec.indirect {
            let table = base + ((cursor + 15) & !15) + spec.table_misalign as u64;
            assert!(table + 16 * spec.segs.len() as u64 <= base + SLOT_LEN);
            let head = self.drv.add_indirect(GuestAddr(table), &segments).unwrap();
            assert_eq!(
                head.is_none(),
                free == 0,
                "add_indirect refused with {free} free"
            );
            (head, 1)
        } else {
            assert!(cursor <= SLOT_LEN);
            let head = self.drv.add(&segments);
            assert_eq!(
                head.is_none(),
                segments.len() > free,
                "add of {} segments with {free} free",
                segments.len()
            );
            (head, segments.len())
        };
        let Some(head) = head else {
            self.free_slots.push(slot);
            self.stats.refused += 1;
            return false;
        };
        assert!(head < self.rig.size);
        assert_eq!(self.drv.free_descriptors(), free - ndesc);
        assert!(
            self.in_flight().all(|s| s.head != head),
            "head {head} handed out twice"
        );
        self.unpublished.push_back(Sent {
            head,
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
        let before = self.rig.avail_idx();
        self.drv.publish();
        assert_eq!(
            self.rig.avail_idx(),
            before.wrapping_add(self.unpublished.len() as u16),
            "publish must expose exactly the chains added since the last publish"
        );
        self.published.extend(self.unpublished.drain(..));
    }

    /// Pops up to `max` chains on the device side and checks each against what was sent.
    pub fn device_pop(&mut self, max: usize) {
        for _ in 0..max {
            let avail = self.dev.available().unwrap() as usize;
            assert_eq!(avail > 0, !self.published.is_empty());
            assert!(avail <= self.published.len());
            let mut chain = self.chain_pool.pop().unwrap_or_default();
            let got = self.dev.pop(&mut chain).unwrap();
            let Some(sent) = self.published.pop_front() else {
                assert!(!got, "device popped a chain nobody published");
                self.chain_pool.push(chain);
                return;
            };
            assert!(got, "device missed a published chain");
            self.check_chain(&sent, &chain);
            self.stats.popped += 1;
            self.popped.push((sent, chain));
        }
    }

    fn check_chain(&mut self, sent: &Sent, chain: &Chain) {
        assert_eq!(chain.head(), sent.head, "chains out of order");
        assert_eq!(chain.readable_len() as usize, sent.readable.len());
        assert_eq!(chain.writable_len(), sent.writable_len);
        assert_eq!(chain.num_segments(), sent.nsegs);
        let mut buf = vec![0u8; sent.readable.len()];
        assert_eq!(chain.read_at(0, &mut buf), buf.len());
        assert_eq!(buf, sent.readable);
        // A read from a random offset, possibly running past the end.
        let off = self.rng.range(0, sent.readable.len() as u64) as usize;
        let mut buf = vec![0u8; self.rng.range(0, 600) as usize];
        let n = chain.read_at(off, &mut buf);
        let expect = (sent.readable.len() - off).min(buf.len());
        assert_eq!(n, expect);
        assert_eq!(&buf[..n], &sent.readable[off..off + n]);
        assert_eq!(chain.read_at(sent.readable.len(), &mut [0u8; 4]), 0);
    }

    /// Completes up to `max` held chains in random order; publishes when asked.
    pub fn device_complete(&mut self, max: usize, publish: bool) {
        for _ in 0..max {
            if self.popped.is_empty() {
                break;
            }
            let i = self.rng.below(self.popped.len() as u64) as usize;
            let (sent, chain) = self.popped.swap_remove(i);
            let len = self.rng.range(0, sent.writable_len as u64) as usize;
            let written = self.rng.bytes(len);
            // Write in two pieces, the second at an offset.
            let cut = self.rng.range(0, len as u64) as usize;
            assert_eq!(chain.write_at(0, &written[..cut]), cut);
            assert_eq!(chain.write_at(cut, &written[cut..]), len - cut);
            assert_eq!(chain.write_at(sent.writable_len as usize, &[1, 2, 3]), 0);
            self.dev.add_used(chain.head(), len as u32);
            self.chain_pool.push(chain);
            self.used_unpublished.push_back(Done { sent, written });
        }
        if publish {
            self.dev.publish_used();
            assert_eq!(self.rig.used_idx(), self.dev.next_used());
            self.used_published.extend(self.used_unpublished.drain(..));
        }
    }

    /// Reaps up to `max` used chains on the driver side and checks ids, lengths and bytes.
    pub fn driver_reap(&mut self, max: usize) {
        for _ in 0..max {
            let got = self.drv.pop_used().unwrap();
            let Some(done) = self.used_published.pop_front() else {
                assert_eq!(
                    got, None,
                    "driver reaped a chain the device did not publish"
                );
                return;
            };
            let (id, len) = got.expect("driver missed a published used entry");
            assert_eq!(id, done.sent.head, "used ids out of order");
            assert_eq!(len as usize, done.written.len());
            // The bytes the device wrote, then the sentinel the driver left.
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
        assert_eq!(self.drv.pop_used().unwrap(), None);
        let mut c = Chain::new();
        assert!(!self.dev.pop(&mut c).unwrap());
        assert_eq!(self.dev.next_avail(), self.rig.avail_idx());
        assert_eq!(self.dev.next_used(), self.rig.used_idx());
    }
}
