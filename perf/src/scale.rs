//! `vmdev-perf scale` and `vmdev-perf idle`: how one datapath thread holds up with many
//! devices, and what an idle device costs and how fast it wakes.

use crate::pin;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmdev_proto::Uuid;
use vmdev_tools::{NetDriver, NetDriverConfig, TransportClient};

/// Arguments of `vmdev-perf scale`.
#[derive(clap::Args, Debug)]
pub struct ScaleArgs {
    /// The control plane's run directory.
    #[arg(long, env = "VMDEV_RUN_DIR", default_value = "/run/vmdev")]
    run_dir: PathBuf,
    /// The datapath(s) to load; with several (`dp0,dp1`) the devices are spread over them
    /// round-robin.
    #[arg(short, long, value_delimiter = ',', required = true)]
    parent: Vec<String>,
    /// Device counts to measure, e.g. 1,8,64.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    devices: Vec<usize>,
    /// Measuring time per count, seconds.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Frames queued per device per round.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Frame size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// CPU to pin the driver to.
    #[arg(long)]
    cpu: Option<usize>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Arguments of `vmdev-perf idle`.
#[derive(clap::Args, Debug)]
pub struct IdleArgs {
    /// The control plane's run directory.
    #[arg(long, env = "VMDEV_RUN_DIR", default_value = "/run/vmdev")]
    run_dir: PathBuf,
    /// Device UUID (a started net-loopback device).
    #[arg(short, long)]
    uuid: Uuid,
    /// How long the device stays idle while the datapath's CPU time is measured, seconds.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// CPU to pin the driver to.
    #[arg(long)]
    cpu: Option<usize>,
    /// Wake-ups measured, each after its own 100 ms idle spell; the report gives each and
    /// their median, since one preempted 100 µs late in the 5 ms can spoil a single one.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    wakes: u32,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn frame_for(drv: &NetDriver, size: usize) -> Vec<u8> {
    let mut f = vec![0u8; size.max(60)];
    f[..6].copy_from_slice(&drv.mac());
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

/// Round-robin over every driver: queue a batch, flush, take what came back — never
/// sleeping, so one slow device cannot stall the others. Returns frames received.
fn round(drivers: &mut [NetDriver], frame: &[u8], batch: usize, buf: &mut Vec<u8>) -> Result<u64> {
    let mut got = 0;
    for d in drivers.iter_mut() {
        let mut q = 0;
        while q < batch && d.queue_frame(frame)? {
            q += 1;
        }
        d.flush()?;
        while d.recv_into(buf)? {
            got += 1;
        }
    }
    Ok(got)
}

fn pump_for(drivers: &mut [NetDriver], frame: &[u8], batch: usize, t: Duration) -> Result<f64> {
    let mut buf = Vec::new();
    let warm = Instant::now() + Duration::from_millis(200);
    while Instant::now() < warm {
        round(drivers, frame, batch, &mut buf)?;
    }
    let (t0, mut n) = (Instant::now(), 0u64);
    let mut last = t0;
    while t0.elapsed() < t {
        let k = round(drivers, frame, batch, &mut buf)?;
        n += k;
        if k > 0 {
            last = Instant::now();
        } else if last.elapsed() > Duration::from_secs(5) {
            bail!("no frame came back for 5 s (is the datapath running?)");
        }
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

fn pin_driver(cpu: Option<usize>, avoid: Option<usize>) -> Result<()> {
    let allowed = pin::allowed_cpus().unwrap_or_default();
    if let Some(c) = cpu.or_else(|| allowed.iter().copied().find(|&x| Some(x) != avoid)) {
        pin::pin_to_cpu(c).with_context(|| format!("pinning to cpu {c}"))?;
    }
    Ok(())
}

fn parent_info(run_dir: &Path, parent: &str) -> Result<(u32, Option<usize>)> {
    let mut c = TransportClient::connect(run_dir)?;
    let p = c
        .list_types()?
        .into_iter()
        .find(|p| p.name == parent)
        .with_context(|| format!("no parent named '{parent}'"))?;
    Ok((p.pid, p.cpu.map(|c| c as usize)))
}

/// Runs `vmdev-perf scale`.
pub fn scale(a: &ScaleArgs) -> Result<()> {
    let mut dp_cpu = None;
    for p in a.parent.iter().rev() {
        dp_cpu = parent_info(&a.run_dir, p)?.1;
    }
    pin_driver(a.cpu, dp_cpu)?;
    let mut mgmt = TransportClient::connect(&a.run_dir)?;
    let mut rows = Vec::new();
    for &n in &a.devices {
        let mut uuids = Vec::new();
        let res = (|| -> Result<f64> {
            let mut drivers = Vec::new();
            for i in 0..n {
                let attrs = vec![("queue-size".to_string(), "256".to_string())];
                let parent = &a.parent[i % a.parent.len()];
                let u = mgmt
                    .start_device(parent, "net-loopback", None, attrs, None)
                    .with_context(|| format!("starting device {} of {n}", uuids.len() + 1))?;
                uuids.push(u);
                drivers.push(NetDriver::open(&a.run_dir, u, NetDriverConfig::default())?);
            }
            let frame = frame_for(&drivers[0], a.size);
            let fps = pump_for(
                &mut drivers,
                &frame,
                a.batch,
                Duration::from_secs_f64(a.seconds),
            )?;
            Ok(fps)
        })();
        for u in uuids {
            let _ = mgmt.stop_device(u);
        }
        rows.push((n, res?));
    }
    let base = rows.first().map(|r| r.1).unwrap_or(1.0).max(1.0);
    let shmem = vmdev_shm_ring::shmem_huge_setting();
    if a.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(n, fps)| json!({ "devices": n, "frames_per_s": fps, "ratio_to_first": fps / base }))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({ "benchmark": "scale", "parent": a.parent, "size": a.size, "batch": a.batch,
                         "shmem_enabled": shmem, "rows": v })
            )?
        );
        return Ok(());
    }
    println!(
        "scale: {}-byte frames, batch {} per device, one driver thread, datapath(s) '{}', \
         shmem_enabled {} (guest memory in huge pages unless never)",
        a.size,
        a.batch,
        a.parent.join(","),
        shmem.as_deref().unwrap_or("unknown")
    );
    println!(
        "{:>8} {:>16} {:>12}",
        "devices", "Mframes/s total", "vs first"
    );
    for (n, fps) in &rows {
        println!("{n:>8} {:>16.3} {:>12.3}", fps / 1e6, fps / base);
    }
    Ok(())
}

