//! The sample device: virtio-net loopback. Each transmitted chain (virtio-net header +
//! frame) is copied into the next receive chain, like the kernel's vdpa_sim_net; without a
//! receive buffer (or with one too small) the frame is dropped and counted.

use crate::device::QueueCtx;
use crate::uring::Uring;
use vmdev_proto::virtio::net::{HDR_LEN, HDR_NUM_BUFFERS, RX_QUEUE, TX_QUEUE};
use vmdev_proto::{ErrorCode, WireError};
use vmdev_shm_ring::{Chain, RingError};

/// Most TX chains handled in one pass before other devices get their turn.
pub const BATCH: usize = 256;

/// Loopback state: where the two queues are, and reusable chain buffers.
pub struct NetLoopback {
    rx: usize,
    tx: usize,
    txc: Chain,
    rxc: Chain,
}

fn pair(q: &mut [QueueCtx], a: usize, b: usize) -> (&mut QueueCtx, &mut QueueCtx) {
    if a < b {
        let (l, r) = q.split_at_mut(b);
        (&mut l[a], &mut r[0])
    } else {
        let (l, r) = q.split_at_mut(a);
        (&mut r[0], &mut l[b])
    }
}

impl NetLoopback {
    /// Finds the RX and TX queues among the attached ones.
    pub fn new(queues: &[QueueCtx]) -> Result<Self, WireError> {
        let find = |i: u16| {
            queues.iter().position(|q| q.index == i).ok_or_else(|| {
                WireError::new(ErrorCode::BadQueue, format!("net-loopback needs queue {i}"))
            })
        };
        Ok(NetLoopback {
            rx: find(RX_QUEUE)?,
            tx: find(TX_QUEUE)?,
            txc: Chain::new(),
            rxc: Chain::new(),
        })
    }

    /// One pass: forwards up to [`BATCH`] frames, publishes both used rings once, and
    /// interrupts the driver where it asked to be.
    pub fn poll(&mut self, queues: &mut [QueueCtx], uring: &mut Uring) -> Result<usize, RingError> {
        let (rx, tx) = pair(queues, self.rx, self.tx);
        let mut n = 0;
        while n < BATCH {
            if !tx.ring.pop(&mut self.txc)? {
                break;
            }
            n += 1;
            tx.ring.add_used(self.txc.head(), 0);
            tx.unsignalled = true;
            let total = self.txc.readable_len();
            if (total as usize) < HDR_LEN {
                tx.stats.drops += 1;
                continue;
            }
            let frame = (total as usize - HDR_LEN) as u64;
            tx.stats.packets += 1;
            tx.stats.bytes += frame;
            if !rx.ring.pop(&mut self.rxc)? {
                tx.stats.drops += 1;
                continue;
            }
            match self.txc.copy_to(&self.rxc) {
                Some(len) => {
                    self.rxc.write_at(HDR_NUM_BUFFERS, &1u16.to_le_bytes());
                    rx.ring.add_used(self.rxc.head(), len);
                    rx.unsignalled = true;
                    rx.stats.packets += 1;
                    rx.stats.bytes += frame;
                }
                None => {
                    rx.ring.unpop();
                    rx.stats.drops += 1;
                }
            }
        }
        if n > 0 {
            tx.stats.polls += 1;
            rx.stats.polls += 1;
        }
        rx.complete(uring);
        tx.complete(uring);
        Ok(n)
    }

    /// Before sleeping: only TX kicks wake the loopback (RX buffers are looked for when a
    /// frame arrives), so RX refills never cost a wake-up.
    pub fn enable_notifications(&mut self, queues: &mut [QueueCtx]) -> Result<bool, RingError> {
        match queues.get_mut(self.tx) {
            Some(tx) => tx.ring.enable_notifications(),
            None => Ok(false),
        }
    }
}
