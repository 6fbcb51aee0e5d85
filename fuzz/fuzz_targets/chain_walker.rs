//! The device side of a split virtqueue over memory the driver controls completely.
//!
//! Guest memory is two sealed-memfd regions, 64 KiB at 0x10000 and 4 KiB right after it at
//! 0x20000 (adjacent guest addresses, unrelated host mappings: nothing may span them), with
//! dirty logging on. The fuzz input fills the memory, so descriptor tables, avail rings and
//! indirect tables are whatever the bytes say.
//!
//! Input layout (little-endian):
//! * `[0]`  queue size = `1 << (b % 16)`;
//! * `[1]`  bit 0 EVENT_IDX, bit 1 INDIRECT_DESC, bit 2 raw (possibly misaligned) ring
//!   addresses, bit 3 resume at the indices in `[8..12]`;
//! * `[2..8]` desc, avail, used: u16 offsets from 0x10000 - 0x100 (aligned unless raw), so a
//!   ring may start before, inside or across the end of the memory;
//! * `[8..12]` next avail, next used (when resuming);
//! * `[12..16]` per-chain choices: read/write offsets, used lengths, how often to publish;
//! * `[16..]` the contents of guest memory from 0x10000.
//!
//! Every popped chain is checked against a reference walk done here with bounds-checked
//! reads: same segments, and `read_at` returns exactly the guest bytes of the readable
//! ones; `write_at` changes exactly the bytes of the writable ones (in order, aliasing
//! included) and nothing else in the memory; used entries land where the layout says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use vmdev_shm_ring::dirty::{bitmap_len, DirtyLog};
use vmdev_shm_ring::split::{DeviceQueue, RingFeatures, DESC_F_INDIRECT, DESC_F_NEXT};
use vmdev_shm_ring::split::{DESC_F_WRITE, MAX_INDIRECT};
use vmdev_shm_ring::{create_sealed_memfd, Chain, GuestAddr, GuestMemory, SplitLayout};

const A: u64 = 0x10000;
const A_LEN: u64 = 0x10000;
const B: u64 = 0x20000;
const B_LEN: u64 = 0x1000;
const HEADER: usize = 16;
const MAX_CHAINS: usize = 64;
const MAX_WRITE: usize = 8192;

fn memory() -> &'static Arc<GuestMemory> {
    static MEM: OnceLock<Arc<GuestMemory>> = OnceLock::new();
    MEM.get_or_init(|| {
        let mut m = GuestMemory::new();
        for (addr, len) in [(A, A_LEN), (B, B_LEN)] {
            let fd = create_sealed_memfd("fuzz-guest", len).expect("memfd");
            m.add_region(fd, GuestAddr(addr), len, 0).expect("region");
        }
        let blen = bitmap_len(m.region_sizes());
        let fd = create_sealed_memfd("fuzz-dirty", blen).expect("bitmap memfd");
        m.set_dirty_log(Some(DirtyLog::map(fd, blen).expect("bitmap")));
        Arc::new(m)
    })
}

/// The whole guest memory, region A then region B.
fn snapshot(mem: &GuestMemory) -> Vec<u8> {
    let mut v = vec![0u8; (A_LEN + B_LEN) as usize];
    mem.read(GuestAddr(A), &mut v[..A_LEN as usize]).unwrap();
    mem.read(GuestAddr(B), &mut v[A_LEN as usize..]).unwrap();
    v
}

/// Offset of `[addr, addr+len)` in a snapshot, if it lies inside one region.
fn snap_off(addr: u64, len: u64) -> Option<usize> {
    let end = addr.checked_add(len)?;
    if addr >= A && end <= A + A_LEN && addr < A + A_LEN {
        Some((addr - A) as usize)
    } else if addr >= B && end <= B + B_LEN && addr < B + B_LEN {
        Some((addr - B + A_LEN) as usize)
    } else {
        None
    }
}

#[derive(Debug, Clone, Copy)]
struct Seg {
    addr: u64,
    len: u32,
    writable: bool,
}

