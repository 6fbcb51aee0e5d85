//! The control state machine: a `DeviceModel` of a net-loopback profile driven by an
//! arbitrary sequence of driver requests (with real eventfds and sealed memfds, or none),
//! datapath outcomes (attach failures, detach positions, device failures, migrations) and
//! state loads. After every step the invariants the model promises are checked:
//!
//! * the status byte only holds bits in the virtio order (DRIVER_OK ⇒ FEATURES_OK ⇒ DRIVER
//!   ⇒ ACKNOWLEDGE), and FEATURES_OK only with features offered and VERSION_1 accepted;
//! * an attached device is DRIVER_OK, neither suspended, FAILED nor NEEDS_RESET;
//! * `Step::Attach` comes only for a detached device past FEATURES_OK, not FAILED or
//!   NEEDS_RESET, and its spec is sound: every ready queue's rings lie inside one region,
//!   aligned, sized by a power of two up to the maximum, with no more buffers in flight
//!   than the ring holds, and the fds match the spec;
//! * `Step::Detach` comes only for an attached device;
//! * a reset leaves status 0, no features and no ready queue; getters agree with setters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::os::fd::OwnedFd;
use vmdev_control::model::{DeviceModel, Step};
use vmdev_control::profile;
use vmdev_fuzz::model_ops::{event, memfd, qsize, queue, vq_state, Input, Op, BASE};
use vmdev_proto::datapath::AttachSpec;
use vmdev_proto::transport::{Reply, Request, VqState};
use vmdev_proto::virtio::{features, status as st};
use vmdev_shm_ring::{PackedLayout, SplitLayout};

/// Guest address where most regions and rings are placed.

struct Harness {
    m: DeviceModel,
    attaches: u32,
    attach_failures: u32,
    advance: u16,
    /// Queue positions of the current attachment (what a detach reports back).
    running: Vec<(u16, VqState)>,
}

fn value(r: Reply) -> u64 {
    match r {
        Reply::Value(v) => v,
        other => panic!("expected a value, got {other:?}"),
    }
}

impl Harness {
    fn get(&mut self, req: Request) -> Reply {
        match self.m.handle(req.clone(), vec![]) {
            Step::Reply(r) => r,
            other => panic!("{req:?} (a getter) returned {other:?}"),
        }
    }

    fn driver_features(&mut self) -> u64 {
        value(self.get(Request::GetDriverFeatures))
    }

    fn queue_ready(&mut self, q: u16) -> bool {
        value(self.get(Request::GetQueueReady { queue: q })) != 0
    }

    fn detach_states(&self) -> Vec<(u16, VqState)> {
        self.running
            .iter()
            .map(|&(i, s)| match s {
                VqState::Split {
                    avail_index,
                    used_index,
                } => (
                    i,
                    VqState::Split {
                        avail_index: avail_index.wrapping_add(self.advance),
                        used_index: used_index.wrapping_add(self.advance),
                    },
                ),
                packed => (i, packed),
            })
            .collect()
    }

