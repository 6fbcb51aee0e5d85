//! Driver memory: memfd regions, each mapped once (MAP_SHARED), and bounds-checked
//! translation of guest addresses.

use crate::dirty::{DirtyLog, DIRTY_PAGE};
use crate::{GuestAddr, MemError};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

/// Regions must start on this boundary (guest address and memfd offset), so a host
/// pointer has the same alignment as the guest address it came from.
pub const REGION_ALIGN: u64 = 4096;

/// Largest number of regions one device may have.
pub const MAX_REGIONS: usize = 64;

/// One mapped region.
struct Region {
    guest_addr: u64,
    size: u64,
    host: NonNull<u8>,
    map_len: usize,
    _fd: OwnedFd,
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `host` and `map_len` are exactly what mmap returned for this region, and
        // every pointer derived from it is tied to the owning GuestMemory's lifetime.
        unsafe {
            libc::munmap(self.host.as_ptr().cast(), self.map_len);
        }
    }
}

/// The driver's memory as seen by one side: a small table of mapped memfd regions.
///
/// Translation is a scan of a handful of regions; hot paths translate a ring once and keep
/// the host pointer, which stays valid as long as this value lives.
#[derive(Default)]
pub struct GuestMemory {
    regions: Vec<Region>,
    logging: AtomicBool,
    log: RwLock<Option<DirtyLog>>,
}

// SAFETY: the mappings are plain shared memory, valid until drop; all access to guest bytes
// goes through raw-pointer copies and atomics, never through references.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; the table itself is immutable once built.
unsafe impl Sync for GuestMemory {}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut l = f.debug_list();
        for r in &self.regions {
            l.entry(&format_args!("{:#x}+{:#x}", r.guest_addr, r.size));
        }
        l.finish()
    }
}

/// Whether a region's memfd must be sealed against shrinking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SealPolicy {
    /// F_SEAL_SHRINK is required (the default: a driver cannot SIGBUS whoever maps it).
    #[default]
    Required,
    /// The owner is trusted not to truncate the memory: front ends that cannot seal their
    /// memfds, and the kernel's VDUSE IOTLB fds (not memfds at all).
    Trusted,
}

/// Checks that `fd` is a memfd sealed against shrinking (unless `policy` trusts it) and at least `offset + size` long;
/// the control plane calls this when a region arrives, the datapath again when mapping.
pub fn check_memfd(
    fd: BorrowedFd<'_>,
    offset: u64,
    size: u64,
    policy: SealPolicy,
) -> Result<(), MemError> {
    // SAFETY: F_GET_SEALS only reads the fd's seal set.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        if policy == SealPolicy::Trusted {
            // A trusted owner's mapping that is not a memfd (e.g. a VDUSE IOTLB fd from the
            // kernel): it has no meaningful size to check; the owner backs what it maps.
            offset
                .checked_add(size)
                .ok_or_else(|| MemError::BadRegion("offset + size overflows".into()))?;
            return Ok(());
        }
        return Err(MemError::NotMemfd(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    if seals & libc::F_SEAL_SHRINK == 0 && policy == SealPolicy::Required {
        return Err(MemError::NotSealed);
    }
    let needed = offset
        .checked_add(size)
        .ok_or_else(|| MemError::BadRegion("offset + size overflows".into()))?;
    // SAFETY: fstat writes only into the zeroed struct we pass.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and a valid out-pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(MemError::NotMemfd(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    let file_len = st.st_size as u64;
    if file_len < needed {
        return Err(MemError::TooSmall { file_len, needed });
    }
    Ok(())
}

/// Checks a region's shape: non-empty, aligned, no overflow.
pub fn check_region_shape(guest_addr: u64, size: u64, offset: u64) -> Result<(), MemError> {
    if size == 0 {
        return Err(MemError::BadRegion("size is zero".into()));
    }
    if !guest_addr.is_multiple_of(REGION_ALIGN) || !offset.is_multiple_of(REGION_ALIGN) {
        return Err(MemError::BadRegion(format!(
            "guest address {guest_addr:#x} and offset {offset:#x} must be multiples of {REGION_ALIGN}"
        )));
    }
    if guest_addr.checked_add(size).is_none() {
        return Err(MemError::BadRegion("guest address + size overflows".into()));
    }
    if usize::try_from(size).is_err() {
        return Err(MemError::BadRegion("size does not fit the host".into()));
    }
    Ok(())
}

/// Creates a memfd of `size` bytes sealed against shrinking and growing — the kind of
/// memory a driver hands to vmdev.
pub fn create_sealed_memfd(name: &str, size: u64) -> std::io::Result<OwnedFd> {
    let mfd = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .close_on_exec(true)
        .create(name)
        .map_err(std::io::Error::other)?;
    mfd.as_file().set_len(size)?;
    mfd.add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow])
        .map_err(std::io::Error::other)?;
    Ok(OwnedFd::from(mfd.into_file()))
}

