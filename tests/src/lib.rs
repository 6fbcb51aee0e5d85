//! Harness for vmdev's end-to-end tests: starts the real `vmdev-control` and
//! `vmdev-datapath` binaries as processes in a private run directory, and stops them on drop.
//!
//! The binaries come from the same target directory as the test executable; build them
//! first with `cargo build --workspace --bins` (the test command in the README does).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use vmdev_proto::Uuid;
use vmdev_tools::TransportClient;

/// How long a daemon may take to come up before a test fails.
pub const STARTUP: Duration = Duration::from_secs(20);

/// Path of a workspace binary next to the running test.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// Waits for `cond` to hold, checking every millisecond, failing after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A command for a daemon binary on `run_dir`, logging at `$VMDEV_LOG` (default warn).
fn daemon(name: &str, run_dir: &Path) -> Command {
    let mut c = Command::new(bin_path(name));
    c.arg("--run-dir")
        .arg(run_dir)
        .env(
            "VMDEV_LOG",
            std::env::var("VMDEV_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null());
    c
}

/// Starts `vmdev-control` on `run_dir` and waits until its socket answers.
fn spawn_control(run_dir: &Path, args: &[&str]) -> Child {
    let child = daemon("vmdev-control", run_dir)
        .args(args)
        .spawn()
        .expect("spawn vmdev-control");
    wait_until("control.sock", STARTUP, || {
        TransportClient::connect(run_dir).is_ok()
    });
    child
}

/// A control plane plus datapaths, torn down on drop.
pub struct Daemons {
    /// The run directory (sockets).
    pub run_dir: PathBuf,
    control: Child,
    datapaths: Vec<(String, Child)>,
}

impl Daemons {
    /// Starts `vmdev-control` in a fresh run directory and waits for its socket.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts `vmdev-control` with extra arguments (e.g. `--allow-uid`).
    pub fn start_with(args: &[&str]) -> Self {
        let run_dir = std::env::temp_dir().join(format!(
            "vmdev-test-{}-{}",
            std::process::id(),
            Uuid::new_v4()
        ));
        let control = spawn_control(&run_dir, args);
        Daemons {
            run_dir,
            control,
            datapaths: Vec::new(),
        }
    }

    /// Starts a datapath named `name` (unpinned) and waits until it is registered.
    pub fn add_datapath(&mut self, name: &str) {
        self.add_datapath_with(name, &[]);
    }

    /// Starts a datapath with extra arguments and waits until it is registered.
    pub fn add_datapath_with(&mut self, name: &str, extra: &[&str]) {
        let child = daemon("vmdev-datapath", &self.run_dir)
            .args(["--name", name])
            .args(extra)
            .spawn()
            .expect("spawn vmdev-datapath");
        self.datapaths.push((name.to_string(), child));
        let mut c = self.client();
        wait_until("datapath registration", STARTUP, || {
            c.list_types()
                .map(|t| t.iter().any(|p| p.name == name))
                .unwrap_or(false)
        });
    }

    /// A new transport client.
    pub fn client(&self) -> TransportClient {
        TransportClient::connect(&self.run_dir).expect("connect to control.sock")
    }

    /// Runs `vmdevctl --run-dir DIR ARGS…`.
    pub fn vmdevctl(&self, args: &[&str]) -> Output {
        Command::new(bin_path("vmdevctl"))
            .arg("--run-dir")
            .arg(&self.run_dir)
            .args(args)
            .output()
            .expect("run vmdevctl")
    }

    /// Runs `vmdev-perf SUBCOMMAND --run-dir DIR ARGS…`.
    pub fn vmdev_perf(&self, subcommand: &str, args: &[&str]) -> Output {
        Command::new(bin_path("vmdev-perf"))
            .arg(subcommand)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .args(args)
            .output()
            .expect("run vmdev-perf")
    }

    /// Runs `vmdev-perf SUBCOMMAND --run-dir DIR ARGS… --json`, which must succeed, and
    /// returns its JSON report.
    pub fn vmdev_perf_json(&self, subcommand: &str, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.vmdev_perf(subcommand, &all);
        assert!(
            out.status.success(),
            "vmdev-perf {subcommand} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON report")
    }

    /// Starts a net-loopback device on `parent` with vmdevctl; returns its UUID.
    pub fn start_device(&self, parent: &str, attrs: &[&str]) -> Uuid {
        self.start_device_with(parent, attrs, None)
    }

    /// Starts a net-loopback device, optionally with a vhost-user socket at `vhost_user`.
    pub fn start_device_with(
        &self,
        parent: &str,
        attrs: &[&str],
        vhost_user: Option<&Path>,
    ) -> Uuid {
        let mut args = vec!["--json", "start", "-p", parent, "-t", "net-loopback"];
        for a in attrs {
            args.push("--attr");
            args.push(a);
        }
        let path = vhost_user.map(|p| p.display().to_string());
        if let Some(p) = &path {
            args.push("--vhost-user");
            args.push(p);
        }
        let out = self.vmdevctl(&args);
        assert!(
            out.status.success(),
            "vmdevctl start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("vmdevctl --json output");
        v["uuid"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("uuid in vmdevctl output")
    }

    /// Kills the control plane and its datapaths, then starts a new control plane on the
    /// same run directory (its state, such as defined devices, survives).
    pub fn restart_control(&mut self) {
        let _ = self.control.kill();
        let _ = self.control.wait();
        for (_, c) in &mut self.datapaths {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.datapaths.clear();
        self.control = spawn_control(&self.run_dir, &[]);
    }

    /// The control plane's process id.
    pub fn control_pid(&self) -> u32 {
        self.control.id()
    }

    /// Whether the control plane process is still running.
    pub fn control_alive(&mut self) -> bool {
        matches!(self.control.try_wait(), Ok(None))
    }

    /// Whether every datapath process is still running.
    pub fn datapaths_alive(&mut self) -> bool {
        self.datapaths
            .iter_mut()
            .all(|(_, c)| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the running datapath called `name` (SIGKILL), reaps it, and waits until the
    /// control plane has noticed (the name is free again).
    pub fn kill_datapath(&mut self, name: &str) {
        for (n, c) in self.datapaths.iter_mut().rev() {
            if n == name && matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
                let _ = c.wait();
                break;
            }
        }
        let mut cl = self.client();
        wait_until(
            "the control plane to notice the dead datapath",
            STARTUP,
            || {
                cl.list_types()
                    .map(|t| !t.iter().any(|p| p.name == name))
                    .unwrap_or(false)
            },
        );
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for (_, c) in &mut self.datapaths {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.control.kill();
        let _ = self.control.wait();
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// Builds a test frame: Ethernet header (dst = `mac`, ethertype 0x88b5, local
/// experimental), then the sequence number, then bytes derived from it, `len` bytes total.
pub fn make_frame(mac: [u8; 6], seq: u64, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(&seq.to_le_bytes());
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while f.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.push(x as u8);
    }
    f.truncate(len);
    f
}

/// Reads the sequence number from a frame built by [`make_frame`].
pub fn frame_seq(f: &[u8]) -> Option<u64> {
    f.get(14..22)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
}

/// Finds an external program (DPDK, QEMU) on PATH. When it is missing the test is skipped
/// with a message — unless `VMDEV_REQUIRE_EXTERNAL=1` (set by CI), then it fails.
pub fn external_tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var("VMDEV_REQUIRE_EXTERNAL").as_deref() != Ok("1"),
            "{name} is required (VMDEV_REQUIRE_EXTERNAL=1) but not installed"
        );
        eprintln!("SKIPPED: {name} is not installed (bash .ci/run installs it)");
    }
    found
}

/// The Linux test guest (tests/guest/), built (or brought up to date) by
/// `build-image.sh` into `target/guest-image`; `None` (test skipped) without QEMU.
pub fn guest_image() -> Option<PathBuf> {
    external_tool("qemu-system-x86_64")?;
    static BUILT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let image = root.join("target/guest-image");
    let built = BUILT.get_or_init(|| {
        Command::new("bash")
            .arg(root.join("tests/guest/build-image.sh"))
            .arg(&image)
            .status()
            .expect("run build-image.sh")
            .success()
    });
    assert!(*built, "building the guest image failed");
    Some(image)
}

/// Boots the test guest with `vmdev.test=TEST` (see tests/guest/init) and extra
/// `run-guest.sh` arguments; returns whether it passed and everything it printed.
pub fn run_guest(image: &Path, test: &str, extra: &[&str]) -> (bool, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let log = std::env::temp_dir().join(format!("vmdev-guest-{test}-{}.log", std::process::id()));
    let out = Command::new("bash")
        .arg(root.join("tests/guest/run-guest.sh"))
        .arg("--kernel")
        .arg(image.join("vmlinuz"))
        .arg("--initrd")
        .arg(image.join("initrd.gz"))
        .args(["--test", test, "--timeout", "300", "--log"])
        .arg(&log)
        .args(extra)
        .output()
        .expect("run run-guest.sh");
    let serial = std::fs::read(&log)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default();
    let text = format!(
        "{}{}\n---- serial ----\n{serial}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A fresh eventfd (for tests that hand kick or call fds by hand).
pub fn eventfd() -> std::os::fd::OwnedFd {
    // SAFETY: eventfd() with constant flags; the result is checked and owned at once.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: a new fd we own.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
}

/// Sends `n` sequence-numbered frames (numbered from `first`) of pseudo-random sizes
/// 60..=1514 with at most the driver's window in flight; checks each comes back once,
/// in order and byte-identical. `progress` (if any) is kept at the frames received.
/// Returns the bytes sent.
pub fn run_traffic<T: vmdev_tools::DeviceTransport>(
    drv: &mut vmdev_tools::NetDriver<T>,
    first: u64,
    n: u64,
    seed: u64,
    progress: Option<&std::sync::atomic::AtomicU64>,
) -> u64 {
    let mac = drv.mac();
    let window = drv.max_in_flight() as u64;
    let mut rng = seed | 1;
    let mut next_size = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        60 + (rng % (1514 - 60 + 1)) as usize
    };
    let mut sizes = std::collections::VecDeque::new();
    let (mut sent, mut got, mut bytes) = (0u64, 0u64, 0u64);
    let mut buf = Vec::new();
    let mut last_progress = Instant::now();
    while got < n {
        let mut progressed = false;
        while sent < n && sent - got < window {
            let len = next_size();
            if !drv
                .queue_frame(&make_frame(mac, first + sent, len))
                .expect("queue frame")
            {
                break;
            }
            sizes.push_back(len);
            sent += 1;
            progressed = true;
        }
        drv.flush().expect("flush");
        while drv.recv_into(&mut buf).expect("recv") {
            let len = sizes
                .pop_front()
                .expect("a frame came back that was never sent");
            let seq = first + got;
            assert_eq!(frame_seq(&buf), Some(seq), "lost, duplicated or reordered");
            assert!(
                buf == make_frame(mac, seq, len),
                "frame {seq} corrupted ({} bytes, sent {len})",
                buf.len()
            );
            bytes += len as u64;
            got += 1;
            progressed = true;
        }
        if let Some(p) = progress {
            p.store(got, std::sync::atomic::Ordering::Release);
        }
        if progressed {
            last_progress = Instant::now();
        } else {
            // Nothing moved: wait for the device (interrupt mode sleeps on the call eventfd).
            drv.wait_rx(Duration::from_millis(100)).expect("wait");
            assert!(
                last_progress.elapsed() < Duration::from_secs(20),
                "no progress for 20 s at frame {got} of {n} ({sent} sent)"
            );
        }
    }
    bytes
}