    /// Checks an attach spec and returns whether the (simulated) datapath accepts it.
    fn check_attach(&mut self, spec: &AttachSpec) -> bool {
        let m = &self.m;
        let p = m.profile();
        let s = m.status();
        assert!(!m.is_attached(), "attach of an attached device");
        assert!(
            s & st::FEATURES_OK != 0,
            "attach before FEATURES_OK (status {s:#x})"
        );
        assert_eq!(
            s & (st::FAILED | st::NEEDS_RESET),
            0,
            "attach of a FAILED or NEEDS_RESET device (status {s:#x})"
        );
        assert_eq!(spec.features & !p.offered, 0, "features not offered");
        assert_eq!(spec.num_queues, p.num_queues);
        for (i, a) in spec.regions.iter().enumerate() {
            assert!(a.size > 0 && a.guest_addr.checked_add(a.size).is_some());
            for b in &spec.regions[i + 1..] {
                assert!(
                    a.guest_addr + a.size <= b.guest_addr || b.guest_addr + b.size <= a.guest_addr,
                    "overlapping regions {a:?} {b:?}"
                );
            }
        }
        let inside = |addr: u64, len: u64| {
            spec.regions.iter().any(|r| {
                addr >= r.guest_addr
                    && addr
                        .checked_add(len)
                        .is_some_and(|e| e <= r.guest_addr + r.size)
            })
        };
        let packed = spec.features & features::RING_PACKED != 0;
        let mut seen = vec![false; p.num_queues as usize];
        let mut areas: Vec<(u64, u64)> = Vec::new();
        for q in &spec.queues {
            assert!(q.index < p.num_queues, "queue {} out of range", q.index);
            assert!(!seen[q.index as usize], "queue {} twice", q.index);
            seen[q.index as usize] = true;
            assert!(
                q.size > 0 && q.size <= p.max_queue_size && (packed || q.size.is_power_of_two()),
                "queue {} size {}",
                q.index,
                q.size
            );
            // The areas and alignments the datapath's rings require (virtio 1.x 2.7, 2.8).
            let rings = if packed {
                let l = PackedLayout::new(q.size);
                [
                    (q.desc, l.desc_len, 16),
                    (q.driver, l.driver_event_len, 4),
                    (q.device, l.device_event_len, 4),
                ]
            } else {
                let l = SplitLayout::new(q.size);
                [
                    (q.desc, l.desc_len, 16),
                    (q.driver, l.avail_len, 2),
                    (q.device, l.used_len, 4),
                ]
            };
            for (a, len, align) in rings {
                assert_eq!(
                    a % align,
                    0,
                    "queue {} ring {a:#x} not {align}-byte aligned (packed: {packed})",
                    q.index
                );
                assert!(
                    inside(a, len),
                    "queue {} ring {a:#x}+{len} outside the regions {:?}",
                    q.index,
                    spec.regions
                );
                assert!(
                    !areas.iter().any(|&(s, e)| a < e && s < a + len),
                    "queue {} ring {a:#x}+{len} overlaps another ring",
                    q.index
                );
                areas.push((a, a + len));
            }
            assert!(q.has_kick, "queue {} without a kick eventfd", q.index);
            match q.state {
                VqState::Split {
                    avail_index,
                    used_index,
                } => {
                    assert!(
                        !packed,
                        "queue {}: a split-ring state on a packed ring",
                        q.index
                    );
                    assert!(
                        avail_index.wrapping_sub(used_index) <= q.size,
                        "queue {} of size {} attached with {:?}: more buffers in flight than the ring holds",
                        q.index,
                        q.size,
                        q.state
                    );
                }
                VqState::Packed {
                    avail_index,
                    used_index,
                    ..
                } => {
                    assert!(
                        packed,
                        "queue {}: a packed-ring state on a split ring",
                        q.index
                    );
                    assert!(
                        avail_index < q.size && used_index < q.size,
                        "queue {} of size {} attached with {:?}: positions outside the ring",
                        q.index,
                        q.size,
                        q.state
                    );
                }
            }
        }
        for r in &p.required_queues {
            assert!(seen[*r as usize], "required queue {r} missing");
        }
        let nfds = spec.regions.len()
            + spec
                .queues
                .iter()
                .map(|q| q.has_kick as usize + q.has_call as usize)
                .sum::<usize>()
            + spec.dirty_log as usize;
        assert_eq!(m.attach_fds().len(), nfds, "fds do not match the spec");
        let ok = self.attach_failures & (1 << (self.attaches % 32)) == 0;
        self.attaches += 1;
        if ok {
            self.running = spec.queues.iter().map(|q| (q.index, q.state)).collect();
        }
        ok
    }