/// The system's transparent-huge-page setting for shared memory (`never`, `advise`,
/// `always`, ...): guest memory gets the 2 MiB pages [`GuestMemory`] asks for only when it
/// is not `never` or `deny`. `None` where the kernel has no such setting.
pub fn shmem_huge_setting() -> Option<String> {
    let s = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled").ok()?;
    s.split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
        .map(str::to_string)
}

impl GuestMemory {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates and maps a region: `size` bytes of `fd` from `offset`, at `guest_addr`.
    pub fn add_region(
        &mut self,
        fd: OwnedFd,
        guest_addr: GuestAddr,
        size: u64,
        offset: u64,
    ) -> Result<(), MemError> {
        self.add_region_with(fd, guest_addr, size, offset, SealPolicy::Required)
    }

    /// Like [`GuestMemory::add_region`], with an explicit seal policy.
    pub fn add_region_with(
        &mut self,
        fd: OwnedFd,
        guest_addr: GuestAddr,
        size: u64,
        offset: u64,
        policy: SealPolicy,
    ) -> Result<(), MemError> {
        check_region_shape(guest_addr.0, size, offset)?;
        check_memfd(fd.as_fd(), offset, size, policy)?;
        if self.regions.len() >= MAX_REGIONS {
            return Err(MemError::BadRegion(format!(
                "more than {MAX_REGIONS} regions"
            )));
        }
        let end = guest_addr.0 + size;
        if self
            .regions
            .iter()
            .any(|r| guest_addr.0 < r.guest_addr + r.size && r.guest_addr < end)
        {
            return Err(MemError::Overlap(guest_addr));
        }
        let map_len = size as usize;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| MemError::BadRegion("offset too large".into()))?;
        // SAFETY: a fresh shared mapping of a file we hold; the kernel picks the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MemError::Map(std::io::Error::last_os_error().to_string()));
        }
        // Transparent huge pages where the system allows them for shared memory
        // (`shmem_enabled` not `never`): a datapath serving many devices touches more
        // 4 KiB pages of buffers than the TLB holds (64 devices: 0.81-0.86 of one device's
        // rate with 4 KiB pages, 1.04-1.06 with 2 MiB; perf/RESULTS.md). Refused where THP
        // is off, which only leaves 4 KiB pages, so the result is ignored.
        // SAFETY: advice on exactly the mapping just made; it changes no contents.
        let _ = unsafe { libc::madvise(p, map_len, libc::MADV_HUGEPAGE) };
        let host = NonNull::new(p.cast::<u8>()).ok_or_else(|| MemError::Map("null".into()))?;
        self.regions.push(Region {
            guest_addr: guest_addr.0,
            size,
            host,
            map_len,
            _fd: fd,
        });
        self.regions.sort_by_key(|r| r.guest_addr);
        Ok(())
    }

    /// Starts (or, with `None`, stops) logging every write the device makes into a bitmap
    /// laid out as [`crate::dirty::bitmap_len`] describes for this memory's regions.
    pub fn set_dirty_log(&self, log: Option<DirtyLog>) {
        let mut slot = self.log.write().unwrap_or_else(|p| p.into_inner());
        self.logging.store(log.is_some(), Ordering::Release);
        *slot = log;
    }

    /// The region sizes, in guest-address order (what a dirty bitmap must cover).
    pub fn region_sizes(&self) -> Vec<u64> {
        self.regions.iter().map(|r| r.size).collect()
    }

    /// Records that the device wrote `len` bytes at host address `ptr` (inside a region).
    pub(crate) fn mark_host(&self, ptr: *const u8, len: usize) {
        if len == 0 || !self.logging.load(Ordering::Relaxed) {
            return;
        }
        let guard = self.log.read().unwrap_or_else(|p| p.into_inner());
        let Some(log) = guard.as_ref() else { return };
        let mut base_bit = 0u64;
        for r in &self.regions {
            let start = r.host.as_ptr() as usize;
            let p = ptr as usize;
            if p >= start && p - start < r.map_len {
                let off = (p - start) as u64;
                let end = (off + len as u64 - 1).min(r.size - 1);
                log.set_bits(base_bit + off / DIRTY_PAGE, base_bit + end / DIRTY_PAGE);
                return;
            }
            base_bit += r.size.div_ceil(DIRTY_PAGE);
        }
    }

    /// Number of regions.
    pub fn num_regions(&self) -> usize {
        self.regions.len()
    }

    /// Translates `[addr, addr+len)` to a host pointer; the whole range must lie in one
    /// region. A zero-length range must still start inside a region.
    pub fn translate(&self, addr: GuestAddr, len: u64) -> Result<NonNull<u8>, MemError> {
        let oor = || MemError::OutOfRange { addr, len };
        let end = addr.0.checked_add(len).ok_or_else(oor)?;
        for r in &self.regions {
            if addr.0 >= r.guest_addr
                && end <= r.guest_addr + r.size
                && addr.0 < r.guest_addr + r.size
            {
                let off = (addr.0 - r.guest_addr) as usize;
                // SAFETY: off < r.size == map_len, so the result stays inside the mapping.
                return Ok(unsafe { NonNull::new_unchecked(r.host.as_ptr().add(off)) });
            }
        }
        Err(oor())
    }

    /// Hints the cache that every line of the first bytes (up to 128) of `[addr, addr+len)`
    /// will be read, or written when `write`: a driver issues it a few buffers ahead so
    /// that its copies do not stall on lines the device's core holds. An address outside
    /// memory is ignored.
    pub fn prefetch(&self, addr: GuestAddr, len: u64, write: bool) {
        let Ok(p) = self.translate(addr, len) else {
            return;
        };
        crate::prefetch::lines(p.as_ptr(), len.min(128) as usize, write);
    }

    /// Like [`GuestMemory::translate`] but also requires `addr` to be `align`-aligned.
    pub fn translate_aligned(
        &self,
        addr: GuestAddr,
        len: u64,
        align: u64,
    ) -> Result<NonNull<u8>, MemError> {
        if !addr.is_aligned(align) {
            return Err(MemError::Misaligned { addr, align });
        }
        self.translate(addr, len)
    }

    /// Whether `[addr, addr+len)` lies inside one region.
    pub fn contains(&self, addr: GuestAddr, len: u64) -> bool {
        self.translate(addr, len).is_ok()
    }

    /// Copies guest bytes at `addr` into `buf`.
    pub fn read(&self, addr: GuestAddr, buf: &mut [u8]) -> Result<(), MemError> {
        let p = self.translate(addr, buf.len() as u64)?;
        // SAFETY: the range was checked to be inside a live mapping; the destination is a
        // distinct Rust buffer. Guest memory is only ever accessed through raw copies.
        unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into guest memory at `addr`.
    pub fn write(&self, addr: GuestAddr, data: &[u8]) -> Result<(), MemError> {
        let p = self.translate(addr, data.len() as u64)?;
        // SAFETY: as in `read`, in the other direction.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p.as_ptr(), data.len()) };
        Ok(())
    }

    /// Fills `len` bytes at `addr` with zeros.
    pub fn zero(&self, addr: GuestAddr, len: u64) -> Result<(), MemError> {
        let p = self.translate(addr, len)?;
        // SAFETY: the range is inside a live mapping.
        unsafe { std::ptr::write_bytes(p.as_ptr(), 0, len as usize) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `VmFlags` line of the mapping in /proc/self/smaps that holds `addr`.
    fn vm_flags_of(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let range = line
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'));
            if let Some((a, b)) = range {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = (a..b).contains(&addr);
                    continue;
                }
            }
            if inside && line.starts_with("VmFlags:") {
                return line.to_string();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn every_region_is_advised_into_huge_pages() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            return; // a kernel without THP refuses the advice, as it should
        }
        let mut m = GuestMemory::new();
        let fd = create_sealed_memfd("thp", 2 << 20).unwrap();
        m.add_region(fd, GuestAddr(0x10_0000), 2 << 20, 0).unwrap();
        let p = m.translate(GuestAddr(0x10_0000), 1).unwrap().as_ptr() as usize;
        // `hg`: MADV_HUGEPAGE, whatever the system then does with it.
        let flags = vm_flags_of(p);
        assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
    }

    #[test]
    fn unsealed_and_non_memfd_are_refused() {
        let m = memfd::MemfdOptions::default().create("t").unwrap();
        m.as_file().set_len(8192).unwrap();
        let mut mem = GuestMemory::new();
        let err = mem
            .add_region(OwnedFd::from(m.into_file()), GuestAddr(0), 8192, 0)
            .unwrap_err();
        // A memfd created without sealing reports only F_SEAL_SEAL: not sealed against shrink.
        assert_eq!(err, MemError::NotSealed);
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(matches!(
            mem.add_region(OwnedFd::from(f), GuestAddr(0), 4096, 0),
            Err(MemError::NotMemfd(_))
        ));
    }

    #[test]
    fn translation_is_bounded() {
        let mut mem = GuestMemory::new();
        mem.add_region(
            create_sealed_memfd("a", 8192).unwrap(),
            GuestAddr(0x10000),
            8192,
            0,
        )
        .unwrap();
        mem.add_region(
            create_sealed_memfd("b", 4096).unwrap(),
            GuestAddr(0x12000),
            4096,
            0,
        )
        .unwrap();
        assert!(mem.contains(GuestAddr(0x10000), 8192));
        assert!(
            !mem.contains(GuestAddr(0x10000), 8193),
            "straddles two regions"
        );
        assert!(!mem.contains(GuestAddr(0xffff), 1));
        assert!(!mem.contains(GuestAddr(u64::MAX), 2), "wraps past 2^64");
        assert!(!mem.contains(GuestAddr(0x13000), 0));
        mem.write(GuestAddr(0x12ffc), &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        mem.read(GuestAddr(0x12ffc), &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(mem.write(GuestAddr(0x12ffd), &[1, 2, 3, 4]).is_err());
    }

    #[test]
    fn overlap_too_small_and_misaligned_are_refused() {
        let mut mem = GuestMemory::new();
        mem.add_region(
            create_sealed_memfd("a", 8192).unwrap(),
            GuestAddr(0),
            8192,
            0,
        )
        .unwrap();
        assert!(matches!(
            mem.add_region(
                create_sealed_memfd("b", 8192).unwrap(),
                GuestAddr(4096),
                4096,
                0
            ),
            Err(MemError::Overlap(_))
        ));
        assert!(matches!(
            mem.add_region(
                create_sealed_memfd("c", 4096).unwrap(),
                GuestAddr(1 << 20),
                8192,
                0
            ),
            Err(MemError::TooSmall { .. })
        ));
        assert!(matches!(
            mem.add_region(
                create_sealed_memfd("d", 8192).unwrap(),
                GuestAddr(100),
                4096,
                0
            ),
            Err(MemError::BadRegion(_))
        ));
    }
}
