//! One driver-side virtqueue, split or packed (VIRTIO_F_RING_PACKED), behind the few
//! operations [`crate::NetDriver`] uses — the driver-side twin of the datapath's
//! `ring.rs`.
//!
//! The two forms differ where the caller can see it in one place: what [`DriverRing::add`]
//! returns and [`DriverRing::pop_used`] gives back is a descriptor head for a split ring and
//! a buffer id for a packed ring. Either way the value `pop_used` returns is one that `add`
//! (or `add_indirect`) returned for a chain still in flight, and is below
//! [`DriverRing::size`], so a caller maps it to its buffer with a table of `size` entries.

use std::sync::Arc;
use vmdev_shm_ring::split::{RingFeatures, Segment};
use vmdev_shm_ring::{
    DriverQueue, GuestAddr, GuestMemory, PackedDriverQueue, PackedLayout, RingError, SplitLayout,
};

/// The driver side of a split or a packed ring.
///
/// With VIRTIO_F_IN_ORDER in `features`, a split ring refuses a chain the device returns
/// before one made available earlier ([`RingError::OutOfOrder`]); a packed ring reads a
/// used id as covering every chain up to it and returns them oldest first.
pub struct DriverRing {
    form: Form,
}

enum Form {
    Split(DriverQueue),
    Packed(PackedDriverQueue),
}

/// Byte offsets of a queue's three areas from a 64-byte-aligned base, and their total
/// length: (descriptor area, driver area, device area, total), for a split ring
/// (descriptor table, avail ring, used ring) or a packed ring (descriptor ring, driver
/// event suppression, device event suppression).
pub fn ring_offsets(size: u16, packed: bool) -> (u64, u64, u64, u64) {
    if packed {
        PackedLayout::new(size).packed_offsets()
    } else {
        SplitLayout::new(size).packed_offsets()
    }
}

impl DriverRing {
    /// A ring of `size` over `mem` at the three guest addresses (for packed: descriptor
    /// ring, driver event area, device event area), packed when `packed`. Zeroes the
    /// ring's memory.
    pub fn new(
        mem: Arc<GuestMemory>,
        size: u16,
        addrs: (u64, u64, u64),
        features: RingFeatures,
        packed: bool,
    ) -> Result<DriverRing, RingError> {
        let (a, b, c) = (GuestAddr(addrs.0), GuestAddr(addrs.1), GuestAddr(addrs.2));
        let form = if packed {
            Form::Packed(PackedDriverQueue::new(mem, size, a, b, c, features)?)
        } else {
            Form::Split(DriverQueue::new(mem, size, a, b, c, features)?)
        };
        Ok(DriverRing { form })
    }

    /// Whether this is a packed ring.
    pub fn is_packed(&self) -> bool {
        matches!(self.form, Form::Packed(_))
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        match &self.form {
            Form::Split(r) => r.size(),
            Form::Packed(r) => r.size(),
        }
    }

    /// Moves the ring to another mapping of the same guest addresses, keeping every
    /// position and chain in flight.
    pub fn remap(&mut self, mem: Arc<GuestMemory>) -> Result<(), RingError> {
        match &mut self.form {
            Form::Split(r) => r.remap(mem),
            Form::Packed(r) => r.remap(mem),
        }
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        match &self.form {
            Form::Split(r) => r.free_descriptors(),
            Form::Packed(r) => r.free_descriptors(),
        }
    }

    /// Chains added and not yet returned by the device.
    pub fn in_flight(&self) -> usize {
        match &self.form {
            Form::Split(r) => r.in_flight(),
            Form::Packed(r) => r.in_flight(),
        }
    }

    /// Adds a chain of direct descriptors; returns its token (split: head descriptor,
    /// packed: buffer id), or `None` if the ring lacks free descriptors. Not visible to the
    /// device until [`DriverRing::publish`].
    #[inline]
    pub fn add(&mut self, segs: &[Segment]) -> Option<u16> {
        match &mut self.form {
            Form::Split(r) => r.add(segs),
            Form::Packed(r) => r.add(segs),
        }
    }

    /// Adds a chain through an indirect table the caller placed at `table` (room for
    /// `segs.len()` descriptors of 16 bytes, the same size in both ring forms); returns its
    /// token as [`DriverRing::add`] does.
    #[inline]
    pub fn add_indirect(
        &mut self,
        table: GuestAddr,
        segs: &[Segment],
    ) -> Result<Option<u16>, RingError> {
        match &mut self.form {
            Form::Split(r) => r.add_indirect(table, segs),
            Form::Packed(r) => r.add_indirect(table, segs),
        }
    }

