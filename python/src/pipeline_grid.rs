//! `phalanx.PipelineGrid`, a grid of pipelines (`phalanx::sched::GridMap`: `pp` stages
//! × `dp` replicas on one group, each stage's gradients all-reduced among its
//! replicas), and `phalanx.PipelineCommitter` (`phalanx::sched::Committer`): the
//! optimizer post-validation and the commit-or-none step, with the optimizer as two
//! Python callables, `step(scale)` and `undo()`.

use std::cell::RefCell;

use phalanx::sched::{Committer, GradStats, Grid, GridMap, Optimistic, Position, RunError, StageError, Verdict};
use phalanx::DType;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::args::parse_op;
use crate::array;
use crate::communicator::Communicator;
use crate::pipeline::{run_error, runner_dtype, PipelineRunner};
use crate::sched::named_schedule;

/// Where the `pp` stages × `dp` replicas of a grid of pipelines run on a group.
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct PipelineGrid {
    inner: GridMap,
}

/// A grid error as a Python exception (`ValueError` for bad arguments).
fn grid_error(py: Python<'_>, e: RunError) -> PyErr {
    run_error(py, e).unwrap_or_else(|e| e)
}

#[pymethods]
impl PipelineGrid {
    /// The grid of `pp` stages × `dp` replicas on a fresh group of `pp·dp` ranks, as
    /// seen by `rank`: position (stage, replica) on rank `replica·pp + stage`.
    #[staticmethod]
    fn in_order(py: Python<'_>, pp: usize, dp: usize, rank: usize) -> PyResult<PipelineGrid> {
        let inner = Grid::new(pp, dp).and_then(|g| g.in_order(rank)).map_err(|e| grid_error(py, e))?;
        Ok(PipelineGrid { inner })
    }

    /// Places the grid on `comm`'s group after a view change (every rank calls it):
    /// `held` is the (stage, replica) this rank held, or None for a newcomer, which
    /// takes a free position in rank order.
    #[staticmethod]
    #[pyo3(signature = (comm, pp, dp, held = None))]
    fn place(
        py: Python<'_>,
        comm: &Bound<'_, Communicator>,
        pp: usize,
        dp: usize,
        held: Option<(usize, usize)>,
    ) -> PyResult<PipelineGrid> {
        let held = held.map(|(stage, replica)| Position { stage, replica });
        let result = comm.get().with(py, move |c| Ok(Grid::new(pp, dp).and_then(|g| g.place(c, held))))?;
        Ok(PipelineGrid { inner: result.map_err(|e| grid_error(py, e))? })
    }

    /// This rank's (stage, replica).
    #[getter]
    fn me(&self) -> (usize, usize) {
        let me = self.inner.me();
        (me.stage, me.replica)
    }

    /// (pp, dp).
    #[getter]
    fn shape(&self) -> (usize, usize) {
        let g = self.inner.grid();
        (g.pp, g.dp)
    }

    /// The ranks of replica `replica`'s pipeline, by stage.
    fn pipeline(&self, replica: usize) -> PyResult<Vec<usize>> {
        if replica >= self.inner.grid().dp {
            return Err(PyValueError::new_err(format!("replica {replica} of {}", self.inner.grid().dp)));
        }
        Ok(self.inner.pipeline(replica))
    }

    /// The ranks holding stage `stage` (its replicas), in rank order.
    fn dp_group(&self, stage: usize) -> PyResult<Vec<usize>> {
        if stage >= self.inner.grid().pp {
            return Err(PyValueError::new_err(format!("stage {stage} of {}", self.inner.grid().pp)));
        }
        Ok(self.inner.dp_group(stage))
    }

    /// The runner of this rank's stage on its replica's pipeline: a `PipelineRunner`
    /// for the schedule named as `PipelineRunner` names it, with `pp` stages.
    #[pyo3(signature = (schedule, microbatches, *, chunks = 2, costs = (1.0, 1.0, 1.0, 0.0), memory_limit = None, dtype = None))]
    #[allow(clippy::too_many_arguments)]
    fn runner(
        &self,
        py: Python<'_>,
        schedule: &str,
        microbatches: usize,
        chunks: usize,
        costs: (f64, f64, f64, f64),
        memory_limit: Option<f64>,
        dtype: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PipelineRunner> {
        let dtype = runner_dtype(py, dtype)?;
        let pp = self.inner.grid().pp;
        let (s, _) = named_schedule(schedule, pp, microbatches, chunks, costs, memory_limit)?;
        let inner = self.inner.runner(s).map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(PipelineRunner { inner, stage: self.inner.me().stage, dtype })
    }

    /// All-reduces this stage's gradients `grads` (a contiguous numpy array, flattened in
    /// an order every replica shares) in place among the stage's replicas with `op`
    /// ("sum" by default). Every rank of the grid calls it after its run; nothing with
    /// `dp = 1`. A lost peer raises PeerLostError or AbortedError.
    #[pyo3(signature = (comm, grads, op = "sum"))]
    fn all_reduce_gradients(
        &self,
        py: Python<'_>,
        comm: &Bound<'_, Communicator>,
        grads: &Bound<'_, PyAny>,
        op: &str,
    ) -> PyResult<()> {
        let op = parse_op(op)?;
        let a = array::array(grads, "grads", true)?;
        let (raw, dtype) = (a.raw(), a.dtype);
        let map = &self.inner;
        // SAFETY: `a` keeps the memory alive until after the call; nothing else holds a
        // slice of it.
        let result = comm
            .get()
            .with(py, move |c| Ok(map.all_reduce_gradients_raw(c, unsafe { raw.as_mut_slice() }, dtype, op)))?;
        drop(a);
        result.map_err(|e| grid_error(py, e))
    }

    /// Waits until every rank of the grid is done: call it after the last iteration,
    /// before leaving the group.
    fn finish(&self, py: Python<'_>, comm: &Bound<'_, Communicator>) -> PyResult<()> {
        let map = &self.inner;
        let result = comm.get().with(py, |c| Ok(map.finish(c)))?;
        result.map_err(|e| grid_error(py, e))
    }

    fn __repr__(&self) -> String {
        let (g, me) = (self.inner.grid(), self.inner.me());
        format!("phalanx.PipelineGrid({} × {}, stage {} of replica {})", g.pp, g.dp, me.stage, me.replica)
    }
}

/// The Python optimizer's two callables as an [`Optimistic`].
struct PyOptimizer {
    step: Py<PyAny>,
    undo: Py<PyAny>,
    /// The first exception a callable raised: `step` raises it again.
    error: RefCell<Option<PyErr>>,
}

impl PyOptimizer {
    fn call(&self, what: &'static str, f: &Py<PyAny>, args: Option<f32>) -> Result<(), StageError> {
        Python::attach(|py| {
            let outcome = match args {
                Some(scale) => f.call1(py, (scale,)),
                None => f.call0(py),
            };
            outcome.map(drop).map_err(|e| {
                let message = format!("{what} raised {e}");
                self.error.borrow_mut().get_or_insert(e);
                message.into()
            })
        })
    }
}

impl Optimistic for PyOptimizer {
    fn step(&mut self, scale: f32) -> Result<(), StageError> {
        self.call("step", &self.step, Some(scale))
    }

