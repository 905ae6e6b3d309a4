//! The FSSDP layer from Python: `phalanx.ExpertLayer` (one MoE layer's communication for
//! one iteration over a `Communicator`, `phalanx::moe::ExpertLayer`) and
//! `phalanx.Dispatched` (the tokens a dispatch delivered, as numpy arrays).
//!
//! Materialize, dispatch and combine only move bytes, so they run on unsigned integers
//! of the element's width (the same bits as the element type); the gradient sum of
//! `reduce_gradients` runs on the element type. Every step releases the GIL while it
//! waits on the group.

use phalanx::moe::{Dispatch, Dispatched as CoreDispatched, ExpertLayer as CoreLayer, ExpertPlacement, Hosts};
use phalanx::DType;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::array::array as array_ref;
use crate::communicator::Communicator;
use crate::moe_exchange;
use crate::moe_started::{self, Kind, MoeStepHandle, ReleasedReplicas};
use crate::sparse::to_numpy;
use crate::typed::{by_width, typed, with_typed_mut};

/// The rows a dispatch delivered, typed by the element's width.
pub(crate) enum Rows {
    W1(CoreDispatched<u8>),
    W2(CoreDispatched<u16>),
    W4(CoreDispatched<u32>),
    W8(CoreDispatched<u64>),
}

macro_rules! rows_from {
    ($t:ty, $v:ident) => {
        impl From<CoreDispatched<$t>> for Rows {
            fn from(d: CoreDispatched<$t>) -> Rows {
                Rows::$v(d)
            }
        }
    };
}
rows_from!(u8, W1);
rows_from!(u16, W2);
rows_from!(u32, W4);
rows_from!(u64, W8);

impl Rows {
    fn token_bytes(&self) -> &[u8] {
        match self {
            Rows::W1(r) => &r.tokens,
            Rows::W2(r) => bytemuck::cast_slice(&r.tokens),
            Rows::W4(r) => bytemuck::cast_slice(&r.tokens),
            Rows::W8(r) => bytemuck::cast_slice(&r.tokens),
        }
    }

    /// (experts, sources, the group's plan).
    fn parts(&self) -> (&[usize], &[usize], &Dispatch) {
        match self {
            Rows::W1(r) => (&r.experts, &r.sources, &r.plan),
            Rows::W2(r) => (&r.experts, &r.sources, &r.plan),
            Rows::W4(r) => (&r.experts, &r.sources, &r.plan),
            Rows::W8(r) => (&r.experts, &r.sources, &r.plan),
        }
    }
}

/// What `ExpertLayer.dispatch` delivered to this device: `tokens` (one row of `hidden`
/// per token, grouped by source device ascending, then by expert ascending, then in
/// their order there), each token's `experts` and `sources`, and the group's plan:
/// `compute` (tokens per device) and `routes`. Pass it to `ExpertLayer.combine` with the
/// outputs.
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct Dispatched {
    rows: Rows,
    dtype: DType,
    hidden: usize,
    /// Tokens this device gave to the dispatch.
    sent: usize,
    tokens: Py<PyAny>,
    experts: Py<PyAny>,
    sources: Py<PyAny>,
    compute: Vec<u64>,
    routes: Vec<(usize, usize, usize, u64)>,
}

/// An int64 numpy array of `v`.
fn indices<'py>(py: Python<'py>, v: &[usize]) -> PyResult<Bound<'py, PyAny>> {
    let v: Vec<i64> = v.iter().map(|&x| x as i64).collect();
    to_numpy(py, bytemuck::cast_slice(&v), DType::I64)
}

/// The experts of `experts` (a sequence or array of non-negative integers).
pub(crate) fn expert_list(py: Python<'_>, experts: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
    let np = py.import("numpy")?;
    let e = np.call_method1("ascontiguousarray", (experts, "int64"))?;
    let e = array_ref(&e, "experts", false)?;
    bytemuck::pod_collect_to_vec::<u8, i64>(e.bytes())
        .into_iter()
        .map(|x| usize::try_from(x).map_err(|_| PyValueError::new_err(format!("expert {x} is negative"))))
        .collect()
}

