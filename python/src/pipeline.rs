//! `phalanx.PipelineRunner`: one stage of a pipeline schedule, executed on a
//! `Communicator` while Python computes each pass (`phalanx::sched::Runner` with a
//! `Stage` that calls the methods of a Python object), and `PipelineStep`, the pass it
//! names.
//!
//! The runner runs with the GIL released (it waits on the network most of the time);
//! each callback takes the GIL for its own duration. A Python exception in a callback
//! ends the run on this stage and is raised again from `run`, with a note naming the
//! stage and the pass.

use std::cell::RefCell;
use std::marker::PhantomData;

use phalanx::sched::{Executed, RunError, Runner, Stage, StageError, Step};
use phalanx::{DType, Element};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::array::{array, numpy_dtype};
use crate::communicator::Communicator;
use crate::errors::to_py;
use crate::sched::{named_schedule, pass_name};

/// Where a pass sits in the model: the micro-batch, this stage's chunk and the virtual
/// stage (part of the model) that chunk holds.
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct PipelineStep {
    /// The micro-batch, from 0.
    #[pyo3(get)]
    mb: usize,
    /// The chunk of this stage, from 0.
    #[pyo3(get)]
    chunk: usize,
    /// The virtual stage this chunk holds, from 0.
    #[pyo3(get)]
    virtual_stage: usize,
    /// How many virtual stages the model has (stages × chunks).
    #[pyo3(get)]
    virtual_stages: usize,
    /// Whether this is the model's first part (its forward reads the micro-batch).
    #[pyo3(get)]
    is_first: bool,
    /// Whether this is the model's last part (its forward computes the loss).
    #[pyo3(get)]
    is_last: bool,
}

#[pymethods]
impl PipelineStep {
    fn __repr__(&self) -> String {
        format!(
            "phalanx.PipelineStep(mb={}, chunk={}, virtual_stage={}/{})",
            self.mb, self.chunk, self.virtual_stage, self.virtual_stages
        )
    }
}

impl From<&Step> for PipelineStep {
    fn from(s: &Step) -> PipelineStep {
        PipelineStep {
            mb: s.mb,
            chunk: s.chunk,
            virtual_stage: s.virtual_stage,
            virtual_stages: s.virtual_stages,
            is_first: s.is_first(),
            is_last: s.is_last(),
        }
    }
}

/// A pass as it ran: (pass, micro-batch, chunk, begin, ready, computed, end), seconds
/// since the run began.
type ExecutedRow = (&'static str, usize, usize, f64, f64, f64, f64);

/// The Python object's methods as a [`Stage`] of elements `T`.
struct PyStage<T> {
    obj: Py<PyAny>,
    /// Whether the object has a fused `backward`.
    fused: bool,
    /// The first Python exception a callback raised: `run` raises it (a cell: the
    /// length callbacks take `&self`).
    error: RefCell<Option<PyErr>>,
    _elem: PhantomData<T>,
}

impl<T: Element> PyStage<T> {
    /// Calls `method(step[, array])` with the GIL and maps its result with `then`,
    /// keeping a Python exception for `run`.
    fn call<R>(
        &self,
        method: &'static str,
        step: &Step,
        array_arg: Option<&[T]>,
        then: impl FnOnce(Bound<'_, PyAny>) -> PyResult<R>,
    ) -> Result<R, StageError> {
        Python::attach(|py| {
            let outcome = (|| {
                let s = Bound::new(py, PipelineStep::from(step))?;
                let obj = self.obj.bind(py);
                let result = match array_arg {
                    Some(data) => obj.call_method1(method, (s, to_numpy(py, data)?))?,
                    None => obj.call_method1(method, (s,))?,
                };
                then(result)
            })();
            outcome.map_err(|e| {
                let message = format!("{method} raised {e}");
                self.error.borrow_mut().get_or_insert(e);
                message.into()
            })
        })
    }

    /// A callback's array result as elements (`None` allowed where nothing goes on).
    fn elements(what: &'static str, none_ok: bool, result: &Bound<'_, PyAny>) -> PyResult<Vec<T>> {
        if result.is_none() {
            return if none_ok {
                Ok(Vec::new())
            } else {
                Err(PyTypeError::new_err(format!("{what} returned None; it must return an array")))
            };
        }
        let a = array(result, what, false)?;
        if a.dtype != T::DTYPE {
            return Err(PyTypeError::new_err(format!(
                "{what} returned {} elements; this runner's dtype is {}",
                a.dtype,
                T::DTYPE
            )));
        }
        Ok(bytemuck::pod_collect_to_vec(a.bytes()))
    }

    fn len(&self, method: &'static str, step: &Step) -> usize {
        // A failure is kept for `run`, which raises it; 0 then fails the transfer.
        self.call(method, step, None, |r| r.extract::<usize>()).unwrap_or(0)
    }

    fn map(&self, method: &'static str, step: &Step, data: &[T], none_ok: bool) -> Result<Vec<T>, StageError> {
        self.call(method, step, Some(data), |r| Self::elements(method, none_ok, &r))
    }
}

impl<T: Element> Stage for PyStage<T> {
    type Elem = T;

    fn input_len(&self, step: &Step) -> usize {
        self.len("input_len", step)
    }

    fn output_len(&self, step: &Step) -> usize {
        self.len("output_len", step)
    }

    fn forward(&mut self, step: &Step, input: &[T]) -> Result<Vec<T>, StageError> {
        self.map("forward", step, input, step.is_last())
    }

    fn backward_input(&mut self, step: &Step, grad_out: &[T]) -> Result<Vec<T>, StageError> {
        self.map("backward_input", step, grad_out, step.is_first())
    }

    fn backward_weight(&mut self, step: &Step) -> Result<(), StageError> {
        self.call("backward_weight", step, None, |_| Ok(()))
    }

    fn backward(&mut self, step: &Step, grad_out: &[T]) -> Result<Vec<T>, StageError> {
        if self.fused {
            return self.map("backward", step, grad_out, step.is_first());
        }
        let grad_in = self.backward_input(step, grad_out)?;
        self.backward_weight(step)?;
        Ok(grad_in)
    }
}

/// A numpy array of `data` (a copy).
fn to_numpy<'py, T: Element>(py: Python<'py>, data: &[T]) -> PyResult<Bound<'py, PyAny>> {
    let np = py.import("numpy")?;
    let bytes = PyBytes::new(py, bytemuck::cast_slice(data));
    np.call_method1("frombuffer", (bytes, numpy_dtype(py, T::DTYPE)?))?.call_method0("copy")
}

