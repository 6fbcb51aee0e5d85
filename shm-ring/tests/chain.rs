//! `Chain`: read_at / write_at at any offset, and copy_to across arbitrary segmentations.

mod common;

use common::*;
use proptest::collection::vec;
use proptest::prelude::*;
use std::sync::Arc;
use vmdev_shm_ring::split::Segment;
use vmdev_shm_ring::{Chain, DeviceQueue, DriverQueue, GuestAddr};

const SENT: u8 = 0x5A;

/// Lays `segs` (readable first) out from `at` with `gap` bytes between them, adds them as
/// one chain (directly or through an indirect table after the data), and pops it.
fn make_chain(
    drv: &mut DriverQueue,
    dev: &mut DeviceQueue,
    segs: &[(u32, bool)],
    indirect: bool,
    at: u64,
    gap: u64,
) -> (Chain, Vec<(u64, u32, bool)>) {
    let mut placed = Vec::new();
    let mut cursor = at;
    for &(len, w) in segs {
        placed.push((cursor, len, w));
        cursor += len as u64 + gap;
    }
    let s: Vec<Segment> = placed
        .iter()
        .map(|&(a, len, writable)| Segment {
            addr: GuestAddr(a),
            len,
            writable,
        })
        .collect();
    let head = if indirect {
        drv.add_indirect(GuestAddr((cursor + 15) & !15), &s)
            .unwrap()
    } else {
        drv.add(&s)
    }
    .unwrap();
    drv.publish();
    let mut c = Chain::new();
    assert!(dev.pop(&mut c).unwrap());
    assert_eq!(c.head(), head);
    (c, placed)
}

fn gather(rig: &Rig, placed: &[(u64, u32, bool)], writable: bool) -> Vec<u8> {
    placed
        .iter()
        .filter(|s| s.2 == writable)
        .flat_map(|&(a, l, _)| rig.read_vec(a, l as usize))
        .collect()
}

fn fill(rig: &Rig, placed: &[(u64, u32, bool)], writable: bool, data: &[u8]) {
    let mut off = 0;
    for &(a, l, _) in placed.iter().filter(|s| s.2 == writable) {
        rig.drv_mem
            .write(GuestAddr(a), &data[off..off + l as usize])
            .unwrap();
        off += l as usize;
    }
}

