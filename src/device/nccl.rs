//! The NCCL library, loaded at run time (feature `nccl`): [`NcclLibrary::load`] tries
//! the [`discovery`] candidates in order, checks each one's symbols and
//! version through [`gating`] before calling into it, and keeps the typed
//! function pointers. No CUDA toolkit or GPU is needed to build this, and a missing or
//! unusable library is a [`DeviceError`], never a panic.
//!
//! The ABI types (`ncclUniqueId`, `ncclConfig_t`, the data-type and operator enums) are
//! cudarc's bindings of NCCL 2.28; cudarc's own loader is not used (it panics on a
//! missing library and only searches by name). Result codes are read as plain `c_int`s,
//! never as a Rust enum, so an unknown code from a newer NCCL cannot be undefined
//! behaviour.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};

use cudarc::nccl::sys as ffi;

use super::discovery::{self, Candidate};
use super::error::{Attempt, DeviceError};
use super::gating::{self, Capabilities, NcclVersion};

pub mod comm;
pub mod cuda;
mod memory;
pub mod slices;

pub use comm::{DeviceBuffer, NcclBackend, NcclComm};

/// `ncclSuccess`.
pub(crate) const SUCCESS: c_int = 0;
/// `ncclInProgress`: a non-blocking call was enqueued and has not finished.
pub(crate) const IN_PROGRESS: c_int = 7;

type Res = c_int;
type Comm = ffi::ncclComm_t;
type Stream = ffi::cudaStream_t;
type DT = ffi::ncclDataType_t;
type Op = ffi::ncclRedOp_t;

/// The function pointers phalanx calls: the required ones always there, the optional
/// ones `None` when the library lacks them. Signatures are NCCL 2.28's (`nccl.h`), with
/// `ncclResult_t` read as `c_int`.
#[allow(clippy::type_complexity)]
pub(crate) struct Fns {
    pub get_error_string: unsafe extern "C" fn(Res) -> *const c_char,
    pub get_unique_id: unsafe extern "C" fn(*mut ffi::ncclUniqueId) -> Res,
    pub comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, ffi::ncclUniqueId, c_int) -> Res,
    pub comm_destroy: unsafe extern "C" fn(Comm) -> Res,
    pub all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, DT, Op, Comm, Stream) -> Res,
    pub reduce_scatter: unsafe extern "C" fn(*const c_void, *mut c_void, usize, DT, Op, Comm, Stream) -> Res,
    pub all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, DT, Comm, Stream) -> Res,
    pub broadcast: unsafe extern "C" fn(*const c_void, *mut c_void, usize, DT, c_int, Comm, Stream) -> Res,
    pub reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, DT, Op, c_int, Comm, Stream) -> Res,
    pub send: unsafe extern "C" fn(*const c_void, usize, DT, c_int, Comm, Stream) -> Res,
    pub recv: unsafe extern "C" fn(*mut c_void, usize, DT, c_int, Comm, Stream) -> Res,
    pub group_start: unsafe extern "C" fn() -> Res,
    pub group_end: unsafe extern "C" fn() -> Res,
    pub init_rank_config:
        Option<unsafe extern "C" fn(*mut Comm, c_int, ffi::ncclUniqueId, c_int, *mut ffi::ncclConfig_t) -> Res>,
    pub abort: Option<unsafe extern "C" fn(Comm) -> Res>,
    pub get_async_error: Option<unsafe extern "C" fn(Comm, *mut Res) -> Res>,
    pub shrink: Option<unsafe extern "C" fn(Comm, *mut c_int, c_int, *mut Comm, *mut ffi::ncclConfig_t, c_int) -> Res>,
    pub revoke: Option<unsafe extern "C" fn(Comm, c_int) -> Res>,
    pub grow: Option<
        unsafe extern "C" fn(Comm, c_int, *const ffi::ncclUniqueId, c_int, *mut Comm, *mut ffi::ncclConfig_t) -> Res,
    >,
}

/// A loaded, checked NCCL.
pub struct NcclLibrary {
    path: PathBuf,
    version: NcclVersion,
    caps: Capabilities,
    pub(crate) fns: Fns,
    // Keeps the library mapped while the function pointers above live (declared last:
    // dropped after them).
    _lib: libloading::Library,
}

