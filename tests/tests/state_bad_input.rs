//! Bad input to the state and migration commands, one test each: every case gets a clear
//! error, changes nothing, and the device keeps forwarding where it was.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use vmdev_proto::datapath::{FromDatapath, ToDatapath};
use vmdev_proto::transport::{DeviceState, Request, VqState};
use vmdev_proto::{Channel, ErrorCode, Hello, ProtoError, Uuid};
use vmdev_shm_ring::create_sealed_memfd;
use vmdev_shm_ring::dirty::bitmap_len;
use vmdev_tests::{frame_seq, make_frame, wait_until, Daemons};
use vmdev_tools::{NetDriver, NetDriverConfig, TransportClient};

/// Daemons with two datapaths and one device on dp0 with a driver that has sent frames.
struct World {
    d: Daemons,
    uuid: Uuid,
    drv: NetDriver,
    seq: u64,
}

impl World {
    fn new() -> Self {
        let mut d = Daemons::start();
        d.add_datapath("dp0");
        d.add_datapath("dp1");
        let uuid = d.start_device("dp0", &["mac=52:54:00:00:00:07"]);
        let drv = NetDriver::open(&d.run_dir, uuid, NetDriverConfig::default()).unwrap();
        let mut w = World {
            d,
            uuid,
            drv,
            seq: 0,
        };
        w.echo(20);
        w
    }

    /// Sends `n` frames one at a time and checks each comes back in order.
    fn echo(&mut self, n: u64) {
        let mut buf = Vec::new();
        for _ in 0..n {
            let f = make_frame(self.drv.mac(), self.seq, 100);
            assert!(self.drv.send(&f).unwrap());
            wait_until("frame", Duration::from_secs(20), || {
                self.drv.recv_into(&mut buf).unwrap()
            });
            assert_eq!(frame_seq(&buf), Some(self.seq));
            self.seq += 1;
        }
    }

    fn parent(&self) -> String {
        self.d
            .client()
            .list_devices()
            .unwrap()
            .into_iter()
            .find(|x| x.uuid == self.uuid)
            .expect("device listed")
            .parent
    }

    /// A good blob of the running device (saved by management, device undisturbed).
    fn blob(&self) -> DeviceState {
        let raw = self.d.client().save_device(self.uuid).unwrap();
        serde_json::from_slice(&raw).unwrap()
    }

    /// Offers `blob` both ways — `restore` on management and `LoadState` into a reset
    /// device of a second driver connection — and returns both errors. Checks that neither
    /// created, claimed or changed anything.
    fn offer(&mut self, blob: Vec<u8>) -> (ProtoError, ProtoError) {
        let before = self.d.client().list_devices().unwrap().len();
        let e_restore = self
            .d
            .client()
            .restore_device(blob.clone(), Some("dp1"))
            .unwrap_err();
        assert_eq!(
            self.d.client().list_devices().unwrap().len(),
            before,
            "a refused restore creates no device"
        );
        // A second device that a driver resets and tries to load into.
        let other = self.d.start_device("dp1", &["mac=52:54:00:00:00:07"]);
        let mut c = TransportClient::connect(&self.d.run_dir).unwrap();
        c.open(other).unwrap();
        c.reset().unwrap();
        let e_load = c.load_state(blob).unwrap_err();
        assert_eq!(c.status().unwrap(), 0, "status untouched");
        assert_eq!(c.driver_features().unwrap(), 0, "features untouched");
        assert_eq!(
            c.queue_state(1).unwrap(),
            VqState::Split {
                avail_index: 0,
                used_index: 0
            },
            "queue state untouched"
        );
        drop(c);
        self.echo(5);
        (e_restore, e_load)
    }
}

fn code(e: &ProtoError) -> Option<ErrorCode> {
    match e {
        ProtoError::Remote(w) => Some(w.code),
        _ => None,
    }
}

fn assert_refused(e: &ProtoError, needle: &str) {
    assert_eq!(code(e), Some(ErrorCode::BadArgument), "{e}");
    assert!(e.to_string().contains(needle), "'{e}' lacks '{needle}'");
}

#[test]
fn vq_state_beyond_the_ring_is_refused_and_changes_nothing() {
    let mut w = World::new();
    w.drv.client().suspend().unwrap();
    let before = w.drv.client().queue_state(1).unwrap();
    let bad = VqState::Split {
        avail_index: 1000,
        used_index: 0,
    };
    let e = w
        .drv
        .client()
        .request(
            &Request::SetQueueState {
                queue: 1,
                state: bad,
            },
            &[],
        )
        .unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::BadQueue), "{e}");
    assert_eq!(w.drv.client().queue_state(1).unwrap(), before);
    w.drv.client().resume().unwrap();
    w.echo(10);
}

