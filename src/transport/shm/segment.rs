//! The shared segment: one file in `/dev/shm` mapped by both ends of a link, its layout,
//! and its life (created by the connector, opened by the acceptor, unlinked as soon as
//! both have mapped it, so that nothing is left behind whoever dies, by SIGKILL too).
//!
//! Layout (`ring_bytes` = `R`):
//!
//! ```text
//! 0       header: magic, version, R, token, a closed flag per side
//! 128     ring 0 control (connector -> acceptor): write index, futex word | read index, futex word
//! 256     ring 1 control (acceptor -> connector)
//! 4096    ring 0 data, R bytes
//! 4096+R  ring 1 data, R bytes
//! ```
//!
//! Everything the two processes both write is an atomic; the data bytes are copied with
//! plain copies, each range owned by one side at a time (see [`super::ring`]).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::ring::RingCtl;

/// Where segments live: a tmpfs every process of the host (or container) sees.
pub(crate) const DIR: &str = "/dev/shm";
/// Segment file names start with this.
pub(crate) const PREFIX: &str = "phalanx-";
/// Identifies a phalanx segment ("phxshm01").
const MAGIC: u64 = u64::from_le_bytes(*b"phxshm01");
const VERSION: u64 = 1;
/// Bytes before the first ring's data.
pub(crate) const HEADER_BYTES: usize = 4096;
const RING_CTL_AT: [usize; 2] = [128, 256];
/// Smallest and largest ring a segment may have.
pub(crate) const MIN_RING_BYTES: usize = 4096;
pub(crate) const MAX_RING_BYTES: usize = 1 << 30;

/// The segment header.
#[repr(C)]
struct SegHeader {
    magic: AtomicU64,
    version: AtomicU64,
    ring_bytes: AtomicU64,
    token: [AtomicU64; 2],
    /// Set to 1 by side `i` (0 = connector, 1 = acceptor) when it closes the link.
    closed: [AtomicU32; 2],
}

/// Which end of a link a process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// Created the segment; writes ring 0.
    Connector = 0,
    /// Opened it; writes ring 1.
    Acceptor = 1,
}

impl Side {
    pub(crate) fn peer(self) -> Side {
        match self {
            Side::Connector => Side::Acceptor,
            Side::Acceptor => Side::Connector,
        }
    }
}

enum Backing {
    /// `mmap`ed from a segment file.
    Mapped,
    /// Heap memory of this process (tests).
    #[cfg(test)]
    Heap(std::alloc::Layout),
}

/// A mapped segment (or a heap stand-in with the same layout), unmapped on drop.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    ring_bytes: usize,
    backing: Backing,
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping").field("len", &self.len).field("ring_bytes", &self.ring_bytes).finish()
    }
}

// SAFETY: the mapping is plain memory; every shared field is an atomic and the data
// bytes are only reached through raw-pointer copies whose ranges the ring protocol
// assigns to one side at a time, so sharing the handle between threads is sound.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

/// The bytes a segment with rings of `ring_bytes` needs.
pub(crate) fn segment_len(ring_bytes: usize) -> usize {
    HEADER_BYTES + 2 * ring_bytes
}

/// Whether `ring_bytes` is a ring size this transport accepts.
pub(crate) fn valid_ring_bytes(ring_bytes: usize) -> bool {
    (MIN_RING_BYTES..=MAX_RING_BYTES).contains(&ring_bytes) && ring_bytes % 64 == 0
}