impl std::fmt::Debug for NcclLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclLibrary")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("capabilities", &self.caps)
            .finish_non_exhaustive()
    }
}

/// Reads one symbol as a value of type `T` (a function pointer type).
///
/// # Safety
/// `T` must be the symbol's true type: the caller names the NCCL signature it was
/// declared with in `nccl.h`.
unsafe fn symbol<T: Copy>(lib: &libloading::Library, name: &str) -> Option<T> {
    // SAFETY: forwarded to the caller (the type); `get` itself only looks the name up.
    unsafe { lib.get::<T>(name).ok().map(|s| *s) }
}

impl NcclLibrary {
    /// Loads the first usable NCCL among this process's discovery candidates
    /// (`PHALANX_NCCL_LIBRARY`, the Python wheel, `libnccl.so.2`).
    pub fn load() -> Result<NcclLibrary, DeviceError> {
        Self::load_from(&discovery::discover())
    }

    /// Loads the first usable NCCL among `candidates`, in order. A candidate that cannot
    /// be opened is skipped (it is listed in [`DeviceError::NotFound`] if none opens); the
    /// first one that opens but fails the gating (not NCCL, too old, missing symbols) is
    /// the error when no later candidate is usable.
    pub fn load_from(candidates: &[Candidate]) -> Result<NcclLibrary, DeviceError> {
        let mut tried = Vec::new();
        let mut refused: Option<DeviceError> = None;
        for c in candidates {
            match Self::open(&c.path) {
                Ok(lib) => return Ok(lib),
                Err(OpenError::Open(reason)) => {
                    tried.push(Attempt { source: c.source, path: c.path.clone(), reason });
                }
                Err(OpenError::Refused(e)) => {
                    tried.push(Attempt { source: c.source, path: c.path.clone(), reason: e.to_string() });
                    refused.get_or_insert(e);
                }
            }
        }
        Err(refused.unwrap_or(DeviceError::NotFound { tried }))
    }

    fn open(path: &Path) -> Result<NcclLibrary, OpenError> {
        // SAFETY: loading a shared library runs its initialisers. The candidates are the
        // user's explicit choice, an NCCL wheel, or the system's libnccl: libraries meant
        // to be loaded into this process.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| OpenError::Open(chain(&e)))?;
        let has = |name: &str| {
            // SAFETY: only the symbol's presence is read, as an untyped address.
            unsafe { symbol::<*const c_void>(&lib, name) }.is_some()
        };
        let gated = gating::check(path, &has, || {
            // SAFETY: `check` calls this only once `ncclGetVersion` is known to exist;
            // its signature is `ncclResult_t ncclGetVersion(int *version)`.
            let get_version = unsafe { symbol::<unsafe extern "C" fn(*mut c_int) -> Res>(&lib, "ncclGetVersion") };
            let get_version = get_version
                .ok_or(DeviceError::NotNccl { path: path.to_path_buf(), missing: vec!["ncclGetVersion"] })?;
            let mut code: c_int = 0;
            // SAFETY: a valid out-pointer to an int.
            let r = unsafe { get_version(&mut code) };
            if r != SUCCESS {
                return Err(DeviceError::Call { call: "ncclGetVersion", code: r, message: "failed".into() });
            }
            Ok(code)
        })
        .map_err(OpenError::Refused)?;
        let fns = Self::resolve(&lib).ok_or_else(|| {
            // `check` saw every required symbol: a failure here means the library changed
            // under us; report it as missing symbols rather than trusting it.
            OpenError::Refused(DeviceError::MissingSymbols {
                path: path.to_path_buf(),
                version: gated.version,
                missing: gating::REQUIRED.iter().copied().filter(|s| !has(s)).collect(),
            })
        })?;
        Ok(NcclLibrary { path: path.to_path_buf(), version: gated.version, caps: gated.capabilities, fns, _lib: lib })
    }