#[test]
fn state_blob_of_another_device_type_is_refused() {
    let mut w = World::new();
    let mut st = w.blob();
    st.device_type = "blk-null".into();
    st.checksum = st.compute_checksum();
    let (restore, load) = w.offer(serde_json::to_vec(&st).unwrap());
    assert_eq!(code(&restore), Some(ErrorCode::NoSuchType), "{restore}");
    assert_refused(&load, "another type");
}

#[test]
fn state_blob_of_another_version_is_refused() {
    let mut w = World::new();
    let mut st = w.blob();
    st.version += 1;
    st.checksum = st.compute_checksum();
    let (restore, load) = w.offer(serde_json::to_vec(&st).unwrap());
    assert_refused(&restore, "version 2 is not supported");
    assert_refused(&load, "version 2 is not supported");
}

#[test]
fn truncated_state_blob_is_refused() {
    let mut w = World::new();
    let good = serde_json::to_vec(&w.blob()).unwrap();
    let (restore, load) = w.offer(good[..good.len() * 2 / 3].to_vec());
    assert_refused(&restore, "not a device state blob");
    assert_refused(&load, "not a device state blob");
}

#[test]
fn bit_flipped_state_blob_is_refused() {
    let mut w = World::new();
    let st = w.blob();
    let text = serde_json::to_string(&st).unwrap();
    // A flip that still parses: one digit of the saved features.
    let features = st.features.to_string();
    let last = features.chars().last().unwrap();
    let flipped_digit = if last == '0' { '1' } else { '0' };
    let flipped_features = format!("{}{flipped_digit}", &features[..features.len() - 1]);
    let flipped = text.replacen(
        &format!("\"features\":{features}"),
        &format!("\"features\":{flipped_features}"),
        1,
    );
    assert_ne!(flipped, text);
    let (restore, load) = w.offer(flipped.into_bytes());
    assert_refused(&restore, "checksum");
    assert_refused(&load, "checksum");
}

#[test]
fn dirty_bitmap_too_small_for_the_regions_is_refused() {
    let mut w = World::new();
    let need = bitmap_len(w.drv.memory().region_sizes());
    assert!(need >= 16, "the driver's memory spans more than 64 pages");
    let small = create_sealed_memfd("small-bitmap", need - 8).unwrap();
    let e = w.drv.client().start_dirty_log(small.as_fd()).unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::BadMemory), "{e}");
    assert!(e.to_string().contains("bytes needed"), "{e}");
    w.echo(10);
    // Stopping a log that never started is harmless; a right-sized bitmap then works.
    w.drv.client().stop_dirty_log().unwrap();
    let right = create_sealed_memfd("bitmap", need).unwrap();
    w.drv.client().start_dirty_log(right.as_fd()).unwrap();
    w.echo(10);
}

#[test]
fn migrate_to_a_parent_without_room_keeps_the_device_running() {
    let mut w = World::new();
    w.d.add_datapath_with("full", &["--max-devices", "1"]);
    w.d.start_device("full", &[]);
    let e = w.drv.client().migrate_device(w.uuid, "full").unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::NoCapacity), "{e}");
    assert_eq!(w.parent(), "dp0");
    w.echo(10);
}

#[test]
fn migrate_to_a_parent_without_the_type_keeps_the_device_running() {
    let mut w = World::new();
    // A parent that offers no net-loopback (this build knows no other type), registered
    // over the real datapath socket.
    let mut ch = Channel::new(UnixStream::connect(w.d.run_dir.join("datapath.sock")).unwrap());
    ch.send(&FromDatapath::Hello(Hello::ours()), &[]).unwrap();
    assert!(matches!(
        ch.recv::<ToDatapath>().unwrap().0,
        ToDatapath::Hello(_)
    ));
    ch.send(
        &FromDatapath::Register {
            name: "typeless".into(),
            cpu: None,
            types: vec![],
        },
        &[],
    )
    .unwrap();
    let r = ch.recv::<ToDatapath>().unwrap().0;
    assert!(matches!(r, ToDatapath::Registered(Ok(()))), "{r:?}");
    let e = w
        .drv
        .client()
        .migrate_device(w.uuid, "typeless")
        .unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::NoSuchType), "{e}");
    assert_eq!(w.parent(), "dp0");
    w.echo(10);
}

#[test]
fn migrate_to_a_parent_that_does_not_exist_keeps_the_device_running() {
    let mut w = World::new();
    let e = w
        .drv
        .client()
        .migrate_device(w.uuid, "nowhere")
        .unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::NoSuchParent), "{e}");
    assert_eq!(w.parent(), "dp0");
    w.echo(10);
}
