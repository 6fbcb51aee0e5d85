//! `vmdev-perf idle` through the real daemons: it runs a device busy, lets it idle, reads
//! the datapath's CPU time, wakes it and reports the 5 ms after each further idle spell in
//! 100 µs slots, and the median wake.
//! Only what it reports is checked, never how fast: timing belongs to perf/.

use vmdev_tests::Daemons;

#[test]
fn idle_reports_cpu_time_and_the_first_millisecond_after_waking() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let u = d.start_device("dp0", &[]).to_string();
    let v = d.vmdev_perf_json("idle", &["-u", &u, "--seconds", "0.2", "--wakes", "3"]);
    assert_eq!(v["benchmark"], "idle");
    assert!(v["busy_frames_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{v}");
    assert!(v["wake_round_trip_ns"].as_u64().unwrap_or(0) > 0, "{v}");
    let cpu = v["idle_cpu_percent"].as_f64().expect("idle CPU share");
    assert!((0.0..=100.0 * 2.0).contains(&cpu), "{v}");
    // 5 ms in 100 µs slots; the first ten add up to the first millisecond's frames.
    let slots: Vec<u64> = v["frames_per_100us_after_idle"]
        .as_array()
        .expect("slots")
        .iter()
        .map(|n| n.as_u64().expect("a count"))
        .collect();
    assert_eq!(slots.len(), 50, "{v}");
    assert!(slots.iter().sum::<u64>() > 0, "frames after waking: {v}");
    assert_eq!(
        slots[..10].iter().sum::<u64>(),
        v["frames_first_ms_after_idle"].as_u64().expect("first ms"),
        "{v}"
    );
    // Three wakes, each with its 5 ms per ms; the first one's is the slots above.
    let per_ms = v["frames_per_ms_after_idle_each"]
        .as_array()
        .expect("per ms");
    assert_eq!(per_ms.len(), 3, "{v}");
    let first: Vec<u64> = slots.chunks(10).map(|c| c.iter().sum()).collect();
    assert_eq!(per_ms[0], serde_json::json!(first), "{v}");
    // The median wake is one of the three (a wake that never got there counts as slowest).
    let each: Vec<u64> = v["full_rate_after_us_each"]
        .as_array()
        .expect("each wake")
        .iter()
        .map(|w| w.as_u64().unwrap_or(u64::MAX))
        .collect();
    assert_eq!(each.len(), 3, "{v}");
    for &us in each.iter().filter(|&&us| us != u64::MAX) {
        assert!(us < 5000 && us % 100 == 0, "{v}");
    }
    let mut sorted = each.clone();
    sorted.sort_unstable();
    match &v["full_rate_after_us"] {
        serde_json::Value::Null => assert_eq!(sorted[1], u64::MAX, "{v}"),
        us => assert_eq!(us.as_u64(), Some(sorted[1]), "{v}"),
    }
    // The device really moved frames.
    let uuid = u.parse().expect("uuid");
    assert!(d.client().stats(uuid).expect("stats").queues[0].packets > 0);
}
