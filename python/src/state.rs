//! `phalanx.SharedState` (named arrays that peers keep bit-identical) and `SyncReport`.

use std::collections::HashMap;
use std::sync::Mutex;

use phalanx::state::SharedState as CoreState;
use phalanx::DType;
use pyo3::exceptions::PyKeyError;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes};

use crate::array::{array, numpy_dtype};

/// What a shared-state sync did on this peer.
#[pyclass(frozen, module = "phalanx", get_all)]
pub(crate) struct SyncReport {
    /// Tensors this peer received.
    tensors_received: usize,
    /// Bytes this peer received.
    bytes_received: usize,
    /// Tensors this peer sent.
    tensors_sent: usize,
}

impl From<phalanx::comm::SyncReport> for SyncReport {
    fn from(r: phalanx::comm::SyncReport) -> Self {
        SyncReport {
            tensors_received: r.tensors_received,
            bytes_received: r.bytes_received,
            tensors_sent: r.tensors_sent,
        }
    }
}

#[pymethods]
impl SyncReport {
    fn __repr__(&self) -> String {
        format!(
            "phalanx.SyncReport(tensors_received={}, bytes_received={}, tensors_sent={})",
            self.tensors_received, self.bytes_received, self.tensors_sent
        )
    }
}

pub(crate) struct StateInner {
    pub(crate) state: CoreState,
    shapes: HashMap<String, Vec<usize>>,
}

/// Named arrays plus a revision that peers keep bit-identical with
/// `Communicator.sync_shared_state`.
///
/// `state[name] = array` copies the array in (any supported element type and shape);
/// `state[name]` returns a numpy copy. Bump `revision` whenever the content changes
/// (e.g. every step). Every peer must insert the same names in the same order, with the
/// same sizes: a joiner inserts placeholders (zeros) that a sync overwrites.
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct SharedState {
    inner: Mutex<StateInner>,
}

/// `state.insert(name, data)` for a run-time `dtype`.
pub(crate) fn insert_typed(state: &mut CoreState, name: &str, dtype: DType, bytes: &[u8]) {
    state.insert_raw(name, dtype, bytes);
}

/// Tensor `name`'s element type and bytes.
pub(crate) fn get_typed<'a>(state: &'a CoreState, name: &str) -> Option<(DType, &'a [u8])> {
    state.get_raw(name)
}

impl SharedState {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, StateInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[pymethods]
impl SharedState {
    /// An empty state at revision 0.
    #[new]
    fn new() -> Self {
        SharedState { inner: Mutex::new(StateInner { state: CoreState::new(), shapes: HashMap::new() }) }
    }

    /// Copies `value` (an array of a supported element type) in as tensor `name`,
    /// replacing any tensor of that name.
    fn __setitem__(&self, name: &str, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let a = array(value, "value", false)?;
        let mut inner = self.lock();
        insert_typed(&mut inner.state, name, a.dtype, a.bytes());
        inner.shapes.insert(name.to_string(), a.shape.clone());
        Ok(())
    }

    /// A numpy copy of tensor `name`, with the shape it was inserted with.
    fn __getitem__<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let (dtype, bytes, shape) = {
            let inner = self.lock();
            let Some((dtype, bytes)) = get_typed(&inner.state, name) else {
                return Err(PyKeyError::new_err(name.to_string()));
            };
            let shape = inner.shapes.get(name).cloned().unwrap_or_else(|| vec![bytes.len() / dtype.size()]);
            (dtype, PyByteArray::new(py, bytes), shape)
        };
        let numpy = py.import("numpy")?;
        let flat = numpy.call_method1("frombuffer", (bytes, numpy_dtype(py, dtype)?))?;
        flat.call_method1("reshape", (shape,))
    }

    fn __contains__(&self, name: &str) -> bool {
        self.lock().state.names().any(|n| n == name)
    }

    fn __len__(&self) -> usize {
        self.lock().state.len()
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(pyo3::types::PyList::new(py, self.keys())?.into_any().try_iter()?.into_any())
    }

    /// The tensors' names, in insertion order.
    fn keys(&self) -> Vec<String> {
        self.lock().state.names().map(str::to_string).collect()
    }

    /// The state's revision. Bump it whenever the content changes; a sync adopts the
    /// revision of the content it agrees on.
    #[getter]
    fn revision(&self) -> u64 {
        self.lock().state.revision
    }

    #[setter]
    fn set_revision(&self, revision: u64) {
        self.lock().state.revision = revision;
    }

    /// One 32-byte BLAKE3 hash of the whole state (names, element types, bytes; not the
    /// revision): equal digests mean bit-identical states.
    fn digest<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.lock().state.digest())
    }

    /// `digest()` as 64 hexadecimal digits.
    fn hexdigest(&self) -> String {
        self.lock().state.digest().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn __repr__(&self) -> String {
        let inner = self.lock();
        format!(
            "phalanx.SharedState(keys={:?}, revision={})",
            inner.state.names().collect::<Vec<_>>(),
            inner.state.revision
        )
    }
}
