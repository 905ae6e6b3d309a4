//! The pipeline runner from C: `phx_pipeline_runner` executes one stage of a named
//! schedule on a communicator, calling the C caller's `phx_pipeline_stage` callbacks
//! for each pass (`phalanx::sched::Runner` with a `Stage` made of function pointers).

use std::ffi::{c_char, c_int, c_void};
use std::fmt;
use std::time::Instant;

use phalanx::sched::{Action, Executed, Pass, RunError, Runner, Stage, StageError, Step};
use phalanx::Element;

use crate::args::{dtype, free_handle, handle, handle_mut, out_ptr, write_out};
use crate::comm::phx_comm;
use crate::sched::named_schedule;
use crate::status::{guard, invalid, null, status_of, Fail, PHX_ERR_BUFFER_TOO_SMALL, PHX_ERR_STAGE};

/// `phx_pipeline_pass.pass`, `phx_pipeline_outcome.failed_pass`: a forward.
pub const PHX_PASS_F: c_int = 0;
/// A backward for the input gradient only.
pub const PHX_PASS_B: c_int = 1;
/// A backward for the weight gradient only.
pub const PHX_PASS_W: c_int = 2;
/// A fused backward (input and weight gradients).
pub const PHX_PASS_BW: c_int = 3;

fn pass_code(pass: Pass) -> c_int {
    match pass {
        Pass::F => PHX_PASS_F,
        Pass::B => PHX_PASS_B,
        Pass::W => PHX_PASS_W,
        Pass::BW => PHX_PASS_BW,
    }
}

/// One stage of a pipeline schedule, ready to run iteration after iteration (made by
/// `phx_pipeline_runner_new`, freed by `phx_pipeline_runner_free`). It keeps the
/// timeline of its last successful run (`phx_pipeline_runner_timeline`).
pub struct phx_pipeline_runner {
    pub(crate) inner: Runner,
    pub(crate) last: Option<Executed>,
}

/// Where a pass sits in the model, as the callbacks see it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct phx_pipeline_step {
    /// The micro-batch, from 0.
    pub mb: usize,
    /// The chunk of this stage, from 0.
    pub chunk: usize,
    /// The virtual stage (part of the model) this chunk holds, from 0.
    pub virtual_stage: usize,
    /// How many virtual stages the model has (stages × chunks).
    pub virtual_stages: usize,
    /// 1 on the model's first part: its forward reads the micro-batch itself.
    pub is_first: c_int,
    /// 1 on the model's last part: its forward computes the loss, its backward starts
    /// from it.
    pub is_last: c_int,
}

impl From<&Step> for phx_pipeline_step {
    fn from(s: &Step) -> phx_pipeline_step {
        phx_pipeline_step {
            mb: s.mb,
            chunk: s.chunk,
            virtual_stage: s.virtual_stage,
            virtual_stages: s.virtual_stages,
            is_first: s.is_first().into(),
            is_last: s.is_last().into(),
        }
    }
}

/// A length callback (for the Rust side; C sees the field types).
type LenFn = unsafe extern "C" fn(*mut c_void, *const phx_pipeline_step) -> usize;
/// A buffer-to-buffer pass callback.
type PassFn =
    unsafe extern "C" fn(*mut c_void, *const phx_pipeline_step, *const c_void, usize, *mut c_void, usize) -> c_int;
/// The weight-gradient callback.
type WeightFn = unsafe extern "C" fn(*mut c_void, *const phx_pipeline_step) -> c_int;

