//! `vmdev-perf migrate` and `vmdev-perf dirty-log`: what moving a device costs its driver.
//! `migrate` streams frames while the device moves back and forth between two datapaths and
//! reports the pause the driver sees per move; `dirty-log` measures throughput with dirty
//! logging off and on, alternating in the same run.

use crate::loopback::{setup, Common, Pump};
use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde_json::json;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmdev_shm_ring::create_sealed_memfd;
use vmdev_shm_ring::dirty::{bitmap_len, DirtyLog};
use vmdev_tools::TransportClient;

/// Arguments of `vmdev-perf migrate`.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    #[command(flatten)]
    common: Common,
    /// The other datapath (parent) to move the device to and back from.
    #[arg(long)]
    to: String,
    /// Number of moves (alternating there and back).
    #[arg(long, default_value_t = 20)]
    moves: u32,
    /// Frames received between two moves.
    #[arg(long, default_value_t = 100_000)]
    frames_between: u64,
    /// Frames queued per flush.
    #[arg(long, default_value_t = 32)]
    batch: usize,
}

/// Arguments of `vmdev-perf dirty-log`.
#[derive(clap::Args, Debug)]
pub struct DirtyLogArgs {
    #[command(flatten)]
    common: Common,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Off/on pairs, alternating, the median of each side reported.
    #[arg(long, default_value_t = 3)]
    pairs: u32,
    /// Harvest (read and clear) the bitmap this often, as a migrating VMM would.
    #[arg(long, default_value_t = 1000)]
    harvest_us: u64,
    /// Frames queued per flush.
    #[arg(long, default_value_t = 32)]
    batch: usize,
}

/// A gap in the driver's receive stream longer than this is recorded.
const GAP: Duration = Duration::from_micros(20);

fn hist() -> Result<Histogram<u64>> {
    Ok(Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3)?)
}

fn us(ns: u64) -> String {
    format!("{:.1} µs", ns as f64 / 1e3)
}