/// Nanoseconds process `pid` has run on a CPU, all threads (from /proc/PID/task/*/schedstat).
fn cpu_ns(pid: u32) -> Result<u64> {
    let mut total = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).context("the datapath's /proc")? {
        let p = t?.path().join("schedstat");
        if let Ok(s) = std::fs::read_to_string(&p) {
            total += s
                .split_whitespace()
                .next()
                .and_then(|x| x.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

/// Runs `vmdev-perf idle`.
pub fn idle(a: &IdleArgs) -> Result<()> {
    let mut c = TransportClient::connect(&a.run_dir)?;
    let dev = c
        .list_devices()?
        .into_iter()
        .find(|d| d.uuid == a.uuid)
        .with_context(|| format!("no device {}", a.uuid))?;
    drop(c);
    let (pid, dp_cpu) = parent_info(&a.run_dir, &dev.parent)?;
    pin_driver(a.cpu, dp_cpu)?;
    let mut drivers = vec![NetDriver::open(
        &a.run_dir,
        a.uuid,
        NetDriverConfig::default(),
    )?];
    let frame = frame_for(&drivers[0], 64);
    // Busy first, so the idle spell starts from full speed.
    let busy_fps = pump_for(&mut drivers, &frame, 32, Duration::from_millis(500))?;
    let mut buf = Vec::new();
    let mut quiet = Instant::now();
    while quiet.elapsed() < Duration::from_millis(20) {
        if drivers[0].recv_into(&mut buf)? {
            quiet = Instant::now();
        }
    }
    // Idle: let the spin budget run out, then measure the datapath's CPU time.
    std::thread::sleep(Duration::from_millis(100));
    let (c0, t0) = (cpu_ns(pid)?, Instant::now());
    std::thread::sleep(Duration::from_secs_f64(a.seconds));
    let (c1, t1) = (cpu_ns(pid)?, Instant::now());
    let idle_pct = (c1 - c0) as f64 / (t1 - t0).as_nanos() as f64 * 100.0;
    // Wake: one frame's round trip, then how many frames the first millisecond carries.
    let w0 = Instant::now();
    let d = &mut drivers[0];
    if !d.send(&frame)? {
        bail!("TX ring full");
    }
    while !d.recv_into(&mut buf)? {
        if w0.elapsed() > Duration::from_secs(5) {
            bail!("no answer after the idle spell");
        }
    }
    let first_rt = w0.elapsed();
    // Frames per 100 µs over the 5 ms after each further idle spell (a round counts in the
    // slot where it started), against the busy rate measured before the first.
    let busy_per_slot = busy_fps / 1e4;
    let mut wakes = Vec::new();
    for _ in 0..a.wakes {
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        let mut slots = [0u64; WAKE_SLOTS];
        while let Some(slot) = slots.get_mut((t.elapsed().as_micros() / 100) as usize) {
            *slot += round(&mut drivers, &frame, 32, &mut buf)?;
        }
        wakes.push(slots);
    }
    let each: Vec<Option<usize>> = wakes
        .iter()
        .map(|s| full_rate_after(s, busy_per_slot).map(|i| i * 100))
        .collect();
    let full_after_us = median_wake(&each);
    let per_ms = |s: &[u64; WAKE_SLOTS]| -> Vec<u64> {
        s.chunks(SLOTS_PER_MS).map(|c| c.iter().sum()).collect()
    };
    let slots = wakes.first().copied().unwrap_or([0; WAKE_SLOTS]);
    let first_ms = slots[..SLOTS_PER_MS].iter().sum::<u64>();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "benchmark": "idle", "parent": dev.parent, "busy_frames_per_s": busy_fps,
                "idle_seconds": a.seconds, "idle_cpu_percent": idle_pct,
                "wake_round_trip_ns": first_rt.as_nanos() as u64,
                "frames_first_ms_after_idle": first_ms,
                "frames_per_100us_after_idle": &slots[..], "full_rate_after_us": full_after_us,
                "full_rate_after_us_each": each,
                "frames_per_ms_after_idle_each": wakes.iter().map(per_ms).collect::<Vec<_>>(),
            }))?
        );
        return Ok(());
    }
    println!(
        "idle: device {} on '{}' (datapath pid {pid})",
        a.uuid, dev.parent
    );
    println!("busy                      {:.3} Mframes/s", busy_fps / 1e6);
    println!(
        "idle CPU of the datapath  {idle_pct:.3} % of a core over {:.1} s",
        a.seconds
    );
    println!(
        "first round trip after idle {:.1} µs",
        first_rt.as_nanos() as f64 / 1e3
    );
    println!(
        "frames in the first ms after 100 ms idle (wake 1): {first_ms} ({:.0} % of a busy ms)",
        first_ms as f64 / (busy_per_slot * SLOTS_PER_MS as f64).max(1.0) * 100.0
    );
    let when = |us: Option<usize>| {
        us.map_or(
            "not back at 90 % of the busy rate within 5 ms".into(),
            |us| format!("back at 90 % of the busy rate from {us} µs on"),
        )
    };
    for (i, (s, us)) in wakes.iter().zip(&each).enumerate() {
        let ms: Vec<String> = per_ms(s).iter().map(u64::to_string).collect();
        println!(
            "wake {}: {} (frames per ms: {})",
            i + 1,
            when(*us),
            ms.join(" ")
        );
    }
    println!("median of {} wakes: {}", wakes.len(), when(full_after_us));
    Ok(())
}

