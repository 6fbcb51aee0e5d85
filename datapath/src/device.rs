//! A device attached to this datapath: the driver's memory mapped once, its queues'
//! device sides, their eventfds and counters, and the back end that gives it behaviour.

use crate::net_loopback::NetLoopback;
use crate::ring::Ring;
use crate::uring::Uring;
use crossbeam_utils::CachePadded;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use vmdev_proto::datapath::AttachSpec;
use vmdev_proto::transport::{DeviceStats, QueueStats, VqState};
use vmdev_proto::virtio::features::RING_PACKED;
use vmdev_proto::{ErrorCode, WireError};
use vmdev_shm_ring::dirty::DirtyLog;
use vmdev_shm_ring::memory::SealPolicy;
use vmdev_shm_ring::split::RingFeatures;
use vmdev_shm_ring::{GuestAddr, GuestMemory, RingError};

/// One virtqueue as the datapath services it.
pub struct QueueCtx {
    /// Queue index in the device.
    pub index: u16,
    /// The device side of the ring (split or packed).
    pub ring: Ring,
    /// Counters (own cache line: stats replies read them between passes).
    pub stats: CachePadded<QueueStats>,
    kick: OwnedFd,
    kick_slot: usize,
    call: Option<OwnedFd>,
    /// Used entries published since the last notification decision.
    unsignalled: bool,
}

impl QueueCtx {
    /// Makes the used entries added so far visible to the driver (one release store); the
    /// interrupt decision waits for [`QueueCtx::notify`].
    #[inline]
    pub fn publish(&mut self) {
        self.ring.publish_used();
        self.unsignalled = true;
    }

    /// If anything was published since the last decision and the driver asked for it,
    /// queues an interrupt.
    pub fn notify(&mut self, uring: &mut Uring) {
        if !self.unsignalled {
            return;
        }
        self.unsignalled = false;
        if self.ring.needs_notification() {
            if let Some(call) = &self.call {
                match uring.signal(call.as_fd()) {
                    Ok(()) => self.stats.calls += 1,
                    Err(e) => {
                        tracing::warn!(queue = self.index, "cannot signal the call eventfd: {e}")
                    }
                }
            }
        }
    }
}

/// The behaviour of a device type.
pub enum Backend {
    /// Every transmitted frame comes back on the receive queue.
    NetLoopback(NetLoopback),
}

/// An attached device.
pub struct Device {
    /// The control plane's handle.
    pub handle: u64,
    /// Its queues, by position in the attach spec.
    pub queues: Vec<QueueCtx>,
    mem: Arc<GuestMemory>,
    backend: Backend,
}

fn bad(code: ErrorCode, e: impl std::fmt::Display) -> WireError {
    WireError::new(code, e.to_string())
}

impl Device {
    /// Maps the driver's memory and sets up every queue of `spec`; `fds` in wire order.
    pub fn attach(
        spec: AttachSpec,
        fds: Vec<OwnedFd>,
        uring: &mut Uring,
    ) -> Result<Device, WireError> {
        let mut fds = fds.into_iter();
        let mut mem = GuestMemory::new();
        for r in &spec.regions {
            let fd = fds
                .next()
                .ok_or_else(|| bad(ErrorCode::MissingFd, "missing region memfd"))?;
            let policy = if spec.trust_unsealed {
                SealPolicy::Trusted
            } else {
                SealPolicy::Required
            };
            mem.add_region_with(fd, GuestAddr(r.guest_addr), r.size, r.offset, policy)
                .map_err(|e| bad(ErrorCode::BadMemory, e))?;
        }
        let mem = Arc::new(mem);
        let features = RingFeatures::from_bits(spec.features);
        let mut queues: Vec<QueueCtx> = Vec::new();
        let mut result = Ok(());
        for q in &spec.queues {
            let kick = if q.has_kick { fds.next() } else { None };
            let call = if q.has_call { fds.next() } else { None };
            let Some(kick) = kick else {
                result = Err(bad(
                    ErrorCode::MissingFd,
                    format!("queue {} has no kick eventfd", q.index),
                ));
                break;
            };
            let packed = spec.features & RING_PACKED != 0;
            let mut ring = match Ring::new(
                Arc::clone(&mem),
                q.size,
                (q.desc, q.driver, q.device),
                features,
                packed,
            ) {
                Ok(r) => r,
                Err(e) => {
                    result = Err(bad(
                        ErrorCode::BadAddress,
                        format!("queue {}: {e}", q.index),
                    ));
                    break;
                }
            };
            let state = if spec.recover {
                // Where the dead datapath left the ring: everything up to the published used
                // index is done; chains it took but never completed are taken again. (A
                // packed ring keeps no used index in memory: not recoverable this way.)
                let mut idx = [0u8; 2];
                match mem.read(GuestAddr(q.device.wrapping_add(2)), &mut idx) {
                    Ok(()) if !packed => {
                        let u = u16::from_le_bytes(idx);
                        VqState::Split {
                            avail_index: u,
                            used_index: u,
                        }
                    }
                    Ok(()) => {
                        result = Err(bad(
                            ErrorCode::BadQueue,
                            format!("queue {}: a packed ring cannot be recovered", q.index),
                        ));
                        break;
                    }
                    Err(e) => {
                        result = Err(bad(
                            ErrorCode::BadAddress,
                            format!("queue {}: {e}", q.index),
                        ));
                        break;
                    }
                }
            } else {
                q.state
            };
            if let Err(e) = ring.set_state(state) {
                result = Err(bad(ErrorCode::BadQueue, format!("queue {}: {e}", q.index)));
                break;
            }
            let kick_slot = match uring.arm_kick(kick.as_fd()) {
                Ok(Some(s)) => s,
                Ok(None) => {
                    result = Err(bad(
                        ErrorCode::NoCapacity,
                        "no free kick slot on this datapath",
                    ));
                    break;
                }
                Err(e) => {
                    result = Err(bad(ErrorCode::Datapath, e));
                    break;
                }
            };
            ring.disable_notifications();
            queues.push(QueueCtx {
                index: q.index,
                ring,
                stats: CachePadded::new(QueueStats::default()),
                kick,
                kick_slot,
                call,
                unsignalled: false,
            });
        }
        let backend = result.and_then(|_| match spec.device_type.as_str() {
            "net-loopback" => {
                NetLoopback::new(&queues, spec.features, spec.num_queues).map(Backend::NetLoopback)
            }
            t => Err(bad(
                ErrorCode::NoSuchType,
                format!("this datapath has no type '{t}'"),
            )),
        });
        let backend = backend.and_then(|b| {
            if spec.dirty_log {
                let fd = fds
                    .next()
                    .ok_or_else(|| bad(ErrorCode::MissingFd, "missing dirty bitmap memfd"))?;
                set_dirty_log(&mem, Some(fd))?;
            }
            Ok(b)
        });
        match backend {
            Ok(backend) => Ok(Device {
                handle: spec.handle,
                queues,
                mem,
                backend,
            }),
            Err(e) => {
                release_queues(&queues, uring);
                Err(e)
            }
        }
    }

