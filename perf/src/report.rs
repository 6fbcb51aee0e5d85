//! `vmdev-perf report`: runs the latency and throughput benchmarks over a range of frame
//! sizes and batch sizes (each a `vmdev-perf` run of its own, JSON out), then writes every
//! result to `results.json` and draws SVG charts: the latency CDF from the HdrHistogram,
//! throughput by frame size and by batch.

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Arguments of `vmdev-perf report`.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// The control plane's run directory.
    #[arg(long, env = "VMDEV_RUN_DIR", default_value = "/run/vmdev")]
    run_dir: PathBuf,
    /// Device UUID (a started net-loopback device; MTU 1504 or more to reach 1518 bytes).
    #[arg(short, long)]
    uuid: String,
    /// Folder for results.json and the charts.
    #[arg(long, default_value = "perf/report")]
    out: PathBuf,
    /// Frame sizes for the throughput-by-size chart.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "64,128,256,512,1024,1518"
    )]
    sizes: Vec<usize>,
    /// Batch sizes for the throughput-by-batch chart (64-byte frames).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64,128")]
    batches: Vec<usize>,
    /// Seconds per throughput point.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Round trips for the latency histogram.
    #[arg(long, default_value_t = 100_000)]
    frames: u64,
    /// CPU to pin the driver to.
    #[arg(long)]
    cpu: Option<usize>,
}

fn run_json(a: &ReportArgs, args: &[String]) -> Result<Value> {
    let me = std::env::current_exe().context("locating vmdev-perf")?;
    let mut cmd = Command::new(me);
    cmd.args(args)
        .arg("--run-dir")
        .arg(&a.run_dir)
        .args(["-u", &a.uuid, "--json"]);
    if let Some(c) = a.cpu {
        cmd.args(["--cpu", &c.to_string()]);
    }
    let out = cmd.output().context("running vmdev-perf")?;
    if !out.status.success() {
        bail!(
            "vmdev-perf {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing vmdev-perf JSON")
}

/// (latency in µs, percentile) pairs of an `.hgrm` file.
fn read_hgrm(path: &Path) -> Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let v = w.next()?.parse::<f64>().ok()?;
            let q = w.next()?.parse::<f64>().ok()?;
            (q < 1.0).then_some((v, q))
        })
        .collect())
}

fn chart_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {e}")
}

fn latency_cdf(path: &Path, points: &[(f64, f64)], title: &str) -> Result<()> {
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    // x: "nines" (0 = p0, 1 = p90, 2 = p99, 3 = p99.9 …); y: latency, log scale.
    let xs: Vec<(f64, f64)> = points
        .iter()
        .map(|&(v, q)| ((1.0 / (1.0 - q)).log10(), v.max(0.001)))
        .collect();
    let xmax = xs.iter().map(|p| p.0).fold(1.0, f64::max).ceil();
    let ymin = xs.iter().map(|p| p.1).fold(f64::MAX, f64::min).max(0.001);
    let ymax = xs.iter().map(|p| p.1).fold(0.0, f64::max) * 1.2;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..xmax, (ymin..ymax).log_scale())
        .map_err(chart_err)?;
    c.configure_mesh()
        .x_desc("percentile")
        .y_desc("round trip (µs)")
        .x_label_formatter(&|x| match x.round() as i32 {
            0 => "0%".into(),
            n => format!("{}%", 100.0 - 100.0 / 10f64.powi(n)),
        })
        .draw()
        .map_err(chart_err)?;
    c.draw_series(LineSeries::new(xs, &BLUE))
        .map_err(chart_err)?;
    root.present().map_err(chart_err)?;
    Ok(())
}

