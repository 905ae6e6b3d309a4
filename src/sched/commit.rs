//! Commit-or-none: an iteration's optimizer step is kept on every stage or on none.
//!
//! After its run (and the replicas' gradient all-reduce), each stage steps
//! optimistically and settles the post-validation verdict ([`PostValidation`]); then
//! every rank of the grid votes, in one collective, whether it got that far. A
//! collective either succeeds on every survivor or fails on every survivor (README, "The
//! fault-tolerance contract"), so the outcome is the same everywhere:
//!
//! - the vote succeeds and every rank voted yes: the step is committed;
//! - the vote succeeds with a "no" (a stage whose post-validation or optimizer failed):
//!   every rank undoes its step and returns [`RunError::Uncommitted`] (the failed stage
//!   returns its own error);
//! - the vote fails (a peer was lost, or the view moved): every survivor undoes its step
//!   and returns [`RunError::Collective`] with the communicator's `PeerLost` or
//!   `Aborted`, within the peer timeout.
//!
//! A stage whose run failed never stepped: its weights are the last committed ones. It
//! must not vote (the others' vote then fails once it leaves, or the view moves): settle
//! the group (`update_topology`) and run the iteration again.
//!
//! ```
//! use phalanx::sched::{one_f_one_b, Committer, GradStats, Optimistic, Runner, StageError};
//! use phalanx::Communicator;
//!
//! /// One weight, plain SGD, a copy kept for undo.
//! struct Sgd { w: f32, g: f32, saved: f32 }
//! impl Optimistic for Sgd {
//!     fn step(&mut self, scale: f32) -> Result<(), StageError> {
//!         self.saved = self.w;
//!         self.w -= 0.5 * self.g * scale;
//!         Ok(())
//!     }
//!     fn undo(&mut self) -> Result<(), StageError> {
//!         self.w = self.saved;
//!         Ok(())
//!     }
//! }
//!
//! let comms = Communicator::local_group(2, Default::default())?;
//! let ws: Vec<f32> = std::thread::scope(|s| {
//!     let hs: Vec<_> = comms.into_iter().enumerate().map(|(stage, mut comm)| s.spawn(move || {
//!         let runner = Runner::new(one_f_one_b(2, 2).unwrap(), stage).unwrap();
//!         // (runner.run(...) computed the gradient: stage 0 has 3, stage 1 has 4)
//!         let mut sgd = Sgd { w: 1.0, g: [3.0, 4.0][stage], saved: 0.0 };
//!         let committer = Committer::new(&runner, vec![0, 1], Some(1.0));
//!         let done = committer.step(&mut comm, GradStats::of(&[sgd.g]), &mut sgd).unwrap();
//!         assert_eq!(done.stats.norm(), 5.0); // clipped to norm 1: scale about 1/5
//!         comm.barrier().unwrap(); // no rank leaves while another still votes
//!         sgd.w
//!     })).collect();
//!     hs.into_iter().map(|h| h.join().unwrap()).collect()
//! });
//! assert_eq!(ws, vec![1.0 - 0.5 * 3.0 * (1.0 / (5.0 + 1e-6)) as f32, 1.0 - 0.5 * 4.0 * (1.0 / (5.0 + 1e-6)) as f32]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use super::{GradStats, GridMap, Optimistic, PostValidation, RunError, Runner, Verdict};
use crate::dtype::ReduceOp;
use crate::plan::Rank;
use crate::Communicator;

/// A committed step: what the post-validation decided, from which stats.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Committed {
    /// Kept, skipped (inf/NaN) or redone clipped.
    pub verdict: Verdict,
    /// The whole pipeline's gradient stats (after the replicas' all-reduce).
    pub stats: GradStats,
}

/// One stage's end of iteration: post-validation, then a vote of every rank of the grid.
#[derive(Clone, Debug)]
pub struct Committer {
    post: PostValidation,
    members: Vec<Rank>,
}

impl Committer {
    /// The end of iteration of `runner`'s stage: its pipeline's post-validation clipping
    /// at `max_norm`, and a vote among `members` (every rank that steps in the iteration:
    /// all the grid's ranks).
    pub fn new(runner: &Runner, mut members: Vec<Rank>, max_norm: Option<f64>) -> Committer {
        members.sort_unstable();
        members.dedup();
        Committer { post: PostValidation::new(runner, max_norm), members }
    }

    /// [`Committer::new`] with every rank of `map`'s grid voting.
    pub fn for_grid(map: &GridMap, runner: &Runner, max_norm: Option<f64>) -> Committer {
        let grid = map.grid();
        let members = (0..grid.dp).flat_map(|r| map.pipeline(r)).collect();
        Committer::new(runner, members, max_norm)
    }

    /// Steps `opt` for this iteration, on every stage or none (see the module docs):
    /// `local` are this stage's gradient stats after the replicas' all-reduce. On any
    /// error the step is undone: the weights are the last committed ones.
    pub fn step<O: Optimistic + ?Sized>(
        &self,
        comm: &mut Communicator,
        local: GradStats,
        opt: &mut O,
    ) -> Result<Committed, RunError> {
        // `settle` undoes the optimistic step itself when it fails.
        let stepped = self.post.step(comm, local, opt);
        let mine = self.post.settle(comm, stepped, opt);
        // Whether `opt` holds a step to undo if the vote says no.
        let applied = matches!(&mine, Ok((v, _)) if *v != Verdict::Skip);
        let mut vote = [u8::from(mine.is_ok())];
        let voted = if self.members.len() == comm.size() {
            comm.all_reduce(&mut vote, ReduceOp::Min)
        } else {
            comm.sub_all_reduce(&self.members, &mut vote, ReduceOp::Min)
        };
        let undo = |opt: &mut O| opt.undo().map_err(|source| RunError::Optimizer { what: "undoing the step", source });
        match (voted, mine) {
            (Ok(()), Ok((verdict, stats))) if vote[0] == 1 => Ok(Committed { verdict, stats }),
            (_, Err(e)) => Err(e),
            (Ok(()), Ok(_)) => {
                if applied {
                    undo(opt)?;
                }
                Err(RunError::Uncommitted { detail: "a rank of the grid could not step".into() })
            }
            (Err(source), Ok(_)) => {
                if applied {
                    undo(opt)?;
                }
                Err(RunError::Collective { what: "agreeing to commit the iteration's step", source: Box::new(source) })
            }
        }
    }
}