    /// Runs a request through the model and carries out its step as the daemon does.
    fn drive(&mut self, req: Request, fds: Vec<OwnedFd>) -> Reply {
        let was_attached = self.m.is_attached();
        match self.m.handle(req, fds) {
            Step::Reply(r) => r,
            Step::Attach(spec) => {
                let ok = self.check_attach(&spec);
                let r = if ok {
                    self.m.attach_done(Ok(()))
                } else {
                    self.m.attach_done(Err(vmdev_proto::WireError::new(
                        vmdev_proto::ErrorCode::Datapath,
                        "fuzz: attach refused",
                    )))
                };
                assert_eq!(self.m.is_attached(), ok);
                r
            }
            Step::Detach(r) => {
                assert!(was_attached, "detach of a device that is not attached");
                let states = self.detach_states();
                self.m.detached(&states);
                assert!(!self.m.is_attached());
                r
            }
        }
    }

    fn invariants(&mut self) {
        let s = self.m.status();
        assert_eq!(value(self.get(Request::GetStatus)), s as u64);
        for (bit, pre, what) in [
            (
                st::DRIVER_OK,
                st::FEATURES_OK,
                "DRIVER_OK without FEATURES_OK",
            ),
            (st::FEATURES_OK, st::DRIVER, "FEATURES_OK without DRIVER"),
            (st::DRIVER, st::ACKNOWLEDGE, "DRIVER without ACKNOWLEDGE"),
        ] {
            assert!(s & bit == 0 || s & pre != 0, "{what}: status {s:#x}");
        }
        if s & st::FEATURES_OK != 0 {
            let f = self.driver_features();
            let offered = self.m.profile().offered;
            assert_eq!(f & !offered, 0, "FEATURES_OK with features not offered");
            assert_ne!(
                f & features::VERSION_1,
                0,
                "FEATURES_OK without VERSION_1 (features {f:#x})"
            );
        }
        if self.m.is_attached() {
            assert_ne!(s & st::DRIVER_OK, 0, "attached without DRIVER_OK");
            assert_eq!(
                s & (st::FAILED | st::NEEDS_RESET),
                0,
                "attached while FAILED or NEEDS_RESET (status {s:#x})"
            );
            assert!(!self.m.is_suspended(), "attached while suspended");
        }
    }

    fn after_reset(&mut self) {
        assert_eq!(self.m.status(), 0, "reset left status");
        assert_eq!(self.driver_features(), 0, "reset left features");
        assert!(!self.m.is_attached() && !self.m.is_suspended());
        for q in 0..self.m.profile().num_queues {
            assert!(!self.queue_ready(q), "reset left queue {q} ready");
        }
    }