fn seg_lens(max_n: usize, max_len: u32) -> impl Strategy<Value = Vec<u32>> {
    vec(prop_oneof![1 => Just(0u32), 6 => 1..=max_len], 0..=max_n)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// copy_to puts the source's readable bytes at the start of the destination's writable
    /// segments, whatever the two segmentations; it leaves everything else alone; and it
    /// copies nothing when the bytes do not fit.
    #[test]
    fn copy_to_across_segmentations(
        src_r in seg_lens(8, 64).prop_filter("non-empty chain", |v| !v.is_empty()),
        src_w in seg_lens(3, 32),
        dst_r in seg_lens(3, 32),
        dst_w in seg_lens(8, 64),
        src_ind in any::<bool>(),
        dst_ind in any::<bool>(),
        gap in 0u64..8,
        seed in any::<u64>(),
    ) {
        prop_assume!(!(dst_r.is_empty() && dst_w.is_empty()));
        let rig = Rig::new(32);
        let mut drv = rig.driver(ALL_FEATURES);
        let mut dev = rig.device(ALL_FEATURES);
        let mut rng = common::Rng::new(seed);
        let segs = |r: &[u32], w: &[u32]| -> Vec<(u32, bool)> {
            r.iter().map(|&l| (l, false)).chain(w.iter().map(|&l| (l, true))).collect()
        };
        rig.drv_mem.write(GuestAddr(rig.data), &[SENT; 0x4000]).unwrap();
        let (src, sp) = make_chain(&mut drv, &mut dev, &segs(&src_r, &src_w), src_ind, rig.data, gap);
        let (dst, dp) = make_chain(&mut drv, &mut dev, &segs(&dst_r, &dst_w), dst_ind, rig.data + 0x2000, gap);
        let src_bytes = rng.bytes(src.readable_len() as usize);
        fill(&rig, &sp, false, &src_bytes);
        let dst_readable = rng.bytes(dst.readable_len() as usize);
        fill(&rig, &dp, false, &dst_readable);
        let before = rig.read_vec(rig.data, 0x4000);

        let n = src.readable_len() as usize;
        let room = dst.writable_len() as usize;
        let got = src.copy_to(&dst);
        if n <= room {
            prop_assert_eq!(got, Some(n as u32));
            let w = gather(&rig, &dp, true);
            prop_assert_eq!(&w[..n], &src_bytes[..]);
            prop_assert!(w[n..].iter().all(|&b| b == SENT), "wrote past the copied bytes");
            prop_assert_eq!(gather(&rig, &dp, false), dst_readable);
            prop_assert_eq!(gather(&rig, &sp, false), src_bytes.clone());
            prop_assert!(gather(&rig, &sp, true).iter().all(|&b| b == SENT));
            // What the destination chain reads back through write/read is consistent.
            let mut back = vec![0u8; n];
            let mut off = 0;
            for &(a, l, _) in dp.iter().filter(|s| s.2) {
                let take = (l as usize).min(n - off);
                back[off..off + take].copy_from_slice(&rig.read_vec(a, take));
                off += take;
                if off == n { break; }
            }
            prop_assert_eq!(back, src_bytes);
        } else {
            prop_assert_eq!(got, None);
            prop_assert!(rig.read_vec(rig.data, 0x4000) == before, "a refused copy changed memory");
        }
    }

    /// write_at_if_changed leaves memory as write_at would (whether or not the bytes were
    /// already there), and copy_part_to_at copies like slicing both concatenations, from any
    /// source offset to any destination offset.
    #[test]
    fn write_if_changed_and_copy_between_offsets(
        src_r in seg_lens(6, 40).prop_filter("non-empty", |v| !v.is_empty()),
        dst_w in seg_lens(6, 40).prop_filter("non-empty", |v| !v.is_empty()),
        src_off in 0u32..200,
        dst_off in 0u32..200,
        woff in 0usize..200,
        wlen in 0usize..80,
        same in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let rig = Rig::new(16);
        let mut drv = rig.driver(ALL_FEATURES);
        let mut dev = rig.device(ALL_FEATURES);
        let mut rng = common::Rng::new(seed);
        rig.drv_mem.write(GuestAddr(rig.data), &[SENT; 0x2000]).unwrap();
        let r: Vec<(u32, bool)> = src_r.iter().map(|&l| (l, false)).collect();
        let w: Vec<(u32, bool)> = dst_w.iter().map(|&l| (l, true)).collect();
        let (src, sp) = make_chain(&mut drv, &mut dev, &r, false, rig.data, 2);
        let (dst, dp) = make_chain(&mut drv, &mut dev, &w, false, rig.data + 0x1000, 2);
        let src_bytes = rng.bytes(src.readable_len() as usize);
        fill(&rig, &sp, false, &src_bytes);
        let mut model = vec![SENT; dst.writable_len() as usize];

        let start = woff.min(model.len());
        let room = model.len() - start;
        let data = if same {
            model[start..start + wlen.min(room)].to_vec()
        } else {
            rng.bytes(wlen)
        };
        let n = dst.write_at_if_changed(woff, &data);
        prop_assert_eq!(n, room.min(data.len()));
        model[start..start + n].copy_from_slice(&data[..n]);
        prop_assert_eq!(gather(&rig, &dp, true), model.clone());

        let (so, d0) = (src_off as usize, dst_off as usize);
        let n = src.copy_part_to_at(src_off, &dst, dst_off) as usize;
        let expect = src_bytes.len().saturating_sub(so).min(model.len().saturating_sub(d0));
        prop_assert_eq!(n, expect);
        if n > 0 {
            model[d0..d0 + n].copy_from_slice(&src_bytes[so..so + n]);
        }
        prop_assert_eq!(gather(&rig, &dp, true), model);
        prop_assert_eq!(gather(&rig, &sp, false), src_bytes);
    }

    /// read_at and write_at behave like slicing the concatenation of the segments.
    #[test]
    fn read_and_write_at_any_offset(
        r in seg_lens(6, 40),
        w in seg_lens(6, 40),
        indirect in any::<bool>(),
        ops in vec((any::<bool>(), 0usize..300, 0usize..200), 1..20),
        seed in any::<u64>(),
    ) {
        prop_assume!(!(r.is_empty() && w.is_empty()));
        let rig = Rig::new(16);
        let mut drv = rig.driver(ALL_FEATURES);
        let mut dev = rig.device(ALL_FEATURES);
        let mut rng = common::Rng::new(seed);
        let segs: Vec<(u32, bool)> =
            r.iter().map(|&l| (l, false)).chain(w.iter().map(|&l| (l, true))).collect();
        rig.drv_mem.write(GuestAddr(rig.data), &[SENT; 0x1000]).unwrap();
        let (c, placed) = make_chain(&mut drv, &mut dev, &segs, indirect, rig.data, 3);
        let readable = rng.bytes(c.readable_len() as usize);
        fill(&rig, &placed, false, &readable);
        let mut model_w = vec![SENT; c.writable_len() as usize];
        for (is_write, off, len) in ops {
            if is_write {
                let data = rng.bytes(len);
                let n = c.write_at(off, &data);
                let expect = model_w.len().saturating_sub(off).min(len);
                prop_assert_eq!(n, expect);
                let start = off.min(model_w.len());
                model_w[start..start + n].copy_from_slice(&data[..n]);
            } else {
                let mut buf = vec![0xC3u8; len];
                let n = c.read_at(off, &mut buf);
                let expect = readable.len().saturating_sub(off).min(len);
                prop_assert_eq!(n, expect);
                prop_assert_eq!(&buf[..n], &readable[off.min(readable.len())..][..n]);
                prop_assert!(buf[n..].iter().all(|&b| b == 0xC3), "read_at wrote past its count");
            }
            prop_assert_eq!(gather(&rig, &placed, true), model_w.clone());
            prop_assert_eq!(gather(&rig, &placed, false), readable.clone());
        }
    }
}

