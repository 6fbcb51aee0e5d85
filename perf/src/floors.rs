//! Same-run floors: the round-trip baselines vmdev's latency figures are judged against.
//!
//! Each floor is a ping-pong between this process (the calling thread) and a child process
//! spawned by re-executing the current binary with the hidden [`PEER_SUBCOMMAND`]:
//! - `shm`: one cache line in POSIX shared memory, both sides spinning;
//! - `eventfd`: two eventfds, both sides blocking in `read`;
//! - `unix`: one byte back and forth over a Unix stream socketpair.
//!
//! Every round trip is timed with [`Instant`] (two clock reads, ~20 ns on a TSC clocksource, are
//! included in each sample) and recorded in nanoseconds. The child is always reaped before a
//! floor function returns, is killed if the parent thread dies (`PR_SET_PDEATHSIG`), and a dead
//! or stalled child makes the floor fail with an error instead of hanging.

use std::fs::File;
use std::hint::spin_loop;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use hdrhistogram::Histogram;
use sendfd::{RecvWithFd, SendWithFd};
use serde::Serialize;
use shared_memory::{Shmem, ShmemConf};

use crate::pin;

/// Name of the hidden subcommand that runs the child side of a floor (see [`run_peer`]).
pub const PEER_SUBCOMMAND: &str = "floor-peer";

/// A side that sees no progress from its peer for this long gives up with an error.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Spin iterations between two (slow) liveness/timeout checks in the shared-memory spin loops.
const SPIN_CHECK_EVERY: u64 = 1 << 20;
/// Size of the shared-memory region (one page).
const SHM_SIZE: usize = 4096;
/// Offset of the ping word; the pong word is the next `u64`, in the same cache line.
const SHM_PING_OFF: usize = 0;
/// Offset of the pong word (same 64-byte line as the ping word).
const SHM_PONG_OFF: usize = 8;
/// Offset of the child's "ready" flag, on its own 128-byte-aligned line (used only at setup).
const SHM_READY_OFF: usize = 128;
/// Value the eventfd watchdog adds to the parent's eventfd to wake it up on failure.
const EVENTFD_POISON: u64 = 1 << 40;

/// Round trips run before measuring, to fault pages in, warm caches and wake the CPUs up.
fn warmup_rounds(iters: u64) -> u64 {
    (iters / 10).clamp(100, 10_000)
}

/// Histogram for round-trip times: 1 ns to 60 s, 3 significant digits.
fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("static histogram bounds are valid")
}

fn record(hist: &mut Histogram<u64>, dt: Duration) {
    hist.saturating_record(u64::try_from(dt.as_nanos()).unwrap_or(u64::MAX));
}

/// One floor's measurement: round-trip times in nanoseconds.
pub struct FloorResult {
    /// Short name of the floor: `"shm"`, `"eventfd"` or `"unix"`.
    pub name: &'static str,
    /// Round-trip times in nanoseconds, warm-up excluded.
    pub hist: Histogram<u64>,
}

/// Summary of a [`FloorResult`], all times in nanoseconds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Percentiles {
    /// Number of measured round trips.
    pub count: u64,
    /// Fastest round trip.
    pub min_ns: u64,
    /// Median round trip.
    pub p50_ns: u64,
    /// 90th percentile.
    pub p90_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Slowest round trip.
    pub max_ns: u64,
    /// Mean round trip.
    pub mean_ns: f64,
}

impl FloorResult {
    /// Returns count, min, p50, p90, p99, p99.9, max and mean of the round-trip times.
    pub fn percentiles(&self) -> Percentiles {
        let h = &self.hist;
        Percentiles {
            count: h.len(),
            min_ns: h.min(),
            p50_ns: h.value_at_quantile(0.5),
            p90_ns: h.value_at_quantile(0.9),
            p99_ns: h.value_at_quantile(0.99),
            p999_ns: h.value_at_quantile(0.999),
            max_ns: h.max(),
            mean_ns: h.mean(),
        }
    }
}

/// One of the floors (and the ping-pong a floor peer plays).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FloorKind {
    /// Shared-memory cache line, spinning.
    Shm,
    /// Two eventfds received over the socket, blocking reads.
    Eventfd,
    /// One byte over the inherited Unix socket.
    Unix,
}

impl FloorKind {
    /// All floors, in the order `vmdev-perf floors` runs them.
    pub const ALL: [FloorKind; 3] = [FloorKind::Shm, FloorKind::Eventfd, FloorKind::Unix];