    /// The typed table, `None` if a required symbol is missing.
    fn resolve(lib: &libloading::Library) -> Option<Fns> {
        // SAFETY: each type below is the symbol's signature in NCCL 2.28's nccl.h (as
        // bindgen'ed by cudarc), with `ncclResult_t` read as the C `int` it is.
        unsafe {
            Some(Fns {
                get_error_string: symbol(lib, "ncclGetErrorString")?,
                get_unique_id: symbol(lib, "ncclGetUniqueId")?,
                comm_init_rank: symbol(lib, "ncclCommInitRank")?,
                comm_destroy: symbol(lib, "ncclCommDestroy")?,
                all_reduce: symbol(lib, "ncclAllReduce")?,
                reduce_scatter: symbol(lib, "ncclReduceScatter")?,
                all_gather: symbol(lib, "ncclAllGather")?,
                broadcast: symbol(lib, "ncclBroadcast")?,
                reduce: symbol(lib, "ncclReduce")?,
                send: symbol(lib, "ncclSend")?,
                recv: symbol(lib, "ncclRecv")?,
                group_start: symbol(lib, "ncclGroupStart")?,
                group_end: symbol(lib, "ncclGroupEnd")?,
                init_rank_config: symbol(lib, "ncclCommInitRankConfig"),
                abort: symbol(lib, "ncclCommAbort"),
                get_async_error: symbol(lib, "ncclCommGetAsyncError"),
                shrink: symbol(lib, "ncclCommShrink"),
                revoke: symbol(lib, "ncclCommRevoke"),
                grow: symbol(lib, "ncclCommGrow"),
            })
        }
    }

    /// The file that was loaded.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its version (`ncclGetVersion`).
    pub fn version(&self) -> NcclVersion {
        self.version
    }

    /// Its optional capabilities.
    pub fn capabilities(&self) -> Capabilities {
        self.caps
    }

