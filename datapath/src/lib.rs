//! vmdev datapath: plays the offload hardware.
//!
//! * [`engine`]: the one thread — poll loop, idle back-off, control requests;
//! * [`uring`]: io_uring for every wait and wake-up (kicks, control socket, calls);
//! * [`device`]: an attached device — mapped memory, queues, counters;
//! * [`net_loopback`]: the sample back end;
//! * [`sys`]: CPU pinning.

#![warn(missing_docs)]

pub mod device;
pub mod engine;
pub mod net_loopback;
pub mod ring;
pub mod sys;
pub mod uring;
