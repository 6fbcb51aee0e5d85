//! Suspend / resume and virtqueue state over the vmdev protocol: a suspended device
//! consumes and writes nothing; on resume every frame queued meanwhile comes back in order;
//! the commands need their protocol feature bits.

use std::time::Duration;
use vmdev_proto::transport::{Reply, Request, VqState};
use vmdev_proto::{Channel, ErrorCode, Hello, ProtoError};
use vmdev_tests::{frame_seq, make_frame, wait_until, Daemons};
use vmdev_tools::{NetDriver, NetDriverConfig};

fn split(s: VqState) -> (u16, u16) {
    match s {
        VqState::Split {
            avail_index,
            used_index,
        } => (avail_index, used_index),
        other => panic!("expected a split-ring state, got {other:?}"),
    }
}

#[test]
fn suspended_device_consumes_nothing_and_resumes_in_order() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    d.add_datapath("dp1");
    let uuid = d.start_device("dp0", &[]);
    let mut drv = NetDriver::open(&d.run_dir, uuid, NetDriverConfig::default()).unwrap();
    let mac = drv.mac();
    let mut buf = Vec::new();
    for seq in 0..100u64 {
        assert!(drv.send(&make_frame(mac, seq, 200)).unwrap());
        wait_until("frame", Duration::from_secs(20), || {
            drv.recv_into(&mut buf).unwrap()
        });
        assert_eq!(frame_seq(&buf), Some(seq));
    }
    drv.client().suspend().unwrap();
    let (tx_avail, tx_used) = split(drv.client().queue_state(1).unwrap());
    assert_eq!(
        (tx_avail, tx_used),
        (100, 100),
        "TX stopped after the 100 frames it finished"
    );
    // Queued while suspended: the device must not take them.
    for seq in 100..150u64 {
        assert!(drv.queue_frame(&make_frame(mac, seq, 300)).unwrap());
    }
    drv.flush().unwrap();
    drv.kick(1).unwrap();
    assert!(
        !drv.recv_into(&mut buf).unwrap(),
        "nothing comes back while suspended"
    );
    // Moving a suspended device keeps it suspended.
    drv.client().migrate_device(uuid, "dp1").unwrap();
    assert_eq!(
        split(drv.client().queue_state(1).unwrap()),
        (100, 100),
        "still untouched"
    );
    let st = drv.client().stats(uuid).unwrap();
    assert_eq!(st.queues[1].packets, 100);
    drv.client().resume().unwrap();
    for seq in 100..150u64 {
        wait_until("queued frame after resume", Duration::from_secs(20), || {
            drv.recv_into(&mut buf).unwrap()
        });
        assert_eq!(frame_seq(&buf), Some(seq));
        assert_eq!(buf, make_frame(mac, seq, 300));
    }
    assert_eq!(
        drv.status().unwrap() & vmdev_proto::virtio::status::NEEDS_RESET,
        0
    );
}

#[test]
fn migration_commands_need_their_protocol_features() {
    let mut d = Daemons::start();
    d.add_datapath("dp0");
    let uuid = d.start_device("dp0", &[]);
    let stream = std::os::unix::net::UnixStream::connect(d.run_dir.join("control.sock")).unwrap();
    let mut ch = Channel::new(stream);
    let old = Request::Hello(Hello {
        version: vmdev_proto::PROTOCOL_VERSION,
        features: 0,
    });
    let r: Reply = ch.call(&old, &[]).unwrap();
    assert!(
        matches!(r, Reply::Hello(h) if h.features == 0),
        "an old client negotiates nothing"
    );
    let r: Reply = ch.call(&Request::Open { uuid }, &[]).unwrap();
    assert_eq!(r, Reply::Ok);
    for req in [
        Request::Suspend,
        Request::Resume,
        Request::GetQueueState { queue: 0 },
    ] {
        match ch.call::<_, Reply>(&req, &[]).unwrap() {
            Reply::Error(e) => assert_eq!(e.code, ErrorCode::BadState, "{req:?}"),
            r => panic!("{req:?} answered {r:?} without the feature"),
        }
    }
    // Old clients keep working: the transport operations need no feature.
    assert!(matches!(
        ch.call::<_, Reply>(&Request::GetDeviceId, &[]).unwrap(),
        Reply::Value(1)
    ));
    // Suspending a device that is not running is a state error.
    let mut c = d.client();
    let other = d.start_device("dp0", &[]);
    c.open(other).unwrap();
    assert!(matches!(c.suspend(), Err(ProtoError::Remote(e)) if e.code == ErrorCode::BadState));
}