/// One stage of a pipeline schedule, run iteration after iteration on a `Communicator`
/// (stage `s` on rank `s`), calling a Python object's methods for each pass.
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct PipelineRunner {
    pub(crate) inner: Runner,
    pub(crate) stage: usize,
    pub(crate) dtype: DType,
}

impl PipelineRunner {
    fn run_as<T: Element>(
        &self,
        py: Python<'_>,
        comm: &Communicator,
        obj: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<ExecutedRow>> {
        let fused = obj.hasattr("backward")?;
        let mut stage =
            PyStage::<T> { obj: obj.clone().unbind(), fused, error: RefCell::new(None), _elem: PhantomData };
        let runner = &self.inner;
        let result = comm.with(py, |c| Ok(runner.run(c, &mut stage)))?;
        match result {
            Ok(executed) => {
                if let Some(e) = stage.error.get_mut().take() {
                    // Only a failing `*_len` on a pass whose transfer still went through.
                    return Err(e);
                }
                Ok(timeline(&executed))
            }
            Err(e) => Err(match stage.error.get_mut().take() {
                Some(raised) => {
                    let note = match e.at() {
                        Some(at) => format!("raised in the phalanx pipeline runner at {at}"),
                        None => "raised in the phalanx pipeline runner".to_string(),
                    };
                    // `add_note` is Python 3.11's; earlier versions get the bare exception.
                    let value = raised.value(py);
                    if value.hasattr("add_note")? {
                        value.call_method1("add_note", (note,))?;
                    }
                    raised
                }
                None => run_error(py, e)?,
            }),
        }
    }
}

/// The runner's element type from a numpy dtype-like (float32 when `None`).
pub(crate) fn runner_dtype(py: Python<'_>, dtype: Option<&Bound<'_, PyAny>>) -> PyResult<DType> {
    Ok(match dtype {
        None => DType::F32,
        Some(d) => {
            let name: String = py.import("numpy")?.call_method1("dtype", (d,))?.getattr("name")?.extract()?;
            match name.as_str() {
                "float32" => DType::F32,
                "float64" => DType::F64,
                other => return Err(PyValueError::new_err(format!("dtype must be float32 or float64, not {other}"))),
            }
        }
    })
}

/// The Python exception of a run's error: the communicator's class with the whole
/// message (naming the stage and the pass), or ValueError.
pub(crate) fn run_error(py: Python<'_>, e: RunError) -> PyResult<PyErr> {
    let message = e.to_string();
    match e.comm_error() {
        Some(source) => {
            let base = to_py(py, source.clone());
            let ty = base.get_type(py);
            let err = PyErr::from_value(ty.call1((message,))?);
            if let Ok(rank) = base.value(py).getattr("rank") {
                err.value(py).setattr("rank", rank)?;
            }
            Ok(err)
        }
        None => Ok(PyValueError::new_err(message)),
    }
}

/// The passes of `e`: (pass, micro-batch, chunk, begin, ready, computed, end), seconds
/// since the run began.
fn timeline(e: &Executed) -> Vec<ExecutedRow> {
    let at = |t: std::time::Instant| t.saturating_duration_since(e.start).as_secs_f64();
    e.passes
        .iter()
        .map(|p| {
            (pass_name(p.action.pass), p.action.mb, p.action.chunk, at(p.begin), at(p.ready), at(p.computed), at(p.end))
        })
        .collect()
}

#[pymethods]
impl PipelineRunner {
    /// The runner of stage `stage` of the schedule `schedule` ("1f1b", "interleaved",
    /// "zbh1", "zb2p", "auto", "zbv", "vhalf", "vmin", as for `pipeline_schedule`) for
    /// `stages` stages and `microbatches` micro-batches, moving activations and
    /// gradients of `dtype` ("float32" or "float64"). Stage `s` runs on rank `ranks[s]`
    /// (default: rank `s`), one distinct rank per stage, so that several pipelines can
    /// share a group (pipelines × data-parallel replicas). ValueError for parameters no
    /// schedule supports, or a memory limit the schedule exceeds.
    #[new]
    #[pyo3(signature = (schedule, stages, microbatches, stage, *, chunks = 2, costs = (1.0, 1.0, 1.0, 0.0), memory_limit = None, dtype = None, ranks = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        schedule: &str,
        stages: usize,
        microbatches: usize,
        stage: usize,
        chunks: usize,
        costs: (f64, f64, f64, f64),
        memory_limit: Option<f64>,
        dtype: Option<&Bound<'_, PyAny>>,
        ranks: Option<Vec<usize>>,
    ) -> PyResult<Self> {
        let dtype = runner_dtype(py, dtype)?;
        let (s, _) = named_schedule(schedule, stages, microbatches, chunks, costs, memory_limit)?;
        let bad = |e: RunError| PyValueError::new_err(e.to_string());
        let mut inner = Runner::new(s, stage).map_err(bad)?;
        if let Some(ranks) = ranks {
            inner = inner.ranks(ranks).map_err(bad)?;
        }
        Ok(PipelineRunner { inner, stage, dtype })
    }

