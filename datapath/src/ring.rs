//! One device-side virtqueue, split or packed (VIRTIO_F_RING_PACKED), behind the few
//! operations the back ends use.

use std::sync::Arc;
use vmdev_proto::transport::VqState;
use vmdev_shm_ring::packed::{PackedDeviceQueue, PackedState};
use vmdev_shm_ring::split::RingFeatures;
use vmdev_shm_ring::{Chain, DeviceQueue, GuestAddr, GuestMemory, RingError};

/// The device side of a split or a packed ring.
pub enum Ring {
    /// Split ring (descriptor table, avail ring, used ring).
    Split(DeviceQueue),
    /// Packed ring (descriptor ring, driver and device event suppression).
    Packed(PackedDeviceQueue),
}

impl Ring {
    /// A ring over `mem` at the three addresses (for packed: descriptor ring, driver event
    /// area, device event area), packed when `packed`.
    pub fn new(
        mem: Arc<GuestMemory>,
        size: u16,
        addrs: (u64, u64, u64),
        features: RingFeatures,
        packed: bool,
    ) -> Result<Ring, RingError> {
        let (a, b, c) = (GuestAddr(addrs.0), GuestAddr(addrs.1), GuestAddr(addrs.2));
        Ok(if packed {
            Ring::Packed(PackedDeviceQueue::new(mem, size, a, b, c, features)?)
        } else {
            Ring::Split(DeviceQueue::new(mem, size, a, b, c, features)?)
        })
    }

    /// Takes the next available chain, if any.
    #[inline]
    pub fn pop(&mut self, chain: &mut Chain) -> Result<bool, RingError> {
        match self {
            Ring::Split(r) => r.pop(chain),
            Ring::Packed(r) => r.pop(chain),
        }
    }

    /// Before a batch of up to `max` pops: prefetches what the batch will touch in the
    /// ring (split rings; packed rings learn availability descriptor by descriptor).
    #[inline]
    pub fn prefetch(&mut self, max: u16) -> Result<(), RingError> {
        match self {
            Ring::Split(r) => r.prefetch(max).map(drop),
            Ring::Packed(_) => Ok(()),
        }
    }

    /// Gives the last popped chain back.
    #[inline]
    pub fn unpop(&mut self) {
        match self {
            Ring::Split(r) => r.unpop(),
            Ring::Packed(r) => r.unpop(),
        }
    }

    /// Records chain `head` (buffer id) as used with `len` bytes written.
    #[inline]
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), RingError> {
        match self {
            Ring::Split(r) => {
                r.add_used(head, len);
                Ok(())
            }
            Ring::Packed(r) => r.add_used(head, len),
        }
    }

    /// Makes the recorded used entries visible (one release store).
    #[inline]
    pub fn publish_used(&mut self) {
        match self {
            Ring::Split(r) => r.publish_used(),
            Ring::Packed(r) => r.publish_used(),
        }
    }

    /// Whether the driver asked to be notified of what was just published.
    #[inline]
    pub fn needs_notification(&mut self) -> bool {
        match self {
            Ring::Split(r) => r.needs_notification(),
            Ring::Packed(r) => r.needs_notification(),
        }
    }

    /// Asks the driver not to kick.
    pub fn disable_notifications(&mut self) {
        match self {
            Ring::Split(r) => r.disable_notifications(),
            Ring::Packed(r) => r.disable_notifications(),
        }
    }

    /// Asks the driver to kick again; true if work arrived meanwhile.
    pub fn enable_notifications(&mut self) -> Result<bool, RingError> {
        match self {
            Ring::Split(r) => r.enable_notifications(),
            Ring::Packed(r) => r.enable_notifications(),
        }
    }

    /// Where the ring stands (every popped chain is completed).
    pub fn state(&self) -> VqState {
        match self {
            Ring::Split(r) => VqState::Split {
                avail_index: r.next_avail(),
                used_index: r.next_used(),
            },
            Ring::Packed(r) => {
                let s = r.state();
                VqState::Packed {
                    avail_index: s.avail_index,
                    avail_wrap: s.avail_wrap,
                    used_index: s.used_index,
                    used_wrap: s.used_wrap,
                }
            }
        }
    }

    /// Resumes the ring at `st`; a state of the other ring kind, or out of the ring, is an
    /// error.
    pub fn set_state(&mut self, st: VqState) -> Result<(), String> {
        match (self, st) {
            (
                Ring::Split(r),
                VqState::Split {
                    avail_index,
                    used_index,
                },
            ) => {
                r.set_indices(avail_index, used_index);
                Ok(())
            }
            (
                Ring::Packed(r),
                VqState::Packed {
                    avail_index,
                    avail_wrap,
                    used_index,
                    used_wrap,
                },
            ) => r
                .set_state(PackedState {
                    avail_index,
                    avail_wrap,
                    used_index,
                    used_wrap,
                })
                .map_err(|e| e.to_string()),
            (Ring::Split(_), _) => Err("a packed-ring state for a split ring".into()),
            (Ring::Packed(_), _) => Err("a split-ring state for a packed ring".into()),
        }
    }
}