    fn op(&mut self, op: Op) {
        let offered = self.m.profile().offered;
        let max = self.m.profile().max_queue_size;
        match op {
            Op::GetDeviceId => drop(self.get(Request::GetDeviceId)),
            Op::GetVendorId => drop(self.get(Request::GetVendorId)),
            Op::GetDeviceFeatures => {
                assert_eq!(value(self.get(Request::GetDeviceFeatures)), offered)
            }
            Op::GetDriverFeatures => drop(self.driver_features()),
            Op::GetStatus => drop(self.get(Request::GetStatus)),
            Op::GetConfigSize => {
                let n = self.m.profile().config.len() as u64;
                assert_eq!(value(self.get(Request::GetConfigSize)), n)
            }
            Op::GetConfigGeneration => drop(self.get(Request::GetConfigGeneration)),
            Op::GetNumQueues => drop(self.get(Request::GetNumQueues)),
            Op::ReadConfig { offset, len } => self.read_config(offset, len),
            Op::ReadConfigSmall { offset, len } => {
                self.read_config((offset % 16) as u32, (len % 16) as u32)
            }
            Op::WriteConfig { offset, data } => {
                let before = self.m.profile().config.clone();
                self.drive(Request::WriteConfig { offset, data }, vec![]);
                assert_eq!(self.m.profile().config, before, "config changed");
            }
            Op::SetDriverFeatures(f) => drop(self.drive(Request::SetDriverFeatures(f), vec![])),
            Op::AcceptFeatures(mask) => drop(self.drive(
                Request::SetDriverFeatures((offered & mask) | features::VERSION_1),
                vec![],
            )),
            Op::SetStatus(s) => self.set_status(s),
            Op::AddStatus(bits) => self.set_status(self.m.status() | bits),
            Op::NextStatus => {
                let s = self.m.status();
                let next = [st::ACKNOWLEDGE, st::DRIVER, st::FEATURES_OK, st::DRIVER_OK]
                    .into_iter()
                    .find(|b| s & b == 0)
                    .unwrap_or(0);
                self.set_status(s | next)
            }
            Op::Reset => {
                self.drive(Request::Reset, vec![]);
                self.after_reset();
            }
            Op::Suspend => drop(self.drive(Request::Suspend, vec![])),
            Op::Resume => drop(self.drive(Request::Resume, vec![])),
            Op::GetQueueMaxSize { queue: q } => {
                if let Reply::Value(v) = self.get(Request::GetQueueMaxSize { queue: queue(q) }) {
                    assert_eq!(v, max as u64);
                }
            }
            Op::GetQueueState { queue: q } => {
                drop(self.get(Request::GetQueueState { queue: queue(q) }))
            }
            Op::SetQueueState {
                queue: q,
                avail,
                used,
                kind,
            } => {
                let q = queue(q);
                let state = vq_state(kind, avail, used);
                if self.drive(Request::SetQueueState { queue: q, state }, vec![]) == Reply::Ok {
                    assert_eq!(
                        self.get(Request::GetQueueState { queue: q }),
                        Reply::QueueState(state)
                    );
                }
            }
            Op::GetQueueReady { queue: q } => {
                drop(self.get(Request::GetQueueReady { queue: queue(q) }))
            }
            Op::SetQueueSize { queue: q, size } => drop(self.drive(
                Request::SetQueueSize {
                    queue: queue(q),
                    size: qsize(size),
                },
                vec![],
            )),
            Op::SetQueueAddress {
                queue: q,
                desc,
                driver,
                device,
            } => drop(self.drive(
                Request::SetQueueAddress {
                    queue: queue(q),
                    desc: desc.get(),
                    driver: driver.get(),
                    device: device.get(),
                },
                vec![],
            )),
            Op::PlaceQueue { queue: q, slot } => {
                let (d, a, u, _) = SplitLayout::new(max).packed_offsets();
                let base = BASE + (slot % 8) as u64 * 0x3000;
                drop(self.drive(
                    Request::SetQueueAddress {
                        queue: queue(q),
                        desc: base + d,
                        driver: base + a,
                        device: base + u,
                    },
                    vec![],
                ))
            }
            Op::SetQueueReady { queue: q, ready } => {
                let q = queue(q);
                if self.drive(Request::SetQueueReady { queue: q, ready }, vec![]) == Reply::Ok {
                    assert_eq!(self.queue_ready(q), ready);
                }
            }
            Op::SetQueueKick { queue: q, fd } => {
                drop(self.drive(Request::SetQueueKick { queue: queue(q) }, event(fd)))
            }
            Op::SetQueueCall { queue: q, fd } => {
                drop(self.drive(Request::SetQueueCall { queue: queue(q) }, event(fd)))
            }
            Op::SetConfigNotify { fd } => drop(self.drive(Request::SetConfigNotify, event(fd))),
            Op::AddMemRegion {
                guest_addr,
                size,
                offset,
                fd,
            } => drop(self.drive(
                Request::AddMemRegion {
                    guest_addr: guest_addr.get(),
                    size: size.get(),
                    offset: offset.get(),
                },
                fd.make(),
            )),
            Op::AddDefaultRegion => drop(self.drive(
                Request::AddMemRegion {
                    guest_addr: BASE,
                    size: 0x10000,
                    offset: 0,
                },
                vec![memfd(16, true)],
            )),
            Op::RemoveMemRegion { guest_addr } => drop(self.drive(
                Request::RemoveMemRegion {
                    guest_addr: guest_addr.get(),
                },
                vec![],
            )),
            Op::SaveState => self.not_a_device_op(Request::SaveState),
            Op::LoadStateRequest(b) => self.not_a_device_op(Request::LoadState(b)),
            Op::ListTypes => self.not_a_device_op(Request::ListTypes),
            Op::LoadState {
                features: f,
                status,
                queues,
            } => {
                let queues: Vec<(u16, VqState)> = queues
                    .into_iter()
                    .map(|(q, a, u, kind)| (queue(q), vq_state(kind, a, u)))
                    .collect();
                let fresh = self.m.status() == 0;
                let r = self.m.load_state(f, status, &queues);
                if !fresh {
                    assert!(r.is_err(), "state loaded into a device that is not reset");
                }
            }
            Op::SetDirtyLog(pages) => {
                let _ = self.m.set_dirty_log(pages.map(|n| memfd(n, true)));
            }
            Op::DeviceFailed => {
                let had_driver_ok = self.m.status() & st::DRIVER_OK != 0;
                let _ = self.m.device_failed();
                assert!(!self.m.is_attached());
                if had_driver_ok {
                    assert_ne!(self.m.status() & st::NEEDS_RESET, 0);
                }
            }
            Op::Migrate { advance, fail } => {
                if !self.m.is_attached() {
                    return;
                }
                self.advance = self.advance.wrapping_add(advance as u16);
                let states = self.detach_states();
                self.m.detached(&states);
                match self.m.reattach_spec() {
                    None => panic!("a detached running device has no reattach spec"),
                    Some(Err(_)) => {}
                    Some(Ok(spec)) => {
                        // The same checks as a first attach; `fail` keeps it detached.
                        let saved = self.attach_failures;
                        if fail {
                            self.attach_failures = u32::MAX;
                        }
                        let ok = self.check_attach(&spec);
                        self.attach_failures = saved;
                        if ok {
                            self.m.reattached();
                        }
                    }
                }
            }
            Op::Release => {
                if self.m.is_attached() {
                    let states = self.detach_states();
                    self.m.detached(&states);
                }
                self.m.release();
                self.after_reset();
            }
        }
    }

