//! The FSSDP layer's started steps from Python, so that spAG runs under the attention
//! forward and spRS under the backward: `ExpertLayer.materialize_start`,
//! `reduce_gradients_start` and `rematerialize_start` return a `MoeStepHandle` (the
//! generic `Handle` of `handle.rs`: `wait()` with the GIL released writes the result
//! into the array); `ExpertLayer.release_replicas` returns `ReleasedReplicas`
//! (re-materialisation, `phalanx::moe::Released`).

use phalanx::moe::{AnyPendingStep, ExpertLayer as CoreLayer, PendingStep, Released};
use phalanx::{DType, Element, Error};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

use crate::array::array as array_ref;
use crate::communicator::Communicator;
use crate::handle::{Handle, Started};
use crate::sparse::to_numpy;
use crate::typed::by_width;

impl Started for AnyPendingStep {
    fn wait(self) -> (phalanx::Result<()>, Vec<u8>) {
        AnyPendingStep::wait(self)
    }
    fn ended(&self) -> bool {
        self.is_finished()
    }
}

fn boxed<T: Element>(p: PendingStep<T>) -> AnyPendingStep {
    p.into()
}

/// A layer step started by `ExpertLayer.materialize_start`, `reduce_gradients_start`
/// or `rematerialize_start`.
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct MoeStepHandle {
    inner: Handle<AnyPendingStep>,
}

#[pymethods]
impl MoeStepHandle {
    /// Waits for the step (GIL released) and writes its result into the array it was
    /// started on. Raises the step's error (PeerLostError, AbortedError: the array is
    /// then untouched, as it was when the step started). Calling it again returns (or
    /// raises) the same outcome.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        self.inner.wait(py)
    }

    /// Whether the step has finished (`wait()` would not block).
    fn done(&self) -> bool {
        self.inner.done()
    }

    fn __repr__(&self) -> String {
        format!("phalanx.MoeStepHandle(done={})", self.done())
    }
}

/// Which step to start.
#[derive(Clone, Copy)]
pub(crate) enum Kind {
    /// spAG P → P′.
    Materialize,
    /// spRS P′ → P.
    ReduceGradients,
}

/// Starts `kind` on a copy of `array` (the layer's `params_len` elements); the handle
/// writes the result back into `array` at `wait()`.
pub(crate) fn start(
    py: Python<'_>,
    comm: &Communicator,
    layer: &CoreLayer,
    kind: Kind,
    array: &Bound<'_, PyAny>,
) -> PyResult<MoeStepHandle> {
    let what = match kind {
        Kind::Materialize => "params",
        Kind::ReduceGradients => "grads",
    };
    let a = array_ref(array, what, true)?;
    let (bytes, dtype, len) = (a.bytes().to_vec(), a.dtype, a.len);
    drop(a);
    let want = layer.params_len();
    let step = comm.with(py, move |c| {
        if bytes.len() != want * dtype.size() {
            return Err(Error::InvalidArgument(format!(
                "{what} has {} elements; the layer's buffer has {want}",
                bytes.len() / dtype.size()
            )));
        }
        match kind {
            // Copies bytes only: the unsigned type of the element's width moves the same bits.
            Kind::Materialize => by_width!(dtype.size(), T => {
                Ok(boxed(layer.materialize_start(c, bytemuck::pod_collect_to_vec::<u8, T>(&bytes))?))
            }),
            Kind::ReduceGradients => phalanx::with_dtype!(dtype, T => {
                Ok(boxed(layer.reduce_gradients_start(c, bytemuck::pod_collect_to_vec::<u8, T>(&bytes))?))
            }),
        }
    })?;
    let name = match kind {
        Kind::Materialize => "materialize",
        Kind::ReduceGradients => "reduce_gradients",
    };
    Ok(MoeStepHandle { inner: Handle::new(step, Some(array.clone().unbind()), len, name) })
}

/// The owned experts kept by a release, typed by the element's width.
#[derive(Clone)]
enum Kept {
    W1(Released<u8>),
    W2(Released<u16>),
    W4(Released<u32>),
    W8(Released<u64>),
}

impl Kept {
    fn owned_bytes(&self) -> &[u8] {
        match self {
            Kept::W1(r) => r.owned(),
            Kept::W2(r) => bytemuck::cast_slice(r.owned()),
            Kept::W4(r) => bytemuck::cast_slice(r.owned()),
            Kept::W8(r) => bytemuck::cast_slice(r.owned()),
        }
    }