/// The walk the virtio spec describes, over a snapshot: the segments of the chain at
/// `head`, or `None` where the device must refuse it.
fn reference_walk(
    snap: &[u8],
    desc: u64,
    size: u16,
    indirect_ok: bool,
    head: u16,
) -> Option<Vec<Seg>> {
    let read_desc = |table: u64, i: u32| -> Option<(u64, u32, u16, u16)> {
        let off = snap_off(table + i as u64 * 16, 16)?;
        let b = &snap[off..off + 16];
        Some((
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            u32::from_le_bytes(b[8..12].try_into().unwrap()),
            u16::from_le_bytes(b[12..14].try_into().unwrap()),
            u16::from_le_bytes(b[14..16].try_into().unwrap()),
        ))
    };
    let mut segs = Vec::new();
    let (mut table, mut table_len, mut index) = (desc, size as u32, head as u32);
    let (mut count, mut indirect) = (0u32, false);
    let (mut rlen, mut wlen) = (0u32, 0u32);
    loop {
        if index >= table_len {
            return None;
        }
        count += 1;
        if count > table_len {
            return None;
        }
        let (addr, len, flags, next) = read_desc(table, index)?;
        if flags & DESC_F_INDIRECT != 0 {
            if indirect || !indirect_ok || flags & DESC_F_NEXT != 0 {
                return None;
            }
            if len == 0 || len % 16 != 0 || len / 16 > MAX_INDIRECT {
                return None;
            }
            snap_off(addr, len as u64)?;
            (table, table_len, index, count, indirect) = (addr, len / 16, 0, 0, true);
            continue;
        }
        snap_off(addr, len as u64)?;
        let writable = flags & DESC_F_WRITE != 0;
        if writable {
            wlen = wlen.checked_add(len)?;
        } else {
            if segs.iter().any(|s: &Seg| s.writable) {
                return None;
            }
            rlen = rlen.checked_add(len)?;
        }
        segs.push(Seg {
            addr,
            len,
            writable,
        });
        if flags & DESC_F_NEXT == 0 {
            return Some(segs);
        }
        index = next as u32;
    }
}

