//! `Communicator.isend` / `Communicator.irecv` and the `P2pRequest` they return:
//! point-to-point messages that travel while Python computes.

use std::sync::Mutex;

use phalanx::comm::PendingP2pRaw;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::array::{self, array};
use crate::communicator::Communicator;
use crate::errors::to_py;

enum State {
    Running(Box<PendingP2pRaw>),
    Waiting,
    Done,
    Failed(PyErr),
}

/// A message started by `Communicator.isend` or `Communicator.irecv`. Dropping it does
/// not cancel the message: it runs on and its outcome is discarded (a receive still
/// takes its message, and never writes the array).
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct P2pRequest {
    state: Mutex<State>,
    /// The receive's array (None for a send), written by `wait()`.
    target: Option<Py<PyAny>>,
    len: usize,
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
    Ok(P2pRequest { state: Mutex::new(State::Running(Box::new(pending))), target: None, len })
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
    Ok(P2pRequest { state: Mutex::new(State::Running(Box::new(pending))), target: Some(obj.clone().unbind()), len })
}

#[pymethods]
impl P2pRequest {
    /// Waits for the message (GIL released). For a receive, writes the message into the
    /// array given to `irecv`; on an error (PeerLostError, MismatchError, ...) raises
    /// and leaves the array untouched. Calling it again returns (or raises) the same
    /// outcome.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        let pending = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match std::mem::replace(&mut *state, State::Waiting) {
                State::Running(p) => p,
                State::Waiting => {
                    return Err(PyRuntimeError::new_err("another thread is already waiting on this request"))
                }
                State::Done => {
                    *state = State::Done;
                    return Ok(());
                }
                State::Failed(e) => {
                    *state = State::Failed(e.clone_ref(py));
                    return Err(e);
                }
            }
        };
        let (result, bytes) = py.detach(move || pending.wait());
        let outcome = match result {
            Err(e) => Err(to_py(py, e)),
            Ok(()) => self.write_back(py, &bytes),
        };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *state = match &outcome {
            Ok(()) => State::Done,
            Err(e) => State::Failed(e.clone_ref(py)),
        };
        outcome
    }

    /// Whether the message has ended (`wait()` would not block).
    fn done(&self) -> bool {
        match &*self.state.lock().unwrap_or_else(|p| p.into_inner()) {
            State::Running(p) => p.is_done(),
            State::Waiting => false,
            State::Done | State::Failed(_) => true,
        }
    }

    fn __repr__(&self) -> String {
        let kind = if self.target.is_some() { "irecv" } else { "isend" };
        format!("phalanx.P2pRequest({kind}, done={})", self.done())
    }
}

impl P2pRequest {
    fn write_back(&self, py: Python<'_>, bytes: &[u8]) -> PyResult<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let a = array(target.bind(py), "array", true)?;
        if a.len != self.len || bytes.len() != self.len {
            return Err(PyValueError::new_err("the array changed size while its receive ran"));
        }
        let raw = a.raw();
        // SAFETY: `a` keeps the memory alive during the copy.
        py.detach(move || unsafe { raw.as_mut_slice() }.copy_from_slice(bytes));
        drop(a);
        Ok(())
    }
}