/// The median of the wake-ups' `full_rate_after` figures, a wake that never got there
/// counting as the slowest (`None` when the median one did not); the lower median for an
/// even count.
fn median_wake(each: &[Option<usize>]) -> Option<usize> {
    let mut v: Vec<usize> = each.iter().map(|w| w.unwrap_or(usize::MAX)).collect();
    v.sort_unstable();
    v.get(v.len().saturating_sub(1) / 2)
        .copied()
        .filter(|&us| us != usize::MAX)
}

/// 100 µs slots in a millisecond.
const SLOTS_PER_MS: usize = 10;

/// 100 µs slots measured after an idle spell: 5 ms.
const WAKE_SLOTS: usize = 5 * SLOTS_PER_MS;

/// The first slot of `slots` from which every 1 ms window (ten slots) carries at least
/// 90 % of a busy millisecond: when a woken device is back at its busy rate. Windows, not
/// single slots, since a 100 µs slot varies by ±20 % here even at a steady rate.
fn full_rate_after(slots: &[u64], busy_per_slot: f64) -> Option<usize> {
    let ok: Vec<bool> = slots
        .windows(SLOTS_PER_MS)
        .map(|w| w.iter().sum::<u64>() as f64 >= 0.9 * busy_per_slot * SLOTS_PER_MS as f64)
        .collect();
    (0..ok.len()).find(|&i| ok[i..].iter().all(|&b| b))
}

#[cfg(test)]
mod tests {
    use super::{full_rate_after, median_wake};

    #[test]
    fn the_median_wake_counts_a_wake_that_never_got_there_as_the_slowest() {
        assert_eq!(median_wake(&[Some(300), None, Some(100)]), Some(300));
        assert_eq!(median_wake(&[None, None, Some(100)]), None);
        assert_eq!(
            median_wake(&[Some(200), Some(100), Some(400), Some(300)]),
            Some(200)
        );
        assert_eq!(median_wake(&[Some(700)]), Some(700));
        assert_eq!(median_wake(&[]), None);
    }

    #[test]
    fn full_rate_is_where_every_later_millisecond_reaches_ninety_percent() {
        // A window of ten slots at 100 a slot carries 1000; 90 % of it is 900.
        let woken: Vec<u64> = [0; 10].into_iter().chain([100; 40]).collect();
        assert_eq!(full_rate_after(&woken, 100.0), Some(9));
        assert_eq!(full_rate_after(&[100; 50], 100.0), Some(0));
        // A slow last millisecond: never back for good.
        let sagging: Vec<u64> = [100; 45].into_iter().chain([0; 5]).collect();
        assert_eq!(full_rate_after(&sagging, 100.0), None);
        // Fewer slots than a window: nothing to say.
        assert_eq!(full_rate_after(&[100; 5], 100.0), None);
    }
}