    fn undo(&mut self) -> Result<(), StageError> {
        self.call("undo", &self.undo, None)
    }
}

/// The gradient stats of float32 or float64 arrays, in order.
fn stats_of(grads: &Bound<'_, PyAny>) -> PyResult<GradStats> {
    let arrays: Vec<Bound<'_, PyAny>> =
        if grads.hasattr("dtype")? { vec![grads.clone()] } else { grads.try_iter()?.collect::<PyResult<_>>()? };
    let mut stats = GradStats::ZERO;
    for g in &arrays {
        let a = array::array(g, "grads", false)?;
        match a.dtype {
            DType::F32 => stats.add(&bytemuck::allocation::pod_collect_to_vec::<u8, f32>(a.bytes())),
            DType::F64 => {
                for x in bytemuck::allocation::pod_collect_to_vec::<u8, f64>(a.bytes()) {
                    stats.non_finite |= !x.is_finite();
                    stats.sum_squares += x * x;
                }
            }
            other => return Err(PyTypeError::new_err(format!("gradients of {other:?}: want float32 or float64"))),
        }
    }
    Ok(stats)
}

/// The end of an iteration on one rank of a grid: the optimizer post-validation along
/// the rank's pipeline (gradient norm and inf/NaN flags, clipping at `max_norm`) and a
/// vote of every rank of the grid, so that the step is kept on every rank or on none.
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct PipelineCommitter {
    inner: Committer,
}

#[pymethods]
impl PipelineCommitter {
    /// The committer of `runner`'s stage on `grid`, clipping the global gradient norm at
    /// `max_norm` (None: no clipping).
    #[new]
    #[pyo3(signature = (grid, runner, max_norm = None))]
    fn new(grid: &PipelineGrid, runner: &PipelineRunner, max_norm: Option<f64>) -> PipelineCommitter {
        PipelineCommitter { inner: Committer::for_grid(&grid.inner, &runner.inner, max_norm) }
    }

    /// Steps the optimizer for this iteration on every rank of the grid or on none.
    /// `grads` is this stage's gradients after `grid.all_reduce_gradients` (an array,
    /// or a sequence of arrays in a fixed order; float32 or float64); `step(scale)`
    /// steps with the gradients multiplied by `scale` (1.0 first) keeping what `undo()`
    /// needs to restore the weights and optimizer state exactly. Every rank of the grid
    /// calls it. Returns (verdict, scale, norm): verdict "keep", "skip" (an inf or NaN
    /// in some stage: the step was undone) or "clip" (undone and taken again with
    /// `scale`), and the pipeline's global gradient norm. On an exception the step was
    /// undone on this rank and every other: a lost peer raises PeerLostError or
    /// AbortedError; an exception of `step` or `undo` is raised again; another rank's
    /// failed step raises AbortedError ("not committed").
    fn step(
        &self,
        py: Python<'_>,
        comm: &Bound<'_, Communicator>,
        grads: &Bound<'_, PyAny>,
        step: Py<PyAny>,
        undo: Py<PyAny>,
    ) -> PyResult<(&'static str, f32, f64)> {
        let local = stats_of(grads)?;
        let mut opt = PyOptimizer { step, undo, error: RefCell::new(None) };
        let committer = &self.inner;
        let result = comm.get().with(py, |c| Ok(committer.step(c, local, &mut opt)))?;
        match result {
            Ok(done) => {
                let (verdict, scale) = match done.verdict {
                    Verdict::Keep => ("keep", 1.0),
                    Verdict::Skip => ("skip", 1.0),
                    Verdict::Clip { scale } => ("clip", scale),
                };
                Ok((verdict, scale, done.stats.norm()))
            }
            Err(e) => Err(match opt.error.get_mut().take() {
                Some(raised) => raised,
                None => match e {
                    RunError::Uncommitted { .. } => {
                        crate::errors::to_py(py, phalanx::Error::Aborted { reason: e.to_string() })
                    }
                    e => grid_error(py, e),
                },
            }),
        }
    }
}