    /// Short name, as in [`FloorResult::name`] and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FloorKind::Shm => "shm",
            FloorKind::Eventfd => "eventfd",
            FloorKind::Unix => "unix",
        }
    }

    /// Measures this floor; see [`shm_pingpong`], [`eventfd_pingpong`], [`unix_pingpong`].
    pub fn measure(self, iters: u64, cpus: Option<(usize, usize)>) -> Result<FloorResult> {
        match self {
            FloorKind::Shm => shm_pingpong(iters, cpus),
            FloorKind::Eventfd => eventfd_pingpong(iters, cpus),
            FloorKind::Unix => unix_pingpong(iters, cpus),
        }
    }
}

/// Arguments of the hidden `floor-peer` subcommand (the child side of a floor).
#[derive(clap::Args, Debug)]
pub struct PeerArgs {
    /// Which ping-pong to play.
    #[arg(long, value_enum)]
    kind: FloorKind,
    /// Total round trips (warm-up included) after which the peer exits.
    #[arg(long)]
    rounds: u64,
    /// Pin the peer to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// OS id of the shared-memory region (kind `shm`).
    #[arg(long)]
    shm_id: Option<String>,
    /// Inherited Unix socket descriptor (kinds `eventfd` and `unix`).
    #[arg(long)]
    fd: Option<RawFd>,
}

/// Arguments of `vmdev-perf floors`.
#[derive(clap::Args, Debug)]
pub struct FloorsArgs {
    /// Measured round trips per floor (warm-up rounds come on top).
    #[arg(long, default_value_t = 20_000)]
    iters: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Parent and child CPUs, e.g. `0,1` (default: the first two allowed CPUs).
    #[arg(long, value_parser = parse_cpu_pair, conflicts_with = "no_pin")]
    cpus: Option<(usize, usize)>,
    /// Do not pin either side.
    #[arg(long)]
    no_pin: bool,
    /// Run only these floors (comma-separated; default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<FloorKind>,
}

fn parse_cpu_pair(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("expected PARENT,CHILD, got {s:?}"))?;
    let p = |x: &str| {
        x.trim()
            .parse::<usize>()
            .map_err(|e| format!("bad cpu {x:?}: {e}"))
    };
    Ok((p(a)?, p(b)?))
}

/// Runs `vmdev-perf floors`: all three floors, printed as a table or as JSON.
pub fn run_cli(args: &FloorsArgs) -> Result<()> {
    let cpus = if args.no_pin {
        None
    } else {
        args.cpus.or_else(pin::default_pair)
    };
    let results = if args.only.is_empty() {
        run_all(args.iters, cpus)?
    } else {
        args.only
            .iter()
            .map(|k| k.measure(args.iters, cpus))
            .collect::<Result<Vec<_>>>()?
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&results, args.iters, cpus))?
        );
    } else {
        let pinning = match cpus {
            Some((p, c)) => format!("parent on CPU {p}, child on CPU {c}"),
            None => "not pinned".to_string(),
        };
        println!(
            "floors: round trip between two processes, {} rounds each (+{} warm-up), {pinning}",
            args.iters,
            warmup_rounds(args.iters)
        );
        print!("{}", format_table(&results));
    }
    Ok(())
}

/// Runs the shared-memory, eventfd and Unix-socket floors one after the other.
pub fn run_all(iters: u64, cpus: Option<(usize, usize)>) -> Result<Vec<FloorResult>> {
    FloorKind::ALL
        .iter()
        .map(|k| k.measure(iters, cpus))
        .collect()
}

/// JSON object `{"iters", "cpus", "floors": [{"name", "count", "p50_ns", ...}]}` for `results`.
pub fn to_json(
    results: &[FloorResult],
    iters: u64,
    cpus: Option<(usize, usize)>,
) -> serde_json::Value {
    #[derive(Serialize)]
    struct Entry {
        name: &'static str,
        #[serde(flatten)]
        p: Percentiles,
    }
    let floors: Vec<Entry> = results
        .iter()
        .map(|r| Entry {
            name: r.name,
            p: r.percentiles(),
        })
        .collect();
    serde_json::json!({
        "iters": iters,
        "warmup": warmup_rounds(iters),
        "cpus": cpus.map(|(p, c)| [p, c]),
        "floors": floors,
    })
}

