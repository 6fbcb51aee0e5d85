//! `vmdev-perf latency` and `vmdev-perf throughput`: frames through a net-loopback device
//! with vmdev's own driver — over the vmdev protocol (`-u UUID`), the kernel's vhost-vdpa
//! (`--vhost-vdpa /dev/vhost-vdpa-N`) or vhost-user as a front end (`--vhost-user SOCK`:
//! vmdev's vhost-user door or any vhost-user-net back end, e.g. DPDK's vhost PMD) —
//! followed by the floors measured on the same cores.

use crate::floors::{self, fmt_ns, FloorResult};
use crate::{hgrm, pin};
use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmdev_proto::Uuid;
use vmdev_tools::{
    DeviceTransport, NetDriver, NetDriverConfig, NotifyMode, TransportClient, VhostUserFront,
    VhostVdpa,
};

/// Options shared by the benchmarks.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// The control plane's run directory.
    #[arg(long, env = "VMDEV_RUN_DIR", default_value = "/run/vmdev")]
    pub run_dir: PathBuf,
    /// Device UUID (a started net-loopback device).
    #[arg(
        short,
        long,
        required_unless_present_any = ["vhost_vdpa", "vhost_user"],
        default_value_t = Uuid::nil(),
        hide_default_value = true
    )]
    pub uuid: Uuid,
    /// Drive a vhost-vdpa device instead (`/dev/vhost-vdpa-N`, e.g. a net-loopback device
    /// served through VDUSE): no control plane is asked anything, so the driver is pinned
    /// only with --cpu.
    #[arg(long, value_name = "PATH", conflicts_with = "uuid")]
    pub vhost_vdpa: Option<PathBuf>,
    /// Drive a vhost-user-net back end instead, as its front end (SOCK: the socket of
    /// vmdev's vhost-user door, `vmdevctl start ... --vhost-user SOCK`, or of another back
    /// end such as DPDK's vhost PMD, which must send every frame back): no control plane is
    /// asked anything, so the driver is pinned only with --cpu.
    #[arg(long, value_name = "SOCK", conflicts_with_all = ["uuid", "vhost_vdpa"])]
    pub vhost_user: Option<PathBuf>,
    /// Frame size in bytes (Ethernet header + payload, 60..=MTU+14).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// CPU to pin the driver to (default: a CPU other than the datapath's, if any; with
    /// --vhost-vdpa or --vhost-user, no pinning).
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Sleep on the call eventfd instead of busy-polling the used ring.
    #[arg(long)]
    pub interrupts: bool,
    /// Use packed virtqueues (VIRTIO_F_RING_PACKED); the device must offer them.
    #[arg(long)]
    pub packed: bool,
    /// Negotiate VIRTIO_F_IN_ORDER; the device must offer it. On packed rings the device
    /// then returns a batch of sent frames with one used descriptor.
    #[arg(long)]
    pub in_order: bool,
    /// Round trips per floor measurement (0 skips the floors).
    #[arg(long, default_value_t = 20_000)]
    pub floor_iters: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `vmdev-perf latency`.
#[derive(clap::Args, Debug)]
pub struct LatencyArgs {
    #[command(flatten)]
    common: Common,
    /// Measured round trips (after 1,000 warm-up frames).
    #[arg(long, default_value_t = 100_000)]
    frames: u64,
    /// Also write the histogram as an .hgrm file.
    #[arg(long)]
    hgrm: Option<PathBuf>,
}

/// Arguments of `vmdev-perf throughput`.
#[derive(clap::Args, Debug)]
pub struct ThroughputArgs {
    #[command(flatten)]
    common: Common,
    /// Measuring time in seconds.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Frames queued per flush (one avail-index publish and at most one kick per batch).
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Forward like testpmd's `io` mode after `--tx-first`: N frames circulate and each
    /// one received is sent straight back from its RX buffer, with no copy in the driver
    /// (0: the default mode, which writes every frame into a TX buffer and copies every
    /// received one out).
    #[arg(long, default_value_t = 0, value_name = "N")]
    forward: u64,
}

