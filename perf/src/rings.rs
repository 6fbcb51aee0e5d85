//! `vmdev-perf rings`: split against packed virtqueues in the same run, in slices short
//! enough that both see the same machine.
//!
//! This machine flips between a quiet and a slow mode within seconds (perf/RESULTS.md), so
//! two runs one after the other can land in different modes and a ratio of their rates
//! says more about the machine than about the rings. Here one driver thread drives two
//! devices on the same datapath, one over split rings and one over packed rings, and
//! switches between them every few tens of milliseconds; each pair of neighbouring slices
//! gives one packed/split ratio.

use crate::loopback::{setup, Common, Pump};
use anyhow::{bail, Result};
use serde_json::json;
use std::time::{Duration, Instant};
use vmdev_proto::Uuid;

/// Arguments of `vmdev-perf rings`.
#[derive(clap::Args, Debug)]
pub struct RingsArgs {
    /// Options for the split device (-u); --packed is ignored: the first device is driven
    /// over split rings, the second over packed rings.
    #[command(flatten)]
    common: Common,
    /// The second net-loopback device, on the same datapath, driven over packed rings.
    #[arg(long, value_name = "UUID")]
    packed_uuid: Uuid,
    /// Measuring time in seconds, shared between the two.
    #[arg(long, default_value_t = 6.0)]
    seconds: f64,
    /// Length of one slice in milliseconds (one device runs, the other waits).
    #[arg(long, default_value_t = 50)]
    slice_ms: u64,
    /// Frames queued per flush.
    #[arg(long, default_value_t = 32)]
    batch: usize,
}

/// The value at quantile `q` of `v` (sorted here); 0 when empty.
fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v.get(i).copied().unwrap_or(0.0)
}

/// Runs `vmdev-perf rings`.
pub fn rings(a: &RingsArgs) -> Result<()> {
    if a.common.vhost_vdpa.is_some() || a.common.vhost_user.is_some() {
        bail!("rings needs two vmdev devices (-u UUID --packed-uuid UUID)");
    }
    if a.packed_uuid == a.common.uuid {
        bail!("--packed-uuid must name a second device, not the split one");
    }
    let split_c = Common {
        packed: false,
        ..a.common.clone()
    };
    let packed_c = Common {
        uuid: a.packed_uuid,
        packed: true,
        ..a.common.clone()
    };
    let mut sides = [setup(&split_c)?, setup(&packed_c)?];
    let mut pumps = [
        Pump::new(&sides[0].drv, a.batch),
        Pump::new(&sides[1].drv, a.batch),
    ];
    let slice = Duration::from_millis(a.slice_ms.max(1));
    // Warm both up, each for a few slices.
    for _ in 0..4 {
        for (s, p) in sides.iter_mut().zip(pumps.iter_mut()) {
            let end = Instant::now() + slice;
            while Instant::now() < end {
                p.step(&mut s.drv, &mut s.frame)?;
            }
        }
    }
    // rates[k]: frames per second of each slice of side k (0 split, 1 packed).
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let start = Instant::now();
    let measure = Duration::from_secs_f64(a.seconds.max(0.1));
    let mut k = 0;
    while start.elapsed() < measure {
        let (s, p) = (&mut sides[k], &mut pumps[k]);
        let (t0, got0) = (Instant::now(), p.got);
        let mut steps = 0u32;
        loop {
            p.step(&mut s.drv, &mut s.frame)?;
            steps = steps.wrapping_add(1);
            // The clock every 16 steps, as in `throughput`.
            if steps.is_multiple_of(16) && t0.elapsed() >= slice {
                break;
            }
        }
        rates[k].push((p.got - got0) as f64 / t0.elapsed().as_secs_f64());
        k ^= 1;
    }
    // One ratio per neighbouring pair: packed slice i against split slices i and i + 1
    // (the split slice before it and the one after), so a mode flip inside a pair shows
    // as spread rather than bias.
    let mut ratios: Vec<f64> = Vec::new();
    for (i, &pk) in rates[1].iter().enumerate() {
        for sp in [rates[0].get(i), rates[0].get(i + 1)].into_iter().flatten() {
            if *sp > 0.0 {
                ratios.push(pk / sp);
            }
        }
    }
    if ratios.is_empty() {
        bail!("too short: no pair of slices measured (raise --seconds)");
    }
    let total = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (split_rate, packed_rate) = (total(&rates[0]), total(&rates[1]));
    let (r10, r50, r90) = (
        quantile(&mut ratios, 0.1),
        quantile(&mut ratios, 0.5),
        quantile(&mut ratios, 0.9),
    );
    let (s50, p50) = (quantile(&mut rates[0], 0.5), quantile(&mut rates[1], 0.5));
    if a.common.json {
        let v = json!({
            "benchmark": "rings", "size": a.common.size, "batch": a.batch,
            "seconds": a.seconds, "slice_ms": a.slice_ms, "in_order": a.common.in_order,
            "slices": rates[0].len() + rates[1].len(),
            "split_frames_per_s": split_rate, "packed_frames_per_s": packed_rate,
            "split_slice_p50": s50, "packed_slice_p50": p50,
            "ratio_p10": r10, "ratio_p50": r50, "ratio_p90": r90,
            "cpus": sides[0].cpus.map(|(x, y)| [x, y]),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "rings: {}-byte frames, batch {}, split and packed alternating every {} ms for {:.1} s on '{}'{} (driver/datapath CPUs {:?})",
        a.common.size,
        a.batch,
        a.slice_ms,
        a.seconds,
        sides[0].parent,
        if a.common.in_order { ", in-order" } else { "" },
        sides[0].cpus
    );
    println!(
        "split   {:.3} Mframes/s  (slice p50 {:.3}, {} slices)",
        split_rate / 1e6,
        s50 / 1e6,
        rates[0].len()
    );
    println!(
        "packed  {:.3} Mframes/s  (slice p50 {:.3}, {} slices)",
        packed_rate / 1e6,
        p50 / 1e6,
        rates[1].len()
    );
    println!(
        "packed/split over neighbouring slices: p10 {r10:.3}  p50 {r50:.3}  p90 {r90:.3}  ({} pairs)",
        ratios.len()
    );
    Ok(())
}
