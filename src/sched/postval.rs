//! Optimizer post-validation: the gradient-norm and inf/NaN check of one iteration
//! carried along the pipeline with point-to-point messages instead of a synchronisation
//! of every stage before the optimizer step (`../shared/reference/pipeline-schedules.md`,
//! 1.8).
//!
//! 1. **Partial reduction along the pipeline.** When stage `s` has run its list, it
//!    receives the running [`GradStats`] from stage `s + 1` (the last stage starts from
//!    its own), adds its own and sends the sum to stage `s - 1`. The chain runs from the
//!    last stage to the first, the order in which 1F1B-like schedules finish their
//!    backward, so a stage seldom waits for it; stage 0 ends with the whole pipeline's
//!    state. The sum is `((g[p-1] + g[p-2]) + …) + g[0]`, in `f64`, on every run.
//! 2. **Optimistic step.** Right after sending, the stage steps its optimizer assuming
//!    no clipping and no inf/NaN ([`Optimistic::step`] with scale 1).
//! 3. **The verdict travels back**: stage 0 sends the full state to stage 1, which
//!    passes it on, the direction in which the next iteration's first activations
//!    travel anyway ([`PostValidation::settle`]).
//! 4. **Validate.** Every stage derives the same [`Verdict`] from the same full state:
//!    keep the step; skip it (an inf or NaN anywhere: [`Optimistic::undo`]); or redo it
//!    with the gradients scaled by `max_norm / (norm + 1e-6)` when the global norm is
//!    over `max_norm` (undo, then step with that scale), as `torch.nn.utils.
//!    clip_grad_norm_` scales them.
//!
//! The result equals a synchronous check (all-reduce the norm, then step once) bitwise,
//! as long as [`Optimistic::undo`] restores the weights and state exactly (keep a copy;
//! an algebraic inverse of the update is not exact in floating point).
//!
//! The messages use the two tags below the runner's greeting ([`PARTIAL_TAG`],
//! [`VERDICT_TAG`]) and travel in the view of the call to [`PostValidation::step`]:
//! a view change fails them (`Aborted`). Use [`Committer`](super::Committer) to also
//! make sure that every stage keeps the step or none does.
//!
//! ```
//! use phalanx::sched::{GradStats, Verdict};
//! let a = GradStats::of(&[3.0f32]);
//! let b = GradStats::of(&[4.0f32]);
//! let full = a.combine(b);
//! assert_eq!(full.norm(), 5.0);
//! assert_eq!(full.verdict(None), Verdict::Keep);
//! assert!(matches!(full.verdict(Some(1.0)), Verdict::Clip { scale } if scale < 0.21));
//! assert_eq!(full.combine(GradStats::of(&[f32::NAN])).verdict(Some(1.0)), Verdict::Skip);
//! ```

use super::{RunError, Runner, StageError, RUNNER_TAG_BIT};
use crate::error::Error;
use crate::plan::Rank;
use crate::Communicator;

/// The tag of the partial state travelling from stage `s + 1` to `s`.
pub const PARTIAL_TAG: u32 = RUNNER_TAG_BIT | (RUNNER_TAG_BIT - 2);
/// The tag of the full state travelling from stage `s - 1` to `s`.
pub const VERDICT_TAG: u32 = RUNNER_TAG_BIT | (RUNNER_TAG_BIT - 3);

/// What the check needs of some gradients: the sum of their squares and whether any is
/// infinite or NaN.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradStats {
    /// The sum of the squared elements, in `f64`, in order.
    pub sum_squares: f64,
    /// Whether an element is infinite or NaN.
    pub non_finite: bool,
}

/// What a stage does with its optimistic step once the full state is known.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    /// Keep it: no inf/NaN, the norm within the limit.
    Keep,
    /// Undo it: an inf or NaN somewhere (a mixed-precision loss scaler would lower its
    /// scale here).
    Skip,
    /// Undo it and step again with the gradients multiplied by `scale` (< 1).
    Clip {
        /// `max_norm / (norm + 1e-6)`, as `f32`.
        scale: f32,
    },
}

impl GradStats {
    /// Nothing yet: no elements.
    pub const ZERO: GradStats = GradStats { sum_squares: 0.0, non_finite: false };

    /// The stats of `grads`.
    pub fn of(grads: &[f32]) -> GradStats {
        let mut s = GradStats::ZERO;
        s.add(grads);
        s
    }

    /// Adds the elements of `grads` (a stage with several tensors calls it for each, in
    /// a fixed order).
    pub fn add(&mut self, grads: &[f32]) {
        for &g in grads {
            self.non_finite |= !g.is_finite();
            self.sum_squares += f64::from(g) * f64::from(g);
        }
    }