/// A driver and a frame, set up and pinned for a benchmark.
pub(crate) struct Setup<T = TransportClient> {
    pub drv: NetDriver<T>,
    pub frame: Vec<u8>,
    pub cpus: Option<(usize, usize)>,
    pub parent: String,
    /// The device as the user named it: its UUID, its vhost-vdpa path or its vhost-user
    /// socket.
    pub target: String,
}

/// Offset of the sequence number stamped into each frame (after the Ethernet header).
const SEQ_AT: usize = 14;

/// The sequence number stamped into a frame, if it is long enough to carry one.
fn seq_of(frame: &[u8]) -> Option<u64> {
    let b: [u8; 8] = frame.get(SEQ_AT..SEQ_AT + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(b))
}

/// Keeps a window of frames in flight: queues up to `batch` per flush, stamps each with its
/// sequence number and checks that every frame comes back once and in order.
pub(crate) struct Pump {
    pub sent: u64,
    pub got: u64,
    pub batch: usize,
    window: u64,
    buf: Vec<u8>,
    /// When the stream last stopped moving (None while it moves).
    stalled_since: Option<Instant>,
    /// Rounds in a row in which nothing moved.
    idle: u32,
}

impl Pump {
    pub fn new<T: DeviceTransport>(drv: &NetDriver<T>, batch: usize) -> Self {
        Pump {
            sent: 0,
            got: 0,
            batch: batch.max(1),
            window: drv.max_in_flight() as u64,
            buf: Vec::new(),
            stalled_since: None,
            idle: 0,
        }
    }

    /// One round: queue and flush a batch, take every frame that came back (sleeping on
    /// the call eventfd when nothing moved). Returns the frames received.
    pub fn step<T: DeviceTransport>(
        &mut self,
        drv: &mut NetDriver<T>,
        frame: &mut [u8],
    ) -> Result<u64> {
        let limit = (self.sent + self.batch as u64).min(self.got + self.window);
        let queued = self.queue_until(drv, frame, limit)?;
        drv.flush()?;
        let before = self.got;
        while drv.recv_into(&mut self.buf)? {
            let seq = seq_of(&self.buf);
            if seq != Some(self.got) || self.buf.len() != frame.len() {
                bail!(
                    "frame {} came back as {seq:?} with {} bytes: lost, duplicated or reordered",
                    self.got,
                    self.buf.len()
                );
            }
            self.got += 1;
        }
        self.progress(drv, self.got > before || queued > 0)?;
        Ok(self.got - before)
    }

    /// One round of testpmd-style `io` forwarding: the first call queues `n` frames, then
    /// every frame that comes back is sent straight out again from its RX buffer
    /// ([`NetDriver::echo`], no copy), up to `batch` per flush. Checks each comes back in
    /// order (the `n` sequence numbers cycle). Returns the frames received.
    pub fn echo_step<T: DeviceTransport>(
        &mut self,
        drv: &mut NetDriver<T>,
        frame: &mut [u8],
        n: u64,
    ) -> Result<u64> {
        if n > self.window {
            bail!("{n} frames in circulation: at most {} fit", self.window);
        }
        let queued = self.queue_until(drv, frame, n)?;
        let before = self.got;
        let mut peek = [0u8; SEQ_AT + 8];
        while self.got - before < self.batch as u64 {
            let Some(len) = drv.echo(&mut peek)? else {
                break;
            };
            let seq = seq_of(&peek).unwrap_or(u64::MAX);
            if seq != self.got % n || len != frame.len() {
                bail!(
                    "frame {} came back as sequence {seq} with {len} bytes (expected {}): lost, duplicated or reordered",
                    self.got,
                    self.got % n
                );
            }
            self.got += 1;
        }
        drv.flush()?;
        self.progress(drv, self.got > before || queued > 0)?;
        Ok(self.got - before)
    }

