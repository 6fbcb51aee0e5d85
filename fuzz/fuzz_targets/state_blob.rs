//! Device state blobs (`LoadState`, `vmdevctl restore`): `Server::parse_state` on arbitrary
//! bytes and, for a blob it accepts, `DeviceModel::load_state` into a fresh net-loopback
//! model, as the daemon does. Nothing may panic; an accepted blob re-serializes to a blob
//! that parses to the same state; a successful load leaves the status below DRIVER_OK.
//!
//! The checksum makes random bytes almost never parse, so the input is also tried with its
//! checksum fixed up (when it is otherwise a JSON `DeviceState`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmdev_control::model::DeviceModel;
use vmdev_control::profile;
use vmdev_control::server::Server;
use vmdev_proto::transport::DeviceState;
use vmdev_proto::virtio::status as st;

fn load(state: &DeviceState) {
    let profile = profile::build(profile::NET_LOOPBACK, &[], 0).expect("profile");
    let mut m = DeviceModel::new(profile);
    if m.load_state(state.features, state.status, &state.queues)
        .is_ok()
    {
        assert_eq!(
            m.status() & !(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK),
            0
        );
        let (features, status, _, queues) = m.state_parts();
        assert_eq!(features, state.features);
        assert_eq!(status, m.status());
        for (i, _) in &state.queues {
            // The last position given for a queue wins.
            let last = state.queues.iter().rev().find(|(j, _)| j == i).unwrap().1;
            assert_eq!(queues[*i as usize].1, last);
        }
    }
    // A second load is refused once the status left 0.
    if m.status() != 0 {
        assert!(m
            .load_state(state.features, state.status, &state.queues)
            .is_err());
    }
}

fn accepted(blob: &[u8]) {
    let Ok(state) = Server::parse_state(blob) else {
        return;
    };
    let again = serde_json::to_vec(&state).expect("a parsed state serializes");
    assert_eq!(
        Server::parse_state(&again).as_ref().ok(),
        Some(&state),
        "a re-serialized blob does not parse to the same state"
    );
    load(&state);
}

fuzz_target!(|data: &[u8]| {
    accepted(data);
    if let Ok(mut state) = serde_json::from_slice::<DeviceState>(data) {
        state.checksum = state.compute_checksum();
        let blob = serde_json::to_vec(&state).expect("serializes");
        accepted(&blob);
    }
});