/// The user's compute for the chunks one stage holds: function pointers called by
/// `phx_pipeline_run` in the schedule's order, on the thread that called it, one at a
/// time, each with `user` and the pass's `phx_pipeline_step`. Buffers hold elements of
/// `dtype` (aligned for it); the library owns them, valid during the call only.
///
/// The pass callbacks return 0, or a non-zero code that fails the run with
/// `PHX_ERR_STAGE`. A callback must return: it must not `longjmp` out or throw a C++
/// exception through the library (undefined behaviour), and must not call `phx_`
/// functions on the communicator being run.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct phx_pipeline_stage {
    /// The element type of activations and gradients (`PHX_DTYPE_*`).
    pub dtype: c_int,
    /// Passed to every callback as is.
    pub user: *mut c_void,
    /// The element count of the activation `step`'s forward receives (not asked on the
    /// first virtual stage); must equal the previous virtual stage's `output_len`.
    pub input_len: Option<unsafe extern "C" fn(user: *mut c_void, step: *const phx_pipeline_step) -> usize>,
    /// The element count of `step`'s forward output (not asked on the last virtual stage).
    pub output_len: Option<unsafe extern "C" fn(user: *mut c_void, step: *const phx_pipeline_step) -> usize>,
    /// Forward: writes `output` (`output_len` elements) from `input` (`input_len`). On
    /// the first virtual stage `input` is NULL with length 0 (read the micro-batch
    /// yourself); on the last, `output` is NULL with length 0 (keep the loss yourself).
    pub forward: Option<
        unsafe extern "C" fn(
            user: *mut c_void,
            step: *const phx_pipeline_step,
            input: *const c_void,
            input_len: usize,
            output: *mut c_void,
            output_len: usize,
        ) -> c_int,
    >,
    /// Input gradient (`B`): writes the gradient of the input (`output`, `input_len`
    /// elements) from that of the output (`input`, `output_len` elements). On the last
    /// virtual stage the incoming gradient is NULL with length 0 (start from the loss);
    /// on the first, `output` is NULL with length 0.
    pub backward_input: Option<
        unsafe extern "C" fn(
            user: *mut c_void,
            step: *const phx_pipeline_step,
            input: *const c_void,
            input_len: usize,
            output: *mut c_void,
            output_len: usize,
        ) -> c_int,
    >,
    /// Weight gradient (`W`), after this micro-batch's `backward_input` on this chunk.
    pub backward_weight: Option<unsafe extern "C" fn(user: *mut c_void, step: *const phx_pipeline_step) -> c_int>,
    /// Fused backward (`BW`, as 1F1B runs it), with `backward_input`'s buffers; NULL:
    /// `backward_input` then `backward_weight`.
    pub backward: Option<
        unsafe extern "C" fn(
            user: *mut c_void,
            step: *const phx_pipeline_step,
            input: *const c_void,
            input_len: usize,
            output: *mut c_void,
            output_len: usize,
        ) -> c_int,
    >,
}

/// What one `phx_pipeline_run` did, success or not.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct phx_pipeline_outcome {
    /// Passes of this stage that completed.
    pub passes: usize,
    /// Seconds from the call's start to its end.
    pub seconds: f64,
    /// The stage's span, seconds from its first pass's compute to its last's (0 on an
    /// error), as the simulator measures it.
    pub span: f64,
    /// On `PHX_ERR_STAGE`: the callback's non-zero return; otherwise 0.
    pub callback_status: c_int,
    /// The position in this stage's list of the pass that failed; `SIZE_MAX` when none
    /// did (success, or a failure while opening the links).
    pub failed_index: usize,
    /// That pass's kind (`PHX_PASS_*`), -1 when none.
    pub failed_pass: c_int,
    /// That pass's micro-batch (0 when none).
    pub failed_mb: usize,
    /// That pass's chunk (0 when none).
    pub failed_chunk: usize,
}

/// One pass of a run's timeline, times in seconds since the run began.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct phx_pipeline_pass {
    /// `PHX_PASS_*`.
    pub pass: c_int,
    /// The micro-batch.
    pub mb: usize,
    /// The chunk.
    pub chunk: usize,
    /// When the runner began it (then waited for its input, if any).
    pub begin: f64,
    /// When its input was in and the callback was called.
    pub ready: f64,
    /// When the callback returned.
    pub computed: f64,
    /// When its output was handed on.
    pub end: f64,
}

/// A callback's non-zero return, as the stage error the runner reports.
#[derive(Debug)]
struct CallbackFailed {
    callback: &'static str,
    status: c_int,
}

impl fmt::Display for CallbackFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the {} callback returned {}", self.callback, self.status)
    }
}

impl std::error::Error for CallbackFailed {}

/// The C callbacks as a [`Stage`] of elements `T` (the callbacks' `dtype`).
struct CStage<T> {
    cb: phx_pipeline_stage,
    input_len: LenFn,
    output_len: LenFn,
    forward: PassFn,
    backward_input: PassFn,
    backward_weight: WeightFn,
    _elem: std::marker::PhantomData<T>,
}

impl<T> CStage<T> {
    fn new(cb: &phx_pipeline_stage) -> Result<CStage<T>, Fail> {
        Ok(CStage {
            cb: *cb,
            input_len: cb.input_len.ok_or_else(|| null("stage->input_len"))?,
            output_len: cb.output_len.ok_or_else(|| null("stage->output_len"))?,
            forward: cb.forward.ok_or_else(|| null("stage->forward"))?,
            backward_input: cb.backward_input.ok_or_else(|| null("stage->backward_input"))?,
            backward_weight: cb.backward_weight.ok_or_else(|| null("stage->backward_weight"))?,
            _elem: std::marker::PhantomData,
        })
    }
}