fn u16_at(d: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([d[i], d[i + 1]])
}

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER {
        return;
    }
    let (h, contents) = data.split_at(HEADER);
    let mem = memory();
    mem.zero(GuestAddr(A), A_LEN).unwrap();
    mem.zero(GuestAddr(B), B_LEN).unwrap();
    let n = contents.len().min((A_LEN + B_LEN) as usize);
    let na = n.min(A_LEN as usize);
    mem.write(GuestAddr(A), &contents[..na]).unwrap();
    mem.write(GuestAddr(B), &contents[na..n]).unwrap();

    let size = 1u16.wrapping_shl((h[0] % 16) as u32);
    let features = RingFeatures {
        event_idx: h[1] & 1 != 0,
        indirect: h[1] & 2 != 0,
        in_order: false,
    };
    let raw = h[1] & 4 != 0;
    let addr = |i: usize, align: u64| {
        let off = u16_at(h, i) as u64;
        let a = A - 0x100 + off;
        if raw {
            a
        } else {
            a & !(align - 1)
        }
    };
    let (desc, avail, used) = (addr(2, 16), addr(4, 2), addr(6, 4));
    let Ok(mut q) = DeviceQueue::new(
        Arc::clone(mem),
        size,
        GuestAddr(desc),
        GuestAddr(avail),
        GuestAddr(used),
        features,
    ) else {
        return;
    };
    let l = SplitLayout::new(size);
    assert!(
        snap_off(desc, l.desc_len).is_some()
            && snap_off(avail, l.avail_len).is_some()
            && snap_off(used, l.used_len).is_some(),
        "queue accepted with a ring outside the memory"
    );
    if h[1] & 8 != 0 {
        q.set_indices(u16_at(h, 8), u16_at(h, 10));
    }
    let choice = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);

    let mut chain = Chain::new();
    let mut other = Chain::new();
    for i in 0..MAX_CHAINS {
        let before = snapshot(mem);
        let slot = q.next_avail();
        let head = match q.pop(&mut chain) {
            Ok(true) => {
                let off = snap_off(avail + 4 + 2 * (slot & (size - 1)) as u64, 2).unwrap();
                u16::from_le_bytes([before[off], before[off + 1]])
            }
            Ok(false) => break,
            Err(e) => {
                // A chain the device refuses is one the reference refuses too (unless the
                // avail index jumped, which refuses no chain).
                if q.next_avail() != slot {
                    let off = snap_off(avail + 4 + 2 * (slot & (size - 1)) as u64, 2).unwrap();
                    let head = u16::from_le_bytes([before[off], before[off + 1]]);
                    assert!(
                        reference_walk(&before, desc, size, features.indirect, head).is_none(),
                        "the walker refused chain {head} that the reference accepts: {e}"
                    );
                }
                break;
            }
        };
        assert_eq!(chain.head(), head);
        let Some(segs) = reference_walk(&before, desc, size, features.indirect, head) else {
            panic!("the walker accepted chain {head} that the reference refuses: {chain:?}");
        };
        let readable: Vec<&Seg> = segs.iter().filter(|s| !s.writable).collect();
        let writable: Vec<&Seg> = segs.iter().filter(|s| s.writable).collect();
        assert_eq!(chain.num_segments(), segs.len());
        let rlen: u32 = readable.iter().map(|s| s.len).sum();
        let wlen: u32 = writable.iter().map(|s| s.len).sum();
        assert_eq!(chain.readable_len(), rlen);
        assert_eq!(chain.writable_len(), wlen);

        // Reads return exactly the guest bytes of the readable segments.
        let mut expect = Vec::new();
        for s in &readable {
            let o = snap_off(s.addr, s.len as u64).unwrap();
            expect.extend_from_slice(&before[o..o + s.len as usize]);
        }
        let skip = (choice.rotate_left(i as u32) as usize % 64).min(expect.len());
        let want = (expect.len() - skip).min(MAX_WRITE);
        let mut buf = vec![0u8; want + 7];
        let got = chain.read_at(skip, &mut buf);
        assert_eq!(got, buf.len().min(expect.len() - skip));
        assert_eq!(
            &buf[..got],
            &expect[skip..skip + got],
            "read_at returned other bytes"
        );

        // Writes change exactly the writable segments, in order.
        let woff = (choice >> 8) as usize % 32;
        let data: Vec<u8> = (0..(wlen as usize).min(MAX_WRITE))
            .map(|k| (k as u8) ^ 0xa5 ^ i as u8)
            .collect();
        let mut shadow = before.clone();
        let (mut skip, mut done) = (woff, 0usize);
        for s in &writable {
            let len = s.len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(data.len() - done);
            let o = snap_off(s.addr, s.len as u64).unwrap() + skip;
            shadow[o..o + n].copy_from_slice(&data[done..done + n]);
            done += n;
            skip = 0;
            if done == data.len() {
                break;
            }
        }
        let wrote = chain.write_at(woff, &data);
        assert_eq!(wrote, done);
        assert!(
            snapshot(mem) == shadow,
            "write_at changed bytes outside its segments"
        );

        // Every other chain is copied into the next one, as the loopback does.
        if i % 2 == 1 {
            let n = other.copy_part_to(0, &chain);
            assert!(n <= other.readable_len() && n <= chain.writable_len());
        }
        std::mem::swap(&mut chain, &mut other);

        if choice & (1 << (i % 32)) != 0 && i % 5 == 4 {
            q.unpop();
            continue;
        }
        let ulen = if choice & 0x10000 != 0 {
            wrote as u32
        } else {
            u32::MAX
        };
        let uslot = q.next_used();
        q.add_used(head, ulen);
        let off = snap_off(used + 4 + 8 * (uslot & (size - 1)) as u64, 8).unwrap();
        let now = snapshot(mem);
        assert_eq!(
            &now[off..off + 8],
            &[(head as u32).to_le_bytes(), ulen.to_le_bytes()].concat()[..],
            "used element not where the layout puts it"
        );
        if choice & (1 << ((i + 3) % 32)) != 0 {
            q.publish_used();
            let o = snap_off(used + 2, 2).unwrap();
            let idx = u16::from_le_bytes(snapshot(mem)[o..o + 2].try_into().unwrap());
            assert_eq!(idx, q.next_used());
            let _ = q.needs_notification();
        }
        match i % 3 {
            0 => q.disable_notifications(),
            1 => {
                if q.enable_notifications().is_err() {
                    break;
                }
            }
            _ => {}
        }
    }
    q.publish_used();
    let _ = q.needs_notification();
});
