//! Access control: every peer's uid (SO_PEERCRED) is checked against an allow-list (root,
//! the daemon's own uid, `--allow-uid`). The other uid is played by `setpriv` as nobody
//! with CAP_DAC_OVERRIDE, so the 0600 socket files do not stop it first and the check
//! under test is the one that refuses it.

use std::process::{Command, Output};
use std::time::Duration;
use vmdev_tests::{bin_path, external_tool, wait_until, Daemons};

const NOBODY: &str = "65534";

/// Runs a vmdev binary as uid 65534 that can still open the sockets; None (skipped)
/// unless we are root with setpriv.
fn as_nobody(bin: &str, args: &[&str]) -> Option<Output> {
    // Only root can switch uid.
    if !Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
    {
        eprintln!("SKIPPED: needs root to run a peer as another uid");
        return None;
    }
    let setpriv = external_tool("setpriv")?;
    Some(
        Command::new(setpriv)
            .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
            .args([
                "--inh-caps",
                "+dac_override",
                "--ambient-caps",
                "+dac_override",
            ])
            .arg(bin_path(bin))
            .args(args)
            .env("VMDEV_LOG", "error")
            .output()
            .expect("run setpriv"),
    )
}

#[test]
fn a_client_with_another_uid_is_refused_with_a_clear_error() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let dir = d.run_dir.to_str().unwrap().to_string();
    let Some(out) = as_nobody("vmdevctl", &["--run-dir", &dir, "types"]) else {
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("uid 65534 may not use this vmdev control plane"),
        "{err}"
    );
    // Root is still served, and the device list is untouched.
    assert_eq!(d.client().list_types().unwrap().len(), 1);
    assert!(d.control_alive());
}

#[test]
fn a_datapath_with_another_uid_cannot_register() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let dir = d.run_dir.to_str().unwrap().to_string();
    let Some(out) = as_nobody("vmdev-datapath", &["--run-dir", &dir, "--name", "evil"]) else {
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("refused us") && err.contains("uid 65534"),
        "{err}"
    );
    let names: Vec<String> = d
        .client()
        .list_types()
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["dp0"]);
}

#[test]
fn allow_uid_lets_that_uid_in() {
    let d = Daemons::start_with(&["--allow-uid", NOBODY]);
    let dir = d.run_dir.to_str().unwrap().to_string();
    let Some(out) = as_nobody("vmdevctl", &["--run-dir", &dir, "types"]) else {
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_datapath_refuses_a_control_plane_with_another_uid() {
    // The control plane runs as nobody; a root datapath without --allow-uid refuses it.
    let Some(_) = as_nobody("vmdev-control", &["--version"]) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("vmdev-access-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut control = Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
        .args([
            "--inh-caps",
            "+dac_override",
            "--ambient-caps",
            "+dac_override",
        ])
        .arg(bin_path("vmdev-control"))
        .arg("--run-dir")
        .arg(&dir)
        .env("VMDEV_LOG", "error")
        .spawn()
        .unwrap();
    // Listening, not just bound.
    wait_until("datapath.sock", Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(dir.join("datapath.sock")).is_ok()
    });
    let out = Command::new(bin_path("vmdev-datapath"))
        .arg("--run-dir")
        .arg(&dir)
        .args(["--name", "dp0"])
        .env("VMDEV_LOG", "error")
        .output()
        .unwrap();
    let _ = control.kill();
    let _ = control.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("runs as uid 65534, which is not allowed"),
        "{err}"
    );
}
