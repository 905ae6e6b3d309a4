//! A grid of pipelines, the optimizer's post-validation and the commit-or-none step
//! from C: `phx_grid_map` (`phalanx::sched::GridMap`) places `pp` stages × `dp`
//! replicas on a group and all-reduces each stage's gradients among its replicas;
//! `phx_committer` (`phalanx::sched::Committer`) ends an iteration with an optimistic
//! step through the caller's `phx_optimizer` callbacks (`step(scale)` and an exact
//! `undo`), kept on every rank of the grid or on none.

use std::ffi::{c_char, c_int, c_void};
use std::fmt;

use phalanx::sched::{Committer, GradStats, Grid, GridMap, Optimistic, Position, RunError, StageError, Verdict};
use phalanx::DType;

use crate::args::{bytes, bytes_mut, dtype, free_handle, handle, handle_mut, out_ptr, reduce_op, write_out};
use crate::comm::phx_comm;
use crate::pipeline::{phx_pipeline_runner, run_fail};
use crate::sched::named_schedule;
use crate::status::{guard, invalid, null, Fail, PHX_ERR_ABORTED, PHX_ERR_STAGE};

/// `phx_commit_outcome.verdict`: the step was kept as taken.
pub const PHX_VERDICT_KEEP: c_int = 0;
/// The step was undone on every rank: an inf or NaN in some stage's gradients.
pub const PHX_VERDICT_SKIP: c_int = 1;
/// The step was undone and taken again with the gradients scaled by `scale` (the
/// global norm was over `max_norm`).
pub const PHX_VERDICT_CLIP: c_int = 2;

/// A position in the grid: a stage of a replica's pipeline.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct phx_grid_position {
    /// The pipeline stage, from 0.
    pub stage: usize,
    /// The data-parallel replica, from 0.
    pub replica: usize,
}

/// Where every position of a `pp × dp` grid runs (made by `phx_grid_in_order` or
/// `phx_grid_place`, freed by `phx_grid_map_free`).
pub struct phx_grid_map {
    inner: GridMap,
}

/// The sum of squares and inf/NaN flag of some gradients, as the post-validation needs
/// them: start from `{0.0, 0}` and add every gradient tensor of the stage, in a fixed
/// order, with `phx_grad_stats_add`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct phx_grad_stats {
    /// The sum of the squared elements, in double.
    pub sum_squares: f64,
    /// 1 when an element is infinite or NaN.
    pub non_finite: c_int,
}

/// The caller's optimizer, able to take a step back: `step(user, scale)` steps with
/// the gradients multiplied by `scale` (1 for the optimistic step) keeping what `undo`
/// needs; `undo(user)` restores the weights and optimizer state from before the last
/// step, exactly. Each returns 0, or a non-zero code that fails the commit with
/// `PHX_ERR_STAGE` (every rank then undoes its step). Called on the calling thread;
/// a callback must return (no `longjmp`, no C++ exception).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct phx_optimizer {
    /// Passed to both callbacks as is.
    pub user: *mut c_void,
    /// Steps with the gradients scaled by `scale`.
    pub step: Option<unsafe extern "C" fn(user: *mut c_void, scale: f32) -> c_int>,
    /// Undoes the last step exactly.
    pub undo: Option<unsafe extern "C" fn(user: *mut c_void) -> c_int>,
}

/// The end of iteration of one stage of a grid (made by `phx_committer_new`, freed by
/// `phx_committer_free`).
pub struct phx_committer {
    inner: Committer,
}

/// What `phx_committer_step` decided.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct phx_commit_outcome {
    /// `PHX_VERDICT_KEEP`, `_SKIP` or `_CLIP` (set when the step committed).
    pub verdict: c_int,
    /// The clipping factor of `PHX_VERDICT_CLIP` (1 otherwise).
    pub scale: f32,
    /// The whole pipeline's gradient stats (the sum over its stages).
    pub stats: phx_grad_stats,
    /// The non-zero code of the optimizer callback that failed, or 0.
    pub callback_status: c_int,
}

#[derive(Debug)]
struct OptimizerFailed {
    callback: &'static str,
    status: c_int,
}

impl fmt::Display for OptimizerFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the {} callback returned {}", self.callback, self.status)
    }
}

impl std::error::Error for OptimizerFailed {}