fn xy_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    points: &[(f64, f64)],
    log_x: bool,
) -> Result<()> {
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let xmin = points.iter().map(|p| p.0).fold(f64::MAX, f64::min);
    let xmax = points.iter().map(|p| p.0).fold(0.0, f64::max);
    let ymax = points.iter().map(|p| p.1).fold(0.0, f64::max) * 1.15;
    let mut b = ChartBuilder::on(&root);
    b.caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60);
    if log_x {
        let mut c = b
            .build_cartesian_2d((xmin..xmax).log_scale(), 0.0..ymax)
            .map_err(chart_err)?;
        c.configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()
            .map_err(chart_err)?;
        c.draw_series(LineSeries::new(points.iter().copied(), &BLUE))
            .map_err(chart_err)?;
        c.draw_series(points.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))
            .map_err(chart_err)?;
    } else {
        let mut c = b
            .build_cartesian_2d(xmin..xmax, 0.0..ymax)
            .map_err(chart_err)?;
        c.configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()
            .map_err(chart_err)?;
        c.draw_series(LineSeries::new(points.iter().copied(), &BLUE))
            .map_err(chart_err)?;
        c.draw_series(points.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))
            .map_err(chart_err)?;
    }
    root.present().map_err(chart_err)?;
    Ok(())
}

/// Runs `vmdev-perf report`.
pub fn report(a: &ReportArgs) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let hgrm = a.out.join("latency.hgrm");
    eprintln!("report: latency ({} round trips)", a.frames);
    let latency = run_json(
        a,
        &[
            "latency".into(),
            "--frames".into(),
            a.frames.to_string(),
            "--hgrm".into(),
            hgrm.display().to_string(),
        ],
    )?;
    let mut by_size = Vec::new();
    for &s in &a.sizes {
        eprintln!("report: throughput, {s}-byte frames");
        by_size.push(run_json(
            a,
            &[
                "throughput".into(),
                "--size".into(),
                s.to_string(),
                "--seconds".into(),
                a.seconds.to_string(),
                "--floor-iters".into(),
                "0".into(),
            ],
        )?);
    }
    let mut by_batch = Vec::new();
    for &b in &a.batches {
        eprintln!("report: throughput, batch {b}");
        by_batch.push(run_json(
            a,
            &[
                "throughput".into(),
                "--batch".into(),
                b.to_string(),
                "--seconds".into(),
                a.seconds.to_string(),
                "--floor-iters".into(),
                "0".into(),
            ],
        )?);
    }
    let all = json!({ "latency": latency, "throughput_by_size": by_size, "throughput_by_batch": by_batch });
    std::fs::write(
        a.out.join("results.json"),
        serde_json::to_string_pretty(&all)?,
    )?;

    let p50 = latency["p50_ns"].as_u64().unwrap_or(0);
    latency_cdf(
        &a.out.join("latency-cdf.svg"),
        &read_hgrm(&hgrm)?,
        &format!(
            "vmdev round-trip latency, 64-byte frames (p50 {:.2} µs)",
            p50 as f64 / 1e3
        ),
    )?;
    let pts = |v: &[Value], x: &str, y: &str, scale: f64| -> Vec<(f64, f64)> {
        v.iter()
            .filter_map(|r| Some((r[x].as_f64()?, r[y].as_f64()? * scale)))
            .collect()
    };
    let size_pts = pts(&by_size, "size", "frames_per_s", 1e-6);
    let gbit_pts = pts(&by_size, "size", "gbit_per_s", 1.0);
    xy_chart(
        &a.out.join("throughput-size.svg"),
        "vmdev round-trip throughput by frame size",
        "frame size (bytes)",
        "Mframes/s",
        &size_pts,
        false,
    )?;
    xy_chart(
        &a.out.join("throughput-size-gbit.svg"),
        "vmdev round-trip throughput by frame size",
        "frame size (bytes)",
        "Gbit/s",
        &gbit_pts,
        false,
    )?;
    xy_chart(
        &a.out.join("throughput-batch.svg"),
        "vmdev round-trip throughput by batch (64-byte frames)",
        "frames per flush",
        "Mframes/s",
        &pts(&by_batch, "batch", "frames_per_s", 1e-6),
        true,
    )?;
    println!("report written to {}:", a.out.display());
    println!("  results.json, latency.hgrm, latency-cdf.svg, throughput-size.svg, throughput-size-gbit.svg, throughput-batch.svg");
    println!(
        "  latency p50 {:.2} µs; throughput by size (Mframes/s): {}",
        p50 as f64 / 1e3,
        size_pts
            .iter()
            .map(|(x, y)| format!("{x}:{y:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}
