//! Pipeline schedules from C: generate, validate and simulate one iteration.

use std::ffi::{c_char, c_int};

use phalanx::sched::{by_name, simulate, validate, Costs, Schedule};

use crate::args::{c_str, out_ptr, write_out};
use crate::status::{guard, invalid, null, Fail};

/// What `phx_pipeline_simulate` measured: times in the unit of the costs given, memory
/// in micro-batches' worth of one stage's activations.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct phx_pipeline_result {
    /// The longest stage span (first pass's start to last pass's end).
    pub iteration: f64,
    /// `iteration` minus one stage's work, `m (F + B + W)`.
    pub bubble: f64,
    /// The most activation memory any stage holds at once.
    pub peak_memory: f64,
}

/// Generates the pipeline schedule `schedule` ("1f1b", "interleaved", "zbh1", "zb2p",
/// "auto", "zbv", "vhalf" or "vmin") for `stages` stages and `microbatches`
/// micro-batches (`chunks` chunks per stage for "interleaved"), checks it (every pass
/// once, no deadlock, at most `memory_limit` micro-batches of activations per stage
/// unless `memory_limit <= 0`), and simulates one iteration with `costs` = {F, B, W,
/// COMM}. "zb2p" is the automatic scheduler at `2 * stages` micro-batches of memory;
/// "auto" schedules under `memory_limit`, which it needs (> 0). Writes `*out`; on error
/// names the limit (`PHX_ERR_INVALID_ARGUMENT`). Thread-safe.
///
/// # Safety
/// `schedule` is a NUL-terminated string, `costs` points to 4 doubles, `out` is valid
/// for a write of a `phx_pipeline_result` (each may be NULL: an error).
#[no_mangle]
pub unsafe extern "C" fn phx_pipeline_simulate(
    schedule: *const c_char,
    stages: usize,
    microbatches: usize,
    chunks: usize,
    costs: *const f64,
    memory_limit: f64,
    out: *mut phx_pipeline_result,
) -> c_int {
    guard(|| {
        let out = out_ptr(out, "out")?;
        // SAFETY: the caller's contract, as `named_schedule` needs it.
        let (s, costs) = unsafe { named_schedule(schedule, stages, microbatches, chunks, costs, memory_limit, false) }?;
        let t = simulate(&s, &costs).map_err(|e| invalid(e.to_string()))?;
        let result = phx_pipeline_result {
            iteration: t.iteration(),
            bubble: t.bubble(),
            peak_memory: t.peak_memory.iter().copied().fold(0.0, f64::max),
        };
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, result) };
        Ok::<(), Fail>(())
    })
}

/// The schedule `schedule` names, generated for `stages`, `microbatches` and `chunks`
/// under `costs` = {F, B, W, COMM} (NULL: unit costs, when `costs_optional`) and checked
/// against `memory_limit` (none when `<= 0`): what `phx_pipeline_simulate` and
/// `phx_pipeline_runner_new` share.
///
/// # Safety
/// `schedule` is NULL or NUL-terminated; `costs` is NULL or points to 4 doubles.
pub(crate) unsafe fn named_schedule(
    schedule: *const c_char,
    stages: usize,
    microbatches: usize,
    chunks: usize,
    costs: *const f64,
    memory_limit: f64,
    costs_optional: bool,
) -> Result<(Schedule, Costs), Fail> {
    // SAFETY: NUL-terminated or NULL (the caller's contract).
    let name = unsafe { c_str(schedule, "schedule") }?;
    let costs = if costs.is_null() {
        if !costs_optional {
            return Err(null("costs"));
        }
        Costs::unit()
    } else {
        // SAFETY: non-NULL and pointing to 4 doubles (the caller's contract).
        let c = unsafe { std::slice::from_raw_parts(costs, 4) };
        let passes_ok = c[..3].iter().all(|x| x.is_finite() && *x > 0.0);
        if !(passes_ok && c[3].is_finite() && c[3] >= 0.0) {
            return Err(invalid("costs must be {F, B, W, COMM}: passes positive, COMM at least 0"));
        }
        Costs { f: c[0], b: c[1], w: c[2], comm: c[3], w_memory: 0.0 }
    };
    let limit = (memory_limit > 0.0).then_some(memory_limit);
    let s = by_name(name, stages, microbatches, chunks, &costs, limit).map_err(|e| invalid(e.to_string()))?;
    validate(&s, &costs, limit).map_err(|e: phalanx::sched::ScheduleError| invalid(e.to_string()))?;
    Ok((s, costs))
}
