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

const CTRL_RX: u8 = 0;
const CTRL_MAC: u8 = 1;
const CTRL_MQ: u8 = 4;
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const CTRL_OK: u8 = 0;
const CTRL_ERR: u8 = 1;

/// Loopback state: where the queues are, and reusable chain buffers.
pub struct NetLoopback {
    pairs: Vec<(usize, usize)>,
    ctrl: Option<usize>,
    max_pairs: u16,
    mrg: bool,
    txc: Chain,
    rxc: Vec<Chain>,
    rx_lens: Vec<u32>,
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
            txc: Chain::new(),
            rxc: Vec::new(),
            rx_lens: Vec::new(),
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

    /// Forwards up to [`BATCH`] frames from `tx` to `rx`, publishes both used rings once,
    /// and interrupts the driver where it asked to be.
    fn forward(
        &mut self,
        rx: &mut QueueCtx,
        tx: &mut QueueCtx,
        uring: &mut Uring,
    ) -> Result<usize, RingError> {
        let mut n = 0;
        while n < BATCH {
            if !tx.ring.pop(&mut self.txc)? {
                break;
            }
            n += 1;
            tx.ring.add_used(self.txc.head(), 0)?;
            tx.unsignalled = true;
            let total = self.txc.readable_len();
            if (total as usize) < HDR_LEN {
                tx.stats.drops += 1;
                continue;
            }
            let frame = (total as usize - HDR_LEN) as u64;
            tx.stats.packets += 1;
            tx.stats.bytes += frame;
            let delivered = if self.mrg {
                self.deliver_merged(rx)?
            } else {
                self.deliver_one(rx)?
            };
            if delivered {
                rx.unsignalled = true;
                rx.stats.packets += 1;
                rx.stats.bytes += frame;
            } else {
                rx.stats.drops += 1;
            }
        }
        if n > 0 {
            tx.stats.polls += 1;
            rx.stats.polls += 1;
        }
        // TX completions become visible before the frames they produced: a datapath that
        // dies in between loses those frames (the recovery counts them) but never makes a
        // successor deliver one twice.
        tx.complete(uring);
        rx.complete(uring);
        Ok(n)
    }

    /// Copies the TX chain into one RX chain (no MRG_RXBUF): all or nothing.
    fn deliver_one(&mut self, rx: &mut QueueCtx) -> Result<bool, RingError> {
        if self.rxc.is_empty() {
            self.rxc.push(Chain::new());
        }
        let rxc = &mut self.rxc[0];
        if !rx.ring.pop(rxc)? {
            return Ok(false);
        }
        if rxc.writable_len() == 0 || rxc.readable_len() != 0 {
            return Err(RingError::WrongDirection(
                "a receive buffer must be device-writable only",
            ));
        }
        match self.txc.copy_to(rxc) {
            Some(len) => {
                rxc.write_at(HDR_NUM_BUFFERS, &1u16.to_le_bytes());
                rx.ring.add_used(rxc.head(), len)?;
                Ok(true)
            }
            None => {
                rx.ring.unpop();
                Ok(false)
            }
        }
    }

    /// Spreads the TX chain over as many RX chains as it needs (MRG_RXBUF), recording the
    /// count in the first one's header; puts them all back if the ring runs out.
    fn deliver_merged(&mut self, rx: &mut QueueCtx) -> Result<bool, RingError> {
        let total = self.txc.readable_len();
        let mut off = 0u32;
        let mut k = 0usize;
        self.rx_lens.clear();
        while off < total {
            if k == self.rxc.len() {
                self.rxc.push(Chain::new());
            }
            if !rx.ring.pop(&mut self.rxc[k])? {
                break;
            }
            let c = &self.rxc[k];
            if c.writable_len() == 0 || c.readable_len() != 0 {
                return Err(RingError::WrongDirection(
                    "a receive buffer must be device-writable only",
                ));
            }
            let n = self.txc.copy_part_to(off, &self.rxc[k]);
            k += 1;
            self.rx_lens.push(n);
            off += n;
            if n == 0 {
                break; // a buffer with no room: give up on this frame
            }
        }
        if off < total || k > u16::MAX as usize {
            for _ in 0..k {
                rx.ring.unpop();
            }
            return Ok(false);
        }
        self.rxc[0].write_at(HDR_NUM_BUFFERS, &(k as u16).to_le_bytes());
        for (c, &len) in self.rxc.iter().zip(&self.rx_lens) {
            rx.ring.add_used(c.head(), len)?;
        }
        Ok(true)
    }

    /// Answers control commands: class, command, data (readable), then one ack byte.
    fn control(&mut self, ctrl: &mut QueueCtx, uring: &mut Uring) -> Result<usize, RingError> {
        let mut n = 0;
        while n < BATCH && ctrl.ring.pop(&mut self.txc)? {
            n += 1;
            let mut cmd = [0u8; 4];
            let got = self.txc.read_at(0, &mut cmd);
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
            let wrote = self.txc.write_at(0, &[ack]) as u32;
            ctrl.ring.add_used(self.txc.head(), wrote)?;
            ctrl.unsignalled = true;
            ctrl.stats.packets += 1;
            if ack != CTRL_OK {
                ctrl.stats.drops += 1;
            }
        }
        ctrl.complete(uring);
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
