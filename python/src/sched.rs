//! Pipeline schedules from Python: `phalanx.pipeline_schedule`, the generators, the
//! validator and the simulator of `phalanx::sched` in one call.

use phalanx::sched::{by_name, simulate, validate, Costs, Pass, Schedule};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Generates a pipeline schedule, checks it and simulates one iteration.
///
/// Args:
///     schedule: "1f1b", "interleaved" (with `chunks`), "zbh1", "zb2p" (the automatic
///         scheduler at 2 * stages micro-batches of memory), "auto" (the automatic
///         scheduler under `memory_limit`, which it needs), "zbv", "vhalf" or "vmin".
///     stages: pipeline stages (at least 2).
///     microbatches: micro-batches per iteration.
///     chunks: model chunks per stage for "interleaved".
///     costs: (F, B, W, COMM): a forward, an input-gradient and a weight-gradient pass,
///         and moving one activation or gradient between stages.
///     memory_limit: refuse a schedule that holds more activation memory on a stage, in
///         micro-batches' worth.
///
/// Returns a dict: `name`; `orders`, per stage a list of (pass, micro-batch, chunk) with
/// pass one of "F", "B", "W", "BW"; `timeline`, per stage a list of (start, end);
/// `spans`, `iteration`, `bubble`, `peak_memory` (per stage). Raises ValueError for
/// parameters no schedule supports, or a memory limit the schedule exceeds.
#[pyfunction]
#[pyo3(signature = (schedule, stages, microbatches, *, chunks = 2, costs = (1.0, 1.0, 1.0, 0.0), memory_limit = None))]
pub(crate) fn pipeline_schedule<'py>(
    py: Python<'py>,
    schedule: &str,
    stages: usize,
    microbatches: usize,
    chunks: usize,
    costs: (f64, f64, f64, f64),
    memory_limit: Option<f64>,
) -> PyResult<Bound<'py, PyDict>> {
    let (s, costs) = named_schedule(schedule, stages, microbatches, chunks, costs, memory_limit)?;
    let t = simulate(&s, &costs).map_err(|e| PyValueError::new_err(e.to_string()))?;
    let orders: Vec<Vec<(&str, usize, usize)>> =
        s.stages.iter().map(|order| order.iter().map(|a| (pass_name(a.pass), a.mb, a.chunk)).collect()).collect();
    let timeline: Vec<Vec<(f64, f64)>> =
        t.passes.iter().map(|ps| ps.iter().map(|&(_, start, end)| (start, end)).collect()).collect();
    let out = PyDict::new(py);
    out.set_item("name", s.name)?;
    out.set_item("orders", orders)?;
    out.set_item("timeline", timeline)?;
    out.set_item("spans", t.spans.clone())?;
    out.set_item("iteration", t.iteration())?;
    out.set_item("bubble", t.bubble())?;
    out.set_item("peak_memory", t.peak_memory.clone())?;
    Ok(out)
}

/// The schedule `schedule` names, generated under `costs` = (F, B, W, COMM) and checked
/// against `memory_limit`: what `pipeline_schedule` and `PipelineRunner` share.
pub(crate) fn named_schedule(
    schedule: &str,
    stages: usize,
    microbatches: usize,
    chunks: usize,
    (f, b, w, comm): (f64, f64, f64, f64),
    memory_limit: Option<f64>,
) -> PyResult<(Schedule, Costs)> {
    let passes_ok = [f, b, w].iter().all(|c| c.is_finite() && *c > 0.0);
    if !(passes_ok && comm.is_finite() && comm >= 0.0) {
        return Err(PyValueError::new_err("costs must be (F, B, W, COMM): passes positive, COMM at least 0"));
    }
    let costs = Costs { f, b, w, comm, w_memory: 0.0 };
    let bad = |e: phalanx::sched::ScheduleError| PyValueError::new_err(e.to_string());
    let s = by_name(schedule, stages, microbatches, chunks, &costs, memory_limit).map_err(bad)?;
    validate(&s, &costs, memory_limit).map_err(bad)?;
    Ok((s, costs))
}

/// A pass's name: "F", "B", "W" or "BW".
pub(crate) fn pass_name(pass: Pass) -> &'static str {
    match pass {
        Pass::F => "F",
        Pass::B => "B",
        Pass::W => "W",
        Pass::BW => "BW",
    }
}