    fn freed_elements(&self) -> usize {
        match self {
            Kept::W1(r) => r.freed_elements(),
            Kept::W2(r) => r.freed_elements(),
            Kept::W4(r) => r.freed_elements(),
            Kept::W8(r) => r.freed_elements(),
        }
    }
}

/// A device's parameters with the replicas freed (`ExpertLayer.release_replicas`): only
/// the experts it owns, ascending by expert. `ExpertLayer.rematerialize_start` fills a
/// full parameter array again from it (it stays usable, to start again after an error).
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct ReleasedReplicas {
    kept: Kept,
    dtype: DType,
}

#[pymethods]
impl ReleasedReplicas {
    /// The owned experts' parameters, ascending by expert (a copy, 1-D).
    #[getter]
    fn owned<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_numpy(py, self.kept.owned_bytes(), self.dtype)
    }

    /// Elements freed against the full array: the replicas' slots and the slots of
    /// experts this device does not hold.
    #[getter]
    fn freed_elements(&self) -> usize {
        self.kept.freed_elements()
    }

    /// Bytes freed (`freed_elements` times the element's size).
    #[getter]
    fn freed_bytes(&self) -> usize {
        self.kept.freed_elements() * self.dtype.size()
    }

    fn __repr__(&self) -> String {
        format!(
            "phalanx.ReleasedReplicas(owned={}, freed_bytes={}, dtype={})",
            self.kept.owned_bytes().len() / self.dtype.size(),
            self.freed_bytes(),
            self.dtype
        )
    }
}

/// `ExpertLayer.release_replicas`: keeps the experts this device owns from `params`.
pub(crate) fn release(
    py: Python<'_>,
    comm: &Communicator,
    layer: &CoreLayer,
    params: &Bound<'_, PyAny>,
) -> PyResult<ReleasedReplicas> {
    let a = array_ref(params, "params", false)?;
    let (bytes, dtype) = (a.bytes().to_vec(), a.dtype);
    drop(a);
    let kept = comm.with(py, move |c| {
        by_width!(dtype.size(), T => {
            Ok(Kept::from(layer.release_replicas(c, bytemuck::pod_collect_to_vec::<u8, T>(&bytes))?))
        })
    })?;
    Ok(ReleasedReplicas { kept, dtype })
}

/// `ExpertLayer.rematerialize_start`: the full buffer again from `released`, its
/// replicas filled by a started spAG; `wait()` writes it into `params`.
pub(crate) fn rematerialize(
    py: Python<'_>,
    comm: &Communicator,
    layer: &CoreLayer,
    released: &ReleasedReplicas,
    params: &Bound<'_, PyAny>,
) -> PyResult<MoeStepHandle> {
    let a = array_ref(params, "params", true)?;
    let (dtype, len) = (a.dtype, a.len);
    drop(a);
    if dtype != released.dtype {
        return Err(PyTypeError::new_err(format!(
            "params have element type {dtype} but the released experts {}; they must match",
            released.dtype
        )));
    }
    let want = layer.params_len();
    let kept = released.kept.clone();
    let step = comm.with(py, move |c| {
        if len != want * dtype.size() {
            return Err(Error::InvalidArgument(format!(
                "params has {} elements; the layer's buffer has {want}",
                len / dtype.size()
            )));
        }
        Ok(match kept {
            Kept::W1(r) => boxed(layer.rematerialize_start(c, r)?),
            Kept::W2(r) => boxed(layer.rematerialize_start(c, r)?),
            Kept::W4(r) => boxed(layer.rematerialize_start(c, r)?),
            Kept::W8(r) => boxed(layer.rematerialize_start(c, r)?),
        })
    })?;
    Ok(MoeStepHandle { inner: Handle::new(step, Some(params.clone().unbind()), len, "rematerialize") })
}

macro_rules! kept_from {
    ($t:ty, $v:ident) => {
        impl From<Released<$t>> for Kept {
            fn from(r: Released<$t>) -> Kept {
                Kept::$v(r)
            }
        }
    };
}
kept_from!(u8, W1);
kept_from!(u16, W2);
kept_from!(u32, W4);
kept_from!(u64, W8);
