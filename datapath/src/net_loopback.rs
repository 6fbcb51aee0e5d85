//! The sample device: virtio-net loopback. Each transmitted chain (virtio-net header +
//! frame) is copied into the next receive chain of the same queue pair, like the kernel's
//! vdpa_sim_net — spread over several receive chains when MRG_RXBUF was negotiated. Without
//! a receive buffer (or with too little room) the frame is dropped and counted. With
//! CTRL_VQ, control commands are answered (MQ pairs, RX mode and MAC filters accepted).

use crate::device::QueueCtx;
use crate::uring::Uring;
use vmdev_proto::virtio::features as f;
use vmdev_proto::virtio::net::{HDR_LEN, HDR_NUM_BUFFERS, RX_QUEUE, TX_QUEUE};
use vmdev_proto::{ErrorCode, WireError};
use vmdev_shm_ring::{Chain, RingError};

/// Most TX chains handled per queue pair in one pass before others get their turn.
pub const BATCH: usize = 256;
/// Frames copied between two publishes of the used rings within a pass.
pub const CHUNK: usize = 8;

const CTRL_RX: u8 = 0;
const CTRL_MAC: u8 = 1;
const CTRL_MQ: u8 = 4;
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const CTRL_OK: u8 = 0;
const CTRL_ERR: u8 = 1;

/// Loopback state: where the queues are, and reusable chain buffers (a batch of TX chains,
/// the RX chains reserved for them, and how many each frame got: `None` for a chain too
/// short to hold a header, 0 when no RX room was found).
pub struct NetLoopback {
    pairs: Vec<(usize, usize)>,
    ctrl: Option<usize>,
    max_pairs: u16,
    mrg: bool,
    txc: Vec<Chain>,
    rxc: Vec<Chain>,
    plan: Vec<Option<usize>>,
    ctrlc: Chain,
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
    /// Pairs RX queue 2k with TX queue 2k+1 among the attached queues; with CTRL_VQ the last
    /// of `num_queues` is the control queue.
    pub fn new(queues: &[QueueCtx], features: u64, num_queues: u16) -> Result<Self, WireError> {
        let pos = |i: u16| queues.iter().position(|q| q.index == i);
        let ctrl_index =
            (features & f::NET_F_CTRL_VQ != 0 && num_queues % 2 == 1).then(|| num_queues - 1);
        let mut pairs = Vec::new();
        for q in queues {
            if q.index % 2 == 0 && Some(q.index) != ctrl_index {
                if let (Some(rx), Some(tx)) = (pos(q.index), pos(q.index + 1)) {
                    pairs.push((rx, tx));
                }
            }
        }
        if pos(RX_QUEUE).is_none() || pos(TX_QUEUE).is_none() {
            return Err(WireError::new(
                ErrorCode::BadQueue,
                "net-loopback needs queues 0 and 1",
            ));
        }
        Ok(NetLoopback {
            pairs,
            ctrl: ctrl_index.and_then(pos),
            max_pairs: num_queues / 2,
            mrg: features & f::NET_F_MRG_RXBUF != 0,
            txc: Vec::new(),
            rxc: Vec::new(),
            plan: Vec::new(),
            ctrlc: Chain::new(),
        })
    }

    /// One pass over every queue pair and the control queue; returns the chains handled.
    pub fn poll(&mut self, queues: &mut [QueueCtx], uring: &mut Uring) -> Result<usize, RingError> {
        let mut n = 0;
        for i in 0..self.pairs.len() {
            let (rx, tx) = self.pairs[i];
            let (rx, tx) = pair(queues, rx, tx);
            n += self.forward(rx, tx, uring)?;
        }
        if let Some(c) = self.ctrl {
            n += self.control(&mut queues[c], uring)?;
        }
        Ok(n)
    }

    /// Forwards up to [`BATCH`] frames from `tx` to `rx` and interrupts the driver once, if
    /// it asked to be. Takes every available TX chain first (descriptors and buffers
    /// prefetched, so the batch's cross-core misses overlap), then works them in chunks of
    /// [`CHUNK`]: reserve RX chains (prefetched for writing), copy, publish both used
    /// rings. Publishing per chunk lets the driver start on the first frames while the
    /// rest are copied (a few frames circulating are bound by that turn-around); a publish
    /// is one release store, the fence and the interrupt decision come once per batch.
    fn forward(
        &mut self,
        rx: &mut QueueCtx,
        tx: &mut QueueCtx,
        uring: &mut Uring,
    ) -> Result<usize, RingError> {
        tx.ring.prefetch(BATCH as u16)?;
        let mut n = 0;
        while n < BATCH {
            if n == self.txc.len() {
                self.txc.push(Chain::new());
            }
            let c = &mut self.txc[n];
            if !tx.ring.pop(c)? {
                break;
            }
            c.prefetch_readable();
            n += 1;
        }
        if n == 0 {
            return Ok(0);
        }
        for start in (0..n).step_by(CHUNK) {
            self.forward_chunk(rx, tx, start, n.min(start + CHUNK))?;
        }
        tx.stats.polls += 1;
        rx.stats.polls += 1;
        tx.notify(uring);
        rx.notify(uring);
        Ok(n)
    }

