//! Property test: a driver fills the packed descriptor ring and the data area (where
//! indirect tables may point) with arbitrary descriptors, and the device starts from an
//! arbitrary position and wrap counter. Popping must never panic, must terminate, and must
//! agree with an independent reference walk of the packed-ring rules: every `Ok` chain is
//! exactly the segments the reference found, every `Err` a rule the reference saw broken.

mod common;
mod packed_common;

use common::*;
use packed_common::*;
use proptest::collection::vec;
use proptest::prelude::*;
use vmdev_shm_ring::packed::{
    PackedDescriptor, PackedState, DESC_F_AVAIL, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_USED,
    DESC_F_WRITE,
};
use vmdev_shm_ring::split::MAX_INDIRECT;
use vmdev_shm_ring::{Chain, GuestAddr, GuestMemory};

const SECOND: (u64, u64) = (BASE + MEM_SIZE, 0x10000);
const POOL_OFF: u64 = 0x1000;
const POOL_LEN: u64 = 64;

#[derive(Debug, Clone, Copy)]
struct RawDesc {
    addr: u64,
    len: u32,
    id: u16,
    /// NEXT / WRITE / INDIRECT bits (or anything).
    flags: u16,
    /// How to set AVAIL/USED: 0..=6 available for the position's lap, 7 the other lap,
    /// 8 used, 9 as `flags` says.
    lap: u8,
}

fn addr(data: u64) -> impl Strategy<Value = u64> {
    let end = BASE + MEM_SIZE;
    prop_oneof![
        4 => (0..POOL_LEN).prop_map(move |k| data + POOL_OFF + 16 * k),
        3 => BASE - 64..end + SECOND.1 + 64,
        2 => end - 64..end + 64,
        1 => u64::MAX - 4096..=u64::MAX,
        1 => any::<u64>(),
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => 0u32..256,
        3 => (0u32..8).prop_map(|k| 16 * k),
        1 => 0u32..=MEM_SIZE as u32 + 32,
        1 => any::<u32>(),
    ]
}

fn desc(data: u64) -> impl Strategy<Value = RawDesc> {
    (
        addr(data),
        len(),
        prop_oneof![6 => 0u16..70, 1 => any::<u16>()],
        prop_oneof![8 => 0u16..8, 1 => any::<u16>()],
        0u8..10,
    )
        .prop_map(|(addr, len, id, flags, lap)| RawDesc {
            addr,
            len,
            id,
            flags,
            lap,
        })
}

fn is_avail(flags: u16, wrap: bool) -> bool {
    (flags & DESC_F_AVAIL != 0) == wrap && (flags & DESC_F_USED != 0) != wrap
}