#[test]
fn empty_chain() {
    let c = Chain::new();
    assert_eq!(
        (
            c.head(),
            c.readable_len(),
            c.writable_len(),
            c.num_segments()
        ),
        (0, 0, 0, 0)
    );
    assert_eq!(c.read_at(0, &mut [0u8; 4]), 0);
    assert_eq!(c.write_at(0, &[1, 2, 3]), 0);
    assert_eq!(c.copy_to(&Chain::default()), Some(0));
    assert!(format!("{c:?}").contains("Chain"));
}

#[test]
fn copy_to_edge_cases() {
    let rig = Rig::new(16);
    let mut drv = rig.driver(ALL_FEATURES);
    let mut dev = rig.device(ALL_FEATURES);
    let d = rig.data;
    rig.drv_mem.write(GuestAddr(d), &[SENT; 0x4000]).unwrap();
    rig.drv_mem.write(GuestAddr(d), b"abcdefgh").unwrap();

    // Readable-only source into a destination with no writable space: None; zero-length
    // source fits anywhere.
    let (src, _) = make_chain(&mut drv, &mut dev, &[(8, false)], false, d, 0);
    let (no_room, _) = make_chain(&mut drv, &mut dev, &[(4, false)], false, d + 0x100, 0);
    assert_eq!(src.copy_to(&no_room), None);
    let (zero, _) = make_chain(&mut drv, &mut dev, &[(0, false)], false, d + 0x200, 0);
    assert_eq!(zero.copy_to(&no_room), Some(0));
    // One byte short: refused, nothing written.
    let (short, sp) = make_chain(
        &mut drv,
        &mut dev,
        &[(3, true), (0, true), (4, true)],
        true,
        d + 0x300,
        1,
    );
    assert_eq!(src.copy_to(&short), None);
    assert!(gather(&rig, &sp, true).iter().all(|&b| b == SENT));
    // Exactly enough, with zero-length segments in between.
    let (exact, ep) = make_chain(
        &mut drv,
        &mut dev,
        &[(0, true), (3, true), (0, true), (5, true), (0, true)],
        false,
        d + 0x400,
        2,
    );
    assert_eq!(src.copy_to(&exact), Some(8));
    assert_eq!(gather(&rig, &ep, true), b"abcdefgh");
    // A chain copied into itself: its readable bytes land in its own writable part.
    let (both, bp) = make_chain(
        &mut drv,
        &mut dev,
        &[(4, false), (2, true), (2, true)],
        false,
        d,
        0,
    );
    assert_eq!(both.copy_to(&both), Some(4));
    assert_eq!(gather(&rig, &bp, true), b"abcd");
    // Source and destination alias the same bytes (a hostile driver may do that).
    let (same_w, _) = make_chain(&mut drv, &mut dev, &[(8, true)], false, d, 0);
    rig.drv_mem.write(GuestAddr(d), b"abcdefgh").unwrap();
    assert_eq!(src.copy_to(&same_w), Some(8));
    assert_eq!(rig.read_vec(d, 8), b"abcdefgh");
    let (shifted, _) = make_chain(&mut drv, &mut dev, &[(8, true)], false, d + 3, 0);
    assert_eq!(src.copy_to(&shifted), Some(8), "overlapping copy completes");
}

/// A chain keeps its memory mapped after the queue and every other handle are gone, and a
/// chain buffer reused across queues of different memories follows the newest one.
#[test]
fn chain_keeps_memory_alive() {
    let mut c = Chain::new();
    {
        let rig = Rig::new(4);
        let mut drv = rig.driver(NO_FEATURES);
        let mut dev = rig.device(NO_FEATURES);
        rig.drv_mem
            .write(GuestAddr(rig.data), b"still here")
            .unwrap();
        drv.add(&[Segment {
            addr: GuestAddr(rig.data),
            len: 10,
            writable: false,
        }])
        .unwrap();
        drv.publish();
        assert!(dev.pop(&mut c).unwrap());
        assert_eq!(Arc::strong_count(&rig.dev_mem), 3); // rig, dev, chain
    }
    let mut b = [0u8; 10];
    assert_eq!(c.read_at(0, &mut b), 10);
    assert_eq!(&b, b"still here");

    // Reuse with another memory.
    let rig2 = Rig::new(4);
    let mut drv = rig2.driver(NO_FEATURES);
    let mut dev = rig2.device(NO_FEATURES);
    rig2.drv_mem.write(GuestAddr(rig2.data), b"new").unwrap();
    drv.add(&[Segment {
        addr: GuestAddr(rig2.data),
        len: 3,
        writable: false,
    }])
    .unwrap();
    drv.publish();
    assert!(dev.pop(&mut c).unwrap());
    assert_eq!(Arc::strong_count(&rig2.dev_mem), 3);
    assert_eq!(c.read_at(0, &mut b), 3);
    assert_eq!(&b[..3], b"new");
    assert_eq!(c.num_segments(), 1);
}

#[test]
fn chain_is_send() {
    fn is_send<T: Send>() {}
    is_send::<Chain>();
    is_send::<DeviceQueue>();
    is_send::<DriverQueue>();
}