/// Runs `vmdev-perf migrate`.
pub fn migrate(a: &MigrateArgs) -> Result<()> {
    let mut s = setup(&a.common)?;
    if s.parent == a.to {
        bail!("the device already runs on '{}'", a.to);
    }
    let mut mgmt = TransportClient::connect(&a.common.run_dir)?;
    if !mgmt.list_types()?.iter().any(|p| p.name == a.to) {
        bail!("no parent named '{}'", a.to);
    }
    let uuid = a.common.uuid;
    let got = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let (g, fin, between, moves) = (
        Arc::clone(&got),
        Arc::clone(&done),
        a.frames_between,
        a.moves,
    );
    let parents = [a.to.clone(), s.parent.clone()];
    // The mover: one move every `frames_between` received frames; each move's wall-clock
    // window is kept to find the driver's pause inside it.
    let mover = std::thread::spawn(move || -> Result<Vec<(Instant, Instant)>> {
        let mut windows = Vec::new();
        let mut next = between;
        let res = (|| {
            for i in 0..moves {
                while g.load(Ordering::Acquire) < next {
                    if fin.load(Ordering::Acquire) {
                        bail!("the driver stopped");
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                let to = &parents[i as usize % 2];
                let t0 = Instant::now();
                mgmt.migrate_device(uuid, to)
                    .with_context(|| format!("move {i} to '{to}'"))?;
                windows.push((t0, Instant::now()));
                next = g.load(Ordering::Acquire) + between;
            }
            Ok(())
        })();
        fin.store(true, Ordering::Release);
        res.map(|_| windows)
    });

    let mut pump = Pump::new(&s.drv, a.batch);
    let mut gaps: Vec<(Instant, Instant)> = Vec::new();
    let mut last_rx = Instant::now();
    while !done.load(Ordering::Acquire) {
        if pump.step(&mut s.drv, &mut s.frame)? > 0 {
            let now = Instant::now();
            if now - last_rx > GAP && gaps.len() < 1_000_000 {
                gaps.push((last_rx, now));
            }
            last_rx = now;
            got.store(pump.got, Ordering::Release);
        }
    }
    let windows = mover
        .join()
        .map_err(|_| anyhow::anyhow!("the mover thread panicked"))??;

    let (mut cmd, mut pause) = (hist()?, hist()?);
    for &(t0, t1) in &windows {
        cmd.saturating_record((t1 - t0).as_nanos() as u64);
        let longest = gaps
            .iter()
            .filter(|&&(g0, g1)| g0 < t1 && g1 > t0)
            .map(|&(g0, g1)| (g1 - g0).as_nanos() as u64)
            .max()
            .unwrap_or(0);
        pause.saturating_record(longest);
    }
    let row = |h: &Histogram<u64>| (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max());
    let (c50, c99, cmax) = row(&cmd);
    let (p50, p99, pmax) = row(&pause);
    if a.common.json {
        let v = json!({
            "benchmark": "migrate", "moves": windows.len(), "frames": pump.got,
            "size": a.common.size, "between": [s.parent, a.to],
            "driver_pause_ns": { "p50": p50, "p99": p99, "max": pmax },
            "migrate_command_ns": { "p50": c50, "p99": c99, "max": cmax },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "migrate: {} moves of {} between '{}' and '{}' with {}-byte frames streaming; {} frames, all in order",
        windows.len(),
        uuid,
        s.parent,
        a.to,
        a.common.size,
        pump.got
    );
    println!("{:<24} {:>10} {:>10} {:>10}", "", "p50", "p99", "max");
    println!(
        "{:<24} {:>10} {:>10} {:>10}",
        "pause the driver saw",
        us(p50),
        us(p99),
        us(pmax)
    );
    println!(
        "{:<24} {:>10} {:>10} {:>10}",
        "migrate command",
        us(c50),
        us(c99),
        us(cmax)
    );
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs `vmdev-perf dirty-log`.
pub fn dirty_log(a: &DirtyLogArgs) -> Result<()> {
    let mut s = setup(&a.common)?;
    let len = bitmap_len(s.drv.memory().region_sizes());
    let bitmap = create_sealed_memfd("vmdev-perf-dirty", len)?;
    let log = DirtyLog::map(bitmap.try_clone()?, len)?;
    let mut pump = Pump::new(&s.drv, a.batch);
    let measure = Duration::from_secs_f64(a.seconds.max(0.1));
    let harvest_every = Duration::from_micros(a.harvest_us.max(1));
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let mut pages = 0usize;
    for i in 0..a.pairs.max(1) * 2 {
        let logging = i % 2 == 1;
        if logging {
            s.drv.client().start_dirty_log(bitmap.as_fd())?;
        }
        let warm = Instant::now() + Duration::from_millis(100);
        while Instant::now() < warm {
            pump.step(&mut s.drv, &mut s.frame)?;
        }
        let (t0, got0) = (Instant::now(), pump.got);
        let mut next_harvest = t0 + harvest_every;
        while t0.elapsed() < measure {
            pump.step(&mut s.drv, &mut s.frame)?;
            if logging && Instant::now() >= next_harvest {
                pages += log.harvest().len();
                next_harvest += harvest_every;
            }
        }
        let fps = (pump.got - got0) as f64 / t0.elapsed().as_secs_f64();
        if logging {
            s.drv.client().stop_dirty_log()?;
            pages += log.harvest().len();
            on.push(fps);
        } else {
            if !log.harvest().is_empty() {
                bail!("pages were marked dirty with logging off");
            }
            off.push(fps);
        }
    }
    let (m_off, m_on) = (median(&mut off.clone()), median(&mut on.clone()));
    if a.common.json {
        let v = json!({
            "benchmark": "dirty-log", "size": a.common.size, "seconds": a.seconds,
            "harvest_us": a.harvest_us, "frames_per_s_off": off, "frames_per_s_on": on,
            "median_off": m_off, "median_on": m_on, "ratio_on_off": m_on / m_off.max(1.0),
            "pages_harvested": pages,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{:.3}", x / 1e6))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "dirty-log: {}-byte frames, {} off/on pairs of {:.1} s, bitmap harvested every {} µs ({pages} pages harvested)",
        a.common.size, a.pairs, a.seconds, a.harvest_us
    );
    println!(
        "logging off  median {:.3} Mframes/s  (runs: {})",
        m_off / 1e6,
        list(&off)
    );
    println!(
        "logging on   median {:.3} Mframes/s  (runs: {})",
        m_on / 1e6,
        list(&on)
    );
    println!("on/off       {:.3}", m_on / m_off.max(1.0));
    Ok(())
}
