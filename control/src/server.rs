//! The control-plane daemon: listens on `control.sock` (drivers, vmdevctl) and
//! `datapath.sock` (parents), one thread per connection, and carries out what the device
//! model asks for.

use crate::defined::{DefinedError, Definitions};
use crate::model::{DeviceModel, Step};
use crate::parent::ParentLink;
use crate::profile;
use crate::registry::{lock, Device, Registry, Slot};
use crate::sys;
use crate::vhost_user::Door;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use uuid::Uuid;
use vmdev_proto::datapath::{DpEvent, DpOp, DpReply, FromDatapath, ToDatapath};
use vmdev_proto::transport::{
    DefinedDevice, DeviceState, DeviceStats, Reply, Request, VduseBind, VqState,
    DEVICE_STATE_FORMAT, DEVICE_STATE_VERSION,
};
use vmdev_proto::virtio::status as st;
use vmdev_proto::{Channel, ErrorCode, Hello, ProtoError, WireError};

/// The daemon's shared state.
pub struct Server {
    run_dir: PathBuf,
    defined: Mutex<Definitions>,
    registry: Mutex<Registry>,
    next_conn: AtomicU64,
    allowed_uids: Vec<u32>,
    /// Client connections being served now, and the most allowed at once.
    clients: AtomicUsize,
    max_clients: usize,
}

/// Client connections served at once by default (each has its own thread).
pub const DEFAULT_MAX_CLIENTS: usize = 1024;

fn werr(code: ErrorCode, msg: impl Into<String>) -> Reply {
    Reply::Error(WireError::new(code, msg))
}

