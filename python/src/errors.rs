//! The Python exceptions of phalanx and the one mapping from core errors to them:
//! each `phalanx::ErrorKind` has its class (`InvalidArgument` is Python's `ValueError`).

use phalanx::{Error, ErrorKind};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;

create_exception!(
    phalanx,
    PhalanxError,
    PyException,
    "Base class of the errors phalanx raises for a failed collective or membership call. After any \
     error from a collective, the arrays passed to it hold exactly what they held before the call."
);
create_exception!(
    phalanx,
    PeerLostError,
    PhalanxError,
    "A peer crashed, hung or left while the collective ran (attribute `rank`: its rank in that view). \
     The array was restored; call `update_topology()` and retry, or connect with `retry_attempts > 1`."
);
create_exception!(
    phalanx,
    AbortedError,
    PhalanxError,
    "The collective was aborted (another rank failed); the array was restored."
);
create_exception!(
    phalanx,
    MismatchError,
    PhalanxError,
    "Ranks called different collectives, sizes, element types or operators; it failed on every rank."
);
create_exception!(
    phalanx,
    RemovedError,
    PhalanxError,
    "This peer is no longer a member (removed after a timeout, or the master is unreachable); connect again."
);
create_exception!(
    phalanx,
    JoinFailedError,
    PhalanxError,
    "Joining failed: the master refused, could not be reached, or the join timed out."
);
create_exception!(phalanx, ProtocolError, PhalanxError, "A peer broke the protocol (sent something malformed).");
create_exception!(phalanx, TransportError, PhalanxError, "A transport failed in a way not attributable to one peer.");
create_exception!(
    phalanx,
    DeviceError,
    PhalanxError,
    "The GPU path failed: no usable NCCL (the paths tried, the version found), or a device call failed."
);
create_exception!(
    phalanx,
    PhalanxRuntimeError,
    PhalanxError,
    "The call cannot run where it was made, though its arguments are fine: phalanx could not start its \
     threads, or a blocking call came from a thread running an async (tokio) runtime. Nothing was sent; \
     retrying from the same place fails the same way."
);

/// The Python exception for a core error.
pub(crate) fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let msg = e.to_string();
    match e.kind() {
        ErrorKind::PeerLost => {
            let err = PeerLostError::new_err(msg);
            if let Error::PeerLost { rank, .. } = e {
                // Best effort: the message says the rank too.
                let _ = err.value(py).setattr("rank", rank);
            }
            err
        }
        ErrorKind::Aborted => AbortedError::new_err(msg),
        ErrorKind::Mismatch => MismatchError::new_err(msg),
        ErrorKind::Removed => RemovedError::new_err(msg),
        ErrorKind::JoinFailed => JoinFailedError::new_err(msg),
        ErrorKind::Protocol => ProtocolError::new_err(msg),
        // Reads as Python's own argument errors: the reason, without the "invalid argument" prefix.
        ErrorKind::InvalidArgument => match e {
            Error::InvalidArgument(reason) => PyValueError::new_err(reason),
            _ => PyValueError::new_err(msg),
        },
        ErrorKind::Transport => TransportError::new_err(msg),
        ErrorKind::Runtime => PhalanxRuntimeError::new_err(msg),
        ErrorKind::Device => DeviceError::new_err(msg),
        // A kind newer than this mapping still raises a phalanx error.
        _ => PhalanxError::new_err(msg),
    }
}

/// Why a communicator call failed before Python sees it (built without the GIL).
pub(crate) enum Failure {
    Core(Error),
    Left,
}

impl Failure {
    pub(crate) fn into_py(self, py: Python<'_>) -> PyErr {
        match self {
            Failure::Core(e) => to_py(py, e),
            Failure::Left => PhalanxError::new_err("this communicator has left the group; connect again"),
        }
    }
}

/// Adds the exception classes to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("PhalanxError", py.get_type::<PhalanxError>())?;
    m.add("PeerLostError", py.get_type::<PeerLostError>())?;
    m.add("AbortedError", py.get_type::<AbortedError>())?;
    m.add("MismatchError", py.get_type::<MismatchError>())?;
    m.add("RemovedError", py.get_type::<RemovedError>())?;
    m.add("JoinFailedError", py.get_type::<JoinFailedError>())?;
    m.add("ProtocolError", py.get_type::<ProtocolError>())?;
    m.add("DeviceError", py.get_type::<DeviceError>())?;
    m.add("TransportError", py.get_type::<TransportError>())?;
    m.add("PhalanxRuntimeError", py.get_type::<PhalanxRuntimeError>())?;
    Ok(())
}
