//! What the handles of started operations (`AllReduceHandle`, `P2pRequest`) share: the
//! operation runs, one thread waits for it with the GIL released, and its outcome is
//! kept, so a second `wait()` returns or raises the same.

use std::sync::Mutex;

use phalanx::comm::{PendingP2pRaw, PendingRaw};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::array::array;
use crate::errors::to_py;

/// A started operation as its handle sees it.
pub(crate) trait Started: Send + 'static {
    /// Blocks until it ends: its outcome and its bytes (the result, or the buffer as
    /// it was before on an error).
    fn wait(self) -> (phalanx::Result<()>, Vec<u8>);
    /// Whether it has ended (`wait` would not block).
    fn ended(&self) -> bool;
}

impl Started for PendingRaw {
    fn wait(self) -> (phalanx::Result<()>, Vec<u8>) {
        PendingRaw::wait(self)
    }
    fn ended(&self) -> bool {
        self.is_finished()
    }
}

impl Started for PendingP2pRaw {
    fn wait(self) -> (phalanx::Result<()>, Vec<u8>) {
        PendingP2pRaw::wait(self)
    }
    fn ended(&self) -> bool {
        self.is_done()
    }
}

enum State<P> {
    Running(Box<P>),
    Waiting,
    Done,
    Failed(PyErr),
}

/// A started operation, the array its result goes to (none for a send) and that
/// array's length in bytes when it started.
pub(crate) struct Handle<P> {
    state: Mutex<State<P>>,
    target: Option<Py<PyAny>>,
    len: usize,
    /// What runs, for messages ("all-reduce", "receive").
    what: &'static str,
}

impl<P: Started> Handle<P> {
    pub(crate) fn new(pending: P, target: Option<Py<PyAny>>, len: usize, what: &'static str) -> Handle<P> {
        Handle { state: Mutex::new(State::Running(Box::new(pending))), target, len, what }
    }

    /// Whether the result is written to an array (false for a send).
    pub(crate) fn writes(&self) -> bool {
        self.target.is_some()
    }

    /// Waits (GIL released) and writes the result into the target array; on an error
    /// raises it and leaves the array untouched. A second call repeats the outcome.
    pub(crate) fn wait(&self, py: Python<'_>) -> PyResult<()> {
        let pending = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match std::mem::replace(&mut *state, State::Waiting) {
                State::Running(p) => p,
                State::Waiting => {
                    return Err(PyRuntimeError::new_err(format!(
                        "another thread is already waiting on this {}",
                        self.what
                    )))
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

    /// Whether it has ended (`wait()` would not block).
    pub(crate) fn done(&self) -> bool {
        match &*self.state.lock().unwrap_or_else(|p| p.into_inner()) {
            State::Running(p) => p.ended(),
            State::Waiting => false,
            State::Done | State::Failed(_) => true,
        }
    }

    fn write_back(&self, py: Python<'_>, bytes: &[u8]) -> PyResult<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let a = array(target.bind(py), "array", true)?;
        if a.len != self.len || bytes.len() != self.len {
            return Err(PyValueError::new_err(format!("the array changed size while its {} ran", self.what)));
        }
        let raw = a.raw();
        // SAFETY: `a` keeps the memory alive during the copy.
        py.detach(move || unsafe { raw.as_mut_slice() }.copy_from_slice(bytes));
        drop(a);
        Ok(())
    }
}