    /// Queues frames, each stamped with its sequence number, until `limit` have been sent
    /// in all or TX is full; returns how many it queued.
    fn queue_until<T: DeviceTransport>(
        &mut self,
        drv: &mut NetDriver<T>,
        frame: &mut [u8],
        limit: u64,
    ) -> Result<u64> {
        let first = self.sent;
        while self.sent < limit {
            if let Some(seq) = frame.get_mut(SEQ_AT..SEQ_AT + 8) {
                seq.copy_from_slice(&self.sent.to_le_bytes());
            }
            if !drv.queue_frame(frame)? {
                break;
            }
            self.sent += 1;
        }
        Ok(self.sent - first)
    }

    /// After a round: notes whether anything moved, sleeps on the call eventfd (interrupt
    /// mode) when nothing did, and gives up after 5 s without progress.
    fn progress<T: DeviceTransport>(&mut self, drv: &mut NetDriver<T>, moved: bool) -> Result<()> {
        // The clock is read only while nothing moves, and then every 256 idle rounds (a
        // clock read per step cost up to 12 % of the driver's time at full rate, and each
        // one delays noticing the next frames).
        if moved {
            self.stalled_since = None;
            self.idle = 0;
            return Ok(());
        }
        self.idle = self.idle.wrapping_add(1);
        if self.idle % 256 == 1 {
            let now = Instant::now();
            match self.stalled_since {
                None => self.stalled_since = Some(now),
                Some(t) if now - t > Duration::from_secs(5) => {
                    bail!("no progress for 5 s (is the datapath running?)")
                }
                Some(_) => {}
            }
        }
        drv.wait_rx(Duration::from_millis(100))?;
        Ok(())
    }
}

/// Opens the device of `c` with vmdev's own driver, pinned away from its datapath.
pub(crate) fn setup(c: &Common) -> Result<Setup> {
    if let Some(path) = &c.vhost_vdpa {
        bail!(
            "this benchmark needs a vmdev device (-u UUID), not the vhost-vdpa device {}",
            path.display()
        );
    }
    if let Some(path) = &c.vhost_user {
        bail!(
            "this benchmark needs a vmdev device (-u UUID), not the vhost-user socket {}",
            path.display()
        );
    }
    let mut client = TransportClient::connect(&c.run_dir)?;
    let dev = client
        .list_devices()?
        .into_iter()
        .find(|d| d.uuid == c.uuid)
        .with_context(|| format!("no device {}", c.uuid))?;
    let dp_cpu = client
        .list_types()?
        .into_iter()
        .find(|p| p.name == dev.parent)
        .and_then(|p| p.cpu)
        .map(|c| c as usize);
    drop(client);
    let allowed = pin::allowed_cpus().unwrap_or_default();
    let my_cpu = c
        .cpu
        .or_else(|| allowed.iter().copied().find(|&x| Some(x) != dp_cpu));
    let cpus = pin_driver(my_cpu, dp_cpu)?;
    let drv =
        NetDriver::open(&c.run_dir, c.uuid, driver_config(c)).context("opening the device")?;
    check_features(c, &drv)?;
    let frame = test_frame(&drv, c.size)?;
    Ok(Setup {
        drv,
        frame,
        cpus,
        parent: dev.parent,
        target: c.uuid.to_string(),
    })
}

/// Opens vhost-vdpa device `path` with vmdev's own driver, pinned only as --cpu says (no
/// control plane tells where the device's datapath runs).
pub(crate) fn setup_vhost_vdpa(c: &Common, path: &Path) -> Result<Setup<VhostVdpa>> {
    let cpus = pin_driver(c.cpu, None)?;
    let drv = NetDriver::open_vhost_vdpa(path, driver_config(c))
        .with_context(|| format!("opening the vhost-vdpa device {}", path.display()))?;
    check_features(c, &drv)?;
    let frame = test_frame(&drv, c.size)?;
    Ok(Setup {
        drv,
        frame,
        cpus,
        parent: "vhost-vdpa".into(),
        target: path.display().to_string(),
    })
}

