//! The datapath's io_uring: every wait and wake-up goes through it.
//!
//! * kick eventfds: one outstanding 8-byte `Read` per queue, into a per-slot buffer that
//!   lives as long as the ring; re-armed on completion, cancelled on detach (the slot is
//!   reused only once its last completion has arrived);
//! * the control socket: a `PollAdd` for readability, re-armed after each read;
//! * calls: an 8-byte `Write` of 1 to the driver's call eventfd, completion skipped on
//!   success — pushed during a pass and submitted once per pass.

use io_uring::{opcode, squeue, types::Fd, IoUring};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

const KIND_KICK: u64 = 1 << 56;
const KIND_CONTROL: u64 = 2 << 56;
const KIND_CALL: u64 = 3 << 56;
const KIND_CANCEL: u64 = 4 << 56;
const KIND_MASK: u64 = 0xff << 56;

static ONE: u64 = 1;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    Armed(RawFd),
    Retiring,
}

/// What a completion meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The kick eventfd of this slot fired (the read is already re-armed).
    Kick(usize),
    /// The control socket is readable (re-arm with [`Uring::arm_control`] after reading).
    Control,
}

/// io_uring plus the bookkeeping that keeps its buffers valid.
pub struct Uring {
    ring: IoUring,
    slots: Vec<Slot>,
    kick_bufs: Box<[u64]>,
    unsubmitted: usize,
}

impl Uring {
    /// A ring able to watch `max_kicks` kick eventfds.
    pub fn new(max_kicks: usize) -> std::io::Result<Self> {
        let entries = (max_kicks * 2 + 64).next_power_of_two().min(4096) as u32;
        Ok(Uring {
            ring: IoUring::new(entries)?,
            slots: vec![Slot::Free; max_kicks],
            kick_bufs: vec![0u64; max_kicks].into_boxed_slice(),
            unsubmitted: 0,
        })
    }

    fn push(&mut self, e: &squeue::Entry) -> std::io::Result<()> {
        loop {
            // SAFETY: every entry pushed here refers either to a kick buffer owned by
            // `self.kick_bufs` (freed only with the ring, and a slot is never reused before
            // its completion arrives), to the static `ONE`, or to no memory at all.
            let pushed = unsafe { self.ring.submission().push(e) };
            if pushed.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            self.ring.submit()?;
            self.unsubmitted = 0;
        }
    }

    fn push_kick_read(&mut self, slot: usize, fd: RawFd) -> std::io::Result<()> {
        let buf = self.kick_bufs[slot..].as_mut_ptr().cast::<u8>();
        let e = opcode::Read::new(Fd(fd), buf, 8)
            .build()
            .user_data(KIND_KICK | slot as u64);
        self.push(&e)
    }

    /// Starts watching a kick eventfd; returns its slot, or `None` when all slots are used.
    pub fn arm_kick(&mut self, fd: BorrowedFd<'_>) -> std::io::Result<Option<usize>> {
        let Some(slot) = self.slots.iter().position(|s| *s == Slot::Free) else {
            return Ok(None);
        };
        self.slots[slot] = Slot::Armed(fd.as_raw_fd());
        self.push_kick_read(slot, fd.as_raw_fd())?;
        Ok(Some(slot))
    }

    /// Stops watching the slot of `fd` (before `fd` is closed).
    pub fn retire_kick(&mut self, slot: usize, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        let armed = Slot::Armed(fd.as_raw_fd());
        if let Some(s) = self.slots.get_mut(slot).filter(|s| **s == armed) {
            *s = Slot::Retiring;
            let e = opcode::AsyncCancel::new(KIND_KICK | slot as u64)
                .build()
                .user_data(KIND_CANCEL)
                .flags(squeue::Flags::SKIP_SUCCESS);
            self.push(&e)?;
        }
        Ok(())
    }

    /// Asks to be told when the control socket is readable.
    pub fn arm_control(&mut self, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        let e = opcode::PollAdd::new(Fd(fd.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(KIND_CONTROL);
        self.push(&e)
    }

    /// Signals a call eventfd (submitted with the rest of this pass).
    pub fn signal(&mut self, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        let e = opcode::Write::new(Fd(fd.as_raw_fd()), (&ONE as *const u64).cast(), 8)
            .build()
            .user_data(KIND_CALL)
            .flags(squeue::Flags::SKIP_SUCCESS);
        self.push(&e)
    }

    /// Submits what was pushed since the last submission (one syscall, none if nothing).
    pub fn submit(&mut self) -> std::io::Result<()> {
        if self.unsubmitted > 0 {
            self.ring.submit()?;
            self.unsubmitted = 0;
        }
        Ok(())
    }

    /// Submits and sleeps until at least one completion arrives.
    pub fn wait(&mut self) -> std::io::Result<()> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
        self.unsubmitted = 0;
        Ok(())
    }

    /// Collects completions into `out` (a memory read when there are none), re-arming
    /// kick reads as it goes.
    pub fn drain(&mut self, out: &mut Vec<Event>) -> std::io::Result<()> {
        let mut rearm = Vec::new();
        for cqe in self.ring.completion() {
            let ud = cqe.user_data();
            let idx = (ud & !KIND_MASK) as usize;
            match ud & KIND_MASK {
                KIND_KICK => match self.slots.get(idx).copied() {
                    Some(Slot::Armed(fd)) if cqe.result() >= 0 => {
                        rearm.push((idx, fd));
                        out.push(Event::Kick(idx));
                    }
                    Some(Slot::Armed(_)) => {
                        tracing::warn!(
                            slot = idx,
                            errno = -cqe.result(),
                            "kick read failed; queue left without kicks"
                        );
                        self.slots[idx] = Slot::Free;
                    }
                    Some(Slot::Retiring) => self.slots[idx] = Slot::Free,
                    _ => {}
                },
                KIND_CONTROL => out.push(Event::Control),
                KIND_CALL if cqe.result() < 0 => {
                    tracing::debug!(errno = -cqe.result(), "call eventfd write failed")
                }
                _ => {}
            }
        }
        for (slot, fd) in rearm {
            self.push_kick_read(slot, fd)?;
        }
        Ok(())
    }
}