/// What the device must do at `(index, wrap)`: `None` if nothing is available there,
/// `Some(None)` if the chain breaks a rule, else its segments, id and end position.
#[allow(clippy::type_complexity)]
fn reference_walk(
    mem: &GuestMemory,
    regions: &[(u64, u64)],
    ring: u64,
    size: u16,
    (index, wrap): (u16, bool),
    indirect_ok: bool,
    in_flight: &[bool],
) -> Option<Option<(Vec<(u64, u32, bool)>, u16, (u16, bool))>> {
    let inside = |addr: u64, len: u32| {
        regions.iter().any(|&(start, sz)| {
            let (a, l, s, z) = (addr as u128, len as u128, start as u128, sz as u128);
            a >= s && a < s + z && a + l <= s + z
        })
    };
    let read = |table: u64, i: u64| {
        let mut b = [0u8; 16];
        mem.read(GuestAddr(table + 16 * i), &mut b).unwrap();
        PackedDescriptor::decode(&b)
    };
    if !is_avail(read(ring, index as u64).flags, wrap) {
        return None;
    }
    let (mut pos, mut w) = (index, wrap);
    let mut count = 0u32;
    let mut segs = Vec::new();
    let (mut rlen, mut wlen, mut writing) = (0u32, 0u32, false);
    let mut push = |a: u64, l: u32, wr: bool, segs: &mut Vec<_>| -> Option<()> {
        if !inside(a, l) {
            return None;
        }
        if wr {
            writing = true;
            wlen = wlen.checked_add(l)?;
        } else {
            if writing {
                return None;
            }
            rlen = rlen.checked_add(l)?;
        }
        segs.push((a, l, wr));
        Some(())
    };
    let result = (|| loop {
        let d = read(ring, pos as u64);
        if count > 0 && !is_avail(d.flags, w) {
            return None;
        }
        count += 1;
        pos += 1;
        if pos == size {
            pos = 0;
            w = !w;
        }
        if d.flags & DESC_F_INDIRECT != 0 {
            if !indirect_ok || d.flags & DESC_F_NEXT != 0 || count > 1 {
                return None;
            }
            if d.len == 0 || d.len % 16 != 0 || d.len / 16 > MAX_INDIRECT || !inside(d.addr, d.len)
            {
                return None;
            }
            for i in 0..(d.len / 16) as u64 {
                let t = read(d.addr, i);
                if t.flags & DESC_F_INDIRECT != 0 {
                    return None;
                }
                push(t.addr, t.len, t.flags & DESC_F_WRITE != 0, &mut segs)?;
            }
            return Some(d.id);
        }
        push(d.addr, d.len, d.flags & DESC_F_WRITE != 0, &mut segs)?;
        if d.flags & DESC_F_NEXT == 0 {
            return Some(d.id);
        }
        if count >= size as u32 {
            return None;
        }
    })();
    Some(result.and_then(|id| {
        (id < size && !in_flight[id as usize]).then_some((segs.clone(), id, (pos, w)))
    }))
}

fn check_chain(mem: &GuestMemory, c: &Chain, segs: &[(u64, u32, bool)]) {
    assert_eq!(c.num_segments(), segs.len());
    let r: u64 = segs.iter().filter(|s| !s.2).map(|s| s.1 as u64).sum();
    let w: u64 = segs.iter().filter(|s| s.2).map(|s| s.1 as u64).sum();
    assert_eq!(c.readable_len() as u64, r);
    assert_eq!(c.writable_len() as u64, w);
    if r <= 8 << 20 {
        let mut expect = Vec::with_capacity(r as usize);
        for &(a, l, _) in segs.iter().filter(|s| !s.2) {
            let mut b = vec![0u8; l as usize];
            mem.read(GuestAddr(a), &mut b).unwrap();
            expect.extend(b);
        }
        let mut got = vec![0u8; r as usize];
        assert_eq!(c.read_at(0, &mut got), r as usize);
        assert!(got == expect, "readable bytes differ from the reference");
    }
    assert_eq!(c.write_at(w as usize, &[0xAA; 4]), 0);
}

#[derive(Debug, Clone)]
struct Hostile {
    size: u16,
    indirect: bool,
    start: u16,
    start_wrap: bool,
    ring: Vec<RawDesc>,
    pool: Vec<RawDesc>,
}

