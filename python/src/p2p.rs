//! `Communicator.isend` / `Communicator.irecv` and the `P2pRequest` they return:
//! point-to-point messages that travel while Python computes.

use phalanx::comm::PendingP2pRaw;
use pyo3::prelude::*;

use crate::array;
use crate::communicator::Communicator;
use crate::handle::Handle;

/// A message started by `Communicator.isend` or `Communicator.irecv`. Dropping it does
/// not cancel the message: it runs on and its outcome is discarded (a receive still
/// takes its message, and never writes the array).
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct P2pRequest {
    /// A receive writes the array given to `irecv`; a send writes nothing.
    inner: Handle<PendingP2pRaw>,
}

pub(crate) fn isend(
    comm: &Communicator,
    py: Python<'_>,
    to: usize,
    tag: u32,
    obj: &Bound<'_, PyAny>,
) -> PyResult<P2pRequest> {
    let a = array::array(obj, "array", false)?;
    let (raw, dtype, len) = (a.raw(), a.dtype, a.len);
    // SAFETY: `a` keeps the memory alive during the copy.
    let pending = comm.with(py, move |c| c.isend_raw(to, tag, unsafe { raw.as_slice() }.to_vec(), dtype))?;
    drop(a);
    Ok(P2pRequest { inner: Handle::new(pending, None, len, "send") })
}

pub(crate) fn irecv(
    comm: &Communicator,
    py: Python<'_>,
    from: usize,
    tag: u32,
    obj: &Bound<'_, PyAny>,
) -> PyResult<P2pRequest> {
    let a = array::array(obj, "array", true)?;
    let (dtype, len) = (a.dtype, a.len);
    drop(a);
    let pending = comm.with(py, move |c| c.irecv_raw(from, tag, vec![0u8; len], dtype))?;
    Ok(P2pRequest { inner: Handle::new(pending, Some(obj.clone().unbind()), len, "receive") })
}

#[pymethods]
impl P2pRequest {
    /// Waits for the message (GIL released). For a receive, writes the message into the
    /// array given to `irecv`; on an error (PeerLostError, MismatchError, ...) raises
    /// and leaves the array untouched. Calling it again returns (or raises) the same
    /// outcome.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        self.inner.wait(py)
    }

    /// Whether the message has ended (`wait()` would not block).
    fn done(&self) -> bool {
        self.inner.done()
    }

    fn __repr__(&self) -> String {
        let kind = if self.inner.writes() { "irecv" } else { "isend" };
        format!("phalanx.P2pRequest({kind}, done={})", self.done())
    }
}
