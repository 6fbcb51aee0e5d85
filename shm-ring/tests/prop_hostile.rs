//! Property test: a driver fills the descriptor table, the avail ring, and the data area
//! (where indirect tables may point) with arbitrary descriptors and an arbitrary avail
//! index. Popping must never panic, must terminate, and must agree with an independent
//! reference walk of the virtio rules: every `Ok` chain is exactly the segments the
//! reference found (all inside one region each), every `Err` is a rule the reference saw
//! broken.

mod common;

use common::*;
use proptest::collection::vec;
use proptest::prelude::*;
use vmdev_shm_ring::split::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, MAX_INDIRECT};
use vmdev_shm_ring::{Chain, GuestAddr, GuestMemory};

/// A second, small region right after the first, so buffers can straddle the boundary.
const SECOND: (u64, u64) = (BASE + MEM_SIZE, 0x10000);
/// Where the generated "indirect-table-like" descriptors live in the data area.
const POOL_OFF: u64 = 0x1000;
const POOL_LEN: u64 = 64;

#[derive(Debug, Clone, Copy)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// Addresses biased towards the interesting places: the data pool (indirect tables),
/// anywhere in or near the regions, the region boundary, and anything at all.
fn addr(data: u64) -> impl Strategy<Value = u64> {
    let end = BASE + MEM_SIZE;
    prop_oneof![
        4 => (0..POOL_LEN).prop_map(move |k| data + POOL_OFF + 16 * k),
        3 => BASE - 64..end + SECOND.1 + 64,
        2 => end - 64..end + 64,
        1 => BASE..BASE + 0x400,
        1 => u64::MAX - 4096..=u64::MAX,
        1 => any::<u64>(),
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => 0u32..256,
        3 => (0u32..8).prop_map(|k| 16 * k),
        1 => 0u32..=MEM_SIZE as u32 + 32,
        1 => 0xffff_ff00u32..=u32::MAX,
        1 => any::<u32>(),
    ]
}

fn flags() -> impl Strategy<Value = u16> {
    prop_oneof![
        8 => 0u16..8,
        1 => any::<u16>(),
    ]
}

fn next() -> impl Strategy<Value = u16> {
    prop_oneof![
        8 => 0u16..16,
        1 => 0u16..80,
        1 => any::<u16>(),
    ]
}

fn desc(data: u64) -> impl Strategy<Value = RawDesc> {
    (addr(data), len(), flags(), next()).prop_map(|(addr, len, flags, next)| RawDesc {
        addr,
        len,
        flags,
        next,
    })
}

/// What the device must produce for one head, per the virtio rules (and this crate's
/// documented choices: zero-length buffers are allowed, an indirect descriptor may end a
/// direct chain, its WRITE flag is ignored). `None` when a rule is broken.
fn reference_walk(
    mem: &GuestMemory,
    regions: &[(u64, u64)],
    desc_table: u64,
    size: u16,
    head: u16,
    indirect_ok: bool,
) -> Option<Vec<(u64, u32, bool)>> {
    let inside = |addr: u64, len: u32| {
        regions.iter().any(|&(start, sz)| {
            let (a, l, s, z) = (addr as u128, len as u128, start as u128, sz as u128);
            a >= s && a < s + z && a + l <= s + z
        })
    };
    let read = |table: u64, i: u32| {
        let mut b = [0u8; 16];
        mem.read(GuestAddr(table + 16 * i as u64), &mut b).unwrap();
        RawDesc {
            addr: u64::from_le_bytes(b[..8].try_into().unwrap()),
            len: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            flags: u16::from_le_bytes(b[12..14].try_into().unwrap()),
            next: u16::from_le_bytes(b[14..].try_into().unwrap()),
        }
    };
    let mut segs = Vec::new();
    let (mut table, mut table_len, mut i) = (desc_table, size as u32, head as u32);
    let mut in_indirect = false;
    let mut seen = vec![false; table_len as usize];
    let (mut rlen, mut wlen, mut writing) = (0u32, 0u32, false);
    loop {
        if i >= table_len || seen[i as usize] {
            return None; // out of the table, or a loop
        }
        seen[i as usize] = true;
        let d = read(table, i);
        if d.flags & DESC_F_INDIRECT != 0 {
            if in_indirect || !indirect_ok || d.flags & DESC_F_NEXT != 0 {
                return None;
            }
            if d.len == 0 || d.len % 16 != 0 || d.len / 16 > MAX_INDIRECT || !inside(d.addr, d.len)
            {
                return None;
            }
            (table, table_len, i, in_indirect) = (d.addr, d.len / 16, 0, true);
            seen = vec![false; table_len as usize];
            continue;
        }
        if !inside(d.addr, d.len) {
            return None;
        }
        let w = d.flags & DESC_F_WRITE != 0;
        if w {
            writing = true;
            wlen = wlen.checked_add(d.len)?;
        } else {
            if writing {
                return None;
            }
            rlen = rlen.checked_add(d.len)?;
        }
        segs.push((d.addr, d.len, w));
        if d.flags & DESC_F_NEXT == 0 {
            return Some(segs);
        }
        i = d.next as u32;
    }
}