impl<T: Element> CStage<T> {
    /// Calls a buffer-to-buffer callback with `input` and a fresh output of `out_len`.
    fn map(
        &self,
        f: PassFn,
        callback: &'static str,
        step: &Step,
        input: &[T],
        out_len: usize,
    ) -> Result<Vec<T>, StageError> {
        let mut out = vec![T::zeroed(); out_len];
        let (ip, op) = (
            if input.is_empty() { std::ptr::null() } else { input.as_ptr().cast::<c_void>() },
            if out.is_empty() { std::ptr::null_mut() } else { out.as_mut_ptr().cast::<c_void>() },
        );
        let s = phx_pipeline_step::from(step);
        // SAFETY: `ip` is NULL or valid for `input.len()` elements and `op` NULL or valid
        // for `out_len` writable elements, both aligned for T and alive during the call;
        // the callback's contract (documented on phx_pipeline_stage) is the C caller's.
        let status = unsafe { f(self.cb.user, &s, ip, input.len(), op, out_len) };
        if status != 0 {
            return Err(Box::new(CallbackFailed { callback, status }));
        }
        Ok(out)
    }

    fn len(&self, f: LenFn, step: &Step) -> usize {
        let s = phx_pipeline_step::from(step);
        // SAFETY: the callback's contract is the C caller's; `s` lives during the call.
        unsafe { f(self.cb.user, &s) }
    }
}

impl<T: Element> Stage for CStage<T> {
    type Elem = T;

    fn input_len(&self, step: &Step) -> usize {
        self.len(self.input_len, step)
    }

    fn output_len(&self, step: &Step) -> usize {
        self.len(self.output_len, step)
    }

    fn forward(&mut self, step: &Step, input: &[T]) -> Result<Vec<T>, StageError> {
        let n = if step.is_last() { 0 } else { self.output_len(step) };
        self.map(self.forward, "forward", step, input, n)
    }

    fn backward_input(&mut self, step: &Step, grad_out: &[T]) -> Result<Vec<T>, StageError> {
        let n = if step.is_first() { 0 } else { self.input_len(step) };
        self.map(self.backward_input, "backward_input", step, grad_out, n)
    }

    fn backward_weight(&mut self, step: &Step) -> Result<(), StageError> {
        let s = phx_pipeline_step::from(step);
        // SAFETY: the callback's contract is the C caller's; `s` lives during the call.
        let status = unsafe { (self.backward_weight)(self.cb.user, &s) };
        if status != 0 {
            return Err(Box::new(CallbackFailed { callback: "backward_weight", status }));
        }
        Ok(())
    }

    fn backward(&mut self, step: &Step, grad_out: &[T]) -> Result<Vec<T>, StageError> {
        match self.cb.backward {
            Some(f) => {
                let n = if step.is_first() { 0 } else { self.input_len(step) };
                self.map(f, "backward", step, grad_out, n)
            }
            None => {
                let grad_in = self.backward_input(step, grad_out)?;
                self.backward_weight(step)?;
                Ok(grad_in)
            }
        }
    }
}

/// Runs one iteration with the callbacks' element type.
fn run_as<T: Element>(
    runner: &Runner,
    comm: &mut phalanx::Communicator,
    cb: &phx_pipeline_stage,
) -> Result<Result<Executed, RunError>, Fail> {
    let mut stage = CStage::<T>::new(cb)?;
    Ok(runner.run(comm, &mut stage))
}

/// The status and message of a failed run.
pub(crate) fn run_fail(e: &RunError) -> Fail {
    let message = e.to_string();
    match (e, e.comm_error()) {
        (RunError::Stage { .. }, _) => Fail { code: PHX_ERR_STAGE, message },
        (_, Some(source)) => Fail { code: status_of(source.kind()), message },
        _ => invalid(message),
    }
}

