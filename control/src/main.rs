//! `vmdev-control`: the vmdev control-plane daemon.

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use vmdev_control::server::Server;

/// The vmdev control plane: device models behind control.sock, parents on datapath.sock.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Directory for control.sock and datapath.sock (created mode 0700 if missing).
    #[arg(long)]
    run_dir: PathBuf,
    /// Directory for persistent state (devices.toml of defined devices); default: the run dir.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Also allow peers (drivers, vmdevctl, datapaths, vhost-user front ends) running as
    /// this uid (repeatable); root and this daemon's own uid are always allowed.
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<u32>,
    /// Most client connections (drivers, vmdevctl) served at once; more are refused.
    #[arg(long, default_value_t = vmdev_control::server::DEFAULT_MAX_CLIENTS)]
    max_clients: usize,
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
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| args.run_dir.clone());
    let server = Server::new(
        args.run_dir.clone(),
        &state_dir,
        &args.allow_uids,
        args.max_clients,
    )
    .context("loading defined devices")?;
    let on_signal = std::sync::Arc::clone(&server);
    vmdev_control::sys::on_termination(move || on_signal.cleanup())
        .context("installing signal handling")?;
    server
        .run()
        .with_context(|| format!("serving {}", args.run_dir.display()))
}