    /// `self`, then `later`'s elements.
    pub fn combine(self, later: GradStats) -> GradStats {
        GradStats { sum_squares: self.sum_squares + later.sum_squares, non_finite: self.non_finite || later.non_finite }
    }

    /// The L2 norm.
    pub fn norm(&self) -> f64 {
        self.sum_squares.sqrt()
    }

    /// The verdict for these (whole-pipeline) stats under a clipping limit.
    pub fn verdict(&self, max_norm: Option<f64>) -> Verdict {
        if self.non_finite || !self.sum_squares.is_finite() {
            return Verdict::Skip;
        }
        match max_norm {
            Some(max) => {
                let scale = max / (self.norm() + 1e-6);
                if scale < 1.0 {
                    Verdict::Clip { scale: scale as f32 }
                } else {
                    Verdict::Keep
                }
            }
            None => Verdict::Keep,
        }
    }
}

/// The user's optimizer, able to take a step back.
pub trait Optimistic {
    /// Steps with the gradients multiplied by `scale` (1 for the optimistic step),
    /// keeping what [`Optimistic::undo`] needs.
    fn step(&mut self, scale: f32) -> Result<(), StageError>;

    /// Restores the weights and optimizer state from before the last
    /// [`Optimistic::step`], exactly.
    fn undo(&mut self) -> Result<(), StageError>;
}

/// An optimistic step taken (or not: a failure before it is kept here and reported by
/// [`PostValidation::settle`]), its verdict not yet known (see [`PostValidation::step`]).
#[derive(Debug)]
#[must_use = "settle the step: its verdict may undo it, and the next stages wait for it"]
pub struct Stepped {
    /// The running stats passed on (stage 0: the whole pipeline's), or why not.
    running: Result<GradStats, RunError>,
    /// Whether the optimistic step was applied.
    applied: bool,
    epoch: u64,
}

/// The post-validation of one stage of a pipeline (see the module docs).
#[derive(Clone, Debug)]
pub struct PostValidation {
    stage: usize,
    ranks: Vec<Rank>,
    max_norm: Option<f64>,
}

impl PostValidation {
    /// The check of `runner`'s stage on its pipeline's ranks, clipping the global norm
    /// at `max_norm` (`None`: only inf/NaN).
    pub fn new(runner: &Runner, max_norm: Option<f64>) -> PostValidation {
        PostValidation { stage: runner.stage(), ranks: runner.pipeline_ranks().to_vec(), max_norm }
    }

    fn last(&self) -> bool {
        self.stage + 1 == self.ranks.len()
    }

    /// Steps 1 and 2: passes the running stats on with this stage's `local` ones, then
    /// steps `opt` optimistically. Call it after the iteration's run (and the replicas'
    /// gradient all-reduce); then always [`PostValidation::settle`], which reports a
    /// failure here. A failure still passes a "broken" mark on, so that no stage waits
    /// for this one: every stage of the pipeline then fails in `settle`.
    pub fn step<O: Optimistic + ?Sized>(&self, comm: &mut Communicator, local: GradStats, opt: &mut O) -> Stepped {
        let epoch = comm.epoch();
        let mut running = Ok(local);
        if !self.last() {
            let from = self.ranks[self.stage + 1];
            let mut w = [0f64; 3];
            running = match comm.recv_in(epoch, from, PARTIAL_TAG, &mut w) {
                Ok(()) => from_wire(w, self.stage + 1).map(|r| r.combine(local)),
                Err(e) => Err(fail("receiving the gradient stats from", from, e)),
            };
        }
        if self.stage > 0 {
            let to = self.ranks[self.stage - 1];
            if let Err(e) = comm.send_in(epoch, to, PARTIAL_TAG, &to_wire(&running)) {
                running = running.and(Err(fail("sending the gradient stats to", to, e)));
            }
        }
        let mut applied = false;
        if running.is_ok() {
            match opt.step(1.0) {
                Ok(()) => applied = true,
                Err(source) => running = Err(RunError::Optimizer { what: "stepping", source }),
            }
        }
        Stepped { running, applied, epoch }
    }

