//! `vmdevctl`: manage vmdev devices, with the verbs of mdevctl.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use uuid::Uuid;
use vmdev_proto::transport::VduseBind;
use vmdev_tools::TransportClient;

/// Manage vmdev devices (mdevctl verbs over the vmdev control socket).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The control plane's run directory.
    #[arg(long, env = "VMDEV_RUN_DIR", default_value = "/run/vmdev")]
    run_dir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

/// `--bind` values.
#[derive(Clone, Copy, clap::ValueEnum)]
enum BindArg {
    /// virtio_vdpa
    Virtio,
    /// vhost_vdpa
    Vhost,
}

#[derive(Subcommand)]
enum Cmd {
    /// List parents (datapaths) and the device types they offer.
    Types,
    /// List devices (or, with --defined, device definitions).
    List {
        /// Show definitions instead of running devices.
        #[arg(long)]
        defined: bool,
    },
    /// Create and start a device on a parent (or start a defined device: `start -u UUID`).
    Start {
        /// Parent name (omit with -u to start a defined device).
        #[arg(short, long)]
        parent: Option<String>,
        /// Device type.
        #[arg(short = 't', long = "type")]
        device_type: Option<String>,
        /// Device UUID (random if omitted).
        #[arg(short, long)]
        uuid: Option<Uuid>,
        /// Attributes, e.g. `mac=52:54:00:00:00:01,queue-size=256` (repeatable).
        #[arg(long)]
        attr: Vec<String>,
        /// Also serve the device as a vhost-user backend listening on this socket path.
        #[arg(long, value_name = "PATH", conflicts_with = "vduse")]
        vhost_user: Option<PathBuf>,
        /// Serve the device to the Linux kernel as VDUSE / vDPA device NAME (root only).
        #[arg(long, value_name = "NAME")]
        vduse: Option<String>,
        /// With --vduse: the kernel driver that gets it (virtio: the kernel's own virtio
        /// driver; vhost: /dev/vhost-vdpa-N).
        #[arg(long, value_enum, default_value = "virtio", requires = "vduse")]
        bind: BindArg,
    },
    /// Define a device persistently (kept in the control plane's devices.toml).
    Define {
        /// Parent name.
        #[arg(short, long)]
        parent: String,
        /// Device type.
        #[arg(short = 't', long = "type")]
        device_type: String,
        /// Device UUID (random if omitted).
        #[arg(short, long)]
        uuid: Option<Uuid>,
        /// Attributes (repeatable).
        #[arg(long)]
        attr: Vec<String>,
        /// vhost-user socket path.
        #[arg(long, value_name = "PATH")]
        vhost_user: Option<PathBuf>,
        /// Start it whenever its parent registers.
        #[arg(long)]
        auto: bool,
    },
    /// Remove a device definition.
    Undefine {
        /// Device UUID.
        #[arg(short, long)]
        uuid: Uuid,
    },
    /// Stop (remove) a device.
    Stop {
        /// Device UUID.
        #[arg(short, long)]
        uuid: Uuid,
    },
    /// Move a device to another parent; a running device keeps its driver and rings.
    Migrate {
        /// Device UUID.
        #[arg(short, long)]
        uuid: Uuid,
        /// Target parent.
        #[arg(long)]
        to: String,
    },
    /// Save a device's state (type, attributes, features, status, config, queue
    /// positions, counters) to FILE as versioned JSON.
    Save {
        /// Device UUID.
        #[arg(short, long)]
        uuid: Uuid,
        /// Output file.
        file: PathBuf,
    },
    /// Recreate a saved device (on PARENT, or where it was saved from).
    Restore {
        /// File written by `save`.
        file: PathBuf,
        /// Parent to create it on.
        #[arg(short, long)]
        parent: Option<String>,
    },
    /// Show a device's per-queue counters.
    Stats {
        /// Device UUID.
        #[arg(short, long)]
        uuid: Uuid,
    },
}

fn parse_attrs(list: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for item in list
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        let Some((k, v)) = item.split_once('=') else {
            bail!("attribute '{item}' is not key=value");
        };
        out.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(out)
}

/// Makes a socket path absolute (the control plane may run elsewhere).
fn absolute(p: Option<PathBuf>) -> anyhow::Result<Option<String>> {
    Ok(match p {
        Some(p) if p.is_relative() => Some(std::env::current_dir()?.join(p)),
        other => other,
    }
    .map(|p| p.to_string_lossy().into_owned()))
}