    /// This stage's passes in the order it runs them: (pass, micro-batch, chunk), pass
    /// one of "F", "B", "W", "BW".
    #[getter]
    fn order(&self) -> Vec<(&'static str, usize, usize)> {
        self.inner.schedule().stages[self.stage].iter().map(|a| (pass_name(a.pass), a.mb, a.chunk)).collect()
    }

    /// The stage this runner runs.
    #[getter]
    fn stage(&self) -> usize {
        self.stage
    }

    /// Runs this stage's passes of one iteration on `comm`, calling `stage`'s methods
    /// (the GIL is released while the runner waits on the network, held in each call):
    /// `input_len(step)` and `output_len(step)` (element counts of the activation in and
    /// out), `forward(step, x)`, `backward_input(step, grad)`, `backward_weight(step)`
    /// and optionally `backward(step, grad)` (fused). Arrays are 1-D numpy copies of the
    /// runner's dtype; results must have that dtype. Returns the executed timeline:
    /// (pass, micro-batch, chunk, begin, ready, computed, end), seconds since the run
    /// began. A callback's exception is raised again, with a note naming the stage and
    /// the pass; a lost neighbour raises PeerLostError or AbortedError naming the pass.
    fn run(
        &self,
        py: Python<'_>,
        comm: &Bound<'_, Communicator>,
        stage: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<ExecutedRow>> {
        match self.dtype {
            DType::F64 => self.run_as::<f64>(py, comm.get(), stage),
            _ => self.run_as::<f32>(py, comm.get(), stage),
        }
    }

    /// Waits until every stage has run its list (a barrier of the pipeline's ranks).
    /// Call it on every stage after the last iteration, before leaving the group.
    fn finish(&self, py: Python<'_>, comm: &Bound<'_, Communicator>) -> PyResult<()> {
        let runner = &self.inner;
        let result = comm.get().with(py, |c| Ok(runner.finish(c)))?;
        result.map_err(|e| run_error(py, e).unwrap_or_else(|e| e))
    }

    fn __repr__(&self) -> String {
        let s = self.inner.schedule();
        format!(
            "phalanx.PipelineRunner({}, stage {} of {}, {} micro-batches, {})",
            s.name,
            self.stage,
            s.stages(),
            s.microbatches,
            self.dtype
        )
    }
}
