//! `vmdev-perf rings` and `--in-order` through the real daemons: the benchmark drives two
//! devices, one over split and one over packed rings, in alternating slices, and refuses a
//! pair it cannot compare. Only what it reports is checked, never how fast: timing belongs
//! to perf/.

use vmdev_tests::Daemons;

/// `vmdev-perf rings` without the floors (timing is not what these tests look at).
fn rings_args<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["--floor-iters", "0"];
    all.extend_from_slice(args);
    all
}

#[test]
fn rings_drives_a_split_and_a_packed_device_in_alternating_slices() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    for in_order in [false, true] {
        let split = d.start_device("dp0", &[]).to_string();
        let packed = d.start_device("dp0", &[]).to_string();
        let mut args = vec!["-u", &split, "--packed-uuid", &packed];
        args.extend(["--seconds", "0.4", "--slice-ms", "20"]);
        if in_order {
            args.push("--in-order");
        }
        let v = d.vmdev_perf_json("rings", &rings_args(&args));
        assert_eq!(v["benchmark"], "rings");
        assert_eq!(v["in_order"], in_order);
        assert!(v["slices"].as_u64().unwrap_or(0) >= 2, "{v}");
        for k in ["split_frames_per_s", "packed_frames_per_s", "ratio_p50"] {
            assert!(v[k].as_f64().unwrap_or(0.0) > 0.0, "{k} in {v}");
        }
        // The driver really ran each device over the rings it was given.
        let stats = |u: &str| {
            let uuid = u.parse().expect("uuid");
            d.client().stats(uuid).expect("stats").queues[0].packets
        };
        assert!(
            stats(&split) > 0 && stats(&packed) > 0,
            "both devices moved frames"
        );
    }
}

#[test]
fn rings_refuses_the_same_device_twice() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let u = d.start_device("dp0", &[]).to_string();
    let out = d.vmdev_perf("rings", &rings_args(&["-u", &u, "--packed-uuid", &u]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("second device"), "{err}");
}