fn check_chain(mem: &GuestMemory, c: &Chain, segs: &[(u64, u32, bool)]) {
    assert_eq!(c.num_segments(), segs.len());
    let r: u64 = segs.iter().filter(|s| !s.2).map(|s| s.1 as u64).sum();
    let w: u64 = segs.iter().filter(|s| s.2).map(|s| s.1 as u64).sum();
    assert_eq!(c.readable_len() as u64, r);
    assert_eq!(c.writable_len() as u64, w);
    // The bytes the chain reads are the bytes at the reference's addresses. Limit the
    // work on huge aliasing chains.
    if r <= 8 << 20 {
        let mut expect = Vec::with_capacity(r as usize);
        for &(a, l, _) in segs.iter().filter(|s| !s.2) {
            let mut b = vec![0u8; l as usize];
            mem.read(GuestAddr(a), &mut b).unwrap();
            expect.extend(b);
        }
        let mut got = vec![0u8; r as usize];
        assert_eq!(c.read_at(0, &mut got), r as usize);
        assert!(
            got == expect,
            "readable bytes differ from the reference's segments"
        );
    }
    assert_eq!(c.read_at(r as usize, &mut [0u8; 8]), 0);
    // Writable space is exactly writable_len (written with zero-length probes only, so
    // the ring under test is not modified).
    assert_eq!(c.write_at(w as usize, &[0xAA; 4]), 0);
    assert_eq!(c.write_at(0, &[]), 0);
}

#[derive(Debug, Clone)]
struct Hostile {
    size_log: u32,
    indirect: bool,
    table: Vec<RawDesc>,
    pool: Vec<RawDesc>,
    avail: Vec<u16>,
    avail_idx: u16,
}