    fn read_config(&mut self, offset: u32, len: u32) {
        let config = self.m.profile().config.clone();
        if let Reply::Config(b) = self.get(Request::ReadConfig { offset, len }) {
            let o = offset as usize;
            assert_eq!(b.as_slice(), &config[o..o + len as usize]);
        }
    }

    fn set_status(&mut self, s: u8) {
        self.drive(Request::SetStatus(s), vec![]);
        if s == 0 {
            self.after_reset();
        }
    }

    fn not_a_device_op(&mut self, req: Request) {
        let status = self.m.status();
        match self.drive(req, vec![]) {
            Reply::Error(_) => {}
            other => panic!("a management request answered {other:?}"),
        }
        assert_eq!(self.m.status(), status);
    }
}

fuzz_target!(|input: Input| {
    let pairs = (input.pairs % 3 + 1).to_string();
    let qsize = (1u32 << (input.queue_size % 9)).to_string();
    let attrs = vec![
        ("queue-pairs".to_string(), pairs),
        ("queue-size".to_string(), qsize),
    ];
    let profile = profile::build(profile::NET_LOOPBACK, &attrs, 0).expect("profile");
    let mut m = DeviceModel::new(profile);
    if input.trusted {
        m = m.trust_unsealed_memory();
    }
    let mut h = Harness {
        m,
        attaches: 0,
        attach_failures: input.attach_failures,
        advance: input.advance as u16,
        running: Vec::new(),
    };
    for op in input.ops.into_iter().take(256) {
        h.op(op);
        h.invariants();
    }
});
