//! The VDUSE front door: a vmdev device becomes a vDPA device of the Linux kernel, used by
//! the kernel's own virtio driver (`virtio_vdpa`) or by a VMM / userspace driver through
//! `/dev/vhost-vdpa-N` (`vhost_vdpa`). Kernel messages become device-model requests; the
//! datapath never learns which door a device came through.
//!
//! Threads per device: one answers the kernel's messages (`SET_STATUS`, `GET_VQ_STATE`,
//! `UPDATE_IOTLB`), one turns the datapath's call eventfds into `VDUSE_VQ_INJECT_IRQ`.

use crate::registry::{lock, Device};
use crate::server::Server;
use crate::vdpa::{self, Bind, VdpaNetlink};
use crate::vduse_sys::{self, req, Control, DevConfig, DevFd, DevRequest, DevResponse};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmdev_proto::transport::{Reply, Request, VqState};
use vmdev_proto::virtio::status as st;
use vmdev_proto::{ErrorCode, WireError};

/// Ring alignment declared to the kernel.
const VQ_ALIGN: u32 = 4096;
/// Bounce buffer size when sysfs does not say (the kernel's default).
const DEFAULT_BOUNCE: u64 = 64 << 20;

fn err(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

/// Turns a failure to reach VDUSE into an error that says what to do.
fn explain(e: io::Error) -> WireError {
    // Our wrappers keep the error's kind but not always its errno.
    let errno = e.raw_os_error().or(match e.kind() {
        io::ErrorKind::NotFound => Some(libc::ENOENT),
        io::ErrorKind::PermissionDenied => Some(libc::EACCES),
        _ => None,
    });
    match errno {
        Some(libc::ENOENT) | Some(libc::ENODEV) => err(
            ErrorCode::Unavailable,
            format!("VDUSE is not available ({e}): load the vduse module (modprobe vduse)"),
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => err(
            ErrorCode::Unavailable,
            format!("VDUSE needs root (CAP_SYS_ADMIN) in the control plane: {e}"),
        ),
        _ => err(ErrorCode::Internal, format!("VDUSE: {e}")),
    }
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd() with constant flags; the result is checked and owned at once.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

fn drain(fd: &OwnedFd) -> bool {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a u64 from a nonblocking eventfd we own.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    n == 8
}

/// Waits until one of `fds` is readable; returns their readiness.
fn poll(fds: &[&OwnedFd], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: poll() reads and writes `p.len()` live pollfd entries.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(p.iter().map(|x| x.revents != 0).collect())
}

/// A device's VDUSE door: the kernel device, its threads, and its place on the vDPA bus.
pub struct VduseDoor {
    /// VDUSE device name (also its vDPA device name).
    pub name: String,
    /// `/dev/vhost-vdpa-N` when bound to vhost_vdpa.
    pub vhost_path: Option<PathBuf>,
    ctl: Control,
    stop: OwnedFd,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl VduseDoor {
    /// Creates VDUSE device `name` for `dev` (whose profile must already be the VDUSE
    /// form), starts answering the kernel, adds it to the vDPA bus and binds it as asked.
    /// On failure nothing is left behind.
    pub fn start(
        dev: Arc<Mutex<Device>>,
        name: &str,
        bind: Bind,
    ) -> Result<Arc<VduseDoor>, WireError> {
        let name_bytes =
            vduse_sys::name_bytes(name).map_err(|e| err(ErrorCode::BadArgument, e.to_string()))?;
        if !Path::new(vduse_sys::VDUSE_DIR).join("control").exists() {
            return Err(err(
                ErrorCode::Unavailable,
                "VDUSE is not available: /dev/vduse/control does not exist (load the vduse module: modprobe vduse)",
            ));
        }
        let ctl = Control::open().map_err(explain)?;
        let (cfg, config, nq, max_q) = {
            let d = lock(&dev);
            let p = d.model.profile();
            let cfg = DevConfig {
                name: name_bytes,
                vendor_id: p.vendor_id,
                device_id: p.device_id,
                features: p.offered,
                vq_num: p.num_queues as u32,
                vq_align: VQ_ALIGN,
                reserved: [0; 13],
                config_size: 0,
            };
            (cfg, p.config.clone(), p.num_queues, p.max_queue_size)
        };
        ctl.create(cfg, &config)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EEXIST) => err(
                    ErrorCode::Busy,
                    format!("a VDUSE device named '{name}' already exists"),
                ),
                _ => explain(io::Error::new(e.kind(), format!("VDUSE_CREATE_DEV: {e}"))),
            })?;
        let cleanup = |ctl: &Control| {
            if let Err(e) = ctl.destroy(name) {
                tracing::warn!(name, "VDUSE_DESTROY_DEV: {e}");
            }
        };
        let fd = match Self::open_dev(name, nq, max_q) {
            Ok(f) => Arc::new(f),
            Err(e) => {
                cleanup(&ctl);
                return Err(explain(e));
            }
        };
        let stop = eventfd().map_err(explain)?;
        let mut calls = Vec::new();
        let mut kicks = Vec::new();
        for _ in 0..nq {
            calls.push(eventfd().map_err(explain)?);
            kicks.push(eventfd().map_err(explain)?);
        }
        let door = Arc::new(VduseDoor {
            name: name.to_string(),
            vhost_path: None,
            ctl,
            stop,
            threads: Mutex::new(Vec::new()),
        });
        let session = Session {
            dev: Arc::clone(&dev),
            fd: Arc::clone(&fd),
            kicks,
            calls: calls
                .iter()
                .map(|c| c.try_clone())
                .collect::<io::Result<_>>()
                .map_err(explain)?,
            regions: Vec::new(),
            bounce: bind == Bind::Virtio,
            bounce_size: bounce_size(name),
        };
        let spawn = |what: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(format!("vduse-{what}"))
                .spawn(f)
                .map_err(explain)
        };
        let stop_a = door.stop.try_clone().map_err(explain)?;
        let stop_b = door.stop.try_clone().map_err(explain)?;
        let fd_irq = Arc::clone(&fd);
        let t1 = spawn("msg", Box::new(move || session.serve(stop_a)))?;
        let t2 = spawn("irq", Box::new(move || irq_loop(fd_irq, calls, stop_b)))?;
        lock(&door.threads).extend([t1, t2]);
        drop(fd);

        let added = VdpaNetlink::open().and_then(|mut nl| nl.add_vduse(name));
        if let Err(e) = added {
            door.shutdown();
            return Err(err(ErrorCode::Internal, e.to_string()));
        }
        match vdpa::bind(name, bind) {
            Ok(path) => {
                // Only this function holds the Arc yet.
                let mut door = door;
                if let Some(d) = Arc::get_mut(&mut door) {
                    d.vhost_path = path;
                }
                tracing::info!(name, driver = bind.driver(), vhost = ?door.vhost_path, "VDUSE device on the vDPA bus");
                Ok(door)
            }
            Err(e) => {
                door.close();
                Err(err(ErrorCode::Unavailable, e.to_string()))
            }
        }
    }

    fn open_dev(name: &str, nq: u16, max_q: u16) -> io::Result<DevFd> {
        // devtmpfs creates the node shortly after VDUSE_CREATE_DEV returns.
        let deadline = Instant::now() + Duration::from_secs(5);
        let fd = loop {
            match DevFd::open(name) {
                Ok(f) => break f,
                Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => return Err(e),
            }
        };
        for q in 0..nq {
            fd.vq_setup(q as u32, max_q)?;
        }
        Ok(fd)
    }

    /// Stops the threads and destroys the kernel device (after it left the bus).
    fn shutdown(&self) {
        crate::sys::signal_eventfd(self.stop.as_fd());
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
        // The device fd closed with the threads; the kernel may need a moment to let go.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.ctl.destroy(&self.name) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => {
                    tracing::warn!(name = %self.name, "VDUSE_DESTROY_DEV: {e}");
                    break;
                }
            }
        }
    }

    /// Takes the device off the vDPA bus (the kernel driver lets go, resetting it through
    /// this door), then destroys it. Call without holding the device's lock.
    pub fn close(&self) {
        match VdpaNetlink::open().and_then(|mut nl| nl.del(&self.name)) {
            Ok(()) => {}
            Err(e) => tracing::warn!(name = %self.name, "{e}"),
        }
        self.shutdown();
        tracing::info!(name = %self.name, "VDUSE device removed");
    }
}