impl Mapping {
    /// Zeroed heap memory laid out as a segment: both ends of a link in this process
    /// (the ring and link logic tested without files).
    #[cfg(test)]
    pub(crate) fn heap(ring_bytes: usize, token: [u64; 2]) -> io::Result<Mapping> {
        if !valid_ring_bytes(ring_bytes) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("ring of {ring_bytes} bytes")));
        }
        let len = segment_len(ring_bytes);
        let layout = std::alloc::Layout::from_size_align(len, 4096)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        // SAFETY: `layout` has a non-zero size (at least HEADER_BYTES).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "segment"))?;
        let map = Mapping { ptr, len, ring_bytes, backing: Backing::Heap(layout) };
        map.init(token);
        Ok(map)
    }

    /// Maps `len` bytes of `file` shared, read and write.
    fn map(file: &std::fs::File, len: usize, ring_bytes: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh shared mapping of an open file descriptor, at an address the
        // kernel picks; nothing else in this process refers to that range yet. The file
        // may be closed afterwards: the mapping keeps its own reference.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapping { ptr, len, ring_bytes, backing: Backing::Mapped })
    }

    fn header(&self) -> &SegHeader {
        // SAFETY: the mapping is at least HEADER_BYTES long, page-aligned, and lives
        // as long as `self`; SegHeader is all atomics, valid for any bit pattern, and
        // other processes only change it through atomic operations.
        unsafe { &*self.ptr.as_ptr().cast::<SegHeader>() }
    }

    fn init(&self, token: [u64; 2]) {
        let h = self.header();
        h.ring_bytes.store(self.ring_bytes as u64, Ordering::Relaxed);
        h.token[0].store(token[0], Ordering::Relaxed);
        h.token[1].store(token[1], Ordering::Relaxed);
        h.version.store(VERSION, Ordering::Relaxed);
        h.magic.store(MAGIC, Ordering::Release);
    }

    /// Whether the header says what the connector told us it would.
    fn check(&self, token: [u64; 2]) -> Result<(), String> {
        let h = self.header();
        if h.magic.load(Ordering::Acquire) != MAGIC || h.version.load(Ordering::Relaxed) != VERSION {
            return Err("not a phalanx segment of this version".into());
        }
        if h.ring_bytes.load(Ordering::Relaxed) != self.ring_bytes as u64 {
            return Err("ring size differs from the hello's".into());
        }
        if [h.token[0].load(Ordering::Relaxed), h.token[1].load(Ordering::Relaxed)] != token {
            return Err("token differs from the hello's".into());
        }
        Ok(())
    }

    /// Bytes of each ring.
    pub(crate) fn ring_bytes(&self) -> usize {
        self.ring_bytes
    }

    /// The control block of ring `i` (0 or 1).
    pub(crate) fn ring_ctl(&self, i: usize) -> &RingCtl {
        let at = RING_CTL_AT[i];
        debug_assert!(at + std::mem::size_of::<RingCtl>() <= HEADER_BYTES);
        // SAFETY: `at` is within the header page and 64-byte aligned (RingCtl's
        // alignment) in a page-aligned mapping that lives as long as `self`; RingCtl is
        // all atomics and padding, valid for any bit pattern, changed by the other
        // process only atomically.
        unsafe { &*self.ptr.as_ptr().add(at).cast::<RingCtl>() }
    }

    /// The first data byte of ring `i` (0 or 1); `ring_bytes` bytes follow.
    pub(crate) fn ring_data(&self, i: usize) -> *mut u8 {
        debug_assert!(HEADER_BYTES + (i + 1) * self.ring_bytes <= self.len);
        // SAFETY: in bounds: the mapping is `HEADER_BYTES + 2 * ring_bytes` long.
        unsafe { self.ptr.as_ptr().add(HEADER_BYTES + i * self.ring_bytes) }
    }

    /// The flag side `side` sets when it closes.
    pub(crate) fn closed_flag(&self, side: Side) -> &AtomicU32 {
        &self.header().closed[side as usize]
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        match self.backing {
            // SAFETY: `ptr`/`len` are exactly what mmap returned, and nothing refers to
            // the range any more (every reference borrows `self`).
            Backing::Mapped => unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), self.len);
            },
            // SAFETY: allocated in `heap` with this very layout.
            #[cfg(test)]
            Backing::Heap(layout) => unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) },
        }
    }
}

/// A segment file's name (`phalanx-<pid>-<hex>`), checked so that a hello can never
/// make a process open or unlink anything outside `/dev/shm/phalanx-*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SegmentName(String);

impl SegmentName {
    /// A fresh name for a segment of this process.
    pub(crate) fn fresh(random: u64) -> SegmentName {
        SegmentName(format!("{PREFIX}{}-{random:016x}", std::process::id()))
    }

