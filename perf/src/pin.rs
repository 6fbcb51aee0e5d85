//! CPU pinning helpers (`sched_setaffinity` on the calling thread).

use std::io;
use std::mem;

/// Returns the calling thread's current CPU affinity mask.
fn current_mask() -> io::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is a plain bitmask, all-zeroes is a valid (empty) value.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: pid 0 means the calling thread; `set` is a valid, writable cpu_set_t of the size
    // passed.
    let rc = unsafe { libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(set)
}

/// Sets the calling thread's CPU affinity mask.
fn set_mask(set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: pid 0 means the calling thread; `set` points to a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread (in a single-threaded process: the process) to CPU `cpu`.
/// Threads and processes created afterwards inherit the mask.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cpu {cpu} is beyond CPU_SETSIZE"),
        ));
    }
    // SAFETY: cpu_set_t is a plain bitmask, all-zeroes is a valid (empty) value.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: `cpu < CPU_SETSIZE` was checked above, so the bit is inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set_mask(&set)
}

/// The CPUs the calling thread may currently run on, in increasing order.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    let set = current_mask()?;
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c < CPU_SETSIZE`, so the bit is inside `set`.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Default `(parent, child)` CPUs for the floors: the first two CPUs the calling thread may
/// run on (CPUs 0 and 1 on the 2-core test machines), or `None` when fewer than two are allowed.
pub fn default_pair() -> Option<(usize, usize)> {
    match allowed_cpus().ok()?.as_slice() {
        [a, b, ..] => Some((*a, *b)),
        _ => None,
    }
}

/// Restores the affinity mask the calling thread had when the guard was created, on drop.
/// Must be dropped on the thread that created it.
pub struct AffinityGuard {
    saved: libc::cpu_set_t,
    // cpu_set_t is Send, but restoring on another thread would be wrong: make the guard !Send.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl AffinityGuard {
    /// Saves the calling thread's current affinity mask.
    pub fn save() -> io::Result<Self> {
        Ok(Self {
            saved: current_mask()?,
            _not_send: std::marker::PhantomData,
        })
    }
}

impl Drop for AffinityGuard {
    fn drop(&mut self) {
        if let Err(e) = set_mask(&self.saved) {
            tracing::warn!("failed to restore CPU affinity: {e}");
        }
    }
}

/// Pins the calling thread to `cpu` and returns a guard that restores its previous mask on drop.
pub fn pin_scoped(cpu: usize) -> io::Result<AffinityGuard> {
    let guard = AffinityGuard::save()?;
    pin_to_cpu(cpu)?;
    Ok(guard)
}