impl Dispatched {
    /// What a dispatch delivered, its arrays made for Python.
    pub(crate) fn new(py: Python<'_>, rows: Rows, dtype: DType, hidden: usize, sent: usize) -> PyResult<Dispatched> {
        let (exp, src, plan) = rows.parts();
        let compute = plan.compute();
        let routes = plan.routes().iter().map(|r| (r.from, r.expert, r.to, r.tokens)).collect();
        let tokens = to_numpy(py, rows.token_bytes(), dtype)?.call_method1("reshape", (exp.len(), hidden))?;
        Ok(Dispatched {
            tokens: tokens.unbind(),
            experts: indices(py, exp)?.unbind(),
            sources: indices(py, src)?.unbind(),
            compute,
            routes,
            rows,
            dtype,
            hidden,
            sent,
        })
    }

    /// The typed rows, their element type, the tokens' width and the tokens sent.
    pub(crate) fn parts(&self) -> (&Rows, DType, usize, usize) {
        (&self.rows, self.dtype, self.hidden, self.sent)
    }
}

#[pymethods]
impl Dispatched {
    /// The tokens this device computes, shape `(len(self), hidden)`.
    #[getter]
    fn tokens(&self, py: Python<'_>) -> Py<PyAny> {
        self.tokens.clone_ref(py)
    }

    /// The expert of each token (int64).
    #[getter]
    fn experts(&self, py: Python<'_>) -> Py<PyAny> {
        self.experts.clone_ref(py)
    }

    /// The device each token came from (int64).
    #[getter]
    fn sources(&self, py: Python<'_>) -> Py<PyAny> {
        self.sources.clone_ref(py)
    }

    /// Tokens each device computes under the group's plan (the largest is the
    /// straggler's); the same on every device.
    #[getter]
    fn compute(&self) -> Vec<u64> {
        self.compute.clone()
    }

    /// The group's plan as `(from, expert, to, tokens)` routes, by expert, then as the
    /// plan matched them: device `from`'s next `tokens` tokens of `expert` (in its
    /// order) go to device `to`. The same on every device.
    #[getter]
    fn routes(&self) -> Vec<(usize, usize, usize, u64)> {
        self.routes.clone()
    }

    fn __len__(&self) -> usize {
        self.rows.parts().0.len()
    }

    fn __repr__(&self) -> String {
        format!("Dispatched(tokens={}, hidden={}, dtype={})", self.__len__(), self.hidden, self.dtype)
    }
}

/// One MoE layer's communication for one iteration over a communicator (FSSDP): spAG of
/// the hot experts' replicas, the token all-to-all there and back, and spRS of the
/// gradients. See `phalanx/__init__.pyi`.
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct ExpertLayer {
    comm: Py<Communicator>,
    inner: CoreLayer,
    hidden: usize,
}

impl ExpertLayer {
    pub(crate) fn comm<'a>(&'a self, py: Python<'a>) -> &'a Communicator {
        self.comm.bind(py).get()
    }

    /// The layer itself.
    pub(crate) fn core(&self) -> &CoreLayer {
        &self.inner
    }

    /// Elements of a token.
    pub(crate) fn hidden(&self) -> usize {
        self.hidden
    }
}

#[pymethods]
impl ExpertLayer {
    /// The layer for placement P′ over `comm`'s group: expert `e` owned by `owners[e]`
    /// and held by the devices in `holders[e]` (what `moe_place` returns; the owner
    /// always holds; None: every expert on its owner only); parameters of `expert_len`
    /// elements per expert and tokens of `hidden` elements. ValueError for an owner or
    /// holder outside the group.
    #[new]
    #[pyo3(signature = (comm, owners, holders, expert_len, hidden, *, hosts = None))]
    fn new(
        py: Python<'_>,
        comm: Py<Communicator>,
        owners: Vec<usize>,
        holders: Option<Vec<Vec<usize>>>,
        expert_len: usize,
        hidden: usize,
        hosts: Option<Vec<usize>>,
    ) -> PyResult<Self> {
        let devices = comm.bind(py).get().with(py, |c| Ok(c.size()))?;
        let holders = holders.unwrap_or_else(|| vec![Vec::new(); owners.len()]);
        let placement = ExpertPlacement::with_replicas(&owners, devices, &holders)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let inner =
            CoreLayer::new(placement, expert_len, hidden, hosts.map(Hosts)).map_err(|e| crate::errors::to_py(py, e))?;
        Ok(ExpertLayer { comm, inner, hidden })
    }

    /// Elements of the parameter (and gradient) buffer: `len(owners) * expert_len`.
    #[getter]
    fn params_len(&self) -> usize {
        self.inner.params_len()
    }

    /// The devices holding each expert (ascending, the owner included).
    #[getter]
    fn holders(&self) -> Vec<Vec<usize>> {
        let p = self.inner.placement();
        (0..p.experts()).map(|e| p.holders(e).to_vec()).collect()
    }