fn hostile() -> impl Strategy<Value = Hostile> {
    (0u32..=6, any::<bool>()).prop_flat_map(|(size_log, indirect)| {
        let size = 1usize << size_log;
        // Data area of a size-64 queue or smaller: 4096-aligned past the rings.
        let data = Rig::new_layout_data(size as u16);
        (
            Just(size_log),
            Just(indirect),
            vec(desc(data), size),
            vec(desc(data), POOL_LEN as usize),
            vec(prop_oneof![4 => 0u16..size as u16, 1 => any::<u16>()], size),
            prop_oneof![4 => 0u16..=size as u16 + 2, 1 => any::<u16>()],
        )
            .prop_map(
                |(size_log, indirect, table, pool, avail, avail_idx)| Hostile {
                    size_log,
                    indirect,
                    table,
                    pool,
                    avail,
                    avail_idx,
                },
            )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_rings_never_panic_and_match_the_reference(h in hostile()) {
        let size = 1u16 << h.size_log;
        let rig = Rig::with_regions(size, &[(BASE, MEM_SIZE), SECOND]);
        let regions = [(BASE, MEM_SIZE), SECOND];
        for (i, d) in h.table.iter().enumerate() {
            rig.write_desc(i as u16, d.addr, d.len, d.flags, d.next);
        }
        for (i, d) in h.pool.iter().enumerate() {
            rig.write_desc_at(rig.data + POOL_OFF, i as u32, d.addr, d.len, d.flags, d.next);
        }
        for (i, &head) in h.avail.iter().enumerate() {
            rig.set_avail_entry(i as u16, head);
        }
        rig.set_avail_idx(h.avail_idx);
        let f = features(h.indirect, h.indirect);
        let mut dev = rig.device(f);
        let mut chain = Chain::new();
        let jump = h.avail_idx as u32 > size as u32;
        let mut oks = 0u32;
        // Each pop returns; at most avail_idx of them find a chain.
        for n in 0..=size as u32 + 2 {
            let expect_chain = !jump && n < h.avail_idx as u32;
            let expect = expect_chain.then(|| {
                let head = h.avail[n as usize % size as usize];
                reference_walk(&rig.dev_mem, &regions, rig.desc.0, size, head, h.indirect)
            });
            match dev.pop(&mut chain) {
                Ok(false) => {
                    prop_assert!(expect.is_none(), "ring empty but {} published", h.avail_idx);
                    break;
                }
                Ok(true) => {
                    let segs = expect.flatten();
                    prop_assert!(segs.is_some(), "device accepted a chain the reference refuses: {chain:?}");
                    check_chain(&rig.dev_mem, &chain, &segs.unwrap());
                    oks += 1;
                }
                Err(e) => {
                    if jump {
                        let is_jump = matches!(e, vmdev_shm_ring::RingError::AvailJump { .. });
                        prop_assert!(is_jump, "{e:?}");
                        break;
                    }
                    prop_assert!(
                        matches!(expect, Some(None)),
                        "device refused ({e}) a chain the reference accepts"
                    );
                }
            }
        }
        // The device consumed every published entry, good or bad (unless the index jumped).
        if !jump {
            prop_assert!(oks <= h.avail_idx as u32);
            prop_assert_eq!(dev.next_avail(), h.avail_idx);
            prop_assert!(!dev.pop(&mut chain).unwrap());
        }
    }
}

/// The same, starting from a valid ring the driver built and then corrupting random bytes
/// of the descriptor table: nothing panics.
#[test]
fn corrupted_valid_rings_never_panic() {
    use vmdev_shm_ring::split::Segment;
    let mut rng = common::Rng::new(42);
    let regions = [(BASE, MEM_SIZE)];
    let mut outcomes = [0u32; 2];
    for round in 0..300 {
        let size = 1u16 << (round % 6);
        let rig = Rig::new(size);
        let mut drv = rig.driver(ALL_FEATURES);
        let mut added = 0u16;
        loop {
            let n = rng.range(1, 4) as usize;
            let segs: Vec<Segment> = (0..n)
                .map(|k| Segment {
                    addr: GuestAddr(rig.data + 0x100 * k as u64),
                    len: rng.range(0, 64) as u32,
                    writable: k + 1 == n,
                })
                .collect();
            let r = if rng.chance(1, 2) {
                let table = GuestAddr(rig.data + 0x8000 + 0x100 * added as u64);
                drv.add_indirect(table, &segs).unwrap()
            } else {
                drv.add(&segs)
            };
            if r.is_none() {
                break;
            }
            added += 1;
        }
        drv.publish();
        // Flip some bytes in the descriptor table and the indirect tables.
        for _ in 0..rng.range(1, 6) {
            let (base, span) = if added == 0 || rng.chance(1, 2) {
                (rig.desc.0, 16 * size as u64)
            } else {
                (rig.data + 0x8000, 0x100 * added as u64)
            };
            let at = base + rng.below(span);
            rig.drv_mem
                .write(GuestAddr(at), &[rng.next_u64() as u8])
                .unwrap();
        }
        let mut dev = rig.device(ALL_FEATURES);
        let mut c = Chain::new();
        for n in 0..added {
            let head = rig.r16(rig.avail.0 + 4 + 2 * n as u64);
            let expect = reference_walk(&rig.dev_mem, &regions, rig.desc.0, size, head, true);
            match dev.pop(&mut c) {
                Ok(true) => {
                    check_chain(
                        &rig.dev_mem,
                        &c,
                        expect.as_ref().expect("reference refuses"),
                    );
                    outcomes[0] += 1;
                }
                Ok(false) => panic!("lost a chain"),
                Err(e) => {
                    assert!(expect.is_none(), "device refused a good chain: {e}");
                    outcomes[1] += 1;
                }
            }
        }
        assert!(!dev.pop(&mut c).unwrap());
    }
    assert!(outcomes[0] > 100 && outcomes[1] > 50, "{outcomes:?}");
}
