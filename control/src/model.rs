//! The device model: one virtio device as its driver sees it, as a sans-IO state machine.
//!
//! A driver request goes in ([`DeviceModel::handle`]); a [`Step`] comes out: a reply to
//! send, or an action the daemon must carry out on the datapath first (attach at
//! DRIVER_OK, detach at reset) and report back. The model enforces the virtio status
//! sequence, feature negotiation, and that queues and memory are only set up before
//! DRIVER_OK. It never touches a ring: it only checks that ring addresses lie inside the
//! driver's memory.

use crate::profile::DeviceProfile;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use vmdev_proto::datapath::{AttachSpec, QueueSpec, RegionSpec};
use vmdev_proto::transport::{Reply, Request, VqState};
use vmdev_proto::virtio::{features, status as st};
use vmdev_proto::{ErrorCode, WireError};
use vmdev_shm_ring::memory::{check_memfd, check_region_shape, SealPolicy, MAX_REGIONS};
use vmdev_shm_ring::{PackedLayout, SplitLayout};

/// What the daemon must do with the outcome of a request.
#[derive(Debug)]
pub enum Step {
    /// Send this reply.
    Reply(Reply),
    /// DRIVER_OK passed validation: attach the device to its datapath with this spec and
    /// the fds of [`DeviceModel::attach_fds`], then call [`DeviceModel::attach_done`].
    Attach(AttachSpec),
    /// The device must leave the datapath (reset or FAILED): detach it, call
    /// [`DeviceModel::detached`], then send the reply.
    Detach(Reply),
}

#[derive(Debug, Default)]
struct Queue {
    size: Option<u16>,
    desc: Option<u64>,
    driver: Option<u64>,
    device: Option<u64>,
    ready: bool,
    state: VqState,
    kick: Option<OwnedFd>,
    call: Option<OwnedFd>,
}

#[derive(Debug)]
struct Region {
    spec: RegionSpec,
    fd: OwnedFd,
}

/// One device's transport-visible state.
#[derive(Debug)]
pub struct DeviceModel {
    profile: DeviceProfile,
    status: u8,
    driver_features: u64,
    config_generation: u32,
    queues: Vec<Queue>,
    regions: Vec<Region>,
    config_notify: Option<OwnedFd>,
    attached: bool,
    suspended: bool,
    dirty_log: Option<OwnedFd>,
    seal_policy: SealPolicy,
}

fn err(code: ErrorCode, msg: impl Into<String>) -> Step {
    Step::Reply(Reply::Error(WireError::new(code, msg)))
}

fn ok() -> Step {
    Step::Reply(Reply::Ok)
}

fn value(v: impl Into<u64>) -> Step {
    Step::Reply(Reply::Value(v.into()))
}

/// Names the set bits of a status byte, for messages.
pub fn status_name(s: u8) -> String {
    let names = [
        (st::ACKNOWLEDGE, "ACKNOWLEDGE"),
        (st::DRIVER, "DRIVER"),
        (st::FEATURES_OK, "FEATURES_OK"),
        (st::DRIVER_OK, "DRIVER_OK"),
        (st::NEEDS_RESET, "NEEDS_RESET"),
        (st::FAILED, "FAILED"),
    ];
    let v: Vec<&str> = names
        .iter()
        .filter(|(b, _)| s & b != 0)
        .map(|(_, n)| *n)
        .collect();
    if v.is_empty() {
        "0".into()
    } else {
        v.join("|")
    }
}

impl DeviceModel {
    /// A freshly reset device of the given profile.
    pub fn new(profile: DeviceProfile) -> Self {
        let queues = (0..profile.num_queues).map(|_| Queue::default()).collect();
        DeviceModel {
            profile,
            status: 0,
            driver_features: 0,
            config_generation: 0,
            queues,
            regions: Vec::new(),
            config_notify: None,
            attached: false,
            suspended: false,
            dirty_log: None,
            seal_policy: SealPolicy::Required,
        }
    }

    /// Accepts memory that is not sealed against shrinking (a trusted vhost-user front end).
    pub fn trust_unsealed_memory(mut self) -> Self {
        self.seal_policy = SealPolicy::Trusted;
        self
    }

    /// The device's profile.
    pub fn profile(&self) -> &DeviceProfile {
        &self.profile
    }