fn bounce_size(name: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/vduse/{name}/bounce_size"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_BOUNCE)
}

/// Interrupts the driver whenever the datapath signals a queue's call eventfd.
fn irq_loop(fd: Arc<DevFd>, calls: Vec<OwnedFd>, stop: OwnedFd) {
    let mut all: Vec<&OwnedFd> = calls.iter().collect();
    all.push(&stop);
    loop {
        let ready = match poll(&all, -1) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("VDUSE irq thread: poll: {e}");
                return;
            }
        };
        if ready.last().copied().unwrap_or(false) {
            return;
        }
        for (q, c) in calls.iter().enumerate() {
            if ready.get(q).copied().unwrap_or(false) && drain(c) {
                if let Err(e) = fd.inject_irq(q as u32) {
                    tracing::debug!(queue = q, "{e}");
                }
            }
        }
    }
}

/// The message side of the door: kernel requests in, model requests out.
struct Session {
    dev: Arc<Mutex<Device>>,
    fd: Arc<DevFd>,
    kicks: Vec<OwnedFd>,
    /// Clones of the call eventfds the irq thread watches.
    calls: Vec<OwnedFd>,
    /// Guest (IOVA) addresses of the regions this door added to the model.
    regions: Vec<u64>,
    /// Bound to virtio_vdpa: buffers live in the kernel's bounce area at IOVA 0.
    bounce: bool,
    bounce_size: u64,
}

