//! The FSSDP layer's token exchanges started from Python, so that they overlap compute:
//! `ExpertLayer.dispatch_start` returns a `DispatchHandle` whose `wait()` gives the
//! `Dispatched`, and `ExpertLayer.combine_start` a `CombineHandle` whose `wait()` gives
//! the rows (`phalanx::moe::PendingDispatch`, `PendingCombine`). Each `wait()` releases
//! the GIL; its outcome is kept, so a second `wait()` returns or raises the same.

use std::sync::Mutex;

use phalanx::moe::{Dispatched as CoreDispatched, PendingCombine, PendingDispatch};
use phalanx::{DType, Element};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::array::array as array_ref;
use crate::errors::to_py;
use crate::moe_layer::{expert_list, Dispatched, ExpertLayer, Rows};
use crate::sparse::to_numpy;

/// A started exchange, whatever its element type.
trait Exchange: Send + 'static {
    type Out: Send + 'static;
    fn finished(&self) -> bool;
    fn wait(self: Box<Self>) -> phalanx::Result<Self::Out>;
}

impl<T: Element> Exchange for PendingDispatch<'static, T>
where
    Rows: From<CoreDispatched<T>>,
{
    type Out = Rows;
    fn finished(&self) -> bool {
        self.is_finished()
    }
    fn wait(self: Box<Self>) -> phalanx::Result<Rows> {
        PendingDispatch::wait(*self).0.map(Rows::from)
    }
}

impl<T: Element> Exchange for PendingCombine<'static, T> {
    type Out = Vec<u8>;
    fn finished(&self) -> bool {
        self.is_finished()
    }
    fn wait(self: Box<Self>) -> phalanx::Result<Vec<u8>> {
        PendingCombine::wait(*self).0.map(|back| bytemuck::cast_slice(&back).to_vec())
    }
}

enum State<O> {
    Running(Box<dyn Exchange<Out = O>>),
    Waiting,
    Done(Py<PyAny>),
    Failed(PyErr),
}

/// A started exchange and the layer it borrows. Fields drop in order: the exchange
/// before the layer.
struct Started<O> {
    state: Mutex<State<O>>,
    /// Keeps the layer (which the exchange borrows) alive.
    _layer: Py<ExpertLayer>,
}

impl<O: Send + 'static> Started<O> {
    /// Waits (GIL released) and makes the result with `finish`; a second call repeats
    /// the outcome.
    fn wait(
        &self,
        py: Python<'_>,
        what: &str,
        finish: impl FnOnce(Python<'_>, O) -> PyResult<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let pending = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match std::mem::replace(&mut *state, State::Waiting) {
                State::Running(p) => p,
                State::Waiting => {
                    return Err(PyRuntimeError::new_err(format!("another thread is already waiting on this {what}")))
                }
                State::Done(v) => {
                    *state = State::Done(v.clone_ref(py));
                    return Ok(v);
                }
                State::Failed(e) => {
                    *state = State::Failed(e.clone_ref(py));
                    return Err(e);
                }
            }
        };
        let result = py.detach(move || pending.wait());
        let outcome = match result {
            Err(e) => Err(to_py(py, e)),
            Ok(out) => finish(py, out),
        };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *state = match &outcome {
            Ok(v) => State::Done(v.clone_ref(py)),
            Err(e) => State::Failed(e.clone_ref(py)),
        };
        outcome
    }

    fn done(&self) -> bool {
        match &*self.state.lock().unwrap_or_else(|p| p.into_inner()) {
            State::Running(p) => p.finished(),
            State::Waiting => false,
            State::Done(_) | State::Failed(_) => true,
        }
    }
}

