//! `vmdev-datapath`: a parent process that services the virtqueues of attached devices.

use anyhow::{bail, Context};
use clap::Parser;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;
use vmdev_datapath::engine::{Engine, EngineConfig, EngineError};
use vmdev_proto::datapath::{FromDatapath, ToDatapath};
use vmdev_proto::{Channel, Hello};

/// The vmdev datapath: registers as a parent with vmdev-control and services devices.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The control plane's run directory (holding datapath.sock).
    #[arg(long)]
    run_dir: PathBuf,
    /// Parent name to register under.
    #[arg(long)]
    name: String,
    /// CPU to pin the datapath thread to (omit to let the scheduler place it).
    #[arg(long)]
    cpu: Option<u32>,
    /// Devices this datapath accepts.
    #[arg(long, default_value_t = 64)]
    max_devices: u32,
    /// Microseconds to keep busy-polling after the last work before sleeping in io_uring.
    #[arg(long, default_value_t = 500)]
    spin_us: u64,
    /// Also accept a control plane running as this uid (repeatable); root and this
    /// process's own uid are always accepted.
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<u32>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMDEV_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.max_devices == 0 || args.max_devices > 1024 {
        bail!("--max-devices must be in 1..=1024");
    }
    log_if_shmem_has_no_huge_pages();
    if let Some(cpu) = args.cpu {
        vmdev_datapath::sys::pin_to_cpu(cpu as usize)
            .with_context(|| format!("pinning to cpu {cpu}"))?;
    }
    let sock = args.run_dir.join("datapath.sock");
    let stream = UnixStream::connect(&sock).with_context(|| {
        format!(
            "connecting to {} (is vmdev-control running?)",
            sock.display()
        )
    })?;
    let peer = vmdev_datapath::sys::peer_uid(&stream)
        .context("reading the control plane's credentials")?;
    let own = vmdev_datapath::sys::own_uid();
    if peer != 0 && peer != own && !args.allow_uids.contains(&peer) {
        tracing::warn!(uid = peer, "control plane refused: uid not allowed");
        bail!("the control plane at {} runs as uid {peer}, which is not allowed (root, {own}, or --allow-uid)", sock.display());
    }
    let mut ch = Channel::new(stream);
    ch.send(&FromDatapath::Hello(Hello::ours()), &[])?;
    match ch.recv::<ToDatapath>()?.0 {
        ToDatapath::Hello(_) => {}
        ToDatapath::Registered(Err(e)) => bail!("control plane refused us: {e}"),
        other => bail!("unexpected answer to hello: {other:?}"),
    }
    let types = vec![("net-loopback".to_string(), args.max_devices)];
    ch.send(
        &FromDatapath::Register {
            name: args.name.clone(),
            cpu: args.cpu,
            types,
        },
        &[],
    )?;
    match ch.recv::<ToDatapath>()?.0 {
        ToDatapath::Registered(Ok(())) => {}
        ToDatapath::Registered(Err(e)) => bail!("registration refused: {e}"),
        other => bail!("unexpected answer to register: {other:?}"),
    }
    tracing::info!(name = %args.name, cpu = ?args.cpu, "registered with the control plane");
    let cfg = EngineConfig {
        max_devices: args.max_devices as usize,
        spin: Duration::from_micros(args.spin_us),
    };
    let mut engine = Engine::new(cfg, ch).context("setting up io_uring")?;
    match engine.run() {
        Err(EngineError::ControlClosed) => {
            tracing::info!("control plane went away; exiting");
            Ok(())
        }
        Err(e) => Err(e.into()),
        Ok(()) => Ok(()),
    }
}

/// Says so when the system keeps shared memory out of transparent huge pages: guest memory
/// then sits in 4 KiB pages, and a datapath serving tens of devices loses about a fifth of
/// its rate to TLB misses (perf/RESULTS.md, eighth session).
fn log_if_shmem_has_no_huge_pages() {
    let setting = vmdev_shm_ring::shmem_huge_setting();
    if let Some(s @ ("never" | "deny")) = setting.as_deref() {
        tracing::info!(
            "/sys/kernel/mm/transparent_hugepage/shmem_enabled is {s}: guest memory stays in 4 KiB pages; for many devices write `advise` there"
        );
    }
}