/// Connects to the vhost-user back end on `path` as its front end with vmdev's own driver,
/// pinned only as --cpu says (no control plane tells where the back end runs).
pub(crate) fn setup_vhost_user(c: &Common, path: &Path) -> Result<Setup<VhostUserFront>> {
    let cpus = pin_driver(c.cpu, None)?;
    let drv = NetDriver::open_vhost_user(path, driver_config(c))
        .with_context(|| format!("driving the vhost-user back end {}", path.display()))?;
    check_features(c, &drv)?;
    let frame = test_frame(&drv, c.size)?;
    Ok(Setup {
        drv,
        frame,
        cpus,
        parent: "vhost-user".into(),
        target: path.display().to_string(),
    })
}

/// Pins this thread to `my_cpu` (if any); returns the driver/datapath CPU pair the floors
/// are measured on.
fn pin_driver(my_cpu: Option<usize>, dp_cpu: Option<usize>) -> Result<Option<(usize, usize)>> {
    if let Some(cpu) = my_cpu {
        pin::pin_to_cpu(cpu).with_context(|| format!("pinning to cpu {cpu}"))?;
    }
    Ok(match (my_cpu, dp_cpu) {
        (Some(a), Some(b)) if a != b => Some((a, b)),
        _ => pin::default_pair(),
    })
}

fn driver_config(c: &Common) -> NetDriverConfig {
    let mode = if c.interrupts {
        NotifyMode::Interrupt
    } else {
        NotifyMode::Poll
    };
    NetDriverConfig {
        mode,
        packed: c.packed,
        in_order: c.in_order,
        ..Default::default()
    }
}

/// With --packed or --in-order, fails unless the device took that feature (no silent run
/// of another kind).
fn check_features<T: DeviceTransport>(c: &Common, drv: &NetDriver<T>) -> Result<()> {
    if c.packed && !drv.packed() {
        bail!("--packed: the device does not offer VIRTIO_F_RING_PACKED");
    }
    if c.in_order && !negotiated_in_order(drv) {
        bail!("--in-order: the device does not offer VIRTIO_F_IN_ORDER");
    }
    Ok(())
}

/// Whether VIRTIO_F_IN_ORDER was negotiated.
fn negotiated_in_order<T: DeviceTransport>(drv: &NetDriver<T>) -> bool {
    drv.features() & vmdev_proto::virtio::features::IN_ORDER != 0
}

/// The rings a run used, as the text report names them.
fn rings_label(packed: bool, in_order: bool) -> &'static str {
    match (packed, in_order) {
        (false, false) => "split",
        (true, false) => "packed",
        (false, true) => "split in-order",
        (true, true) => "packed in-order",
    }
}

/// A `size`-byte frame to the device's MAC.
fn test_frame<T: DeviceTransport>(drv: &NetDriver<T>, size: usize) -> Result<Vec<u8>> {
    if size < 60 || size > drv.max_frame() {
        bail!("--size must be in 60..={}", drv.max_frame());
    }
    let mut frame = vec![0u8; size];
    frame[..6].copy_from_slice(&drv.mac());
    frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    frame[12..14].copy_from_slice(&[0x88, 0xb5]);
    Ok(frame)
}

fn measure_floors(c: &Common, cpus: Option<(usize, usize)>) -> Result<Vec<FloorResult>> {
    if c.floor_iters == 0 {
        return Ok(Vec::new());
    }
    floors::run_all(c.floor_iters, cpus)
}