    /// Starts (with the bitmap memfd) or stops dirty-page logging.
    pub fn set_dirty_log(&self, fd: Option<OwnedFd>) -> Result<(), WireError> {
        set_dirty_log(&self.mem, fd)
    }

    /// Services the device once; returns the number of chains processed.
    pub fn poll(&mut self, uring: &mut Uring) -> Result<usize, RingError> {
        match &mut self.backend {
            Backend::NetLoopback(b) => b.poll(&mut self.queues, uring),
        }
    }

    /// Asks the driver to kick the queues this device waits on; `true` if work arrived meanwhile.
    pub fn enable_notifications(&mut self) -> Result<bool, RingError> {
        match &mut self.backend {
            Backend::NetLoopback(b) => b.enable_notifications(&mut self.queues),
        }
    }

    /// Asks the driver to stop kicking (the datapath is polling).
    pub fn disable_notifications(&mut self) {
        for q in &mut self.queues {
            q.ring.disable_notifications();
        }
    }

    /// The queue watching kick slot `slot`, if it is this device's.
    pub fn queue_by_kick_slot(&mut self, slot: usize) -> Option<&mut QueueCtx> {
        self.queues.iter_mut().find(|q| q.kick_slot == slot)
    }

    /// Current counters, by queue index.
    pub fn stats(&self) -> DeviceStats {
        let n = self
            .queues
            .iter()
            .map(|q| q.index as usize + 1)
            .max()
            .unwrap_or(0);
        let mut s = DeviceStats {
            queues: vec![QueueStats::default(); n],
        };
        for q in &self.queues {
            if let Some(slot) = s.queues.get_mut(q.index as usize) {
                *slot = *q.stats;
            }
        }
        s
    }

    /// Where each queue stands, by queue index (every popped chain is already completed).
    pub fn states(&self) -> Vec<(u16, VqState)> {
        self.queues
            .iter()
            .map(|q| (q.index, q.ring.state()))
            .collect()
    }

    /// Stops watching the device's eventfds; the device can then be dropped.
    pub fn release(&mut self, uring: &mut Uring) {
        release_queues(&self.queues, uring);
    }
}

fn set_dirty_log(mem: &GuestMemory, fd: Option<OwnedFd>) -> Result<(), WireError> {
    let log = match fd {
        Some(fd) => {
            let len = vmdev_shm_ring::dirty::bitmap_len(mem.region_sizes());
            Some(
                DirtyLog::map(fd, len)
                    .map_err(|e| bad(ErrorCode::BadMemory, format!("dirty bitmap: {e}")))?,
            )
        }
        None => None,
    };
    mem.set_dirty_log(log);
    Ok(())
}

fn release_queues(queues: &[QueueCtx], uring: &mut Uring) {
    for q in queues {
        if let Err(e) = uring.retire_kick(q.kick_slot, q.kick.as_fd()) {
            tracing::warn!("cancelling a kick read: {e}");
        }
    }
}