    /// Copies TX chains `self.txc[from..to]` into RX chains and publishes both used rings:
    /// TX completions become visible before the frames they produced (a datapath that dies
    /// in between loses those frames, the recovery counts them, but a successor never
    /// delivers one twice).
    fn forward_chunk(
        &mut self,
        rx: &mut QueueCtx,
        tx: &mut QueueCtx,
        from: usize,
        to: usize,
    ) -> Result<(), RingError> {
        rx.ring.prefetch((to - from) as u16)?;
        self.plan.clear();
        let mut reserved = 0;
        for i in from..to {
            let total = self.txc[i].readable_len();
            let k = if (total as usize) < HDR_LEN {
                None
            } else {
                Some(self.reserve(rx, total, reserved)?)
            };
            self.plan.push(k);
            reserved += k.unwrap_or(0);
        }
        let mut r = 0;
        for (c, &k) in self.txc[from..to].iter().zip(&self.plan) {
            tx.ring.add_used(c.head(), 0)?;
            let Some(k) = k else {
                tx.stats.drops += 1;
                continue;
            };
            let frame = (c.readable_len() as usize - HDR_LEN) as u64;
            tx.stats.packets += 1;
            tx.stats.bytes += frame;
            if k == 0 {
                rx.stats.drops += 1;
                continue;
            }
            // The header first, stored only where it changed: it is the same frame after
            // frame, and a driver that keeps it on its own cache line (DPDK's mbufs do)
            // then reads it without a miss. Then the rest of the frame.
            let mut hdr = [0u8; HDR_LEN];
            c.read_at(0, &mut hdr);
            hdr[HDR_NUM_BUFFERS..HDR_NUM_BUFFERS + 2].copy_from_slice(&(k as u16).to_le_bytes());
            let mut off = 0;
            for (i, d) in self.rxc[r..r + k].iter().enumerate() {
                let len = if i == 0 && d.writable_len() as usize >= HDR_LEN {
                    let h = d.write_at_if_changed(0, &hdr) as u32;
                    h + c.copy_part_to_at(h, d, h)
                } else {
                    c.copy_part_to(off, d)
                };
                off += len;
                rx.ring.add_used(d.head(), len)?;
            }
            if (self.rxc[r].writable_len() as usize) < HDR_LEN {
                self.rxc[r].write_at(HDR_NUM_BUFFERS, &(k as u16).to_le_bytes());
            }
            r += k;
            rx.stats.packets += 1;
            rx.stats.bytes += frame;
        }
        tx.publish();
        if r > 0 {
            rx.publish();
        }
        Ok(())
    }

    /// Takes RX chains for a frame of `total` bytes (header included) into
    /// `self.rxc[start..]`: one chain with room for all of it, or with MRG_RXBUF as many as
    /// it spans. Returns how many, or 0 (nothing taken, the frame is dropped) when the
    /// ring runs out or the one chain is too small.
    fn reserve(&mut self, rx: &mut QueueCtx, total: u32, start: usize) -> Result<usize, RingError> {
        let most = if self.mrg { u16::MAX as usize } else { 1 };
        let mut room = 0u32;
        let mut k = 0;
        while room < total && k < most {
            if start + k == self.rxc.len() {
                self.rxc.push(Chain::new());
            }
            let c = &mut self.rxc[start + k];
            if !rx.ring.pop(c)? {
                break;
            }
            if c.writable_len() == 0 || c.readable_len() != 0 {
                return Err(RingError::WrongDirection(
                    "a receive buffer must be device-writable only",
                ));
            }
            // The header is read and stored only where it changed; the frame is written.
            let keep = if k == 0 { HDR_LEN as u32 } else { 0 };
            c.prefetch_writable(keep, total - room);
            room = room.saturating_add(c.writable_len());
            k += 1;
        }
        if room < total {
            for _ in 0..k {
                rx.ring.unpop();
            }
            return Ok(0);
        }
        Ok(k)
    }

    /// Answers control commands: class, command, data (readable), then one ack byte.
    fn control(&mut self, ctrl: &mut QueueCtx, uring: &mut Uring) -> Result<usize, RingError> {
        let mut n = 0;
        while n < BATCH && ctrl.ring.pop(&mut self.ctrlc)? {
            n += 1;
            let mut cmd = [0u8; 4];
            let got = self.ctrlc.read_at(0, &mut cmd);
            let ack = match (got, cmd[0], cmd[1]) {
                (4, CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET) => {
                    let pairs = u16::from_le_bytes([cmd[2], cmd[3]]);
                    if (1..=self.max_pairs).contains(&pairs) {
                        CTRL_OK
                    } else {
                        CTRL_ERR
                    }
                }
                (g, CTRL_RX | CTRL_MAC, _) if g >= 2 => CTRL_OK,
                _ => CTRL_ERR,
            };
            let wrote = self.ctrlc.write_at(0, &[ack]) as u32;
            ctrl.ring.add_used(self.ctrlc.head(), wrote)?;
            ctrl.stats.packets += 1;
            if ack != CTRL_OK {
                ctrl.stats.drops += 1;
            }
        }
        if n > 0 {
            ctrl.publish();
            ctrl.notify(uring);
        }
        Ok(n)
    }

    /// Before sleeping: only TX and control kicks wake the loopback (RX buffers are looked
    /// for when a frame arrives), so RX refills never cost a wake-up.
    pub fn enable_notifications(&mut self, queues: &mut [QueueCtx]) -> Result<bool, RingError> {
        let mut pending = false;
        for &(_, tx) in &self.pairs {
            pending |= queues[tx].ring.enable_notifications()?;
        }
        if let Some(c) = self.ctrl {
            pending |= queues[c].ring.enable_notifications()?;
        }
        Ok(pending)
    }
}
