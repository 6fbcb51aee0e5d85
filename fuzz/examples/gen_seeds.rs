//! Writes the committed seed inputs under `fuzz/seeds/<target>/`:
//!
//! ```sh
//! cd fuzz && cargo run --example gen_seeds
//! ```
//!
//! Seeds are deterministic, so running this again changes no file unless a message type,
//! the state format or the target's input layout changed.

use arbitrary::{Arbitrary, Unstructured};
use std::path::Path;
use vmdev_fuzz::model_ops::{Input, Op};
use vmdev_proto::datapath::{
    AttachSpec, DpEvent, DpOp, DpReply, FromDatapath, QueueSpec, RegionSpec, ToDatapath,
};
use vmdev_proto::transport::{
    DeviceState, DeviceStats, QueueStats, Reply, Request, VqState, DEVICE_STATE_FORMAT,
    DEVICE_STATE_VERSION,
};
use vmdev_proto::virtio::features as f;
use vmdev_proto::{ErrorCode, Hello, Uuid, WireError};

const UUID: Uuid = Uuid::from_u128(0x6a1b_3c4d_5e6f_4789_8abc_def0_1234_5678);

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
    println!("seeds/{target}/{name}: {} bytes", bytes.len());
}

/// One frame: the 8-byte header (body length, fd count, reserved) and the postcard body.
fn frame<T: serde::Serialize>(msg: &T, nfds: u16) -> Vec<u8> {
    let body = postcard::to_stdvec(msg).unwrap();
    let mut v = (body.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(&nfds.to_le_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(&body);
    v
}

/// A `proto_frames` input: selector byte (message type, fds sent), then the stream.
fn stream(kind: u8, nfds: u8, frames: &[Vec<u8>]) -> Vec<u8> {
    let mut v = vec![kind | nfds << 2];
    for f in frames {
        v.extend_from_slice(f);
    }
    v
}

fn proto_frames() {
    let t = "proto_frames";
    write(
        t,
        "hello",
        &stream(0, 0, &[frame(&Request::Hello(Hello::ours()), 0)]),
    );
    write(
        t,
        "driver-session",
        &stream(
            0,
            1,
            &[
                frame(&Request::Hello(Hello::ours()), 0),
                frame(&Request::Open { uuid: UUID }, 0),
                frame(&Request::GetDeviceFeatures, 0),
                frame(&Request::SetStatus(3), 0),
                frame(&Request::SetDriverFeatures(f::VERSION_1 | f::NET_F_MAC), 0),
                frame(
                    &Request::AddMemRegion {
                        guest_addr: 0x10000,
                        size: 0x10000,
                        offset: 0,
                    },
                    1,
                ),
                frame(
                    &Request::SetQueueAddress {
                        queue: 0,
                        desc: 0x10000,
                        driver: 0x11000,
                        device: 0x12000,
                    },
                    0,
                ),
                frame(
                    &Request::SetQueueState {
                        queue: 1,
                        state: VqState::Split {
                            avail_index: 7,
                            used_index: 5,
                        },
                    },
                    0,
                ),
                frame(&Request::ReadConfig { offset: 0, len: 6 }, 0),
            ],
        ),
    );
    write(
        t,
        "management",
        &stream(
            0,
            0,
            &[
                frame(
                    &Request::StartDevice {
                        parent: "dp0".into(),
                        device_type: "net-loopback".into(),
                        uuid: Some(UUID),
                        attrs: vec![("queue-pairs".into(), "2".into())],
                        vhost_user: None,
                    },
                    0,
                ),
                frame(&Request::LoadState(b"{}".to_vec()), 0),
                frame(
                    &Request::MigrateDevice {
                        uuid: UUID,
                        to: "dp1".into(),
                    },
                    0,
                ),
            ],
        ),
    );
    write(
        t,
        "replies",
        &stream(
            1,
            0,
            &[
                frame(&Reply::Hello(Hello::ours()), 0),
                frame(&Reply::Value(0x1_0000_0020), 0),
                frame(
                    &Reply::Error(WireError::new(ErrorCode::BadState, "status order")),
                    0,
                ),
                frame(
                    &Reply::Stats(DeviceStats {
                        queues: vec![QueueStats {
                            packets: 3,
                            bytes: 180,
                            ..Default::default()
                        }],
                    }),
                    0,
                ),
            ],
        ),
    );
    let spec = AttachSpec {
        handle: 1,
        device_type: "net-loopback".into(),
        features: f::VERSION_1 | f::RING_EVENT_IDX,
        num_queues: 3,
        regions: vec![RegionSpec {
            guest_addr: 0x10000,
            size: 0x10000,
            offset: 0,
        }],
        trust_unsealed: false,
        recover: false,
        dirty_log: false,
        queues: vec![QueueSpec {
            index: 0,
            size: 64,
            desc: 0x10000,
            driver: 0x10400,
            device: 0x10500,
            state: VqState::default(),
            has_kick: true,
            has_call: true,
        }],
    };
    write(
        t,
        "to-datapath-attach",
        &stream(
            2,
            3,
            &[
                frame(&ToDatapath::Hello(Hello::ours()), 0),
                frame(&ToDatapath::Registered(Ok(())), 0),
                frame(
                    &ToDatapath::Request {
                        seq: 1,
                        op: DpOp::Attach(spec),
                    },
                    3,
                ),
                frame(
                    &ToDatapath::Request {
                        seq: 2,
                        op: DpOp::Detach { handle: 1 },
                    },
                    0,
                ),
            ],
        ),
    );
    write(
        t,
        "from-datapath",
        &stream(
            3,
            0,
            &[
                frame(&FromDatapath::Hello(Hello::ours()), 0),
                frame(
                    &FromDatapath::Register {
                        name: "dp0".into(),
                        cpu: Some(2),
                        types: vec![("net-loopback".into(), 4)],
                    },
                    0,
                ),
                frame(
                    &FromDatapath::Reply {
                        seq: 2,
                        result: Ok(DpReply::Detached(
                            DeviceStats::default(),
                            vec![(0, VqState::default())],
                        )),
                    },
                    0,
                ),
                frame(
                    &FromDatapath::Event(DpEvent::DeviceFailed {
                        handle: 1,
                        reason: "bad descriptor".into(),
                        stats: DeviceStats::default(),
                    }),
                    0,
                ),
            ],
        ),
    );
    // A header announcing a frame over the maximum.
    write(
        t,
        "oversized-header",
        &[0, 0x01, 0x00, 0x01, 0x00, 0, 0, 0, 0],
    );
}

/// A driver that reaches DRIVER_OK with queues 0 and 1 (64 entries each, or 48 packed) in
/// a 64 KiB region.
fn driver_ok(packed: bool) -> Vec<Op> {
    let mut setup = vec![
        Op::AddDefaultRegion,
        Op::NextStatus,
        Op::NextStatus,
        Op::AcceptFeatures(if packed { u64::MAX } else { !f::RING_PACKED }),
        Op::NextStatus,
    ];
    for q in 0..2u8 {
        setup.extend([
            // 16 * 3 = 48: packed rings may have any size.
            Op::SetQueueSize {
                queue: q,
                size: if packed { 16 } else { 6 },
            },
            Op::PlaceQueue { queue: q, slot: q },
            Op::SetQueueKick { queue: q, fd: true },
            Op::SetQueueCall { queue: q, fd: true },
            Op::SetQueueReady {
                queue: q,
                ready: true,
            },
        ]);
    }
    setup.extend([
        Op::SetConfigNotify { fd: true },
        Op::NextStatus,
        Op::GetStatus,
    ]);
    setup
}

fn control_model() {
    let setup = driver_ok(false);
    let input = |ops: Vec<Op>, attach_failures: u32| Input {
        pairs: 0,
        queue_size: 8,
        trusted: false,
        attach_failures,
        advance: 3,
        ops,
    };
    let seeds = [
        ("driver-ok", input(setup.clone(), 0)),
        ("driver-ok-packed", input(driver_ok(true), 0)),
        (
            "suspend-resume-migrate",
            input(
                [
                    setup.clone(),
                    vec![
                        Op::Suspend,
                        Op::SetQueueState {
                            queue: 0,
                            avail: 9,
                            used: 9,
                            kind: 0,
                        },
                        Op::GetQueueState { queue: 0 },
                        Op::Resume,
                        Op::Migrate {
                            advance: 5,
                            fail: false,
                        },
                        Op::ReadConfigSmall { offset: 0, len: 6 },
                        Op::DeviceFailed,
                        Op::Reset,
                    ],
                ]
                .concat(),
                0,
            ),
        ),
        (
            "attach-fails-then-release",
            input(
                [setup.clone(), vec![Op::NextStatus, Op::Release]].concat(),
                1,
            ),
        ),
    ];
    for (name, input) in seeds {
        let bytes = input.encode();
        let back = Input::arbitrary_take_rest(Unstructured::new(&bytes)).unwrap();
        assert_eq!(
            format!("{back:?}"),
            format!("{input:?}"),
            "the encoder and arbitrary's derive disagree"
        );
        write("control_model", name, &bytes);
    }
}

/// A `chain_walker` input: the 16-byte header, then guest memory from 0x10000.
struct Ring {
    mem: Vec<u8>,
}

const A: u64 = 0x10000;

impl Ring {
    fn new(len: usize) -> Self {
        Ring { mem: vec![0; len] }
    }
    fn put(&mut self, off: usize, b: &[u8]) {
        self.mem[off..off + b.len()].copy_from_slice(b);
    }
    fn desc(&mut self, table: usize, i: usize, addr: u64, len: u32, flags: u16, next: u16) {
        let o = table + 16 * i;
        self.put(o, &addr.to_le_bytes());
        self.put(o + 8, &len.to_le_bytes());
        self.put(o + 12, &flags.to_le_bytes());
        self.put(o + 14, &next.to_le_bytes());
    }
    /// Header: size 1 << log, flags, desc/avail/used at these offsets from 0x10000.
    fn input(&self, log: u8, flags: u8, rings: [u16; 3], resume: [u16; 2], choice: u32) -> Vec<u8> {
        let mut v = vec![log, flags];
        for r in rings {
            v.extend_from_slice(&(r + 0x100).to_le_bytes());
        }
        for r in resume {
            v.extend_from_slice(&r.to_le_bytes());
        }
        v.extend_from_slice(&choice.to_le_bytes());
        v.extend_from_slice(&self.mem);
        v
    }
}

fn chain_walker() {
    use vmdev_shm_ring::split::{DESC_F_INDIRECT as IND, DESC_F_NEXT as NEXT, DESC_F_WRITE as W};
    // Queue of 16 at 0x10000 (desc), 0x10100 (avail), 0x10200 (used).
    let (desc, avail) = (0usize, 0x100usize);
    let rings = [0, 0x100, 0x200];

    // One chain of two descriptors: 64 readable bytes, then 128 writable ones.
    let mut r = Ring::new(0x1040);
    r.desc(desc, 0, A + 0x1000, 64, NEXT, 1);
    r.desc(desc, 1, A + 0x2000, 128, W, 0);
    r.put(avail + 2, &1u16.to_le_bytes());
    r.put(avail + 4, &0u16.to_le_bytes());
    for i in 0..64 {
        r.mem[0x1000 + i] = i as u8;
    }
    write(
        "chain_walker",
        "two-descriptor-chain",
        &r.input(4, 0, rings, [0, 0], 0xffff_ffff),
    );

    // An indirect table of three descriptors (two readable, one writable, in region B).
    let mut r = Ring::new(0x900);
    r.desc(desc, 3, A + 0x800, 48, IND, 0);
    r.desc(0x800, 0, A + 0x400, 16, NEXT, 1);
    r.desc(0x800, 1, A + 0x410, 16, NEXT, 2);
    r.desc(0x800, 2, 0x20000, 0x100, W, 0);
    r.put(avail + 2, &1u16.to_le_bytes());
    r.put(avail + 4, &3u16.to_le_bytes());
    write(
        "chain_walker",
        "indirect-chain",
        &r.input(4, 2, rings, [0, 0], 0x0001_0009),
    );

    // EVENT_IDX, resumed just before the index wraps: two chains in slots 14 and 15.
    let mut r = Ring::new(0x300);
    r.desc(desc, 0, A + 0x1000, 32, 0, 0);
    r.desc(desc, 1, A + 0x1100, 32, W, 0);
    r.put(avail + 2, &0u16.to_le_bytes());
    r.put(avail + 4 + 2 * 14, &0u16.to_le_bytes());
    r.put(avail + 4 + 2 * 15, &1u16.to_le_bytes());
    r.put(avail + 4 + 2 * 16, &0xfffeu16.to_le_bytes()); // used_event
    write(
        "chain_walker",
        "event-idx-wrap",
        &r.input(4, 1 | 8, rings, [0xfffe, 0xfffe], 0x5555_aaaa),
    );

    // A descriptor that runs off the end of region A into region B (refused).
    let mut r = Ring::new(0x110);
    r.desc(desc, 0, 0x1ff80, 0x100, 0, 0);
    r.put(avail + 2, &1u16.to_le_bytes());
    write(
        "chain_walker",
        "across-regions",
        &r.input(4, 0, rings, [0, 0], 0),
    );
}

fn state_blob() {
    let mut st = DeviceState {
        format: DEVICE_STATE_FORMAT.into(),
        version: DEVICE_STATE_VERSION,
        uuid: UUID,
        parent: "dp0".into(),
        device_type: "net-loopback".into(),
        attrs: vec![],
        features: f::VERSION_1 | f::NET_F_MAC | f::RING_EVENT_IDX,
        status: 1 | 2 | 8,
        // The config of `profile::build("net-loopback", &[], 0)`: MAC 52:54:00:00:00:00,
        // link up, one queue pair, MTU 1500.
        config: vec![0x52, 0x54, 0, 0, 0, 0, 1, 0, 1, 0, 0xdc, 0x05],
        queues: vec![
            (
                0,
                VqState::Split {
                    avail_index: 12,
                    used_index: 12,
                },
            ),
            (1, VqState::default()),
            (2, VqState::default()),
        ],
        stats: DeviceStats {
            queues: vec![QueueStats {
                packets: 12,
                bytes: 720,
                ..Default::default()
            }],
        },
        checksum: 0,
    };
    st.checksum = st.compute_checksum();
    write(
        "state_blob",
        "saved-device",
        &serde_json::to_vec(&st).unwrap(),
    );
    write(
        "state_blob",
        "saved-device-pretty",
        &serde_json::to_vec_pretty(&st).unwrap(),
    );
    st.queues.clear();
    st.stats = DeviceStats::default();
    st.status = 0;
    st.features = 0;
    st.checksum = st.compute_checksum();
    write(
        "state_blob",
        "fresh-device",
        &serde_json::to_vec(&st).unwrap(),
    );
}

fn main() {
    proto_frames();
    control_model();
    chain_walker();
    state_blob();
}