/// `phx_optimizer` as an [`Optimistic`].
struct COptimizer {
    user: *mut c_void,
    step: unsafe extern "C" fn(*mut c_void, f32) -> c_int,
    undo: unsafe extern "C" fn(*mut c_void) -> c_int,
}

impl Optimistic for COptimizer {
    fn step(&mut self, scale: f32) -> Result<(), StageError> {
        // SAFETY: the callback's contract (documented on phx_optimizer) is the C caller's.
        let status = unsafe { (self.step)(self.user, scale) };
        if status != 0 {
            return Err(Box::new(OptimizerFailed { callback: "step", status }));
        }
        Ok(())
    }

    fn undo(&mut self) -> Result<(), StageError> {
        // SAFETY: as above.
        let status = unsafe { (self.undo)(self.user) };
        if status != 0 {
            return Err(Box::new(OptimizerFailed { callback: "undo", status }));
        }
        Ok(())
    }
}

/// A grid error as a status: a failed optimizer callback is `PHX_ERR_STAGE`, a step
/// that another rank could not take `PHX_ERR_ABORTED`, the rest as the runner's.
fn grid_fail(e: &RunError) -> Fail {
    match e {
        RunError::Optimizer { .. } => Fail { code: PHX_ERR_STAGE, message: e.to_string() },
        RunError::Uncommitted { .. } => Fail { code: PHX_ERR_ABORTED, message: e.to_string() },
        _ => run_fail(e),
    }
}

fn write_map(out: *mut *mut phx_grid_map, inner: GridMap) {
    // SAFETY: `out` was checked non-NULL by the caller of this function; valid for a
    // write (the C caller's contract).
    unsafe { write_out(out, Box::into_raw(Box::new(phx_grid_map { inner }))) };
}

/// The map of a `pp × dp` grid on a fresh group of `pp·dp` ranks: position
/// `(stage, replica)` on rank `replica·pp + stage`. Writes a new map to `*out`.
///
/// # Safety
/// `out` is NULL or valid for a write of a pointer. The caller owns `*out` and frees it
/// with `phx_grid_map_free`.
#[no_mangle]
pub unsafe extern "C" fn phx_grid_in_order(pp: usize, dp: usize, rank: usize, out: *mut *mut phx_grid_map) -> c_int {
    guard(|| {
        let out = out_ptr(out, "out")?;
        let map = Grid::new(pp, dp).and_then(|g| g.in_order(rank)).map_err(|e| grid_fail(&e))?;
        write_map(out, map);
        Ok(())
    })
}

/// Places a `pp × dp` grid on the group after a view change (a collective: every rank
/// of the group calls it): each rank passes the position it held (`held`), or NULL as a
/// newcomer, which takes a free position in rank order. Writes a new map to `*out`.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `held` is NULL or valid
/// for a read; `out` is NULL or valid for a write of a pointer (freed with
/// `phx_grid_map_free`).
#[no_mangle]
pub unsafe extern "C" fn phx_grid_place(
    comm: *mut phx_comm,
    pp: usize,
    dp: usize,
    held: *const phx_grid_position,
    out: *mut *mut phx_grid_map,
) -> c_int {
    guard(|| {
        let out = out_ptr(out, "out")?;
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        // SAFETY: NULL or valid for a read (the caller's contract).
        let held = unsafe { held.as_ref() }.map(|p| Position { stage: p.stage, replica: p.replica });
        let map = Grid::new(pp, dp).and_then(|g| g.place(comm, held)).map_err(|e| grid_fail(&e))?;
        write_map(out, map);
        Ok(())
    })
}

/// This rank's position in the grid.
///
/// # Safety
/// `map` is NULL or a live map; `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn phx_grid_me(map: *const phx_grid_map, out: *mut phx_grid_position) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let map = unsafe { handle(map, "map") }?;
        let out = out_ptr(out, "out")?;
        let me = map.inner.me();
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, phx_grid_position { stage: me.stage, replica: me.replica }) };
        Ok(())
    })
}