/// `k=v,k=v` and ` vhost-user=PATH` / ` vduse=NAME[,DEV]` (or nothing) for the listings.
fn describe(
    attrs: &[(String, String)],
    vhost_user: Option<&str>,
    vduse: Option<&(String, Option<String>)>,
) -> (String, String) {
    let kv: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut door = vhost_user
        .map(|p| format!(" vhost-user={p}"))
        .unwrap_or_default();
    if let Some((name, dev)) = vduse {
        door.push_str(&format!(" vduse={name}"));
        if let Some(dev) = dev {
            door.push_str(&format!(",{dev}"));
        }
    }
    (kv.join(","), door)
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut c = TransportClient::connect(&cli.run_dir).context("vmdevctl")?;
    match cli.cmd {
        Cmd::Types => {
            let parents = c.list_types()?;
            if cli.json {
                return print_json(&parents);
            }
            for p in parents {
                let cpu = p
                    .cpu
                    .map(|c| format!("cpu {c}"))
                    .unwrap_or_else(|| "unpinned".into());
                println!("{}  (pid {}, {cpu})", p.name, p.pid);
                for t in p.types {
                    println!(
                        "  {:<16} available: {}/{}",
                        t.name, t.available, t.max_instances
                    );
                }
            }
        }
        Cmd::List { defined: true } => {
            let defs = c.list_defined()?;
            if cli.json {
                return print_json(&defs);
            }
            for d in defs {
                let (attrs, door) = describe(&d.attrs, d.vhost_user.as_deref(), None);
                let auto = if d.auto { " auto" } else { "" };
                println!(
                    "{} {} {}{auto} {}{door}",
                    d.uuid, d.parent, d.device_type, attrs
                );
            }
        }
        Cmd::List { defined: false } => {
            let devices = c.list_devices()?;
            if cli.json {
                return print_json(&devices);
            }
            for d in devices {
                let (attrs, door) = describe(&d.attrs, d.vhost_user.as_deref(), d.vduse.as_ref());
                println!(
                    "{} {} {} status={:#04x}{}{} {}{door}",
                    d.uuid,
                    d.parent,
                    d.device_type,
                    d.status,
                    if d.claimed { " claimed" } else { "" },
                    if d.attached { " attached" } else { "" },
                    attrs
                );
            }
        }
        Cmd::Start {
            parent: None,
            device_type: None,
            uuid: Some(uuid),
            attr,
            vhost_user: None,
            vduse: None,
            ..
        } if attr.is_empty() => {
            let uuid = c.start_defined(uuid)?;
            if cli.json {
                return print_json(&serde_json::json!({ "uuid": uuid }));
            }
            println!("{uuid}");
        }
        Cmd::Start {
            parent,
            device_type,
            uuid,
            attr,
            vhost_user,
            vduse,
            bind,
        } => {
            let (Some(parent), Some(device_type)) = (parent, device_type) else {
                bail!("start needs -p PARENT and -t TYPE (or only -u UUID of a defined device)");
            };
            let attrs = parse_attrs(&attr)?;
            let uuid = match vduse {
                Some(name) => {
                    let bind = match bind {
                        BindArg::Virtio => VduseBind::Virtio,
                        BindArg::Vhost => VduseBind::Vhost,
                    };
                    c.start_vduse_device(&parent, &device_type, uuid, attrs, &name, bind)?
                }
                None => {
                    let path = absolute(vhost_user)?;
                    c.start_device(&parent, &device_type, uuid, attrs, path.as_deref())?
                }
            };
            if cli.json {
                return print_json(&serde_json::json!({ "uuid": uuid }));
            }
            println!("{uuid}");
        }
        Cmd::Define {
            parent,
            device_type,
            uuid,
            attr,
            vhost_user,
            auto,
        } => {
            let uuid = uuid.unwrap_or_else(Uuid::new_v4);
            let def = vmdev_proto::transport::DefinedDevice {
                uuid,
                parent,
                device_type,
                attrs: parse_attrs(&attr)?,
                vhost_user: absolute(vhost_user)?,
                auto,
            };
            c.define_device(def)?;
            if cli.json {
                return print_json(&serde_json::json!({ "uuid": uuid }));
            }
            println!("{uuid}");
        }
        Cmd::Undefine { uuid } => {
            c.undefine_device(uuid)?;
            if cli.json {
                return print_json(&serde_json::json!({ "undefined": uuid }));
            }
        }
        Cmd::Stop { uuid } => {
            c.stop_device(uuid)?;
            if cli.json {
                return print_json(&serde_json::json!({ "stopped": uuid }));
            }
        }
        Cmd::Migrate { uuid, to } => {
            c.migrate_device(uuid, &to)?;
            if cli.json {
                return print_json(&serde_json::json!({ "migrated": uuid, "to": to }));
            }
        }
        Cmd::Save { uuid, file } => {
            let blob = c.save_device(uuid)?;
            let tmp = file.with_extension("tmp");
            std::fs::write(&tmp, &blob).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &file).with_context(|| format!("writing {}", file.display()))?;
            if cli.json {
                return print_json(&serde_json::json!({ "saved": uuid, "file": file }));
            }
        }
        Cmd::Restore { file, parent } => {
            let blob =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let uuid = c.restore_device(blob, parent.as_deref())?;
            if cli.json {
                return print_json(&serde_json::json!({ "uuid": uuid }));
            }
            println!("{uuid}");
        }
        Cmd::Stats { uuid } => {
            let s = c.stats(uuid)?;
            if cli.json {
                return print_json(&s);
            }
            println!(
                "{:<6} {:>12} {:>14} {:>10} {:>10} {:>10} {:>12}",
                "queue", "packets", "bytes", "drops", "kicks", "calls", "polls"
            );
            for (i, q) in s.queues.iter().enumerate() {
                let n = s.queues.len();
                let name = if n % 2 == 1 && i == n - 1 {
                    "ctrl".to_string()
                } else if i % 2 == 0 {
                    format!("rx{}", i / 2)
                } else {
                    format!("tx{}", i / 2)
                };
                println!(
                    "{name:<6} {:>12} {:>14} {:>10} {:>10} {:>10} {:>12}",
                    q.packets, q.bytes, q.drops, q.kicks, q.calls, q.polls
                );
            }
        }
    }
    Ok(())
}