/// Builds the runner of stage `stage` of the pipeline schedule `schedule` (a name as
/// for `phx_pipeline_simulate`: "1f1b", "interleaved" with `chunks`, "zbh1", "zb2p",
/// "auto", "zbv", "vhalf", "vmin") for `stages` stages and `microbatches`
/// micro-batches, and stores it in `*out`. `costs` = {F, B, W, COMM} guides the
/// automatic schedulers (NULL: all passes 1, COMM 0); a schedule over `memory_limit`
/// micro-batches of activations per stage is refused unless `memory_limit <= 0`.
/// Stage `s` runs on rank `s` of the communicator. Invalid parameters are
/// `PHX_ERR_INVALID_ARGUMENT` with the limit named. Thread-safe.
///
/// Ownership: the caller owns `*out` and frees it with `phx_pipeline_runner_free`.
///
/// # Safety
/// `schedule` is NULL or NUL-terminated; `costs` is NULL or points to 4 doubles; `out`
/// is NULL or valid for a write of a pointer.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn phx_pipeline_runner_new(
    schedule: *const c_char,
    stages: usize,
    microbatches: usize,
    chunks: usize,
    costs: *const f64,
    memory_limit: f64,
    stage: usize,
    out: *mut *mut phx_pipeline_runner,
) -> c_int {
    guard(|| {
        let out = out_ptr(out, "out")?;
        // SAFETY: the caller's contract, as `named_schedule` needs it.
        let (s, _) = unsafe { named_schedule(schedule, stages, microbatches, chunks, costs, memory_limit, true) }?;
        let inner = Runner::new(s, stage).map_err(|e| run_fail(&e))?;
        let runner = Box::new(phx_pipeline_runner { inner, last: None });
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, Box::into_raw(runner)) };
        Ok(())
    })
}

/// Runs stage `s` of `runner`'s pipeline on rank `ranks[s]` of the communicator
/// instead of rank `s`: `count` (the number of stages) distinct ranks, so that several
/// pipelines share a group (pipelines × data-parallel replicas). Every stage's runner
/// must be given the same ranks. Distinct ranks of the wrong count are
/// `PHX_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// `runner` is NULL or a live runner not used concurrently; `ranks` is NULL or valid for
/// reads of `count` elements.
#[no_mangle]
pub unsafe extern "C" fn phx_pipeline_runner_set_ranks(
    runner: *mut phx_pipeline_runner,
    ranks: *const usize,
    count: usize,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let runner = unsafe { handle_mut(runner, "runner") }?;
        if ranks.is_null() {
            return Err(null("ranks"));
        }
        // SAFETY: non-NULL and valid for `count` reads (the caller's contract).
        let ranks = unsafe { std::slice::from_raw_parts(ranks, count) }.to_vec();
        runner.inner = runner.inner.clone().ranks(ranks).map_err(|e| run_fail(&e))?;
        Ok(())
    })
}

/// Runs this stage's passes of one iteration on `comm` (rank `stage` of the group, or
/// as `phx_pipeline_runner_set_ranks` says), calling `stage`'s callbacks for each pass
/// in the schedule's order and moving activations and gradients to and from the
/// neighbour stages, which run the same schedule at the same time. Returns when this stage's list is done (its neighbours
/// may still finish theirs: step the optimizer meanwhile, and call
/// `phx_pipeline_finish` after the last iteration, before leaving the group).
///
/// Fills `*outcome_or_null` in every case (success or not) unless NULL. A callback's
/// non-zero return ends the run with `PHX_ERR_STAGE`, its code in `callback_status`;
/// the other stages then wait for this one, so leave the group (`phx_comm_leave`). A
/// lost neighbour gives `PHX_ERR_PEER_LOST` or `PHX_ERR_ABORTED` (the iteration is
/// lost on every stage); a callback output of a length other than its `*_len` or a
/// message over the receiver's queue is `PHX_ERR_INVALID_ARGUMENT`. `phx_last_error`
/// names the stage and the pass. Nothing is rolled back: weights the callbacks changed
/// are the caller's to discard.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently (the callbacks must not
/// use it); `runner` is NULL or a live runner not used concurrently; `stage` is NULL or
/// points to callbacks that follow `phx_pipeline_stage`'s contract; `outcome_or_null` is
/// NULL or valid for a write of a `phx_pipeline_outcome`.
#[no_mangle]
pub unsafe extern "C" fn phx_pipeline_run(
    comm: *mut phx_comm,
    runner: *mut phx_pipeline_runner,
    stage: *const phx_pipeline_stage,
    outcome_or_null: *mut phx_pipeline_outcome,
) -> c_int {
    let start = Instant::now();
    let mut outcome = phx_pipeline_outcome {
        passes: 0,
        seconds: 0.0,
        span: 0.0,
        callback_status: 0,
        failed_index: usize::MAX,
        failed_pass: -1,
        failed_mb: 0,
        failed_chunk: 0,
    };
    let status = guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        // SAFETY: as above.
        let runner = unsafe { handle_mut(runner, "runner") }?;
        // SAFETY: NULL or live callbacks (the caller's contract).
        let cb = unsafe { handle(stage, "stage") }?;
        let r = &runner.inner;
        let result = phalanx::with_dtype!(dtype(cb.dtype)?, T => run_as::<T>(r, comm, cb))?;
        match result {
            Ok(executed) => {
                outcome.passes = executed.passes.len();
                outcome.span = executed.span().as_secs_f64();
                runner.last = Some(executed);
                Ok(())
            }
            Err(e) => {
                if let Some(at) = e.at() {
                    outcome.passes = at.index;
                    outcome.failed_index = at.index;
                    outcome.failed_pass = pass_code(at.action.pass);
                    outcome.failed_mb = at.action.mb;
                    outcome.failed_chunk = at.action.chunk;
                }
                if let RunError::Stage { source, .. } = &e {
                    if let Some(c) = source.downcast_ref::<CallbackFailed>() {
                        outcome.callback_status = c.status;
                    }
                }
                Err(run_fail(&e))
            }
        }
    });
    if !outcome_or_null.is_null() {
        outcome.seconds = start.elapsed().as_secs_f64();
        // SAFETY: non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(outcome_or_null, outcome) };
    }
    status
}