/// The runner of this rank's stage on its replica's pipeline, for the schedule named
/// as `phx_pipeline_runner_new` names it (`pp` stages). Free it with
/// `phx_pipeline_runner_free`.
///
/// # Safety
/// `map` is NULL or a live map; `schedule` is NULL or NUL-terminated; `costs` is NULL
/// or points to 4 doubles; `out` is NULL or valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn phx_grid_runner(
    map: *const phx_grid_map,
    schedule: *const c_char,
    microbatches: usize,
    chunks: usize,
    costs: *const f64,
    memory_limit: f64,
    out: *mut *mut phx_pipeline_runner,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let map = unsafe { handle(map, "map") }?;
        let out = out_ptr(out, "out")?;
        let pp = map.inner.grid().pp;
        // SAFETY: the caller's contract, as `named_schedule` needs it.
        let (s, _) = unsafe { named_schedule(schedule, pp, microbatches, chunks, costs, memory_limit, true) }?;
        let inner = map.inner.runner(s).map_err(|e| grid_fail(&e))?;
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, Box::into_raw(Box::new(phx_pipeline_runner { inner, last: None }))) };
        Ok(())
    })
}

/// All-reduces this stage's `count` gradients of `dtype` (flattened in an order every
/// replica shares), in place, among the replicas of the stage with `op`
/// (`PHX_OP_SUM`): every rank of the grid calls it after its run. Nothing with `dp = 1`.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `map` is NULL or a live
/// map; `grads` is valid for reads and writes of `count` elements of the dtype.
#[no_mangle]
pub unsafe extern "C" fn phx_grid_all_reduce_gradients(
    comm: *mut phx_comm,
    map: *const phx_grid_map,
    grads: *mut c_void,
    count: usize,
    dtype_code: c_int,
    op: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        // SAFETY: NULL or a live handle (the caller's contract).
        let map = unsafe { handle(map, "map") }?;
        let (dt, op) = (dtype(dtype_code)?, reduce_op(op)?);
        // SAFETY: valid for `count` elements of `dt`, used by no one else (the caller's contract).
        let buf = unsafe { bytes_mut(grads, count, dt, "grads") }?;
        map.inner.all_reduce_gradients_raw(comm, buf, dt, op).map_err(|e| grid_fail(&e))
    })
}

/// Waits until every rank of the grid is done: call it after the last iteration,
/// before leaving the group.
///
/// # Safety
/// `comm` and `map` are NULL or live handles not used concurrently.
#[no_mangle]
pub unsafe extern "C" fn phx_grid_finish(comm: *mut phx_comm, map: *const phx_grid_map) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        // SAFETY: NULL or a live handle (the caller's contract).
        let map = unsafe { handle(map, "map") }?;
        map.inner.finish(comm).map_err(|e| grid_fail(&e))
    })
}

/// Frees a map (NULL is fine).
///
/// # Safety
/// `map` is NULL or a map not yet freed, not used after this call.
#[no_mangle]
pub unsafe extern "C" fn phx_grid_map_free(map: *mut phx_grid_map) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { free_handle(map) }
}

/// Adds `count` gradients of `dtype` (`PHX_DTYPE_F32` or `PHX_DTYPE_F64`) to `*stats`.
///
/// # Safety
/// `stats` is NULL or valid for reads and writes; `grads` is valid for reads of `count`
/// elements of the dtype.
#[no_mangle]
pub unsafe extern "C" fn phx_grad_stats_add(
    stats: *mut phx_grad_stats,
    grads: *const c_void,
    count: usize,
    dtype_code: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or valid and used by no one else (the caller's contract).
        let stats = unsafe { handle_mut(stats, "stats") }?;
        let dt = dtype(dtype_code)?;
        // SAFETY: valid for `count` elements of `dt` (the caller's contract).
        let raw = unsafe { bytes(grads, count, dt, "grads") }?;
        let mut s = GradStats { sum_squares: stats.sum_squares, non_finite: stats.non_finite != 0 };
        match dt {
            DType::F32 => s.add(&bytemuck::allocation::pod_collect_to_vec::<u8, f32>(raw)),
            DType::F64 => {
                for g in bytemuck::allocation::pod_collect_to_vec::<u8, f64>(raw) {
                    s.non_finite |= !g.is_finite();
                    s.sum_squares += g * g;
                }
            }
            other => return Err(invalid(format!("gradient stats of {other:?}: want f32 or f64"))),
        }
        *stats = phx_grad_stats { sum_squares: s.sum_squares, non_finite: s.non_finite.into() };
        Ok(())
    })
}