    /// Steps 3 and 4: learns the whole pipeline's stats (stage 0 has them, the others
    /// receive them from the stage before and pass them on), and keeps, undoes or redoes
    /// the step. If the stats do not come (a lost peer), or this or another stage of the
    /// pipeline failed, the step is undone and the error returned. Returns the verdict
    /// and the stats.
    pub fn settle<O: Optimistic + ?Sized>(
        &self,
        comm: &mut Communicator,
        stepped: Stepped,
        opt: &mut O,
    ) -> Result<(Verdict, GradStats), RunError> {
        let Stepped { running, applied, epoch } = stepped;
        let full = if self.stage == 0 {
            running
        } else {
            let from = self.ranks[self.stage - 1];
            let mut w = [0f64; 3];
            let got = match comm.recv_in(epoch, from, VERDICT_TAG, &mut w) {
                Ok(()) => from_wire(w, self.stage - 1),
                Err(e) => Err(fail("receiving the pipeline's gradient stats from", from, e)),
            };
            // This stage's own failure first: it is the cause.
            running.and(got)
        };
        let mut full = full;
        if !self.last() {
            let to = self.ranks[self.stage + 1];
            // Passed on broken too, so that the next stage does not wait for it.
            if let Err(e) = comm.send_in(epoch, to, VERDICT_TAG, &to_wire(&full)) {
                full = full.and(Err(fail("sending the pipeline's gradient stats to", to, e)));
            }
        }
        let undo = |opt: &mut O| opt.undo().map_err(|source| RunError::Optimizer { what: "undoing the step", source });
        let full = match full {
            Ok(full) => full,
            Err(e) => {
                if applied {
                    undo(opt)?;
                }
                return Err(e);
            }
        };
        let verdict = full.verdict(self.max_norm);
        match verdict {
            Verdict::Keep => {}
            Verdict::Skip => undo(opt)?,
            Verdict::Clip { scale } => {
                undo(opt)?;
                opt.step(scale).map_err(|source| RunError::Optimizer { what: "redoing the step clipped", source })?;
            }
        }
        Ok((verdict, full))
    }
}

/// The stats on the wire: the sum, the inf/NaN flag, and a "broken" mark.
fn to_wire(s: &Result<GradStats, RunError>) -> [f64; 3] {
    match s {
        Ok(s) => [s.sum_squares, if s.non_finite { 1.0 } else { 0.0 }, 0.0],
        Err(_) => [0.0, 0.0, 1.0],
    }
}

fn from_wire(w: [f64; 3], from_stage: usize) -> Result<GradStats, RunError> {
    if w[2] != 0.0 {
        return Err(RunError::Uncommitted {
            detail: format!("stage {from_stage} (or one beyond it) could not take part in the post-validation"),
        });
    }
    Ok(GradStats { sum_squares: w[0], non_finite: w[1] != 0.0 })
}

fn fail(what: &'static str, peer: Rank, source: Error) -> RunError {
    RunError::Comm { at: None, what, peer, source: Box::new(source) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_the_flags_and_the_limit() {
        let s = GradStats::of(&[3.0, 4.0]);
        assert_eq!(s.sum_squares, 25.0);
        assert_eq!(s.verdict(None), Verdict::Keep);
        assert_eq!(s.verdict(Some(5.0)), Verdict::Clip { scale: (5.0 / (5.0 + 1e-6)) as f32 });
        assert_eq!(s.verdict(Some(6.0)), Verdict::Keep);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let with = s.combine(GradStats::of(&[bad]));
            assert!(with.non_finite);
            assert_eq!(with.verdict(None), Verdict::Skip, "{bad}");
        }
        // Finite elements whose squares overflow f64 are not a clean step either.
        let huge = GradStats { sum_squares: f64::INFINITY, non_finite: false };
        assert_eq!(huge.verdict(Some(1.0)), Verdict::Skip);
        let mut acc = GradStats::ZERO;
        acc.add(&[3.0]);
        acc.add(&[4.0]);
        assert_eq!(acc, s);
    }

    #[test]
    fn runner_tags_never_take_the_post_validation_tags() {
        use super::super::{tag, Direction};
        let edge = (RUNNER_TAG_BIT as usize - 4) / 2; // the last micro-batch whose tags fit, on one stage
        let last = tag(edge, 0, 1, Direction::Activation).unwrap();
        assert!(last < VERDICT_TAG && VERDICT_TAG < PARTIAL_TAG);
        assert_eq!(tag(edge, 0, 1, Direction::Gradient), None);
        assert_eq!(tag(edge + 1, 0, 1, Direction::Activation), None);
    }

    #[test]
    fn the_wire_carries_the_stats_and_the_broken_mark() {
        let s = GradStats { sum_squares: 2.5, non_finite: true };
        assert_eq!(from_wire(to_wire(&Ok(s)), 1).unwrap(), s);
        let broken = to_wire(&Err(RunError::Invalid("x".into())));
        let e = from_wire(broken, 3).unwrap_err();
        assert!(matches!(e, RunError::Uncommitted { .. }) && e.to_string().contains("stage 3"), "{e}");
    }
}