/// Waits until every stage of the pipeline has run its list (a barrier of the
/// pipeline's ranks). Call it on every stage after the last iteration, before leaving
/// the group: a stage that leaves while a neighbour still receives its last messages
/// makes that neighbour fail. A lost peer gives its status (`PHX_ERR_PEER_LOST`, ...).
///
/// # Safety
/// `comm` and `runner` are NULL or live handles not used concurrently.
#[no_mangle]
pub unsafe extern "C" fn phx_pipeline_finish(comm: *mut phx_comm, runner: *const phx_pipeline_runner) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        // SAFETY: NULL or a live handle (the caller's contract).
        let runner = unsafe { handle(runner, "runner") }?;
        runner.inner.finish(comm).map_err(|e| run_fail(&e))
    })
}

/// The timeline of the runner's last successful `phx_pipeline_run`: its passes in the
/// order they ran, times in seconds since that run began. Writes the count to `*count`
/// and, if `capacity` suffices, the passes to `passes` (NULL with capacity 0 asks for
/// the count only); a smaller capacity is `PHX_ERR_BUFFER_TOO_SMALL` (count written).
/// No run yet: count 0.
///
/// # Safety
/// `runner` is NULL or a live runner; `passes` is NULL or valid for writes of
/// `capacity` elements; `count` is NULL or valid for a write of a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn phx_pipeline_runner_timeline(
    runner: *const phx_pipeline_runner,
    passes: *mut phx_pipeline_pass,
    capacity: usize,
    count: *mut usize,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let runner = unsafe { handle(runner, "runner") }?;
        let count = out_ptr(count, "count")?;
        let rows = runner.last.as_ref().map(timeline).unwrap_or_default();
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(count, rows.len()) };
        if rows.is_empty() {
            return Ok(());
        }
        if capacity < rows.len() {
            return Err(Fail {
                code: PHX_ERR_BUFFER_TOO_SMALL,
                message: format!("the timeline has {} passes; capacity {capacity}", rows.len()),
            });
        }
        let passes = out_ptr(passes, "passes")?;
        for (i, row) in rows.into_iter().enumerate() {
            // SAFETY: `passes` is valid for `capacity >= rows.len()` writes (the caller's
            // contract), so `passes + i` is in bounds.
            unsafe { write_out(passes.add(i), row) };
        }
        Ok(())
    })
}

/// The passes of `e` as C rows.
fn timeline(e: &Executed) -> Vec<phx_pipeline_pass> {
    let at = |t: Instant| t.saturating_duration_since(e.start).as_secs_f64();
    e.passes
        .iter()
        .map(|p| {
            let Action { pass, mb, chunk } = p.action;
            phx_pipeline_pass {
                pass: pass_code(pass),
                mb,
                chunk,
                begin: at(p.begin),
                ready: at(p.ready),
                computed: at(p.computed),
                end: at(p.end),
            }
        })
        .collect()
}

/// Frees a runner (NULL is ignored). Thread-safe for distinct runners.
///
/// # Safety
/// `runner` is NULL or a runner from `phx_pipeline_runner_new` not freed before and not
/// in use.
#[no_mangle]
pub unsafe extern "C" fn phx_pipeline_runner_free(runner: *mut phx_pipeline_runner) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { free_handle(runner) }
}
