//! mdevctl persistence: defined devices live in the control plane's devices.toml; `auto`
//! ones come back when their parent registers after a control-plane restart.

use std::time::Duration;
use vmdev_tests::{wait_until, Daemons};

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "vmdevctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn running(d: &Daemons) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&ok(d.vmdevctl(&["--json", "list"]))).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x["uuid"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn defined_auto_devices_survive_a_control_plane_restart() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let auto = "6f1c2a9e-1b7d-4d2e-9a43-0c1f5e7b8a01";
    let manual = "6f1c2a9e-1b7d-4d2e-9a43-0c1f5e7b8a02";
    ok(d.vmdevctl(&[
        "define",
        "-p",
        "dp0",
        "-t",
        "net-loopback",
        "-u",
        auto,
        "--auto",
        "--attr",
        "mtu=9000",
    ]));
    ok(d.vmdevctl(&["define", "-p", "dp0", "-t", "net-loopback", "-u", manual]));
    let bad = d.vmdevctl(&[
        "define",
        "-p",
        "dp0",
        "-t",
        "net-loopback",
        "--attr",
        "mtu=1",
    ]);
    assert!(
        !bad.status.success(),
        "invalid attributes are refused at define time"
    );
    let file = std::fs::read_to_string(d.run_dir.join("devices.toml")).unwrap();
    assert!(
        file.contains(auto) && file.contains(manual),
        "both definitions are in the file:\n{file}"
    );
    assert!(
        !d.run_dir.join("devices.toml.tmp").exists(),
        "written through a temp file, renamed"
    );
    assert!(running(&d).is_empty(), "defining does not start");

    d.restart_control();
    d.add_datapath("dp0");
    wait_until(
        "the auto device to come back",
        Duration::from_secs(20),
        || running(&d).contains(&auto.to_string()),
    );
    assert!(
        !running(&d).contains(&manual.to_string()),
        "a device without auto stays down"
    );
    let list = ok(d.vmdevctl(&["list"]));
    assert!(list.contains("mtu=9000"), "with its attributes: {list}");

    ok(d.vmdevctl(&["start", "-u", manual]));
    assert!(running(&d).contains(&manual.to_string()));
    ok(d.vmdevctl(&["undefine", "-u", auto]));
    let defs = ok(d.vmdevctl(&["list", "--defined"]));
    assert!(!defs.contains(auto) && defs.contains(manual), "{defs}");
    assert!(!std::fs::read_to_string(d.run_dir.join("devices.toml"))
        .unwrap()
        .contains(auto));
    assert!(
        running(&d).contains(&auto.to_string()),
        "undefine leaves the running device alone"
    );
    assert!(
        !d.vmdevctl(&["undefine", "-u", auto]).status.success(),
        "undefining twice is an error"
    );
}