fn ok_or(r: Reply) -> Result<Reply, WireError> {
    match r {
        Reply::Error(e) => Err(e),
        other => Ok(other),
    }
}

impl Session {
    fn serve(mut self, stop: OwnedFd) {
        let Ok(devfd) = self.fd.0.try_clone().map(OwnedFd::from) else {
            return;
        };
        loop {
            let ready = match poll(&[&devfd, &stop], -1) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("VDUSE message thread: poll: {e}");
                    return;
                }
            };
            if ready.get(1).copied().unwrap_or(false) {
                return;
            }
            if !ready.first().copied().unwrap_or(false) {
                continue;
            }
            let msg = match self.fd.read_request() {
                Ok(m) => m,
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.kind() == io::ErrorKind::WouldBlock =>
                {
                    continue
                }
                Err(e) => {
                    tracing::error!("VDUSE: reading a kernel message: {e}");
                    return;
                }
            };
            let resp = self.answer(&msg);
            if let Err(e) = self.fd.write_response(&resp) {
                tracing::error!("VDUSE: answering the kernel: {e}");
            }
        }
    }

    fn answer(&mut self, m: &DevRequest) -> DevResponse {
        let mut r = DevResponse {
            request_id: m.request_id,
            result: vduse_sys::RESULT_OK,
            reserved: [0; 4],
            body: [0; 32],
        };
        let dev = Arc::clone(&self.dev);
        let mut d = lock(&dev);
        let res = match m.kind {
            req::SET_STATUS => {
                let s = m.body[0] as u8;
                tracing::debug!(status = s, "VDUSE_SET_STATUS");
                self.set_status(&mut d, s)
            }
            req::GET_VQ_STATE => {
                let q = m.body[0];
                match self.vq_state(&mut d, q) {
                    Ok([w1, w2]) => {
                        r.body[0] = q;
                        r.body[1] = w1;
                        r.body[2] = w2;
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            req::UPDATE_IOTLB => {
                let (start, last) = m.iova_range();
                tracing::debug!(start, last, "VDUSE_UPDATE_IOTLB");
                self.update_iotlb(&mut d)
            }
            other => Err(err(
                ErrorCode::Unavailable,
                format!("unknown VDUSE message {other}"),
            )),
        };
        if let Err(e) = res {
            tracing::warn!(uuid = %d.uuid, "VDUSE message {} refused: {e}", m.kind);
            r.result = vduse_sys::RESULT_FAILED;
        }
        r
    }

    fn drive(d: &mut Device, req: Request, fds: Vec<OwnedFd>) -> Result<Reply, WireError> {
        if d.removed {
            return Ok(Reply::Ok);
        }
        ok_or(Server::drive(d, req, fds))
    }

    fn set_status(&mut self, d: &mut Device, s: u8) -> Result<(), WireError> {
        if s == 0 {
            Self::drive(d, Request::Reset, Vec::new())?;
            self.drop_regions(d)?;
            return Ok(());
        }
        let mut cur = d.model.status();
        for bit in [st::ACKNOWLEDGE, st::DRIVER] {
            if s & bit != 0 && cur & bit == 0 {
                cur |= bit;
                Self::drive(d, Request::SetStatus(cur), Vec::new())?;
            }
        }
        if s & st::FEATURES_OK != 0 && cur & st::FEATURES_OK == 0 {
            let f = self
                .fd
                .driver_features()
                .map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
            Self::drive(d, Request::SetDriverFeatures(f), Vec::new())?;
            cur |= st::FEATURES_OK;
            Self::drive(d, Request::SetStatus(cur), Vec::new())?;
        }
        if s & st::DRIVER_OK != 0 && cur & st::DRIVER_OK == 0 {
            self.setup(d)?;
            cur |= st::DRIVER_OK;
            Self::drive(d, Request::SetStatus(cur), Vec::new())?;
        }
        if s & st::FAILED != 0 && cur & st::FAILED == 0 {
            Self::drive(d, Request::SetStatus(cur | st::FAILED), Vec::new())?;
        }
        Ok(())
    }

    fn drop_regions(&mut self, d: &mut Device) -> Result<(), WireError> {
        for a in std::mem::take(&mut self.regions) {
            Self::drive(d, Request::RemoveMemRegion { guest_addr: a }, Vec::new())?;
        }
        Ok(())
    }

    /// Every IOTLB mapping becomes a region of the device, addressed by IOVA. Bound to
    /// virtio_vdpa, the bounce area at IOVA 0 is added from the domain file even before the
    /// kernel first maps a buffer there (it does so lazily, without telling us).
    fn add_regions(&mut self, d: &mut Device) -> Result<(), WireError> {
        let mut start = 0u64;
        let mut domain: Option<OwnedFd> = None;
        let mut covers_zero = false;
        for _ in 0..=vmdev_shm_ring::memory::MAX_REGIONS {
            let Some((e, f)) = self
                .fd
                .iotlb_fd(start, u64::MAX)
                .map_err(|e| err(ErrorCode::Internal, e.to_string()))?
            else {
                break;
            };
            if e.last < e.start || e.start < start {
                return Err(err(
                    ErrorCode::Internal,
                    format!("nonsense IOTLB entry {e:?}"),
                ));
            }
            covers_zero |= e.start == 0;
            if domain.is_none() {
                domain = f.try_clone().ok();
            }
            let size = e.last - e.start + 1;
            Self::drive(
                d,
                Request::AddMemRegion {
                    guest_addr: e.start,
                    size,
                    offset: e.offset,
                },
                vec![f],
            )?;
            self.regions.push(e.start);
            match e.last.checked_add(1) {
                Some(n) => start = n,
                None => break,
            }
        }
        if self.bounce && !covers_zero {
            if let Some(f) = domain {
                Self::drive(
                    d,
                    Request::AddMemRegion {
                        guest_addr: 0,
                        size: self.bounce_size,
                        offset: 0,
                    },
                    vec![f],
                )?;
                self.regions.push(0);
            }
        }
        Ok(())
    }

    /// At DRIVER_OK: memory, then every ready queue with its kick and call eventfds.
    fn setup(&mut self, d: &mut Device) -> Result<(), WireError> {
        self.drop_regions(d)?;
        self.add_regions(d)?;
        let ioerr = |e: io::Error| err(ErrorCode::Internal, e.to_string());
        for (q, (kick, call)) in self.kicks.iter().zip(&self.calls).enumerate() {
            let info = self.fd.vq_info(q as u32).map_err(ioerr)?;
            if info.ready == 0 {
                continue;
            }
            let queue = q as u16;
            let size = u16::try_from(info.num)
                .map_err(|_| err(ErrorCode::BadQueue, format!("queue {q} size {}", info.num)))?;
            Self::drive(d, Request::SetQueueSize { queue, size }, Vec::new())?;
            Self::drive(
                d,
                Request::SetQueueAddress {
                    queue,
                    desc: info.desc_addr,
                    driver: info.driver_addr,
                    device: info.device_addr,
                },
                Vec::new(),
            )?;
            let packed = d.model.state_parts().0 & vmdev_proto::virtio::features::RING_PACKED != 0;
            let state = if packed {
                // vduse_vq_state_packed: avail wrap, avail index, used wrap, used index;
                // all zero for a queue the kernel never set: a fresh ring (wraps start at 1).
                match info.state {
                    [0, 0, 0, 0] => VqState::fresh(true),
                    [aw, ai, uw, ui] => VqState::Packed {
                        avail_index: ai,
                        avail_wrap: aw != 0,
                        used_index: ui,
                        used_wrap: uw != 0,
                    },
                }
            } else {
                let at = info.state[0];
                VqState::Split {
                    avail_index: at,
                    used_index: at,
                }
            };
            Self::drive(d, Request::SetQueueState { queue, state }, Vec::new())?;
            self.fd
                .set_kickfd(q as u32, Some(kick.as_fd()))
                .map_err(ioerr)?;
            Self::drive(
                d,
                Request::SetQueueKick { queue },
                vec![kick.try_clone().map_err(ioerr)?],
            )?;
            Self::drive(
                d,
                Request::SetQueueCall { queue },
                vec![call.try_clone().map_err(ioerr)?],
            )?;
            Self::drive(d, Request::SetQueueReady { queue, ready: true }, Vec::new())?;
        }
        Ok(())
    }

    /// A queue's next avail index; a running device is paused between passes to read it.
    /// The `vduse_vq_state` union as two words: split → the avail index; packed → avail
    /// wrap | avail index << 16, used wrap | used index << 16.
    fn vq_state(&mut self, d: &mut Device, q: u32) -> Result<[u32; 2], WireError> {
        let queue = u16::try_from(q).map_err(|_| err(ErrorCode::BadQueue, "queue index"))?;
        let running = d.model.is_attached();
        if running {
            Self::drive(d, Request::Suspend, Vec::new())?;
        }
        let st = Self::drive(d, Request::GetQueueState { queue }, Vec::new());
        if running {
            Self::drive(d, Request::Resume, Vec::new())?;
        }
        match st? {
            Reply::QueueState(VqState::Split { avail_index, .. }) => Ok([avail_index as u32, 0]),
            Reply::QueueState(VqState::Packed {
                avail_index,
                avail_wrap,
                used_index,
                used_wrap,
            }) => Ok([
                u32::from(avail_wrap) | (avail_index as u32) << 16,
                u32::from(used_wrap) | (used_index as u32) << 16,
            ]),
            other => Err(err(ErrorCode::Internal, format!("queue state: {other:?}"))),
        }
    }

    /// Mappings changed: a running device is paused between passes, its regions replaced
    /// from the IOTLB, and resumed — it never touches an unmapped page.
    fn update_iotlb(&mut self, d: &mut Device) -> Result<(), WireError> {
        if d.model.status() & st::DRIVER_OK == 0 {
            return Ok(()); // regions are read at DRIVER_OK
        }
        let was_suspended = d.model.is_suspended();
        if !was_suspended {
            Self::drive(d, Request::Suspend, Vec::new())?;
        }
        self.drop_regions(d)?;
        self.add_regions(d)?;
        if !was_suspended {
            Self::drive(d, Request::Resume, Vec::new())?;
        }
        Ok(())
    }
}