    /// Current status byte.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// What a state blob records of the model: features, status, config, queue positions.
    pub fn state_parts(&self) -> (u64, u8, Vec<u8>, Vec<(u16, VqState)>) {
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| (i as u16, q.state))
            .collect();
        (
            self.driver_features,
            self.status,
            self.profile.config.clone(),
            queues,
        )
    }

    /// Loads saved features and queue positions into a freshly reset device, taking the
    /// status up to FEATURES_OK; the driver then sets up its rings and DRIVER_OK.
    pub fn load_state(
        &mut self,
        features: u64,
        status: u8,
        queues: &[(u16, VqState)],
    ) -> Result<(), WireError> {
        if self.status != 0 {
            return Err(WireError::new(
                ErrorCode::BadState,
                "load state into a freshly reset device",
            ));
        }
        if features & !self.profile.offered != 0 {
            return Err(WireError::new(
                ErrorCode::BadFeatures,
                format!("saved features {features:#x} are not all offered here"),
            ));
        }
        // The saved status must be a prefix of the sequence, and a FEATURES_OK one needs
        // features the device could have accepted (found by fuzzing).
        let status = status & (st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK);
        if ![
            0,
            st::ACKNOWLEDGE,
            st::ACKNOWLEDGE | st::DRIVER,
            st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK,
        ]
        .contains(&status)
        {
            return Err(WireError::new(
                ErrorCode::BadState,
                format!("saved status {} is out of order", status_name(status)),
            ));
        }
        if status & st::FEATURES_OK != 0 && features & features::VERSION_1 == 0 {
            return Err(WireError::new(
                ErrorCode::BadFeatures,
                "saved features lack VERSION_1",
            ));
        }
        let packed = features & features::RING_PACKED != 0;
        for &(i, st) in queues {
            self.queue_index(i).map_err(|_| {
                WireError::new(
                    ErrorCode::BadQueue,
                    format!("saved queue {i} does not exist here"),
                )
            })?;
            if matches!(st, VqState::Packed { .. }) != packed {
                return Err(WireError::new(
                    ErrorCode::BadQueue,
                    format!("saved queue {i}: {st:?} does not match the saved ring kind"),
                ));
            }
        }
        self.driver_features = features;
        self.status = status;
        for &(i, state) in queues {
            self.queues[i as usize].state = state;
        }
        Ok(())
    }

    /// Starts (with a bitmap memfd) or stops dirty logging; checks that the bitmap covers
    /// every region. Returns the fd to hand to a running datapath.
    pub fn set_dirty_log(
        &mut self,
        fd: Option<OwnedFd>,
    ) -> Result<Option<BorrowedFd<'_>>, WireError> {
        if let Some(fd) = &fd {
            let mut sizes: Vec<(u64, u64)> = self
                .regions
                .iter()
                .map(|r| (r.spec.guest_addr, r.spec.size))
                .collect();
            sizes.sort();
            let need = vmdev_shm_ring::dirty::bitmap_len(sizes.iter().map(|s| s.1));
            if need == 0 {
                return Err(WireError::new(
                    ErrorCode::BadState,
                    "add memory regions before logging",
                ));
            }
            check_memfd(fd.as_fd(), 0, need, SealPolicy::Required).map_err(|e| {
                WireError::new(
                    ErrorCode::BadMemory,
                    format!("dirty bitmap: {e} ({need} bytes needed)"),
                )
            })?;
        }
        self.dirty_log = fd;
        Ok(self.dirty_log.as_ref().map(|f| f.as_fd()))
    }

    /// A state whose avail index is more than the queue size ahead of its used index.
    fn state_beyond_ring(&self, queue: u16, state: VqState) -> bool {
        let size = self
            .queues
            .get(queue as usize)
            .and_then(|q| q.size)
            .unwrap_or(self.profile.max_queue_size);
        match state {
            VqState::Split {
                avail_index,
                used_index,
            } => avail_index.wrapping_sub(used_index) > size,
            // Positions are ring slots: both must lie inside the ring.
            VqState::Packed {
                avail_index,
                used_index,
                ..
            } => avail_index >= size || used_index >= size,
        }
    }

    /// Whether a queue state is of the ring kind the driver negotiated (packed or split).
    fn state_fits(&self, state: VqState) -> bool {
        matches!(state, VqState::Packed { .. }) == self.packed()
    }

    /// Whether the driver negotiated packed rings.
    fn packed(&self) -> bool {
        self.driver_features & features::RING_PACKED != 0
    }

    /// Whether the driver suspended the device.
    pub fn is_suspended(&self) -> bool {
        self.suspended
    }

    /// Whether the datapath is servicing the device.
    pub fn is_attached(&self) -> bool {
        self.attached
    }

    /// Handles one driver request (management requests are the daemon's business).
    pub fn handle(&mut self, req: Request, mut fds: Vec<OwnedFd>) -> Step {
        let p = &self.profile;
        match req {
            Request::GetDeviceId => value(p.device_id),
            Request::GetVendorId => value(p.vendor_id),
            Request::GetDeviceFeatures => value(p.offered),
            Request::GetDriverFeatures => value(self.driver_features),
            Request::GetStatus => value(self.status),
            Request::GetConfigSize => value(p.config.len() as u64),
            Request::GetConfigGeneration => value(self.config_generation),
            Request::GetNumQueues => value(p.num_queues),
            Request::ReadConfig { offset, len } => {
                let (o, l) = (offset as usize, len as usize);
                match o.checked_add(l).and_then(|end| p.config.get(o..end)) {
                    Some(b) => Step::Reply(Reply::Config(b.to_vec())),
                    None => err(
                        ErrorCode::BadArgument,
                        format!(
                            "config read {offset}+{len} is outside the {}-byte config space",
                            p.config.len()
                        ),
                    ),
                }
            }
            Request::WriteConfig { .. } => err(
                ErrorCode::BadArgument,
                format!("the {} config space is read-only", p.type_name),
            ),
            Request::SetDriverFeatures(f) => {
                if self.status & st::DRIVER == 0 || self.status & st::FEATURES_OK != 0 {
                    return err(
                        ErrorCode::BadState,
                        format!(
                            "driver features may only be set after DRIVER and before FEATURES_OK (status is {})",
                            status_name(self.status)
                        ),
                    );
                }
                self.driver_features = f;
                ok()
            }
            Request::SetStatus(0) | Request::Reset => self.reset(),
            Request::Suspend => {
                if self.status & st::DRIVER_OK == 0 {
                    return err(
                        ErrorCode::BadState,
                        "only a running device (DRIVER_OK) can be suspended",
                    );
                }
                let was = std::mem::replace(&mut self.suspended, true);
                if !was && self.attached {
                    Step::Detach(Reply::Ok)
                } else {
                    ok()
                }
            }
            Request::Resume => {
                if !std::mem::replace(&mut self.suspended, false) {
                    return ok();
                }
                match self.attach_spec() {
                    // A device the driver gave up on (FAILED) or that needs a reset stays put.
                    Ok(spec) if self.status & (st::NEEDS_RESET | st::FAILED) == 0 => {
                        Step::Attach(spec)
                    }
                    Ok(_) => ok(),
                    Err(e) => Step::Reply(Reply::Error(e)),
                }
            }
            Request::SetStatus(s) => self.set_status(s),
            Request::GetQueueMaxSize { queue } => match self.queue_index(queue) {
                Ok(_) => value(self.profile.max_queue_size),
                Err(e) => e,
            },
            Request::GetQueueState { queue } => match self.queue_index(queue) {
                Ok(i) => Step::Reply(Reply::QueueState(self.queues[i].state)),
                Err(e) => e,
            },
            Request::SetQueueState { queue, state } if self.state_beyond_ring(queue, state) => err(
                ErrorCode::BadQueue,
                format!("queue {queue}: {state:?} has more buffers in flight than the ring holds"),
            ),
            Request::SetQueueState { queue, state } if !self.state_fits(state) => err(
                ErrorCode::BadQueue,
                format!(
                    "queue {queue}: {state:?} is not a state of a {} ring",
                    if self.packed() { "packed" } else { "split" }
                ),
            ),
            Request::SetQueueState { queue, state } if self.suspended => {
                match self.queue_index(queue) {
                    Ok(i) => {
                        self.queues[i].state = state;
                        ok()
                    }
                    Err(e) => e,
                }
            }
            Request::SetQueueState { queue, state } => self.with_setup_queue(queue, |q, _| {
                q.state = state;
                ok()
            }),
            Request::GetQueueReady { queue } => match self.queue_index(queue) {
                Ok(i) => value(self.queues[i].ready as u8),
                Err(e) => e,
            },
            Request::SetQueueSize { queue, size } => {
                let packed = self.packed();
                self.with_setup_queue(queue, |q, max| {
                    // Packed rings may have any size; split rings need a power of two.
                    if size == 0 || (!packed && !size.is_power_of_two()) || size > max {
                        return err(
                            ErrorCode::BadQueue,
                            format!("queue size {size} is not a power of two in 1..={max}"),
                        );
                    }
                    q.size = Some(size);
                    ok()
                })
            }
            Request::SetQueueAddress {
                queue,
                desc,
                driver,
                device,
            } => self.with_setup_queue(queue, |q, _| {
                for (name, a, align) in [
                    ("descriptor table", desc, 16),
                    ("driver ring", driver, 2),
                    ("device ring", device, 4),
                ] {
                    if a % align != 0 {
                        return err(
                            ErrorCode::BadAddress,
                            format!("{name} address {a:#x} is not {align}-byte aligned"),
                        );
                    }
                }
                q.desc = Some(desc);
                q.driver = Some(driver);
                q.device = Some(device);
                ok()
            }),
            Request::SetQueueReady { queue, ready } => self.with_setup_queue(queue, |q, _| {
                q.ready = ready;
                ok()
            }),
            Request::SetQueueKick { queue } => {
                let Some(fd) = fds.pop() else {
                    return err(ErrorCode::MissingFd, "SetQueueKick needs an eventfd");
                };
                self.with_setup_queue(queue, |q, _| {
                    q.kick = Some(fd);
                    ok()
                })
            }
            Request::SetQueueCall { queue } => {
                let Some(fd) = fds.pop() else {
                    return err(ErrorCode::MissingFd, "SetQueueCall needs an eventfd");
                };
                self.with_setup_queue(queue, |q, _| {
                    q.call = Some(fd);
                    ok()
                })
            }
            Request::SetConfigNotify => {
                let Some(fd) = fds.pop() else {
                    return err(ErrorCode::MissingFd, "SetConfigNotify needs an eventfd");
                };
                self.config_notify = Some(fd);
                ok()
            }
            Request::AddMemRegion {
                guest_addr,
                size,
                offset,
            } => {
                let Some(fd) = fds.pop() else {
                    return err(ErrorCode::MissingFd, "AddMemRegion needs a memfd");
                };
                self.add_region(
                    RegionSpec {
                        guest_addr,
                        size,
                        offset,
                    },
                    fd,
                )
            }
            Request::RemoveMemRegion { guest_addr } => {
                if self.status & st::DRIVER_OK != 0 && !self.suspended {
                    return err(
                        ErrorCode::BadState,
                        "memory regions cannot change after DRIVER_OK (unless suspended)",
                    );
                }
                match self
                    .regions
                    .iter()
                    .position(|r| r.spec.guest_addr == guest_addr)
                {
                    Some(i) => {
                        self.regions.remove(i);
                        ok()
                    }
                    None => err(
                        ErrorCode::BadArgument,
                        format!("no region starts at {guest_addr:#x}"),
                    ),
                }
            }
            other => err(
                ErrorCode::BadState,
                format!("{other:?} is not a device operation"),
            ),
        }
    }

    fn queue_index(&self, queue: u16) -> Result<usize, Step> {
        if queue < self.profile.num_queues {
            Ok(queue as usize)
        } else {
            Err(err(
                ErrorCode::BadQueue,
                format!(
                    "queue {queue} does not exist (the device has {})",
                    self.profile.num_queues
                ),
            ))
        }
    }

    fn with_setup_queue(&mut self, queue: u16, f: impl FnOnce(&mut Queue, u16) -> Step) -> Step {
        let i = match self.queue_index(queue) {
            Ok(i) => i,
            Err(e) => return e,
        };
        if self.status & st::FEATURES_OK == 0
            || self.status & (st::DRIVER_OK | st::FAILED | st::NEEDS_RESET) != 0
        {
            return err(
                ErrorCode::BadState,
                format!(
                    "queues may only be set up after FEATURES_OK and before DRIVER_OK (status is {})",
                    status_name(self.status)
                ),
            );
        }
        let max = self.profile.max_queue_size;
        f(&mut self.queues[i], max)
    }

    fn add_region(&mut self, spec: RegionSpec, fd: OwnedFd) -> Step {
        if self.status & st::DRIVER_OK != 0 && !self.suspended {
            return err(
                ErrorCode::BadState,
                "memory regions cannot change after DRIVER_OK (unless suspended)",
            );
        }
        if self.regions.len() >= MAX_REGIONS {
            return err(
                ErrorCode::BadMemory,
                format!("at most {MAX_REGIONS} regions"),
            );
        }
        if let Err(e) = check_region_shape(spec.guest_addr, spec.size, spec.offset)
            .and_then(|_| check_memfd(fd.as_fd(), spec.offset, spec.size, self.seal_policy))
        {
            return err(ErrorCode::BadMemory, e.to_string());
        }
        let end = spec.guest_addr + spec.size;
        if self
            .regions
            .iter()
            .any(|r| spec.guest_addr < r.spec.guest_addr + r.spec.size && r.spec.guest_addr < end)
        {
            return err(
                ErrorCode::BadMemory,
                format!("region at {:#x} overlaps another", spec.guest_addr),
            );
        }
        self.regions.push(Region { spec, fd });
        ok()
    }

    fn reset(&mut self) -> Step {
        let was_attached = self.attached;
        self.status = 0;
        self.suspended = false;
        self.driver_features = 0;
        for q in &mut self.queues {
            *q = Queue::default();
        }
        if was_attached {
            Step::Detach(Reply::Ok)
        } else {
            ok()
        }
    }

    fn set_status(&mut self, s: u8) -> Step {
        let cur = self.status;
        if s & st::NEEDS_RESET != 0 && cur & st::NEEDS_RESET == 0 {
            return err(
                ErrorCode::BadState,
                "NEEDS_RESET is set by the device, not the driver",
            );
        }
        let lost = cur & !s & !st::NEEDS_RESET;
        if lost != 0 {
            return err(
                ErrorCode::BadState,
                format!(
                    "status may not go backwards from {} to {} (write 0 to reset)",
                    status_name(cur),
                    status_name(s)
                ),
            );
        }
        let added = s & !cur;
        if added & st::FAILED != 0 {
            // The driver gave up: FAILED is recorded, nothing else it wrote with it (a
            // DRIVER_OK riding along must not skip the status sequence; found by fuzzing).
            self.status = cur | st::FAILED;
            return if self.attached {
                Step::Detach(Reply::Ok)
            } else {
                ok()
            };
        }
        if cur & (st::FAILED | st::NEEDS_RESET) != 0 && added != 0 {
            return err(
                ErrorCode::BadState,
                format!(
                    "the device must be reset first (status is {})",
                    status_name(cur)
                ),
            );
        }
        let needs = [
            (st::DRIVER, st::ACKNOWLEDGE, "DRIVER needs ACKNOWLEDGE"),
            (st::FEATURES_OK, st::DRIVER, "FEATURES_OK needs DRIVER"),
            (
                st::DRIVER_OK,
                st::FEATURES_OK,
                "DRIVER_OK needs FEATURES_OK",
            ),
        ];
        for (bit, pre, msg) in needs {
            if added & bit != 0 && s & pre == 0 {
                return err(ErrorCode::BadState, msg);
            }
        }
        if added & st::FEATURES_OK != 0 {
            let extra = self.driver_features & !self.profile.offered;
            if extra != 0 {
                return err(
                    ErrorCode::BadFeatures,
                    format!(
                        "the driver accepted features {extra:#x} that the device does not offer"
                    ),
                );
            }
            if self.driver_features & features::VERSION_1 == 0 {
                return err(
                    ErrorCode::BadFeatures,
                    "VERSION_1 must be accepted: vmdev devices are virtio 1.x only",
                );
            }
            let fresh = VqState::fresh(self.packed());
            for q in &mut self.queues {
                q.state = fresh;
            }
        }
        if added & st::DRIVER_OK != 0 {
            return match self.attach_spec() {
                Ok(spec) => {
                    self.status = s & !st::DRIVER_OK;
                    Step::Attach(spec)
                }
                Err(e) => Step::Reply(Reply::Error(e)),
            };
        }
        self.status = s | (cur & st::NEEDS_RESET);
        ok()
    }

    fn ring_in_memory(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.regions
            .iter()
            .any(|r| addr >= r.spec.guest_addr && end <= r.spec.guest_addr + r.spec.size)
    }

    fn attach_spec(&self) -> Result<AttachSpec, WireError> {
        let mut queues = Vec::new();
        // (queue, ring name, start, end) of every ring, to refuse overlaps.
        let mut areas: Vec<(u16, &str, u64, u64)> = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            let index = i as u16;
            if !q.ready {
                if self.profile.required_queues.contains(&index) {
                    return Err(WireError::new(
                        ErrorCode::BadQueue,
                        format!("queue {index} is not ready"),
                    ));
                }
                continue;
            }
            let size = q.size.unwrap_or(self.profile.max_queue_size);
            let (Some(desc), Some(driver), Some(device)) = (q.desc, q.driver, q.device) else {
                return Err(WireError::new(
                    ErrorCode::BadAddress,
                    format!("queue {index} has no ring addresses"),
                ));
            };
            let lens = if self.packed() {
                let l = PackedLayout::new(size);
                [l.desc_len, l.driver_event_len, l.device_event_len]
            } else {
                let l = SplitLayout::new(size);
                [l.desc_len, l.avail_len, l.used_len]
            };
            for (name, a, len) in [
                ("descriptor table", desc, lens[0]),
                ("driver ring", driver, lens[1]),
                ("device ring", device, lens[2]),
            ] {
                if !self.ring_in_memory(a, len) {
                    return Err(WireError::new(
                        ErrorCode::BadAddress,
                        format!(
                            "queue {index}: {name} {a:#x}+{len} is outside the driver's memory"
                        ),
                    ));
                }
                // In memory, so a + len does not overflow.
                let end = a + len;
                if let Some((oq, oname, _, _)) =
                    areas.iter().find(|(_, _, s, e)| a < *e && *s < end)
                {
                    return Err(WireError::new(
                        ErrorCode::BadAddress,
                        format!("queue {index}: {name} at {a:#x} overlaps queue {oq}'s {oname}"),
                    ));
                }
                areas.push((index, name, a, end));
            }
            if q.kick.is_none() {
                return Err(WireError::new(
                    ErrorCode::MissingFd,
                    format!("queue {index} has no kick eventfd"),
                ));
            }
            queues.push(QueueSpec {
                index,
                size,
                desc,
                driver,
                device,
                state: q.state,
                has_kick: true,
                has_call: q.call.is_some(),
            });
        }
        Ok(AttachSpec {
            handle: 0,
            device_type: self.profile.type_name.clone(),
            features: self.driver_features,
            num_queues: self.profile.num_queues,
            trust_unsealed: self.seal_policy == SealPolicy::Trusted,
            dirty_log: self.dirty_log.is_some(),
            recover: false,
            regions: self.regions.iter().map(|r| r.spec).collect(),
            queues,
        })
    }

    /// Attaches a running device again (on another datapath) where its queues stopped:
    /// `None` unless the driver set DRIVER_OK and the device is currently detached.
    pub fn reattach_spec(&self) -> Option<Result<AttachSpec, WireError>> {
        (self.status & st::DRIVER_OK != 0
            && self.status & st::NEEDS_RESET == 0
            && !self.attached
            && !self.suspended)
            .then(|| self.attach_spec())
    }

    /// The device was attached again after [`DeviceModel::reattach_spec`].
    pub fn reattached(&mut self) {
        self.attached = true;
    }

    /// The fds that go with the [`AttachSpec`] of the last [`Step::Attach`], in wire order.
    pub fn attach_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut v: Vec<BorrowedFd<'_>> = self.regions.iter().map(|r| r.fd.as_fd()).collect();
        for q in self.queues.iter().filter(|q| q.ready) {
            v.extend(q.kick.as_ref().map(|f| f.as_fd()));
            v.extend(q.call.as_ref().map(|f| f.as_fd()));
        }
        v.extend(self.dirty_log.as_ref().map(|f| f.as_fd()));
        v
    }

    /// Outcome of the attach the model asked for; returns the reply for the driver.
    pub fn attach_done(&mut self, result: Result<(), WireError>) -> Reply {
        match result {
            Ok(()) => {
                self.status |= st::DRIVER_OK;
                self.attached = true;
                Reply::Ok
            }
            Err(e) => Reply::Error(e),
        }
    }

    /// The datapath no longer services the device (after a [`Step::Detach`]); `states`
    /// are where its queues stopped, kept for `GetQueueState` and the next attach.
    pub fn detached(&mut self, states: &[(u16, VqState)]) {
        self.attached = false;
        if self.status == 0 {
            return; // detached by a reset: the queues start afresh
        }
        for &(i, st) in states {
            if let Some(q) = self.queues.get_mut(i as usize) {
                q.state = st;
            }
        }
    }

    /// The datapath dropped the device because the driver broke a ring: sets NEEDS_RESET
    /// and returns the config eventfd to signal, if the driver gave one.
    pub fn device_failed(&mut self) -> Option<BorrowedFd<'_>> {
        self.attached = false;
        if self.status & st::DRIVER_OK != 0 {
            self.status |= st::NEEDS_RESET;
            self.config_generation = self.config_generation.wrapping_add(1);
        }
        self.config_notify.as_ref().map(|f| f.as_fd())
    }

    /// Forgets the driver entirely (it went away): status, queues, memory, eventfds.
    pub fn release(&mut self) {
        let policy = self.seal_policy;
        *self = DeviceModel::new(self.profile.clone());
        self.seal_policy = policy;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile;
    use std::os::fd::FromRawFd;
    use vmdev_shm_ring::create_sealed_memfd;

    fn model() -> DeviceModel {
        DeviceModel::new(profile::build(profile::NET_LOOPBACK, &[], 1).unwrap())
    }

    fn eventfd() -> OwnedFd {
        // SAFETY: eventfd returns a new fd or -1, checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: freshly created, owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn reply(s: Step) -> Reply {
        match s {
            Step::Reply(r) => r,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn code(s: Step) -> ErrorCode {
        match reply(s) {
            Reply::Error(e) => e.code,
            r => panic!("expected an error, got {r:?}"),
        }
    }

    fn negotiate(m: &mut DeviceModel) {
        assert_eq!(
            reply(m.handle(Request::SetStatus(st::ACKNOWLEDGE), vec![])),
            Reply::Ok
        );
        assert_eq!(
            reply(m.handle(Request::SetStatus(st::ACKNOWLEDGE | st::DRIVER), vec![])),
            Reply::Ok
        );
        assert_eq!(
            reply(m.handle(
                Request::SetDriverFeatures(features::VERSION_1 | features::NET_F_MAC),
                vec![]
            )),
            Reply::Ok
        );
        assert_eq!(
            reply(m.handle(
                Request::SetStatus(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK),
                vec![]
            )),
            Reply::Ok
        );
    }

    fn setup_queues(m: &mut DeviceModel, base: u64) {
        for q in 0..2u16 {
            let b = base + q as u64 * 0x4000;
            let r = |s| reply(s);
            assert_eq!(
                r(m.handle(Request::SetQueueSize { queue: q, size: 64 }, vec![])),
                Reply::Ok
            );
            assert_eq!(
                r(m.handle(
                    Request::SetQueueAddress {
                        queue: q,
                        desc: b,
                        driver: b + 0x1000,
                        device: b + 0x2000
                    },
                    vec![]
                )),
                Reply::Ok
            );
            assert_eq!(
                r(m.handle(Request::SetQueueKick { queue: q }, vec![eventfd()])),
                Reply::Ok
            );
            assert_eq!(
                r(m.handle(
                    Request::SetQueueReady {
                        queue: q,
                        ready: true
                    },
                    vec![]
                )),
                Reply::Ok
            );
        }
    }

    const ALL: u8 = st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK | st::DRIVER_OK;

    #[test]
    fn fuzz_findings_stay_fixed() {
        // A state blob's status out of order, or a ring state of the other kind: refused.
        let mut m = model();
        let e = m
            .load_state(features::VERSION_1, st::FEATURES_OK, &[])
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadState);
        assert_eq!(m.status(), 0);
        let packed = VqState::fresh(true);
        let e = m
            .load_state(
                features::VERSION_1,
                st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK,
                &[(0, packed)],
            )
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadQueue);
        negotiate(&mut m);
        assert_eq!(
            code(m.handle(
                Request::SetQueueState {
                    queue: 0,
                    state: packed
                },
                vec![]
            )),
            ErrorCode::BadQueue,
            "a packed state on a split ring"
        );
    }

    #[test]
    fn failed_written_with_other_bits_records_only_failed() {
        let mut m = model();
        let r = reply(m.handle(Request::SetStatus(st::FAILED | st::DRIVER_OK), vec![]));
        assert_eq!(r, Reply::Ok);
        assert_eq!(m.status(), st::FAILED, "no DRIVER_OK without the sequence");
        assert!(!m.is_attached());
    }

    #[test]
    fn status_sequence_is_enforced() {
        let mut m = model();
        assert_eq!(
            code(m.handle(Request::SetStatus(st::DRIVER), vec![])),
            ErrorCode::BadState
        );
        assert_eq!(
            code(m.handle(Request::SetStatus(st::NEEDS_RESET), vec![])),
            ErrorCode::BadState
        );
        assert_eq!(
            code(m.handle(Request::SetDriverFeatures(1), vec![])),
            ErrorCode::BadState
        );
        negotiate(&mut m);
        assert_eq!(
            code(m.handle(Request::SetStatus(st::ACKNOWLEDGE), vec![])),
            ErrorCode::BadState,
            "backwards"
        );
        assert_eq!(
            code(m.handle(Request::SetDriverFeatures(1), vec![])),
            ErrorCode::BadState,
            "after FEATURES_OK"
        );
        assert_eq!(
            code(m.handle(Request::SetStatus(ALL), vec![])),
            ErrorCode::BadQueue,
            "queues not ready"
        );
    }

    #[test]
    fn features_not_offered_are_refused_at_features_ok() {
        let mut m = model();
        reply(m.handle(Request::SetStatus(st::ACKNOWLEDGE | st::DRIVER), vec![]));
        reply(m.handle(
            Request::SetDriverFeatures(features::VERSION_1 | (1 << 63)),
            vec![],
        ));
        assert_eq!(
            code(m.handle(
                Request::SetStatus(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK),
                vec![]
            )),
            ErrorCode::BadFeatures
        );
        assert_eq!(m.status() & st::FEATURES_OK, 0);
        reply(m.handle(Request::SetDriverFeatures(features::NET_F_MAC), vec![]));
        assert_eq!(
            code(m.handle(
                Request::SetStatus(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK),
                vec![]
            )),
            ErrorCode::BadFeatures,
            "VERSION_1 is required"
        );
    }

    #[test]
    fn queue_setup_only_between_features_ok_and_driver_ok() {
        let mut m = model();
        assert_eq!(
            code(m.handle(Request::SetQueueSize { queue: 0, size: 64 }, vec![])),
            ErrorCode::BadState
        );
        negotiate(&mut m);
        assert_eq!(
            code(m.handle(
                Request::SetQueueSize {
                    queue: 0,
                    size: 100
                },
                vec![]
            )),
            ErrorCode::BadQueue
        );
        assert_eq!(
            code(m.handle(Request::SetQueueSize { queue: 9, size: 64 }, vec![])),
            ErrorCode::BadQueue
        );
        assert_eq!(
            code(m.handle(Request::SetQueueKick { queue: 0 }, vec![])),
            ErrorCode::MissingFd
        );
    }

    #[test]
    fn ring_outside_memory_is_refused_at_driver_ok_and_inside_attaches() {
        let mut m = model();
        assert_eq!(
            reply(m.handle(
                Request::AddMemRegion {
                    guest_addr: 0x10000,
                    size: 0x10000,
                    offset: 0
                },
                vec![create_sealed_memfd("t", 0x10000).unwrap()]
            )),
            Reply::Ok
        );
        negotiate(&mut m);
        setup_queues(&mut m, 0x100000);
        assert_eq!(
            code(m.handle(Request::SetStatus(ALL), vec![])),
            ErrorCode::BadAddress
        );
        m.handle(Request::Reset, vec![]);
        negotiate(&mut m);
        setup_queues(&mut m, 0x10000);
        let Step::Attach(spec) = m.handle(Request::SetStatus(ALL), vec![]) else {
            panic!("no attach")
        };
        assert_eq!(spec.queues.len(), 2);
        assert_eq!(m.attach_fds().len(), 3);
        assert_eq!(
            m.status() & st::DRIVER_OK,
            0,
            "not DRIVER_OK until attached"
        );
        assert_eq!(m.attach_done(Ok(())), Reply::Ok);
        assert_eq!(m.status(), ALL);
        assert_eq!(
            code(m.handle(
                Request::SetQueueAddress {
                    queue: 0,
                    desc: 0x10000,
                    driver: 0x11000,
                    device: 0x12000
                },
                vec![]
            )),
            ErrorCode::BadState
        );
        assert!(matches!(
            m.handle(Request::Reset, vec![]),
            Step::Detach(Reply::Ok)
        ));
        m.detached(&[]);
        assert_eq!(m.status(), 0);
    }

    #[test]
    fn unsealed_memfd_is_refused() {
        let mut m = model();
        let f = memfd::MemfdOptions::default().create("u").unwrap();
        f.as_file().set_len(0x10000).unwrap();
        let fd = OwnedFd::from(f.into_file());
        assert_eq!(
            code(m.handle(
                Request::AddMemRegion {
                    guest_addr: 0,
                    size: 0x10000,
                    offset: 0
                },
                vec![fd]
            )),
            ErrorCode::BadMemory
        );
    }

    #[test]
    fn failure_sets_needs_reset_and_only_reset_clears_it() {
        let mut m = model();
        reply(m.handle(
            Request::AddMemRegion {
                guest_addr: 0x10000,
                size: 0x10000,
                offset: 0,
            },
            vec![create_sealed_memfd("t", 0x10000).unwrap()],
        ));
        negotiate(&mut m);
        setup_queues(&mut m, 0x10000);
        reply(m.handle(Request::SetConfigNotify, vec![eventfd()]));
        assert!(matches!(
            m.handle(Request::SetStatus(ALL), vec![]),
            Step::Attach(_)
        ));
        m.attach_done(Ok(()));
        assert!(m.device_failed().is_some());
        assert_eq!(m.status() & st::NEEDS_RESET, st::NEEDS_RESET);
        assert_eq!(
            reply(m.handle(Request::SetStatus(ALL), vec![])),
            Reply::Ok,
            "no bit added: no-op"
        );
        assert_eq!(
            m.status() & st::NEEDS_RESET,
            st::NEEDS_RESET,
            "only a reset clears it"
        );
        assert_eq!(
            code(m.handle(
                Request::SetQueueReady {
                    queue: 0,
                    ready: true
                },
                vec![]
            )),
            ErrorCode::BadState
        );
        assert_eq!(
            reply(m.handle(Request::Reset, vec![])),
            Reply::Ok,
            "already detached"
        );
        assert_eq!(m.status(), 0);
    }
}