    /// Makes every chain added so far visible to the device (one release store).
    #[inline]
    pub fn publish(&mut self) {
        match &mut self.form {
            Form::Split(r) => r.publish(),
            Form::Packed(r) => r.publish(),
        }
    }

    /// After publishing: whether the device asked to be kicked.
    #[inline]
    pub fn needs_kick(&mut self) -> bool {
        match &mut self.form {
            Form::Split(r) => r.needs_kick(),
            Form::Packed(r) => r.needs_kick(),
        }
    }

    /// Takes the next used chain: the token [`DriverRing::add`] returned for it and the
    /// length the device wrote. A token the driver never handed out is an error, and so is,
    /// on a split ring under IN_ORDER, one returned out of order.
    #[inline]
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>, RingError> {
        match &mut self.form {
            Form::Split(r) => r.pop_used(),
            Form::Packed(r) => r.pop_used(),
        }
    }

    /// Calls `f` with the tokens of used chains worth prefetching now, after the driver took
    /// one (hints, unvalidated): on split rings the one `ahead` places after the next one,
    /// if published; on packed rings, which have no used index to say how far the device
    /// got, when the driver just reached a descriptor line, each of the next `ahead` the
    /// device has marked used ([`PackedDriverQueue::peek_used_ahead`]).
    #[inline]
    pub fn peek_used(&self, ahead: u16, mut f: impl FnMut(u16)) {
        match &self.form {
            Form::Split(r) => {
                if let Some(t) = r.peek_used(ahead) {
                    f(t)
                }
            }
            Form::Packed(r) => r.peek_used_ahead(ahead, f),
        }
    }

    /// The buffer id the device will most likely return next: a prefetch hint.
    #[inline]
    pub fn next_used_hint(&self) -> Option<u16> {
        match &self.form {
            Form::Split(r) => r.next_used_hint(),
            Form::Packed(r) => r.next_used_hint(),
        }
    }

    /// Asks the device to notify on the next used buffer, then re-checks: `true` when used
    /// buffers are already waiting (do not sleep).
    pub fn enable_interrupts(&mut self) -> bool {
        match &mut self.form {
            Form::Split(r) => r.enable_interrupts(),
            Form::Packed(r) => r.enable_interrupts(),
        }
    }

    /// Asks the device not to notify (while the driver polls).
    pub fn disable_interrupts(&mut self) {
        match &mut self.form {
            Form::Split(r) => r.disable_interrupts(),
            Form::Packed(r) => r.disable_interrupts(),
        }
    }

