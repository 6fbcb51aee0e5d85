//! `vmdev-perf scale` through the real daemons: it starts the device counts asked for on one
//! datapath, drives them all from one thread, stops them again, and says whether guest
//! memory could have huge pages.
//! Only what it reports is checked, never how fast: timing belongs to perf/.

use vmdev_tests::Daemons;

#[test]
fn scale_reports_each_device_count_and_the_huge_page_setting() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let args = ["-p", "dp0", "--devices", "1,3", "--seconds", "0.3"];
    let v = d.vmdev_perf_json("scale", &args);
    assert_eq!(v["benchmark"], "scale");
    let rows = v["rows"].as_array().expect("rows");
    let counts: Vec<u64> = rows.iter().filter_map(|r| r["devices"].as_u64()).collect();
    assert_eq!(counts, [1, 3], "{v}");
    for r in rows {
        assert!(r["frames_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{v}");
    }
    assert_eq!(rows[0]["ratio_to_first"].as_f64(), Some(1.0), "{v}");
    // The setting it reports is the one the kernel shows in brackets.
    let knob = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled");
    match knob {
        Ok(k) => assert!(
            k.contains(&format!(
                "[{}]",
                v["shmem_enabled"].as_str().expect("a setting")
            )),
            "{k} / {v}"
        ),
        Err(_) => assert!(v["shmem_enabled"].is_null(), "{v}"),
    }
    // Every device it started is gone again.
    assert!(d.client().list_devices().expect("list").is_empty());
}