fn wait_one<T: DeviceTransport>(
    drv: &mut NetDriver<T>,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<()> {
    let mut spins = 0u32;
    loop {
        if drv.recv_into(buf)? {
            return Ok(());
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(256) && Instant::now() > deadline {
            bail!("a frame did not come back within 5 s (is the datapath running?)");
        }
        drv.wait_rx(Duration::from_millis(100))?;
    }
}

/// Runs `vmdev-perf latency`.
pub fn latency(a: &LatencyArgs) -> Result<()> {
    let c = &a.common;
    match (&c.vhost_vdpa, &c.vhost_user) {
        (Some(path), _) => run_latency(a, setup_vhost_vdpa(c, path)?),
        (None, Some(sock)) => run_latency(a, setup_vhost_user(c, sock)?),
        (None, None) => run_latency(a, setup(c)?),
    }
}

fn run_latency<T: DeviceTransport>(a: &LatencyArgs, mut s: Setup<T>) -> Result<()> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut buf = Vec::new();
    for i in 0..1000 + a.frames {
        let t0 = Instant::now();
        if !s.drv.send(&s.frame)? {
            bail!("TX ring full with one frame in flight");
        }
        wait_one(&mut s.drv, &mut buf, t0 + Duration::from_secs(5))?;
        let dt = t0.elapsed();
        if buf.len() != s.frame.len() {
            bail!(
                "frame came back with {} bytes instead of {}",
                buf.len(),
                s.frame.len()
            );
        }
        if i >= 1000 {
            hist.saturating_record(dt.as_nanos() as u64);
        }
    }
    let packed = s.drv.packed();
    let in_order = negotiated_in_order(&s.drv);
    drop(s.drv);
    if let Some(path) = &a.hgrm {
        std::fs::write(path, hgrm::render(&hist))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let fl = measure_floors(&a.common, s.cpus)?;
    let pct = |q: f64| hist.value_at_quantile(q);
    if a.common.json {
        let floors_json = floors::to_json(&fl, a.common.floor_iters, s.cpus);
        let ratios: Vec<_> = fl
            .iter()
            .map(|f| json!({ "floor": f.name, "p50_ratio": pct(0.5) as f64 / f.hist.value_at_quantile(0.5).max(1) as f64 }))
            .collect();
        let v = json!({
            "benchmark": "latency", "frames": a.frames, "size": a.common.size, "parent": s.parent,
            "device": s.target,
            "cpus": s.cpus.map(|(x, y)| [x, y]), "interrupts": a.common.interrupts,
            "packed": packed, "in_order": in_order, "p50_ns": pct(0.5), "p90_ns": pct(0.9), "p99_ns": pct(0.99), "p999_ns": pct(0.999),
            "max_ns": hist.max(), "mean_ns": hist.mean(), "floors": floors_json, "ratios": ratios,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "latency: {} round trips of one {}-byte frame through {} on '{}' ({}, {} rings; driver/datapath CPUs {:?})",
        a.frames,
        a.common.size,
        s.target,
        s.parent,
        if a.common.interrupts { "interrupts" } else { "busy-polling" },
        rings_label(packed, in_order),
        s.cpus
    );
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "", "p50", "p90", "p99", "p99.9", "max"
    );
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "vmdev",
        fmt_ns(pct(0.5)),
        fmt_ns(pct(0.9)),
        fmt_ns(pct(0.99)),
        fmt_ns(pct(0.999)),
        fmt_ns(hist.max())
    );
    print_floors(&fl, pct(0.5) as f64, "p50 round trip");
    Ok(())
}

fn print_floors(fl: &[FloorResult], ours_ns: f64, what: &str) {
    if fl.is_empty() {
        return;
    }
    for f in fl {
        let p = f.percentiles();
        println!(
            "{:<10} {:>10} {:>10} {:>10} {:>10} {:>10}   {what} = {:.3}x this floor",
            format!("floor:{}", f.name),
            fmt_ns(p.p50_ns),
            fmt_ns(p.p90_ns),
            fmt_ns(p.p99_ns),
            fmt_ns(p.p999_ns),
            fmt_ns(p.max_ns),
            ours_ns / p.p50_ns.max(1) as f64
        );
    }
}

/// Runs `vmdev-perf throughput`.
pub fn throughput(a: &ThroughputArgs) -> Result<()> {
    let c = &a.common;
    match (&c.vhost_vdpa, &c.vhost_user) {
        (Some(path), _) => run_throughput(a, setup_vhost_vdpa(c, path)?),
        (None, Some(sock)) => run_throughput(a, setup_vhost_user(c, sock)?),
        (None, None) => run_throughput(a, setup(c)?),
    }
}

fn run_throughput<T: DeviceTransport>(a: &ThroughputArgs, mut s: Setup<T>) -> Result<()> {
    let mut pump = Pump::new(&s.drv, a.batch);
    let warmup_end = Instant::now() + Duration::from_millis(200);
    let mut start: Option<(Instant, u64)> = None;
    let measure = Duration::from_secs_f64(a.seconds.max(0.1));
    let mut steps = 0u32;
    // Rate of each whole second of the measurement: this machine flips between a quiet and
    // a slow mode within seconds, and the spread of these shows which modes a run hit.
    let mut per_second = Vec::new();
    let mut tick: Option<(Instant, u64)> = None;
    loop {
        // The clock every 16 steps: a few µs of precision, a fraction of the reads.
        if steps.is_multiple_of(16) {
            let now = Instant::now();
            match start {
                None if now >= warmup_end => {
                    start = Some((now, pump.got));
                    tick = start;
                }
                Some((t0, _)) if now - t0 >= measure => break,
                _ => {}
            }
            if let Some((t, got)) = tick {
                let dt = now - t;
                if dt >= Duration::from_secs(1) {
                    per_second.push((pump.got - got) as f64 / dt.as_secs_f64());
                    tick = Some((now, pump.got));
                }
            }
        }
        steps = steps.wrapping_add(1);
        if a.forward > 0 {
            pump.echo_step(&mut s.drv, &mut s.frame, a.forward)?;
        } else {
            pump.step(&mut s.drv, &mut s.frame)?;
        }
    }
    let Some((t0, got0)) = start else {
        bail!("measurement never started")
    };
    let secs = t0.elapsed().as_secs_f64();
    let frames = pump.got - got0;
    let batch = pump.batch;
    let packed = s.drv.packed();
    let in_order = negotiated_in_order(&s.drv);
    drop(s.drv);
    let fps = frames as f64 / secs;
    let gbps = fps * a.common.size as f64 * 8.0 / 1e9;
    let ns_per_frame = 1e9 / fps.max(1.0);
    let fl = measure_floors(&a.common, s.cpus)?;
    if a.common.json {
        let v = json!({
            "benchmark": "throughput", "size": a.common.size, "batch": batch, "seconds": secs,
            "frames": frames, "frames_per_s": fps, "gbit_per_s": gbps, "ns_per_frame": ns_per_frame,
            "parent": s.parent, "device": s.target, "cpus": s.cpus.map(|(x, y)| [x, y]),
            "interrupts": a.common.interrupts, "packed": packed, "in_order": in_order, "forward": a.forward,
            "per_second": per_second,
            "floors": floors::to_json(&fl, a.common.floor_iters, s.cpus),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "throughput: {}-byte frames, batch {batch}, {:.1} s through {} on '{}' ({}, {} rings; driver/datapath CPUs {:?})",
        a.common.size,
        secs,
        s.target,
        s.parent,
        if a.common.interrupts { "interrupts" } else { "busy-polling" },
        rings_label(packed, in_order),
        s.cpus
    );
    println!(
        "vmdev      {:.3} Mframes/s round trip, {gbps:.2} Gbit/s, {} per frame",
        fps / 1e6,
        fmt_ns(ns_per_frame as u64)
    );
    print_floors(&fl, ns_per_frame, "time per frame");
    Ok(())
}
