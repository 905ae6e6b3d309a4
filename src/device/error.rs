//! [`DeviceError`]: what went wrong on the device (GPU) path, carried by
//! [`crate::Error::Device`].

use std::path::PathBuf;

use super::gating::NcclVersion;

/// One place the loader looked for libnccl, and why it was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Where the candidate came from: `"PHALANX_NCCL_LIBRARY"`, `"python wheel"` or
    /// `"system"`.
    pub source: &'static str,
    /// The path (or library name, for the system search) that was tried.
    pub path: PathBuf,
    /// Why it was not used (the loader's message).
    pub reason: String,
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.path.display(), self.source, self.reason)
    }
}

/// Lists attempts as `a; b; c` for the error messages.
fn list(attempts: &[Attempt]) -> String {
    if attempts.is_empty() {
        return "no candidate".into();
    }
    attempts.iter().map(Attempt::to_string).collect::<Vec<_>>().join("; ")
}

/// What went wrong on the device path. Every variant says what was tried, what was
/// found and what to do; none is retryable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// No candidate library could be opened.
    #[error(
        "no NCCL library could be loaded; tried: {}. Install NCCL (`pip install nvidia-nccl-cu12` \
         or the distribution's libnccl2) or set PHALANX_NCCL_LIBRARY to the path of libnccl.so.2",
        list(.tried)
    )]
    NotFound {
        /// Every candidate, in discovery order, with why it failed.
        tried: Vec<Attempt>,
    },
    /// A library was opened but lacks symbols every NCCL has: it is not NCCL.
    #[error(
        "{} is not an NCCL library: it lacks {}. Point PHALANX_NCCL_LIBRARY at libnccl.so.2",
        .path.display(), .missing.join(", ")
    )]
    NotNccl {
        /// The library that was opened.
        path: PathBuf,
        /// The required symbols it lacks.
        missing: Vec<&'static str>,
    },
    /// The library is NCCL (it has `ncclGetVersion`) but lacks symbols phalanx calls.
    #[error(
        "{} (NCCL {version}) lacks {}: the build is incomplete or stripped; install a full NCCL \
         or point PHALANX_NCCL_LIBRARY at one",
        .path.display(), .missing.join(", ")
    )]
    MissingSymbols {
        /// The library that was opened.
        path: PathBuf,
        /// The version it reports.
        version: NcclVersion,
        /// The required symbols it lacks.
        missing: Vec<&'static str>,
    },
    /// The library is NCCL but older than the oldest phalanx supports.
    #[error(
        "{} is NCCL {found}, older than the {minimum} phalanx needs; install a newer NCCL \
         (`pip install -U nvidia-nccl-cu12`) or point PHALANX_NCCL_LIBRARY at one",
        .path.display()
    )]
    TooOld {
        /// The library that was opened.
        path: PathBuf,
        /// The version it reports (`ncclGetVersion`).
        found: NcclVersion,
        /// The oldest supported version.
        minimum: NcclVersion,
    },
    /// The operation needs a capability this backend or library lacks (say, a shrink
    /// on an NCCL without `ncclCommShrink`); the caller should fall back (a fresh init).
    #[error("{operation} is not supported here: {hint}")]
    Unsupported {
        /// The operation asked for.
        operation: &'static str,
        /// What to do instead.
        hint: String,
    },
    /// An NCCL (or stand-in) call returned an error.
    #[error("{call} failed with NCCL error {code}: {message}")]
    Call {
        /// The function that failed.
        call: &'static str,
        /// NCCL's result code (`ncclResult_t`), 0 never.
        code: i32,
        /// NCCL's string for the code, or the stand-in's reason.
        message: String,
    },
    /// The communicator was aborted (by this rank or because a peer was lost); it must be
    /// re-created (shrink or fresh init) before collectives can run again.
    #[error("device communicator aborted: {reason}; re-create it over the survivors")]
    Aborted {
        /// Why.
        reason: String,
    },
    /// The arguments do not fit the communicator (lengths, ranks); nothing ran.
    #[error("invalid device argument: {0}")]
    InvalidArgument(String),
    /// The CUDA driver (`libcuda.so.1`, for device memory and stream waits) could not be
    /// loaded, or lacks a function phalanx calls.
    #[error(
        "no usable CUDA driver; tried: {}. Install the NVIDIA driver (it provides libcuda.so.1) \
         on a machine with a GPU",
        list(.tried)
    )]
    NoDriver {
        /// Every library name tried, with why it failed.
        tried: Vec<Attempt>,
    },
    /// A CUDA driver call failed.
    #[error("{call} failed with CUDA error {code}: {message}")]
    Cuda {
        /// The function that failed.
        call: &'static str,
        /// The driver's result code (`CUresult`), 0 never.
        code: i32,
        /// The driver's string for the code.
        message: String,
    },
}

impl DeviceError {
    /// The path of the library this error is about, if it is about one.
    pub fn library(&self) -> Option<&std::path::Path> {
        match self {
            DeviceError::NotNccl { path, .. }
            | DeviceError::MissingSymbols { path, .. }
            | DeviceError::TooOld { path, .. } => Some(path),
            _ => None,
        }
    }
}