fn hostile() -> impl Strategy<Value = Hostile> {
    (1u16..=24, any::<bool>()).prop_flat_map(|(size, indirect)| {
        let data = PackedRig::new_layout_data(24);
        (
            Just(size),
            Just(indirect),
            0..size,
            any::<bool>(),
            vec(desc(data), size as usize),
            vec(desc(data), POOL_LEN as usize),
        )
            .prop_map(|(size, indirect, start, start_wrap, ring, pool)| Hostile {
                size,
                indirect,
                start,
                start_wrap,
                ring,
                pool,
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_rings_never_panic_and_match_the_reference(h in hostile()) {
        let size = h.size;
        let regions = [(BASE, MEM_SIZE), SECOND];
        let rig = PackedRig::with_regions(size, &regions);
        assert_eq!(rig.data, PackedRig::new_layout_data(24));
        // The lap of position i, counting from the device's start.
        let lap_wrap = |i: u16| if i >= h.start { h.start_wrap } else { !h.start_wrap };
        for (i, d) in h.ring.iter().enumerate() {
            let i = i as u16;
            let w = lap_wrap(i);
            let base = d.flags & (DESC_F_NEXT | DESC_F_WRITE | DESC_F_INDIRECT);
            let flags = match d.lap {
                0..=6 => base | avail(w),
                7 => base | avail(!w),
                8 => base | used(w),
                _ => d.flags,
            };
            rig.write_desc(i, d.addr, d.len, d.id, flags);
        }
        for (i, d) in h.pool.iter().enumerate() {
            let flags = if d.lap < 8 { d.flags & 7 } else { d.flags };
            rig.write_desc_at(rig.data + POOL_OFF, i as u32, d.addr, d.len, d.id, flags);
        }
        let f = features(h.indirect, h.indirect);
        let mut dev = rig.device(f);
        let start = PackedState {
            avail_index: h.start,
            avail_wrap: h.start_wrap,
            used_index: h.start,
            used_wrap: h.start_wrap,
        };
        dev.set_state(start).unwrap();
        let mut in_flight = vec![false; size as usize];
        let mut chain = Chain::new();
        for _ in 0..=size as u32 + 1 {
            let s = dev.state();
            let expect = reference_walk(
                &rig.dev_mem, &regions, rig.desc.0, size,
                (s.avail_index, s.avail_wrap), h.indirect, &in_flight,
            );
            match dev.pop(&mut chain) {
                Ok(false) => {
                    prop_assert!(expect.is_none(), "device saw nothing, reference a chain");
                    break;
                }
                Ok(true) => {
                    let got = expect.flatten();
                    prop_assert!(got.is_some(), "device accepted a chain the reference refuses: {chain:?}");
                    let (segs, id, end) = got.unwrap();
                    check_chain(&rig.dev_mem, &chain, &segs);
                    prop_assert_eq!(chain.head(), id);
                    let s = dev.state();
                    prop_assert_eq!((s.avail_index, s.avail_wrap), end);
                    in_flight[id as usize] = true;
                }
                Err(e) => {
                    prop_assert!(matches!(expect, Some(None)), "device refused ({e}) a chain the reference accepts");
                    // The device stays put and says the same again.
                    prop_assert_eq!(dev.state(), s);
                    prop_assert_eq!(dev.pop(&mut chain).unwrap_err(), e);
                    break;
                }
            }
        }
        prop_assert!(dev.in_flight() <= size as usize);
    }
}

/// A valid ring the driver built, then random bytes of the ring and the indirect tables
/// corrupted: the device never panics and agrees with the reference.
#[test]
fn corrupted_valid_rings_never_panic() {
    use vmdev_shm_ring::split::Segment;
    let mut rng = common::Rng::new(42);
    let regions = [(BASE, MEM_SIZE)];
    let mut outcomes = [0u32; 2];
    for round in 0..400 {
        let size = 1 + (round % 13) as u16;
        let rig = PackedRig::new(size);
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
        let mut in_flight = vec![false; size as usize];
        for _ in 0..=added {
            let s = dev.state();
            let expect = reference_walk(
                &rig.dev_mem,
                &regions,
                rig.desc.0,
                size,
                (s.avail_index, s.avail_wrap),
                true,
                &in_flight,
            );
            match dev.pop(&mut c) {
                Ok(true) => {
                    let (segs, id, _) = expect.flatten().expect("reference refuses");
                    check_chain(&rig.dev_mem, &c, &segs);
                    in_flight[id as usize] = true;
                    outcomes[0] += 1;
                }
                Ok(false) => {
                    assert!(expect.is_none());
                    break;
                }
                Err(e) => {
                    assert!(
                        matches!(expect, Some(None)),
                        "device refused a good chain: {e}"
                    );
                    outcomes[1] += 1;
                    break;
                }
            }
        }
    }
    assert!(outcomes[0] > 100 && outcomes[1] > 50, "{outcomes:?}");
}