    /// `name` if it is one [`SegmentName::fresh`] could have made.
    pub(crate) fn parse(name: &str) -> Option<SegmentName> {
        let rest = name.strip_prefix(PREFIX)?;
        let (pid, hex) = rest.split_once('-')?;
        let ok = !pid.is_empty()
            && pid.len() <= 10
            && pid.bytes().all(|b| b.is_ascii_digit())
            && hex.len() == 16
            && hex.bytes().all(|b| b.is_ascii_hexdigit());
        ok.then(|| SegmentName(name.to_string()))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The pid of the process that created the segment.
    fn pid(&self) -> Option<u32> {
        self.0.strip_prefix(PREFIX)?.split_once('-')?.0.parse().ok()
    }

    fn path(&self) -> std::path::PathBuf {
        std::path::Path::new(DIR).join(&self.0)
    }

    /// Removes the file; a name already gone is fine (both ends unlink).
    pub(crate) fn unlink(&self) {
        match std::fs::remove_file(self.path()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::debug!(segment = %self.0, "could not unlink a shared-memory segment: {e}"),
        }
    }
}

/// Segment files older than this whose process is gone are left over (a connector killed
/// between creating its segment and the acceptor unlinking it): set-up takes at most the
/// handshake timeout, 10 s by default.
pub(crate) const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes segment files of this user in `/dev/shm` that a process now gone created more
/// than [`STALE_AFTER`] ago; returns how many. A connector SIGKILLed while setting a
/// link up leaves its file behind (nobody else knows it); the next peer started on the
/// host clears it.
pub(crate) fn sweep_stale() -> usize {
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = std::fs::read_dir(DIR) else { return 0 };
    // SAFETY: geteuid cannot fail and touches no memory.
    let uid = unsafe { libc::geteuid() };
    let mut removed = 0;
    for entry in dir.flatten() {
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str().and_then(SegmentName::parse) else { continue };
        let Some(pid) = name.pid() else { continue };
        let Ok(meta) = entry.metadata() else { continue };
        let old = meta.modified().ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age > STALE_AFTER);
        let alive = std::path::Path::new("/proc").join(pid.to_string()).exists();
        if meta.uid() == uid && old && !alive {
            tracing::debug!(segment = name.as_str(), "removing a segment its creator left behind");
            name.unlink();
            removed += 1;
        }
    }
    removed
}

/// Removes a segment file when dropped, unless disarmed: a connector that fails or is
/// cancelled leaves nothing behind.
pub(crate) struct UnlinkGuard(pub(crate) Option<SegmentName>);

impl Drop for UnlinkGuard {
    fn drop(&mut self) {
        if let Some(name) = self.0.take() {
            name.unlink();
        }
    }
}

/// Creates, sizes (reserving its memory, so that a full `/dev/shm` fails here and not
/// with SIGBUS later) and maps a fresh segment file.
pub(crate) fn create(name: &SegmentName, ring_bytes: usize, token: [u64; 2]) -> io::Result<Mapping> {
    if !valid_ring_bytes(ring_bytes) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("ring of {ring_bytes} bytes")));
    }
    let len = segment_len(ring_bytes);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(name.path())?;
    let made = (|| {
        // SAFETY: plain system call on a descriptor `file` owns.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        let map = Mapping::map(&file, len, ring_bytes)?;
        map.init(token);
        Ok(map)
    })();
    if made.is_err() {
        name.unlink();
    }
    made
}

/// Opens and maps the segment a connector named in its hello, checks it is the one it
/// described, and unlinks it (both ends now hold it; nothing is left when they exit).
pub(crate) fn open(name: &SegmentName, ring_bytes: usize, token: [u64; 2]) -> Result<Mapping, String> {
    if !valid_ring_bytes(ring_bytes) {
        return Err(format!("ring of {ring_bytes} bytes"));
    }
    let len = segment_len(ring_bytes);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(name.path())
        .map_err(|e| format!("opening {}: {e}", name.as_str()))?;
    let meta = file.metadata().map_err(|e| format!("stat: {e}"))?;
    if !meta.is_file() || meta.len() != len as u64 {
        return Err(format!("segment is {} bytes, expected {len}", meta.len()));
    }
    let map = Mapping::map(&file, len, ring_bytes).map_err(|e| format!("mmap: {e}"))?;
    // Only a segment that is the one described is ours to unlink.
    map.check(token)?;
    name.unlink();
    Ok(map)
}

