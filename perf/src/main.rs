//! `vmdev-perf`: vmdev latency and throughput tools, judged against same-run floors.

mod floors;
mod hgrm;
mod loopback;
mod migration;
mod pin;
mod report;
mod rings;
mod scale;

use clap::{Parser, Subcommand};

/// vmdev latency and throughput tools with same-run floors.
#[derive(Parser)]
#[command(name = "vmdev-perf", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Round-trip latency of one frame through a net-loopback device (HdrHistogram).
    Latency(loopback::LatencyArgs),
    /// Frames per second and Gbit/s through a net-loopback device.
    Throughput(loopback::ThroughputArgs),
    /// The pause a streaming driver sees while its device moves between two datapaths.
    Migrate(migration::MigrateArgs),
    /// Throughput with dirty logging off and on, alternating in the same run.
    DirtyLog(migration::DirtyLogArgs),
    /// Split against packed rings: two devices driven in alternating slices of one run.
    Rings(rings::RingsArgs),
    /// Latency and throughput sweeps written as JSON and SVG charts.
    Report(report::ReportArgs),
    /// Aggregate rate of 1, 8, 64… devices on one datapath thread.
    Scale(scale::ScaleArgs),
    /// CPU an idle device costs its datapath, and how fast it wakes.
    Idle(scale::IdleArgs),
    /// Measure the floors: shared-memory, eventfd and Unix-socket round trips between two
    /// processes.
    Floors(floors::FloorsArgs),
    /// Internal: the child side of a floor ping-pong.
    #[command(name = floors::PEER_SUBCOMMAND, hide = true)]
    FloorPeer(floors::PeerArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMDEV_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Latency(args) => loopback::latency(&args),
        Cmd::Throughput(args) => loopback::throughput(&args),
        Cmd::Migrate(args) => migration::migrate(&args),
        Cmd::DirtyLog(args) => migration::dirty_log(&args),
        Cmd::Rings(args) => rings::rings(&args),
        Cmd::Report(args) => report::report(&args),
        Cmd::Scale(args) => scale::scale(&args),
        Cmd::Idle(args) => scale::idle(&args),
        Cmd::Floors(args) => floors::run_cli(&args),
        Cmd::FloorPeer(args) => floors::run_peer(&args),
    }
}