    /// NCCL's message for a result code.
    pub(crate) fn message(&self, code: c_int) -> String {
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code
        // (NULL is checked all the same).
        let p = unsafe { (self.fns.get_error_string)(code) };
        if p.is_null() {
            return format!("NCCL error {code}");
        }
        // SAFETY: non-NULL, NUL-terminated, static.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// `Ok` for success and for `ncclInProgress` (a non-blocking call enqueued: the
    /// caller waits on the async state), else the typed error of `call`.
    pub(crate) fn check(&self, call: &'static str, code: c_int) -> Result<(), DeviceError> {
        match code {
            SUCCESS | IN_PROGRESS => Ok(()),
            _ => Err(DeviceError::Call { call, code, message: self.message(code) }),
        }
    }
}

/// An error and its sources, `a: b: c` (libloading keeps dlerror's text in the source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

enum OpenError {
    /// The file could not be opened (missing, wrong architecture, unresolved deps).
    Open(String),
    /// It opened but is not a usable NCCL.
    Refused(DeviceError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::discovery::ENV_VAR;

    fn env(path: &str) -> Vec<Candidate> {
        vec![Candidate { source: ENV_VAR, path: PathBuf::from(path) }]
    }

    #[test]
    fn a_variable_pointing_at_nothing_is_not_found_with_the_path() {
        let e = NcclLibrary::load_from(&env("/nonexistent/libnccl.so.2")).unwrap_err();
        let DeviceError::NotFound { tried } = &e else { panic!("{e:?}") };
        assert_eq!(tried.len(), 1);
        assert_eq!(tried[0].path, PathBuf::from("/nonexistent/libnccl.so.2"));
        assert_eq!(tried[0].source, ENV_VAR);
        assert!(tried[0].reason.contains("No such file"), "dlerror's reason is kept: {}", tried[0].reason);
        let msg = crate::Error::from(e.clone()).to_string();
        assert!(msg.contains("/nonexistent/libnccl.so.2") && msg.contains("PHALANX_NCCL_LIBRARY"), "{msg}");
    }

    /// A real shared library of this machine that is not NCCL (libm, else libc).
    fn not_nccl() -> Option<PathBuf> {
        [
            "/lib/x86_64-linux-gnu/libm.so.6",
            "/usr/lib/x86_64-linux-gnu/libm.so.6",
            "/lib64/libm.so.6",
            "/lib/x86_64-linux-gnu/libc.so.6",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    }

    #[test]
    fn a_variable_pointing_at_another_library_is_not_nccl() {
        let Some(libm) = not_nccl() else { return };
        let e = NcclLibrary::load_from(&env(libm.to_str().unwrap())).unwrap_err();
        let DeviceError::NotNccl { path, missing } = &e else { panic!("{e:?}") };
        assert_eq!(path, &libm);
        assert_eq!(missing.len(), gating::REQUIRED.len());
        assert_eq!(e.library(), Some(libm.as_path()));
        assert_eq!(crate::Error::from(e).kind(), crate::error::ErrorKind::Device);
    }

    #[test]
    fn every_candidate_is_listed_when_none_opens() {
        let candidates = vec![
            Candidate {
                source: "python wheel",
                path: "/nonexistent/site-packages/nvidia/nccl/lib/libnccl.so.2".into(),
            },
            Candidate { source: "system", path: "libnccl-that-does-not-exist.so.2".into() },
        ];
        let e = NcclLibrary::load_from(&candidates).unwrap_err();
        let DeviceError::NotFound { tried } = &e else { panic!("{e:?}") };
        assert_eq!(tried.iter().map(|a| a.source).collect::<Vec<_>>(), vec!["python wheel", "system"]);
        assert!(NcclLibrary::load_from(&[]).is_err(), "no candidate at all is an error too");
    }

    #[test]
    fn a_refused_library_is_the_error_even_if_later_ones_are_missing() {
        let Some(libm) = not_nccl() else { return };
        let candidates = vec![
            Candidate { source: "python wheel", path: libm.clone() },
            Candidate { source: "system", path: "libnccl-that-does-not-exist.so.2".into() },
        ];
        let e = NcclLibrary::load_from(&candidates).unwrap_err();
        assert!(matches!(e, DeviceError::NotNccl { .. }), "{e:?}");
    }

    #[test]
    fn loading_on_this_machine_never_panics() {
        // With no NCCL here this is a NotFound listing the system name; on a machine
        // with one it loads. Either way: no panic.
        match NcclLibrary::load() {
            Ok(lib) => assert!(lib.version() >= gating::MIN_VERSION),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }

    /// A real libnccl, opt-in: `PHALANX_TEST_NCCL=/path/to/libnccl.so.2` (2.28 or newer,
    /// e.g. from the nvidia-nccl-cu12 wheel). It loads through the gating, its version
    /// is read, a unique id is made; a 1-rank init runs where there is a GPU and is a
    /// typed error (never a panic) where there is none. Skipped when unset.
    #[test]
    fn a_real_nccl_loads_and_fails_typed_without_a_gpu() {
        use crate::device::{DeviceBackend, DeviceComm};
        let Some(path) = std::env::var_os("PHALANX_TEST_NCCL") else { return };
        let lib = NcclLibrary::load_from(&[Candidate { source: ENV_VAR, path: path.into() }]).unwrap();
        assert!(lib.version() >= gating::MIN_VERSION, "{lib:?}");
        let caps = lib.capabilities();
        assert!(caps.init_config && caps.abort && caps.async_error, "every 2.28 has these: {caps:?}");
        // SAFETY: the legacy default stream.
        let backend = unsafe { comm::NcclBackend::new(std::sync::Arc::new(lib), std::ptr::null_mut()) };
        let id = backend.unique_id().unwrap();
        assert_ne!(id.0, [0; 128], "NCCL filled the id");
        match backend.init(&id, 0, 1) {
            Ok(mut c) => {
                assert_eq!((c.rank(), c.size()), (0, 1));
                c.abort().unwrap();
            }
            Err(e) => assert!(matches!(e, DeviceError::Call { call: "ncclCommInitRankConfig", .. }), "{e:?}"),
        }
    }

    /// A real NCCL older than 2.28, opt-in: `PHALANX_TEST_NCCL_OLD=/path/to/libnccl.so.2`
    /// (e.g. from nvidia-nccl-cu11 2.21.5). Refused as too old with the version it reads.
    #[test]
    fn a_real_old_nccl_is_refused_with_its_version() {
        let Some(path) = std::env::var_os("PHALANX_TEST_NCCL_OLD") else { return };
        let e = NcclLibrary::load_from(&[Candidate { source: ENV_VAR, path: path.into() }]).unwrap_err();
        let DeviceError::TooOld { found, minimum, .. } = e else { panic!("{e:?}") };
        assert!(found < minimum && found.major == 2, "{found}");
    }
}