/// `layer`'s core layer with the lifetime of the exchanges that borrow it.
///
/// # Safety
/// The caller keeps a strong reference to `layer` (`Py<ExpertLayer>`) for as long as
/// the returned reference is used, and drops what borrows it first.
unsafe fn core_of(layer: &Bound<'_, ExpertLayer>) -> &'static phalanx::moe::ExpertLayer {
    let core: *const phalanx::moe::ExpertLayer = layer.get().core();
    // SAFETY: the layer is a frozen pyclass (never mutated, never moved while alive),
    // kept alive by the caller's strong reference for as long as the reference is used.
    unsafe { &*core }
}

/// A dispatch started by `ExpertLayer.dispatch_start`.
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct DispatchHandle {
    inner: Started<Rows>,
    dtype: DType,
    hidden: usize,
    sent: usize,
}

#[pymethods]
impl DispatchHandle {
    /// Waits for the dispatch (GIL released) and returns what arrived here as a
    /// `Dispatched`; raises its error (PeerLostError, AbortedError). Calling it again
    /// returns (or raises) the same.
    fn wait(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let (dtype, hidden, sent) = (self.dtype, self.hidden, self.sent);
        self.inner.wait(py, "dispatch", |py, rows| {
            Ok(Py::new(py, Dispatched::new(py, rows, dtype, hidden, sent)?)?.into_any())
        })
    }

    /// Whether the dispatch has finished (`wait()` would not block).
    fn done(&self) -> bool {
        self.inner.done()
    }

    fn __repr__(&self) -> String {
        format!("phalanx.DispatchHandle(done={})", self.done())
    }
}

/// A combine started by `ExpertLayer.combine_start`.
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct CombineHandle {
    inner: Started<Vec<u8>>,
    dtype: DType,
    hidden: usize,
    sent: usize,
}

#[pymethods]
impl CombineHandle {
    /// Waits for the combine (GIL released) and returns this device's rows in the order
    /// of its tokens as given to the dispatch, shape `(len(experts), hidden)`; raises
    /// its error. Calling it again returns (or raises) the same.
    fn wait(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let (dtype, hidden, sent) = (self.dtype, self.hidden, self.sent);
        self.inner.wait(py, "combine", |py, back| {
            Ok(to_numpy(py, &back, dtype)?.call_method1("reshape", (sent, hidden))?.unbind())
        })
    }

    /// Whether the combine has finished (`wait()` would not block).
    fn done(&self) -> bool {
        self.inner.done()
    }

    fn __repr__(&self) -> String {
        format!("phalanx.CombineHandle(done={})", self.done())
    }
}

/// `ExpertLayer.dispatch_start`.
pub(crate) fn dispatch_start(
    layer: &Bound<'_, ExpertLayer>,
    tokens: &Bound<'_, PyAny>,
    experts: &Bound<'_, PyAny>,
) -> PyResult<DispatchHandle> {
    let py = layer.py();
    let experts = expert_list(py, experts)?;
    let t = array_ref(tokens, "tokens", false)?;
    let (bytes, dtype) = (t.bytes().to_vec(), t.dtype);
    drop(t);
    let hidden = layer.get().hidden();
    let sent = experts.len();
    // SAFETY: the handle keeps `layer` alive (`_layer`) and drops the exchange first.
    let core = unsafe { core_of(layer) };
    let pending = layer.get().comm(py).with(py, move |c| {
        macro_rules! start {
            ($t:ty) => {
                Box::new(core.dispatch_start(c, bytemuck::pod_collect_to_vec::<u8, $t>(&bytes), &experts)?)
                    as Box<dyn Exchange<Out = Rows>>
            };
        }
        // Moves bytes only: the unsigned type of the element's width moves the same bits.
        Ok(match dtype.size() {
            1 => start!(u8),
            2 => start!(u16),
            4 => start!(u32),
            8 => start!(u64),
            other => return Err(phalanx::Error::InvalidArgument(format!("no element type is {other} bytes wide"))),
        })
    })?;
    let inner = Started { state: Mutex::new(State::Running(pending)), _layer: layer.clone().unbind() };
    Ok(DispatchHandle { inner, dtype, hidden, sent })
}

/// `ExpertLayer.combine_start`.
pub(crate) fn combine_start(
    layer: &Bound<'_, ExpertLayer>,
    dispatched: &Bound<'_, Dispatched>,
    outputs: &Bound<'_, PyAny>,
) -> PyResult<CombineHandle> {
    let py = layer.py();
    let hidden = layer.get().hidden();
    let (rows, dtype, d_hidden, sent) = dispatched.get().parts();
    if d_hidden != hidden {
        return Err(PyValueError::new_err("dispatched comes from a layer with other tokens"));
    }
    let o = array_ref(outputs, "outputs", false)?;
    if o.dtype != dtype {
        return Err(PyTypeError::new_err(format!(
            "outputs have element type {} but the dispatched tokens {dtype}; they must match",
            o.dtype
        )));
    }
    let bytes = o.bytes().to_vec();
    drop(o);
    // SAFETY: the handle keeps `layer` alive (`_layer`) and drops the exchange first.
    let core = unsafe { core_of(layer) };
    let pending = layer.get().comm(py).with(py, move |c| {
        Ok(match rows {
            Rows::W1(r) => Box::new(core.combine_start(c, r, bytes)?) as Box<dyn Exchange<Out = Vec<u8>>>,
            Rows::W2(r) => Box::new(core.combine_start(c, r, bytemuck::pod_collect_to_vec::<u8, u16>(&bytes))?),
            Rows::W4(r) => Box::new(core.combine_start(c, r, bytemuck::pod_collect_to_vec::<u8, u32>(&bytes))?),
            Rows::W8(r) => Box::new(core.combine_start(c, r, bytemuck::pod_collect_to_vec::<u8, u64>(&bytes))?),
        })
    })?;
    let inner = Started { state: Mutex::new(State::Running(pending)), _layer: layer.clone().unbind() };
    Ok(CombineHandle { inner, dtype, hidden, sent })
}
