//! The datapath's one thread: polls every attached device while work flows, answers the
//! control plane between passes, and after an idle spell re-enables kicks and sleeps in
//! io_uring until a kick or a control message arrives.

use crate::device::Device;
use crate::uring::{Event, Uring};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};
use vmdev_proto::datapath::{DpEvent, DpOp, DpReply, FromDatapath, ToDatapath};
use vmdev_proto::{Channel, ErrorCode, ProtoError, WireError};

/// Tunables of the poll loop.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Devices this datapath accepts.
    pub max_devices: usize,
    /// How long to keep spinning after the last work before sleeping.
    pub spin: Duration,
}

/// The poll loop and everything it owns.
pub struct Engine {
    cfg: EngineConfig,
    uring: Uring,
    control: Channel,
    devices: Vec<Device>,
    events: Vec<Event>,
}

/// Why the loop ended.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The control plane closed its connection (normal shutdown).
    #[error("the control plane closed the connection")]
    ControlClosed,
    /// The control connection broke.
    #[error("control connection: {0}")]
    Control(#[from] ProtoError),
    /// io_uring failed.
    #[error("io_uring: {0}")]
    Uring(#[from] std::io::Error),
}

impl Engine {
    /// An engine talking to the control plane over `control` (already registered).
    pub fn new(cfg: EngineConfig, control: Channel) -> std::io::Result<Self> {
        let mut uring = Uring::new(cfg.max_devices * 2)?;
        uring.arm_control(control.stream().as_fd())?;
        Ok(Engine {
            cfg,
            uring,
            control,
            devices: Vec::new(),
            events: Vec::new(),
        })
    }

    /// Runs until the control plane goes away.
    pub fn run(&mut self) -> Result<(), EngineError> {
        self.control_buffered()?;
        let mut last_work = Instant::now();
        let mut spins: u32 = 0;
        loop {
            let work = self.poll_devices()?;
            let control = self.handle_events()?;
            self.uring.submit()?;
            // A freshly attached device is polled for a whole spin before kicks are
            // relied on: a kick sent during the hand-over may have gone to the old datapath.
            if work > 0 || control {
                spins = 0;
                last_work = Instant::now();
                continue;
            }
            spins = spins.wrapping_add(1);
            std::hint::spin_loop();
            if !spins.is_multiple_of(64) || last_work.elapsed() < self.cfg.spin {
                continue;
            }
            if self.sleep()? {
                last_work = Instant::now();
            }
        }
    }

    fn poll_devices(&mut self) -> Result<usize, EngineError> {
        let mut total = 0;
        let mut i = 0;
        while i < self.devices.len() {
            match self.devices[i].poll(&mut self.uring) {
                Ok(n) => {
                    total += n;
                    i += 1;
                }
                Err(e) => {
                    let mut dev = self.devices.swap_remove(i);
                    tracing::warn!(
                        handle = dev.handle,
                        "driver broke a ring, device needs reset: {e}"
                    );
                    dev.release(&mut self.uring);
                    let ev = DpEvent::DeviceFailed {
                        handle: dev.handle,
                        reason: e.to_string(),
                        stats: dev.stats(),
                    };
                    self.control.send(&FromDatapath::Event(ev), &[])?;
                }
            }
        }
        Ok(total)
    }

    /// Re-enables kicks and sleeps unless work arrived meanwhile; returns whether it slept.
    fn sleep(&mut self) -> Result<bool, EngineError> {
        let mut pending = false;
        for d in &mut self.devices {
            // A ring error here surfaces on the next poll of that device.
            pending |= d.enable_notifications().unwrap_or(true);
        }
        if !pending {
            self.uring.wait()?;
        }
        for d in &mut self.devices {
            d.disable_notifications();
        }
        Ok(!pending)
    }

    /// Handles completions; returns whether a control message was processed.
    fn handle_events(&mut self) -> Result<bool, EngineError> {
        self.uring.drain(&mut self.events)?;
        let mut control = false;
        let events = std::mem::take(&mut self.events);
        for ev in &events {
            match *ev {
                Event::Kick(slot) => {
                    if let Some(q) = self
                        .devices
                        .iter_mut()
                        .find_map(|d| d.queue_by_kick_slot(slot))
                    {
                        q.stats.kicks += 1;
                    }
                }
                Event::Control => {
                    self.control_readable()?;
                    control = true;
                }
            }
        }
        self.events = events;
        self.events.clear();
        Ok(control)
    }

    fn control_readable(&mut self) -> Result<(), EngineError> {
        match self.control.fill() {
            Ok(()) => {}
            Err(ProtoError::Closed) => return Err(EngineError::ControlClosed),
            Err(e) => return Err(e.into()),
        }
        self.control_buffered()?;
        self.uring.arm_control(self.control.stream().as_fd())?;
        Ok(())
    }

    /// Answers every request already read from the control socket (the registration
    /// exchange may have read the first ones too: no poll would ever report them).
    fn control_buffered(&mut self) -> Result<(), EngineError> {
        while let Some((msg, fds)) = self.control.next_buffered::<ToDatapath>()? {
            match msg {
                ToDatapath::Request { seq, op } => {
                    let result = self.op(op, fds);
                    // A detached device's kick reads must be cancelled before the control
                    // plane hands its eventfds to another datapath, or a stale read could
                    // swallow a kick meant for the new one.
                    self.uring.submit()?;
                    self.control
                        .send(&FromDatapath::Reply { seq, result }, &[])?;
                }
                other => tracing::warn!("unexpected message from the control plane: {other:?}"),
            }
        }
        Ok(())
    }

    fn position(&self, handle: u64) -> Result<usize, WireError> {
        self.devices
            .iter()
            .position(|d| d.handle == handle)
            .ok_or_else(|| {
                WireError::new(
                    ErrorCode::NoSuchDevice,
                    format!("no device with handle {handle}"),
                )
            })
    }

    fn op(&mut self, op: DpOp, fds: Vec<OwnedFd>) -> Result<DpReply, WireError> {
        match op {
            DpOp::Attach(spec) => {
                if self.devices.len() >= self.cfg.max_devices {
                    return Err(WireError::new(ErrorCode::NoCapacity, "datapath is full"));
                }
                if self.position(spec.handle).is_ok() {
                    return Err(WireError::new(
                        ErrorCode::Busy,
                        format!("handle {} is attached", spec.handle),
                    ));
                }
                let (handle, recover) = (spec.handle, spec.recover);
                let dev = Device::attach(spec, fds, &mut self.uring)?;
                tracing::info!(
                    handle,
                    queues = dev.queues.len(),
                    recover,
                    "device attached"
                );
                let reply = if recover {
                    DpReply::Recovered(dev.states())
                } else {
                    DpReply::Attached
                };
                self.devices.push(dev);
                Ok(reply)
            }
            DpOp::Detach { handle } => {
                let mut dev = self.devices.swap_remove(self.position(handle)?);
                dev.release(&mut self.uring);
                tracing::info!(handle, "device detached");
                Ok(DpReply::Detached(dev.stats(), dev.states()))
            }
            DpOp::SetDirtyLog { handle, on } => {
                let fd = if on { fds.into_iter().next() } else { None };
                if on && fd.is_none() {
                    return Err(WireError::new(
                        ErrorCode::MissingFd,
                        "SetDirtyLog needs the bitmap memfd",
                    ));
                }
                self.devices[self.position(handle)?].set_dirty_log(fd)?;
                Ok(DpReply::Ok)
            }
            DpOp::Stats { handle } => {
                Ok(DpReply::Stats(self.devices[self.position(handle)?].stats()))
            }
        }
    }
}