    /// The memory this ring lives in.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        match &self.form {
            Form::Split(r) => r.memory(),
            Form::Packed(r) => r.memory(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmdev_shm_ring::create_sealed_memfd;
    use vmdev_shm_ring::PackedDeviceQueue;

    const BASE: u64 = 0x10_0000;

    fn memory(len: u64) -> Arc<GuestMemory> {
        let fd = create_sealed_memfd("driver-ring-test", len).expect("memfd");
        let mut mem = GuestMemory::new();
        mem.add_region(fd, GuestAddr(BASE), len, 0).expect("map");
        Arc::new(mem)
    }

    /// A driver ring of `size` at the start of fresh memory: the memory, the ring, its three
    /// guest addresses (for the device side) and the first address past it.
    fn ring(size: u16, packed: bool) -> (Arc<GuestMemory>, DriverRing, [GuestAddr; 3], u64) {
        ring_with(size, packed, RingFeatures::default())
    }

    fn ring_with(
        size: u16,
        packed: bool,
        rf: RingFeatures,
    ) -> (Arc<GuestMemory>, DriverRing, [GuestAddr; 3], u64) {
        let (d, a, u, total) = ring_offsets(size, packed);
        let mem = memory(4096 + total);
        let addrs = (BASE + d, BASE + a, BASE + u);
        let drv = DriverRing::new(Arc::clone(&mem), size, addrs, rf, packed).expect("ring");
        let ga = [GuestAddr(addrs.0), GuestAddr(addrs.1), GuestAddr(addrs.2)];
        (mem, drv, ga, BASE + total)
    }

    #[test]
    fn packed_tokens_are_buffer_ids_that_come_back_from_pop_used() {
        let size = 5; // not a power of two
        let (mem, mut drv, [a, b, c], buf) = ring(size, true);
        assert!(drv.is_packed());
        let rf = RingFeatures::default();
        let mut dev = PackedDeviceQueue::new(mem, size, a, b, c, rf).expect("device");
        let seg = |i: u64| Segment {
            addr: GuestAddr(buf + i * 64),
            len: 64,
            writable: true,
        };
        let mut chain = vmdev_shm_ring::Chain::default();
        // Many rounds so the positions wrap several times with an odd size.
        for round in 0..20u32 {
            let t1 = drv.add(&[seg(0), seg(1)]).expect("room");
            let t2 = drv.add(&[seg(2)]).expect("room");
            assert_eq!(drv.free_descriptors(), 2);
            drv.publish();
            assert_eq!(drv.in_flight(), 2);
            // The device completes them in reverse order.
            let mut ids = Vec::new();
            while dev.pop(&mut chain).expect("pop") {
                ids.push(chain.head());
            }
            assert_eq!(ids, [t1, t2]);
            dev.add_used(t2, 7 + round).expect("used");
            dev.add_used(t1, 9).expect("used");
            dev.publish_used();
            assert_eq!(drv.pop_used().expect("ok"), Some((t2, 7 + round)));
            assert_eq!(drv.pop_used().expect("ok"), Some((t1, 9)));
            assert_eq!(drv.pop_used().expect("ok"), None);
            assert_eq!(drv.free_descriptors(), size as usize);
        }
    }

    #[test]
    fn split_tokens_are_heads() {
        let size = 8;
        let (_mem, mut drv, _, buf) = ring(size, false);
        assert!(!drv.is_packed());
        let t = drv
            .add(&[Segment {
                addr: GuestAddr(buf),
                len: 64,
                writable: false,
            }])
            .expect("room");
        assert!(t < size);
        drv.publish();
        assert_eq!(drv.in_flight(), 1);
        assert_eq!(drv.pop_used().expect("ok"), None);
    }

    /// A split ring whose device returns chains 2, 1, 3: `peek_used` sees what follows the
    /// next one. Under IN_ORDER, chain 2 alone is refused (it could only be one entry for a
    /// batch of 1 and 2, and the used index moved by one) and the queue does not move; with
    /// 1 and 3 returned after it, the entries read as a batch up to 2, then 3.
    #[test]
    fn split_peek_and_the_in_order_check() {
        for in_order in [false, true] {
            let size = 8;
            let rf = RingFeatures {
                in_order,
                ..RingFeatures::default()
            };
            let (mem, mut drv, [a, b, c], buf) = ring_with(size, false, rf);
            let mut dev = vmdev_shm_ring::DeviceQueue::new(mem, size, a, b, c, rf).expect("device");
            let seg = Segment {
                addr: GuestAddr(buf),
                len: 64,
                writable: true,
            };
            let t: Vec<u16> = (0..3).map(|_| drv.add(&[seg]).expect("room")).collect();
            drv.publish();
            let mut chain = vmdev_shm_ring::Chain::default();
            while dev.pop(&mut chain).expect("pop") {}
            if in_order {
                dev.add_used(t[1], 11);
                dev.publish_used();
                for _ in 0..2 {
                    assert!(matches!(
                        drv.pop_used(),
                        Err(RingError::OutOfOrder { expected: Some(e), got: g }) if e == t[0] && g == t[1]
                    ));
                }
                assert_eq!(drv.in_flight(), 3, "nothing was taken");
                dev.add_used(t[0], 10);
                dev.add_used(t[2], 12);
                dev.publish_used();
                assert_eq!(drv.pop_used().expect("ok"), Some((t[0], 0)));
                assert_eq!(drv.pop_used().expect("ok"), Some((t[1], 11)));
                assert_eq!(drv.pop_used().expect("ok"), Some((t[2], 12)));
                continue;
            }
            for i in [1, 0, 2] {
                dev.add_used(t[i], 10 + i as u32);
            }
            dev.publish_used();
            assert_eq!(drv.pop_used().expect("ok"), Some((t[1], 11)));
            let peek = |ahead| {
                let mut v = None;
                drv.peek_used(ahead, |t| v = Some(t));
                v
            };
            assert_eq!(peek(0), Some(t[0]));
            assert_eq!(peek(1), Some(t[2]));
            assert_eq!(peek(2), None);
        }
    }
}