/// Formats a nanosecond figure readably: `85 ns`, `48.2 µs`, `1.25 ms`.
pub fn fmt_ns(ns: u64) -> String {
    if ns < 10_000 {
        format!("{ns} ns")
    } else if ns < 1_000_000 {
        format!("{:.1} µs", ns as f64 / 1e3)
    } else {
        format!("{:.2} ms", ns as f64 / 1e6)
    }
}

/// A fixed-width table of p50, p90, p99, p99.9 and max for each floor, one line per floor.
pub fn format_table(results: &[FloorResult]) -> String {
    let mut out = format!(
        "{:<8} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
        "floor", "p50", "p90", "p99", "p99.9", "max"
    );
    for r in results {
        let p = r.percentiles();
        out.push_str(&format!(
            "{:<8} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            r.name,
            fmt_ns(p.p50_ns),
            fmt_ns(p.p90_ns),
            fmt_ns(p.p99_ns),
            fmt_ns(p.p999_ns),
            fmt_ns(p.max_ns)
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Child process handling (parent side)

/// The spawned peer; killed and reaped on drop unless [`PeerChild::finish`] reaped it.
struct PeerChild {
    child: Option<Child>,
}

impl PeerChild {
    /// Spawns `current_exe floor-peer --kind K --rounds N [--cpu C] extra...`.
    /// `inherit` is a descriptor to leave open across exec (it stays close-on-exec in this
    /// process, so no other concurrently spawned program inherits it).
    fn spawn(
        kind: FloorKind,
        rounds: u64,
        cpu: Option<usize>,
        extra: &[String],
        inherit: Option<RawFd>,
    ) -> Result<Self> {
        let exe = std::env::current_exe().context("current_exe")?;
        let kind_name = kind.name();
        let mut cmd = Command::new(&exe);
        cmd.arg(PEER_SUBCOMMAND)
            .args(["--kind", kind_name, "--rounds", &rounds.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(c) = cpu {
            cmd.args(["--cpu", &c.to_string()]);
        }
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and only calls
        // async-signal-safe functions (prctl, getppid, fcntl) and builds io::Errors from raw
        // OS codes, which does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                // Die with the parent thread, so the peer never outlives a killed parent.
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() as u32 != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                if let Some(fd) = inherit {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning floor peer {}", exe.display()))?;
        tracing::debug!(pid = child.id(), kind = kind_name, "spawned floor peer");
        Ok(Self { child: Some(child) })
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("peer child already reaped")
    }

    /// Errors if the peer has already exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child().try_wait().context("waiting for floor peer")? {
            self.child = None;
            bail!("floor peer exited early ({status})");
        }
        Ok(())
    }

    /// Waits (bounded) for the peer to exit by itself and checks it succeeded.
    fn finish(mut self) -> Result<()> {
        let deadline = Instant::now() + STALL_TIMEOUT;
        loop {
            if let Some(status) = self.child().try_wait().context("waiting for floor peer")? {
                self.child = None;
                ensure!(status.success(), "floor peer failed: {status}");
                return Ok(());
            }
            if Instant::now() > deadline {
                // Drop kills and reaps it.
                bail!("floor peer did not exit within {STALL_TIMEOUT:?} after the last round");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for PeerChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Pins the calling thread to the parent CPU if asked; the guard restores the old mask.
fn pin_parent(cpus: Option<(usize, usize)>) -> Result<Option<pin::AffinityGuard>> {
    cpus.map(|(p, _)| pin::pin_scoped(p).with_context(|| format!("pinning to CPU {p}")))
        .transpose()
}

// ---------------------------------------------------------------------------------------------
// Shared memory

/// The words of the shared page, borrowed from a live mapping.
struct ShmSlots<'a> {
    /// Written by the parent (sequence number), read by the child.
    ping: &'a AtomicU64,
    /// Written by the child (echo of the sequence number), read by the parent.
    pong: &'a AtomicU64,
    /// Set to 1 by the child once it is set up.
    ready: &'a AtomicU64,
}

impl<'a> ShmSlots<'a> {
    fn new(shmem: &'a Shmem) -> Result<Self> {
        let base = shmem.as_ptr();
        ensure!(shmem.len() >= SHM_SIZE, "shared memory too small");
        ensure!(
            (base as usize).is_multiple_of(128),
            "shared memory not line-aligned"
        );
        // SAFETY: `base` is the start of a mapping of at least SHM_SIZE bytes that lives as
        // long as `shmem` (hence 'a) and is 128-byte aligned (checked), so each offset is an
        // in-bounds, 8-byte-aligned u64. AtomicU64 has the layout of u64, the fresh mapping is
        // zero-filled (a valid AtomicU64), and both processes only ever access these words
        // atomically.
        let at = |off: usize| unsafe { &*(base.add(off) as *const AtomicU64) };
        Ok(Self {
            ping: at(SHM_PING_OFF),
            pong: at(SHM_PONG_OFF),
            ready: at(SHM_READY_OFF),
        })
    }
}

/// Shared-memory floor: the parent stores a sequence number in the ping word, the child spins
/// until it sees it and stores it in the pong word (same 64-byte cache line, so one line
/// bounces between the two cores), the parent spins until it sees it. `cpus` = (parent, child).
pub fn shm_pingpong(iters: u64, cpus: Option<(usize, usize)>) -> Result<FloorResult> {
    ensure!(iters > 0, "iters must be > 0");
    let warm = warmup_rounds(iters);
    let total = warm + iters;
    let _affinity = pin_parent(cpus)?;

    let mut shmem = ShmemConf::new()
        .size(SHM_SIZE)
        .create()
        .map_err(|e| anyhow!("creating shared memory: {e}"))?;
    let os_id = shmem.get_os_id().to_string();
    let mut child = PeerChild::spawn(
        FloorKind::Shm,
        total,
        cpus.map(|c| c.1),
        &["--shm-id".into(), os_id.clone()],
        None,
    )?;
    {
        let slots = ShmSlots::new(&shmem)?;

        // Wait for the child to map the region and pin itself.
        let start = Instant::now();
        while slots.ready.load(Ordering::Acquire) == 0 {
            child.check_alive().with_context(|| {
                format!(
                    "is the current executable vmdev-perf? (it re-executes itself with \
                     `{PEER_SUBCOMMAND}`)"
                )
            })?;
            ensure!(
                start.elapsed() < STALL_TIMEOUT,
                "floor peer not ready after {STALL_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
        // Both sides have it mapped: remove the name now so nothing leaks if we are killed.
        shmem.set_owner(false);
        if let Ok(name) = std::ffi::CString::new(os_id) {
            // SAFETY: `name` is a valid NUL-terminated string; shm_unlink only removes the name.
            unsafe { libc::shm_unlink(name.as_ptr()) };
        }
    }
    let slots = ShmSlots::new(&shmem)?;

    let mut hist = new_hist();
    for seq in 1..=total {
        let t0 = Instant::now();
        slots.ping.store(seq, Ordering::Release);
        let mut spins: u64 = 0;
        while slots.pong.load(Ordering::Acquire) != seq {
            spin_loop();
            spins += 1;
            if spins.is_multiple_of(SPIN_CHECK_EVERY) {
                shm_slow_check(&mut child, t0)?;
            }
        }
        let dt = t0.elapsed();
        if seq > warm {
            record(&mut hist, dt);
        }
    }
    child.finish()?;
    Ok(FloorResult {
        name: FloorKind::Shm.name(),
        hist,
    })
}

#[cold]
#[inline(never)]
fn shm_slow_check(child: &mut PeerChild, since: Instant) -> Result<()> {
    child.check_alive()?;
    ensure!(
        since.elapsed() < STALL_TIMEOUT,
        "shm floor: no answer from the peer for {STALL_TIMEOUT:?}"
    );
    Ok(())
}

fn peer_shm(os_id: &str, rounds: u64) -> Result<()> {
    let shmem = ShmemConf::new()
        .os_id(os_id)
        .open()
        .map_err(|e| anyhow!("opening shared memory {os_id}: {e}"))?;
    let slots = ShmSlots::new(&shmem)?;
    let parent = std::os::unix::process::parent_id();
    slots.ready.store(1, Ordering::Release);
    for seq in 1..=rounds {
        let mut spins: u64 = 0;
        // The clock is started lazily: only slow rounds pay for reading it.
        let mut since = None;
        while slots.ping.load(Ordering::Acquire) != seq {
            spin_loop();
            spins += 1;
            if spins.is_multiple_of(SPIN_CHECK_EVERY) {
                ensure!(
                    std::os::unix::process::parent_id() == parent,
                    "floor parent went away"
                );
                let since = *since.get_or_insert_with(Instant::now);
                ensure!(
                    since.elapsed() < STALL_TIMEOUT,
                    "no ping from the floor parent for {STALL_TIMEOUT:?}"
                );
            }
        }
        slots.pong.store(seq, Ordering::Release);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// eventfd

fn new_eventfd() -> io::Result<File> {
    // SAFETY: eventfd has no memory-safety preconditions.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Why the eventfd watchdog woke the parent up.
#[derive(Default)]
struct WatchdogState {
    stop: AtomicBool,
    progress: AtomicU64,
    reason: Mutex<Option<String>>,
}

/// Thread that watches the control socket for the peer's exit (hang-up) and the parent's
/// progress for a stall; on either it records why and wakes the parent through its eventfd.
struct Watchdog {
    state: Arc<WatchdogState>,
    handle: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn start(ctl: UnixStream, wake: File) -> Result<Self> {
        let state = Arc::new(WatchdogState::default());
        let st = state.clone();
        let handle = std::thread::Builder::new()
            .name("floor-watchdog".into())
            .spawn(move || {
                let mut last = (0, Instant::now());
                while !st.stop.load(Ordering::Acquire) {
                    let mut pfd = libc::pollfd {
                        fd: ctl.as_raw_fd(),
                        events: libc::POLLIN | libc::POLLRDHUP,
                        revents: 0,
                    };
                    // SAFETY: `pfd` is one valid pollfd and nfds is 1.
                    let rc = unsafe { libc::poll(&mut pfd, 1, 50) };
                    let why = if rc > 0 && pfd.revents != 0 {
                        // The peer never writes to the socket: any event means it hung up.
                        Some("floor peer exited".to_string())
                    } else {
                        let p = st.progress.load(Ordering::Relaxed);
                        if p != last.0 {
                            last = (p, Instant::now());
                            None
                        } else if last.1.elapsed() > STALL_TIMEOUT {
                            Some(format!(
                                "no answer from the floor peer for {STALL_TIMEOUT:?}"
                            ))
                        } else {
                            None
                        }
                    };
                    if let Some(why) = why {
                        if st.stop.load(Ordering::Acquire) {
                            return;
                        }
                        *st.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                        let _ = (&wake).write_all(&EVENTFD_POISON.to_ne_bytes());
                        return;
                    }
                }
            })
            .context("spawning watchdog thread")?;
        Ok(Self {
            state,
            handle: Some(handle),
        })
    }

    fn reason(&self) -> String {
        self.state
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "unexpected eventfd value".into())
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// eventfd floor: the parent writes eventfd A, the child (blocked in `read` on A) writes
/// eventfd B, the parent blocks in `read` on B. The eventfds reach the child over a socketpair
/// with `SCM_RIGHTS`. `cpus` = (parent, child).
pub fn eventfd_pingpong(iters: u64, cpus: Option<(usize, usize)>) -> Result<FloorResult> {
    ensure!(iters > 0, "iters must be > 0");
    let warm = warmup_rounds(iters);
    let total = warm + iters;
    let _affinity = pin_parent(cpus)?;

    let efd_a = new_eventfd().context("eventfd")?;
    let efd_b = new_eventfd().context("eventfd")?;
    let (ctl, child_end) = UnixStream::pair().context("socketpair")?;
    let fd = child_end.as_raw_fd();
    let child = PeerChild::spawn(
        FloorKind::Eventfd,
        total,
        cpus.map(|c| c.1),
        &["--fd".into(), fd.to_string()],
        Some(fd),
    )?;
    // Only the child may hold its end, so that its exit hangs the socket up.
    drop(child_end);
    ctl.send_with_fd(&[0], &[efd_a.as_raw_fd(), efd_b.as_raw_fd()])
        .context("sending eventfds to the floor peer")?;
    let watchdog = Watchdog::start(ctl, efd_b.try_clone()?)?;

    let mut hist = new_hist();
    let one = 1u64.to_ne_bytes();
    let mut buf = [0u8; 8];
    for seq in 1..=total {
        let t0 = Instant::now();
        (&efd_a).write_all(&one).context("eventfd write")?;
        (&efd_b).read_exact(&mut buf).context("eventfd read")?;
        let dt = t0.elapsed();
        let v = u64::from_ne_bytes(buf);
        // After its last answer the peer exits, and the watchdog may see the hang-up and add
        // its poison before we read: that is fine on the last round only.
        if v != 1 && !(seq == total && v == 1 + EVENTFD_POISON) {
            bail!("eventfd floor: {}", watchdog.reason());
        }
        watchdog.state.progress.store(seq, Ordering::Relaxed);
        if seq > warm {
            record(&mut hist, dt);
        }
    }
    drop(watchdog);
    child.finish()?;
    Ok(FloorResult {
        name: FloorKind::Eventfd.name(),
        hist,
    })
}

/// Takes ownership of the inherited socket descriptor `fd`.
fn inherited_socket(fd: Option<RawFd>) -> Result<UnixStream> {
    let fd = fd.context("--fd is required")?;
    // SAFETY: F_GETFD only inspects the descriptor table entry.
    ensure!(
        unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0,
        "--fd {fd} is not an open descriptor"
    );
    // SAFETY: the parent passed this descriptor for our exclusive use; it is open (checked)
    // and nothing else in this process refers to it.
    Ok(unsafe { UnixStream::from_raw_fd(fd) })
}

fn peer_eventfd(ctl: UnixStream, rounds: u64) -> Result<()> {
    let mut byte = [0u8; 1];
    let mut fds: [RawFd; 2] = [-1; 2];
    let (n, nfds) = ctl
        .recv_with_fd(&mut byte, &mut fds)
        .context("receiving eventfds")?;
    ensure!(n == 1 && nfds == 2, "expected 2 eventfds, got {nfds}");
    // SAFETY: both descriptors were just received via SCM_RIGHTS and are owned by nobody else.
    let (efd_a, efd_b) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    let one = 1u64.to_ne_bytes();
    let mut buf = [0u8; 8];
    for _ in 0..rounds {
        (&efd_a).read_exact(&mut buf).context("eventfd read")?;
        (&efd_b).write_all(&one).context("eventfd write")?;
    }
    // `ctl` stays open until here: its hang-up tells the parent's watchdog we are gone.
    drop(ctl);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Unix socket

/// Unix-socket floor: one byte from parent to child and back over a stream socketpair,
/// blocking reads on both sides. `cpus` = (parent, child).
pub fn unix_pingpong(iters: u64, cpus: Option<(usize, usize)>) -> Result<FloorResult> {
    ensure!(iters > 0, "iters must be > 0");
    let warm = warmup_rounds(iters);
    let total = warm + iters;
    let _affinity = pin_parent(cpus)?;

    let (sock, child_end) = UnixStream::pair().context("socketpair")?;
    let fd = child_end.as_raw_fd();
    let child = PeerChild::spawn(
        FloorKind::Unix,
        total,
        cpus.map(|c| c.1),
        &["--fd".into(), fd.to_string()],
        Some(fd),
    )?;
    // Only the child may hold its end, so that its exit shows up as EOF here.
    drop(child_end);
    // A receive timeout costs nothing per read and bounds the wait on a stalled peer.
    sock.set_read_timeout(Some(STALL_TIMEOUT))?;

    let mut hist = new_hist();
    let mut buf = [0u8; 1];
    for seq in 1..=total {
        let t0 = Instant::now();
        if let Err(e) = (&sock)
            .write_all(&[1])
            .and_then(|()| (&sock).read_exact(&mut buf))
        {
            return Err(match e.kind() {
                io::ErrorKind::UnexpectedEof
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset => {
                    anyhow!("unix floor: floor peer exited")
                }
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    anyhow!("unix floor: no answer from the floor peer for {STALL_TIMEOUT:?}")
                }
                _ => anyhow::Error::new(e).context("unix floor"),
            });
        }
        let dt = t0.elapsed();
        if seq > warm {
            record(&mut hist, dt);
        }
    }
    drop(sock);
    child.finish()?;
    Ok(FloorResult {
        name: FloorKind::Unix.name(),
        hist,
    })
}

fn peer_unix(sock: UnixStream, rounds: u64) -> Result<()> {
    let mut buf = [0u8; 1];
    for _ in 0..rounds {
        match (&sock).read_exact(&mut buf) {
            Ok(()) => {}
            // The parent closed its end: it is done (or gave up).
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e).context("socket read"),
        }
        (&sock).write_all(&buf).context("socket write")?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Child entry point

/// Entry point of the hidden `floor-peer` subcommand: pins itself, then plays its side of
/// the requested ping-pong for `--rounds` round trips and exits.
pub fn run_peer(args: &PeerArgs) -> Result<()> {
    if let Some(cpu) = args.cpu {
        pin::pin_to_cpu(cpu).with_context(|| format!("pinning floor peer to CPU {cpu}"))?;
    }
    match args.kind {
        FloorKind::Shm => peer_shm(
            args.shm_id.as_deref().context("--shm-id is required")?,
            args.rounds,
        ),
        FloorKind::Eventfd => peer_eventfd(inherited_socket(args.fd)?, args.rounds),
        FloorKind::Unix => peer_unix(inherited_socket(args.fd)?, args.rounds),
    }
}