/// Held by tests that create segment files or look for leftovers in `/dev/shm`, so
/// that one test's file in flight is not another's leftover.
#[cfg(test)]
pub(crate) static FILES: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
pub(crate) fn files_lock() -> std::sync::MutexGuard<'static, ()> {
    FILES.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_outside_the_pattern_are_refused() {
        let good = SegmentName::fresh(0xabc);
        assert_eq!(SegmentName::parse(good.as_str()), Some(good));
        for bad in [
            "phalanx-1-../../etc/passwd",
            "phalanx-1-0123456789abcdef/x",
            "other-1-0123456789abcdef",
            "phalanx--0123456789abcdef",
            "phalanx-12-0123456789abcde",
            "phalanx-x-0123456789abcdef",
        ] {
            assert_eq!(SegmentName::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn create_open_unlinks_and_shares_memory() {
        let _files = files_lock();
        let name = SegmentName::fresh(0x5eed_0001);
        let a = create(&name, 4096, [1, 2]).unwrap();
        assert!(name.path().exists());
        let b = open(&name, 4096, [1, 2]).unwrap();
        assert!(!name.path().exists(), "opened segments are unlinked at once");
        a.closed_flag(Side::Acceptor).store(7, Ordering::SeqCst);
        assert_eq!(b.closed_flag(Side::Acceptor).load(Ordering::SeqCst), 7);
        a.ring_ctl(1).write.store(99, Ordering::SeqCst);
        assert_eq!(b.ring_ctl(1).write.load(Ordering::SeqCst), 99);
        // SAFETY (test): one byte inside ring 0's data of both mappings of one file.
        unsafe {
            *a.ring_data(0).add(4095) = 42;
            assert_eq!(*b.ring_data(0).add(4095), 42);
        }
    }

    #[test]
    fn open_checks_the_token_size_and_name() {
        let _files = files_lock();
        let name = SegmentName::fresh(0x5eed_0002);
        let _a = create(&name, 4096, [1, 2]).unwrap();
        let guard = UnlinkGuard(Some(name.clone()));
        assert!(open(&name, 8192, [1, 2]).unwrap_err().contains("bytes"));
        assert!(open(&name, 4096, [1, 3]).unwrap_err().contains("token"));
        // A segment that is not the one described is left to its owner.
        assert!(name.path().exists());
        drop(guard);
        assert!(!name.path().exists());
        assert!(open(&SegmentName::fresh(0x5eed_0003), 4096, [1, 2]).is_err());
    }

    #[test]
    fn a_dropped_guard_unlinks() {
        let _files = files_lock();
        let name = SegmentName::fresh(0x5eed_0004);
        let _a = create(&name, 4096, [0, 0]).unwrap();
        drop(UnlinkGuard(Some(name.clone())));
        assert!(!name.path().exists());
    }

    #[test]
    fn stale_segments_of_dead_processes_are_swept() {
        let _files = files_lock();
        // A pid that is not running: a child that has exited and been reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = SegmentName(format!("{PREFIX}{dead}-00000000000000aa"));
        let fresh = SegmentName(format!("{PREFIX}{dead}-00000000000000bb"));
        let mine = SegmentName::fresh(0x00000000000000cc);
        let old = std::time::SystemTime::now() - STALE_AFTER * 2;
        for (name, when) in [(&stale, old), (&fresh, std::time::SystemTime::now()), (&mine, old)] {
            let f = std::fs::File::create(name.path()).unwrap();
            f.set_modified(when).unwrap();
        }
        let removed = sweep_stale();
        assert!(removed >= 1);
        assert!(!stale.path().exists(), "an old file of a dead process is removed");
        assert!(fresh.path().exists(), "a recent one may still be in set-up (another PID namespace)");
        assert!(mine.path().exists(), "a live process's file stays");
        fresh.unlink();
        mine.unlink();
    }

    #[test]
    fn bad_ring_sizes_are_refused() {
        let _files = files_lock();
        assert!(Mapping::heap(100, [0, 0]).is_err());
        assert!(create(&SegmentName::fresh(0x5eed_0005), 1000, [0, 0]).is_err());
    }
}