/// Creates `dir` (mode 0700 when new) and binds `dir/name` with mode 0600, replacing a
/// stale socket file.
pub fn bind_socket(dir: &Path, name: &str) -> std::io::Result<UnixListener> {
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let path = dir.join(name);
    if path.exists() {
        if UnixStream::connect(&path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by a running daemon", path.display()),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    let l = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Number of fds a request must carry.
fn expected_fds(req: &Request) -> usize {
    match req {
        Request::SetQueueKick { .. }
        | Request::SetQueueCall { .. }
        | Request::SetConfigNotify
        | Request::StartDirtyLog
        | Request::AddMemRegion { .. } => 1,
        _ => 0,
    }
}

impl Server {
    /// A daemon serving `run_dir`; peers (drivers, vmdevctl, datapaths, vhost-user front
    /// ends) must run as root, as this daemon's uid, or as one of `allow_uids`.
    pub fn new(
        run_dir: PathBuf,
        state_dir: &Path,
        allow_uids: &[u32],
        max_clients: usize,
    ) -> Result<Arc<Self>, DefinedError> {
        let mut allowed_uids = vec![0, sys::own_uid()];
        allowed_uids.extend_from_slice(allow_uids);
        Ok(Arc::new(Server {
            run_dir,
            defined: Mutex::new(Definitions::load(state_dir)?),
            registry: Mutex::new(Registry::default()),
            next_conn: AtomicU64::new(1),
            allowed_uids,
            clients: AtomicUsize::new(0),
            max_clients,
        }))
    }

    /// Checks a connected peer's uid against the allow-list; a refusal is logged and
    /// returned as the error to send before closing.
    pub(crate) fn check_peer(&self, s: &UnixStream, socket: &str) -> Result<(), WireError> {
        let cred = sys::peer_cred(s).map_err(|e| {
            WireError::new(
                ErrorCode::NotAllowed,
                format!("cannot read peer credentials: {e}"),
            )
        })?;
        if self.allowed_uids.contains(&cred.uid) {
            return Ok(());
        }
        tracing::warn!(
            uid = cred.uid,
            pid = cred.pid,
            socket,
            "peer refused: uid not allowed"
        );
        Err(WireError::new(
            ErrorCode::NotAllowed,
            format!(
                "uid {} may not use this vmdev control plane (allowed: {:?}; see vmdev-control --allow-uid)",
                cred.uid, self.allowed_uids
            ),
        ))
    }

    /// Binds both sockets and serves until the process ends. `datapath.sock` is bound
    /// first, so that whoever waits for `control.sock` to appear (scripts, tests) can start a
    /// datapath at once: it found `datapath.sock` missing in one run of
    /// `perf/compare-dpdk.sh`.
    pub fn run(self: &Arc<Self>) -> std::io::Result<()> {
        let parents = bind_socket(&self.run_dir, "datapath.sock")?;
        let clients = bind_socket(&self.run_dir, "control.sock")?;
        tracing::info!(run_dir = %self.run_dir.display(), "vmdev-control listening");
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("parents".into())
            .spawn(move || accept_loop(parents, me, Server::serve_parent))?;
        for conn in clients.incoming() {
            match conn {
                Ok(s) => self.accept_client(s),
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
        Ok(())
    }

    /// The device's state blob (JSON [`DeviceState`]); the device must not be attached.
    fn snapshot(d: &Device) -> Vec<u8> {
        let (features, status, config, queues) = d.model.state_parts();
        let mut st = DeviceState {
            format: DEVICE_STATE_FORMAT.into(),
            version: DEVICE_STATE_VERSION,
            uuid: d.uuid,
            parent: d.link.name.clone(),
            device_type: d.model.profile().type_name.clone(),
            attrs: d.attrs.clone(),
            features,
            status,
            config,
            queues,
            stats: d.base_stats.clone(),
            checksum: 0,
        };
        st.checksum = st.compute_checksum();
        serde_json::to_vec_pretty(&st).unwrap_or_default()
    }

    /// Parses and checks a device state blob (format, version, checksum) — what `restore`
    /// and `LoadState` accept; public for the fuzzer.
    pub fn parse_state(blob: &[u8]) -> Result<DeviceState, WireError> {
        let st: DeviceState = serde_json::from_slice(blob).map_err(|e| {
            WireError::new(
                ErrorCode::BadArgument,
                format!("not a device state blob: {e}"),
            )
        })?;
        if st.format != DEVICE_STATE_FORMAT || st.version > DEVICE_STATE_VERSION {
            return Err(WireError::new(
                ErrorCode::BadArgument,
                format!(
                    "state format '{}' version {} is not supported (this build: version {DEVICE_STATE_VERSION})",
                    st.format, st.version
                ),
            ));
        }
        if st.checksum != st.compute_checksum() {
            return Err(WireError::new(
                ErrorCode::BadArgument,
                "device state blob is corrupted (checksum mismatch)",
            ));
        }
        Ok(st)
    }

    fn load(d: &mut Device, blob: &[u8]) -> Result<(), WireError> {
        let st = Self::parse_state(blob)?;
        if st.device_type != d.model.profile().type_name || st.config != d.model.profile().config {
            return Err(WireError::new(
                ErrorCode::BadArgument,
                "the saved device has another type or configuration",
            ));
        }
        d.model.load_state(st.features, st.status, &st.queues)
    }

    /// Management snapshot: a running device is detached between passes and re-attached.
    fn save_device(&self, uuid: Uuid) -> Reply {
        let Some(slot) = lock(&self.registry).devices.get(&uuid).cloned() else {
            return werr(ErrorCode::NoSuchDevice, format!("no device {uuid}"));
        };
        let mut d = lock(&slot.dev);
        let was_attached = d.model.is_attached();
        Self::detach(&mut d);
        let blob = Self::snapshot(&d);
        if was_attached {
            if let Err(e) = Self::reattach(&mut d) {
                return Reply::Error(e);
            }
        }
        Reply::State(blob)
    }

    /// Recreates a saved device: identity, type, attributes and counters.
    fn restore_device(self: &Arc<Self>, blob: &[u8], parent: Option<String>) -> Reply {
        let st = match Self::parse_state(blob) {
            Ok(s) => s,
            Err(e) => return Reply::Error(e),
        };
        let parent = parent.unwrap_or(st.parent.clone());
        let r = self.start_device(
            &parent,
            &st.device_type,
            Some(st.uuid),
            st.attrs.clone(),
            None,
            None,
        );
        if let Reply::Started(_) = r {
            if let Some(slot) = lock(&self.registry).devices.get(&st.uuid).cloned() {
                let mut d = lock(&slot.dev);
                d.base_stats = st.stats.clone();
                // The driver that kept its memory takes the device over at the saved
                // features and ring positions (status FEATURES_OK); a driver that resets
                // starts afresh.
                if let Err(e) = d.model.load_state(st.features, st.status, &st.queues) {
                    drop(d);
                    self.stop_device(st.uuid);
                    return Reply::Error(e);
                }
            }
        }
        r
    }

    /// Validates and saves a definition.
    fn define(&self, def: DefinedDevice) -> Reply {
        if def.uuid.is_nil() {
            return werr(ErrorCode::BadArgument, "a defined device needs a UUID");
        }
        let device_attrs: Vec<(String, String)> = def
            .attrs
            .iter()
            .filter(|(k, _)| k != crate::vhost_user::ATTR_UNSEALED)
            .cloned()
            .collect();
        if let Err(e) = profile::build(&def.device_type, &device_attrs, 0) {
            return Reply::Error(e);
        }
        if def
            .vhost_user
            .as_deref()
            .is_some_and(|p| !Path::new(p).is_absolute())
        {
            return werr(
                ErrorCode::BadArgument,
                "the vhost-user path must be absolute",
            );
        }
        match lock(&self.defined).define(def) {
            Ok(()) => Reply::Ok,
            Err(e) => werr(ErrorCode::Internal, e.to_string()),
        }
    }

    /// Starts the `auto` devices defined on a parent that just registered.
    fn start_auto(self: &Arc<Self>, parent: &str) {
        let defs: Vec<DefinedDevice> = lock(&self.defined)
            .list()
            .iter()
            .filter(|d| d.auto && d.parent == parent)
            .cloned()
            .collect();
        for def in defs {
            if lock(&self.registry).devices.contains_key(&def.uuid) {
                continue;
            }
            match self.start_device(
                &def.parent,
                &def.device_type,
                Some(def.uuid),
                def.attrs,
                def.vhost_user,
                None,
            ) {
                Reply::Error(e) => tracing::warn!(uuid = %def.uuid, "auto-start failed: {e}"),
                _ => {
                    tracing::info!(uuid = %def.uuid, parent, "defined device started automatically")
                }
            }
        }
    }

    /// The protocol feature a request needs, if the connection did not negotiate it.
    fn missing_feature(req: &Request, negotiated: u64) -> Option<WireError> {
        let (bit, name) = match req {
            Request::SetQueueState { .. } | Request::GetQueueState { .. } => {
                (vmdev_proto::PROTO_F_VQ_STATE, "PROTO_F_VQ_STATE")
            }
            Request::Suspend | Request::Resume => (vmdev_proto::PROTO_F_SUSPEND, "PROTO_F_SUSPEND"),
            Request::SaveState | Request::LoadState(_) => {
                (vmdev_proto::PROTO_F_DEVICE_STATE, "PROTO_F_DEVICE_STATE")
            }
            Request::StartDirtyLog | Request::StopDirtyLog => {
                (vmdev_proto::PROTO_F_DIRTY_LOG, "PROTO_F_DIRTY_LOG")
            }
            _ => return None,
        };
        (negotiated & bit == 0).then(|| {
            WireError::new(
                ErrorCode::BadState,
                format!("{req:?} needs protocol feature {name}, not negotiated in Hello"),
            )
        })
    }

    /// A fresh connection id.
    pub fn new_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Removes the socket files (on shutdown).
    pub fn cleanup(&self) {
        let _ = std::fs::remove_file(self.run_dir.join("control.sock"));
        let _ = std::fs::remove_file(self.run_dir.join("datapath.sock"));
    }

    // ---------------------------------------------------------------- drivers, vmdevctl

    /// Serves a new client on its own thread, unless `max_clients` are being served: then
    /// it gets a clear error and is closed (no thread is spent on it).
    fn accept_client(self: &Arc<Self>, s: UnixStream) {
        if self.clients.fetch_add(1, Ordering::AcqRel) >= self.max_clients {
            self.clients.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(
                max = self.max_clients,
                "client refused: too many connections"
            );
            let e = WireError::new(
                ErrorCode::NoCapacity,
                format!(
                    "the control plane serves at most {} connections (vmdev-control --max-clients)",
                    self.max_clients
                ),
            );
            let _ = Channel::new(s).send(&Reply::Error(e), &[]);
            return;
        }
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new().spawn(move || {
            let server = Arc::clone(&me);
            me.serve_client(s);
            server.clients.fetch_sub(1, Ordering::AcqRel);
        });
        if let Err(e) = spawned {
            self.clients.fetch_sub(1, Ordering::AcqRel);
            tracing::error!("cannot start a connection thread: {e}");
        }
    }

    fn serve_client(self: Arc<Self>, stream: UnixStream) {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let peer = sys::peer_cred(&stream).map(|c| c.pid).unwrap_or(0);
        let refused = self.check_peer(&stream, "control.sock");
        let mut ch = Channel::new(stream);
        if let Err(e) = refused {
            // Read its hello first, so the refusal is what it reads next.
            let _ = ch.recv::<Request>();
            let _ = ch.send(&Reply::Error(e), &[]);
            return;
        }
        let mut opened: Option<Arc<Mutex<Device>>> = None;
        if let Err(e) = self.client_session(conn, &mut ch, &mut opened) {
            match e {
                ProtoError::Closed => tracing::debug!(conn, peer, "client closed"),
                e => tracing::warn!(conn, peer, "closing client connection: {e}"),
            }
        }
        if let Some(dev) = opened {
            let mut d = lock(&dev);
            if d.claimed_by == Some(conn) {
                tracing::info!(uuid = %d.uuid, conn, "driver went away; releasing device");
                Self::detach(&mut d);
                d.model.release();
                d.claimed_by = None;
            }
        }
    }

    fn client_session(
        self: &Arc<Self>,
        conn: u64,
        ch: &mut Channel,
        opened: &mut Option<Arc<Mutex<Device>>>,
    ) -> Result<(), ProtoError> {
        let (first, fds) = ch.recv::<Request>()?;
        let hello = match first {
            Request::Hello(h) if fds.is_empty() => Hello::negotiate(h),
            _ => Err(WireError::new(
                ErrorCode::BadState,
                "the first message must be Hello",
            )),
        };
        let features = match hello {
            Ok(h) => {
                ch.send(&Reply::Hello(h), &[])?;
                h.features
            }
            Err(e) => {
                let msg = e.message.clone();
                ch.send(&Reply::Error(e), &[])?;
                return Err(ProtoError::Handshake(msg));
            }
        };
        loop {
            let (req, fds) = ch.recv::<Request>()?;
            let want = expected_fds(&req);
            let reply = if fds.len() != want {
                werr(
                    if fds.len() < want {
                        ErrorCode::MissingFd
                    } else {
                        ErrorCode::BadArgument
                    },
                    format!("this request carries {want} fd(s), {} arrived", fds.len()),
                )
            } else {
                match Self::missing_feature(&req, features) {
                    Some(e) => Reply::Error(e),
                    None => self.client_request(conn, req, fds, opened),
                }
            };
            ch.send(&reply, &[])?;
        }
    }

    fn client_request(
        self: &Arc<Self>,
        conn: u64,
        req: Request,
        fds: Vec<OwnedFd>,
        opened: &mut Option<Arc<Mutex<Device>>>,
    ) -> Reply {
        match req {
            Request::Hello(_) => werr(ErrorCode::BadState, "Hello was already exchanged"),
            Request::ListTypes => Reply::Types(lock(&self.registry).parent_infos()),
            Request::ListDevices => Reply::Devices(lock(&self.registry).device_infos()),
            Request::StartDevice {
                parent,
                device_type,
                uuid,
                attrs,
                vhost_user,
            } => self.start_device(&parent, &device_type, uuid, attrs, vhost_user, None),
            Request::StartVduseDevice {
                parent,
                device_type,
                uuid,
                attrs,
                name,
                bind,
            } => self.start_device(&parent, &device_type, uuid, attrs, None, Some((name, bind))),
            Request::StopDevice { uuid } => self.stop_device(uuid),
            Request::DefineDevice(def) => self.define(def),
            Request::SaveDevice { uuid } => self.save_device(uuid),
            Request::RestoreDevice { blob, parent } => self.restore_device(&blob, parent),
            Request::UndefineDevice { uuid } => match lock(&self.defined).undefine(&uuid) {
                Ok(true) => Reply::Ok,
                Ok(false) => werr(ErrorCode::NoSuchDevice, format!("no defined device {uuid}")),
                Err(e) => werr(ErrorCode::Internal, e.to_string()),
            },
            Request::ListDefined => Reply::Defined(lock(&self.defined).list().to_vec()),
            Request::StartDefined { uuid } => {
                let Some(def) = lock(&self.defined).get(&uuid).cloned() else {
                    return werr(ErrorCode::NoSuchDevice, format!("no defined device {uuid}"));
                };
                self.start_device(
                    &def.parent,
                    &def.device_type,
                    Some(uuid),
                    def.attrs,
                    def.vhost_user,
                    None,
                )
            }
            Request::MigrateDevice { uuid, to } => self.migrate(uuid, &to),
            Request::GetStats { uuid } => self.stats(uuid),
            Request::Open { uuid } => self.open(conn, uuid, opened),
            req => {
                let Some(dev) = opened.as_ref() else {
                    return werr(ErrorCode::BadState, "open a device first (Open { uuid })");
                };
                if matches!(
                    req,
                    Request::SetQueueKick { .. }
                        | Request::SetQueueCall { .. }
                        | Request::SetConfigNotify
                ) && !fds.iter().all(|f| sys::is_eventfd(f.as_fd()))
                {
                    return werr(
                        ErrorCode::BadArgument,
                        "kick, call and config fds must be eventfds",
                    );
                }
                let mut d = lock(dev);
                if d.removed {
                    return werr(
                        ErrorCode::NoSuchDevice,
                        format!("device {} was stopped", d.uuid),
                    );
                }
                match req {
                    Request::SaveState if d.model.is_attached() => werr(
                        ErrorCode::BadState,
                        "suspend the device before saving its state",
                    ),
                    Request::SaveState => Reply::State(Self::snapshot(&d)),
                    Request::StartDirtyLog | Request::StopDirtyLog => {
                        let fd = fds.into_iter().next();
                        let on = fd.is_some();
                        let handle = d.handle;
                        let attached = d.model.is_attached();
                        let link = Arc::clone(&d.link);
                        match d.model.set_dirty_log(fd) {
                            Err(e) => Reply::Error(e),
                            Ok(_) if !attached => Reply::Ok,
                            Ok(fd) => {
                                let fds: Vec<_> = fd.into_iter().collect();
                                match link.call(DpOp::SetDirtyLog { handle, on }, &fds) {
                                    Ok(_) => Reply::Ok,
                                    Err(e) => Reply::Error(e),
                                }
                            }
                        }
                    }
                    Request::LoadState(blob) => match Self::load(&mut d, &blob) {
                        Ok(()) => Reply::Ok,
                        Err(e) => Reply::Error(e),
                    },
                    req => Self::drive(&mut d, req, fds),
                }
            }
        }
    }

    /// Runs one driver request through the device model and carries out its step.
    pub(crate) fn drive(d: &mut Device, req: Request, fds: Vec<OwnedFd>) -> Reply {
        match d.model.handle(req, fds) {
            Step::Reply(r) => r,
            Step::Attach(mut spec) => {
                spec.handle = d.handle;
                let res = {
                    let fds = d.model.attach_fds();
                    d.link.call(DpOp::Attach(spec), &fds)
                };
                let res = match res {
                    Ok(DpReply::Attached) => Ok(()),
                    Ok(other) => Err(WireError::new(
                        ErrorCode::Internal,
                        format!("datapath answered {other:?}"),
                    )),
                    Err(e) => Err(e),
                };
                if let Err(e) = &res {
                    tracing::warn!(uuid = %d.uuid, "attach failed: {e}");
                } else {
                    tracing::info!(uuid = %d.uuid, parent = %d.link.name, "device attached (DRIVER_OK)");
                }
                d.model.attach_done(res)
            }
            Step::Detach(r) => {
                Self::detach(d);
                r
            }
        }
    }

    /// Detaches a device from its datapath (if attached), keeping its final counters.
    pub(crate) fn detach(d: &mut Device) {
        if !d.model.is_attached() {
            return;
        }
        let states = match d.link.call(DpOp::Detach { handle: d.handle }, &[]) {
            Ok(DpReply::Detached(stats, states)) => {
                d.base_stats.add(&stats);
                states
            }
            Ok(other) => {
                tracing::warn!(uuid = %d.uuid, "detach answered {other:?}");
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(uuid = %d.uuid, "detach failed: {e}");
                Vec::new()
            }
        };
        d.model.detached(&states);
    }

    fn open(&self, conn: u64, uuid: Uuid, opened: &mut Option<Arc<Mutex<Device>>>) -> Reply {
        if opened.is_some() {
            return werr(
                ErrorCode::BadState,
                "this connection already holds a device",
            );
        }
        let Some(slot) = lock(&self.registry).devices.get(&uuid).cloned() else {
            return werr(ErrorCode::NoSuchDevice, format!("no device {uuid}"));
        };
        let mut d = lock(&slot.dev);
        if d.claimed_by.is_some() {
            return werr(
                ErrorCode::Busy,
                format!("device {uuid} is held by another driver"),
            );
        }
        d.claimed_by = Some(conn);
        drop(d);
        *opened = Some(slot.dev);
        tracing::info!(%uuid, conn, "driver opened device");
        Reply::Ok
    }

    fn start_device(
        self: &Arc<Self>,
        parent: &str,
        device_type: &str,
        uuid: Option<Uuid>,
        attrs: Vec<(String, String)>,
        vhost_user: Option<String>,
        vduse: Option<(String, VduseBind)>,
    ) -> Reply {
        let uuid = uuid.unwrap_or_else(Uuid::new_v4);
        let mut reg = lock(&self.registry);
        let Some(link) = reg.parents.get(parent).cloned() else {
            return werr(
                ErrorCode::NoSuchParent,
                format!("no parent named '{parent}'"),
            );
        };
        let Some(&(_, max)) = link.types.iter().find(|(t, _)| t == device_type) else {
            return werr(
                ErrorCode::NoSuchType,
                format!("parent '{parent}' does not offer type '{device_type}'"),
            );
        };
        if reg.devices.contains_key(&uuid) {
            return werr(ErrorCode::Busy, format!("device {uuid} already exists"));
        }
        if reg.used(parent, device_type) >= max {
            return werr(
                ErrorCode::NoCapacity,
                format!("parent '{parent}' has no free '{device_type}' instance (max {max})"),
            );
        }
        let mut device_attrs = attrs.clone();
        let mut door_attrs = Vec::new();
        device_attrs.retain(|(k, v)| {
            let door = k == crate::vhost_user::ATTR_UNSEALED;
            if door {
                door_attrs.push((k.clone(), v.clone()));
            }
            !door
        });
        if let Some((_, v)) = door_attrs
            .iter()
            .find(|(_, v)| v != "accept" && v != "refuse")
        {
            return werr(
                ErrorCode::BadArgument,
                format!(
                    "{}='{v}': use accept or refuse",
                    crate::vhost_user::ATTR_UNSEALED
                ),
            );
        }
        if !door_attrs.is_empty() && vhost_user.is_none() {
            return werr(
                ErrorCode::BadArgument,
                format!(
                    "{} applies to vhost-user devices only",
                    crate::vhost_user::ATTR_UNSEALED
                ),
            );
        }
        let profile = match profile::build(device_type, &device_attrs, uuid.as_u128()) {
            Ok(p) if vduse.is_some() => match profile::vduse_form(p) {
                Ok(p) => p,
                Err(e) => return Reply::Error(e),
            },
            Ok(p) => p,
            Err(e) => return Reply::Error(e),
        };
        let door = match vhost_user.map(PathBuf::from) {
            Some(p) if !p.is_absolute() => {
                return werr(
                    ErrorCode::BadArgument,
                    format!("vhost-user path '{}' must be absolute", p.display()),
                )
            }
            Some(p) => match Door::bind(p.clone()) {
                Ok(d) => Some(d),
                Err(e) => {
                    return werr(
                        ErrorCode::BadArgument,
                        format!("cannot listen on {}: {e}", p.display()),
                    )
                }
            },
            None => None,
        };
        let handle = reg.new_handle();
        let dev = Arc::new(Mutex::new(Device {
            uuid,
            attrs,
            // Memory of a VDUSE device comes from the kernel (IOTLB fds), not a driver.
            model: if vduse.is_some() || door_attrs.iter().any(|(_, v)| v == "accept") {
                DeviceModel::new(profile).trust_unsealed_memory()
            } else {
                DeviceModel::new(profile)
            },
            handle,
            link,
            claimed_by: None,
            base_stats: DeviceStats::default(),
            removed: false,
            door: door.clone(),
            vduse: None,
            recoveries: 0,
        }));
        reg.handles.insert(handle, uuid);
        reg.devices.insert(
            uuid,
            Slot {
                parent: parent.into(),
                device_type: device_type.into(),
                dev: Arc::clone(&dev),
            },
        );
        if let Some(door) = door {
            let me = Arc::clone(self);
            let dev = Arc::clone(&dev);
            let spawned = std::thread::Builder::new()
                .name("vhost-user".into())
                .spawn(move || door.run(me, dev));
            if let Err(e) = spawned {
                tracing::error!("cannot start the vhost-user thread: {e}");
            }
        }
        drop(reg);
        if let Some((name, bind)) = vduse {
            // The door holds the device: no vmdev-protocol driver may open it.
            lock(&dev).claimed_by = Some(self.new_conn_id());
            let bind = match bind {
                VduseBind::Virtio => crate::vdpa::Bind::Virtio,
                VduseBind::Vhost => crate::vdpa::Bind::Vhost,
            };
            match crate::vduse::VduseDoor::start(Arc::clone(&dev), &name, bind) {
                Ok(door) => lock(&dev).vduse = Some(door),
                Err(e) => {
                    lock(&self.registry).remove(&uuid);
                    let mut d = lock(&dev);
                    Self::detach(&mut d);
                    d.removed = true;
                    return Reply::Error(e);
                }
            }
        }
        tracing::info!(%uuid, parent, device_type, "device started");
        Reply::Started(uuid)
    }

    /// Moves a device to parent `to`; a running device keeps its driver, rings, memory and
    /// eventfds and sees no reset. On failure it goes back where it was.
    fn migrate(&self, uuid: Uuid, to: &str) -> Reply {
        let (slot, target) = {
            let mut reg = lock(&self.registry);
            let Some(slot) = reg.devices.get(&uuid).cloned() else {
                return werr(ErrorCode::NoSuchDevice, format!("no device {uuid}"));
            };
            let Some(target) = reg.parents.get(to).cloned() else {
                return werr(ErrorCode::NoSuchParent, format!("no parent named '{to}'"));
            };
            if slot.parent == to {
                return Reply::Ok;
            }
            let max = target
                .types
                .iter()
                .find(|(t, _)| *t == slot.device_type)
                .map(|(_, m)| *m);
            match max {
                None => {
                    return werr(
                        ErrorCode::NoSuchType,
                        format!("parent '{to}' does not offer '{}'", slot.device_type),
                    )
                }
                Some(m) if reg.used(to, &slot.device_type) >= m => {
                    return werr(
                        ErrorCode::NoCapacity,
                        format!("parent '{to}' has no free '{}' instance", slot.device_type),
                    )
                }
                Some(_) => {}
            }
            if let Some(s) = reg.devices.get_mut(&uuid) {
                s.parent = to.to_string();
            }
            (slot, target)
        };
        let mut d = lock(&slot.dev);
        let was_attached = d.model.is_attached();
        Self::detach(&mut d);
        let old = std::mem::replace(&mut d.link, target);
        if !was_attached {
            tracing::info!(%uuid, to, "device moved (not running)");
            return Reply::Ok;
        }
        match Self::reattach(&mut d) {
            Ok(()) => {
                tracing::info!(%uuid, from = %old.name, to, "device migrated");
                Reply::Ok
            }
            Err(e) => {
                tracing::warn!(%uuid, to, "migration failed, going back to '{}': {e}", old.name);
                d.link = old;
                let back = Self::reattach(&mut d);
                let name = d.link.name.clone();
                drop(d);
                if let Some(s) = lock(&self.registry).devices.get_mut(&uuid) {
                    s.parent = name;
                }
                match back {
                    Ok(()) => Reply::Error(e),
                    Err(e2) => Reply::Error(WireError::new(
                        ErrorCode::Datapath,
                        format!("{e}; and back: {e2}"),
                    )),
                }
            }
        }
    }

    /// Attaches a detached running device to its (new) link at its stored ring positions.
    fn reattach(d: &mut Device) -> Result<(), WireError> {
        let Some(spec) = d.model.reattach_spec() else {
            return Ok(());
        };
        let mut spec = spec?;
        spec.handle = d.handle;
        let res = {
            let fds = d.model.attach_fds();
            d.link.call(DpOp::Attach(spec), &fds)
        };
        match res {
            Ok(DpReply::Attached) => {
                d.model.reattached();
                Ok(())
            }
            Ok(other) => Err(WireError::new(
                ErrorCode::Internal,
                format!("datapath answered {other:?}"),
            )),
            Err(e) => Err(e),
        }
    }

    fn stop_device(&self, uuid: Uuid) -> Reply {
        let Some(slot) = lock(&self.registry).remove(&uuid) else {
            return werr(ErrorCode::NoSuchDevice, format!("no device {uuid}"));
        };
        // The kernel resets a VDUSE device through its door while leaving the bus: close
        // that door first, without holding the device.
        let vduse = lock(&slot.dev).vduse.take();
        if let Some(v) = vduse {
            v.close();
        }
        let mut d = lock(&slot.dev);
        Self::detach(&mut d);
        d.removed = true;
        if let Some(door) = d.door.take() {
            door.close();
        }
        if d.claimed_by.is_some() {
            if let Some(fd) = d.model.device_failed() {
                sys::signal_eventfd(fd);
            }
        }
        tracing::info!(%uuid, "device stopped");
        Reply::Ok
    }

    fn stats(&self, uuid: Uuid) -> Reply {
        let Some(slot) = lock(&self.registry).devices.get(&uuid).cloned() else {
            return werr(ErrorCode::NoSuchDevice, format!("no device {uuid}"));
        };
        let d = lock(&slot.dev);
        let mut total = d.base_stats.clone();
        if d.model.is_attached() {
            match d.link.call(DpOp::Stats { handle: d.handle }, &[]) {
                Ok(DpReply::Stats(s)) => total.add(&s),
                Ok(other) => {
                    return werr(ErrorCode::Internal, format!("datapath answered {other:?}"))
                }
                Err(e) => return Reply::Error(e),
            }
        }
        let n = d.model.profile().num_queues as usize;
        if total.queues.len() < n {
            total.queues.resize(n, Default::default());
        }
        Reply::Stats(total)
    }

    // ---------------------------------------------------------------- parents

    fn serve_parent(self: Arc<Self>, stream: UnixStream) {
        let pid = sys::peer_cred(&stream).map(|c| c.pid).unwrap_or(0);
        if let Err(e) = self.check_peer(&stream, "datapath.sock") {
            let mut ch = Channel::new(stream);
            let _ = ch.recv::<FromDatapath>();
            let _ = ch.send(&ToDatapath::Registered(Err(e)), &[]);
            return;
        }
        let writer = match stream.try_clone() {
            Ok(s) => Channel::new(s),
            Err(e) => return tracing::warn!("datapath connection: {e}"),
        };
        let mut ch = Channel::new(stream);
        let link = match self.register(&mut ch, writer, pid) {
            Ok(l) => l,
            Err(e) => return tracing::warn!(pid, "datapath registration failed: {e}"),
        };
        tracing::info!(parent = %link.name, pid, cpu = ?link.cpu, "datapath registered");
        self.start_auto(&link.name);
        // Orphans attach through this link: not from this thread, which must go on to
        // route the datapath's replies.
        let me = Arc::clone(&self);
        std::thread::spawn(move || me.rehome_orphans());
        let err = loop {
            match ch.recv::<FromDatapath>() {
                Ok((FromDatapath::Reply { seq, result }, _)) => link.complete(seq, result),
                Ok((FromDatapath::Event(ev), _)) => {
                    let me = Arc::clone(&self);
                    std::thread::spawn(move || me.datapath_event(ev));
                }
                Ok((other, _)) => break ProtoError::UnexpectedReply(format!("{other:?}")),
                Err(e) => break e,
            }
        };
        tracing::warn!(parent = %link.name, "datapath connection ended: {err}");
        link.close();
        self.parent_gone(&link);
    }

    fn register(
        &self,
        ch: &mut Channel,
        writer: Channel,
        pid: u32,
    ) -> Result<Arc<ParentLink>, ProtoError> {
        let (first, _) = ch.recv::<FromDatapath>()?;
        let FromDatapath::Hello(h) = first else {
            return Err(ProtoError::Handshake(
                "the first message must be Hello".into(),
            ));
        };
        match Hello::negotiate(h) {
            Ok(h) => ch.send(&ToDatapath::Hello(h), &[])?,
            Err(e) => {
                ch.send(&ToDatapath::Registered(Err(e.clone())), &[])?;
                return Err(ProtoError::Handshake(e.message));
            }
        }
        let (msg, _) = ch.recv::<FromDatapath>()?;
        let FromDatapath::Register { name, cpu, types } = msg else {
            return Err(ProtoError::Handshake("expected Register".into()));
        };
        let mut reg = lock(&self.registry);
        let refuse = if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            Some(WireError::new(
                ErrorCode::BadArgument,
                format!("parent name '{name}' must be 1-64 of [A-Za-z0-9-_.]"),
            ))
        } else if reg.parents.contains_key(&name) {
            Some(WireError::new(
                ErrorCode::Busy,
                format!("a parent named '{name}' is already registered"),
            ))
        } else if let Some((t, _)) = types
            .iter()
            .find(|(t, _)| profile::build(t, &[], 0).is_err())
        {
            Some(WireError::new(
                ErrorCode::NoSuchType,
                format!("the control plane does not know type '{t}'"),
            ))
        } else {
            None
        };
        if let Some(e) = refuse {
            ch.send(&ToDatapath::Registered(Err(e.clone())), &[])?;
            return Err(ProtoError::Handshake(e.message));
        }
        let link = Arc::new(ParentLink::new(name.clone(), pid, cpu, types, writer));
        reg.parents.insert(name, Arc::clone(&link));
        ch.send(&ToDatapath::Registered(Ok(())), &[])?;
        Ok(link)
    }

    fn datapath_event(&self, ev: DpEvent) {
        match ev {
            DpEvent::DeviceFailed {
                handle,
                reason,
                stats,
            } => {
                let slot = {
                    let reg = lock(&self.registry);
                    reg.handles
                        .get(&handle)
                        .and_then(|u| reg.devices.get(u))
                        .cloned()
                };
                let Some(slot) = slot else { return };
                let mut d = lock(&slot.dev);
                if d.handle != handle || !d.model.is_attached() {
                    return;
                }
                tracing::warn!(uuid = %d.uuid, "device needs a reset: {reason}");
                d.base_stats.add(&stats);
                if let Some(fd) = d.model.device_failed() {
                    sys::signal_eventfd(fd);
                }
            }
        }
    }

    /// A datapath went away: its devices are gone too; their drivers see NEEDS_RESET.
    fn parent_gone(&self, link: &Arc<ParentLink>) {
        let slots: Vec<Slot> = {
            let mut reg = lock(&self.registry);
            if reg
                .parents
                .get(&link.name)
                .is_some_and(|l| Arc::ptr_eq(l, link))
            {
                reg.parents.remove(&link.name);
            }
            let uuids: Vec<Uuid> = reg
                .devices
                .iter()
                .filter(|(_, s)| Arc::ptr_eq(&lock(&s.dev).link, link))
                .map(|(u, _)| *u)
                .collect();
            // A VDUSE device stays (NEEDS_RESET) until `vmdevctl stop`: the kernel still has
            // it on the vDPA bus, and its door keeps answering the kernel. A running device
            // stays too, orphaned, to be recovered on another (or a restarted) datapath.
            let (keep, gone): (Vec<Uuid>, Vec<Uuid>) = uuids.into_iter().partition(|u| {
                reg.devices.get(u).is_some_and(|s| {
                    let d = lock(&s.dev);
                    d.vduse.is_some() || Self::recoverable(&d)
                })
            });
            let mut slots: Vec<Slot> = gone.iter().filter_map(|u| reg.remove(u)).collect();
            slots.extend(keep.iter().filter_map(|u| reg.devices.get(u).cloned()));
            slots
        };
        for slot in slots {
            let mut d = lock(&slot.dev);
            if d.vduse.is_some() {
                Self::detach(&mut d);
                d.model.device_failed();
                tracing::warn!(uuid = %d.uuid, parent = %link.name, "VDUSE device lost its datapath: NEEDS_RESET");
                continue;
            }
            if Self::recoverable(&d) {
                // Not attached anywhere now; its queue states are those of its last attach.
                d.model.detached(&[]);
                tracing::warn!(uuid = %d.uuid, parent = %link.name, "device lost its datapath: recovering");
                continue;
            }
            d.removed = true;
            if d.model.status() & st::DRIVER_OK != 0 {
                if let Some(fd) = d.model.device_failed() {
                    sys::signal_eventfd(fd);
                }
            }
            tracing::warn!(uuid = %d.uuid, parent = %link.name, "device lost with its datapath");
        }
        self.rehome_orphans();
    }

    /// A running device whose datapath died can be recovered elsewhere: DRIVER_OK, not
    /// NEEDS_RESET, not suspended, no VDUSE door.
    fn recoverable(d: &Device) -> bool {
        d.vduse.is_none()
            && d.model.status() & (st::DRIVER_OK | st::NEEDS_RESET) == st::DRIVER_OK
            && !d.model.is_suspended()
            && (d.model.is_attached() || !d.link.is_alive())
    }

    /// Attaches every orphaned device (its datapath died) to a live datapath offering its
    /// type with room — its own parent again if that one re-registered — resuming each ring
    /// at the used index found in shared memory. Frames the dead datapath had completed on
    /// TX but not yet delivered are counted as RX drops; none is delivered twice.
    fn rehome_orphans(&self) {
        let orphans: Vec<(Uuid, Slot)> = lock(&self.registry)
            .devices
            .iter()
            .filter(|(_, s)| {
                let d = lock(&s.dev);
                !d.removed && !d.link.is_alive() && Self::recoverable(&d)
            })
            .map(|(u, s)| (*u, s.clone()))
            .collect();
        for (uuid, slot) in orphans {
            let target = {
                let mut reg = lock(&self.registry);
                let mut names: Vec<String> = reg.parents.keys().cloned().collect();
                // Its own parent first (restarted), then the others by name.
                names.sort_by_key(|n| (n != &slot.parent, n.clone()));
                let pick = names.into_iter().find(|n| {
                    let Some(l) = reg.parents.get(n) else {
                        return false;
                    };
                    let max = l
                        .types
                        .iter()
                        .find(|(t, _)| *t == slot.device_type)
                        .map(|x| x.1);
                    let used = reg.used(n, &slot.device_type) - u32::from(*n == slot.parent);
                    l.is_alive() && max.is_some_and(|m| used < m)
                });
                let Some(name) = pick else {
                    tracing::warn!(%uuid, "no datapath can take the orphaned device yet");
                    continue;
                };
                if let Some(s) = reg.devices.get_mut(&uuid) {
                    s.parent = name.clone();
                }
                reg.parents.get(&name).cloned()
            };
            let Some(link) = target else { continue };
            let mut d = lock(&slot.dev);
            d.link = Arc::clone(&link);
            if let Err(e) = Self::recover(&mut d) {
                tracing::error!(%uuid, parent = %link.name, "recovery failed: {e}");
                if let Some(fd) = d.model.device_failed() {
                    sys::signal_eventfd(fd);
                }
            }
        }
    }

    /// Attaches a device for recovery and accounts for the frames lost in the crash.
    fn recover(d: &mut Device) -> Result<(), WireError> {
        let Some(spec) = d.model.reattach_spec() else {
            return Ok(());
        };
        let mut spec = spec?;
        spec.handle = d.handle;
        spec.recover = true;
        let before: Vec<(u16, VqState)> = d.model.state_parts().3;
        let res = {
            let fds = d.model.attach_fds();
            d.link.call(DpOp::Attach(spec), &fds)
        };
        let states = match res? {
            DpReply::Recovered(states) => states,
            other => {
                return Err(WireError::new(
                    ErrorCode::Internal,
                    format!("datapath answered {other:?}"),
                ))
            }
        };
        let lost = profile::crash_losses(d.model.profile(), &before, &states);
        for (q, n) in &lost {
            let n_queues = d.model.profile().num_queues as usize;
            if d.base_stats.queues.len() < n_queues {
                d.base_stats.queues.resize(n_queues, Default::default());
            }
            if let Some(qs) = d.base_stats.queues.get_mut(*q as usize) {
                qs.drops += n;
            }
        }
        d.model.detached(&states);
        d.model.reattached();
        d.recoveries += 1;
        tracing::warn!(uuid = %d.uuid, parent = %d.link.name, ?lost, "device recovered");
        Ok(())
    }
}

fn accept_loop(l: UnixListener, server: Arc<Server>, serve: fn(Arc<Server>, UnixStream)) {
    for conn in l.incoming() {
        match conn {
            Ok(s) => {
                let me = Arc::clone(&server);
                if let Err(e) = std::thread::Builder::new().spawn(move || serve(me, s)) {
                    tracing::error!("cannot start a connection thread: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}