/// The end of iteration of `runner`'s stage on `map`'s grid: its pipeline's
/// post-validation, clipping the global gradient norm at `max_norm` (0, negative or
/// NaN: no clipping), and a vote of every rank of the grid. Writes a new committer to
/// `*out`.
///
/// # Safety
/// `map` and `runner` are NULL or live handles; `out` is NULL or valid for a write of a
/// pointer (freed with `phx_committer_free`).
#[no_mangle]
pub unsafe extern "C" fn phx_committer_new(
    map: *const phx_grid_map,
    runner: *const phx_pipeline_runner,
    max_norm: f64,
    out: *mut *mut phx_committer,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or live handles (the caller's contract).
        let map = unsafe { handle(map, "map") }?;
        // SAFETY: as above.
        let runner = unsafe { handle(runner, "runner") }?;
        let out = out_ptr(out, "out")?;
        let max_norm = (max_norm > 0.0 && max_norm.is_finite()).then_some(max_norm);
        let inner = Committer::for_grid(&map.inner, &runner.inner, max_norm);
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, Box::into_raw(Box::new(phx_committer { inner }))) };
        Ok(())
    })
}

/// Steps `optimizer` for this iteration on every rank of the grid or on none: `stats`
/// are this stage's gradient stats after `phx_grid_all_reduce_gradients`. Every rank
/// of the grid calls it. On success the step is kept (`outcome.verdict` says whether as
/// taken, skipped or clipped); on any error it was undone (a lost peer: `PEER_LOST` or
/// `ABORTED`; a callback's non-zero code: `PHX_ERR_STAGE`, the code in
/// `outcome.callback_status`; another rank's failed step: `PHX_ERR_ABORTED`), and the
/// weights are the last committed ones.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently (the callbacks must not
/// use it); `committer` is NULL or live; `stats` is NULL or valid for a read;
/// `optimizer` is NULL or points to callbacks that follow `phx_optimizer`'s contract;
/// `outcome_or_null` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn phx_committer_step(
    comm: *mut phx_comm,
    committer: *const phx_committer,
    stats: *const phx_grad_stats,
    optimizer: *const phx_optimizer,
    outcome_or_null: *mut phx_commit_outcome,
) -> c_int {
    let mut outcome = phx_commit_outcome { scale: 1.0, ..Default::default() };
    let status = guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        // SAFETY: NULL or live (the caller's contract).
        let committer = unsafe { handle(committer, "committer") }?;
        // SAFETY: as above.
        let stats = unsafe { handle(stats, "stats") }?;
        // SAFETY: as above.
        let cb = unsafe { handle(optimizer, "optimizer") }?;
        let mut opt = COptimizer {
            user: cb.user,
            step: cb.step.ok_or_else(|| null("optimizer->step"))?,
            undo: cb.undo.ok_or_else(|| null("optimizer->undo"))?,
        };
        let local = GradStats { sum_squares: stats.sum_squares, non_finite: stats.non_finite != 0 };
        match committer.inner.step(comm, local, &mut opt) {
            Ok(done) => {
                (outcome.verdict, outcome.scale) = match done.verdict {
                    Verdict::Keep => (PHX_VERDICT_KEEP, 1.0),
                    Verdict::Skip => (PHX_VERDICT_SKIP, 1.0),
                    Verdict::Clip { scale } => (PHX_VERDICT_CLIP, scale),
                };
                outcome.stats =
                    phx_grad_stats { sum_squares: done.stats.sum_squares, non_finite: done.stats.non_finite.into() };
                Ok(())
            }
            Err(e) => {
                if let RunError::Optimizer { source, .. } = &e {
                    if let Some(c) = source.downcast_ref::<OptimizerFailed>() {
                        outcome.callback_status = c.status;
                    }
                }
                Err(grid_fail(&e))
            }
        }
    });
    if !outcome_or_null.is_null() {
        // SAFETY: non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(outcome_or_null, outcome) };
    }
    status
}

/// Frees a committer (NULL is fine).
///
/// # Safety
/// `committer` is NULL or a committer not yet freed, not used after this call.
#[no_mangle]
pub unsafe extern "C" fn phx_committer_free(committer: *mut phx_committer) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { free_handle(committer) }
}
