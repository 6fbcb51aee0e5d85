//! The control plane's link to one datapath process (a *parent*): numbered requests, with
//! replies routed back to the waiting caller by the connection's reader thread.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Duration;
use vmdev_proto::datapath::{DpOp, DpReply, ToDatapath};
use vmdev_proto::{Channel, ErrorCode, WireError};

/// How long the control plane waits for a datapath's answer before giving up.
pub const DATAPATH_TIMEOUT: Duration = Duration::from_secs(10);

type Waiter = mpsc::SyncSender<Result<DpReply, WireError>>;

/// One registered datapath process.
pub struct ParentLink {
    /// Parent name.
    pub name: String,
    /// Its process id (from SO_PEERCRED).
    pub pid: u32,
    /// CPU it pinned itself to.
    pub cpu: Option<u32>,
    /// Types and instance limits it offers.
    pub types: Vec<(String, u32)>,
    writer: Mutex<Channel>,
    pending: Mutex<HashMap<u64, Waiter>>,
    next_seq: AtomicU64,
    alive: AtomicBool,
}

fn gone(name: &str) -> WireError {
    WireError::new(ErrorCode::Datapath, format!("datapath '{name}' is gone"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ParentLink {
    /// Wraps the sending half of a registered datapath connection.
    pub fn new(
        name: String,
        pid: u32,
        cpu: Option<u32>,
        types: Vec<(String, u32)>,
        writer: Channel,
    ) -> Self {
        ParentLink {
            name,
            pid,
            cpu,
            types,
            writer: Mutex::new(writer),
            pending: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(1),
            alive: AtomicBool::new(true),
        }
    }

    /// Whether the connection is still up.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Sends `op` with `fds` and waits for the datapath's answer.
    pub fn call(&self, op: DpOp, fds: &[BorrowedFd<'_>]) -> Result<DpReply, WireError> {
        if !self.is_alive() {
            return Err(gone(&self.name));
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        lock(&self.pending).insert(seq, tx);
        let sent = lock(&self.writer).send(&ToDatapath::Request { seq, op }, fds);
        if let Err(e) = sent {
            lock(&self.pending).remove(&seq);
            return Err(WireError::new(
                ErrorCode::Datapath,
                format!("datapath '{}': {e}", self.name),
            ));
        }
        match rx.recv_timeout(DATAPATH_TIMEOUT) {
            Ok(r) => r,
            Err(_) => {
                lock(&self.pending).remove(&seq);
                Err(WireError::new(
                    ErrorCode::Datapath,
                    format!(
                        "datapath '{}' did not answer within {DATAPATH_TIMEOUT:?}",
                        self.name
                    ),
                ))
            }
        }
    }

    /// Routes a reply to its waiting caller (the reader thread calls this).
    pub fn complete(&self, seq: u64, result: Result<DpReply, WireError>) {
        if let Some(w) = lock(&self.pending).remove(&seq) {
            let _ = w.send(result);
        } else {
            tracing::warn!(parent = %self.name, seq, "reply to an unknown request");
        }
    }

    /// The connection closed: fails every waiting call and refuses new ones.
    pub fn close(&self) {
        self.alive.store(false, Ordering::Release);
        for (_, w) in lock(&self.pending).drain() {
            let _ = w.send(Err(gone(&self.name)));
        }
    }
}