    /// Expert `e`'s slot in the parameter buffer, as a slice.
    fn expert_slice<'py>(&self, py: Python<'py>, e: usize) -> PyResult<Bound<'py, pyo3::types::PySlice>> {
        if e >= self.inner.placement().experts() {
            return Err(PyValueError::new_err(format!(
                "expert {e} of a layer of {}",
                self.inner.placement().experts()
            )));
        }
        let r = self.inner.expert_range(e);
        Ok(pyo3::types::PySlice::new(py, r.start as isize, r.end as isize, 1))
    }

    /// spAG(P, P′), in place: every slot of `params` (`params_len` elements, expert `e`
    /// at `expert_slice(e)`) that this device holds receives its owner's bytes; other
    /// slots are unchanged. On error `params` holds what it held before.
    fn materialize(&self, py: Python<'_>, params: &Bound<'_, PyAny>) -> PyResult<()> {
        let a = array_ref(params, "params", true)?;
        let (raw, dtype, layer) = (a.raw(), a.dtype, &self.inner);
        self.comm(py).with(py, move |c| {
            // SAFETY: `a` outlives the call; nothing else holds a slice of it.
            let buf = unsafe { raw.as_mut_slice() };
            by_width!(dtype.size(), T => with_typed_mut::<T>(buf, |p| layer.materialize(c, p)))
        })?;
        drop(a);
        Ok(())
    }

    /// spRS(P′, P), in place: each owner's slot of `grads` becomes the sum of its
    /// holders' slots, added in ascending device order (the same bits every run); other
    /// slots are unchanged. On error `grads` holds what it held before.
    fn reduce_gradients(&self, py: Python<'_>, grads: &Bound<'_, PyAny>) -> PyResult<()> {
        let a = array_ref(grads, "grads", true)?;
        let (raw, dtype, layer) = (a.raw(), a.dtype, &self.inner);
        self.comm(py).with(py, move |c| {
            // SAFETY: `a` outlives the call; nothing else holds a slice of it.
            let buf = unsafe { raw.as_mut_slice() };
            phalanx::with_dtype!(dtype, T => with_typed_mut::<T>(buf, |g| layer.reduce_gradients(c, g)))
        })?;
        drop(a);
        Ok(())
    }

    /// Sends this device's `tokens` (rows of `hidden` elements, C-contiguous) to devices
    /// holding their experts (`experts[i]`, one per row): a replica on this device
    /// first, an expert's tokens split evenly over its holders. Returns what arrived
    /// here as a `Dispatched`. Top-k routing: one row per token and choice.
    fn dispatch(&self, py: Python<'_>, tokens: &Bound<'_, PyAny>, experts: &Bound<'_, PyAny>) -> PyResult<Dispatched> {
        let experts = expert_list(py, experts)?;
        let t = array_ref(tokens, "tokens", false)?;
        let (raw, dtype, layer) = (t.raw(), t.dtype, &self.inner);
        let sent = experts.len();
        let rows = self.comm(py).with(py, move |c| {
            // SAFETY: `t` outlives the call.
            let bytes = unsafe { raw.as_slice() };
            by_width!(dtype.size(), T => Ok(Rows::from(layer.dispatch(c, &typed::<T>(bytes), &experts)?)))
        })?;
        drop(t);
        Dispatched::new(py, rows, dtype, self.hidden, sent)
    }

    /// Sends the experts' `outputs` (one row per token of `dispatched`, in its order, of
    /// its element type) back where the tokens came from; returns this device's rows in
    /// the order of its tokens as given to `dispatch`, shape `(len(experts), hidden)`.
    fn combine<'py>(
        &self,
        py: Python<'py>,
        dispatched: &Bound<'py, Dispatched>,
        outputs: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let d = dispatched.get();
        if d.hidden != self.hidden {
            return Err(PyValueError::new_err("dispatched comes from a layer with other tokens"));
        }
        let o = array_ref(outputs, "outputs", false)?;
        if o.dtype != d.dtype {
            return Err(PyTypeError::new_err(format!(
                "outputs have element type {} but the dispatched tokens {}; they must match",
                o.dtype, d.dtype
            )));
        }
        let (raw, layer, rows) = (o.raw(), &self.inner, &d.rows);
        let back: Vec<u8> = self.comm(py).with(py, move |c| {
            // SAFETY: `o` outlives the call.
            let bytes = unsafe { raw.as_slice() };
            Ok(match rows {
                Rows::W1(r) => layer.combine(c, r, &typed::<u8>(bytes))?,
                Rows::W2(r) => bytemuck::cast_slice(&layer.combine(c, r, &typed::<u16>(bytes))?).to_vec(),
                Rows::W4(r) => bytemuck::cast_slice(&layer.combine(c, r, &typed::<u32>(bytes))?).to_vec(),
                Rows::W8(r) => bytemuck::cast_slice(&layer.combine(c, r, &typed::<u64>(bytes))?).to_vec(),
            })
        })?;
        drop(o);
        to_numpy(py, &back, d.dtype)?.call_method1("reshape", (d.sent, self.hidden))
    }

    /// Starts `materialize` (spAG) on a copy of `params` and returns a `MoeStepHandle`
    /// at once, so that the transfer runs under other compute (the attention forward);
    /// `wait()` (GIL released) writes the materialised array into `params`, or raises
    /// and leaves it as it was. Do not resize `params` meanwhile.
    fn materialize_start(&self, py: Python<'_>, params: &Bound<'_, PyAny>) -> PyResult<MoeStepHandle> {
        moe_started::start(py, self.comm(py), &self.inner, Kind::Materialize, params)
    }

    /// Starts `reduce_gradients` (spRS) on a copy of `grads` and returns a
    /// `MoeStepHandle` at once (to run under the attention backward); `wait()` writes the
    /// reduced array into `grads`, or raises and leaves it as it was.
    fn reduce_gradients_start(&self, py: Python<'_>, grads: &Bound<'_, PyAny>) -> PyResult<MoeStepHandle> {
        moe_started::start(py, self.comm(py), &self.inner, Kind::ReduceGradients, grads)
    }

    /// Re-materialisation, after the layer's forward: keeps only the experts this device
    /// owns from `params` (a copy) as `ReleasedReplicas`, so that `params` may be freed
    /// until the backward (`freed_bytes` says how much). Local: nothing is sent.
    fn release_replicas(&self, py: Python<'_>, params: &Bound<'_, PyAny>) -> PyResult<ReleasedReplicas> {
        moe_started::release(py, self.comm(py), &self.inner, params)
    }

    /// Re-materialisation, before the layer's backward: starts the spAG that makes the
    /// full parameters again from `released` (the owned experts in their slots, the
    /// replicas from their owners, zeros elsewhere) and returns a `MoeStepHandle` whose
    /// `wait()` writes them into `params` (`params_len` elements of the released type).
    fn rematerialize_start(
        &self,
        py: Python<'_>,
        released: &Bound<'_, ReleasedReplicas>,
        params: &Bound<'_, PyAny>,
    ) -> PyResult<MoeStepHandle> {
        moe_started::rematerialize(py, self.comm(py), &self.inner, released.get(), params)
    }

    /// Starts `dispatch` of a copy of `tokens` and returns a `DispatchHandle` at once:
    /// the token counts' all-gather and the tokens' all-to-all run in the background;
    /// `wait()` (GIL released) returns the `Dispatched`. ValueError for an expert outside
    /// the layer, before anything starts.
    fn dispatch_start(
        slf: &Bound<'_, Self>,
        tokens: &Bound<'_, PyAny>,
        experts: &Bound<'_, PyAny>,
    ) -> PyResult<moe_exchange::DispatchHandle> {
        moe_exchange::dispatch_start(slf, tokens, experts)
    }

    /// Starts `combine` of a copy of `outputs` (one row per token of `dispatched`) and
    /// returns a `CombineHandle` at once; `wait()` returns this device's rows in the
    /// order of its tokens as given to the dispatch.
    fn combine_start(
        slf: &Bound<'_, Self>,
        dispatched: &Bound<'_, Dispatched>,
        outputs: &Bound<'_, PyAny>,
    ) -> PyResult<moe_exchange::CombineHandle> {
        moe_exchange::combine_start(slf, dispatched, outputs)
    }

    /// Elements of the replicas `device` holds this iteration (experts it holds but does
    /// not own): what re-materialisation frees between the forward and the backward.
    fn replica_len(&self, device: usize) -> usize {
        self.inner.replica_len(device)
    }

    fn __repr__(&self) -> String {
        let p = self.inner.placement();
        format!(
            "ExpertLayer(devices={}, experts={}, transfers={}, hidden={})",
            p.devices(),
            p.experts(),
            p.transfers(),
            self.hidden
        )
    }
}
